"""Save a disk as an image: allocation map -> pieces compressed on all cores -> chunks packed in order -> sink.

The filesystem code (agent.fs) says which sectors hold data; the pieces are read with pread and compressed on
worker threads (zlib and zstandard release the GIL); the packer, on this thread, fills 1 MiB chunks as full as
imagezip does and asks for a piece to be split or recompressed when it must.
"""

from __future__ import annotations

import os
import stat
import sys
import zlib
from dataclasses import dataclass

from .. import fs, linux
from ..errors import NodeagentError, SourceError
from ..ndz import codec as codecs
from ..ndz.chunker import ChunkPacker, Piece, PiecePlan, choose_version, extents_bytes, pack_piece, plan_pieces
from ..ndz.header import SECTOR
from ..progress import Progress
from .target import busy_reason
from .workers import default_workers, ordered_map

DEFAULT_LEVEL = {"zlib": 4, "zstd": 3}  # zlib 4 is imagezip's default


class Disk:
    """The disk (or disk image file) being saved, read with pread. A short last sector reads zero-padded."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise SourceError(f"{path}: {err.strerror}") from None
        st = os.fstat(self.fd)
        if stat.S_ISBLK(st.st_mode):
            self.size = linux.block_size_bytes(self.fd)
            self.busy = busy_reason(path, st.st_rdev)
        elif stat.S_ISREG(st.st_mode):
            self.size = st.st_size
            self.busy = None
        else:
            raise SourceError(f"{path}: not a block device or regular file")
        if self.size == 0:
            raise SourceError(f"{path}: empty, nothing to save")
        self.sectors = -(-self.size // SECTOR)

    @property
    def short_sector(self) -> tuple[int, int] | None:
        """(sector, valid bytes) when the size is not a whole number of sectors."""
        rest = self.size % SECTOR
        return (self.sectors - 1, rest) if rest else None

    def read(self, offset: int, size: int) -> bytes:
        parts = []
        want = size
        while want:
            try:
                piece = os.pread(self.fd, want, offset)
            except OSError as err:
                raise SourceError(f"{self.path}: read at byte {offset} failed: {err.strerror}") from None
            if not piece:
                break
            parts.append(piece)
            offset += len(piece)
            want -= len(piece)
        data = b"".join(parts)
        if want and offset >= self.size:  # the padding of a short last sector
            data += bytes(want)
        return data

    def read_extents(self, extents) -> bytes:
        data = b"".join(self.read(start * SECTOR, count * SECTOR) for start, count in extents)
        if len(data) != extents_bytes(extents):
            raise SourceError(f"{self.path}: short read (disk shrank while being saved?)")
        return data

    def close(self) -> None:
        os.close(self.fd)


class Sink:
    """Where chunks go: a file written under a temporary name and renamed on success, or stdout."""

    def __init__(self, dest: str) -> None:
        self.dest = dest
        if dest == "-":
            self.fd = sys.stdout.fileno()
            self.tmp = None
        else:
            self.tmp = f"{dest}.part"
            try:
                self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            except OSError as err:
                raise NodeagentError(f"{dest}: {err.strerror}") from None
        self.written = 0

    def write(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            try:
                n = os.write(self.fd, view)
            except OSError as err:
                raise NodeagentError(f"{self.dest}: write failed: {err.strerror}") from None
            view = view[n:]
        self.written += len(chunk)

    def commit(self) -> None:
        if self.tmp is None:
            return
        os.fsync(self.fd)
        os.close(self.fd)
        os.replace(self.tmp, self.dest)

    def abort(self) -> None:
        if self.tmp is None:
            return
        os.close(self.fd)
        try:
            os.unlink(self.tmp)
        except OSError:
            pass


@dataclass
class SaveResult:
    disk_bytes: int
    data_bytes: int
    chunks: int
    image_bytes: int
    version: int
    codec: str
    map: fs.DiskMap


def _compress(disk: Disk, codec: str, level: int, extents, dict_extents=()) -> Piece:
    data = disk.read_extents(extents)
    dictionary = disk.read_extents(dict_extents) if dict_extents else b""
    adler = zlib.adler32(data) if codec == "zlib" else 1
    return Piece(tuple(extents), codecs.compress_piece(codec, level, data, dictionary), adler, len(dictionary))


def save(
    disk_path: str,
    dest: str,
    codec: str = "zlib",
    level: int | None = None,
    raw: bool = False,
    v5: bool = False,
    progress: Progress | None = None,
    workers: int | None = None,
    warn=None,
) -> SaveResult:
    workers = workers or default_workers()
    level = DEFAULT_LEVEL[codec] if level is None else level
    disk = Disk(disk_path)
    if disk.busy and warn is not None:
        warn(f"{disk_path} is {disk.busy}: files changing while it is read make an inconsistent image")
    try:
        disk_map = fs.raw_map(disk.sectors) if raw else fs.scan_disk(disk.read, disk.sectors)
        version = choose_version(disk.sectors, v5)
        packer = ChunkPacker(codec, level, version, disk.sectors, short_sector=disk.short_sector)
        total = extents_bytes(disk_map.ranges)
        if progress is not None:
            progress.total = total
        sink = Sink(dest)
        try:
            done = 0

            def compress_plan(plan: PiecePlan) -> Piece:
                return _compress(disk, codec, level, plan.extents, plan.dict_extents)

            def recompress(extents) -> Piece:
                return _compress(disk, codec, level, extents)

            pieces = ordered_map(compress_plan, plan_pieces(disk_map.ranges, codec), workers, depth=4 * workers + 4)
            for piece in pieces:
                pack_piece(packer, piece, recompress)
                for chunk in packer.ready():
                    sink.write(chunk)
                done += piece.nbytes
                if progress is not None:
                    progress.update(done)
            packer.finish()
            for chunk in packer.ready():
                sink.write(chunk)
            sink.commit()
        except BaseException:
            sink.abort()
            raise
    finally:
        disk.close()
    return SaveResult(
        disk_bytes=disk.size,
        data_bytes=total,
        chunks=packer.chunks_written,
        image_bytes=sink.written,
        version=version,
        codec=codec,
        map=disk_map,
    )
