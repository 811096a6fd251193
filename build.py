"""nodeagent's build script and in-tree PEP 517 build backend.

Two roles, one file:

* PEP 517 backend (``[build-system] build-backend = "build"``, ``backend-path =
  ["."]`` in pyproject.toml).  Each hook first has cffi emit the C source of the
  ``agent._linux`` extension into ``csrc/generated/_linux.c`` (git-ignored), then
  delegates to ``setuptools.build_meta``, which compiles the extension declared
  under ``[tool.setuptools] ext-modules`` in pyproject.toml.  This is what
  ``pip install .`` and ``pip install -e .`` run.

* Developer CLI, ``python build.py COMMAND``::

      python build.py ext      # build agent/_linux*.so in place (development)
      python build.py gen      # only emit csrc/generated/_linux.c
      python build.py purgatory  # assemble agent/kexec/purgatory.bin (also done by ext and the PEP 517 hooks)
      python build.py [static] [-v] [-j N]  # dist/nodeagent: one static executable (see "Static
                                            # single-file build" below; stages cached in
                                            # ${NODEAGENT_CACHE:-~/.cache/nodeagent}/static)
      python build.py check-size  # dist/nodeagent and the node initramfs against the budget in pyproject.toml

Single source of truth: the cffi declarations live in ``csrc/linux_cdef.h``, the
C wrappers in ``csrc/linux.h``/``csrc/linux.c``, and the extension's sources and
flags in pyproject.toml; this file only reads them.
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


# ==========================================================================
# Static single-file build: `python build.py static` -> dist/nodeagent
#
# One fully static x86_64 ELF: Nuitka compiles the agent against a static CPython 3.11 linked with uClibc-ng.
# Stages, all but the last cached in ${NODEAGENT_CACHE:-~/.cache/nodeagent}/static/<stage>-<key>/, where key
# hashes every input of the stage (pins, tarball sha256s, flags, the files of csrc/static it uses, the key of
# the stage below, STATIC_STAGE_VERSION: bump it when the code of a stage changes). A stage is built in
# <stage>-<key>.tmp and renamed into place only when complete; its log is <stage>-<key>.log beside it.
#   sysroot  uClibc-ng 1.0.35 (Debian's uclibc-source) built with the host gcc: static, NPTL, wide chars,
#            IPv6, C locale; the kernel headers of linux-libc-dev; csrc/static/dl_find_object.c; the wrapper
#            <sysroot>/bin/uclibc-gcc (csrc/static/uclibc-gcc.sh + .specs); static zlib and libffi.
#   python   CPython 3.11.2 --disable-shared against the sysroot with the modules of csrc/static/Setup.local
#            built in (stdlib ones, _ctypes, cffi's _cffi_backend, zstandard's backend as _zstd_backend_c, the
#            agent's cffi module as _agent_linux) and zstandard's Python package in site-packages. Its
#            lib/libpython3.11.a, which Nuitka links, holds only STATIC_AGENT_MODULES (the full archive is
#            kept as libpython3.11-full.a); the interpreter itself has them all, for running Nuitka.
#   nuitka   Nuitka's package with csrc/static/nuitka-*.patch, put on that interpreter's path (PYTHONPATH).
#   agent    the agent's .py files staged with agent/_embedded.py, compiled by Nuitka run by that interpreter,
#            linked by the wrapper (--gc-sections): dist/nodeagent (stripped), dist/nodeagent.map (linker map),
#            dist/nodeagent-report.xml (Nuitka's report); redone only when its key (dist/nodeagent.key: the
#            agent's files and the stages below) changes. Work files and Nuitka's log: build/static/.
# `python build.py check-size` then holds the binary and the node's initramfs to [tool.nodeagent.size-budget].
# Sources come from Debian's archive (pinned URL + sha256, else `apt-get source` with a throw-away apt
# configuration) and PyPI (`pip download`), cached in <cache>/static/downloads.

STATIC_SRC = CSRC / "static"
STATIC_STAGE_VERSION = "2"
DIST = ROOT / "dist"

UCLIBC_DEB = {"package": "uclibc-source", "version": "1.0.35-1",
              "sha256": "661d20337248f555e5a56d3b2d5ac9ca0e2a088389a723dca8cf9ad230757c3e"}
UCLIBC_TARBALL = {"member": "usr/src/uClibc-ng-1.0.35.tar.xz",
                  "sha256": "2c312f60ef48053bae6aa5ae73b7013ac64c5abfafb86ed5feaf742e8e8d06b6"}
DEBIAN_TARBALLS = {
    "python": {"file": "python3.11_3.11.2.orig.tar.gz", "source": "python3.11",
               "sha256": "2411c74bda5bbcfcddaf4531f66d1adc73f247f529aee981b029513aefdbf849",
               "urls": ["http://deb.debian.org/debian-security/pool/updates/main/p/python3.11/",
                        "http://deb.debian.org/debian/pool/main/p/python3.11/"]},
    "zlib": {"file": "zlib_1.2.13.dfsg.orig.tar.bz2", "source": "zlib",
             "sha256": "71feb7947e3c00ef125f83b79a4e529bde31171e5babe48b391f06758d1ab0a1",
             "urls": ["http://deb.debian.org/debian/pool/main/z/zlib/"]},
    "libffi": {"file": "libffi_3.4.4.orig.tar.gz", "source": "libffi",
               "sha256": "d66c56ad259a82cf2a9dfc408b32bf5da52371500b84745f7fb8b645712df676",
               "urls": ["http://deb.debian.org/debian/pool/main/libf/libffi/"]},
}
SDISTS = {
    "cffi": {"version": "2.0.0", "file": "cffi-2.0.0.tar.gz",
             "sha256": "44d1b5909021139fe36001ae048dbdde8214afa20200eda0f64c068cac5d5529"},
    "zstandard": {"version": "0.25.0", "file": "zstandard-0.25.0.tar.gz",
                  "sha256": "7713e1179d162cf5c7906da876ec2ccb9c3a9dcbdffef0cc7f70c3667a205f0b"},
    "nuitka": {"version": "4.3.3", "file": "nuitka-4.3.3.tar.gz",
               "sha256": "3bed65735d5cfc53dc13070f9f17c52dbe584c0f03de32b6ef011f5db674add9"},
}
KERNEL_HEADER_DIRS = ["linux", "asm-generic", "mtd", "rdma", "sound", "video", "misc", "xen"]
STATIC_CFLAGS = "-Os"
# zlib is where saving spends its time (deflate of every byte saved): built as Debian builds it (-O3, UNALIGNED_OK:
# x86 loads unaligned 16-bit words in longest_match), which costs ~30 KB and matches the distribution's zlib; at -Os
# saving ran at 0.87x the package, at -O2 0.92x (tests/bench/bench_binary.py).
ZLIB_CFLAGS = "-O3 -DUNALIGNED_OK"
PYTHON_CONFIGURE = [
    "--disable-shared", "--without-ensurepip", "--without-doc-strings", "--disable-test-modules",
    "--with-builtin-hashlib-hashes=md5,sha1,sha256,sha512,sha3,blake2",
    "--without-readline",
]
# Modules configure would otherwise hand to setup.py to build as shared objects (which a static interpreter
# cannot load): marked n/a. Everything wanted is a built-in from csrc/static/Setup.local.
PYTHON_NA_MODULES = [
    "_asyncio", "_bz2", "_codecs_cn", "_codecs_hk", "_codecs_iso2022", "_codecs_jp", "_codecs_kr",
    "_codecs_tw", "_crypt", "_csv", "_ctypes_test", "_curses", "_curses_panel", "_dbm", "_decimal",
    "_elementtree", "_gdbm", "_hashlib", "_lsprof", "_lzma", "_multibytecodec", "_scproxy", "_sqlite3",
    "_ssl", "_statistics", "_testbuffer", "_testcapi", "_testclinic", "_testimportmultiple",
    "_testinternalcapi", "_testmultiphase", "_tkinter", "_uuid", "_xxsubinterpreters", "_xxtestfuzz",
    "_zoneinfo", "audioop", "cmath", "nis", "ossaudiodev", "readline", "spwd", "syslog", "xxlimited",
    "xxlimited_35",
]
# The stdlib the agent never imports: Nuitka does not follow these (smaller binary, faster compile).
NUITKA_NOFOLLOW = [
    "agent._linux", "agent.initramfs", "zstandard.backend_cffi", "zstandard.backend_rust", "cffi",
    "unittest", "pydoc", "doctest", "pdb", "http.server", "xmlrpc", "xml", "tkinter", "asyncio",
    "distutils", "lib2to3", "idlelib", "test", "sqlite3", "ctypes", "multiprocessing", "setuptools",
    "pip", "curses", "dbm", "ensurepip", "venv", "turtle", "turtledemo", "pydoc_data", "zoneinfo",
    "lzma", "bz2", "decimal", "_pydecimal", "statistics", "tomllib", "wsgiref", "concurrent.futures.process",
    "mailbox", "imaplib", "smtplib", "poplib", "nntplib", "ftplib", "telnetlib", "cgi", "cgitb",
    "sndhdr", "imghdr", "audioop", "chunk", "wave", "aifc", "sunau", "tabnanny", "trace", "profile",
    "cProfile", "pstats", "timeit", "code", "codeop", "pickletools", "zipapp", "pyclbr", "filecmp",
    # Nuitka's standalone mode also carries every stdlib module it finds (as bytecode) in case of a dynamic
    # import; these are reached by no import of the agent (from its --report: closure of the import graph),
    # or only by paths it never takes (shutil's archive functions, Logger.__reduce__, warnings' tracemalloc).
    "__hello__", "__phello__", "_aix_support", "_bootsubprocess", "_markupbase", "_osx_support", "_pyio",
    "_sitebuiltins", "_strptime", "_sysconfigdata__linux_x86_64-linux-gnu", "base64", "calendar", "cmd",
    "colorsys", "configparser", "contextvars", "datetime", "difflib",
    "fileinput", "getopt",
    "glob", "graphlib", "html", "imp", "importlib.abc", "importlib.readers", "importlib.resources",
    "importlib.simple", "mailcap", "mimetypes", "modulefinder", "netrc", "nturl2path", "numbers", "pipes",
    "pkgutil", "pprint", "rlcompleter", "sched", "socketserver", "sre_compile", "sre_constants", "sre_parse",
    "stringprep", "symtable", "sysconfig", "uu", "webbrowser", "xdrlib",
    "tarfile", "zipfile", "gzip", "_compression", "pickle", "_compat_pickle", "tracemalloc",
]
# Agent modules carried as bytecode instead of compiled to C (a fifth to a tenth of the size): all but the
# per-packet frisbee code and the worker pool. Imaging and saving run Python once per 1 MiB chunk or 64 KiB
# piece, the bytes themselves go through zlib/zstd/pwrite in C, so compiling that code buys nothing measurable.
NUITKA_BYTECODE = ["agent.cli", "agent.kexec", "agent.fs", "agent.linux", "agent.linux_files", "agent.netif",
                   "agent.demo", "agent.info", "agent.errors", "agent.resources", "agent._embedded", "agent.progress",
                   "agent.ndz.header", "agent.ndz.chunker", "agent.ndz.coverage", "agent.io.target",
                   "agent.io.sources", "agent.io.image", "agent.io.save"]
EMBEDDED_FILES = ["kexec/purgatory.bin", "demo/demo.ndz", "demo/demo.json"]


class StaticBuildError(RuntimeError):
    pass


def _static_cache_root() -> Path:
    from agent.initramfs import cache_root  # the one place that reads NODEAGENT_CACHE

    return cache_root() / "static"


def _stage_key(*parts) -> str:
    import hashlib

    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            data = part.name.encode() + b"\0" + part.read_bytes()
        else:
            data = repr(part).encode()
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()[:16]


def _sha256_file(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _Log:
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


def _cached_stage(name: str, key: str, build, verbose: bool) -> Path:
    """<cache>/static/<name>-<key>: returned at once when present, else built by build(tmp, final, log) in
    <name>-<key>.tmp and renamed into place."""
    import shutil
    import time

    root = _static_cache_root()
    final = root / f"{name}-{key}"
    if final.is_dir():
        print(f"[{name}] cached: {final}")
        return final
    for stale in root.glob(f"{name}-*.tmp"):  # left by an interrupted or failed build
        shutil.rmtree(stale)
    tmp = root / f"{name}-{key}.tmp"
    tmp.mkdir(parents=True)
    log = _Log(root / f"{name}-{key}.log", verbose)
    start = time.monotonic()
    log.note(f"[{name}] building {final.name} (log: {log.path})")
    try:
        build(tmp, final, log)
    finally:
        log.close()
    tmp.rename(final)
    print(f"[{name}] built in {time.monotonic() - start:.0f} s: {final}")
    return final


# ---- sources ---------------------------------------------------------------


def _downloads() -> Path:
    path = _static_cache_root() / "downloads"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _verified(path: Path, sha256: str) -> bool:
    return path.is_file() and _sha256_file(path) == sha256


def _place(tmp: Path, dest: Path, sha256: str, what: str) -> Path:
    got = _sha256_file(tmp)
    if got != sha256:
        tmp.unlink()
        raise StaticBuildError(f"{what}: sha256 {got}, expected {sha256}")
    tmp.rename(dest)
    return dest


def _fetch_debian_tarball(name: str, log: _Log) -> Path:
    """A Debian .orig tarball: from its pinned pool URL, else through `apt-get source --download-only` with a
    throw-away apt configuration (deb-src lines of its own; /etc/apt is not touched). sha256 checked."""
    import tempfile
    import urllib.request

    spec = DEBIAN_TARBALLS[name]
    dest = _downloads() / spec["file"]
    if _verified(dest, spec["sha256"]):
        return dest
    part = dest.with_suffix(dest.suffix + ".part")
    for base in spec["urls"]:
        try:
            log.note(f"download {base}{spec['file']}")
            with urllib.request.urlopen(base + spec["file"], timeout=60) as resp, open(part, "wb") as out:
                while block := resp.read(1 << 20):
                    out.write(block)
            return _place(part, dest, spec["sha256"], spec["file"])
        except (OSError, StaticBuildError) as err:
            log.note(f"  failed: {err}")
    log.note(f"apt-get source --download-only {spec['source']} (temporary apt configuration)")
    with tempfile.TemporaryDirectory(prefix="nodeagent-apt-") as t:
        t = Path(t)
        for sub in ("lists/partial", "cache/archives/partial", "work"):
            (t / sub).mkdir(parents=True)
        keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
        (t / "sources.list").write_text(
            f"deb-src [signed-by={keyring}] http://deb.debian.org/debian bookworm main\n"
            f"deb-src [signed-by={keyring}] http://deb.debian.org/debian bookworm-updates main\n"
            f"deb-src [signed-by={keyring}] http://deb.debian.org/debian-security bookworm-security main\n")
        opts = [f"-oDir::Etc::SourceList={t / 'sources.list'}", "-oDir::Etc::SourceParts=/nonexistent",
                f"-oDir::State::Lists={t / 'lists'}", f"-oDir::Cache={t / 'cache'}",
                "-oAPT::Sandbox::User=root"]
        log.run(["apt-get", *opts, "update"])
        log.run(["apt-get", *opts, "source", "--download-only", spec["source"]], cwd=t / "work")
        got = t / "work" / spec["file"]
        if not got.is_file():
            raise StaticBuildError(f"apt-get source {spec['source']} brought no {spec['file']}")
        import shutil

        shutil.copyfile(got, part)
    return _place(part, dest, spec["sha256"], spec["file"])


def _fetch_uclibc(log: _Log) -> Path:
    """uClibc-ng's tarball from Debian's uclibc-source .deb (apt-get download + dpkg-deb -x, not installed)."""
    import shutil
    import tempfile

    dest = _downloads() / Path(UCLIBC_TARBALL["member"]).name
    if _verified(dest, UCLIBC_TARBALL["sha256"]):
        return dest
    pkg = f"{UCLIBC_DEB['package']}={UCLIBC_DEB['version']}"
    with tempfile.TemporaryDirectory(prefix="nodeagent-uclibc-") as t:
        t = Path(t)
        os.chmod(t, 0o755)
        try:
            log.run(["apt-get", "-oAPT::Sandbox::User=root", "download", pkg], cwd=t)
        except StaticBuildError:
            log.run(["apt-get", "update"])
            log.run(["apt-get", "-oAPT::Sandbox::User=root", "download", pkg], cwd=t)
        deb = next(t.glob("*.deb"))
        if _sha256_file(deb) != UCLIBC_DEB["sha256"]:
            raise StaticBuildError(f"{deb.name}: unexpected sha256")
        log.run(["dpkg-deb", "-x", deb, t / "x"])
        shutil.copyfile(t / "x" / UCLIBC_TARBALL["member"], dest.with_suffix(".part"))
    return _place(dest.with_suffix(".part"), dest, UCLIBC_TARBALL["sha256"], dest.name)


def _fetch_sdist(name: str, log: _Log) -> Path:
    spec = SDISTS[name]
    dest = _downloads() / spec["file"]
    if _verified(dest, spec["sha256"]):
        return dest
    log.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
             "-d", _downloads(), f"{name}=={spec['version']}"])
    if not _verified(dest, spec["sha256"]):
        raise StaticBuildError(f"{spec['file']}: missing or unexpected sha256 after pip download")
    return dest


def _extract(tarball: Path, into: Path, log: _Log) -> Path:
    """Unpack a tarball with one top folder into `into`; returns that folder."""
    into.mkdir(parents=True, exist_ok=True)
    before = set(into.iterdir())
    log.run(["tar", "-xf", tarball, "-C", into])
    new = [p for p in into.iterdir() if p not in before]
    if len(new) != 1 or not new[0].is_dir():
        raise StaticBuildError(f"{tarball.name}: expected one top-level folder, got {new}")
    return new[0]


def _apply_patch(patch: Path, tree: Path, log: _Log) -> None:
    log.run(["patch", "-p1", "--forward", "--batch", "-i", patch], cwd=tree)


def _linux_libc_dev_version() -> str:
    import subprocess

    return subprocess.run(["dpkg-query", "-W", "-f=${Version}", "linux-libc-dev"],
                          capture_output=True, text=True).stdout.strip() or "unknown"


def _host_gcc_version() -> str:
    import subprocess

    return subprocess.run(["gcc", "-dumpfullversion"], capture_output=True, text=True).stdout.strip()


# ---- stage 1: sysroot --------------------------------------------------------

SYSROOT_FILES = ["uclibc.config", "uclibc-static-libdl.patch", "dl_find_object.c", "uclibc-gcc.sh",
                 "uclibc-gcc.specs"]


def _sysroot_key() -> str:
    return _stage_key("sysroot", STATIC_STAGE_VERSION, UCLIBC_DEB, UCLIBC_TARBALL, DEBIAN_TARBALLS["zlib"],
                      DEBIAN_TARBALLS["libffi"], STATIC_CFLAGS, ZLIB_CFLAGS, KERNEL_HEADER_DIRS,
                      _linux_libc_dev_version(), _host_gcc_version(),
                      *[STATIC_SRC / f for f in SYSROOT_FILES])


def _build_sysroot(tmp: Path, final: Path, log: _Log, jobs: int) -> None:
    import shutil

    sysroot = tmp  # the stage folder is the sysroot: include/, lib/, bin/uclibc-gcc
    work = tmp / "work"
    # Kernel headers (pitfall: Debian keeps asm/ under the multiarch folder).
    kernel = work / "kernel-headers"
    for sub in KERNEL_HEADER_DIRS:
        if (Path("/usr/include") / sub).is_dir():
            shutil.copytree(Path("/usr/include") / sub, kernel / sub, symlinks=True)
    shutil.copytree("/usr/include/x86_64-linux-gnu/asm", kernel / "asm", symlinks=True)

    src = _extract(_fetch_uclibc(log), work, log)
    _apply_patch(STATIC_SRC / "uclibc-static-libdl.patch", src, log)
    config = (STATIC_SRC / "uclibc.config").read_text()
    config += f'KERNEL_HEADERS="{kernel}"\nRUNTIME_PREFIX="/"\nDEVEL_PREFIX="/"\n'
    (work / "uclibc.fragment").write_text(config)
    log.note("[sysroot] uClibc-ng 1.0.35")
    log.run(["make", "allnoconfig", f"KCONFIG_ALLCONFIG={work / 'uclibc.fragment'}"], cwd=src)
    got = (src / ".config").read_text()
    for line in config.splitlines():
        if line.endswith("=y") and not line.startswith("#") and line not in got.splitlines():
            raise StaticBuildError(f"uClibc-ng configuration lost {line}")
    log.run(["make", f"-j{jobs}"], cwd=src)
    log.run(["make", f"PREFIX={sysroot}", "install"], cwd=src)
    for sub in kernel.iterdir():
        shutil.copytree(sub, sysroot / "include" / sub.name, symlinks=True, dirs_exist_ok=True)

    (sysroot / "bin").mkdir(exist_ok=True)
    shutil.copyfile(STATIC_SRC / "uclibc-gcc.specs", sysroot / "lib" / "uclibc-gcc.specs")
    wrapper = sysroot / "bin" / "uclibc-gcc"
    shutil.copyfile(STATIC_SRC / "uclibc-gcc.sh", wrapper)
    wrapper.chmod(0o755)
    cc = str(wrapper)
    log.run([cc, STATIC_CFLAGS, "-c", STATIC_SRC / "dl_find_object.c", "-o", work / "dl_find_object.o"])
    log.run(["ar", "rcs", sysroot / "lib" / "libc.a", work / "dl_find_object.o"])

    env = {"CC": cc, "CFLAGS": STATIC_CFLAGS, "PKG_CONFIG_LIBDIR": "/nonexistent", "PKG_CONFIG_PATH": ""}
    log.note("[sysroot] zlib")
    zsrc = _extract(_fetch_debian_tarball("zlib", log), work, log)
    zenv = {**env, "CFLAGS": ZLIB_CFLAGS}
    log.run(["./configure", "--static", f"--prefix={sysroot}"], cwd=zsrc, env=zenv)
    log.run(["make", f"-j{jobs}", "libz.a"], cwd=zsrc, env=zenv)
    shutil.copyfile(zsrc / "libz.a", sysroot / "lib" / "libz.a")
    for h in ("zlib.h", "zconf.h"):
        shutil.copyfile(zsrc / h, sysroot / "include" / h)
    log.note("[sysroot] libffi")
    fsrc = _extract(_fetch_debian_tarball("libffi", log), work, log)
    log.run(["./configure", "--disable-shared", "--enable-static", "--disable-docs", "--disable-multi-os-directory",
             "--disable-exec-static-tramp", f"--prefix={sysroot}"], cwd=fsrc, env=env)
    log.run(["make", f"-j{jobs}"], cwd=fsrc, env=env)
    log.run(["make", "install"], cwd=fsrc, env=env)
    for junk in ("lib/pkgconfig", "lib/libffi.la", "share"):
        p = sysroot / junk
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    # The sysroot works: a threaded static program links and runs.
    test = work / "smoke.c"
    test.write_text('#include <pthread.h>\n#include <stdio.h>\n#include <zlib.h>\n#include <ffi.h>\n'
                    'static void *run(void *a) { pthread_exit(a); }\n'
                    'int main(void) { pthread_t t; void *r; pthread_create(&t, 0, run, "ok"); pthread_join(t, &r);'
                    ' printf("%s %s\\n", (char *)r, zlibVersion()); return 0; }\n')
    log.run([cc, STATIC_CFLAGS, test, "-o", work / "smoke", "-lz", "-lffi"])
    log.run([work / "smoke"])
    shutil.rmtree(work)


def static_sysroot(verbose: bool = False, jobs: int = 2) -> Path:
    return _cached_stage("sysroot", _sysroot_key(), lambda t, f, log: _build_sysroot(t, f, log, jobs), verbose)


# ---- stage 2: python ---------------------------------------------------------

PYTHON_FILES = ["Setup.local", "zstd_backend_c.c", "agent_linux.c", "agent_linux_c.c", "agent_linux_prelude.h"]
CPYTHON_PATCHES = ["cpython-ctypes-no-dlopen-null.patch", "cpython-idna-lazy-nameprep.patch",
                   "cpython-dataclasses-lazy-inspect.patch"]
NUITKA_PATCHES = ["nuitka-safestrings-uclibc.patch", "nuitka-profiling-no-dlopen.patch",
                  "nuitka-no-inspect-at-startup.patch"]
AGENT_C_INPUTS = [CDEF, CSRC / "linux.h", CSRC / "linux.c"]
# The built-in modules linked into dist/nodeagent (a subset of Setup.local; the interpreter that runs Nuitka
# has them all). Besides these, CPython's Setup.bootstrap modules are always in.
STATIC_AGENT_MODULES = [
    "array", "_bisect", "_heapq", "_json", "_queue", "_random", "_struct", "_typing", "math", "zlib", "_md5",
    "_sha1", "_sha256", "_sha512", "_sha3", "_blake2", "fcntl", "grp", "_posixsubprocess", "select", "_socket",
    "_cffi_backend", "_zstd_backend_c", "_agent_linux",
]

# The codecs the static interpreter keeps (Lib/encodings/<name>.py): Unicode, ASCII/Latin-1, the escapes, IDNA
# (every host name lookup uses it) and the C locale's fallbacks. No legacy code pages.
STATIC_ENCODINGS = [
    "__init__", "aliases", "ascii", "latin_1", "utf_8", "utf_8_sig", "utf_7", "utf_16", "utf_16_be", "utf_16_le",
    "utf_32", "utf_32_be", "utf_32_le", "charmap", "raw_unicode_escape", "unicode_escape", "idna", "punycode",
    "undefined", "cp437",
]


def _python_key(sysroot_key: str) -> str:
    return _stage_key("python", STATIC_STAGE_VERSION, sysroot_key, DEBIAN_TARBALLS["python"],
                      SDISTS["cffi"], SDISTS["zstandard"], STATIC_CFLAGS, PYTHON_CONFIGURE, PYTHON_NA_MODULES,
                      STATIC_AGENT_MODULES, STATIC_ENCODINGS,
                      *[STATIC_SRC / f for f in PYTHON_FILES + CPYTHON_PATCHES],
                      *AGENT_C_INPUTS)


def _setup_local_modules() -> dict[str, list[str]]:
    """module -> object files (as Modules/ paths) of csrc/static/Setup.local's *static* lines."""
    modules = {}
    for line in (STATIC_SRC / "Setup.local").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("*"):
            continue
        name, *words = line.split()
        modules[name] = [w[:-2] + ".o" for w in words if w.endswith(".c")]
    return modules


