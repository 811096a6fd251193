"""`nodeagent kexec` in QEMU: the first kernel's initramfs runs the static nodeagent binary. Its /init checks the refusals that must leave the node up (a non-kernel, -e with nothing loaded,
-c with a non-kernel), then loads Debian's kernel + a small busybox initramfs with kexec_file_load (-s) and starts it (-e). The
second kernel's /init checks the command line it got and prints the PASS verdict.

test_kexec_disk_boots_grub_default: the same, but `nodeagent kexec --disk /dev/vda -e` finds the kernel, initrd and
command line through the grub.cfg of an ext4 partition on a virtio disk (default "1>0": an entry in a submenu)."""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from staticbuild.initramfs import build_initramfs

from .harness import sh_init
from .pyruntime import add_agent, python_runtime

ROOT = Path(__file__).resolve().parents[2]
SECOND_MARK = "nodeagent.second=1"

FIRST_INIT = """\
export PATH=/bin:/usr/bin
mount -t proc proc /proc || fail "mount proc"
mount -t sysfs sys /sys || fail "mount sysfs"
mount -t devtmpfs dev /dev || fail "mount devtmpfs"
echo "nodeagent-init: first kernel $(uname -r)"

nodeagent kexec -l /etc/hostname >/tmp/out 2>&1; rc=$?
cat /tmp/out
[ $rc -eq 12 ] || fail "kexec -l /etc/hostname: exit status $rc, not 12 (kexec)"
[ "$(grep -c '' /tmp/out)" = 1 ] || fail "kexec -l /etc/hostname: not one line"
grep -q "not a bzImage" /tmp/out || fail "kexec -l /etc/hostname: unexpected message"
[ "$(cat /sys/kernel/kexec_loaded)" = 0 ] || fail "something got loaded"
echo "nodeagent-init: refused /etc/hostname, still up"

nodeagent kexec -e >/tmp/out 2>&1; rc=$?
cat /tmp/out
[ $rc -eq 12 ] && grep -q "no kernel loaded" /tmp/out || fail "kexec -e with nothing loaded: exit $rc"
nodeagent kexec -c -l /etc/hostname >/tmp/out 2>&1; rc=$?
cat /tmp/out
[ $rc -eq 12 ] && grep -q "not a bzImage" /tmp/out || fail "kexec -c -l /etc/hostname: exit $rc"
[ "$(cat /sys/kernel/kexec_loaded)" = 0 ] || fail "something got loaded by -c"
nodeagent kexec -s -l /big/vmlinuz >/tmp/out 2>&1; rc=$?
cat /tmp/out
[ $rc -eq 12 ] || fail "kexec -s -l /big/vmlinuz: exit status $rc, not 12 (kexec)"
[ "$(grep -c '' /tmp/out)" = 1 ] || fail "kexec -s -l /big/vmlinuz: not one line"
grep -Eqi "memory|RAM" /tmp/out || fail "kexec -s -l /big/vmlinuz: message does not mention memory"
[ "$(cat /sys/kernel/kexec_loaded)" = 0 ] || fail "something got loaded by -s /big/vmlinuz"
echo "nodeagent-init: refused a kernel too big for RAM, still up"
echo "nodeagent-init: refusals ok"

nodeagent kexec -s -l /second/vmlinuz --initrd /second/initrd.cpio \
    --append "console=ttyS0 panic=-1 {mark}" -e
fail "kexec -s -l ... -e returned with status $?"
"""

SECOND_INIT = """\
mount -t proc proc /proc || fail "mount proc"
echo "nodeagent-init: second kernel, cmdline $(cat /proc/cmdline)"
grep -q "{mark}" /proc/cmdline || fail "the second kernel's command line lacks {mark}"
pass
"""


APPLETS = ("sh", "mount", "cat", "echo", "grep", "uname", "poweroff", "sync", "sleep", "insmod")


def second_initrd(busybox_spec, tmp_path):
    second = busybox_spec(SECOND_INIT.format(mark=SECOND_MARK))
    return build_initramfs(second, tmp_path / "initrd.cpio", compression="gzip")


def python_agent_spec(busybox_spec, tmp_path):
    """A busybox initramfs with a copied Python runtime and the agent's sources: only for the test that patches the
    loader from Python (a tampered digest), which the binary rightly offers no way to do."""
    spec = busybox_spec(applets=APPLETS)
    spec.tree(python_runtime())
    add_agent(spec, tmp_path)
    return spec


