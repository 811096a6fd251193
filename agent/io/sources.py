"""Chunk sources: where an image's 1 MiB chunks come from (a file or stdin here; frisbee.receive has the network one).

A source yields `(index, chunk_bytes)` in any order. A seekable source can also hand out every chunk's header area
before any data is read, so the target can be checked against the whole image before the first write.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Protocol

from ..errors import SourceError
from ..ndz.header import CHUNK_SIZE, HEADER_AREA
from .blockfile import open_block_file, read_full, standard_fd


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


class FileSource:
    """An .ndz file on disk: seekable, so headers can be checked first."""

    def __init__(self, path: str) -> None:
        self.name = path
        self.file = open_block_file(path, os.O_RDONLY, SourceError, block=False)
        self.fd = self.file.fd
        self.size = self.file.size
        if self.size == 0:
            self.file.close()
            raise SourceError(f"{path}: empty file, not an image")
        self.count = -(-self.size // CHUNK_SIZE)

    def header_areas(self) -> Iterator[tuple[int, bytes]]:
        for index in range(self.count):
            yield index, self._read(HEADER_AREA, index * CHUNK_SIZE)

    def chunks(self) -> Iterator[tuple[int, bytes]]:
        for index in range(self.count):
            yield index, self._read(CHUNK_SIZE, index * CHUNK_SIZE)

    def load(self, index: int, nbytes: int) -> bytes:
        """The first `nbytes` of chunk `index` (fewer at the end of a truncated file)."""
        return self._read(nbytes, index * CHUNK_SIZE)

    def _read(self, size: int, offset: int) -> bytes:
        try:
            return read_full(self.fd, size, offset)
        except OSError as err:
            raise SourceError(f"{self.name}: read at byte {offset} failed: {err.strerror}") from None

    def close(self) -> None:
        self.file.close()


class StreamSource:
    """An image read once from a pipe (stdin): chunks in file order, headers checked as they come."""

    def __init__(self, fd: int | None = None, name: str = "stdin") -> None:
        self.fd = standard_fd(0, name, SourceError) if fd is None else fd
        self.name = name

    def header_areas(self) -> None:
        return None

    def chunks(self) -> Iterator[tuple[int, bytes]]:
        index = 0
        while True:
            try:
                chunk = read_full(self.fd, CHUNK_SIZE)
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