def _make_agent_libpython(prefix: Path, build: Path, cc: str, log: _Log) -> None:
    """libpython3.11.a for dist/nodeagent: the full one minus the built-in modules the agent does not use,
    with an inittab (config.o) naming only those kept. The full archive stays as libpython3.11-full.a."""
    import re
    import shutil

    libpl = prefix / "lib" / "python3.11" / "config-3.11-x86_64-linux-gnu"
    full = libpl / "libpython3.11-full.a"
    shutil.move(libpl / "libpython3.11.a", full)
    modules = _setup_local_modules()
    modules["xxsubtype"] = ["xxsubtype.o"]  # an example module CPython's Setup.bootstrap builds in
    unknown = set(STATIC_AGENT_MODULES) - set(modules)
    if unknown:
        raise StaticBuildError(f"STATIC_AGENT_MODULES not in Setup.local: {sorted(unknown)}")
    dropped = [m for m in modules if m not in STATIC_AGENT_MODULES]
    config = (build / "Modules" / "config.c").read_text()
    for mod in dropped:
        config = re.sub(rf"^.*\bPyInit_{re.escape(mod)}\b.*\n", "", config, flags=re.M)
    work = build / "agent-libpython"
    work.mkdir()
    (work / "config.c").write_text(config)
    log.run([cc, STATIC_CFLAGS, "-DPy_BUILD_CORE", f"-I{build / 'Include'}", f"-I{build / 'Include' / 'internal'}",
             f"-I{build}", "-c", work / "config.c", "-o", work / "config.o"])
    members = set(log.run(["ar", "t", full], capture=True).split())
    objects = {Path(o).name for m in dropped for o in modules[m]}
    keep = {Path(o).name for m in STATIC_AGENT_MODULES for o in modules[m]}
    clash = objects & keep
    if clash:
        raise StaticBuildError(f"object names shared by kept and dropped modules: {sorted(clash)}")
    agent_a = work / "libpython3.11.a"
    shutil.copyfile(full, agent_a)
    drop = sorted(objects & members)
    if drop:
        log.run(["ar", "d", agent_a, *drop])
    log.run(["ar", "r", agent_a, work / "config.o"])
    log.run(["ranlib", agent_a])
    shutil.copyfile(agent_a, libpl / "libpython3.11.a")
    if (prefix / "lib" / "libpython3.11.a").exists():  # the copy Nuitka looks for first
        shutil.copyfile(agent_a, prefix / "lib" / "libpython3.11.a")


