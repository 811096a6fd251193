"""Load a kernel for kexec and start it: the policy (which system call, the fallback) and the thin shell around
agent.linux's syscalls. The CLI, the init, `pivot` and the shell all call these.

    load_kernel(kernel, initrd, cmdline, mode, report)  -> the syscall used: "kexec_file_load" or "kexec_load"
    kexec_cmdline(append, reuse)                        the new kernel's command line (kexec-tools' --reuse-cmdline)
    unload()                                            unload what is loaded
    execute()                                           sync, then reboot(LINUX_REBOOT_CMD_KEXEC); returns only on error
    find_on_disk(device)                                -> (kernel file, initrd file or None, cmdline, what was found)

Every refusal we can foresee (missing or unreadable file, not a bzImage, a command line the kernel does not take,
kernel + initrd larger than RAM) is a one-line KexecError raised before any system call. The kernel and initrd are
opened and the kernel read and checked once, whichever syscalls are tried.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, Literal

from .. import linux_files, resources
from ..errors import KexecError, LinuxError, NodeagentError
from . import loader
from .bootcfg import RootFs, find_boot_entry
from .bzimage import BzImage, BzImageError, fits_in_memory, parse_bzimage

Mode = Literal["file", "load", "auto"]
MODES = ("file", "load", "auto")  # kexec-tools' -s, -c, -a
PURGATORY_RESOURCE = "kexec/purgatory.bin"  # carried by the agent (agent.resources): built from csrc/purgatory
BOOT_LOADER_WORDS = ("BOOT_IMAGE=", "initrd=")  # what only the running kernel's boot loader meant


class KexecFileRefused(KexecError):
    """kexec_file_load itself failed (ENOSYS, EPERM under lockdown, ENOEXEC...): kexec_load might still work."""

    def __init__(self, message: str, errno_: int):
        super().__init__(message)
        self.errno = errno_


# -- memory ---------------------------------------------------------------------------------------------------


def ram_ranges(root: str = "/") -> list[tuple[int, int]]:
    """Usable RAM as half-open [start, end) byte ranges: the firmware map's "System RAM" entries, or /proc/iomem's
    top-level "System RAM" lines when there is no /sys/firmware/memmap. Empty if neither can be read."""
    ranges = [(r.start, r.end) for r in linux_files.read_firmware_memmap(root) if r.type == "System RAM"]
    if ranges:
        return ranges
    # iomem shows every address as 0 to unprivileged readers: such a range (0-0) says nothing
    return [(r.start, r.end) for r in linux_files.read_iomem(root)
            if r.depth == 0 and r.name == "System RAM" and not (r.start == 0 and r.end == 1)]


# -- the command line -----------------------------------------------------------------------------------------


def kexec_cmdline(append: str | None = None, reuse: bool = False, root: str = "/") -> str:
    """The new kernel's command line: the running kernel's (reuse; without what only its boot loader meant,
    BOOT_IMAGE= and initrd=), then `append`."""
    parts = []
    if reuse:
        running = linux_files.read_cmdline(root)
        if running is None:
            raise KexecError(f"cannot read the running kernel's command line ({os.path.join(root, 'proc/cmdline')})")
        parts.append(" ".join(w for w in linux_files.cmdline_words(running) if not w.startswith(BOOT_LOADER_WORDS)))
    if append is not None:
        parts.append(append)
    return " ".join(p for p in parts if p)


# -- checks ---------------------------------------------------------------------------------------------------


def _open_regular(path: str, what: str) -> BinaryIO:
    """Open a file for reading, refusing anything but a regular file. O_NONBLOCK: a FIFO without a writer must not
    hang the open (it is refused right after)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise KexecError(f"{what} {path}: no such file") from None
    except PermissionError:
        raise KexecError(f"{what} {path}: permission denied") from None
    except OSError as err:
        raise KexecError(f"{what} {path}: cannot read: {err.strerror or err}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise KexecError(f"{what} {path}: is a directory")
        if not stat.S_ISREG(mode):
            raise KexecError(f"{what} {path}: not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def _read_all(f: BinaryIO, path: str, what: str) -> bytes:
    try:
        f.seek(0)
        return f.read()
    except OSError as err:
        raise KexecError(f"{what} {path}: cannot read: {err.strerror or err}") from None


@dataclass
class _Checked:
    """A kernel (and initrd) opened, read and checked once, for whichever syscalls are tried."""

    kernel_path: str
    kernel: BinaryIO
    data: bytes
    bz: BzImage
    initrd_path: str | None
    initrd: BinaryIO | None
    initrd_size: int
    cmdline: str
    raw_cmdline: bytes  # NUL-terminated, checked against the kernel's cmdline_size

    def close(self) -> None:
        for f in (self.kernel, self.initrd):
            if f is not None:
                f.close()


def _check(kernel: str, initrd: str | None, cmdline: str, root: str) -> _Checked:
    """Everything we can check before a syscall: the files, the bzImage header, the command line, the room in RAM
    (the firmware map or /proc/iomem under root; nothing readable: the kernel decides)."""
    kf = _open_regular(kernel, "kernel")
    initrd_file = None
    try:
        data = _read_all(kf, kernel, "kernel")
        try:
            bz = parse_bzimage(data)
        except BzImageError as err:
            raise KexecError(f"kernel {kernel}: {err}") from None
        initrd_size = 0
        if initrd is not None:
            initrd_file = _open_regular(initrd, "initrd")
            initrd_size = os.fstat(initrd_file.fileno()).st_size
        try:
            raw_cmdline = bz.check_cmdline(cmdline)
        except BzImageError as err:
            raise KexecError(str(err)) from None
        ranges = ram_ranges(root)
        if ranges:
            why = fits_in_memory(bz, initrd_size, ranges)
            if why is not None:
                total = sum(e - s for s, e in ranges)
                raise KexecError(f"kernel {kernel} does not fit in {total >> 20} MiB of RAM: {why}")
    except BaseException:
        kf.close()
        if initrd_file is not None:
            initrd_file.close()
        raise
    return _Checked(kernel, kf, data, bz, initrd, initrd_file, initrd_size, cmdline, raw_cmdline)


# -- the purgatory --------------------------------------------------------------------------------------------


def read_purgatory(path: str | None = None) -> bytes:
    """The kexec_load purgatory: the one the agent carries, or the file at ``path``."""
    if path is None:
        try:
            return resources.read_bytes(PURGATORY_RESOURCE)
        except resources.ResourceMissingError:
            raise KexecError("no purgatory in this build (build it: python build.py purgatory)") from None
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise KexecError(f"no purgatory at {path}") from None
    except OSError as err:
        raise KexecError(f"purgatory {path}: {err.strerror or err}") from None


# -- syscalls -------------------------------------------------------------------------------------------------


def _file_load(k: _Checked, linux) -> None:
    """kexec_file_load with the descriptors already checked: the kernel reads the files itself."""
    try:
        linux.kexec_file_load(k.kernel, k.initrd, k.cmdline)
    except LinuxError as err:
        hint = {
            errno.ENOSYS: " (the running kernel has no CONFIG_KEXEC_FILE)",
            errno.EPERM: " (needs CAP_SYS_BOOT; under lockdown the kernel must be signed by a trusted key)",
            errno.EKEYREJECTED: " (signature rejected)",
            errno.ENOMEM: " (not enough memory)",
        }.get(err.errno, "")
        raise KexecFileRefused(f"{err}{hint}", err.errno) from None


def _legacy_load(k: _Checked, root: str, purgatory: str | None, linux) -> None:
    """Lay out the kernel, initrd, boot parameters and purgatory (agent.kexec.loader) in the firmware memory map,
    then load them with kexec_load."""
    initrd_data = _read_all(k.initrd, k.initrd_path, "initrd") if k.initrd is not None else None
    e820 = loader.e820_from_memmap(linux_files.read_firmware_memmap(root))
    if not e820:  # no firmware map: the RAM we know of, as e820 RAM entries
        e820 = [loader.E820Entry(s, e, loader.E820_RAM) for s, e in ram_ranges(root)]
    if not e820:
        raise KexecError("kexec_load needs the memory map: cannot read /sys/firmware/memmap or /proc/iomem")
    blob = read_purgatory(purgatory)
    try:
        image = loader.build_image(k.data, k.bz, initrd_data, k.raw_cmdline, e820, blob)
    except loader.LoaderError as err:
        raise KexecError(f"kernel {k.kernel_path}: {err}") from None
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


def load_kernel(kernel: str, initrd: str | None = None, cmdline: str = "", mode: Mode = "auto",
                report: Callable[[str], None] = lambda line: None, *, root: str = "/", purgatory: str | None = None,
                linux=None) -> str:
    """Load `kernel` (a bzImage) with `initrd` and `cmdline` for a later execute(). Returns the syscall used.

    mode "file": kexec_file_load (the kernel checks signatures under lockdown); "load": kexec_load with our own
    layout and purgatory; "auto": kexec_file_load, and kexec_load when the kernel refuses it. `report` gets one
    line for the fallback and one saying which syscall loaded the kernel. `root` is where /proc and /sys are read
    (tests point it at a fake tree), `purgatory` a purgatory file instead of the one the agent carries."""
    if mode not in MODES:
        raise KexecError(f"unknown kexec mode {mode!r} (one of {', '.join(MODES)})")
    if linux is None:
        from .. import linux
    k = _check(kernel, initrd, cmdline, root)
    try:
        used = "kexec_load"
        if mode != "load":
            try:
                _file_load(k, linux)
                used = "kexec_file_load"
            except KexecFileRefused as err:
                if mode == "file":
                    raise
                report(f"kexec_file_load refused ({err}); falling back to kexec_load")
        if used == "kexec_load":
            _legacy_load(k, root, purgatory, linux)
    finally:
        k.close()
    report(f"{kernel}: loaded with {used}")
    return used


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


def execute(*, root: str = "/", linux=None) -> None:
    """sync, then reboot(LINUX_REBOOT_CMD_KEXEC). Returns only by raising KexecError."""
    if linux is None:
        from .. import linux
    if linux_files.kexec_loaded(root) is False:
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
    """The partition device nodes of `device` (by partition number, from sysfs), or [device] when it has none."""
    name = os.path.basename(os.path.realpath(device))
    nodes = [os.path.join(os.path.dirname(device) or "/dev", e) for e in linux_files.block_partitions(name)]
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
