"""Stage 2, python: CPython 3.11.2 --disable-shared against the sysroot, with the modules of
csrc/static/Setup.local built in; the libpython3.11.a Nuitka links holds only STATIC_AGENT_MODULES."""

from __future__ import annotations

import sys
from pathlib import Path

from . import GENERATED_C, STATIC_SRC, CSRC
from .pins import (AGENT_C_INPUTS, CPYTHON_PATCHES, DEBIAN_TARBALLS, PYTHON_CONFIGURE, PYTHON_FILES,
                   PYTHON_NA_MODULES, SDISTS, STATIC_AGENT_MODULES, PYTHON_CFLAGS, STATIC_ENCODINGS,
                   STATIC_STAGE_VERSION)
from .sources import apply_patch, extract, fetch_debian_tarball, fetch_sdist
from .stagecache import BuildLog, StaticBuildError, cached_stage, stage_key


def _python_key(sysroot_key: str) -> str:
    return stage_key("python", STATIC_STAGE_VERSION, sysroot_key, DEBIAN_TARBALLS["python"],
                      SDISTS["cffi"], SDISTS["zstandard"], PYTHON_CFLAGS, PYTHON_CONFIGURE, PYTHON_NA_MODULES,
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


def _make_agent_libpython(prefix: Path, build: Path, cc: str, log: BuildLog) -> None:
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
    log.run([cc, *PYTHON_CFLAGS.split(), "-DPy_BUILD_CORE", f"-I{build / 'Include'}", f"-I{build / 'Include' / 'internal'}",
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


def _build_python(tmp: Path, final: Path, log: BuildLog, sysroot: Path, jobs: int) -> None:
    import shutil

    work = tmp / "work"
    cc = str(sysroot / "bin" / "uclibc-gcc")
    src = extract(fetch_debian_tarball("python", log), work, log)
    for patch in CPYTHON_PATCHES:
        apply_patch(STATIC_SRC / patch, src, log)
    # The frozen-module set is generated into Makefile.pre.in and Python/frozen.c by this script (CPython's
    # `make regen-frozen` step): run it after cpython-frozen-bootstrap-only.patch changed its list.
    log.run([sys.executable, src / "Tools" / "scripts" / "freeze_modules.py"], cwd=src)

    # Third-party and agent C sources go under Modules/ (makesetup cannot take absolute paths).
    mods = src / "Modules"
    cffi_src = extract(fetch_sdist("cffi", log), work, log)
    shutil.copytree(cffi_src / "src" / "c", mods / "_cffi_backend" / "c")  # it includes "../cffi/*.h"
    shutil.copytree(cffi_src / "src" / "cffi", mods / "_cffi_backend" / "cffi")
    zstd_src = extract(fetch_sdist("zstandard", log), work, log)
    shutil.copytree(zstd_src / "c-ext", mods / "zstandard" / "c-ext")
    shutil.copytree(zstd_src / "zstd", mods / "zstandard" / "zstd")
    shutil.copyfile(STATIC_SRC / "zstd_backend_c.c", mods / "zstandard" / "_zstd_backend_c.c")
    if not GENERATED_C.is_file():  # build.py emits it before the stages run
        raise StaticBuildError(f"no {GENERATED_C}: run python build.py gen")
    (mods / "_agent_linux").mkdir()
    for f in (GENERATED_C, CSRC / "linux.c", CSRC / "linux.h"):
        shutil.copyfile(f, mods / "_agent_linux" / f.name)
    shutil.copyfile(STATIC_SRC / "agent_linux.c", mods / "_agent_linux" / "_agent_linux.c")
    for f in ("agent_linux_c.c", "agent_linux_prelude.h"):
        shutil.copyfile(STATIC_SRC / f, mods / "_agent_linux" / f)
    shutil.copyfile(STATIC_SRC / "Setup.local", mods / "Setup.local")

    # OPT: configure's default without -g and -O3 (CFLAGS brings -Os)
    env = {"CC": cc, "CFLAGS": PYTHON_CFLAGS, "OPT": "-DNDEBUG -fwrapv -Wall", "LDFLAGS": "",
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
    return cached_stage("python", key, lambda t, f, log: _build_python(t, f, log, sysroot, jobs), verbose)
