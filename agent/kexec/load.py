"""Load a kernel for kexec and start it: the thin shell around agent.linux's syscalls.

    load_file(kernel, initrd=None, cmdline="")  -> "loaded with kexec_file_load"   (checks everything first)
    load_legacy(kernel, initrd=None, cmdline="") -> "loaded with kexec_load"  (our own layout and purgatory: loader)
    unload()                                     unload what is loaded
    execute()                                    sync, then reboot(LINUX_REBOOT_CMD_KEXEC); returns only on error
    find_on_disk(device)                         -> (kernel file, initrd file or None, cmdline, what was found)

Every refusal we can foresee (missing or unreadable file, not a bzImage, kernel + initrd larger than RAM) is a
one-line KexecError raised before any system call.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import struct
import tempfile
from collections.abc import Callable

from ..errors import LinuxError, NodeagentError
from . import loader
from .bootcfg import RootFs, find_boot_entry
from .bzimage import BzImageError, fits_in_memory, parse_bzimage

MEMMAP = "/sys/firmware/memmap"
IOMEM = "/proc/iomem"


class KexecError(NodeagentError):
    """A kernel cannot be loaded or started (refused before the syscall, or the kernel said no)."""


class KexecFileRefused(KexecError):
    """kexec_file_load itself failed (ENOSYS, EPERM under lockdown, ENOEXEC...): kexec_load might still work."""

    def __init__(self, message: str, errno_: int):
        super().__init__(message)
        self.errno = errno_


# -- memory ---------------------------------------------------------------------------------------------------


def ram_ranges(memmap: str = MEMMAP, iomem: str = IOMEM) -> list[tuple[int, int]]:
    """Usable RAM as half-open [start, end) byte ranges: the firmware map's "System RAM" entries, or /proc/iomem's
    top-level "System RAM" lines when there is no /sys/firmware/memmap. Empty if neither can be read."""
    ranges = []
    try:
        names = sorted(os.listdir(memmap), key=lambda n: int(n) if n.isdigit() else -1)
    except OSError:
        names = []
    for name in names:
        d = os.path.join(memmap, name)
        try:
            with open(os.path.join(d, "type")) as f:
                kind = f.read().strip()
            if kind != "System RAM":
                continue
            with open(os.path.join(d, "start")) as f:
                start = int(f.read().strip(), 16)
            with open(os.path.join(d, "end")) as f:
                end = int(f.read().strip(), 16) + 1  # inclusive in sysfs
        except (OSError, ValueError):
            continue
        ranges.append((start, end))
    if ranges:
        return ranges
    try:
        with open(iomem) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    for line in lines:
        if line.startswith(" "):  # nested resources (Kernel code, ...) are inside System RAM
            continue
        span, _, kind = line.partition(" : ")
        if kind.strip() != "System RAM":
            continue
        lo, _, hi = span.partition("-")
        try:
            start, end = int(lo, 16), int(hi, 16) + 1
        except ValueError:
            continue
        if end > start and not (start == 0 and end == 1):  # iomem shows zeros to unprivileged readers
            ranges.append((start, end))
    return ranges


# -- checks ---------------------------------------------------------------------------------------------------


def _read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise KexecError(f"{what} {path}: not a regular file")
            return f.read()
    except FileNotFoundError:
        raise KexecError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise KexecError(f"{what} {path}: is a directory") from None
    except PermissionError:
        raise KexecError(f"{what} {path}: permission denied") from None
    except OSError as err:
        raise KexecError(f"{what} {path}: cannot read: {err.strerror or err}") from None


def check(kernel: str, initrd: str | None = None, cmdline: str = "", ranges=None):
    """Everything we can check before kexec_file_load: the files, the bzImage header, the command line's
    length, the room in RAM (`ranges`, default ram_ranges()). Returns the parsed BzImage."""
    data = _read_file(kernel, "kernel")
    try:
        bz = parse_bzimage(data)
    except BzImageError as err:
        raise KexecError(f"kernel {kernel}: {err}") from None
    initrd_size = 0
    if initrd is not None:
        try:
            st = os.stat(initrd)
            with open(initrd, "rb"):
                pass
        except FileNotFoundError:
            raise KexecError(f"initrd {initrd}: no such file") from None
        except PermissionError:
            raise KexecError(f"initrd {initrd}: permission denied") from None
        except OSError as err:
            raise KexecError(f"initrd {initrd}: cannot read: {err.strerror or err}") from None
        if not os.path.isfile(initrd):
            raise KexecError(f"initrd {initrd}: not a regular file")
        initrd_size = st.st_size
    if "\0" in cmdline:
        raise KexecError("the command line holds a NUL byte")
    if bz.cmdline_size and len(cmdline.encode()) > bz.cmdline_size:
        raise KexecError(f"command line is {len(cmdline.encode())} bytes, the kernel takes at most {bz.cmdline_size}")
    if ranges is None:
        ranges = ram_ranges()
    if ranges:  # nothing readable: let the kernel decide
        why = fits_in_memory(bz, initrd_size, ranges)
        if why is not None:
            total = sum(e - s for s, e in ranges)
            raise KexecError(f"kernel {kernel} does not fit in {total >> 20} MiB of RAM: {why}")
    return bz


# -- syscalls -------------------------------------------------------------------------------------------------


def load_file(kernel: str, initrd: str | None = None, cmdline: str = "", *, ranges=None, linux=None) -> str:
    """Check, then load with kexec_file_load. Returns "loaded with kexec_file_load". KexecError before the call
    for what we can see; KexecFileRefused when the kernel refuses."""
    check(kernel, initrd, cmdline, ranges)
    if linux is None:
        from .. import linux
    with open(kernel, "rb") as kf:
        initrd_file = open(initrd, "rb") if initrd is not None else None
        try:
            linux.kexec_file_load(kf, initrd_file, cmdline)
        except LinuxError as err:
            hint = {
                errno.ENOSYS: " (the running kernel has no CONFIG_KEXEC_FILE)",
                errno.EPERM: " (needs CAP_SYS_BOOT; under lockdown the kernel must be signed by a trusted key)",
                errno.EKEYREJECTED: " (signature rejected)",
                errno.ENOMEM: " (not enough memory)",
            }.get(err.errno, "")
            raise KexecFileRefused(f"{err}{hint}", err.errno) from None
        finally:
            if initrd_file is not None:
                initrd_file.close()
    return "loaded with kexec_file_load"


def load_legacy(kernel: str, initrd: str | None = None, cmdline: str = "", *, ranges=None, memmap: str = MEMMAP,
                purgatory: str | None = None, linux=None) -> str:
    """Check, lay out the kernel, initrd, boot parameters and purgatory (agent.kexec.loader) in the firmware memory
    map, then load them with kexec_load. Returns "loaded with kexec_load". Every refusal we can foresee is a
    KexecError before the call; the kernel's own refusal is a KexecError naming the errno."""
    bz = check(kernel, initrd, cmdline, ranges)
    data = _read_file(kernel, "kernel")
    initrd_data = _read_file(initrd, "initrd") if initrd is not None else None
    e820 = loader.read_memmap(memmap)
    if not e820:  # no firmware map: the RAM we know of, as e820 RAM entries
        e820 = [loader.E820Entry(s, e, loader.E820_RAM) for s, e in (ranges if ranges is not None else ram_ranges())]
    if not e820:
        raise KexecError(f"kexec_load needs the memory map: cannot read {memmap} or {IOMEM}")
    try:
        blob = loader.load_purgatory(purgatory)
        image = loader.build_image(data, bz, initrd_data, cmdline, e820, blob)
    except loader.LoaderError as err:
        raise KexecError(f"kernel {kernel}: {err}") from None
    if linux is None:
        from .. import linux
    segments = [linux.KexecSegment(s.buf, s.mem, s.memsz) for s in image.segments]
    try:
        linux.kexec_load(image.entry, segments, linux.KEXEC_ARCH_DEFAULT)
    except LinuxError as err:
        hint = {
            errno.ENOSYS: " (the running kernel has no CONFIG_KEXEC)",
            errno.EPERM: " (needs CAP_SYS_BOOT; refused under lockdown)",
            errno.EBUSY: " (a kexec is in progress)",
            errno.EADDRNOTAVAIL: " (a segment is outside the memory the kernel can load into)",
        }.get(err.errno, "")
        raise KexecError(f"{err}{hint}") from None
    return "loaded with kexec_load"


