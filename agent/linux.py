"""The agent's door to the Linux kernel: block-device ioctls, fallocate, and for booting a node: kexec, reboot,
kernel modules, mounts and the network-interface ioctls of the boot environment.

This is the only module that imports the compiled cffi extension ``agent._linux``
(C sources in csrc/, built by ``pip install .`` or ``python build.py ext``): every ioctl and every syscall the
os module lacks goes through here; what /proc and /sys say is parsed next door, in agent.linux_files.  Each
function takes a file descriptor (an int, or anything with ``fileno()``) and
raises :class:`agent.errors.LinuxError` carrying the kernel's errno when the call
fails, e.g. ``LinuxError(EINVAL, "BLKRRPART /dev/loop3")``.  Arguments the kernel
would refuse for a reason we can see in advance (a NUL in a string, unknown flags,
a malformed IPv4 address) raise ValueError before any system call is made.

The kernel's constants that callers pass (``MS_RDONLY``, ``MNT_DETACH``,
``KEXEC_FILE_ON_CRASH``, ``LINUX_REBOOT_CMD_KEXEC``, ``IFF_UP``, ...; see
:data:`CONSTANTS`) are attributes of this module, with the values the C compiler
took from the kernel headers.

Importing this module never fails because the extension is missing: the first
call (or constant looked up) then raises :class:`ExtensionMissingError`, so
commands that do not touch the kernel keep working from an unbuilt source tree.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Sequence
from typing import NamedTuple, Protocol

from agent.errors import LinuxError, NodeagentError

_import_error: ImportError | None = None
if "_agent_linux" in sys.builtin_module_names:  # the static binary: the same C, built into the interpreter
    import _agent_linux as _linux
else:
    try:
        from agent import _linux
    except ImportError as exc:  # not built (source tree) or built for another Python
        _linux = None
        _import_error = exc


class ExtensionMissingError(NodeagentError):
    """The compiled module agent._linux is not there (or does not load)."""


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


FD = int | _HasFileno


def _lib():
    if _linux is None:
        raise ExtensionMissingError(
            "the compiled module agent._linux is missing "
            f"({_import_error}); run `pip install .` or, in a source tree, "
            "`python build.py ext`"
        )
    return _linux.lib


def available() -> bool:
    """Whether the compiled module is there (callers with a pure-Python fallback ask first)."""
    return _linux is not None


def _fileno(fd: FD) -> int:
    return fd if isinstance(fd, int) else fd.fileno()


def _describe(fd: int) -> str:
    """What the descriptor refers to, for error messages (/dev/loop3, a path)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"fd {fd}"


def _fail(what: str, fd: int) -> LinuxError:
    # Read the errno cffi saved right after the C call, before anything else.
    errno = _linux.ffi.errno
    return LinuxError(errno, f"{what} {_describe(fd)}")


def _check_range(offset: int, length: int) -> bool:
    """Validate a byte range; False when it is empty (the kernel would say
    EINVAL to a zero length, callers get a no-op instead)."""
    if offset < 0 or length < 0:
        raise ValueError(f"negative offset or length: {offset}, {length}")
    return length > 0


# ---------------------------------------------------------------- block devices


def block_size_bytes(fd: FD) -> int:
    """Size of the block device in bytes (BLKGETSIZE64)."""
    lib, fd = _lib(), _fileno(fd)
    out = _linux.ffi.new("uint64_t *")
    if lib.na_blk_getsize64(fd, out) != 0:
        raise _fail("BLKGETSIZE64", fd)
    return int(out[0])


def flush_buffers(fd: FD) -> None:
    """Write back and drop the device's buffer cache (BLKFLSBUF)."""
    lib, fd = _lib(), _fileno(fd)
    if lib.na_blk_flsbuf(fd) != 0:
        raise _fail("BLKFLSBUF", fd)


