"""Open a block device or regular file and say which it is; read and write all of a span, retrying short transfers.

The one place that opens the files nodeagent reads and writes as disks and images (save's disk, an image file, a
file being served, later the kexec kernel): opened non-blocking so that a FIFO with no writer is refused instead of
hanging open() forever, classified with fstat, the fd closed again whenever the file is refused.
"""

from __future__ import annotations

import errno
import os
import stat

from ..errors import NodeagentError

_closed_standard_fds: set[int] = set()


def plug_standard_fds() -> None:
    """Remember which of stdin/stdout/stderr the command was started without, and put /dev/null there, so that no
    file opened later lands on fd 0/1/2 (an image written to `-` would then go into the disk being read).

    The static binary's start-up (Nuitka) has already put /dev/null on a closed stdin/stdout/stderr by then, as
    sys.stdin/stdout/stderr named "/dev/null"; an interpreter names them "<stdin>" ... whatever fd 0-2 hold."""
    import sys

    for fd, std in ((0, sys.stdin), (1, sys.stdout), (2, sys.stderr)):
        if getattr(std, "name", None) == os.devnull:
            _closed_standard_fds.add(fd)
            continue
        try:
            os.fstat(fd)
        except OSError:
            _closed_standard_fds.add(fd)
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def standard_fd(fd: int, name: str, error: type[NodeagentError]) -> int:
    """fd 0 or 1 for `-`, refused if the command was started with it closed."""
    if fd in _closed_standard_fds:
        raise error(f"{name} is closed")
    try:
        os.fstat(fd)
    except OSError as err:
        raise error(f"{name}: {err.strerror}") from None
    return fd


class BlockFile:
    """An open regular file or block device: fd, size in bytes, whether it is a block device, its device number."""

    def __init__(self, path: str, fd: int, st: os.stat_result) -> None:
        self.path = path
        self.fd = fd
        self.is_block = stat.S_ISBLK(st.st_mode)
        self.rdev = st.st_rdev if self.is_block else None
        if self.is_block:
            from .. import linux  # the cffi module: only for devices (an image file needs no ioctl)

            self.size = linux.block_size_bytes(fd)
        else:
            self.size = st.st_size

    def read(self, size: int, offset: int | None = None) -> bytes:
        return read_full(self.fd, size, offset)

    def write(self, data, offset: int | None = None) -> None:
        write_full(self.fd, data, offset)

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


def open_block_file(
    path: str,
    flags: int,
    error: type[NodeagentError],
    block: bool = True,
    mode: int = 0o644,
) -> BlockFile:
    """Open `path` (os.O_RDONLY, os.O_RDWR, ... plus O_CREAT/O_EXCL/O_TRUNC as wanted) as a regular file, or a block
    device if `block`; anything else, or a failed open, raises `error` with one line naming the path (and the
    open's errno as its `errno` attribute)."""
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, mode)
    except OSError as err:
        if err.errno == errno.ENXIO:  # a FIFO opened for writing without a reader
            raise error(f"{path}: not a regular file{' or block device' if block else ''}") from None
        refusal = error(f"{path}: {err.strerror}")
        refusal.errno = err.errno  # e.g. EBUSY: the caller may say more
        raise refusal from None
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or (block and stat.S_ISBLK(st.st_mode))):
            raise error(f"{path}: not a regular file{' or block device' if block else ''}")
        os.set_blocking(fd, True)
        return BlockFile(path, fd, st)
    except OSError as err:
        os.close(fd)
        raise error(f"{path}: {err.strerror}") from None
    except BaseException:
        os.close(fd)
        raise


def read_full(fd: int, size: int, offset: int | None = None) -> bytes:
    """Up to `size` bytes from `offset` (or the file position), retrying short reads (pipes deliver in small
    pieces); fewer only at the end of the file. OSError passes through for the caller to name."""
    parts = []
    got = 0
    while got < size:
        piece = os.read(fd, size - got) if offset is None else os.pread(fd, size - got, offset + got)
        if not piece:
            break
        parts.append(piece)
        got += len(piece)
    return b"".join(parts) if len(parts) != 1 else parts[0]


def write_full(fd: int, data, offset: int | None = None) -> None:
    """All of `data` at `offset` (or the file position), retrying short writes. OSError passes through."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        view = view[written:]
        if offset is not None:
            offset += written
