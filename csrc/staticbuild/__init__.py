"""The build beside the product: the static single-file build (`python build.py static` -> dist/nodeagent), its
size accounting (`check-size`) and the initramfs builder. Run through build.py only; neither the wheel (pyproject
packages only agent*) nor the binary (Nuitka follows imports from agent.cli) carries this package.

    pins.py          what goes in: versions and sha256s, flags, built-in modules, Nuitka's module lists
    stagecache.py    a stage cached under a key of all its inputs; the command runner with its log
    sources.py       Debian and PyPI sources, pinned by sha256, cached in <cache>/static/downloads
    sysroot.py       stage 1: uClibc-ng, kernel headers, the gcc wrapper, static zlib and libffi
    cpython.py       stage 2: a static CPython 3.11 with the agent's built-in modules
    nuitka_stage.py  stage 3: Nuitka with csrc/static/nuitka-*.patch
    agent_stage.py   stage 4: the agent compiled by Nuitka and linked: dist/nodeagent, .map, -report.xml
    static.py        the stages in order, under the cache's lock
    sizes.py         check-size: the budget of pyproject.toml, the linker map's table of contributors
    cpio.py          a reproducible newc cpio writer
    initramfs.py     an initramfs from a spec: files, devices, kernel modules with their dependencies
    debian_kernel.py Debian's kernel and modules (apt-get download, never installed)
    node_initramfs.py  the node's initramfs (build.py initramfs): the binary as /init, the modules of pyproject

Stages, all but the last cached in ${NODEAGENT_CACHE:-~/.cache/nodeagent}/static/<stage>-<key>/, where key hashes
every input of the stage (pins, tarball sha256s, flags, the files of csrc/static it uses, the key of the stage
below, STATIC_STAGE_VERSION: bump it when the code of a stage changes). A stage is built in <stage>-<key>.tmp and
renamed into place only when complete; its log is <stage>-<key>.log beside it.
  sysroot  uClibc-ng 1.0.35 (Debian's uclibc-source) built with the host gcc: static, NPTL, wide chars, IPv6,
           C locale; the kernel headers of linux-libc-dev; csrc/static/dl_find_object.c; the wrapper
           <sysroot>/bin/uclibc-gcc (csrc/static/uclibc-gcc.sh + .specs); static zlib and libffi.
  python   CPython 3.11.2 --disable-shared against the sysroot with the modules of csrc/static/Setup.local built
           in (stdlib ones, _ctypes, cffi's _cffi_backend, zstandard's backend as _zstd_backend_c, the agent's
           cffi module as _agent_linux) and zstandard's Python package in site-packages. Its lib/libpython3.11.a,
           which Nuitka links, holds only STATIC_AGENT_MODULES (the full archive is kept as
           libpython3.11-full.a); the interpreter itself has them all, for running Nuitka.
  nuitka   Nuitka's package with csrc/static/nuitka-*.patch, put on that interpreter's path (PYTHONPATH).
  agent    the agent's .py files staged with agent/_embedded.py, compiled by Nuitka run by that interpreter,
           linked by the wrapper (--gc-sections): dist/nodeagent (stripped), dist/nodeagent.map (linker map),
           dist/nodeagent-report.xml (Nuitka's report); redone only when its key (dist/nodeagent.key: the agent's
           files and the stages below) changes. Work files and Nuitka's log: build/static/.
Sources come from Debian's archive (pinned URL + sha256, else `apt-get source` with a throw-away apt
configuration) and PyPI (`pip download`), cached in <cache>/static/downloads.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout: csrc/staticbuild/ -> ../..
CSRC = ROOT / "csrc"
STATIC_SRC = CSRC / "static"
DIST = ROOT / "dist"
# What build.py's cffi step emits for agent._linux (the static build compiles the same C as a built-in module).
GENERATED_C = CSRC / "generated" / "_linux.c"


class BuildError(Exception):
    """A build step cannot be done (a missing tool, a download that fails its sha256, a module not in a kernel):
    build.py prints it on one line and exits 1."""


def cache_root() -> Path:
    """Where build-host work is kept between runs, outside the checkout: ${NODEAGENT_CACHE:-~/.cache/nodeagent}
    (Debian's kernel, the static build's stages, the VM tests' Python runtime)."""
    return Path(os.environ.get("NODEAGENT_CACHE") or "~/.cache/nodeagent").expanduser()


def pyproject() -> dict:
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)