def reread_partitions(fd: FD) -> None:
    """Have the kernel re-read the partition table (BLKRRPART).

    Fails with EINVAL on a disk that cannot have partitions (e.g. a loop device
    set up without partition scanning) and EBUSY while a partition is in use.
    """
    lib, fd = _lib(), _fileno(fd)
    if lib.na_blk_rrpart(fd) != 0:
        raise _fail("BLKRRPART", fd)


def zero_out(fd: FD, offset: int, length: int) -> None:
    """Make bytes [offset, offset+length) of the device read as zeros
    (BLKZEROOUT; the kernel uses write-zeroes/unmap when the device can).

    Both must be multiples of the logical sector size; length 0 does nothing.
    """
    lib, fd = _lib(), _fileno(fd)
    if not _check_range(offset, length):
        return
    if lib.na_blk_zeroout(fd, offset, length) != 0:
        raise _fail(f"BLKZEROOUT {offset}+{length}", fd)


# ---------------------------------------------------------------- regular files


def punch_hole(fd: FD, offset: int, length: int) -> None:
    """Deallocate bytes [offset, offset+length) of a regular file, which then
    read as zeros; the file size is kept (fallocate PUNCH_HOLE|KEEP_SIZE).
    Length 0 does nothing; a range past the end of the file is fine.

    Raises LinuxError(EOPNOTSUPP) on filesystems without hole punching.
    """
    lib, fd = _lib(), _fileno(fd)
    if not _check_range(offset, length):
        return
    mode = lib.FALLOC_FL_PUNCH_HOLE | lib.FALLOC_FL_KEEP_SIZE
    if lib.na_fallocate(fd, mode, offset, length) != 0:
        raise _fail(f"fallocate(PUNCH_HOLE) {offset}+{length}", fd)


# ---------------------------------------------------------------- the C allocator


def keep_big_buffers(max_buffer: int = 16 << 20) -> None:
    """Have malloc serve buffers up to `max_buffer` bytes from a heap it keeps, instead of a fresh mmap each time.

    The pipelines allocate and free megabyte buffers (chunks, inflated pieces) hundreds of times a second; with
    glibc's defaults every one of them faults its pages in again, which costs about a fifth of the imaging time.
    Best effort: an allocator that refuses is left as it is.
    """
    if _linux is not None:
        _linux.lib.na_malloc_keep_big_buffers(max_buffer)


# ---------------------------------------------------------------- kernel constants

#: The constants of agent._linux that callers may read as ``linux.NAME`` (values from the kernel headers).
CONSTANTS = frozenset(
    {
        "KEXEC_ON_CRASH", "KEXEC_PRESERVE_CONTEXT", "KEXEC_ARCH_MASK", "KEXEC_ARCH_DEFAULT", "KEXEC_ARCH_X86_64",
        "KEXEC_SEGMENT_MAX", "KEXEC_FILE_UNLOAD", "KEXEC_FILE_ON_CRASH", "KEXEC_FILE_NO_INITRAMFS",
        "LINUX_REBOOT_CMD_KEXEC", "LINUX_REBOOT_CMD_RESTART", "LINUX_REBOOT_CMD_POWER_OFF", "LINUX_REBOOT_CMD_HALT",
        "MODULE_INIT_IGNORE_MODVERSIONS", "MODULE_INIT_IGNORE_VERMAGIC",
        "MS_RDONLY", "MS_NOSUID", "MS_NODEV", "MS_NOEXEC", "MS_REMOUNT", "MS_BIND", "MS_MOVE", "MS_REC",
        "MNT_FORCE", "MNT_DETACH",
        "IFNAMSIZ", "IFF_UP", "IFF_BROADCAST", "IFF_RUNNING", "IFF_LOOPBACK", "ARPHRD_ETHER", "ARPHRD_LOOPBACK",
        "SO_RXQ_OVFL",
    }
)


