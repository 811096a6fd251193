"""The node's initramfs, as check-size measures it: the static binary and the kernel modules of pyproject's
[tool.nodeagent.initramfs], from Debian's kernel."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import pyproject
from .debian_kernel import fetch_debian_kernel
from .initramfs import InitramfsSpec, build_initramfs


@dataclass(frozen=True)
class NodeInitramfs:
    path: Path  # the .cpio.xz
    modules: list[str]  # the module files in load order (archive paths)
    kernel: Path  # the bzImage whose modules it carries: with it, the whole PXE payload


def build_node_initramfs(binary: Path, out: Path) -> NodeInitramfs:
    """The node's initramfs as CI measures it: the binary (/bin/nodeagent) and the kernel modules listed in
    pyproject's [tool.nodeagent.initramfs] (with their dependencies, from Debian's kernel), console devices;
    newc, xz with a CRC32 check (the kernel's decoder wants it)."""
    names = pyproject()["tool"]["nodeagent"]["initramfs"]["modules"]
    kernel = fetch_debian_kernel(with_modules=True)
    spec = InitramfsSpec()
    for d in ("bin", "dev", "proc", "sys", "tmp", "mnt"):
        spec.dir(d)
    spec.add_console_devices()
    spec.file("bin/nodeagent", src=binary, mode=0o755)
    order = spec.modules(kernel.modules, names)
    out.parent.mkdir(parents=True, exist_ok=True)
    return NodeInitramfs(build_initramfs(spec, out, compression="xz"), order, kernel.vmlinuz)
