"""The node's initramfs: `python build.py initramfs` (and a plain `python build.py`) writes it, `check-size`
measures it. /init is the static binary itself; beside it the kernel modules of pyproject's
[tool.nodeagent.initramfs] (plus --modules) with their dependencies, softdep "pre:" ones included, and their
modules.dep (lines in load order) and modules.softdep. newc, xz with a CRC32 check (the kernel's decoder refuses
xz's default CRC64), reproducible: the same binary and modules give the same bytes."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from . import BuildError, pyproject
from .debian_kernel import fetch_debian_kernel
from .initramfs import InitramfsSpec, build_initramfs


@dataclass(frozen=True)
class NodeInitramfs:
    path: Path  # the .cpio.xz
    modules: list[str]  # the module files in load order (archive paths)
    kernel: Path | None  # the bzImage whose modules it carries (with it, the whole PXE payload), when known


def configured_modules() -> list[str]:
    return list(pyproject()["tool"]["nodeagent"]["initramfs"]["modules"])


def kernel_modules(kernel: str | None) -> tuple[Path, Path | None]:
    """(lib/modules/RELEASE, its bzImage or None) for --kernel: None -> the Debian kernel the VM tests use;
    a folder -> that module tree (lib/modules/RELEASE itself, or a root holding one, e.g. an unpacked
    linux-image .deb; its boot/vmlinuz-RELEASE when there); else a release such as 6.1.0-57-amd64 -> that
    Debian kernel (linux-image-RELEASE, fetched with apt-get download and cached)."""
    if kernel is not None and Path(kernel).is_dir():
        d = Path(kernel).resolve()
        if not (d / "modules.dep").is_file():
            trees = sorted(d.glob("lib/modules/*/modules.dep"))
            if len(trees) != 1:
                raise BuildError(f"--kernel {kernel}: neither a module tree (no modules.dep) nor a folder with "
                                 f"exactly one lib/modules/RELEASE (found {len(trees)})")
            d = trees[0].parent
        root = d.parent.parent.parent if d.parent.name == "modules" and d.parent.parent.name == "lib" else None
        vmlinuz = root / "boot" / f"vmlinuz-{d.name}" if root else None
        return d, vmlinuz if vmlinuz and vmlinuz.is_file() else None
    if kernel is not None and "/" in kernel:
        raise BuildError(f"--kernel {kernel}: no such folder")
    found = fetch_debian_kernel(with_modules=True, release=kernel)
    return found.modules, found.vmlinuz


def build_node_initramfs(binary: Path, out: Path, *, kernel: str | None = None,
                         extra_modules: list[str] = ()) -> NodeInitramfs:
    """dist/initramfs.cpio.xz: /init (the binary), /bin/nodeagent (a link to it), the console devices, the
    mount points, and the modules."""
    if not binary.is_file():
        raise BuildError(f"no {binary} (build it: python build.py static)")
    for name in extra_modules:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise BuildError(f"--modules: {name!r} is not a module name")
    moddir, vmlinuz = kernel_modules(kernel)
    spec = InitramfsSpec()
    for d in ("bin", "dev", "proc", "sys", "tmp", "run", "mnt"):
        spec.dir(d)
    spec.add_console_devices()
    spec.file("init", src=binary, mode=0o755)
    spec.symlink("bin/nodeagent", "../init")
    order = spec.modules(moddir, [*configured_modules(), *extra_modules])
    out.parent.mkdir(parents=True, exist_ok=True)
    return NodeInitramfs(build_initramfs(spec, out, compression="xz"), order, vmlinuz)