def unload(*, linux=None) -> str:
    if linux is None:
        from .. import linux
    try:
        linux.kexec_file_load(None, None, None, linux.KEXEC_FILE_UNLOAD)
    except LinuxError as err:
        if err.errno != errno.ENOSYS:
            raise KexecError(str(err)) from None
        try:  # no CONFIG_KEXEC_FILE: kexec_load without segments unloads (either syscall's image)
            linux.kexec_load(0, [], linux.KEXEC_ARCH_DEFAULT)
        except LinuxError as err2:
            raise KexecError(str(err2)) from None
    return "unloaded"


def kexec_loaded(path: str = "/sys/kernel/kexec_loaded") -> bool | None:
    try:
        with open(path) as f:
            return f.read().strip() == "1"
    except OSError:
        return None


def execute(*, linux=None) -> None:
    """sync, then reboot(LINUX_REBOOT_CMD_KEXEC). Returns only by raising KexecError."""
    if linux is None:
        from .. import linux
    if kexec_loaded() is False:
        raise KexecError("no kernel loaded (load one with -l first)")
    linux.sync()
    try:
        linux.reboot(linux.LINUX_REBOOT_CMD_KEXEC)
    except LinuxError as err:
        if err.errno == errno.EINVAL:
            raise KexecError("no kernel loaded (load one with -l first)") from None
        raise KexecError(str(err)) from None
    raise KexecError("no kernel loaded: reboot(KEXEC) returned")