@pytest.fixture
def agent_spec(busybox_spec, nodeagent_binary):
    """agent_spec() -> a busybox initramfs with the static agent as /bin/nodeagent (add /init yourself)."""

    def make():
        spec = busybox_spec(applets=APPLETS)
        spec.file("bin/nodeagent", src=nodeagent_binary, mode=0o755)
        return spec

    return make


def synthetic_bzimage(init_size: int) -> bytes:
    """A minimal bzImage that passes the setup-header checks: protocol 2.15, 64-bit, relocatable, a 16-byte
    protected-mode kernel, and the given init_size (the memory it claims to need while decompressing)."""
    setup_sects = 4
    data = bytearray((setup_sects + 1) * 512 + 16)
    data[0x1F1] = setup_sects
    struct.pack_into("<I", data, 0x1F4, 1)  # syssize: one 16-byte paragraph
    struct.pack_into("<H", data, 0x1FE, 0xAA55)
    data[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", data, 0x206, 0x020F)
    data[0x211] = 0x01  # loadflags: LOADED_HIGH
    struct.pack_into("<I", data, 0x22C, 0x7FFFFFFF)  # initrd_addr_max
    struct.pack_into("<I", data, 0x230, 0x200000)  # kernel_alignment
    data[0x234] = 1  # relocatable_kernel
    struct.pack_into("<H", data, 0x236, 0x3)  # xloadflags: XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G
    struct.pack_into("<I", data, 0x238, 2047)  # cmdline_size
    struct.pack_into("<I", data, 0x260, init_size)
    return bytes(data)


def test_kexec_file_load_boots_second_kernel(debian_kernel, busybox_spec, agent_spec, boot_vm, tmp_path):
    spec = agent_spec()
    spec.file("init", data=sh_init(FIRST_INIT.format(mark=SECOND_MARK)), mode=0o755)
    spec.file("etc/hostname", data="node1\n")
    spec.file("big/vmlinuz", data=synthetic_bzimage(init_size=2 << 30))
    spec.file("second/vmlinuz", src=debian_kernel.vmlinuz)
    spec.file("second/initrd.cpio", src=second_initrd(busybox_spec, tmp_path))
    first = build_initramfs(spec, tmp_path / "first.cpio", compression="none")

    result = boot_vm(first, timeout=120)
    print(result.summary())
    log = result.log
    result.assert_pass()
    assert "nodeagent-init: refused /etc/hostname, still up" in log
    assert "nodeagent-init: refused a kernel too big for RAM, still up" in log
    assert "nodeagent-init: refusals ok" in log
    assert "nodeagent kexec: /second/vmlinuz: loaded with kexec_file_load" in log
    assert log.index("loaded with kexec_file_load") < log.index("nodeagent-init: second kernel")
    assert "kexec_core: Starting new kernel" in log


# -- --disk: the default grub.cfg entry of an OS disk -------------------------------------------------------------

DISK_INIT = """\
export PATH=/bin:/usr/bin
mount -t proc proc /proc || fail "mount proc"
mount -t sysfs sys /sys || fail "mount sysfs"
mount -t devtmpfs dev /dev || fail "mount devtmpfs"
for m in {modules}; do
    insmod "$m" || fail "insmod $m"
done
i=0
while [ ! -b /dev/vda1 ]; do
    i=$((i + 1))
    [ $i -gt 100 ] && fail "no /dev/vda1 10 s after loading virtio_blk"
    sleep 0.1
done
nodeagent kexec --disk /dev/vda -e
fail "kexec --disk /dev/vda -e returned with status $?"
"""

GRUB_CFG = """\
if [ "${{next_entry}}" ] ; then
   set default="${{next_entry}}"
else
   set default="1>0"
fi
menuentry 'Debian GNU/Linux' --class debian $menuentry_id_option 'gnulinux-simple-{uuid}' {{
	insmod ext2
	search --no-floppy --fs-uuid --set=root {uuid}
	linux	/boot/vmlinuz-{release} root=UUID={uuid} ro quiet console=ttyS0 panic=-1
	initrd	/boot/initrd.img-{release}
}}
submenu 'Advanced options for Debian GNU/Linux' $menuentry_id_option 'gnulinux-advanced-{uuid}' {{
	menuentry 'Debian GNU/Linux, with Linux {release}' $menuentry_id_option 'gnulinux-{release}-advanced-{uuid}' {{
		linux	/boot/vmlinuz-{release} root=UUID={uuid} ro console=ttyS0 panic=-1 {mark}
		initrd	/boot/initrd.img-{release}
	}}
}}
"""

DISK_UUID = "6e0c1f4a-3b2d-4e5f-8a9b-0c1d2e3f4a5b"


def make_os_disk(tmp_path, release, vmlinuz, initrd):
    """An MBR disk, one ext4 partition at 1 MiB holding /boot/grub/grub.cfg (default: the submenu's entry, the only
    one whose command line has SECOND_MARK), the kernel and the initrd."""
    for tool in ("mkfs.ext4", "sfdisk"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")
    root = tmp_path / "osroot"
    (root / "boot/grub").mkdir(parents=True)
    shutil.copyfile(vmlinuz, root / f"boot/vmlinuz-{release}")
    shutil.copyfile(initrd, root / f"boot/initrd.img-{release}")
    (root / "boot/grub/grub.cfg").write_text(GRUB_CFG.format(uuid=DISK_UUID, release=release, mark=SECOND_MARK))
    fs = tmp_path / "fs.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-U", DISK_UUID, "-d", str(root), str(fs), "24M"], check=True,
                   capture_output=True)
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as out, open(fs, "rb") as f:
        out.seek(1 << 20)
        shutil.copyfileobj(f, out)
    subprocess.run(["sfdisk", "-q", str(disk)], input="start=2048, type=83\n", text=True, check=True,
                   capture_output=True)
    return disk


