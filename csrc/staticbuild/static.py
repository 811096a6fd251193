"""`python build.py static`: the four stages in order, under the cache's lock."""

from __future__ import annotations

import os
from pathlib import Path

from .agent_stage import build_agent
from .cpython import static_python
from .nuitka_stage import static_nuitka
from .pins import STATIC_HOST_TOOLS
from .stagecache import StaticBuildError, static_cache_root
from .sysroot import static_sysroot


def _ensure_host_tools(verbose: bool) -> None:
    import shutil
    import subprocess

    missing = sorted({pkg for tool, pkg in STATIC_HOST_TOOLS.items() if shutil.which(tool) is None})
    if not missing:
        return
    if os.geteuid() != 0:
        raise StaticBuildError(f"missing build tools: apt-get install {' '.join(missing)}")
    print(f"installing build tools: apt-get install {' '.join(missing)}", flush=True)
    out = None if verbose else subprocess.DEVNULL
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if subprocess.run(cmd, stdout=out, stderr=out).returncode != 0:
        subprocess.run(["apt-get", "update"], stdout=out, stderr=out)
        if subprocess.run(cmd, stdout=out, stderr=out).returncode != 0:
            raise StaticBuildError(f"could not install {' '.join(missing)} with apt-get")


def build_static(verbose: bool = False, jobs: int = 2) -> Path:
    """dist/nodeagent from the stages (cached ones are taken as they are); raises StaticBuildError."""
    import fcntl
    import time

    start = time.monotonic()
    # Builds at once (a test session and a developer, two checkouts sharing the cache) take turns.
    lock_path = static_cache_root() / "build.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _ensure_host_tools(verbose)
        sysroot = static_sysroot(verbose=verbose, jobs=jobs)
        python_stage = static_python(sysroot, verbose=verbose, jobs=jobs)
        nuitka_stage = static_nuitka(python_stage, verbose=verbose)
        binary = build_agent(python_stage, nuitka_stage, sysroot, verbose=verbose, jobs=jobs)
    print(f"static build done in {time.monotonic() - start:.0f} s")
    return binary
