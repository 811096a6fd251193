"""Chunk sources: where an image's 1 MiB chunks come from (a file or stdin here; frisbee and HTTP plug in the same way).

A source yields `(index, chunk_bytes)` in any order. A seekable source can also hand out every chunk's header area
before any data is read, so the target can be checked against the whole image before the first write.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterator
from typing import Protocol

from ..errors import SourceError
from ..ndz.header import CHUNK_SIZE, HEADER_AREA


class ChunkSource(Protocol):
    name: str

    def chunks(self) -> Iterator[tuple[int, bytes]]:
        """Every chunk of the image, each exactly once, as (index, bytes)."""

    def header_areas(self) -> Iterator[tuple[int, bytes]] | None:
        """Every chunk's header area before any data, or None if the source can only be read once."""

    # Optional, for sources that cannot list headers but can fetch the last chunk first (frisbee):
    # def preflight(self) -> tuple[int, bytes]: the last chunk's index and header area, before chunks() starts.
    # Optional, for random-access sources: the restore then reads each chunk's data on the worker that inflates it.
    # def load(self, index: int, nbytes: int) -> bytes


def _read_full(fd: int, size: int, offset: int | None = None) -> bytes:
    """Read up to `size` bytes, retrying short reads (pipes deliver in small pieces); fewer only at EOF."""
    parts = []
    got = 0
    while got < size:
        piece = os.read(fd, size - got) if offset is None else os.pread(fd, size - got, offset + got)
        if not piece:
            break
        parts.append(piece)
        got += len(piece)
    return b"".join(parts) if len(parts) != 1 else parts[0]


class FileSource:
    """An .ndz file on disk: seekable, so headers can be checked first."""

    def __init__(self, path: str) -> None:
        self.name = path
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise SourceError(f"{path}: {err.strerror}") from None
        st = os.fstat(self.fd)
        if not stat.S_ISREG(st.st_mode):
            raise SourceError(f"{path}: not a regular file")
        self.size = st.st_size
        if self.size == 0:
            raise SourceError(f"{path}: empty file, not an image")
        self.count = -(-self.size // CHUNK_SIZE)

    def header_areas(self) -> Iterator[tuple[int, bytes]]:
        for index in range(self.count):
            yield index, os.pread(self.fd, HEADER_AREA, index * CHUNK_SIZE)

    def chunks(self) -> Iterator[tuple[int, bytes]]:
        for index in range(self.count):
            yield index, _read_full(self.fd, CHUNK_SIZE, index * CHUNK_SIZE)

    def load(self, index: int, nbytes: int) -> bytes:
        """The first `nbytes` of chunk `index` (fewer at the end of a truncated file)."""
        return _read_full(self.fd, nbytes, index * CHUNK_SIZE)

    def close(self) -> None:
        os.close(self.fd)


class StreamSource:
    """An image read once from a pipe (stdin): chunks in file order, headers checked as they come."""

    def __init__(self, fd: int | None = None, name: str = "stdin") -> None:
        self.fd = sys.stdin.fileno() if fd is None else fd
        self.name = name

    def header_areas(self) -> None:
        return None

    def chunks(self) -> Iterator[tuple[int, bytes]]:
        index = 0
        while True:
            try:
                chunk = _read_full(self.fd, CHUNK_SIZE)
            except OSError as err:
                raise SourceError(f"{self.name}: {err.strerror}") from None
            if not chunk:
                if index == 0:
                    raise SourceError(f"{self.name}: no data, not an image")
                return
            yield index, chunk
            index += 1

    def close(self) -> None:
        pass


def open_source(spec: str) -> FileSource | StreamSource:
    """SOURCE as given on the command line: a path, or '-' for stdin."""
    return StreamSource() if spec == "-" else FileSource(spec)