def test_kexec_disk_boots_grub_default(debian_kernel, busybox_spec, agent_spec, boot_vm, tmp_path):
    disk = make_os_disk(tmp_path, debian_kernel.release, debian_kernel.vmlinuz, second_initrd(busybox_spec, tmp_path))
    spec = agent_spec()
    order = spec.modules(debian_kernel.modules, ["virtio_pci", "virtio_blk", "ext4"])
    spec.file("init", data=sh_init(DISK_INIT.format(modules=" ".join(order))), mode=0o755)
    first = build_initramfs(spec, tmp_path / "first.cpio", compression="none")

    result = boot_vm(first, disks=[disk], timeout=120)
    print(result.summary())
    result.assert_pass()
    assert "nodeagent kexec: found /dev/vda1: /boot/grub/grub.cfg entry 'Debian GNU/Linux, with Linux" in result.log
    assert "nodeagent kexec: /tmp/" in result.log and "loaded with kexec_file_load" in result.log


# -- -c: kexec_load with our own segment layout and purgatory ---------------------------------------------------

LEGACY_INIT = """\
export PATH=/bin:/usr/bin
mount -t proc proc /proc || fail "mount proc"
mount -t sysfs sys /sys || fail "mount sysfs"
mount -t devtmpfs dev /dev || fail "mount devtmpfs"
echo "nodeagent-init: first kernel $(uname -r)"
[ -d /sys/firmware/memmap ] || fail "no /sys/firmware/memmap"
nodeagent kexec -c -l /second/vmlinuz --initrd /second/initrd.cpio \\
    --append "console=ttyS0 panic=-1 {mark}" -e
fail "kexec -c -l ... -e returned with status $?"
"""


def test_kexec_load_boots_second_kernel(debian_kernel, busybox_spec, agent_spec, boot_vm, tmp_path):
    spec = agent_spec()  # the binary carries the purgatory
    spec.file("init", data=sh_init(LEGACY_INIT.format(mark=SECOND_MARK)), mode=0o755)
    spec.file("second/vmlinuz", src=debian_kernel.vmlinuz)
    spec.file("second/initrd.cpio", src=second_initrd(busybox_spec, tmp_path))
    first = build_initramfs(spec, tmp_path / "first.cpio", compression="none")

    result = boot_vm(first, timeout=150)
    print(result.summary())
    log = result.log
    result.assert_pass()
    assert "nodeagent kexec: /second/vmlinuz: loaded with kexec_load" in log
    assert log.index("loaded with kexec_load") < log.index("nodeagent-init: second kernel")
    assert "kexec_core: Starting new kernel" in log
    assert "purgatory: SHA-256 mismatch" not in log


TAMPER_INIT = """\
export PATH=/bin:/usr/bin
mount -t proc proc /proc || fail "mount proc"
mount -t sysfs sys /sys || fail "mount sysfs"
mount -t devtmpfs dev /dev || fail "mount devtmpfs"
python3 - <<'PY'
from agent.kexec import load, loader

patch = loader.patch_purgatory


def tampered(blob, **kw):  # the kernel's digest, one bit off: the purgatory must refuse to start it
    out = bytearray(patch(blob, **kw))
    out[out.find(loader.PURGATORY_MAGIC) + 32 + 16] ^= 1
    return bytes(out)


loader.patch_purgatory = tampered
print("nodeagent-init: loaded with", load.load_kernel("/second/vmlinuz", "/second/initrd.cpio",
                                                      "console=ttyS0 panic=-1 {mark}", "load"), flush=True)
load.execute()
PY
fail "python returned with status $?"
"""


