"""The legacy kexec_load path, x86_64: lay out the segments ourselves. Pure: bytes and numbers in, segments out.

kexec_load(2) copies segments to physical addresses and, on reboot(KEXEC), jumps to an entry point in 64-bit mode on
page tables that identity-map RAM (the kernel's relocate_kernel). What we give it:

* the protected-mode kernel (the bzImage after its setup sectors) at an address aligned to kernel_alignment,
  pref_address when that is free, with init_size bytes reserved (memsz) for its in-place decompression;
* the initrd, page-aligned, as high as possible below initrd_addr_max (above it only if the kernel takes an initrd
  above 4 GiB and nothing lower fits);
* the boot parameters: the zero page (struct boot_params, Documentation/arch/x86/zero-page.rst) with the bzImage's
  setup header copied in at 0x1F1 and our fields set, followed by the NUL-terminated command line;
* our purgatory (csrc/purgatory/, built into agent/kexec/purgatory.bin): it loads a GDT with the 0x10/0x18 flat
  selectors the 64-bit boot protocol asks for, takes its own stack, checks the SHA-256 of the kernel, initrd and
  boot-parameter segments against the digests patched into it (halts on a mismatch) and jumps to the kernel's
  64-bit entry (load address + 0x200) with RSI = the zero page. The entry point we pass is its first byte.

Everything is placed inside "System RAM" of the firmware memory map (/sys/firmware/memmap, read by the caller:
agent.linux_files), above 1 MiB, without overlaps; the same map becomes the zero page's e820 table. The caller also
hands in the purgatory's bytes and the command line it has checked (BzImage.check_cmdline).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from ..errors import KexecError
from .bzimage import CAN_USE_HEAP, KASLR_FLAG, KEEP_SEGMENTS, LOADED_HIGH, OFF_SETUP_SECTS, BzImage

PAGE = 4096
LOW_LIMIT = 0x100000  # nothing below 1 MiB: real-mode area, BIOS data
FOUR_G = 1 << 32

# e820 types (arch/x86/include/uapi/asm/e820.h / the names the kernel gives them in /sys/firmware/memmap)
E820_RAM, E820_RESERVED, E820_ACPI, E820_NVS, E820_UNUSABLE, E820_PMEM, E820_PRAM = 1, 2, 3, 4, 5, 7, 12
E820_SOFT_RESERVED = 0xEFFFFFFF
MEMMAP_TYPES = {
    "System RAM": E820_RAM,
    "Reserved": E820_RESERVED,
    "ACPI Tables": E820_ACPI,
    "ACPI Non-volatile Storage": E820_NVS,
    "Unusable memory": E820_UNUSABLE,
    "Persistent Memory": E820_PMEM,
    "Persistent Memory (legacy)": E820_PRAM,
    "Soft Reserved": E820_SOFT_RESERVED,
}

# struct boot_params (zero-page.rst)
ZERO_PAGE_SIZE = 4096
ZP_EXT_RAMDISK_IMAGE = 0x0C0
ZP_EXT_RAMDISK_SIZE = 0x0C4
ZP_EXT_CMD_LINE_PTR = 0x0C8
ZP_E820_ENTRIES = 0x1E8
ZP_SENTINEL = 0x1EF
ZP_HDR = OFF_SETUP_SECTS  # 0x1F1
ZP_E820_TABLE = 0x2D0
E820_MAX = 128
E820_ENTRY = struct.Struct("<QQI")  # addr, size, type: 20 bytes
# setup header fields (boot.rst), as offsets in the zero page
HDR_TYPE_OF_LOADER = 0x210
HDR_LOADFLAGS = 0x211
HDR_CODE32_START = 0x214
HDR_RAMDISK_IMAGE = 0x218
HDR_RAMDISK_SIZE = 0x21C
HDR_HEAP_END_PTR = 0x224
HDR_EXT_LOADER_VER = 0x226
HDR_CMD_LINE_PTR = 0x228
HDR_HARDWARE_SUBARCH = 0x23C
HDR_SETUP_DATA = 0x250
LOADER_UNDEFINED = 0xFF

# purgatory parameter block (struct params in csrc/purgatory/purgatory.c)
PURGATORY_MAGIC = b"NAPURG01"
PURGATORY_MAX_REGIONS = 8
_P_HEAD = struct.Struct("<8sQQQ")  # magic, entry, zero_page, nregions
_P_REGION = struct.Struct("<QQ32s")  # start, len, sha256


class LoaderError(KexecError):
    """The kernel, initrd and boot parameters cannot be laid out for kexec_load (no room, bad purgatory...)."""


@dataclass(frozen=True)
class E820Entry:
    start: int
    end: int  # exclusive
    type: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Segment:
    name: str  # "kernel", "initrd", "bootparams", "purgatory"
    buf: bytes | memoryview
    mem: int  # page-aligned physical address
    memsz: int  # page multiple, >= len(buf)

    @property
    def end(self) -> int:
        return self.mem + self.memsz


@dataclass(frozen=True)
class LegacyImage:
    entry: int  # the purgatory's first byte
    segments: list[Segment]  # sorted by address
    kernel_addr: int
    initrd_addr: int  # 0 without initrd
    zero_page_addr: int
    cmdline_addr: int
    purgatory_addr: int

    def segment(self, name: str) -> Segment:
        return next(s for s in self.segments if s.name == name)


def _page_up(n: int) -> int:
    return -(-n // PAGE) * PAGE


# -- the memory map -------------------------------------------------------------------------------------------


def e820_from_memmap(ranges) -> list[E820Entry]:
    """The firmware memory map (agent.linux_files.MemoryRange: start, exclusive end, the kernel's type name) as
    E820Entry, sorted; unknown type names become E820_RESERVED."""
    entries = [E820Entry(r.start, r.end, MEMMAP_TYPES.get(r.type, E820_RESERVED)) for r in ranges if r.end > r.start]
    return sorted(entries, key=lambda e: (e.start, e.end))


# -- placement ------------------------------------------------------------------------------------------------


class _Free:
    """Free RAM as sorted half-open ranges; take() removes what is allocated."""

    def __init__(self, e820: list[E820Entry]):
        self.ranges = sorted((max(e.start, LOW_LIMIT), e.end) for e in e820
                             if e.type == E820_RAM and e.end > max(e.start, LOW_LIMIT))
        # RAM that a reserved entry overlaps is not free (overlapping maps are a firmware bug, but be safe)
        for e in e820:
            if e.type != E820_RAM:
                self.take(e.start, e.end)

    def fits(self, at: int, size: int) -> bool:
        return any(s <= at and at + size <= e for s, e in self.ranges)

    def find(self, size: int, align: int, lo: int = 0, hi: int = 1 << 64, top_down: bool = False) -> int | None:
        best = None
        for s, e in self.ranges:
            s, e = max(s, lo), min(e, hi)
            if top_down:
                at = (e - size) // align * align
                if at >= s and (best is None or at > best):
                    best = at
            else:
                at = -(-s // align) * align
                if at + size <= e:
                    return at
        return best

    def take(self, start: int, end: int) -> None:
        out = []
        for s, e in self.ranges:
            if e <= start or s >= end:
                out.append((s, e))
                continue
            if s < start:
                out.append((s, start))
            if end < e:
                out.append((end, e))
        self.ranges = out


def place(bz: BzImage, initrd_size: int, params_size: int, purgatory_size: int,
          e820: list[E820Entry]) -> dict[str, tuple[int, int]]:
    """Choose (address, memsz) for "kernel", "initrd" (if initrd_size), "bootparams" and "purgatory" inside the
    RAM of `e820`, above 1 MiB, without overlaps. Raises LoaderError when something does not fit."""
    free = _Free(e820)
    total = sum(e - s for s, e in free.ranges)
    out = {}

    def take(name, at, size):
        free.take(at, at + size)
        out[name] = (at, size)

    # the kernel: init_size (at least the kernel), aligned; pref_address if possible
    align = max(bz.kernel_alignment or 1, PAGE)
    need = _page_up(bz.memory_needed())
    hi = 1 << 64 if bz.above_4g else FOUR_G
    if bz.pref_address and bz.pref_address % align == 0 and free.fits(bz.pref_address, need):
        at = bz.pref_address
    elif not bz.relocatable_kernel:
        raise LoaderError(f"no room for the kernel at its fixed address 0x{bz.pref_address:x} "
                          f"({need} bytes; {total >> 20} MiB of RAM above 1 MiB)")
    else:
        at = free.find(need, align, hi=hi)
        if at is None:
            raise LoaderError(f"no room for the kernel: it needs {need} bytes aligned to 0x{align:x} "
                              f"({total >> 20} MiB of RAM above 1 MiB)")
    take("kernel", at, need)

    if initrd_size:
        size = _page_up(initrd_size)
        limit = bz.initrd_addr_max + 1
        at = free.find(size, PAGE, hi=limit, top_down=True)
        if at is None and bz.above_4g:
            at = free.find(size, PAGE, top_down=True)
        if at is None:
            raise LoaderError(f"no room for a {initrd_size}-byte initrd below 0x{limit:x} beside the kernel")
        take("initrd", at, size)

    for name, size in (("bootparams", params_size), ("purgatory", purgatory_size)):
        size = _page_up(size)
        at = free.find(size, PAGE, hi=FOUR_G)
        if at is None:
            raise LoaderError(f"no room below 4 GiB for the {size}-byte {name}")
        take(name, at, size)
    return out


# -- the zero page --------------------------------------------------------------------------------------------


def setup_header(kernel_data: bytes) -> bytes:
    """The bzImage's setup header, from 0x1F1 to its end (0x202 + the byte at 0x201, the jump over it), capped
    below the e820 table."""
    end = min(0x202 + kernel_data[0x201], ZP_E820_TABLE)
    return bytes(kernel_data[ZP_HDR:end])


def zero_page(kernel_data: bytes, *, kernel_addr: int, initrd_addr: int, initrd_size: int, cmdline_addr: int,
              e820: list[E820Entry]) -> bytes:
    """struct boot_params for the new kernel: the setup header copied from the bzImage, then type_of_loader 0xFF,
    loadflags (LOADED_HIGH; no heap, no KEEP_SEGMENTS), code32_start, the ramdisk and command line pointers (low 32
    bits in the header, high bits in ext_*), e820_entries and e820_table."""
    if len(e820) > E820_MAX:
        raise LoaderError(f"the memory map has {len(e820)} entries, the zero page holds {E820_MAX}")
    zp = bytearray(ZERO_PAGE_SIZE)
    hdr = setup_header(kernel_data)
    zp[ZP_HDR : ZP_HDR + len(hdr)] = hdr
    zp[ZP_SENTINEL] = 0
    zp[HDR_TYPE_OF_LOADER] = LOADER_UNDEFINED
    zp[HDR_LOADFLAGS] = (zp[HDR_LOADFLAGS] | LOADED_HIGH) & ~(CAN_USE_HEAP | KEEP_SEGMENTS | KASLR_FLAG) & 0xFF
    struct.pack_into("<I", zp, HDR_CODE32_START, kernel_addr & 0xFFFFFFFF)
    struct.pack_into("<H", zp, HDR_HEAP_END_PTR, 0)
    zp[HDR_EXT_LOADER_VER] = zp[HDR_EXT_LOADER_VER + 1] = 0
    struct.pack_into("<IQ", zp, HDR_HARDWARE_SUBARCH, 0, 0)
    struct.pack_into("<Q", zp, HDR_SETUP_DATA, 0)
    struct.pack_into("<II", zp, HDR_RAMDISK_IMAGE, initrd_addr & 0xFFFFFFFF, initrd_size & 0xFFFFFFFF)
    struct.pack_into("<II", zp, ZP_EXT_RAMDISK_IMAGE, initrd_addr >> 32, initrd_size >> 32)
    struct.pack_into("<I", zp, HDR_CMD_LINE_PTR, cmdline_addr & 0xFFFFFFFF)
    struct.pack_into("<I", zp, ZP_EXT_CMD_LINE_PTR, cmdline_addr >> 32)
    zp[ZP_E820_ENTRIES] = len(e820)
    for i, e in enumerate(e820):
        E820_ENTRY.pack_into(zp, ZP_E820_TABLE + i * E820_ENTRY.size, e.start, e.size, e.type)
    return bytes(zp)


# -- the purgatory --------------------------------------------------------------------------------------------


def patch_purgatory(blob: bytes, *, entry: int, zero_page_addr: int,
                    regions: list[tuple[int, bytes | memoryview]]) -> bytes:
    """The purgatory with its parameter block filled: the kernel entry, the zero page (RSI), and for each region
    (address, contents) its address, length and SHA-256."""
    if len(regions) > PURGATORY_MAX_REGIONS:
        raise LoaderError(f"{len(regions)} regions to check, the purgatory takes {PURGATORY_MAX_REGIONS}")
    at = blob.find(PURGATORY_MAGIC)
    if at < 0 or blob.find(PURGATORY_MAGIC, at + 1) >= 0:
        raise LoaderError("purgatory: no unique parameter block")
    end = at + _P_HEAD.size + PURGATORY_MAX_REGIONS * _P_REGION.size
    if end > len(blob):
        raise LoaderError("purgatory: parameter block truncated")
    out = bytearray(blob)
    _P_HEAD.pack_into(out, at, PURGATORY_MAGIC, entry, zero_page_addr, len(regions))
    for i, (addr, data) in enumerate(regions):
        _P_REGION.pack_into(out, at + _P_HEAD.size + i * _P_REGION.size, addr, len(data),
                            hashlib.sha256(data).digest())
    return bytes(out)


# -- all together ---------------------------------------------------------------------------------------------


def build_image(kernel_data: bytes, bz: BzImage, initrd: bytes | None, raw_cmdline: bytes, e820: list[E820Entry],
                purgatory: bytes) -> LegacyImage:
    """The kexec_load segments and entry point for kernel + initrd + command line on a machine with memory map e820.
    raw_cmdline is what bz.check_cmdline() returned (checked, NUL-terminated); purgatory the blob to patch."""
    if not raw_cmdline.endswith(b"\0"):
        raise LoaderError("the command line is not NUL-terminated (pass what BzImage.check_cmdline returns)")
    if not any(e.type == E820_RAM for e in e820):
        raise LoaderError("no System RAM in the memory map")
    initrd = initrd or b""
    where = place(bz, len(initrd), ZERO_PAGE_SIZE + len(raw_cmdline), len(purgatory), e820)
    kernel_addr, kernel_memsz = where["kernel"]
    initrd_addr = where["initrd"][0] if initrd else 0
    params_addr, params_memsz = where["bootparams"]
    purg_addr, purg_memsz = where["purgatory"]
    cmdline_addr = params_addr + ZERO_PAGE_SIZE
    zp = zero_page(kernel_data, kernel_addr=kernel_addr, initrd_addr=initrd_addr, initrd_size=len(initrd),
                   cmdline_addr=cmdline_addr, e820=e820)
    params = zp + raw_cmdline
    kernel = bz.kernel(kernel_data)
    regions = [(kernel_addr, kernel), (params_addr, params)] + ([(initrd_addr, initrd)] if initrd else [])
    blob = patch_purgatory(purgatory, entry=kernel_addr + bz.entry64_offset, zero_page_addr=params_addr,
                           regions=regions)
    segments = [Segment("kernel", kernel, kernel_addr, kernel_memsz),
                Segment("bootparams", params, params_addr, params_memsz),
                Segment("purgatory", blob, purg_addr, purg_memsz)]
    if initrd:
        segments.append(Segment("initrd", initrd, initrd_addr, where["initrd"][1]))
    segments.sort(key=lambda s: s.mem)
    return LegacyImage(entry=purg_addr, segments=segments, kernel_addr=kernel_addr, initrd_addr=initrd_addr,
                       zero_page_addr=params_addr, cmdline_addr=cmdline_addr, purgatory_addr=purg_addr)
