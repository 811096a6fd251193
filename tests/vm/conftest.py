"""Fixtures for tests that boot Debian's kernel in QEMU (TCG) with an initramfs built by staticbuild.initramfs.

    debian_kernel  -> DebianKernel(package, release, vmlinuz, modules)   (session; fetched once into the cache)
    qemu           -> Qemu(binary, busybox)     (session; installs qemu-system-x86 + busybox-static if missing)
    busybox_spec   -> function(init_script, applets=...) -> InitramfsSpec with busybox, dirs, console devices
    boot_vm        -> function(initramfs, append="", disks=(), timeout=60, **kw) -> VmResult
                      (result.assert_pass() raises with the console's last lines)
    nodeagent_binary -> Path of the static nodeagent the guests run (session): --nodeagent if given, else
                      `python build.py static` (its stages are cached; a cold build takes a while)
"""

from __future__ import annotations

import itertools
import os
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from staticbuild.debian_kernel import DebianKernel, fetch_debian_kernel

from staticbuild.initramfs import InitramfsSpec

from .harness import VmResult, sh_init
from .harness import boot_vm as _boot_vm

APT_PACKAGES = ["qemu-system-x86", "busybox-static"]
BUSYBOX_APPLETS = ("sh", "mount", "umount", "insmod", "modprobe", "poweroff", "reboot", "cat", "echo", "ls",
                   "dd", "head", "sleep", "sync", "dmesg", "grep", "mkdir", "uname", "hexdump")


@dataclass(frozen=True)
class Qemu:
    binary: str
    busybox: str  # a static busybox, for the initramfs


def _is_static_elf(path: str) -> bool:
    """An ELF64 executable without a PT_INTERP program header (no dynamic loader)."""
    with open(path, "rb") as f:
        ehdr = f.read(64)
        if len(ehdr) < 64 or ehdr[:4] != b"\x7fELF" or ehdr[4] != 2:
            return False
        phoff, = struct.unpack_from("<Q", ehdr, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", ehdr, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))  # 3 = PT_INTERP


def _static_busybox() -> str | None:
    for path in ("/bin/busybox", "/usr/bin/busybox"):
        if os.path.isfile(path) and _is_static_elf(path):
            return path
    return None


def _apt_install(packages) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    for attempt in range(10):  # other sessions may hold the dpkg lock
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode == 0:
            return
        if "Could not get lock" not in proc.stderr and "Unable to locate" not in proc.stderr:
            break
        if "Unable to locate" in proc.stderr:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env)
        time.sleep(3)
    pytest.fail(f"apt-get install {' '.join(packages)} failed: {proc.stderr.strip()[-1500:]}")


@pytest.fixture(scope="session")
def qemu() -> Qemu:
    binary = shutil.which("qemu-system-x86_64")
    busybox = _static_busybox()
    if binary is None or busybox is None:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            pytest.skip("needs qemu-system-x86_64 and busybox-static (apt-get install qemu-system-x86 "
                        "busybox-static)")
        _apt_install(APT_PACKAGES)
        binary = shutil.which("qemu-system-x86_64")
        busybox = _static_busybox()
    if binary is None or busybox is None:
        pytest.fail(f"installed {APT_PACKAGES}, still no qemu-system-x86_64 ({binary}) or static busybox ({busybox})")
    return Qemu(binary=binary, busybox=busybox)


ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def nodeagent_binary() -> Path:
    exe = os.environ.get("NODEAGENT_BIN")
    if not exe:
        proc = subprocess.run([sys.executable, "build.py", "static"], cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.fail(f"python build.py static failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
        exe = str(ROOT / "dist" / "nodeagent")
    if not _is_static_elf(exe):
        pytest.fail(f"{exe} is not a static executable: the guest has no libraries")
    return Path(exe)


@pytest.fixture(scope="session")
def debian_kernel() -> DebianKernel:
    return fetch_debian_kernel(with_modules=True)


@pytest.fixture
def busybox_spec(qemu):
    """make(init_script=None) -> an InitramfsSpec holding /bin/busybox with applet symlinks, the usual empty
    directories, dev/console + dev/null, and (when init_script is given) /init = sh_init(init_script):
    "#!/bin/busybox sh", the verdict functions `pass` and `fail why...`, then init_script. Without it,
    add /init yourself (spec.file("init", data=sh_init(...), mode=0o755)), e.g. after spec.modules(...)."""

    def make(init_script: str | None = None, applets=BUSYBOX_APPLETS) -> InitramfsSpec:
        spec = InitramfsSpec()
        spec.file("bin/busybox", src=qemu.busybox, mode=0o755)
        for applet in applets:
            spec.symlink(f"bin/{applet}", "busybox")
        for d in ("proc", "sys", "tmp", "mnt", "sbin", "etc"):
            spec.dir(d)
        spec.add_console_devices()
        if init_script is not None:
            spec.file("init", data=sh_init(init_script), mode=0o755)
        return spec

    return make


@pytest.fixture
def boot_vm(qemu, debian_kernel, tmp_path):
    """boot(initramfs, append="", disks=(), timeout=60, **kw) -> VmResult. Boots debian_kernel's bzImage with
    the given initramfs; the console log goes to tmp_path/console-N.log."""
    counter = itertools.count(1)

    def boot(initramfs, append: str = "", disks=(), timeout: float = 60, **kw) -> VmResult:
        log = tmp_path / f"console-{next(counter)}.log"
        return _boot_vm(debian_kernel.vmlinuz, initramfs, append=append, disks=disks, timeout=timeout,
                        log_path=log, **kw)

    return boot


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.vm)


def pytest_configure(config):
    config.addinivalue_line("markers", "vm: boots a kernel in QEMU (TCG); deselect with -m 'not vm'")
