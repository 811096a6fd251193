"""agent.kexec.bzimage: synthetic setup headers built here from the offsets of Documentation/arch/x86/boot.rst,
and one real Debian kernel (downloaded once with `apt-get download` into the cache, never installed)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from staticbuild.debian_kernel import fetch_debian_kernel

from agent.errors import NodeagentError
from agent.kexec.bzimage import (
    XLF_CAN_BE_LOADED_ABOVE_4G,
    XLF_KERNEL_64,
    BzImage,
    BzImageError,
    fits_in_memory,
    parse_bzimage,
)

MiB = 1 << 20


def make_bzimage(
    *,
    version=0x020F,
    setup_sects=27,
    kernel_bytes=64 * 1024,
    syssize=None,
    loadflags=0x01,
    relocatable=1,
    xloadflags=XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G,
    kernel_alignment=0x200000,
    pref_address=0x1000000,
    init_size=0x2000000,
    initrd_addr_max=0x7FFFFFFF,
    cmdline_size=2047,
    handover_offset=0x190,
    payload=(0x3A0, 0x1000),
    kernel_info_offset=0x1234,
    boot_flag=0xAA55,
    magic=b"HdrS",
    version_string=b"6.1.0-test (builder@example) #1 SMP",
) -> bytes:
    real_sects = setup_sects or 4
    setup = bytearray((real_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    struct.pack_into("<I", setup, 0x1F4, (kernel_bytes + 15) // 16 if syssize is None else syssize)
    struct.pack_into("<H", setup, 0x1FE, boot_flag)
    setup[0x200] = 0xEB  # jmp short over the header
    setup[0x201] = 0x6A
    setup[0x202:0x206] = magic
    struct.pack_into("<H", setup, 0x206, version)
    if version_string:
        at = 0x300
        setup[at : at + len(version_string) + 1] = version_string + b"\0"
        struct.pack_into("<H", setup, 0x20E, at - 0x200)
    setup[0x211] = loadflags
    struct.pack_into("<I", setup, 0x214, 0x100000)  # code32_start
    struct.pack_into("<I", setup, 0x22C, initrd_addr_max)
    struct.pack_into("<I", setup, 0x230, kernel_alignment)
    setup[0x234] = relocatable
    setup[0x235] = 21  # min_alignment
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    struct.pack_into("<II", setup, 0x248, *payload)
    struct.pack_into("<Q", setup, 0x258, pref_address)
    struct.pack_into("<I", setup, 0x260, init_size)
    struct.pack_into("<I", setup, 0x264, handover_offset)
    struct.pack_into("<I", setup, 0x268, kernel_info_offset)
    kernel = bytes(range(256)) * (kernel_bytes // 256) + b"\x90" * (kernel_bytes % 256)
    return bytes(setup) + kernel


# -- synthetic headers ---------------------------------------------------------------------------------------


def test_valid_header():
    data = make_bzimage()
    bz = parse_bzimage(data)
    assert isinstance(bz, BzImage)
    assert bz.version == 0x020F and bz.version_string == "2.15"
    assert bz.setup_sects == 27
    assert bz.setup_size == 28 * 512 == bz.kernel_offset
    assert bz.syssize == 64 * 1024 // 16
    assert bz.kernel_size == 64 * 1024
    assert bz.kernel_offset + bz.kernel_size == len(data) == bz.file_size
    assert bytes(bz.kernel(data)) == data[28 * 512 :]
    assert bz.entry64_offset == 0x200
    assert bz.loaded_high and bz.kernel_64 and bz.above_4g and not bz.efi_kexec
    assert bz.relocatable_kernel is True
    assert bz.min_alignment == 21
    assert bz.kernel_alignment == 0x200000
    assert bz.pref_address == 0x1000000
    assert bz.init_size == 0x2000000
    assert bz.initrd_addr_max == 0x7FFFFFFF
    assert bz.cmdline_size == 2047
    assert bz.handover_offset == 0x190
    assert (bz.payload_offset, bz.payload_length) == (0x3A0, 0x1000)
    assert bz.kernel_info_offset == 0x1234
    assert bz.kernel_version == "6.1.0-test (builder@example) #1 SMP"
    assert bz.memory_needed() == 0x2000000


def test_setup_sects_zero_means_four():
    bz = parse_bzimage(make_bzimage(setup_sects=0))
    assert bz.setup_sects == 4 and bz.setup_size == 5 * 512


def test_protocol_212_has_no_kernel_info():
    bz = parse_bzimage(make_bzimage(version=0x020C))
    assert bz.version_string == "2.12" and bz.kernel_info_offset == 0


def test_signature_after_kernel_is_allowed():
    data = make_bzimage() + b"~Module signature appended~\n" + b"\0" * 100
    bz = parse_bzimage(data)
    assert bz.kernel_offset + bz.kernel_size < len(data)
    assert len(bz.kernel(data)) == bz.kernel_size


def test_memory_needed_rounds_up_to_alignment():
    bz = parse_bzimage(make_bzimage(init_size=0x2000001))
    assert bz.memory_needed() == 0x2200000


def _err(data) -> str:
    with pytest.raises(BzImageError) as info:
        parse_bzimage(data)
    assert isinstance(info.value, NodeagentError)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize(
    "data, expected",
    [
        (make_bzimage(magic=b"HdrX"), "not a bzImage (no HdrS signature)"),
        (b"\x7fELF" + bytes(4096), "not a bzImage (no HdrS signature)"),
        (make_bzimage(boot_flag=0x1234), "not a bzImage (boot flag is 0x1234, not 0xaa55)"),
        (make_bzimage(version=0x0203), "boot protocol 2.03 is too old for kexec (need 2.12"),
        (make_bzimage(version=0x020B), "boot protocol 2.11 is too old for kexec (need 2.12"),
        (make_bzimage(xloadflags=0), "not a 64-bit kernel"),
        (make_bzimage(xloadflags=XLF_CAN_BE_LOADED_ABOVE_4G), "not a 64-bit kernel"),
        (make_bzimage(loadflags=0), "not LOADED_HIGH"),
        (make_bzimage(kernel_alignment=0x300000), "kernel_alignment 0x300000 is not a power of two"),
        (make_bzimage(syssize=0), "syssize is 0"),
        (make_bzimage(payload=(0x100, 64 * 1024)), "payload 256+65536 runs past the 65536-byte kernel"),
    ],
)
def test_bad_headers(data, expected):
    assert expected in _err(data)


def test_old_protocol_message_says_why():
    assert "64-bit entry point" in _err(make_bzimage(version=0x0203))


def test_truncated():
    data = make_bzimage()
    assert "only 100 bytes" in _err(data[:100])
    assert _err(b"") == "not a bzImage: file is only 0 bytes"
    assert "header ends at 620" in _err(data[:0x260])  # 2.15 header ends at 0x26C
    assert "27 setup sectors need 14336 bytes, file has 4096" in _err(data[:4096])
    assert "setup (14336 bytes) + kernel (65536 bytes) = 79872 bytes, file has 79871" in _err(data[:-1])


def test_setup_sects_past_file():
    data = make_bzimage(setup_sects=27)
    data = data[:0x1F1] + bytes([200]) + data[0x1F2:]
    assert "200 setup sectors need 102912 bytes" in _err(data)


def test_one_setup_sector():
    # the smallest setup (boot sector + 1 sector, 1024 bytes) still holds the whole header (it ends at 0x26C)
    bz = parse_bzimage(make_bzimage(setup_sects=1))
    assert bz.setup_size == 1024


def test_fits_in_memory():
    bz = parse_bzimage(make_bzimage())
    big = [(0x100000, 0x80000000)]
    assert fits_in_memory(bz, 16 * MiB, big) is None
    assert fits_in_memory(bz, 0, [(0x200000, 0x200000 + 32 * MiB)]) is None
    assert "no room for the kernel" in fits_in_memory(bz, 0, [(0x100000, 0x100000 + 32 * MiB)])  # alignment
    assert "no room for the kernel" in fits_in_memory(bz, 0, [(0x100000, 0x100000 + 16 * MiB)])
    assert "initrd" in fits_in_memory(bz, 64 * MiB, [(0x200000, 0x200000 + 40 * MiB)])
    # initrd only above 4 GiB: refused when the kernel cannot take it there
    ranges = [(0x200000, 0x200000 + 32 * MiB), (1 << 32, (1 << 32) + 256 * MiB)]
    assert fits_in_memory(bz, 64 * MiB, ranges) is None
    low = parse_bzimage(make_bzimage(xloadflags=XLF_KERNEL_64))
    assert "below 0x80000000" in fits_in_memory(low, 64 * MiB, ranges)


# -- a real kernel ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def debian_kernel() -> Path:
    """/boot/vmlinuz-* of Debian's current amd64 kernel, extracted (not installed) into
    ${NODEAGENT_CACHE:-~/.cache/nodeagent}/kernel/PACKAGE/ (see debian_kernel.py)."""
    return fetch_debian_kernel(with_modules=False).vmlinuz


def test_real_debian_kernel(debian_kernel):
    data = debian_kernel.read_bytes()
    bz = parse_bzimage(data)
    assert bz.version >= 0x020F, bz.version_string
    assert bz.kernel_64 and bz.above_4g and bz.loaded_high
    assert bz.relocatable_kernel
    assert bz.setup_sects >= 4
    assert bz.kernel_offset + bz.kernel_size <= len(data)
    assert len(data) - (bz.kernel_offset + bz.kernel_size) < 64 * 1024  # at most a signature after the kernel
    assert bz.init_size > bz.kernel_size
    assert bz.payload_length > 0 and bz.payload_offset + bz.payload_length <= bz.kernel_size
    assert bz.kernel_alignment >= 0x200000 and bz.kernel_alignment & (bz.kernel_alignment - 1) == 0
    assert bz.pref_address >= 0x1000000
    assert bz.cmdline_size >= 2047
    assert bz.initrd_addr_max >= 0x37FFFFFF
    assert bz.handover_offset > 0  # Debian's kernels are EFI stub kernels
    # the version string in the header names the same release as the file name
    release = debian_kernel.name.removeprefix("vmlinuz-")
    assert bz.kernel_version.startswith(release + " "), (bz.kernel_version, release)
    assert fits_in_memory(bz, 64 * MiB, [(0x100000, 0x80000000)]) is None
