"""agent.kexec.loader (the kexec_load layout) and load_kernel's kexec_load mode, on the host: placement inside RAM
without overlaps, the zero page fields at their documented offsets, the purgatory's patched digests, the purgatory
build itself. Nothing here calls kexec_load: load_kernel gets a recording stand-in for agent.linux."""

from __future__ import annotations

import hashlib
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from test_bzimage import make_bzimage
from test_kexec_load import QEMU_512M, memmap

from agent.errors import KexecError
from agent.kexec import load, loader
from agent.kexec.bzimage import BzImageError, parse_bzimage
from agent.kexec.load import load_kernel
from agent.kexec.loader import E820_RAM, E820Entry, LoaderError, build_image

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
E820_QEMU = [E820Entry(0, 0x9FC00, 1), E820Entry(0x9FC00, 0xA0000, 2), E820Entry(0xF0000, 0x100000, 2),
             E820Entry(0x100000, 0x1FFE0000, 1), E820Entry(0x1FFE0000, 0x20000000, 2),
             E820Entry(0xFEFFC000, 0xFF000000, 2), E820Entry(0xFFFC0000, 0x100000000, 2)]
FAKE_PURGATORY = b"\xfa\xfc" + b"\x90" * 100 + loader.PURGATORY_MAGIC + bytes(24 + 8 * 48) + b"\0" * 50


@pytest.fixture(scope="session")
def purgatory_bin() -> bytes:
    subprocess.run([sys.executable, str(ROOT / "build.py"), "purgatory"], check=True, capture_output=True)
    return load.read_purgatory()


def _image(e820=E820_QEMU, initrd=b"R" * 300000, cmdline="console=ttyS0 x=1", purgatory=FAKE_PURGATORY, **kw):
    data = make_bzimage(**kw)
    bz = parse_bzimage(data)
    return data, build_image(data, bz, initrd, bz.check_cmdline(cmdline), e820, purgatory)


def _check_layout(image, e820):
    ram = [(e.start, e.end) for e in e820 if e.type == E820_RAM]
    segs = image.segments
    assert [s.mem for s in segs] == sorted(s.mem for s in segs)
    for s in segs:
        assert s.mem % 4096 == 0 and s.memsz % 4096 == 0 and len(s.buf) <= s.memsz, s
        assert s.mem >= 0x100000, s
        assert any(a <= s.mem and s.end <= b for a, b in ram), f"{s.name} outside RAM"
    for a, b in zip(segs, segs[1:]):
        assert a.end <= b.mem, f"{a.name} overlaps {b.name}"
    assert image.entry == image.segment("purgatory").mem


def test_layout_qemu_512m():
    data, image = _image()
    _check_layout(image, E820_QEMU)
    bz = parse_bzimage(data)
    k = image.segment("kernel")
    assert k.mem == 0x1000000  # pref_address
    assert k.memsz >= bz.init_size and bytes(k.buf) == data[bz.kernel_offset : bz.kernel_offset + bz.kernel_size]
    r = image.segment("initrd")
    assert r.end == 0x1FFE0000  # top of RAM under initrd_addr_max
    p = image.segment("bootparams")
    assert image.zero_page_addr == p.mem and image.cmdline_addr == p.mem + 4096
    assert p.buf[4096:] == b"console=ttyS0 x=1\0"
    assert [s.name for s in image.segments] == ["bootparams", "purgatory", "kernel", "initrd"]


def test_layout_pref_address_taken_realigns():
    e820 = [E820Entry(0x100000, 0x1100000, 1), E820Entry(0x1100000, 0x1200000, 2), E820Entry(0x1200000, 0x8000000, 1)]
    _, image = _image(e820=e820)
    _check_layout(image, e820)
    assert image.kernel_addr == 0x1200000  # pref_address is not free: the first 2 MiB-aligned fit


def test_layout_initrd_below_initrd_addr_max():
    e820 = [E820Entry(0x100000, 0x100000000, 1)]
    _, image = _image(e820=e820, initrd_addr_max=0x37FFFFFF)
    _check_layout(image, e820)
    assert image.segment("initrd").end == 0x38000000


def test_layout_without_initrd():
    data, image = _image(initrd=None)
    _check_layout(image, E820_QEMU)
    assert [s.name for s in image.segments] == ["bootparams", "purgatory", "kernel"]
    zp = image.segment("bootparams").buf
    assert struct.unpack_from("<II", zp, 0x218) == (0, 0)


@pytest.mark.parametrize("e820, initrd, message", [
    ([E820Entry(0x100000, 0x1800000, 1)], b"", "no room for the kernel"),
    ([E820Entry(0x100000, 0x3200000, 1)], b"x" * (20 * MiB), "no room for a"),
    ([E820Entry(0, 0x9F000, 1)], b"", "no room for the kernel"),
    ([E820Entry(0x100000, 0x3200000, 2)], b"", "no System RAM"),
])
def test_layout_refusals(e820, initrd, message):
    with pytest.raises(LoaderError, match=message):
        _image(e820=e820, initrd=initrd)