def _build_python(tmp: Path, final: Path, log: _Log, sysroot: Path, jobs: int) -> None:
    import shutil

    work = tmp / "work"
    cc = str(sysroot / "bin" / "uclibc-gcc")
    src = _extract(_fetch_debian_tarball("python", log), work, log)
    for patch in CPYTHON_PATCHES:
        _apply_patch(STATIC_SRC / patch, src, log)

    # Third-party and agent C sources go under Modules/ (makesetup cannot take absolute paths).
    mods = src / "Modules"
    cffi_src = _extract(_fetch_sdist("cffi", log), work, log)
    shutil.copytree(cffi_src / "src" / "c", mods / "_cffi_backend" / "c")  # it includes "../cffi/*.h"
    shutil.copytree(cffi_src / "src" / "cffi", mods / "_cffi_backend" / "cffi")
    zstd_src = _extract(_fetch_sdist("zstandard", log), work, log)
    shutil.copytree(zstd_src / "c-ext", mods / "zstandard" / "c-ext")
    shutil.copytree(zstd_src / "zstd", mods / "zstandard" / "zstd")
    shutil.copyfile(STATIC_SRC / "zstd_backend_c.c", mods / "zstandard" / "_zstd_backend_c.c")
    generate_c()
    (mods / "_agent_linux").mkdir()
    for f in (GENERATED_C, CSRC / "linux.c", CSRC / "linux.h"):
        shutil.copyfile(f, mods / "_agent_linux" / f.name)
    shutil.copyfile(STATIC_SRC / "agent_linux.c", mods / "_agent_linux" / "_agent_linux.c")
    for f in ("agent_linux_c.c", "agent_linux_prelude.h"):
        shutil.copyfile(STATIC_SRC / f, mods / "_agent_linux" / f)
    shutil.copyfile(STATIC_SRC / "Setup.local", mods / "Setup.local")

    # OPT: configure's default without -g and -O3 (CFLAGS brings -Os)
    env = {"CC": cc, "CFLAGS": STATIC_CFLAGS, "OPT": "-DNDEBUG -fwrapv -Wall", "LDFLAGS": "",
           "PKG_CONFIG_LIBDIR": "/nonexistent",
           "PKG_CONFIG_PATH": "", "LIBFFI_CFLAGS": "", "LIBFFI_LIBS": "-lffi", "ZLIB_CFLAGS": "", "ZLIB_LIBS": "-lz"}
    log.note("[python] configure CPython 3.11.2")
    log.run(["./configure", f"--prefix={final}", *PYTHON_CONFIGURE,
             *[f"py_cv_module_{m}=n/a" for m in PYTHON_NA_MODULES]], cwd=src, env=env)
    log.note(f"[python] make -j{jobs}")
    log.run(["make", f"-j{jobs}"], cwd=src, env=env)
    dest = tmp / "destdir"
    log.note("[python] make install")
    log.run(["make", "install", f"DESTDIR={dest}"], cwd=src, env=env)
    prefix = dest / str(final).lstrip("/")
    stdlib = prefix / "lib" / "python3.11"
    libpl = stdlib / "config-3.11-x86_64-linux-gnu"
    # Nothing loadable: a static interpreter has only its built-ins.
    shared = list((stdlib / "lib-dynload").glob("*.so"))
    if shared:
        log.note(f"[python] removing shared modules a static interpreter cannot load: {[p.name for p in shared]}")
        for p in shared:
            p.unlink()
    for junk in ("test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3/tests"):
        if (stdlib / junk).is_dir():
            shutil.rmtree(stdlib / junk)
    # Codecs: only STATIC_ENCODINGS. Nuitka carries every encoding the interpreter has (about 0.5 MB of
    # bytecode), and the CJK ones could not even be imported (their C codecs are not built).
    for enc in (stdlib / "encodings").glob("*.py"):
        if enc.stem not in STATIC_ENCODINGS:
            enc.unlink()
    # Libraries of MODLIBS the link of dist/nodeagent needs (Nuitka keeps only the -l:lib.a ones).
    if (src / "Modules" / "expat" / "libexpat.a").is_file():
        shutil.copyfile(src / "Modules" / "expat" / "libexpat.a", libpl / "libexpat.a")
    _make_agent_libpython(prefix, src, cc, log)

    site = stdlib / "site-packages"
    zpkg = site / "zstandard"
    zpkg.mkdir()
    for f in ("__init__.py", "__init__.pyi", "py.typed"):
        if (zstd_src / "zstandard" / f).exists():
            shutil.copyfile(zstd_src / "zstandard" / f, zpkg / f)

    python = prefix / "bin" / "python3.11"
    log.run(["strip", python])
    log.run([python, "-c", "import sys, ctypes, zlib, hashlib, _socket, _cffi_backend, _zstd_backend_c, "
             "_agent_linux; print(sys.version, sorted(sys.builtin_module_names))"])
    shutil.rmtree(work)
    # Move the installed tree into the stage folder (the prefix it was configured for).
    for p in prefix.iterdir():
        p.rename(tmp / p.name)
    shutil.rmtree(dest)


