"""A stage of the static build, cached under a key of all its inputs, and the runner of its commands (output to
the stage's log; on failure the log's tail with the command)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from . import BuildError, cache_root


class StaticBuildError(BuildError):
    pass


def static_cache_root() -> Path:
    return cache_root() / "static"


def stage_key(*parts) -> str:
    import hashlib

    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            data = part.name.encode() + b"\0" + part.read_bytes()
        else:
            data = repr(part).encode()
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()[:16]


def sha256_file(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class BuildLog:
    """Runs build commands: output to the stage's log file (or the terminal with -v); on failure the log's
    tail is shown with the command."""

    def __init__(self, path: Path, verbose: bool):
        self.path = path
        self.verbose = verbose
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "w", encoding="utf-8", errors="replace")

    def note(self, message: str) -> None:
        print(message, flush=True)
        self.file.write(f"### {message}\n")
        self.file.flush()

    def run(self, cmd, cwd=None, env=None, capture=False) -> str:
        import shlex
        import subprocess

        cmd = [str(c) for c in cmd]
        line = f"$ (cd {cwd or os.getcwd()}; {shlex.join(cmd)})"
        self.file.write(line + "\n")
        self.file.flush()
        if self.verbose:
            print(line, flush=True)
        full_env = dict(os.environ, **(env or {}))
        proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, text=True, errors="replace")
        out = []
        for text in proc.stdout:
            self.file.write(text)
            if capture:
                out.append(text)
            if self.verbose:
                sys.stdout.write(text)
        rc = proc.wait()
        self.file.flush()
        if rc != 0:
            self.file.close()
            tail = self.path.read_text(errors="replace").splitlines()[-40:]
            raise StaticBuildError(f"command failed (exit {rc}): {shlex.join(cmd)}\n"
                                   + "\n".join("    " + t for t in tail) + f"\n(full log: {self.path})")
        return "".join(out)

    def close(self) -> None:
        self.file.close()


def cached_stage(name: str, key: str, build, verbose: bool) -> Path:
    """<cache>/static/<name>-<key>: returned at once when present, else built by build(tmp, final, log) in
    <name>-<key>.tmp and renamed into place."""
    import shutil
    import time

    root = static_cache_root()
    final = root / f"{name}-{key}"
    if final.is_dir():
        print(f"[{name}] cached: {final}")
        return final
    for stale in root.glob(f"{name}-*.tmp"):  # left by an interrupted or failed build
        shutil.rmtree(stale)
    tmp = root / f"{name}-{key}.tmp"
    tmp.mkdir(parents=True)
    log = BuildLog(root / f"{name}-{key}.log", verbose)
    start = time.monotonic()
    log.note(f"[{name}] building {final.name} (log: {log.path})")
    try:
        build(tmp, final, log)
    finally:
        log.close()
    tmp.rename(final)
    print(f"[{name}] built in {time.monotonic() - start:.0f} s: {final}")
    return final