def test_cmdline_too_long():
    with pytest.raises(BzImageError, match="at most 10"):
        _image(cmdline="x" * 11, cmdline_size=10)
    with pytest.raises(BzImageError, match="NUL"):
        _image(cmdline="a\0b")
    with pytest.raises(LoaderError, match="not NUL-terminated"):  # build_image takes only what check_cmdline gives
        data = make_bzimage()
        build_image(data, parse_bzimage(data), None, b"x", E820_QEMU, FAKE_PURGATORY)


def test_zero_page_fields():
    data, image = _image(initrd=b"R" * 12345)
    zp = image.segment("bootparams").buf[:4096]
    hdr_end = 0x202 + data[0x201]
    # the setup header, copied, except the fields a boot loader writes
    written = {0x210, 0x211, *range(0x214, 0x220), *range(0x224, 0x22C)}
    for off in range(0x1F1, hdr_end):
        if off not in written:
            assert zp[off] == data[off], hex(off)
    assert zp[0x202:0x206] == b"HdrS" and struct.unpack_from("<H", zp, 0x1FE)[0] == 0xAA55
    assert zp[0x210] == 0xFF  # type_of_loader
    assert zp[0x211] & 0x01 and not zp[0x211] & 0x80  # LOADED_HIGH, no CAN_USE_HEAP
    assert struct.unpack_from("<I", zp, 0x214)[0] == image.kernel_addr
    assert struct.unpack_from("<II", zp, 0x218) == (image.initrd_addr, 12345)
    assert struct.unpack_from("<I", zp, 0x228)[0] == image.cmdline_addr
    assert struct.unpack_from("<III", zp, 0x0C0) == (0, 0, 0)  # ext_ramdisk_image/size, ext_cmd_line_ptr
    assert zp[0x1EF] == 0  # sentinel
    assert zp[0x1E8] == len(E820_QEMU)
    table = [struct.unpack_from("<QQI", zp, 0x2D0 + 20 * i) for i in range(len(E820_QEMU))]
    assert table == [(e.start, e.size, e.type) for e in E820_QEMU]
    assert zp[0x2D0 + 20 * len(E820_QEMU) : 0x2D0 + 20 * 128] == bytes(20 * (128 - len(E820_QEMU)))


def test_zero_page_high_addresses():
    e820 = [E820Entry(0x100000, 0x40000000, 1), E820Entry(1 << 32, (1 << 32) + 64 * MiB, 1)]
    zp = loader.zero_page(make_bzimage(), kernel_addr=0x1000000, initrd_addr=(1 << 32) + 0x5000,
                          initrd_size=0x1000, cmdline_addr=(3 << 32) + 0x10, e820=e820)
    assert struct.unpack_from("<II", zp, 0x218) == (0x5000, 0x1000)
    assert struct.unpack_from("<II", zp, 0x0C0) == (1, 0)
    assert struct.unpack_from("<I", zp, 0x228)[0] == 0x10 and struct.unpack_from("<I", zp, 0x0C8)[0] == 3


def test_zero_page_e820_limit():
    e820 = [E820Entry(0x100000 + i * 8192, 0x100000 + i * 8192 + 4096, 1) for i in range(129)]
    with pytest.raises(LoaderError, match="129 entries"):
        loader.zero_page(make_bzimage(), kernel_addr=0, initrd_addr=0, initrd_size=0, cmdline_addr=0, e820=e820)


def _params(blob):
    at = blob.find(loader.PURGATORY_MAGIC)
    _, entry, zp, n = struct.unpack_from("<8sQQQ", blob, at)
    regions = [struct.unpack_from("<QQ32s", blob, at + 32 + 48 * i) for i in range(n)]
    return entry, zp, regions


def test_purgatory_patched_digests():
    data, image = _image()
    blob = image.segment("purgatory").buf
    assert len(blob) == len(FAKE_PURGATORY)
    entry, zp, regions = _params(blob)
    assert entry == image.kernel_addr + 0x200 and zp == image.zero_page_addr
    by_addr = {s.mem: s for s in image.segments}
    assert {r[0] for r in regions} == {image.kernel_addr, image.initrd_addr, image.zero_page_addr}
    for addr, length, digest in regions:
        buf = bytes(by_addr[addr].buf)
        assert length == len(buf) and digest == hashlib.sha256(buf).digest()


