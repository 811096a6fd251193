"""Shared fixtures: real loop devices, mounts, the imagezip test vectors, and a CLI runner."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "imagezip"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
ROOT = Path(__file__).resolve().parent.parent
# The build side (static build, size accounting, initramfs builder) is a package of its own beside the product.
if str(ROOT / "csrc") not in sys.path:
    sys.path.insert(0, str(ROOT / "csrc"))


def pytest_addoption(parser):
    parser.addoption(
        "--nodeagent",
        default=os.environ.get("NODEAGENT_BIN", ""),
        help="run CLI tests against this executable instead of `python -m agent`",
    )


def pytest_configure(config):
    exe = config.getoption("--nodeagent")
    if exe:
        exe = str(Path(exe).resolve())
        if not os.access(exe, os.X_OK):
            raise pytest.UsageError(f"--nodeagent {exe}: not an executable file")
        os.environ["NODEAGENT_BIN"] = exe  # for helpers that start the agent in network namespaces


@pytest.fixture(scope="session")
def cli_command(request) -> list[str]:
    exe = os.environ.get("NODEAGENT_BIN") if request.config.getoption("--nodeagent") else None
    return [exe] if exe else [sys.executable, "-m", "agent"]


@pytest.fixture
def run_cli(cli_command):
    """Run nodeagent with arguments; returns the CompletedProcess (text output)."""

    def run(*args, input=None, check=False, timeout=300):
        proc = subprocess.run(
            [*cli_command, *map(str, args)],
            input=input,
            capture_output=True,
            timeout=timeout,
            cwd=ROOT,
        )
        proc.out = proc.stdout.decode(errors="replace")
        proc.err = proc.stderr.decode(errors="replace")
        if check and proc.returncode != 0:
            raise AssertionError(f"nodeagent {args} failed ({proc.returncode}): {proc.err}")
        return proc

    return run


def sh(*cmd, **kw) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


@contextlib.contextmanager
def loop_device(path, offset: int | None = None, sizelimit: int | None = None, sector_size: int | None = None):
    cmd = ["losetup", "--find", "--show"]
    if offset is not None:
        cmd += ["--offset", str(offset)]
    if sizelimit is not None:
        cmd += ["--sizelimit", str(sizelimit)]
    if sector_size is not None:
        cmd += ["--sector-size", str(sector_size)]
    dev = sh(*cmd, str(path)).strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@contextlib.contextmanager
def mounted(path, tmp_path_factory, offset: int = 0, fstype: str | None = None):
    point = tmp_path_factory.mktemp("mnt")
    cmd = ["mount", "-o", f"ro,loop,offset={offset}"]
    if fstype:
        cmd += ["-t", fstype]
    sh(*cmd, str(path), str(point))
    try:
        yield point
    finally:
        subprocess.run(["umount", str(point)], check=False)


def tree_of(root: Path) -> dict:
    """Files and symlinks under root, in the manifest's form."""
    tree = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "lost+found"]
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            full = os.path.join(dirpath, name)
            rel = "/" + os.path.relpath(full, root)
            if os.path.islink(full):
                tree[rel] = {"symlink": os.readlink(full)}
            else:
                data = Path(full).read_bytes()
                tree[rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    return tree


def sha256_file(path, length: int | None = None, offset: int = 0) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = length
        while True:
            piece = f.read(1 << 20 if left is None else min(1 << 20, left))
            if not piece:
                break
            h.update(piece)
            if left is not None:
                left -= len(piece)
                if not left:
                    break
    return h.hexdigest()


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (loop devices, mount)")