def static_python(sysroot: Path, verbose: bool = False, jobs: int = 2) -> Path:
    key = _python_key(sysroot.name.split("-", 1)[1])
    return _cached_stage("python", key, lambda t, f, log: _build_python(t, f, log, sysroot, jobs), verbose)


def _build_nuitka(tmp: Path, final: Path, log: _Log, python_stage: Path) -> None:
    """Nuitka's pure-Python package with our patches, in a stage of its own (put on the static interpreter's
    sys.path with PYTHONPATH) so that changing a Nuitka patch does not rebuild CPython."""
    import shutil

    work = tmp / "work"
    nsrc = _extract(_fetch_sdist("nuitka", log), work, log)
    for patch in NUITKA_PATCHES:
        _apply_patch(STATIC_SRC / patch, nsrc, log)
    shutil.copytree(nsrc / "nuitka", tmp / "nuitka")
    shutil.rmtree(work)
    log.run([python_stage / "bin" / "python3.11", "-m", "nuitka", "--version"], env={"PYTHONPATH": str(tmp)})


def static_nuitka(python_stage: Path, verbose: bool = False) -> Path:
    key = _stage_key("nuitka", STATIC_STAGE_VERSION, python_stage.name, SDISTS["nuitka"],
                     *[STATIC_SRC / f for f in NUITKA_PATCHES])
    return _cached_stage("nuitka", key, lambda t, f, log: _build_nuitka(t, f, log, python_stage), verbose)


