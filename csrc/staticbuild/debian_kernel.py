"""Debian's current amd64 kernel, for the node's initramfs (`python build.py check-size` measures it) and the VM
tests: downloaded once with `apt-get download` (never installed) and
extracted into ${NODEAGENT_CACHE:-~/.cache/nodeagent}/kernel/PACKAGE/, outside the checkout.

    PACKAGE/boot/vmlinuz-RELEASE, PACKAGE/boot/config-RELEASE      (always)
    PACKAGE/lib/modules/RELEASE/...                                (with_modules=True: the whole module tree,
                                                                    about 400 MB, plus a generated modules.dep
                                                                    and modules.alias: the .deb ships neither)

Each part is extracted into a temporary folder in the cache and renamed into place, so a half-finished download
is never taken for a cached kernel and two test runs at once do not trip over each other.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import BuildError, cache_root
from .initramfs import write_modules_dep


class KernelFetchError(BuildError):
    pass


@dataclass(frozen=True)
class DebianKernel:
    package: str  # linux-image-6.1.0-56-amd64
    release: str  # 6.1.0-56-amd64
    vmlinuz: Path  # the bzImage
    modules: Path | None  # lib/modules/RELEASE (has modules.dep), or None when not asked for


def cache_dir() -> Path:
    return cache_root() / "kernel"


def _run(*cmd, **kw) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise KernelFetchError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def _require_apt() -> None:
    missing = [tool for tool in ("apt-get", "apt-cache", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        raise KernelFetchError(f"cannot fetch Debian's kernel: no {', '.join(missing)} "
                               "(set NODEAGENT_CACHE to a folder with kernel/...)")


def kernel_package() -> str:
    """The concrete linux-image-X-amd64 package the linux-image-amd64 metapackage depends on."""
    _require_apt()
    for attempt in range(2):
        proc = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True)
        m = re.search(r"Depends:\s*(linux-image-\S+-amd64)\b", proc.stdout)
        if m:
            return m.group(1)
        if attempt == 0:
            _run("apt-get", "update", "-qq")
    raise KernelFetchError(f"apt-cache depends linux-image-amd64 names no kernel package: {proc.stdout!r} {proc.stderr!r}")


def _complete_modules(pkgdir: Path) -> Path | None:
    found = sorted(p.parent for p in pkgdir.glob("lib/modules/*/modules.dep"))
    return found[-1] if found else None


def _extract(package: str, cache: Path, members: list[str], into: Path) -> None:
    """apt-get download `package` into a temporary folder in `cache` and untar `members` (wildcards) of it
    into the temporary tree; then move each top-level folder of the tree into `into` (unless there already)."""
    _require_apt()
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        os.chmod(tmp, 0o755)  # apt-get download as root drops to _apt when it can write the folder
        _run("apt-get", "download", "-q", package, cwd=tmp)
        debs = list(Path(tmp).glob(f"{package}_*.deb"))
        if len(debs) != 1:
            raise KernelFetchError(f"apt-get download {package} left {debs} in {tmp}")
        tree = Path(tmp) / "tree"
        tree.mkdir()
        tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(debs[0])], stdout=subprocess.PIPE)
        _run("tar", "-x", "-C", str(tree), "--wildcards", *members, stdin=tar.stdout)
        tar.stdout.close()
        if tar.wait() != 0:
            raise KernelFetchError(f"dpkg-deb --fsys-tarfile {debs[0]} failed")
        for mod in tree.glob("lib/modules/*"):
            write_modules_dep(mod)  # last, so a tree with modules.dep is a complete tree
        into.mkdir(exist_ok=True)
        for top in tree.iterdir():
            try:
                top.rename(into / top.name)
            except OSError:
                if not (into / top.name).exists():
                    raise  # else: another run got there first


def fetch_debian_kernel(*, with_modules: bool = True, release: str | None = None) -> DebianKernel:
    """The cached kernel (any linux-image-* already in the cache, newest name first), fetched if missing; or,
    with `release` (6.1.0-57-amd64), the package linux-image-RELEASE."""
    cache = cache_dir()
    if release is not None and not re.fullmatch(r"[0-9][0-9A-Za-z.+~-]*", release):
        raise KernelFetchError(f"{release!r} is not a kernel release (such as 6.1.0-57-amd64)")
    cached = sorted(cache.glob(f"linux-image-{release or '*'}/boot/vmlinuz-*"))
    if cached:
        vmlinuz = cached[-1]
        pkgdir = vmlinuz.parent.parent
        package = pkgdir.name
    else:
        package = f"linux-image-{release}" if release else kernel_package()
        pkgdir = cache / package
        _extract(package, cache, ["./boot/vmlinuz-*", "./boot/config-*"]
                 + (["./lib/modules/*"] if with_modules else []), pkgdir)
        found = sorted((pkgdir / "boot").glob("vmlinuz-*"))
        if not found:
            raise KernelFetchError(f"{package} has no /boot/vmlinuz-*")
        vmlinuz = found[-1]
    release = vmlinuz.name.removeprefix("vmlinuz-")
    modules = None
    if with_modules:
        modules = _complete_modules(pkgdir)
        if modules is None:
            lib = pkgdir / "lib"
            if lib.exists():  # an interrupted earlier run left a tree without modules.dep
                shutil.rmtree(lib)
            _extract(package, cache, [f"./lib/modules/{release}/*"], pkgdir)
            modules = _complete_modules(pkgdir)
        if modules is None or modules.name != release:
            raise KernelFetchError(f"{package}: no module tree lib/modules/{release} in {pkgdir}")
    return DebianKernel(package=package, release=release, vmlinuz=vmlinuz, modules=modules)