def test_purgatory_bad_blob():
    with pytest.raises(LoaderError, match="parameter block"):
        loader.patch_purgatory(b"\0" * 100, entry=0, zero_page_addr=0, regions=[])
    with pytest.raises(LoaderError, match="takes 8"):
        loader.patch_purgatory(FAKE_PURGATORY, entry=0, zero_page_addr=0, regions=[(0, b"")] * 9)


def test_built_purgatory(purgatory_bin):
    """The real blob: starts with cli; cld, has one parameter block, and the layout patches it."""
    assert purgatory_bin[:2] == b"\xfa\xfc"
    assert purgatory_bin.count(loader.PURGATORY_MAGIC) == 1
    _, image = _image(purgatory=purgatory_bin)
    entry, _, regions = _params(image.segment("purgatory").buf)
    assert entry == image.kernel_addr + 0x200 and len(regions) == 3


def test_purgatory_sha256_matches_hashlib(tmp_path):
    """The purgatory's C SHA-256, compiled for the host, against hashlib at the padding edges."""
    src = tmp_path / "t.c"
    src.write_text("""
#include <stdio.h>
#include <stdlib.h>
void sha256(const unsigned char *d, unsigned long n, unsigned char o[32]);
int main(int c, char **v) { unsigned long n = strtoul(v[1], 0, 10), i; unsigned char *b = malloc(n + 1), o[32];
  for (i = 0; i < n; i++) b[i] = (unsigned char)(i * 7 + 3);
  sha256(b, n, o); for (i = 0; i < 32; i++) printf("%02x", o[i]); printf("\\n"); return 0; }
""")
    exe = tmp_path / "t"
    proc = subprocess.run(["gcc", "-O2", "-o", str(exe), str(src), str(ROOT / "csrc/purgatory/purgatory.c")],
                          capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"no host gcc: {proc.stderr[-200:]}")
    for n in (0, 1, 55, 56, 63, 64, 65, 119, 120, 128, 1000, 70001):
        out = subprocess.run([str(exe), str(n)], capture_output=True, text=True, check=True).stdout.strip()
        assert out == hashlib.sha256(bytes((i * 7 + 3) & 255 for i in range(n))).hexdigest(), n


# -- load_kernel in kexec_load mode ---------------------------------------------------------------------------


class FakeLinux:
    KEXEC_ARCH_DEFAULT = 0

    class KexecSegment(tuple):
        def __new__(cls, buf, mem, memsz):
            return tuple.__new__(cls, (buf, mem, memsz))

    def __init__(self):
        self.calls = []

    def kexec_file_load(self, *args):
        pytest.fail("mode 'load' (-c) must not use kexec_file_load")

    def kexec_load(self, entry, segments, flags):
        self.calls.append((entry, list(segments), flags))


def test_load_legacy(tmp_path, purgatory_bin):
    k = tmp_path / "vmlinuz"
    k.write_bytes(make_bzimage())
    r = tmp_path / "initrd"
    r.write_bytes(b"I" * 5000)
    fake = FakeLinux()
    root = memmap(tmp_path / "root", QEMU_512M)
    assert load_kernel(str(k), str(r), "quiet", "load", root=root, linux=fake) == "kexec_load"
    (entry, segs, flags), = fake.calls
    assert flags == 0 and len(segs) == 4
    purg = next(s for s in segs if s[1] == entry)
    assert bytes(purg[0][:2]) == b"\xfa\xfc"


def test_load_legacy_refuses_before_the_syscall(tmp_path):
    fake = FakeLinux()
    root = memmap(tmp_path / "root", QEMU_512M)
    with pytest.raises(KexecError, match="not a bzImage"):
        load_kernel("/etc/passwd", mode="load", root=root, linux=fake)
    k = tmp_path / "vmlinuz"
    k.write_bytes(make_bzimage())
    with pytest.raises(KexecError, match="no purgatory"):
        load_kernel(str(k), mode="load", root=root, purgatory=str(tmp_path / "none.bin"), linux=fake)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x90" * 4096)
    with pytest.raises(KexecError, match="parameter block"):
        load_kernel(str(k), mode="load", root=root, purgatory=str(junk), linux=fake)
    small = memmap(tmp_path / "small", [(0x100000, 0x17FFFFF, "System RAM")])
    with pytest.raises(KexecError, match="does not fit"):
        load_kernel(str(k), mode="load", root=small, linux=fake)
    assert fake.calls == []


def test_unload_falls_back_to_kexec_load_without_kexec_file():
    import errno

    from agent.errors import LinuxError

    class NoFileLoad(FakeLinux):
        KEXEC_FILE_UNLOAD = 1

        def kexec_file_load(self, *a):
            raise LinuxError(errno.ENOSYS, "kexec_file_unload")

    fake = NoFileLoad()
    assert load.unload(linux=fake) == "unloaded"
    assert fake.calls == [(0, [], 0)]