# ---- stage 3: agent (Nuitka) -----------------------------------------------------


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


def _build_agent(python_stage: Path, nuitka_stage: Path, sysroot: Path, verbose: bool, jobs: int) -> Path:
    import shutil
    import time

    start = time.monotonic()
    generate_c()
    build_purgatory()
    # The agent stage is redone only when its inputs change (the agent's files, what is embedded, the stages
    # below, the Nuitka options): the key of the binary in dist/ sits beside it.
    sources = sorted(p for p in (ROOT / "agent").rglob("*.py") if "__pycache__" not in p.parts)
    key = _stage_key(STATIC_STAGE_VERSION, python_stage.name, nuitka_stage.name, sysroot.name, NUITKA_NOFOLLOW,
                     NUITKA_BYTECODE, [str(p.relative_to(ROOT)) for p in sources], *sources,
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
        "NUITKA_CACHE_DIR": str(_static_cache_root() / "nuitka-cache"),
    }
    cmd = [python, "-m", "nuitka", "--standalone", "--static-libpython=yes",
           "--python-flag=no_site,no_asserts,no_docstrings",
           *[f"--nofollow-import-to={m}" for m in NUITKA_NOFOLLOW],
           *[f"--noinclude-custom-mode={m}:bytecode" for m in NUITKA_BYTECODE],
           "--output-filename=nodeagent", f"--output-dir={out}", f"--report={report}",
           f"--jobs={jobs}", "--lto=no", "--assume-yes-for-downloads", "--disable-ccache",
           # the CLI has its own -c and -m flags (info -c, kexec -c, image -m): not a self-execution attempt
           "--no-deployment-flag=self-execution", entry]
    log = _Log(build / "nuitka.log", verbose)
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


