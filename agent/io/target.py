"""The disk or file an image is written to: size checks, positional writes, zeroing, and the final flush.

Every write goes through `write`/`zero`, which refuse anything outside [0, limit): whatever an image says, nothing
is written past the end of a block device or outside the range the image was checked against.
"""

from __future__ import annotations

import errno
import os
import stat
import sys

from .. import linux, linux_files
from ..errors import LinuxError, TargetError

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


class Target:
    """An open block device or regular file to write an image to."""

    def __init__(self, path: str, force: bool = False, warn=None) -> None:
        self.path = path
        self.warn = warn or (lambda msg: print(f"nodeagent: warning: {msg}", file=sys.stderr))
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        except OSError as err:
            raise TargetError(f"{path}: {err.strerror}") from None
        self.is_block = st is not None and stat.S_ISBLK(st.st_mode)
        if st is not None and not self.is_block and not stat.S_ISREG(st.st_mode):
            raise TargetError(f"{path}: not a block device or regular file")
        flags = os.O_RDWR | os.O_CLOEXEC
        if self.is_block:
            reason = busy_reason(path, st.st_rdev)
            if reason and not force:
                raise TargetError(f"{path} is {reason}; refusing to write (use --force to override)")
            if not force:
                flags |= os.O_EXCL  # the kernel refuses this while anything holds the device
        else:
            flags |= os.O_CREAT
        try:
            self.fd = os.open(path, flags, 0o644)
        except OSError as err:
            if err.errno == errno.EBUSY:
                raise TargetError(f"{path} is in use; refusing to write (use --force to override)") from None
            raise TargetError(f"{path}: {err.strerror}") from None
        if self.is_block:
            self.size = linux.block_size_bytes(self.fd)
            self.limit = self.size
        else:
            self.size = os.fstat(self.fd).st_size
            self.limit = None  # a file grows to what the image covers

    # --- checks and growth -------------------------------------------------------------------------------------

    def require(self, end: int, what: str) -> None:
        """Make sure bytes up to `end` can be written: refuse on a device that is too small, grow a file."""
        if self.is_block:
            if end > self.size:
                raise TargetError(f"{self.path}: {what} needs {end} bytes, the device has {self.size}")
        elif end > self.size:
            try:
                os.ftruncate(self.fd, end)  # extend only: a file target is never shrunk
            except OSError as err:
                raise TargetError(f"{self.path}: cannot extend to {end} bytes: {err.strerror}") from None
            self.size = end

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or offset + length > self.size:
            raise TargetError(f"{self.path}: write of {length} bytes at {offset} is past the end ({self.size} bytes)")

    # --- writes ------------------------------------------------------------------------------------------------

    def write(self, data, offset: int) -> None:
        self._check(offset, len(data))
        view = memoryview(data)
        while view:
            try:
                written = os.pwrite(self.fd, view, offset)
            except OSError as err:
                raise TargetError(f"{self.path}: write at byte {offset} failed: {err.strerror}") from None
            view = view[written:]
            offset += written

    def zero(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) read back as zeros, as cheaply as the target allows."""
        if length <= 0:
            return
        self._check(offset, length)
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

    def finish(self) -> None:
        """Flush to stable storage; on a device, drop its cache and have the kernel re-read the partition table."""
        try:
            os.fsync(self.fd)
        except OSError as err:
            raise TargetError(f"{self.path}: fsync failed: {err.strerror}") from None
        if not self.is_block:
            return
        linux.flush_buffers(self.fd)
        try:
            linux.reread_partitions(self.fd)
        except LinuxError as err:
            if err.errno == errno.EBUSY:
                self.warn(f"{self.path}: the kernel could not re-read the partition table (device busy)")
            elif err.errno != errno.EINVAL:  # EINVAL: a device without partitions (e.g. a loop device)
                raise TargetError(f"{self.path}: re-reading the partition table: {err}") from None

    def close(self) -> None:
        os.close(self.fd)
