"""A bounds-checked view of part of a disk, so that on-disk numbers can never make us read outside it."""

from __future__ import annotations

from typing import Callable

from agent.errors import FilesystemError

SECTOR = 512

ReadFn = Callable[[int, int], bytes]


class UnsupportedFilesystem(Exception):
    """A recognised filesystem uses something we cannot reason about; the caller images it whole."""


class Window:
    """Sectors [start, start + sectors) of the disk, read through the caller's `read(offset, size)`.

    Every read is checked against the window's end (a filesystem's own numbers decide where we read, and a
    corrupt one must give FilesystemError, not a read of some other partition), and a short read means the
    disk is shorter than it claims: also FilesystemError.
    """

    def __init__(self, read: ReadFn, start: int, sectors: int, what: str) -> None:
        self._read = read
        self.start = start
        self.sectors = sectors
        self.what = what

    @property
    def size(self) -> int:
        return self.sectors * SECTOR

    def read(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0 or offset + size > self.size:
            raise FilesystemError(
                f"{self.what}: data at byte {offset} (+{size}) lies outside it ({self.sectors} sectors)"
            )
        if size == 0:
            return b""
        data = self._read(self.start * SECTOR + offset, size)
        if len(data) != size:
            raise FilesystemError(
                f"{self.what}: short read at byte {offset}: got {len(data)} of {size} bytes (disk truncated?)"
            )
        return data if isinstance(data, bytes) else bytes(data)

    def sub(self, start: int, sectors: int, what: str) -> Window:
        """The window of `sectors` sectors at sector `start` of this one (which must hold them)."""
        if start < 0 or sectors < 0 or start + sectors > self.sectors:
            raise FilesystemError(f"{what} (sectors {start}+{sectors}) runs past the end of {self.what}")
        return Window(self._read, self.start + start, sectors, what)