def __getattr__(name: str):
    # PEP 562: linux.MS_RDONLY etc. come from the extension on first use, so importing stays possible without it.
    if name in CONSTANTS:
        return getattr(_lib(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _fail_what(what: str) -> LinuxError:
    """LinuxError for a call that names no descriptor worth describing (a path, an interface)."""
    return LinuxError(_linux.ffi.errno, what)


def _cstr(value: str | bytes | os.PathLike, what: str) -> bytes:
    """A str/bytes/path as the bytes of a C string; refuse embedded NULs (C would silently cut the string)."""
    data = os.fsencode(value)
    if b"\0" in data:
        raise ValueError(f"{what} contains a NUL byte: {value!r}")
    return data


def _cstr_or_null(value, what: str):
    return _linux.ffi.NULL if value is None else _cstr(value, what)


def _check_flags(flags: int, allowed: int, what: str) -> None:
    if flags < 0 or flags & ~allowed:
        raise ValueError(f"unknown {what} flags {flags:#x}")


# ---------------------------------------------------------------- booting another kernel
# kexec_file_load, kexec_load and reboot replace or stop the running system: nothing but the boot path may call them
# (the tests only check the validation that happens before the system call).


def kexec_file_load(kernel_fd: FD | None, initrd_fd: FD | None = None, cmdline: str | None = "", flags: int = 0) -> None:
    """Load a kernel for a later ``reboot(LINUX_REBOOT_CMD_KEXEC)`` with kexec_file_load(2): the kernel parses,
    verifies (signature policy) and places the image itself, so this is the way on machines with lockdown or
    signed-kernel enforcement, and needs no bzImage parsing on our side.

    ``initrd_fd`` None (or -1) loads no initramfs (adds KEXEC_FILE_NO_INITRAMFS); ``cmdline`` None passes no
    command line.
    ``flags``: KEXEC_FILE_ON_CRASH (load the crash kernel), KEXEC_FILE_UNLOAD (unload; the descriptors are then
    ignored and may be None).  Needs CAP_SYS_BOOT; the kernel must have CONFIG_KEXEC_FILE.
    """
    lib = _lib()
    _check_flags(flags, lib.KEXEC_FILE_UNLOAD | lib.KEXEC_FILE_ON_CRASH | lib.KEXEC_FILE_NO_INITRAMFS, "kexec_file_load")
    unload = bool(flags & lib.KEXEC_FILE_UNLOAD)
    kernel_fd = None if kernel_fd == -1 else kernel_fd
    initrd_fd = None if initrd_fd == -1 else initrd_fd
    if initrd_fd is None:
        flags |= lib.KEXEC_FILE_NO_INITRAMFS
    elif flags & lib.KEXEC_FILE_NO_INITRAMFS:
        raise ValueError("kexec_file_load: an initrd with KEXEC_FILE_NO_INITRAMFS")
    if kernel_fd is None and not unload:
        raise ValueError("kexec_file_load: no kernel (only KEXEC_FILE_UNLOAD needs none)")
    kfd = -1 if kernel_fd is None else _fileno(kernel_fd)
    ifd = -1 if initrd_fd is None else _fileno(initrd_fd)
    c_cmdline = _cstr_or_null(cmdline, "kernel command line")
    if lib.na_kexec_file_load(kfd, ifd, c_cmdline, flags) != 0:
        raise _fail_what("kexec_file_unload" if unload else f"kexec_file_load {_describe(kfd)}")


class KexecSegment(NamedTuple):
    """One piece of a kexec_load(2) image: ``buf`` (bytes-like) is copied to physical address ``mem``, and the rest
    of ``memsz`` bytes there is zeroed.  ``mem`` and ``memsz`` must be page-aligned."""

    buf: bytes | bytearray | memoryview
    mem: int
    memsz: int


def kexec_load(entry: int, segments: Sequence[KexecSegment], flags: int | None = None) -> None:
    """Load a prepared image with kexec_load(2): we place the segments (kernel, initrd, boot parameters, purgatory)
    ourselves, which works on kernels without CONFIG_KEXEC_FILE and lets us boot what kexec_file_load refuses.

    ``entry`` is the physical address to jump to.  ``flags`` defaults to KEXEC_ARCH_DEFAULT and may add
    KEXEC_ON_CRASH or KEXEC_PRESERVE_CONTEXT.  No segments unloads the loaded kernel.  Segments are checked
    (count, sizes, page alignment) before the call.
    """
    lib, ffi = _lib(), _linux.ffi
    if flags is None:
        flags = lib.KEXEC_ARCH_DEFAULT
    _check_flags(flags, lib.KEXEC_ARCH_MASK | lib.KEXEC_ON_CRASH | lib.KEXEC_PRESERVE_CONTEXT, "kexec_load")
    if entry < 0:
        raise ValueError(f"kexec_load: negative entry point {entry:#x}")
    if len(segments) > lib.KEXEC_SEGMENT_MAX:
        raise ValueError(f"kexec_load: {len(segments)} segments, the kernel takes at most {lib.KEXEC_SEGMENT_MAX}")
    page = os.sysconf("SC_PAGE_SIZE")
    keep = []  # the buffers must stay alive (and unmoved) until the call returns
    c_segments = ffi.new("struct kexec_segment[]", max(len(segments), 1))
    for i, seg in enumerate(segments):
        buf = ffi.from_buffer(seg.buf)
        if seg.mem < 0 or seg.mem % page or seg.memsz % page:
            raise ValueError(f"kexec_load: segment {i} at {seg.mem:#x}+{seg.memsz:#x} is not page-aligned")
        if len(buf) > seg.memsz:
            raise ValueError(f"kexec_load: segment {i} holds {len(buf)} bytes in memsz {seg.memsz}")
        keep.append(buf)
        c_segments[i].buf = buf
        c_segments[i].bufsz = len(buf)
        c_segments[i].mem = ffi.cast("void *", seg.mem)
        c_segments[i].memsz = seg.memsz
    if lib.na_kexec_load(entry, len(segments), c_segments, flags) != 0:
        raise _fail_what("kexec_load" if segments else "kexec_load (unload)")


def reboot(cmd: int) -> None:
    """reboot(2): LINUX_REBOOT_CMD_KEXEC starts the kernel loaded by kexec_(file_)load, RESTART reboots through
    the firmware, POWER_OFF and HALT stop.  Does not sync or unmount: call sync() (and unmount) first.  Returns
    only if the kernel refused (LinuxError; e.g. EINVAL for KEXEC with no kernel loaded, EPERM without
    CAP_SYS_BOOT).
    """
    lib = _lib()
    allowed = {
        lib.LINUX_REBOOT_CMD_KEXEC: "KEXEC",
        lib.LINUX_REBOOT_CMD_RESTART: "RESTART",
        lib.LINUX_REBOOT_CMD_POWER_OFF: "POWER_OFF",
        lib.LINUX_REBOOT_CMD_HALT: "HALT",
    }
    if cmd not in allowed:
        raise ValueError(f"reboot: unsupported command {cmd:#x}")
    if lib.na_reboot(cmd) != 0:
        raise _fail_what(f"reboot({allowed[cmd]})")


# ---------------------------------------------------------------- modules, mounts


def finit_module(fd: FD, params: str = "", flags: int = 0) -> None:
    """Load the kernel module in file ``fd`` (finit_module(2)) with parameter string ``params``, e.g. a NIC driver
    the boot environment needs; the kernel reads the file, so signature checks apply as for modprobe.  ``flags``:
    MODULE_INIT_IGNORE_MODVERSIONS / MODULE_INIT_IGNORE_VERMAGIC.  EEXIST: already loaded."""
    lib, fd = _lib(), _fileno(fd)
    _check_flags(flags, lib.MODULE_INIT_IGNORE_MODVERSIONS | lib.MODULE_INIT_IGNORE_VERMAGIC, "finit_module")
    if lib.na_finit_module(fd, _cstr(params, "module parameters"), flags) != 0:
        raise _fail("finit_module", fd)


def mount(source: str | None, target, fstype: str | None = None, flags: int = 0, data: str | None = None) -> None:
    """mount(2): mount ``source`` (a device, or a name such as "tmpfs") of type ``fstype`` on ``target``; ``flags``
    are MS_* (MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, ...), ``data`` the filesystem's options string
    ("size=64m,mode=0755").  The boot environment mounts without util-linux."""
    lib = _lib()
    if flags < 0:
        raise ValueError(f"mount: negative flags {flags}")
    c_target = _cstr(target, "mount point")
    rc = lib.na_mount(
        _cstr_or_null(source, "mount source"), c_target, _cstr_or_null(fstype, "filesystem type"), flags,
        _cstr_or_null(data, "mount options"),
    )
    if rc != 0:
        what = f"{source} ({fstype})" if fstype else f"{source}"
        raise _fail_what(f"mount {what} on {os.fsdecode(c_target)}")


def umount(target, flags: int = 0) -> None:
    """umount2(2): unmount ``target``; ``flags`` MNT_DETACH (lazy: detach now, clean up when no longer busy) or
    MNT_FORCE."""
    lib = _lib()
    _check_flags(flags, lib.MNT_DETACH | lib.MNT_FORCE, "umount2")
    c_target = _cstr(target, "mount point")
    if lib.na_umount2(c_target, flags) != 0:
        raise _fail_what(f"umount {os.fsdecode(c_target)}")


def sync() -> None:
    """sync(2): write back every filesystem, e.g. before reboot() or kexec."""
    _lib().na_sync()


# ---------------------------------------------------------------- network interfaces
# The classic ioctls on any socket (an AF_INET datagram socket will do), enough to bring up a node's boot interface
# without iproute2 or netlink.  They act on the network namespace the socket was created in.


def _ifname(name: str) -> bytes:
    data = _cstr(name, "interface name")
    if not 0 < len(data) < _lib().IFNAMSIZ or b"/" in data or data.isspace():
        raise ValueError(f"not an interface name: {name!r}")
    return data


def _ipv4(addr: str) -> bytes:
    """A dotted-quad IPv4 address, checked here so the C side never sees a malformed one."""
    try:
        return str(ipaddress.IPv4Address(addr)).encode()
    except ValueError:
        raise ValueError(f"not an IPv4 address: {addr!r}") from None


def hardware_address(sock: FD, ifname: str) -> tuple[int, bytes]:
    """SIOCGIFHWADDR: (link type ARPHRD_*, the first 14 bytes of the hardware address); for ARPHRD_ETHER the MAC
    is the first 6.  LinuxError(ENODEV) for an interface that does not exist."""
    lib, ffi, sock = _lib(), _linux.ffi, _fileno(sock)
    c_name = _ifname(ifname)
    family, data = ffi.new("unsigned short *"), ffi.new("unsigned char[14]")
    if lib.na_if_get_hwaddr(sock, c_name, family, data) != 0:
        raise _fail_what(f"SIOCGIFHWADDR {ifname}")
    return int(family[0]), bytes(ffi.buffer(data))


def _get_ipv4(call, request: str, sock: FD, ifname: str) -> str:
    ffi, sock = _linux.ffi, _fileno(sock)
    c_name = _ifname(ifname)
    out = ffi.new("unsigned char[4]")
    if call(sock, c_name, out) != 0:
        raise _fail_what(f"{request} {ifname}")
    return str(ipaddress.IPv4Address(bytes(ffi.buffer(out))))


def ipv4_address(sock: FD, ifname: str) -> str:
    """SIOCGIFADDR: the interface's (primary) IPv4 address, dotted quad.  LinuxError(EADDRNOTAVAIL) when it has
    none, ENODEV when there is no such interface."""
    return _get_ipv4(_lib().na_if_get_addr, "SIOCGIFADDR", sock, ifname)


def ipv4_broadcast(sock: FD, ifname: str) -> str:
    """SIOCGIFBRDADDR: the broadcast address of the interface's IPv4 address (meaningful with IFF_BROADCAST)."""
    return _get_ipv4(_lib().na_if_get_broadaddr, "SIOCGIFBRDADDR", sock, ifname)


def set_ipv4_address(sock: FD, ifname: str, addr: str) -> None:
    """SIOCSIFADDR: give the interface the IPv4 address ``addr`` (replacing its primary one)."""
    lib, sock = _lib(), _fileno(sock)
    if lib.na_if_set_addr(sock, _ifname(ifname), _ipv4(addr)) != 0:
        raise _fail_what(f"SIOCSIFADDR {ifname} {addr}")


def set_ipv4_netmask(sock: FD, ifname: str, netmask: str) -> None:
    """SIOCSIFNETMASK: set the netmask (dotted quad) of the interface's IPv4 address."""
    lib, sock = _lib(), _fileno(sock)
    if lib.na_if_set_netmask(sock, _ifname(ifname), _ipv4(netmask)) != 0:
        raise _fail_what(f"SIOCSIFNETMASK {ifname} {netmask}")


def interface_flags(sock: FD, ifname: str) -> int:
    """SIOCGIFFLAGS: the interface's IFF_* flags (IFF_UP, IFF_RUNNING, IFF_LOOPBACK, ...)."""
    lib, ffi, sock = _lib(), _linux.ffi, _fileno(sock)
    out = ffi.new("int *")
    if lib.na_if_get_flags(sock, _ifname(ifname), out) != 0:
        raise _fail_what(f"SIOCGIFFLAGS {ifname}")
    return int(out[0])


def set_interface_flags(sock: FD, ifname: str, flags: int) -> None:
    """SIOCSIFFLAGS: set the interface's IFF_* flags (read them with interface_flags() and change one bit).
    Only the 16 bits the ioctl carries; more give LinuxError(EINVAL)."""
    lib, sock = _lib(), _fileno(sock)
    if flags < 0:
        raise ValueError(f"negative interface flags {flags}")
    if lib.na_if_set_flags(sock, _ifname(ifname), flags) != 0:
        raise _fail_what(f"SIOCSIFFLAGS {ifname}")


def add_ipv4_route(
    sock: FD, dst: str, genmask: str, gateway: str | None = None, ifname: str | None = None, metric: int = 0
) -> None:
    """SIOCADDRT: add the route dst/genmask via ``gateway`` (None: on-link) out of ``ifname`` (None: the kernel
    picks the interface that reaches the gateway).  dst and genmask "0.0.0.0" add the default route.  EEXIST: the
    route is already there; ENETUNREACH: no interface reaches the gateway."""
    lib, ffi, sock = _lib(), _linux.ffi, _fileno(sock)
    if metric < 0:
        raise ValueError(f"negative route metric {metric}")
    c_gateway = ffi.NULL if gateway is None else _ipv4(gateway)
    c_ifname = ffi.NULL if ifname is None else _ifname(ifname)
    if lib.na_route_add(sock, _ipv4(dst), _ipv4(genmask), c_gateway, c_ifname, metric) != 0:
        via = f" via {gateway}" if gateway else ""
        dev = f" dev {ifname}" if ifname else ""
        raise _fail_what(f"SIOCADDRT {dst}/{genmask}{via}{dev}")


# ---------------------------------------------------------------- frisbee receive fast path


class FrisbeeBatch:
    """A batch of received datagrams in C memory (struct na_frx) and the BLOCKs the scan may take in C.

    recv() reads up to NA_FRX_BATCH datagrams with one recvmmsg, without the GIL; scan() copies the armed chunk's
    BLOCKs from our server into its buffer and clears their bits in the missing-blocks map, and stops at the first
    datagram it leaves to the caller (datagram(i)). The caller owns the policy: it arms one chunk at a time and
    reads back what the scan took (take())."""

    def __init__(self) -> None:
        lib = _lib()
        self._ffi, self._lib = _linux.ffi, lib
        self._rx = self._ffi.new("struct na_frx *")
        self._rx.chunk = -1
        self._keep = None  # the armed chunk buffer's cdata: keeps the pointer valid
        self._server_ip: str | None = None
        self.size = int(lib.NA_FRX_SIZE)

    def recv(self, sock: FD) -> int:
        """Datagrams read (0: none waiting); raises LinuxError."""
        n = self._lib.na_frx_recv(_fileno(sock), self._rx)
        if n < 0:
            raise _fail_what("recvmmsg")
        return n

    def scan(self) -> int:
        """Take armed BLOCKs from where the last scan stopped: the index of the next datagram left to the caller,
        or -1 at the end of the batch."""
        return self._lib.na_frx_scan(self._rx)

    def datagram(self, i: int) -> tuple[bytes, tuple[str, int]]:
        rx = self._rx
        ip = int(rx.ip[i]).to_bytes(4, sys.byteorder)  # the in_addr as it sits in memory: network order
        return self._ffi.buffer(rx.data[i], rx.len[i])[:], (ipaddress.IPv4Address(ip).compressed, int(rx.port[i]))

    def arm(self, server_ip: str, server_port: int | None, chunk: int, buffer: bytearray, missing: int,
            nblocks: int, chunk_bytes: int, run_top: int) -> None:
        """Let the scan take BLOCKs of `chunk` from server_ip:server_port (None: any port) into `buffer`."""
        rx, ffi = self._rx, self._ffi
        if server_ip != self._server_ip:  # armed a few times per chunk: parse the address once
            rx.server_ip = int.from_bytes(ipaddress.IPv4Address(server_ip).packed, sys.byteorder)
            self._server_ip = server_ip
        rx.server_port = -1 if server_port is None else server_port
        self._keep = ffi.from_buffer(buffer)
        rx.buf = self._keep
        ffi.memmove(rx.missing, missing.to_bytes(128, "little"), 128)
        rx.missing_count = missing.bit_count()
        rx.chunk, rx.nblocks, rx.chunk_bytes, rx.run_top = chunk, nblocks, chunk_bytes, run_top

    def disarm(self) -> None:
        self._rx.chunk = -1
        self._rx.buf = self._ffi.NULL
        self._keep = None

    def take(self) -> tuple[int, int, int, int, int]:
        """(blocks, useful, duplicates, missing map, highest block) of the armed chunk since the last take()."""
        rx = self._rx
        got = (rx.blocks, rx.useful, rx.dups, int.from_bytes(self._ffi.buffer(rx.missing), "little"), rx.run_top)
        rx.blocks = rx.useful = rx.dups = 0
        return got

    @property
    def drops(self) -> int:
        """The socket's drop count (SO_RXQ_OVFL, once enabled) as of the last datagram read."""
        return int(self._rx.drops)


def send_frisbee_blocks(sock: FD, prefix: bytes, dest: tuple[str, int], chunk: int, block: int, data, gso: bool) -> int:
    """Send len(data) // 1024 frisbee BLOCKs (prefix: their first 16 bytes; then chunk, block + k, 1 KiB of data)
    to dest with sendmmsg, or UDP_SEGMENT sends when gso. Returns how many went (fewer: the send queue is full);
    raises LinuxError when none could."""
    lib, ffi, fd = _lib(), _linux.ffi, _fileno(sock)
    if len(prefix) != 16 or len(data) % 1024:
        raise ValueError("a 16-byte prefix and whole 1 KiB blocks")
    ip = int.from_bytes(ipaddress.IPv4Address(dest[0]).packed, sys.byteorder)
    n = lib.na_frx_send_blocks(fd, prefix, ip, dest[1], chunk, block, len(data) // 1024, ffi.from_buffer(data), gso)
    if n < 0:
        raise _fail_what(f"send to {dest[0]}:{dest[1]}")
    return n
