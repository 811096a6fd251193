"""The agent's door to the Linux kernel: block-device ioctls and fallocate.

This is the only module that imports the compiled cffi extension ``agent._linux``
(C sources in csrc/, built by ``pip install .`` or ``python build.py ext``).  Each
function takes a file descriptor (an int, or anything with ``fileno()``) and
raises :class:`agent.errors.LinuxError` carrying the kernel's errno when the call
fails, e.g. ``LinuxError(EINVAL, "BLKRRPART /dev/loop3")``.

Importing this module never fails because the extension is missing: the first
call then raises :class:`ExtensionMissingError`, so commands that do not touch
the kernel keep working from an unbuilt source tree.
"""

from __future__ import annotations

import os
from typing import Protocol

from agent.errors import LinuxError, NodeagentError

try:
    from agent import _linux
except ImportError as exc:  # not built (source tree) or built for another Python
    _linux = None
    _import_error: ImportError | None = exc
else:
    _import_error = None


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


def logical_sector_size(fd: FD) -> int:
    """Logical sector size of the block device in bytes (BLKSSZGET)."""
    lib, fd = _lib(), _fileno(fd)
    out = _linux.ffi.new("int *")
    if lib.na_blk_sszget(fd, out) != 0:
        raise _fail("BLKSSZGET", fd)
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


def discard(fd: FD, offset: int, length: int) -> None:
    """Discard (TRIM) bytes [offset, offset+length) of the device (BLKDISCARD).

    Both must be multiples of the logical sector size; length 0 does nothing.
    What discarded blocks
    read back as depends on the device; use zero_out() when zeros are needed.
    """
    lib, fd = _lib(), _fileno(fd)
    if not _check_range(offset, length):
        return
    if lib.na_blk_discard(fd, offset, length) != 0:
        raise _fail(f"BLKDISCARD {offset}+{length}", fd)


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
