"""nodeagent's one build entry point: the in-tree PEP 517 backend, and the developer CLI.

* PEP 517 backend (``[build-system] build-backend = "build"``, ``backend-path = ["."]`` in pyproject.toml). Each
  hook has cffi emit the C source of the ``agent._linux`` extension into ``csrc/generated/_linux.c``
  (git-ignored), assembles the kexec_load purgatory, then delegates to ``setuptools.build_meta``, which compiles
  the extension declared under ``[tool.setuptools] ext-modules``. This is what ``pip install .`` and
  ``pip install -e .`` run; it imports nothing of the static build.

* Developer CLI, ``python build.py COMMAND``::

      python build.py ext          # build agent/_linux*.so in place (development)
      python build.py gen          # only emit csrc/generated/_linux.c
      python build.py purgatory    # assemble agent/kexec/purgatory.bin (also done by ext and the PEP 517 hooks)
      python build.py static [-v] [-j N]   # dist/nodeagent, one static executable; stages cached in
                                           # ${NODEAGENT_CACHE:-~/.cache/nodeagent}/static
      python build.py initramfs [--kernel VERSION|DIR] [--modules M1,M2]   # dist/initramfs.cpio.xz: /init is
                                           # dist/nodeagent, plus the kernel modules of pyproject.toml
      python build.py [-v] [-j N]  # both: static, then initramfs
      python build.py check-size   # dist/nodeagent and the node initramfs against the budget in pyproject.toml

  The static build, its size accounting and the initramfs builder live in ``csrc/staticbuild/`` (a package that
  neither the wheel nor the binary carries), imported only by the commands that need them.

Single source of truth: the cffi declarations live in ``csrc/linux_cdef.h``, the C wrappers in
``csrc/linux.h``/``csrc/linux.c``, and the extension's sources and flags in pyproject.toml; this file only reads
them.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
CDEF = CSRC / "linux_cdef.h"
GENERATED_C = CSRC / "generated" / "_linux.c"
MODULE = "agent._linux"

# What the cffi-generated C file contains besides its own glue: the header of
# the wrappers (found through include-dirs = ["csrc"]).
_C_PRELUDE = '#include "linux.h"\n'


# --------------------------------------------------------------------------
# cffi source generation (shared by the backend and the CLI)


def make_ffibuilder():
    """The cffi FFI builder for agent._linux, from csrc/linux_cdef.h."""
    from cffi import FFI

    ffibuilder = FFI()
    ffibuilder.cdef(CDEF.read_text(encoding="utf-8"))
    ffibuilder.set_source(MODULE, _C_PRELUDE)
    return ffibuilder


def generate_c(verbose: bool = False) -> Path:
    """Emit csrc/generated/_linux.c; the file is only rewritten when it changes
    (cffi compares contents), so builds do not recompile needlessly."""
    GENERATED_C.parent.mkdir(parents=True, exist_ok=True)
    make_ffibuilder().emit_c_code(str(GENERATED_C))
    if verbose:
        print(f"generated {GENERATED_C.relative_to(ROOT)}")
    return GENERATED_C


# --------------------------------------------------------------------------
# The kexec_load purgatory: csrc/purgatory/ -> agent/kexec/purgatory.bin (git-ignored), a flat position-
# independent x86_64 blob that agent/kexec/loader.py patches (digests, entry, zero page) and loads with the kernel.

PURGATORY_SRC = CSRC / "purgatory"
PURGATORY_BIN = ROOT / "agent" / "kexec" / "purgatory.bin"
PURGATORY_CFLAGS = [
    "-fpie", "-O2", "-ffreestanding", "-fno-builtin", "-fno-stack-protector", "-mno-red-zone",
    "-mgeneral-regs-only", "-fno-asynchronous-unwind-tables", "-fvisibility=hidden", "-nostdinc",
]


def build_purgatory(verbose: bool = False, force: bool = False) -> Path:
    """Compile csrc/purgatory/{entry.S,purgatory.c} with the host gcc, link them flat at 0 with ld and
    purgatory.lds, objcopy to a raw binary. Skipped when the blob is newer than its sources (unless force).
    Refuses objects with absolute relocations: the blob must run at whatever address it is loaded."""
    import subprocess
    import tempfile

    sources = sorted(PURGATORY_SRC.iterdir()) if PURGATORY_SRC.is_dir() else []
    if not sources and PURGATORY_BIN.exists():  # an sdist without csrc/purgatory: ship the blob it carries
        return PURGATORY_BIN
    if (not force and PURGATORY_BIN.exists()
            and PURGATORY_BIN.stat().st_mtime >= max(p.stat().st_mtime for p in sources)):
        return PURGATORY_BIN

    def run(*cmd):
        if verbose:
            print(" ".join(map(str, cmd)))
        proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"purgatory: {cmd[0]} failed: {proc.stderr.strip()}")
        return proc.stdout

    with tempfile.TemporaryDirectory(prefix="purgatory-") as tmp:
        t = Path(tmp)
        run("gcc", "-c", *PURGATORY_CFLAGS, "-o", t / "purgatory.o", PURGATORY_SRC / "purgatory.c")
        run("gcc", "-c", "-o", t / "entry.o", PURGATORY_SRC / "entry.S")
        relocs = run("readelf", "-rW", t / "entry.o", t / "purgatory.o")
        absolute = [line for line in relocs.splitlines() if "R_X86_64_" in line
                    and not any(k in line for k in ("R_X86_64_PC32", "R_X86_64_PLT32"))]
        if absolute:
            raise RuntimeError("purgatory: absolute relocations (not position-independent): " + "; ".join(absolute))
        run("ld", "-nostdlib", "-static", "--no-warn-rwx-segments", "-T", PURGATORY_SRC / "purgatory.lds",
            "-o", t / "purgatory.elf", t / "entry.o", t / "purgatory.o")
        run("objcopy", "-O", "binary", t / "purgatory.elf", t / "purgatory.bin")
        PURGATORY_BIN.write_bytes((t / "purgatory.bin").read_bytes())
    if verbose:
        print(f"built {PURGATORY_BIN.relative_to(ROOT)}")
    return PURGATORY_BIN


# --------------------------------------------------------------------------
# PEP 517 / PEP 660 hooks: generate, then delegate to setuptools.build_meta.
# pip runs the hooks with the project root as the current directory, which the
# relative paths in pyproject's ext-modules rely on.


def _setuptools_backend():
    from setuptools import build_meta

    return build_meta


def get_requires_for_build_wheel(config_settings=None):
    return _setuptools_backend().get_requires_for_build_wheel(config_settings)


def get_requires_for_build_sdist(config_settings=None):
    return _setuptools_backend().get_requires_for_build_sdist(config_settings)


def get_requires_for_build_editable(config_settings=None):
    return _setuptools_backend().get_requires_for_build_editable(config_settings)


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    generate_c()
    return _setuptools_backend().prepare_metadata_for_build_wheel(
        metadata_directory, config_settings
    )


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    generate_c()
    return _setuptools_backend().prepare_metadata_for_build_editable(
        metadata_directory, config_settings
    )


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    generate_c()
    build_purgatory()
    return _setuptools_backend().build_wheel(
        wheel_directory, config_settings, metadata_directory
    )


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    # setuptools builds extensions in place for editable installs, so the .so
    # lands in agent/ next to the sources the editable finder points at.
    generate_c()
    build_purgatory()
    return _setuptools_backend().build_editable(
        wheel_directory, config_settings, metadata_directory
    )


def build_sdist(sdist_directory, config_settings=None):
    generate_c()
    build_purgatory()
    return _setuptools_backend().build_sdist(sdist_directory, config_settings)


# --------------------------------------------------------------------------
# CLI. The static build's commands import csrc/staticbuild/ here, and only here.


def _staticbuild():
    """The csrc/staticbuild package (csrc/ on sys.path first)."""
    if str(CSRC) not in sys.path:
        sys.path.insert(0, str(CSRC))
    import staticbuild

    return staticbuild


def cmd_static(args: argparse.Namespace) -> int:
    _staticbuild()
    from staticbuild.stagecache import StaticBuildError
    from staticbuild.static import build_static

    generate_c(verbose=args.verbose)
    build_purgatory(verbose=args.verbose)
    try:
        build_static(verbose=args.verbose, jobs=args.jobs)
    except StaticBuildError as err:
        print(f"build.py static: {err}", file=sys.stderr)
        return 1
    return 0


def cmd_initramfs(args: argparse.Namespace) -> int:
    _staticbuild()
    from staticbuild import BuildError
    from staticbuild.node_initramfs import build_node_initramfs

    modules = [m for m in (args.modules or "").split(",") if m]
    try:
        node = build_node_initramfs(Path(args.binary), Path(args.output), kernel=args.kernel,
                                    extra_modules=modules)
    except BuildError as err:
        print(f"build.py initramfs: {err}", file=sys.stderr)
        return 1
    print(f"{node.path}: {node.path.stat().st_size:,} bytes (/init: {args.binary}, {len(node.modules)} modules)")
    return 0


def cmd_static_and_initramfs(args: argparse.Namespace) -> int:
    """Plain `python build.py`: the binary, then the node initramfs around it."""
    return cmd_static(args) or cmd_initramfs(args)


def cmd_check_size(args: argparse.Namespace) -> int:
    _staticbuild()
    from staticbuild.sizes import check_size

    return check_size(Path(args.binary), top=args.top)


def cmd_purgatory(args: argparse.Namespace) -> int:
    path = build_purgatory(verbose=args.verbose, force=args.force)
    print(f"{path.relative_to(ROOT)}: {path.stat().st_size} bytes")
    return 0


def _pyproject_extensions():
    """setuptools Extension objects from pyproject's [tool.setuptools] ext-modules."""
    import tomllib

    from setuptools import Extension

    with open(ROOT / "pyproject.toml", "rb") as f:
        config = tomllib.load(f)
    extensions = []
    for spec in config["tool"]["setuptools"]["ext-modules"]:
        kwargs = {key.replace("-", "_"): value for key, value in spec.items()}
        extensions.append(Extension(**kwargs))
    return extensions


