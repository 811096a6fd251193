"""staticbuild.initramfs (csrc/staticbuild) without a VM: layout, reproducibility, compression headers, module dependency order
(from a hand-written modules.dep). The boot test in tests/vm/ shows the kernel accepts the result."""

from __future__ import annotations

import gzip
import io
import lzma
import subprocess

import pytest

from staticbuild import BuildError
from staticbuild.initramfs import InitramfsError, InitramfsSpec, ModuleTree, build_initramfs, write_cpio


def names_in(cpio: bytes) -> list[str]:
    out, at = [], 0
    while True:
        namesize = int(cpio[at + 94 : at + 102], 16)
        filesize = int(cpio[at + 54 : at + 62], 16)
        name = cpio[at + 110 : at + 110 + namesize - 1].decode()
        if name == "TRAILER!!!":
            return out
        out.append(name)
        at += (110 + namesize + 3) & ~3
        at += (filesize + 3) & ~3


def sample(tmp_path) -> InitramfsSpec:
    src = tmp_path / "tool"
    src.write_bytes(b"\x7fELF tool")
    src.chmod(0o751)
    spec = InitramfsSpec()
    spec.file("usr/bin/tool", src=src)
    spec.symlink("bin/sh", "busybox")
    spec.file("init", data="#!/bin/sh\n", mode=0o755)
    spec.add_console_devices()
    spec.dir("proc", 0o555)
    return spec


def test_layout_and_made_up_parents(tmp_path):
    out = io.BytesIO()
    write_cpio(sample(tmp_path), out)
    assert names_in(out.getvalue()) == [
        "bin", "bin/sh", "dev", "dev/console", "dev/null", "init", "proc", "usr", "usr/bin", "usr/bin/tool"]


@pytest.mark.parametrize("compression", ["xz", "gzip", "none"])
def test_reproducible_and_decodable(tmp_path, compression):
    a = build_initramfs(sample(tmp_path), tmp_path / "a", compression=compression).read_bytes()
    b = build_initramfs(sample(tmp_path), tmp_path / "b", compression=compression).read_bytes()
    assert a == b
    if compression == "xz":
        assert a[:6] == b"\xfd7zXZ\x00" and a[6:8] == b"\x00\x01"  # stream flags: CRC32
        raw = lzma.decompress(a)
    elif compression == "gzip":
        assert a[:2] == b"\x1f\x8b" and a[4:8] == b"\0\0\0\0" and not a[3] & 0x08  # mtime 0, no file name
        raw = gzip.decompress(a)
    else:
        raw = a
    assert raw.startswith(b"070701") and "usr/bin/tool" in names_in(raw)
    assert not list(tmp_path.glob(".*.tmp"))


def test_conflicts(tmp_path):
    spec = sample(tmp_path)
    spec.dir("proc", 0o555)  # the same again is fine
    with pytest.raises(InitramfsError, match="added twice"):
        spec.file("init", data="other")
    with pytest.raises(InitramfsError, match="exactly one of"):
        spec.file("x")
    with pytest.raises(InitramfsError, match="cannot read"):
        spec.file("x", src=tmp_path / "missing")
    spec.file("init/sub", data="x")  # a file below a file
    with pytest.raises(InitramfsError, match="'init' is not a directory"):
        write_cpio(spec, io.BytesIO())
    assert issubclass(InitramfsError, BuildError)
    with pytest.raises(InitramfsError, match="compression"):
        build_initramfs(sample(tmp_path), tmp_path / "c", compression="bz2")


