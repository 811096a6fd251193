"""agent.linux_files: the /proc, /sys, command-line and modules.dep parsers, on texts and fake trees under tmp_path,
with hostile input (garbage lines, binary junk, missing and unreadable files) that must give values, not exceptions;
and once each against this machine's real /proc and /sys."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from conftest import loop_device, needs_root
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import linux_files as lf
from agent.io.target import busy_reason

MOUNTINFO = r"""22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro
23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
40 22 7:3 /sub /mnt/my\040disk rw,relatime - ext4 /dev/loop3 rw
41 22 7:4 / /mnt/opt rw master:3 unbindable - vfat /dev/loop4 rw
garbage
42 22 x:y / /bad rw - ext4 /dev/x rw
43 22 7:5 / /no-separator rw ext4 /dev/loop5 rw
"""


def test_mountinfo():
    mounts = lf.parse_mountinfo(MOUNTINFO)
    assert [(m.major, m.minor, m.mount_point, m.fstype, m.source) for m in mounts] == [
        (8, 1, "/", "ext4", "/dev/sda1"),
        (0, 21, "/proc", "proc", "proc"),
        (7, 3, "/mnt/my disk", "ext4", "/dev/loop3"),
        (7, 4, "/mnt/opt", "vfat", "/dev/loop4"),
    ]
    assert mounts[2].root == "/sub"


def test_swaps():
    text = ("Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
            "/dev/sda2                               partition\t1048572\t\t0\t\t-2\n"
            "/swap\\040file                           file\t\t65532\t\t0\t\t-3\n"
            "nonsense\n\n/only-a-path\n")
    assert lf.parse_swaps(text) == [lf.Swap("/dev/sda2", "partition"), lf.Swap("/swap file", "file")]


def test_iomem():
    text = ("00000000-00000fff : Reserved\n00001000-0009fbff : System RAM\n"
            "00100000-1ffdffff : System RAM\n  0a000000-0b002596 : Kernel code\n"
            "zzzz-1 : System RAM\n00000010-00000001 : System RAM\n0-1\n")
    assert lf.parse_iomem(text) == [
        lf.IomemRange(0, 0x1000, "Reserved", 0), lf.IomemRange(0x1000, 0x9FC00, "System RAM", 0),
        lf.IomemRange(0x100000, 0x1FFE0000, "System RAM", 0), lf.IomemRange(0xA000000, 0xB002597, "Kernel code", 1),
    ]


def _write(root, rel, text):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_firmware_memmap(tmp_path):
    for i, (start, end, kind) in enumerate([("0x100000", "0x1ffdffff", "System RAM"), ("0x0", "0x9fbff", "System RAM"),
                                            ("0x9fc00", "0x9ffff", "Reserved")]):
        for name, value in (("start", start), ("end", end), ("type", kind)):
            _write(tmp_path, f"sys/firmware/memmap/{i}/{name}", value + "\n")
    _write(tmp_path, "sys/firmware/memmap/7/start", "junk\n")  # hostile: bad number, missing files
    _write(tmp_path, "sys/firmware/memmap/7/end", "0x10\n")
    _write(tmp_path, "sys/firmware/memmap/7/type", "System RAM\n")
    _write(tmp_path, "sys/firmware/memmap/8/start", "0x10\n")
    (tmp_path / "sys/firmware/memmap/README").write_text("not a directory")
    assert lf.read_firmware_memmap(str(tmp_path)) == [
        lf.MemoryRange(0, 0x9FC00, "System RAM"), lf.MemoryRange(0x9FC00, 0xA0000, "Reserved"),
        lf.MemoryRange(0x100000, 0x1FFE0000, "System RAM"),
    ]
    assert lf.read_firmware_memmap(str(tmp_path / "none")) == []


def test_kexec_loaded(tmp_path):
    assert lf.kexec_loaded(str(tmp_path)) is None
    for text, want in (("1\n", True), ("0\n", False), ("maybe\n", None), ("", None)):
        _write(tmp_path, "sys/kernel/kexec_loaded", text)
        assert lf.kexec_loaded(str(tmp_path)) is want


def test_block_devices(tmp_path):
    _write(tmp_path, "sys/dev/block/8:0/dev", "8:0\n")
    _write(tmp_path, "sys/dev/block/8:0/sda1/dev", "8:1\n")
    _write(tmp_path, "sys/dev/block/8:0/sda2/dev", "8:2\n")
    _write(tmp_path, "sys/dev/block/8:0/sda3/dev", "garbage\n")
    _write(tmp_path, "sys/dev/block/8:0/queue/rotational", "1\n")
    (tmp_path / "sys/dev/block/8:0/holders/dm-0").mkdir(parents=True)
    (tmp_path / "sys/dev/block/8:0/holders/md127").mkdir()
    root = str(tmp_path)
    assert lf.block_device_and_partitions(8, 0, root) == {(8, 0), (8, 1), (8, 2)}
    assert lf.block_device_and_partitions(9, 0, root) == {(9, 0)}
    assert lf.block_holders(8, 0, root) == ["dm-0", "md127"]
    assert lf.block_holders(8, 1, root) == []
    for name, number in (("vda10", "10"), ("vda2", "2"), ("vda1", "1"), ("vdaX", "x\n")):
        _write(tmp_path, f"sys/class/block/vda/{name}/partition", number + "\n")
    _write(tmp_path, "sys/class/block/vda/size", "2048\n")
    assert lf.block_partitions("vda", root) == ["vda1", "vda2", "vda10"]
    assert lf.block_partitions("sdz", root) == []


# -- the kernel command line --------------------------------------------------------------------------------------


def test_cmdline_words_keep_quoted_blanks():
    assert lf.cmdline_words(' BOOT_IMAGE=/vmlinuz  root=UUID=ab ro  x="a b"  "y=c d" \n') == [
        "BOOT_IMAGE=/vmlinuz", "root=UUID=ab", "ro", 'x="a b"', '"y=c d"']
    assert lf.cmdline_words("") == [] and lf.cmdline_words(" \t\n") == []


def test_cmdline_params():
    line = ('BOOT_IMAGE=/vmlinuz root=UUID=ab ro quiet console=tty0 console=ttyS0,115200 '
            'nodeagent.server=10.0.0.1 nodeagent.note="two words" "nodeagent.q=x y" nodeagent.flag '
            'nodeagent.= BOOTIF=01-52-54-00-12-34-56 ip=10.0.0.5::10.0.0.1:255.255.255.0:node5:eth0:off '
            'mod.opt=a=b -- single "init arg"\n')
    cmd = lf.parse_cmdline(line)
    assert cmd.get("root") == "UUID=ab"
    assert cmd.get("quiet") == "" and "quiet" in cmd and "loud" not in cmd
    assert cmd.get("loud") is None and cmd.get("loud", "d") == "d"
    assert cmd.get("console") == "ttyS0,115200"  # the last one
    assert cmd.get("mod.opt") == "a=b"  # split at the first "="
    assert cmd.get("BOOTIF") == "01-52-54-00-12-34-56"
    assert cmd.get("ip") == "10.0.0.5::10.0.0.1:255.255.255.0:node5:eth0:off"
    assert cmd.nodeagent() == {"server": "10.0.0.1", "note": "two words", "q": "x y", "flag": ""}
    assert cmd.init_args == ("single", '"init arg"')
    assert "single" not in cmd


@pytest.mark.parametrize("line, params", [
    ('a="unterminated b c', [("a", "unterminated b c")]),
    ('"', [("", None)]),
    ('=x', [("", "x")]),
    ('a=""', [("a", "")]),
    ('a=x"y z"', [("a", 'x"y z"')]),
    ("\0\x01\x7f", [("\0\x01\x7f", None)]),
])
def test_cmdline_edge_cases(line, params):
    assert list(lf.parse_cmdline(line).params) == params


def test_read_cmdline(tmp_path):
    assert lf.read_cmdline(str(tmp_path)) is None
    _write(tmp_path, "proc/cmdline", "ro quiet\n")
    assert lf.read_cmdline(str(tmp_path)) == "ro quiet"
    (tmp_path / "proc/cmdline").write_bytes(b"root=/dev/\xff\xfe x=1\n")  # not UTF-8: kept, no exception
    assert lf.parse_cmdline(lf.read_cmdline(str(tmp_path))).get("x") == "1"


# -- modules.dep --------------------------------------------------------------------------------------------------

MODULES_DEP = """\
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko \
kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_ring.ko: kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/fs/ext4/ext4.ko.xz: kernel/fs/jbd2/jbd2.ko.xz kernel/fs/mbcache.ko.xz kernel/lib/crc16.ko.xz
kernel/net/e1000-e.ko:
no colon on this line
bad path.ko: x.ko
: nothing.ko
"""


def test_modules_dep():
    deps = lf.parse_modules_dep(MODULES_DEP)
    assert deps["kernel/drivers/virtio/virtio_ring.ko"] == ("kernel/drivers/virtio/virtio.ko",)
    assert deps["kernel/drivers/virtio/virtio.ko"] == ()
    assert len(deps) == 8


def test_module_load_order():
    deps = lf.parse_modules_dep(MODULES_DEP)
    order, unknown = lf.module_load_order(deps, ["virtio_pci", "virtio-blk", "ext4", "e1000_e", "nosuch"])
    v = "kernel/drivers/virtio/"
    assert order == [v + "virtio.ko", v + "virtio_ring.ko", v + "virtio_pci_legacy_dev.ko",
                     v + "virtio_pci_modern_dev.ko", v + "virtio_pci.ko", "kernel/drivers/block/virtio_blk.ko",
                     "kernel/lib/crc16.ko.xz", "kernel/fs/mbcache.ko.xz", "kernel/fs/jbd2/jbd2.ko.xz",
                     "kernel/fs/ext4/ext4.ko.xz", "kernel/net/e1000-e.ko"]
    assert unknown == ["nosuch"]
    for i, path in enumerate(order):  # every module after all of its dependencies
        assert all(order.index(dep) < i for dep in deps.get(path, ()))


def test_module_load_order_survives_a_loop():
    deps = lf.parse_modules_dep("a.ko: b.ko\nb.ko: c.ko\nc.ko: a.ko\n")
    order, unknown = lf.module_load_order(deps, ["a", "c"])
    assert sorted(order) == ["a.ko", "b.ko", "c.ko"] and unknown == []


def test_module_name():
    assert [lf.module_name(p) for p in ("kernel/x/virtio-blk.ko", "e1000e.ko.zst", "a.ko.gz", "crc16")] == [
        "virtio_blk", "e1000e", "a", "crc16"]


# -- hostile text: values, never an exception ---------------------------------------------------------------------

_junk = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=400)


@settings(max_examples=300, deadline=None)
@given(_junk)
def test_parsers_never_raise(text):
    lf.parse_mountinfo(text)
    lf.parse_swaps(text)
    lf.parse_iomem(text)
    lf.parse_dev_number(text)
    cmd = lf.parse_cmdline(text)
    cmd.nodeagent()
    lf.module_load_order(lf.parse_modules_dep(text), ["a", "virtio_blk"])
    lf.unescape_octal(text)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["1.ko", "2.ko", "3.ko", "x", ":", " ", "\n", "4.ko:"]), max_size=60))
def test_modules_dep_shuffles_never_raise(parts):
    deps = lf.parse_modules_dep("".join(parts))
    order, _ = lf.module_load_order(deps, ["1", "2", "3", "4"])
    assert len(order) == len(set(order))


def test_unreadable_files_read_as_absent(tmp_path):
    (tmp_path / "proc/cmdline").mkdir(parents=True)  # a directory where a file should be
    (tmp_path / "proc/swaps").mkdir()
    assert lf.read_cmdline(str(tmp_path)) is None
    assert lf.read_swaps(str(tmp_path)) == []
    assert lf.read_mountinfo(str(tmp_path)) == []
    assert lf.read_iomem(str(tmp_path)) == []


# -- this machine -------------------------------------------------------------------------------------------------


def test_this_machine():
    mounts = lf.read_mountinfo()
    root_mount = [m for m in mounts if m.mount_point == "/"]
    assert root_mount, mounts[:3]
    st_dev = os.stat("/proc").st_dev
    assert any((m.major, m.minor) == (os.major(st_dev), os.minor(st_dev)) and m.fstype == "proc" for m in mounts)
    assert lf.read_cmdline() == open("/proc/cmdline").read().rstrip("\n")
    want = {"0\n": False, "1\n": True}.get(lf.read_text("/sys/kernel/kexec_loaded"))  # a kernel without kexec: None
    assert lf.kexec_loaded() is want
    memmap = lf.read_firmware_memmap()
    if os.path.isdir("/sys/firmware/memmap"):
        assert any(r.type == "System RAM" for r in memmap)
        assert all(a.start <= b.start for a, b in zip(memmap, memmap[1:]))


# -- busy_reason: the parsers against the kernel's own files, on loop devices -------------------------------------


@needs_root
def test_busy_reason_swap(tmp_path):
    """A loop device in use as swap: io.target says so (the mounted case is tests/test_image_fixtures.py's)."""
    backing = tmp_path / "disk.img"
    backing.write_bytes(bytes(4 << 20))
    with loop_device(backing) as dev:
        rdev = os.stat(dev).st_rdev
        assert busy_reason(dev, rdev) is None
        subprocess.run(["mkswap", dev], check=True, capture_output=True)
        if subprocess.run(["swapon", dev], capture_output=True).returncode != 0:
            pytest.skip("swapon refused here")
        try:
            assert busy_reason(dev, rdev) == f"in use as swap ({dev})"
        finally:
            subprocess.run(["swapoff", dev], check=True)
        assert busy_reason(dev, rdev) is None


@needs_root
@pytest.mark.skipif(shutil.which("dmsetup") is None
                    or subprocess.run(["dmsetup", "version"], capture_output=True).returncode != 0,
                    reason="needs device-mapper (dmsetup and the kernel's driver)")
def test_busy_reason_holder(tmp_path):
    """A loop device held by a device-mapper device."""
    backing = tmp_path / "disk.img"
    backing.write_bytes(bytes(4 << 20))
    with loop_device(backing) as dev:
        rdev = os.stat(dev).st_rdev
        name = f"natest{os.getpid()}"
        subprocess.run(["dmsetup", "create", name, "--table", f"0 {(4 << 20) // 512} linear {dev} 0"], check=True)
        try:
            dm = os.path.basename(os.path.realpath(f"/dev/mapper/{name}"))
            assert busy_reason(dev, rdev) == f"held by {dm}"
        finally:
            subprocess.run(["dmsetup", "remove", name], check=True)