def test_kexec_load_purgatory_halts_on_bad_digest(debian_kernel, busybox_spec, boot_vm, tmp_path):
    """A wrong digest in the purgatory: it says so on COM1 and halts; the second kernel never starts (QEMU is killed
    at the time limit)."""
    subprocess.run([sys.executable, str(ROOT / "build.py"), "purgatory"], check=True, capture_output=True)
    spec = python_agent_spec(busybox_spec, tmp_path)
    spec.file("init", data=sh_init(TAMPER_INIT.format(mark=SECOND_MARK)), mode=0o755)
    spec.file("second/vmlinuz", src=debian_kernel.vmlinuz)
    spec.file("second/initrd.cpio", src=second_initrd(busybox_spec, tmp_path))
    first = build_initramfs(spec, tmp_path / "first.cpio", compression="none")

    result = boot_vm(first, timeout=45)
    print(result.summary())
    log = result.log
    assert "nodeagent-init: loaded with kexec_load" in log, result.tail()
    assert "kexec_core: Starting new kernel" in log, result.tail()
    assert "nodeagent purgatory: SHA-256 mismatch, halting" in log, result.tail()
    assert "nodeagent-init: second kernel" not in log and result.verdict is None
    assert result.timed_out


# -- a big initrd (64 MiB of random data) through the handover, with -s and -c ------------------------------------

BIG_FIRST_INIT = """\
export PATH=/bin:/usr/bin
mount -t proc proc /proc || fail "mount proc"
mount -t sysfs sys /sys || fail "mount sysfs"
mount -t devtmpfs dev /dev || fail "mount devtmpfs"
echo "nodeagent-init: first kernel $(uname -r), $(grep MemTotal /proc/meminfo)"
nodeagent kexec {mode} -l /second/vmlinuz --initrd /second/initrd.cpio \\
    --append "console=ttyS0 panic=-1 {mark} nodeagent.sha={sha}" -e
fail "kexec {mode} -l ... -e returned with status $?"
"""

BIG_SECOND_INIT = """\
mount -t proc proc /proc || fail "mount proc"
echo "nodeagent-init: second kernel, cmdline $(cat /proc/cmdline)"
grep -q "{mark}" /proc/cmdline || fail "the second kernel's command line lacks {mark}"
want=
for w in $(cat /proc/cmdline); do
    case "$w" in nodeagent.sha=*) want="${{w#nodeagent.sha=}}";; esac
done
[ -n "$want" ] || fail "no nodeagent.sha= on the command line"
[ -f /big.bin ] || fail "no /big.bin in the second initramfs"
got=$(sha256sum /big.bin)
got="${{got%% *}}"
echo "nodeagent-init: /big.bin sha256 $got"
[ "$got" = "$want" ] || fail "/big.bin sha256 $got, want $want"
pass
"""

BIG_SIZE = 64 << 20


@pytest.mark.parametrize("mode", ["-s", "-c"])
def test_kexec_big_initrd(mode, debian_kernel, busybox_spec, agent_spec, boot_vm, tmp_path):
    payload = os.urandom(BIG_SIZE)
    sha = hashlib.sha256(payload).hexdigest()
    big = tmp_path / "big.bin"
    big.write_bytes(payload)
    del payload
    second = busybox_spec(BIG_SECOND_INIT.format(mark=SECOND_MARK), applets=APPLETS + ("sha256sum",))
    second.file("big.bin", src=big)
    initrd = build_initramfs(second, tmp_path / "initrd.cpio", compression="none")
    assert initrd.stat().st_size > BIG_SIZE

    spec = agent_spec()
    spec.file("init", data=sh_init(BIG_FIRST_INIT.format(mode=mode, mark=SECOND_MARK, sha=sha)), mode=0o755)
    spec.file("second/vmlinuz", src=debian_kernel.vmlinuz)
    spec.file("second/initrd.cpio", src=initrd)
    first = build_initramfs(spec, tmp_path / "first.cpio", compression="none")

    result = boot_vm(first, timeout=300, memory=1024)
    print(result.summary())
    log = result.log
    result.assert_pass()
    loaded = "loaded with kexec_file_load" if mode == "-s" else "loaded with kexec_load"
    assert f"nodeagent kexec: /second/vmlinuz: {loaded}" in log
    assert log.index(loaded) < log.index("nodeagent-init: second kernel")
    assert "kexec_core: Starting new kernel" in log
    assert f"nodeagent-init: /big.bin sha256 {sha}" in log
    assert "RAMDISK: incomplete write" not in log
    assert "purgatory: SHA-256 mismatch" not in log