# -- finding the kernel on an OS disk -------------------------------------------------------------------------

FSTYPES = ("ext4", "ext3", "ext2", "vfat", "xfs", "btrfs")


def _partitions(device: str) -> list[str]:
    """The partition device nodes of `device` (sysfs order by partition number), or [device] when it has none."""
    name = os.path.basename(os.path.realpath(device))
    sysdir = f"/sys/class/block/{name}"
    parts = []
    try:
        for entry in os.listdir(sysdir):
            try:
                with open(os.path.join(sysdir, entry, "partition")) as f:
                    parts.append((int(f.read().strip()), entry))
            except (OSError, ValueError):
                continue
    except OSError:
        pass
    nodes = [os.path.join(os.path.dirname(device) or "/dev", e) for _, e in sorted(parts)]
    return [n for n in nodes if os.path.exists(n)] or [device]


def ext_uuid(device: str) -> str | None:
    """The UUID of the ext2/3/4 filesystem on `device` (its superblock), None if it holds none."""
    try:
        with open(device, "rb") as f:
            f.seek(1024)
            sb = f.read(1024)
    except OSError:
        return None
    if len(sb) < 0x78 or struct.unpack_from("<H", sb, 0x38)[0] != 0xEF53:
        return None
    u = sb[0x68:0x78].hex()
    return f"{u[:8]}-{u[8:12]}-{u[12:16]}-{u[16:20]}-{u[20:]}"


def find_on_disk(device: str, workdir: str | None = None, *, linux=None,
                 log: Callable[[str], None] | None = None) -> tuple[str, str | None, str, str]:
    """Mount each filesystem of `device` read-only in turn, find its boot entry (bootcfg), copy the kernel and
    initrd (initrds concatenated) into `workdir` (default: a new folder in /tmp, in RAM in the boot environment),
    unmount. Returns (kernel path, initrd path or None, cmdline, description)."""
    if linux is None:
        from .. import linux
    if not os.path.exists(device):
        raise KexecError(f"{device}: no such device")
    workdir = workdir or tempfile.mkdtemp(prefix="nodeagent-kexec-")
    mnt = tempfile.mkdtemp(prefix="nodeagent-mnt-")
    problems = []
    try:
        for part in _partitions(device):
            mounted = False
            for fstype in FSTYPES:
                try:
                    linux.mount(part, mnt, fstype, linux.MS_RDONLY)
                except LinuxError:
                    continue
                mounted = True
                break
            if not mounted:
                problems.append(f"{part}: no filesystem we can mount")
                continue
            try:
                root = RootFs(mnt)
                try:
                    entry = find_boot_entry(root, fs_uuid=ext_uuid(part))
                except NodeagentError as err:
                    problems.append(f"{part}: {err}")
                    continue
                kernel = os.path.join(workdir, "vmlinuz")
                shutil.copyfile(root.host_path(entry.kernel), kernel)
                initrd = None
                if entry.initrds:
                    initrd = os.path.join(workdir, "initrd.img")
                    with open(initrd, "wb") as out:
                        for path in entry.initrds:
                            with open(root.host_path(path), "rb") as f:
                                shutil.copyfileobj(f, out)
                return kernel, initrd, entry.cmdline, f"{part}: {entry.source}"
            finally:
                linux.umount(mnt)
        raise KexecError(f"{device}: nothing to boot ({'; '.join(problems)})")
    finally:
        os.rmdir(mnt)
