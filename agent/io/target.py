"""The disk or file an image is written to: size checks, positional writes, zeroing, and the final flush.

Every write goes through `write`/`zero`, which refuse anything outside [0, limit): whatever an image says, nothing
is written past the end of a block device or outside the range the image was checked against.
"""

from __future__ import annotations

import errno
import os
import stat

from .. import linux, linux_files
from ..errors import LinuxError, TargetBusyError, TargetError, TargetTooSmallError
from .blockfile import open_block_file, write_full

ZERO_BLOCK = bytes(1 << 20)


def busy_reason(path: str, rdev: int) -> str | None:
    """Why a block device is in use (mounted, swap, held by md/dm), or None."""
    devices = linux_files.block_device_and_partitions(os.major(rdev), os.minor(rdev))
    for mount in linux_files.read_mountinfo():
        if (mount.major, mount.minor) in devices:
            return f"mounted on {mount.mount_point}"
    for swap in linux_files.read_swaps():
        try:
            st = os.stat(swap.path)
        except OSError:
            continue
        if stat.S_ISBLK(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) in devices:
            return f"in use as swap ({swap.path})"
    for major, minor in devices:
        holders = linux_files.block_holders(major, minor)
        if holders:
            return f"held by {', '.join(holders)}"
    return None


MAX_FILE_BYTES = (1 << 63) - 1  # off_t: no Linux file or device reaches further


class Target:
    """An open block device or regular file to write an image to.

    A regular file that does not exist yet is created only when the image has been accepted (the first `require`),
    and `close(failed=True)` removes it again if nothing was written to it: a refused image leaves no file behind.
    """

    def __init__(self, path: str, force: bool = False) -> None:
        self.path = path
        self.file = None
        self.created = False  # by us, in this run
        self.wrote = False
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        except OSError as err:
            raise TargetError(f"{path}: {err.strerror}") from None
        self.is_block = st is not None and stat.S_ISBLK(st.st_mode)
        if st is not None and not self.is_block and not stat.S_ISREG(st.st_mode):
            raise TargetError(f"{path}: not a block device or regular file")
        if st is None:
            parent = os.path.dirname(path) or "."
            if not os.path.isdir(parent):
                raise TargetError(f"{path}: No such file or directory")
            if not os.access(parent, os.W_OK):
                raise TargetError(f"{path}: Permission denied")
            self.size = 0
            self.limit = None  # a file grows to what the image covers
            return
        flags = os.O_RDWR
        if self.is_block:
            reason = busy_reason(path, st.st_rdev)
            if reason and not force:
                raise TargetBusyError(f"{path} is {reason}; refusing to write (use --force to override)")
            if not force:
                flags |= os.O_EXCL  # the kernel refuses this while anything holds the device
        self._open(flags)
        self.size = self.file.size
        self.limit = self.size if self.is_block else None

    def _open(self, flags: int) -> None:
        try:
            self.file = open_block_file(self.path, flags, TargetError)
        except TargetError as err:
            if getattr(err, "errno", None) == errno.EBUSY:
                raise TargetBusyError(f"{self.path} is in use; refusing to write (use --force to override)") from None
            raise

    @property
    def fd(self) -> int:
        return self.file.fd

    # --- checks and growth -------------------------------------------------------------------------------------

    def require(self, end: int, what: str) -> None:
        """Make sure bytes up to `end` can be written: refuse on a device that is too small, grow a file (creating
        it if it does not exist yet)."""
        if self.is_block:
            if end > self.size:
                raise TargetTooSmallError(f"{self.path}: {what} needs {end} bytes, the device has {self.size}")
            return
        if end > MAX_FILE_BYTES:
            raise TargetTooSmallError(f"{self.path}: {what} needs {end} bytes, more than any file can hold")
        if self.file is None:
            self._open(os.O_RDWR | os.O_CREAT | os.O_EXCL)
            self.created = True
        if end > self.size:
            try:
                os.ftruncate(self.fd, end)  # extend only: a file target is never shrunk
            except OSError as err:
                error = TargetTooSmallError if err.errno in (errno.EFBIG, errno.ENOSPC) else TargetError
                raise error(f"{self.path}: cannot extend to {end} bytes: {err.strerror}") from None
            self.size = end

    def _check(self, offset: int, length: int) -> None:
        if self.file is None or offset < 0 or offset + length > self.size:
            raise TargetError(f"{self.path}: write of {length} bytes at {offset} is past the end ({self.size} bytes)")

    # --- writes ------------------------------------------------------------------------------------------------

    def write(self, data, offset: int) -> None:
        self._check(offset, len(data))
        self.wrote = True
        try:
            write_full(self.fd, data, offset)
        except OSError as err:
            error = TargetTooSmallError if err.errno in (errno.ENOSPC, errno.EFBIG) else TargetError
            raise error(f"{self.path}: write at byte {offset} failed: {err.strerror}") from None

    def zero(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) read back as zeros, as cheaply as the target allows."""
        if length <= 0:
            return
        self._check(offset, length)
        self.wrote = True
        try:
            if self.is_block:
                linux.zero_out(self.fd, offset, length)
            else:
                linux.punch_hole(self.fd, offset, length)
            return
        except LinuxError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOTTY):
                raise TargetError(f"{self.path}: zeroing {length} bytes at {offset}: {err}") from None
        while length:
            n = min(length, len(ZERO_BLOCK))
            self.write(memoryview(ZERO_BLOCK)[:n], offset)
            offset += n
            length -= n

    def finish(self) -> list[str]:
        """Flush to stable storage; on a device, drop its cache and have the kernel re-read the partition table.
        Returns warnings for the caller to report."""
        if self.file is None:
            return []
        try:
            os.fsync(self.fd)
        except OSError as err:
            raise TargetError(f"{self.path}: fsync failed: {err.strerror}") from None
        if not self.is_block:
            return []
        linux.flush_buffers(self.fd)
        try:
            linux.reread_partitions(self.fd)
        except LinuxError as err:
            if err.errno == errno.EBUSY:
                return [f"{self.path}: the kernel could not re-read the partition table (device busy)"]
            if err.errno != errno.EINVAL:  # EINVAL: a device without partitions (e.g. a loop device)
                raise TargetError(f"{self.path}: re-reading the partition table: {err}") from None
        return []

    def close(self, failed: bool = False) -> None:
        """Close; after a failed run, remove the file this run created if nothing was written to it."""
        if self.file is not None:
            self.file.close()
        if failed and self.created and not self.wrote:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            self.created = False