# Host tools the static build runs (command -> Debian package). Missing ones are installed with apt-get when
# running as root (the build needs root anyway only for that), else named.
STATIC_HOST_TOOLS = {"gcc": "gcc", "make": "make", "patch": "patch", "ar": "binutils", "strip": "binutils",
                     "tar": "tar", "xz": "xz-utils", "bzip2": "bzip2", "patchelf": "patchelf",
                     "dpkg-deb": "dpkg", "apt-get": "apt"}


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


def cmd_static(args: argparse.Namespace) -> int:
    import time

    import fcntl

    start = time.monotonic()
    # Builds at once (a test session and a developer, two checkouts sharing the cache) take turns.
    lock_path = _static_cache_root() / "build.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = open(lock_path, "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        _ensure_host_tools(args.verbose)
        sysroot = static_sysroot(verbose=args.verbose, jobs=args.jobs)
        python_stage = static_python(sysroot, verbose=args.verbose, jobs=args.jobs)
        nuitka_stage = static_nuitka(python_stage, verbose=args.verbose)
        _build_agent(python_stage, nuitka_stage, sysroot, verbose=args.verbose, jobs=args.jobs)
    except StaticBuildError as err:
        print(f"build.py static: {err}", file=sys.stderr)
        return 1
    finally:
        lock.close()
    print(f"static build done in {time.monotonic() - start:.0f} s")
    return 0


