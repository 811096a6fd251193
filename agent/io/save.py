"""Save a disk as an image: allocation map -> pieces compressed on all cores -> chunks packed in order -> sink.

The filesystem code (agent.fs) says which sectors hold data; the pieces are read with pread and compressed on
worker threads (zlib and zstandard release the GIL); the packer, on this thread, fills 1 MiB chunks as full as
imagezip does and asks for a piece to be split or recompressed when it must.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

from .. import fs
from ..errors import DestinationError, SourceError
from ..ndz import codec as ndz_codec
from ..ndz.chunker import ChunkPacker, Piece, PiecePlan, choose_version, extents_bytes, pack_piece, plan_pieces
from ..ndz.header import SECTOR
from ..progress import Progress
from .blockfile import open_block_file, read_full, standard_fd, write_full
from .target import busy_reason
from .workers import default_workers, ordered_map

DEFAULT_LEVEL = {"zlib": 4, "zstd": 3}  # zlib 4 is imagezip's default


class Disk:
    """The disk (or disk image file) being saved, read with pread. A short last sector reads zero-padded."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.file = open_block_file(path, os.O_RDONLY, SourceError)
        self.fd, self.size = self.file.fd, self.file.size
        if self.size == 0:
            self.file.close()
            raise SourceError(f"{path}: empty, nothing to save")
        try:
            self.busy = busy_reason(path, self.file.rdev) if self.file.is_block else None
        except BaseException:
            self.file.close()
            raise
        self.sectors = -(-self.size // SECTOR)

    @property
    def short_sector(self) -> tuple[int, int] | None:
        """(sector, valid bytes) when the size is not a whole number of sectors."""
        rest = self.size % SECTOR
        return (self.sectors - 1, rest) if rest else None

    def read(self, offset: int, size: int) -> bytes:
        try:
            data = read_full(self.fd, size, offset)
        except OSError as err:
            raise SourceError(f"{self.path}: read at byte {offset} failed: {err.strerror}") from None
        if len(data) < size and offset + len(data) >= self.size:  # the padding of a short last sector
            data += bytes(size - len(data))
        return data

    def read_extents(self, extents) -> bytes:
        data = b"".join(self.read(start * SECTOR, count * SECTOR) for start, count in extents)
        if len(data) != extents_bytes(extents):
            raise SourceError(f"{self.path}: short read (disk shrank while being saved?)")
        return data

    def close(self) -> None:
        self.file.close()


class Sink:
    """Where chunks go: a file written under a temporary name (DEST.part) and renamed on success, or stdout."""

    def __init__(self, dest: str) -> None:
        self.dest = dest
        self.written = 0
        self.file = None
        if dest == "-":
            self.fd = standard_fd(1, "stdout", DestinationError)
            self.tmp = None
            return
        if os.path.isdir(dest):
            raise DestinationError(f"{dest}: is a directory; give the image's file name")
        self.tmp = f"{dest}.part"
        self.file = open_block_file(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, DestinationError, block=False)
        self.fd = self.file.fd

    def write(self, chunk: bytes) -> None:
        try:
            write_full(self.fd, chunk)
        except OSError as err:
            raise DestinationError(f"{self.dest}: write failed: {err.strerror}") from None
        self.written += len(chunk)

    def commit(self) -> None:
        """Flush and rename DEST.part to DEST; on failure the caller's abort() removes DEST.part."""
        if self.file is None:
            return
        try:
            os.fsync(self.fd)
            self.file.close()
            os.replace(self.tmp, self.dest)
        except OSError as err:
            raise DestinationError(f"{self.dest}: {err.strerror}") from None
        self.tmp = None

    def abort(self) -> None:
        if self.file is None:
            return
        self.file.close()
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except OSError:
                pass


def _is_url(dest: str) -> bool:
    return dest.lower().startswith(("tcp://", "http://", "https://"))


def open_sink(dest: str):
    """DEST: a file, '-' (stdout), tcp://HOST:PORT (one byte stream, as frisupload) or http://HOST/PATH (PUT)."""
    if _is_url(dest):
        from .net_sinks import open_net_sink

        return open_net_sink(dest)
    return Sink(dest)


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
    return Piece(tuple(extents), ndz_codec.compress_piece(codec, level, data, dictionary), adler, len(dictionary))


def save(
    disk_path: str,
    dest: str,
    codec: str = "zlib",
    level: int | None = None,
    raw: bool = False,
    v5: bool = False,
    progress: Progress | None = None,
    workers: int | None = None,
) -> SaveResult:
    """Save the disk at disk_path to dest (a file, or - for stdout). Warnings go to progress.warn."""
    workers = workers or default_workers()
    progress = progress if progress is not None else Progress("read", quiet=True)
    level = DEFAULT_LEVEL[codec] if level is None else level
    if _is_url(dest):
        from ..http.url import parse

        parse(dest)  # a bad URL is refused before the disk is read
    disk = Disk(disk_path)
    try:
        if disk.busy:
            progress.warn(f"{disk_path} is {disk.busy}: files changing while it is read make an inconsistent image")
        disk_map = fs.raw_map(disk.sectors) if raw else fs.scan_disk(disk.read, disk.sectors)
        for warning in disk_map.warnings:
            progress.warn(warning)
        version = choose_version(disk.sectors, v5)
        packer = ChunkPacker(codec, level, version, disk.sectors, short_sector=disk.short_sector)
        total = extents_bytes(disk_map.ranges)
        progress.total = total
        sink = open_sink(dest)
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