def cmd_gen(args: argparse.Namespace) -> int:
    generate_c(verbose=True)
    return 0


def cmd_ext(args: argparse.Namespace) -> int:
    """Compile agent._linux in place (agent/_linux.<abi>.so), as a developer
    would before running the tests from the source tree."""
    generate_c(verbose=args.verbose)
    build_purgatory(verbose=args.verbose, force=args.force)

    from setuptools import Distribution

    os.chdir(ROOT)  # ext-modules paths are relative to the project root
    dist = Distribution(
        {"name": "nodeagent", "ext_modules": _pyproject_extensions()}
    )
    dist.script_name = "build.py"
    dist.script_args = [
        "--verbose" if args.verbose else "--quiet",
        "build_ext",
        "--inplace",
        "--build-temp",
        str(ROOT / "build" / "ext-temp"),
    ] + (["--force"] if args.force else [])
    dist.parse_command_line()
    dist.run_commands()
    cmd = dist.get_command_obj("build_ext")
    for ext in cmd.extensions:
        print(f"built {Path(cmd.get_ext_fullpath(ext.name)).resolve().relative_to(ROOT)}")
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python build.py", description="nodeagent build commands"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("ext", help="build the agent._linux extension in place")
    p.add_argument("-f", "--force", action="store_true", help="recompile everything")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_ext)

    p = sub.add_parser("purgatory", help="build agent/kexec/purgatory.bin (the kexec_load purgatory)")
    p.add_argument("-f", "--force", action="store_true", help="rebuild even if up to date")
    p.add_argument("-v", "--verbose", action="store_true", help="show the compile and link commands")
    p.set_defaults(func=cmd_purgatory)

    p = sub.add_parser("gen", help="only emit csrc/generated/_linux.c from the cdef")
    p.set_defaults(func=cmd_gen)

    p = sub.add_parser("static", help="build dist/nodeagent, one static executable (uClibc-ng, Nuitka)")
    p.add_argument("-v", "--verbose", action="store_true", help="show the build commands' output")
    p.add_argument("-j", "--jobs", type=int, default=min(3, os.cpu_count() or 2), metavar="N",
                   help="parallel compile jobs (default: %(default)s)")
    p.set_defaults(func=cmd_static)

    def initramfs_options(p):
        p.add_argument("--kernel", metavar="VERSION|DIR",
                       help="the kernel whose modules go in: a Debian release (6.1.0-57-amd64), or a module tree "
                            "(lib/modules/RELEASE, or a folder holding one); default: the VM tests' Debian kernel")
        p.add_argument("--modules", metavar="M1,M2", help="modules to add to [tool.nodeagent.initramfs]'s "
                                                           "(a site's NIC and disk drivers: e1000e,igb,ahci,nvme)")
        p.add_argument("--binary", default=str(ROOT / "dist" / "nodeagent"), help="/init (default: %(default)s)")
        p.add_argument("-o", "--output", default=str(ROOT / "dist" / "initramfs.cpio.xz"),
                       help="default: %(default)s")

    p = sub.add_parser("initramfs", help="build dist/initramfs.cpio.xz, the node's initramfs: /init is "
                                         "dist/nodeagent, with the kernel modules of pyproject.toml")
    initramfs_options(p)
    p.set_defaults(func=cmd_initramfs)

    p = sub.add_parser("all", help="static, then initramfs (what a plain `python build.py` does)")
    p.add_argument("-v", "--verbose", action="store_true", help="show the build commands' output")
    p.add_argument("-j", "--jobs", type=int, default=min(3, os.cpu_count() or 2), metavar="N",
                   help="parallel compile jobs (default: %(default)s)")
    initramfs_options(p)
    p.set_defaults(func=cmd_static_and_initramfs)

    p = sub.add_parser("check-size", help="compare dist/nodeagent and the node initramfs with the budget in "
                                          "pyproject.toml; print the biggest contributors; guard excluded modules")
    p.add_argument("--binary", default=str(ROOT / "dist" / "nodeagent"), help="the executable (default: %(default)s)")
    p.add_argument("--top", type=int, default=25, help="rows of biggest contributors (default: %(default)s)")
    p.set_defaults(func=cmd_check_size)

    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["all", *argv]  # plain `python build.py [-v] [-j N] ...`: the binary, then the initramfs
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