# --------------------------------------------------------------------------
# Size budget: `python build.py check-size`. The budget lives in pyproject.toml [tool.nodeagent.size-budget].

NOT_IN_FILE = (".bss", ".tbss", "COMMON", ".note.GNU-stack", ".comment", ".debug", ".stab", ".gnu.warning")


def parse_link_map(text: str) -> dict[str, int]:
    """Bytes each linked input file (an object, or an archive member "lib.a(member.o)") puts into the sections that
    occupy the executable file, from a GNU ld map (-Wl,-Map). Pure: takes the map's text."""
    sizes: dict[str, int] = {}
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith("Linker script and memory map"))
    except StopIteration:
        raise ValueError("not a GNU ld map (no 'Linker script and memory map')") from None
    pending = None  # an input section name whose address/size/file are on the next line
    for line in lines[start + 1:]:
        if not line.startswith(" ") or line.startswith(" *"):
            pending = None
            continue
        fields = line.split()
        if pending is None and line[1] not in " " and fields and fields[0].startswith("."):
            if len(fields) == 1:
                pending = fields[0]
                continue
            name, rest = fields[0], fields[1:]
        elif pending is not None:
            name, rest = pending, fields
            pending = None
        else:
            continue
        if len(rest) < 3 or not rest[0].startswith("0x") or not rest[1].startswith("0x"):
            continue
        if any(name.startswith(prefix) for prefix in NOT_IN_FILE):
            continue
        size = int(rest[1], 16)
        if size:
            path = " ".join(rest[2:])
            sizes[path] = sizes.get(path, 0) + size
    return sizes


def contributor_label(path: str) -> tuple[str, str]:
    """(group, item) for a linked file: archives by name with their member, Nuitka's compiled modules by module."""
    name = os.path.basename(path)
    if "(" in name and name.endswith(")"):
        archive, member = name[:-1].split("(", 1)
        return archive, member
    if name.startswith("module.") and name.endswith(".o"):
        return "compiled Python (Nuitka)", name[len("module."):-2]
    if name.startswith("__constants") or name.startswith("__bytecode"):
        return "constants and bytecode (Nuitka)", name[:-2]
    return "other objects", name


def _pyproject() -> dict:
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def size_budget() -> dict:
    """[tool.nodeagent.size-budget]: binary and initramfs byte limits, and the modules that must stay out."""
    return _pyproject()["tool"]["nodeagent"]["size-budget"]


