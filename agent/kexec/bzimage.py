"""x86 bzImage kernels: parse the boot protocol setup header, pure (bytes in, values out).

A bzImage is the real-mode setup code (the boot sector plus `setup_sects` 512-byte sectors, with the setup header
at 0x1F1) followed by the protected-mode kernel (`syssize` 16-byte paragraphs; signed kernels may carry more bytes
after it). The field offsets are those of Documentation/arch/x86/boot.rst; all fields are little-endian.

For a 64-bit kexec we need boot protocol 2.12 or later: that is the version which added `xloadflags`, the field
that says whether the kernel has a 64-bit entry point (XLF_KERNEL_64, `startup_64` at 0x200 past the start of the
protected-mode kernel) and whether it and its initrd may be put above 4 GiB. Older headers cannot tell us either.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import KexecError

SECTOR = 512
BOOT_FLAG = 0xAA55
HDRS = b"HdrS"
MIN_VERSION = 0x020C  # 2.12: xloadflags
DEFAULT_SETUP_SECTS = 4  # setup_sects == 0 means 4
STARTUP_64 = 0x200  # 64-bit entry: protected-mode kernel start + 0x200

# loadflags
LOADED_HIGH = 1 << 0
KASLR_FLAG = 1 << 1
QUIET_FLAG = 1 << 5
KEEP_SEGMENTS = 1 << 6
CAN_USE_HEAP = 1 << 7

# xloadflags
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1
XLF_EFI_HANDOVER_32 = 1 << 2
XLF_EFI_HANDOVER_64 = 1 << 3
XLF_EFI_KEXEC = 1 << 4
XLF_5LEVEL = 1 << 5
XLF_5LEVEL_ENABLED = 1 << 6

# Offsets in the file (boot.rst, "The Real-Mode Kernel Header").
OFF_SETUP_SECTS = 0x1F1
OFF_BOOT_FLAG = 0x1FE
OFF_HEADER = 0x202
OFF_VERSION = 0x206
# From 0x1F1 to 0x26C (end of kernel_info_offset, protocol 2.15); for 2.12-2.14 the header ends at 0x268.
_HEADER = struct.Struct(
    "<"
    "B"  # 1F1 setup_sects
    "H"  # 1F2 root_flags
    "I"  # 1F4 syssize (16-byte paragraphs)
    "H"  # 1F8 ram_size
    "H"  # 1FA vid_mode
    "H"  # 1FC root_dev
    "H"  # 1FE boot_flag
    "H"  # 200 jump
    "4s"  # 202 header "HdrS"
    "H"  # 206 version
    "I"  # 208 realmode_swtch
    "H"  # 20C start_sys_seg
    "H"  # 20E kernel_version
    "B"  # 210 type_of_loader
    "B"  # 211 loadflags
    "H"  # 212 setup_move_size
    "I"  # 214 code32_start
    "I"  # 218 ramdisk_image
    "I"  # 21C ramdisk_size
    "I"  # 220 bootsect_kludge
    "H"  # 224 heap_end_ptr
    "B"  # 226 ext_loader_ver
    "B"  # 227 ext_loader_type
    "I"  # 228 cmd_line_ptr
    "I"  # 22C initrd_addr_max
    "I"  # 230 kernel_alignment
    "B"  # 234 relocatable_kernel
    "B"  # 235 min_alignment
    "H"  # 236 xloadflags
    "I"  # 238 cmdline_size
    "I"  # 23C hardware_subarch
    "Q"  # 240 hardware_subarch_data
    "I"  # 248 payload_offset
    "I"  # 24C payload_length
    "Q"  # 250 setup_data
    "Q"  # 258 pref_address
    "I"  # 260 init_size
    "I"  # 264 handover_offset
)
HEADER_END_212 = OFF_SETUP_SECTS + _HEADER.size  # 0x268
assert HEADER_END_212 == 0x268
OFF_KERNEL_INFO = 0x268  # 2.15+: kernel_info_offset (4 bytes)


class BzImageError(KexecError):
    """A kernel file is not a bzImage we can kexec (bad magic, too old, 32-bit only, truncated)."""


def version_str(version: int) -> str:
    return f"{version >> 8}.{version & 0xFF:02d}"


@dataclass(frozen=True)
class BzImage:
    version: int  # boot protocol, 0x020F for 2.15
    setup_sects: int  # after the 0 -> 4 rule
    syssize: int  # in 16-byte paragraphs
    loadflags: int
    relocatable_kernel: bool
    min_alignment: int  # log2; 2.10+
    xloadflags: int
    kernel_alignment: int
    pref_address: int
    init_size: int  # linear memory the kernel needs from its load address while it decompresses itself
    initrd_addr_max: int  # highest address the initrd's last byte may have (ignored with XLF_CAN_BE_LOADED_ABOVE_4G)
    cmdline_size: int  # longest command line, without the terminating NUL
    handover_offset: int
    payload_offset: int  # the compressed vmlinux inside the protected-mode kernel
    payload_length: int
    kernel_info_offset: int  # 2.15+, else 0
    kernel_version_offset: int  # 0x20E field: offset of the version string minus 0x200, 0 if none
    file_size: int
    kernel_version: str  # the "6.1.0-... (...)" string the header points to, "" if none

    @property
    def version_string(self) -> str:
        return version_str(self.version)

    @property
    def setup_size(self) -> int:
        """Bytes of real-mode code at the start of the file: the boot sector plus the setup sectors."""
        return (self.setup_sects + 1) * SECTOR

    @property
    def kernel_offset(self) -> int:
        """Where the protected-mode kernel starts in the file."""
        return self.setup_size

    @property
    def kernel_size(self) -> int:
        """Bytes of protected-mode kernel (syssize paragraphs); a signature may follow in the file."""
        return self.syssize * 16

    @property
    def entry64_offset(self) -> int:
        """The 64-bit entry point (startup_64) relative to where the protected-mode kernel is loaded."""
        return STARTUP_64

    @property
    def loaded_high(self) -> bool:
        return bool(self.loadflags & LOADED_HIGH)

    @property
    def kernel_64(self) -> bool:
        return bool(self.xloadflags & XLF_KERNEL_64)

    @property
    def above_4g(self) -> bool:
        return bool(self.xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G)

    @property
    def efi_kexec(self) -> bool:
        return bool(self.xloadflags & XLF_EFI_KEXEC)

    def check_cmdline(self, cmdline: str) -> bytes:
        """The command line as the NUL-terminated bytes the kernel gets; BzImageError if it holds a NUL or is longer
        than this kernel takes (cmdline_size)."""
        raw = cmdline.encode("utf-8", "surrogateescape")
        if b"\0" in raw:
            raise BzImageError("the command line holds a NUL byte")
        if self.cmdline_size and len(raw) > self.cmdline_size:
            raise BzImageError(f"command line is {len(raw)} bytes, the kernel takes at most {self.cmdline_size}")
        return raw + b"\0"

    def kernel(self, data: bytes) -> memoryview:
        """The protected-mode kernel out of the file `data` this header was parsed from (no copy)."""
        return memoryview(data)[self.kernel_offset : self.kernel_offset + self.kernel_size]

    def memory_needed(self) -> int:
        """Bytes to reserve at the kernel's load address: init_size, at least the kernel itself, aligned up."""
        need = max(self.init_size, self.kernel_size)
        align = self.kernel_alignment or 1
        return -(-need // align) * align


def parse_bzimage(data: bytes) -> BzImage:
    """Parse and validate the setup header of a bzImage held in `data` (the whole file, or at least its setup
    code plus the protected-mode kernel). Raises BzImageError with a one-line reason."""
    size = len(data)
    if size < OFF_HEADER + 6:
        raise BzImageError(f"not a bzImage: file is only {size} bytes")
    if data[OFF_HEADER : OFF_HEADER + 4] != HDRS:
        raise BzImageError("not a bzImage (no HdrS signature)")
    (boot_flag,) = struct.unpack_from("<H", data, OFF_BOOT_FLAG)
    if boot_flag != BOOT_FLAG:
        raise BzImageError(f"not a bzImage (boot flag is 0x{boot_flag:04x}, not 0xaa55)")
    (version,) = struct.unpack_from("<H", data, OFF_VERSION)
    if version < MIN_VERSION:
        raise BzImageError(
            f"boot protocol {version_str(version)} is too old for kexec (need {version_str(MIN_VERSION)}: "
            "older headers cannot say whether the kernel has a 64-bit entry point)"
        )
    header_end = OFF_KERNEL_INFO + 4 if version >= 0x020F else HEADER_END_212
    if size < header_end:
        raise BzImageError(
            f"truncated bzImage: {size} bytes, the protocol {version_str(version)} header ends at {header_end}"
        )
    f = _HEADER.unpack_from(data, OFF_SETUP_SECTS)
    (setup_sects, _root_flags, syssize, _ram, _vid, _root_dev, _flag, _jump, _hdrs, _ver, _swtch, _sys_seg,
     kver_off, _loader, loadflags, _move, _code32, _rd_image, _rd_size, _kludge, _heap, _ext_ver, _ext_type,
     _cmd_ptr, initrd_addr_max, kernel_alignment, relocatable, min_alignment, xloadflags, cmdline_size,
     _subarch, _subarch_data, payload_offset, payload_length, _setup_data, pref_address, init_size,
     handover_offset) = f
    kernel_info_offset = struct.unpack_from("<I", data, OFF_KERNEL_INFO)[0] if version >= 0x020F else 0
    if setup_sects == 0:
        setup_sects = DEFAULT_SETUP_SECTS
    setup_size = (setup_sects + 1) * SECTOR
    if setup_size > size:
        raise BzImageError(f"truncated bzImage: {setup_sects} setup sectors need {setup_size} bytes, file has {size}")
    if syssize == 0:
        raise BzImageError("bad bzImage: syssize is 0 (no protected-mode kernel)")
    kernel_end = setup_size + syssize * 16
    if kernel_end > size:
        raise BzImageError(
            f"truncated bzImage: setup ({setup_size} bytes) + kernel ({syssize * 16} bytes) = {kernel_end} bytes, "
            f"file has {size}"
        )
    if not xloadflags & XLF_KERNEL_64:
        raise BzImageError("not a 64-bit kernel (xloadflags lacks XLF_KERNEL_64)")
    if not loadflags & LOADED_HIGH:
        raise BzImageError("not a bzImage: zImage kernels (loaded at 0x10000, not LOADED_HIGH) are not supported")
    if kernel_alignment and kernel_alignment & (kernel_alignment - 1):
        raise BzImageError(f"bad bzImage: kernel_alignment 0x{kernel_alignment:x} is not a power of two")
    if payload_offset + payload_length > syssize * 16:
        raise BzImageError(
            f"bad bzImage: payload {payload_offset}+{payload_length} runs past the {syssize * 16}-byte kernel"
        )
    return BzImage(
        version=version,
        setup_sects=setup_sects,
        syssize=syssize,
        loadflags=loadflags,
        relocatable_kernel=bool(relocatable),
        min_alignment=min_alignment,
        xloadflags=xloadflags,
        kernel_alignment=kernel_alignment,
        pref_address=pref_address,
        init_size=init_size,
        initrd_addr_max=initrd_addr_max,
        cmdline_size=cmdline_size,
        handover_offset=handover_offset,
        payload_offset=payload_offset,
        payload_length=payload_length,
        kernel_info_offset=kernel_info_offset,
        kernel_version_offset=kver_off,
        file_size=size,
        kernel_version=_kernel_version(data, kver_off, setup_size),
    )


def _kernel_version(data: bytes, kver_off: int, setup_size: int) -> str:
    """The NUL-terminated version string at kernel_version + 0x200, if it lies inside the setup code."""
    if not kver_off:
        return ""
    start = kver_off + 0x200
    if start >= setup_size:
        return ""
    end = data.find(b"\0", start, setup_size)
    if end < 0:
        return ""
    return data[start:end].decode("ascii", "replace")


def fits_in_memory(bz: BzImage, initrd_size: int, ram_ranges: list[tuple[int, int]]) -> str | None:
    """Can the kernel and an initrd of `initrd_size` bytes be placed in the usable RAM `ram_ranges` (half-open
    [start, end) byte ranges, e.g. the System RAM of /proc/iomem)? Returns None if they fit, else a one-line
    reason. The kernel needs `memory_needed()` bytes at an address aligned to kernel_alignment (at or above
    pref_address if it is not relocatable); the initrd must end below initrd_addr_max + 1 unless the kernel
    accepts it above 4 GiB. The two must not overlap; the first fit is taken for each, kernel first."""
    ranges = sorted((s, e) for s, e in ram_ranges if e > s)
    need = bz.memory_needed()
    align = bz.kernel_alignment or 1
    kernel_at = None
    for start, end in ranges:
        lo = max(start, bz.pref_address) if not bz.relocatable_kernel else max(start, 0x100000)
        at = -(-lo // align) * align
        if not bz.relocatable_kernel and at != bz.pref_address:
            continue
        if at + need <= end:
            kernel_at = (at, at + need)
            break
    if kernel_at is None:
        where = "anywhere" if bz.relocatable_kernel else f"at 0x{bz.pref_address:x}"
        return f"no room for the kernel: it needs {need} bytes {where} (alignment 0x{align:x})"
    if initrd_size <= 0:
        return None
    limit = (1 << 64) if bz.above_4g else bz.initrd_addr_max + 1
    for start, end in ranges:
        end = min(end, limit)
        # the part of this range before the kernel, then the part after it
        for s, e in ((start, min(end, kernel_at[0])), (max(start, kernel_at[1]), end)):
            at = -(-s // 4096) * 4096
            if at + initrd_size <= e:
                return None
    return f"no room for a {initrd_size}-byte initrd below 0x{limit:x} beside the kernel"