@pytest.fixture
def module_tree(tmp_path):
    root = tmp_path / "lib" / "modules" / "6.1.0-test"
    k = "kernel/drivers/virtio"
    (root / k).mkdir(parents=True)
    for m in ("virtio_ring", "virtio", "virtio_blk", "virtio_pci", "virtio_pci_modern_dev", "net-failover"):
        (root / k / f"{m}.ko").write_bytes(m.encode())
    (root / "modules.dep").write_text(
        f"{k}/virtio_ring.ko:\n"
        f"{k}/virtio.ko: {k}/virtio_ring.ko\n"
        f"{k}/virtio_blk.ko: {k}/virtio.ko {k}/virtio_ring.ko\n"
        f"{k}/virtio_pci_modern_dev.ko:\n"
        f"{k}/virtio_pci.ko: {k}/virtio.ko {k}/virtio_pci_modern_dev.ko {k}/virtio_ring.ko\n"
        f"{k}/net-failover.ko:\n"
    )
    (root / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\n")
    (root / "modules.softdep").write_text("# Soft dependencies extracted from modules themselves.\n")
    return root


def test_module_order(module_tree):
    tree = ModuleTree(module_tree)
    assert tree.resolve(["virtio_blk"]) == ["virtio_ring", "virtio", "virtio_blk"]
    assert tree.resolve(["virtio_pci", "virtio-blk", "ext4", "net_failover"]) == [
        "virtio_ring", "virtio_pci_modern_dev", "virtio", "virtio_pci", "virtio_blk", "net_failover"]
    with pytest.raises(InitramfsError, match="'nosuch' is neither"):
        tree.resolve(["nosuch"])


def test_modules_in_archive(module_tree):
    spec = InitramfsSpec()
    order = spec.modules(module_tree, ["virtio_blk"])
    base = "lib/modules/6.1.0-test/kernel/drivers/virtio"
    assert order == [f"/{base}/virtio_ring.ko", f"/{base}/virtio.ko", f"/{base}/virtio_blk.ko"]
    out = io.BytesIO()
    write_cpio(spec, out)
    names = names_in(out.getvalue())
    assert "lib/modules/6.1.0-test/modules.dep" in names and f"{base}/virtio_pci.ko" not in names
    dep = spec.entries[b"lib/modules/6.1.0-test/modules.dep"].data.decode()
    assert "kernel/drivers/virtio/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n" in dep


def test_missing_modules_dep(tmp_path):
    with pytest.raises(InitramfsError, match="modules.dep is missing"):
        ModuleTree(tmp_path)


def _tree_with_ext4(tmp_path, softdep_file: bool):
    """ext4 -> jbd2 (modules.dep), and ext4 asking for crypto-crc32c (softdep), which two modules provide."""
    root = tmp_path / "lib" / "modules" / "6.1.0-test"
    for rel in ("kernel/fs/ext4/ext4.ko", "kernel/fs/jbd2/jbd2.ko", "kernel/crypto/crc32c_generic.ko",
                "kernel/arch/x86/crypto/crc32c-intel.ko", "kernel/lib/crc16.ko"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"not an ELF")
    (root / "modules.dep").write_text(
        "kernel/lib/crc16.ko:\nkernel/fs/jbd2/jbd2.ko:\nkernel/crypto/crc32c_generic.ko:\n"
        "kernel/arch/x86/crypto/crc32c-intel.ko:\nkernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko kernel/lib/crc16.ko\n")
    (root / "modules.alias").write_text(
        "# Aliases\nalias crypto-crc32c crc32c_intel\nalias crc32c crc32c_intel\n"
        "alias crypto-crc32c crc32c_generic\nalias crc32c crc32c_generic\nalias fs-ext4 ext4\n")
    if softdep_file:
        (root / "modules.softdep").write_text("softdep ext4 pre: crypto-crc32c\nsoftdep jbd2 pre: crypto-crc32c\n")
    return root


def test_softdep_pre_modules_load_first(tmp_path):
    """ext4's metadata_csum needs crc32c, which the kernel asks the crypto API for: modules.dep does not list it,
    ext4's softdep does. The generic provider is taken (it loads on any CPU), before jbd2 and ext4."""
    tree = ModuleTree(_tree_with_ext4(tmp_path, softdep_file=True))
    assert tree.providers("crypto-crc32c") == ["crc32c_generic"]
    assert tree.providers("crc32c-intel") == ["crc32c_intel"]
    assert tree.resolve(["ext4"]) == ["crc16", "crc32c_generic", "jbd2", "ext4"]
    spec = InitramfsSpec()
    order = spec.modules(tree, ["ext4"])
    assert [p.rsplit("/", 1)[1] for p in order] == ["crc16.ko", "crc32c_generic.ko", "jbd2.ko", "ext4.ko"]
    base = b"lib/modules/6.1.0-test/"
    dep = spec.entries[base + b"modules.dep"].data.decode().splitlines()
    assert [line.split(":")[0].rsplit("/", 1)[1] for line in dep] == ["crc16.ko", "crc32c_generic.ko", "jbd2.ko",
                                                                        "ext4.ko"]  # load order
    assert spec.entries[base + b"modules.softdep"].data.decode() == (
        "softdep jbd2 pre: crc32c_generic\nsoftdep ext4 pre: crc32c_generic\n")


def test_softdeps_from_modinfo_without_modules_softdep(tmp_path):
    """A tree without modules.softdep (an older cache): the softdeps come from each module's .modinfo."""
    root = _tree_with_ext4(tmp_path, softdep_file=False)
    src = tmp_path / "ext4.c"
    src.write_text('__attribute__((section(".modinfo"), used)) static const char info[] = '
                   '"license=GPL\\0softdep=pre: crypto-crc32c\\0depends=jbd2,crc16";\n')
    for rel in ("kernel/fs/ext4/ext4.ko", "kernel/fs/jbd2/jbd2.ko", "kernel/lib/crc16.ko",
                "kernel/crypto/crc32c_generic.ko"):
        subprocess.run(["gcc", "-c", "-o", root / rel, src], check=True, capture_output=True)
    tree = ModuleTree(root)
    assert tree.resolve(["ext4"])[-1] == "ext4" and "crc32c_generic" in tree.resolve(["ext4"])
    assert tree.resolve(["ext4"]).index("crc32c_generic") < tree.resolve(["ext4"]).index("ext4")
