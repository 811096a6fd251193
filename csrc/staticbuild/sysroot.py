"""Stage 1, sysroot: uClibc-ng 1.0.35 built with the host gcc (static, NPTL, wide chars, IPv6, C locale), the
kernel headers of linux-libc-dev, the gcc wrapper <sysroot>/bin/uclibc-gcc, static zlib and libffi."""

from __future__ import annotations

from pathlib import Path

from . import STATIC_SRC
from .pins import (DEBIAN_TARBALLS, KERNEL_HEADER_DIRS, STATIC_CFLAGS, STATIC_STAGE_VERSION, SYSROOT_FILES,
                   UCLIBC_DEB, UCLIBC_TARBALL, ZLIB_CFLAGS)
from .sources import (apply_patch, extract, fetch_debian_tarball, fetch_uclibc, host_gcc_version,
                      linux_libc_dev_version)
from .stagecache import BuildLog, StaticBuildError, cached_stage, stage_key


def _sysroot_key() -> str:
    return stage_key("sysroot", STATIC_STAGE_VERSION, UCLIBC_DEB, UCLIBC_TARBALL, DEBIAN_TARBALLS["zlib"],
                      DEBIAN_TARBALLS["libffi"], STATIC_CFLAGS, ZLIB_CFLAGS, KERNEL_HEADER_DIRS,
                      linux_libc_dev_version(), host_gcc_version(),
                      *[STATIC_SRC / f for f in SYSROOT_FILES])


def _build_sysroot(tmp: Path, final: Path, log: BuildLog, jobs: int) -> None:
    import shutil

    sysroot = tmp  # the stage folder is the sysroot: include/, lib/, bin/uclibc-gcc
    work = tmp / "work"
    # Kernel headers (pitfall: Debian keeps asm/ under the multiarch folder).
    kernel = work / "kernel-headers"
    for sub in KERNEL_HEADER_DIRS:
        if (Path("/usr/include") / sub).is_dir():
            shutil.copytree(Path("/usr/include") / sub, kernel / sub, symlinks=True)
    shutil.copytree("/usr/include/x86_64-linux-gnu/asm", kernel / "asm", symlinks=True)

    src = extract(fetch_uclibc(log), work, log)
    apply_patch(STATIC_SRC / "uclibc-static-libdl.patch", src, log)
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
    zsrc = extract(fetch_debian_tarball("zlib", log), work, log)
    zenv = {**env, "CFLAGS": ZLIB_CFLAGS}
    log.run(["./configure", "--static", f"--prefix={sysroot}"], cwd=zsrc, env=zenv)
    log.run(["make", f"-j{jobs}", "libz.a"], cwd=zsrc, env=zenv)
    shutil.copyfile(zsrc / "libz.a", sysroot / "lib" / "libz.a")
    for h in ("zlib.h", "zconf.h"):
        shutil.copyfile(zsrc / h, sysroot / "include" / h)
    log.note("[sysroot] libffi")
    fsrc = extract(fetch_debian_tarball("libffi", log), work, log)
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
    return cached_stage("sysroot", _sysroot_key(), lambda t, f, log: _build_sysroot(t, f, log, jobs), verbose)