def build_node_initramfs(binary: Path, out: Path) -> tuple[Path, list[str]]:
    """The node's initramfs as CI measures it: the binary (/bin/nodeagent) and the kernel modules listed in
    pyproject's [tool.nodeagent.initramfs] (with their dependencies, from Debian's kernel), console devices;
    newc, xz with a CRC32 check (the kernel's decoder wants it). Returns (path, module files in load order)."""
    from agent.initramfs.build import InitramfsSpec, build_initramfs
    from agent.initramfs.debian_kernel import fetch_debian_kernel

    names = _pyproject()["tool"]["nodeagent"]["initramfs"]["modules"]
    kernel = fetch_debian_kernel(with_modules=True)
    spec = InitramfsSpec()
    for d in ("bin", "dev", "proc", "sys", "tmp", "mnt"):
        spec.dir(d)
    spec.add_console_devices()
    spec.file("bin/nodeagent", src=binary, mode=0o755)
    order = spec.modules(kernel.modules, names)
    out.parent.mkdir(parents=True, exist_ok=True)
    return build_initramfs(spec, out, compression="xz"), order


def excluded_modules_found(report_xml: str, excluded: list[str]) -> list[str]:
    """Modules of Nuitka's compilation report (--report) that are excluded modules or inside excluded packages."""
    import xml.etree.ElementTree as ET

    names = {m.get("name") for m in ET.fromstring(report_xml).iter("module") if m.get("name")}
    return sorted(n for n in names if any(n == ex or n.startswith(ex + ".") for ex in excluded))


def size_table(sizes: dict[str, int], top: int = 25) -> list[str]:
    """Lines of a table: totals by group (archive / kind), then the biggest single contributors."""
    groups: dict[str, int] = {}
    items: list[tuple[int, str]] = []
    for path, size in sizes.items():
        group, item = contributor_label(path)
        groups[group] = groups.get(group, 0) + size
        items.append((size, f"{group}: {item}"))
    total = sum(sizes.values()) or 1
    lines = [f"{'linked bytes by origin':<60} {'KiB':>8} {'share':>6}"]
    for group, size in sorted(groups.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {group:<58} {size / 1024:8.0f} {100 * size / total:5.1f}%")
    lines.append(f"{'biggest contributors':<60} {'KiB':>8} {'share':>6}")
    for size, label in sorted(items, reverse=True)[:top]:
        lines.append(f"  {label[:58]:<58} {size / 1024:8.0f} {100 * size / total:5.1f}%")
    return lines


def cmd_check_size(args: argparse.Namespace) -> int:
    budget = size_budget()
    binary = Path(args.binary)
    if not binary.is_file():
        print(f"check-size: no {binary} (build it: python build.py static)", file=sys.stderr)
        return 2
    failures = []
    from agent.errors import NodeagentError

    try:
        initramfs, order = build_node_initramfs(binary, binary.parent / "initramfs.cpio.xz")
    except NodeagentError as err:  # no kernel to take the modules from, a module missing from it, ...
        print(f"check-size: the node initramfs: {err}", file=sys.stderr)
        return 1
    rows = [("binary (stripped)", binary, binary.stat().st_size, budget["binary"]),
            (f"initramfs (.cpio.xz, {len(order)} modules)", initramfs, initramfs.stat().st_size, budget["initramfs"])]
    print(f"{'what':<34} {'bytes':>11} {'budget':>11}  verdict")
    for what, path, size, limit in rows:
        ok = size <= limit
        print(f"{what:<34} {size:>11,} {limit:>11,}  {'ok' if ok else 'OVER by %d' % (size - limit)}")
        if not ok:
            failures.append(f"{path} is {size:,} bytes, over its budget of {limit:,}")
    link_map = binary.with_name(binary.name + ".map")
    if link_map.is_file():
        print()
        print("\n".join(size_table(parse_link_map(link_map.read_text(errors="replace")), top=args.top)))
    else:
        print(f"(no {link_map}: no table of contributors)")
    report = binary.with_name(binary.name + "-report.xml")
    if not report.is_file():
        failures.append(f"no {report}: cannot check that excluded modules stay out")
    else:
        found = excluded_modules_found(report.read_text(errors="replace"), budget["excluded-modules"])
        print(f"\nexcluded modules ({len(budget['excluded-modules'])} checked): "
              f"{'none included' if not found else 'INCLUDED: ' + ', '.join(found)}")
        if found:
            failures.append(f"excluded modules found their way into the binary: {', '.join(found)}")
    for failure in failures:
        print(f"check-size: {failure}", file=sys.stderr)
    return 1 if failures else 0


# --------------------------------------------------------------------------
# CLI


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


def main(argv: list[str] | None = None) -> int:
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
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=lambda a: (build_purgatory(verbose=True, force=a.force), 0)[1])

    p = sub.add_parser("gen", help="only emit csrc/generated/_linux.c from the cdef")
    p.set_defaults(func=cmd_gen)

    p = sub.add_parser("static", help="build dist/nodeagent, one static executable (uClibc-ng, Nuitka)")
    p.add_argument("-v", "--verbose", action="store_true", help="show the build commands' output")
    p.add_argument("-j", "--jobs", type=int, default=min(3, os.cpu_count() or 2), metavar="N",
                   help="parallel compile jobs (default: %(default)s)")
    p.set_defaults(func=cmd_static)

    p = sub.add_parser("check-size", help="compare dist/nodeagent and the node initramfs with the budget in "
                                          "pyproject.toml; print the biggest contributors; guard excluded modules")
    p.add_argument("--binary", default=str(DIST / "nodeagent"), help="the executable (default: %(default)s)")
    p.add_argument("--top", type=int, default=25, help="rows of biggest contributors (default: %(default)s)")
    p.set_defaults(func=cmd_check_size)

    args = parser.parse_args(argv)
    if args.command is None:  # plain `python build.py`: the static executable
        args = parser.parse_args(["static", *(argv or [])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
