"""Smoke test of the VM harness: Debian's kernel boots an initramfs built by staticbuild.initramfs, /init loads
virtio_pci + virtio_blk (with their dependencies, in order) with busybox insmod, finds /dev/vda and reads back the
marker the test wrote into the disk's first sector."""

from __future__ import annotations

import lzma
import secrets

from staticbuild.initramfs import build_initramfs

from .harness import sh_init

INIT = """\
mount -t proc proc /proc || fail "mount proc"
mount -t sysfs sys /sys || fail "mount sysfs"
mount -t devtmpfs dev /dev || fail "mount devtmpfs"
echo "nodeagent-init: kernel $(uname -r)"
for m in {modules}; do
    insmod "$m" || fail "insmod $m"
done
i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1))
    [ $i -gt 100 ] && fail "no /dev/vda 10 s after loading virtio_blk"
    sleep 0.1
done
got=$(dd if=/dev/vda bs=512 count=1 2>/dev/null | head -c {length})
echo "nodeagent-init: first sector of /dev/vda starts with '$got'"
[ "$got" = "{marker}" ] || fail "first sector of /dev/vda holds '$got', not '{marker}'"
pass
"""


def test_boot_virtio_blk(debian_kernel, busybox_spec, boot_vm, tmp_path):
    marker = f"NODEAGENT-DISK-{secrets.token_hex(8)}"
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.write(marker.encode())
        f.truncate(8 << 20)

    def initramfs(name):
        spec = busybox_spec()
        order = spec.modules(debian_kernel.modules, ["virtio_pci", "virtio_blk"])
        spec.file("init", data=sh_init(INIT.format(modules=" ".join(order), length=len(marker), marker=marker)),
                  mode=0o755)
        return order, build_initramfs(spec, tmp_path / name, compression="xz")

    order, initrd = initramfs("initrd.xz")
    names = [p.rsplit("/", 1)[1] for p in order]
    # dependencies first: virtio_ring before virtio, both before the drivers
    assert names.index("virtio_ring.ko") < names.index("virtio.ko") < names.index("virtio_pci.ko")
    assert names.index("virtio.ko") < names.index("virtio_blk.ko")
    assert {"virtio_pci_modern_dev.ko", "virtio_pci_legacy_dev.ko"} <= set(names)
    # reproducible, and xz with the CRC32 check (stream flags byte 1 = 0x01) the kernel's decoder accepts
    _, again = initramfs("initrd-again.xz")
    data = initrd.read_bytes()
    assert data == again.read_bytes()
    assert data[:6] == b"\xfd7zXZ\x00" and data[6:8] == b"\x00\x01"
    assert lzma.decompress(data)[:6] == b"070701"

    result = boot_vm(initrd, disks=[disk], timeout=90)
    print(result.summary())
    result.assert_pass()
    assert "nodeagent-init: kernel " + debian_kernel.release in result.log
