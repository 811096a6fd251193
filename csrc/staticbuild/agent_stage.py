"""Stage 4, agent: the agent's sources staged with agent/_embedded.py, compiled by Nuitka with the static
interpreter, linked by the uclibc-gcc wrapper: dist/nodeagent (stripped), dist/nodeagent.map, dist/nodeagent-report.xml.
Redone only when its key (dist/nodeagent.key) changes."""

from __future__ import annotations

import sys
from pathlib import Path

from . import DIST, ROOT
from .pins import EMBEDDED_FILES, NUITKA_BYTECODE, NUITKA_ENV, NUITKA_NOFOLLOW, STATIC_STAGE_VERSION
from .stagecache import BuildLog, StaticBuildError, stage_key, static_cache_root


def _embedded_source() -> str:
    """The text of agent/_embedded.py for the staged copy: the package data (EMBEDDED_FILES) as constants,
    made by agent.resources.embed_module_source (zlib-compressed; agent.resources reads them back)."""
    files = {rel: (ROOT / "agent" / rel).read_bytes() for rel in EMBEDDED_FILES}
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from agent.resources import embed_module_source

    return embed_module_source(files)


def _stage_agent(stage: Path) -> Path:
    """Copy agent/*.py to stage/agent, generate agent/_embedded.py and the entry script; return the entry."""
    import shutil

    if stage.exists():
        shutil.rmtree(stage)
    for py in sorted((ROOT / "agent").rglob("*.py")):
        rel = py.relative_to(ROOT)
        if "__pycache__" in rel.parts:
            continue
        (stage / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(py, stage / rel)
    (stage / "agent" / "_embedded.py").write_text(_embedded_source())
    entry = stage / "nodeagent.py"
    entry.write_text("import sys\n\nfrom agent.cli import main\n\nsys.exit(main())\n")
    return entry


def build_agent(python_stage: Path, nuitka_stage: Path, sysroot: Path, verbose: bool, jobs: int) -> Path:
    """dist/nodeagent. The purgatory and the cffi C are made by build.py before (the backend's steps)."""
    import shutil
    import time

    start = time.monotonic()
    # The agent stage is redone only when its inputs change (the agent's files, what is embedded, the stages
    # below, the Nuitka options): the key of the binary in dist/ sits beside it.
    sources = sorted(p for p in (ROOT / "agent").rglob("*.py") if "__pycache__" not in p.parts)
    key = stage_key(STATIC_STAGE_VERSION, python_stage.name, nuitka_stage.name, sysroot.name, NUITKA_NOFOLLOW,
                     NUITKA_BYTECODE, NUITKA_ENV, [str(p.relative_to(ROOT)) for p in sources], *sources,
                     *[ROOT / "agent" / rel for rel in EMBEDDED_FILES])
    key_file = DIST / "nodeagent.key"
    outputs = [DIST / "nodeagent", DIST / "nodeagent.map", DIST / "nodeagent-report.xml"]
    if all(p.exists() for p in outputs) and key_file.exists() and key_file.read_text().strip() == key:
        print(f"[agent] up to date: {outputs[0].relative_to(ROOT)} {outputs[0].stat().st_size:,} bytes")
        return outputs[0]
    build = ROOT / "build" / "static"
    build.mkdir(parents=True, exist_ok=True)
    entry = _stage_agent(build / "stage")
    out = build / "nuitka"
    if out.exists():
        shutil.rmtree(out)
    DIST.mkdir(exist_ok=True)
    link_map = DIST / "nodeagent.map"
    report = DIST / "nodeagent-report.xml"
    for p in (link_map, report, DIST / "nodeagent", key_file):
        if p.exists():
            p.unlink()
    python = python_stage / "bin" / "python3.11"
    libpl = python_stage / "lib" / "python3.11" / "config-3.11-x86_64-linux-gnu"
    link_libs = [str(libpl / "libexpat.a")] if (libpl / "libexpat.a").exists() else []
    link_libs += ["-lffi", "-lz", "-lm"]
    env = {
        "CC": str(sysroot / "bin" / "uclibc-gcc"),
        "NODEAGENT_LINK_MAP": str(link_map),
        "NODEAGENT_LINK_LIBS": " ".join(link_libs),
        "NODEAGENT_LINK_FLAGS": "-Wl,--gc-sections",
        "PYTHONPATH": f"{nuitka_stage}:{build / 'stage'}",
        "PYTHONNOUSERSITE": "1",
        "NUITKA_CACHE_DIR": str(static_cache_root() / "nuitka-cache"),
        **NUITKA_ENV,
    }
    cmd = [python, "-m", "nuitka", "--standalone", "--static-libpython=yes",
           "--python-flag=no_site,no_asserts,no_docstrings",
           *[f"--nofollow-import-to={m}" for m in NUITKA_NOFOLLOW],
           *[f"--noinclude-custom-mode={m}:bytecode" for m in NUITKA_BYTECODE],
           "--output-filename=nodeagent", f"--output-dir={out}", f"--report={report}",
           f"--jobs={jobs}", "--lto=no", "--assume-yes-for-downloads", "--disable-ccache",
           # the CLI has its own -c and -m flags (info -c, kexec -c, image -m): not a self-execution attempt
           "--no-deployment-flag=self-execution", entry]
    log = BuildLog(build / "nuitka.log", verbose)
    try:
        log.note(f"[agent] Nuitka (log: {log.path})")
        log.run(cmd, cwd=build / "stage", env=env)
    finally:
        log.close()
    dist_dir = out / "nodeagent.dist"
    files = [p for p in dist_dir.rglob("*") if p.is_file()]
    binary = dist_dir / "nodeagent"
    extra = [str(p.relative_to(dist_dir)) for p in files if p != binary]
    if extra:
        raise StaticBuildError(f"Nuitka's dist folder holds more than the binary: {extra}")
    target = DIST / "nodeagent"
    shutil.copyfile(binary, target)
    import subprocess

    subprocess.run(["strip", "--strip-all", str(target)], check=True)
    target.chmod(0o755)
    key_file.write_text(key + "\n")
    size = target.stat().st_size
    print(f"[agent] built in {time.monotonic() - start:.0f} s: {target.relative_to(ROOT)} {size:,} bytes "
          f"(map: {link_map.relative_to(ROOT)}, report: {report.relative_to(ROOT)})")
    return target


