"""Restore an image: chunks from a source -> decompress on all cores -> regions written to the target.

Chunks are independent, so each worker inflates one chunk in bounded pieces and writes them with pwrite at their
regions' offsets while the main thread reads and checks the next chunks. With a seekable source every header is
checked (and the target sized) before the first byte is written.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from ..errors import ImageFormatError
from ..ndz import codec
from ..ndz.check import check_headers, check_image_id, check_overlap
from ..ndz.coverage import Coverage
from ..ndz.header import SECTOR, ChunkHeader, ImageSummary, decode
from ..progress import Progress
from .sources import ChunkSource
from .target import Target
from .workers import default_workers, ordered_map


@dataclass
class RestoreResult:
    chunks: int = 0
    data_bytes: int = 0
    zeroed_bytes: int = 0
    covered_end_bytes: int = 0
    versions: set[int] = field(default_factory=set)


def summarize(source: ChunkSource) -> ImageSummary | None:
    """Every header of a seekable source checked (agent.ndz.check) before anything is written; None if the source
    can only be read once."""
    areas = source.header_areas()
    if areas is None:
        return None
    return check_headers(areas, getattr(source, "size", None))


def gaps(header: ChunkHeader) -> Iterator[tuple[int, int]]:
    """Free sector ranges inside a chunk's span: [first_sector, last_sector) minus its regions."""
    position = header.first_sector if header.first_sector is not None else header.regions[0][0]
    for start, count in header.regions:
        if start > position:
            yield position, start - position
        position = start + count
    if header.last_sector is not None and header.last_sector > position:
        yield position, header.last_sector - position


def restore_chunk(target: Target, header: ChunkHeader, chunk: bytes, index, zero: bool) -> tuple[int, int]:
    """Inflate one chunk and write its regions (and zero its gaps if asked). Returns (data, zeroed) bytes."""
    end = header.regionsize + header.size
    if len(chunk) < end:
        raise ImageFormatError(f"chunk {index}: truncated: {len(chunk)} bytes, its header says {end}")
    payload = memoryview(chunk)[header.regionsize : end]
    # A SHORTSECTOR relocation marks the source's last sector as short: imagezip padded it with zeros, and only its
    # first `size` bytes are data, so the write stops there (a restored file keeps the source's exact length).
    stop = header.data_end_bytes
    regions = iter(header.regions)
    offset = left = 0
    for piece in codec.decompress(header.codec, payload, header.data_bytes, index):
        view = memoryview(piece)
        while view:
            if not left:
                start, count = next(regions)
                offset, left = start * SECTOR, count * SECTOR
            n = min(left, len(view))
            if offset < stop:
                target.write(view[: min(n, stop - offset)], offset)
            offset += n
            left -= n
            view = view[n:]
    zeroed = 0
    if zero:
        for start, count in gaps(header):
            target.zero(start * SECTOR, count * SECTOR)
            zeroed += count * SECTOR
    return header.data_bytes, zeroed


def restore(
    source: ChunkSource,
    target: Target,
    zero: bool = False,
    progress: Progress | None = None,
    workers: int | None = None,
) -> RestoreResult:
    """Write every chunk of `source` to `target`. Raises on the first problem; returns totals on success."""
    workers = workers or default_workers()
    progress = progress if progress is not None else Progress("written", quiet=True)
    result = RestoreResult()
    summary = summarize(source)
    preflight = getattr(source, "preflight", None)
    if summary is None and preflight is not None:
        # A network source fetches the image's last chunk first: its header tells how far the image reaches, so a
        # target that is too small is refused before anything is written.
        last = preflight()  # None: this source cannot fetch its last chunk first (an HTTP server without ranges)
        if last is not None:
            result.covered_end_bytes = decode(last[1], last[0]).covered_end_bytes
            target.require(result.covered_end_bytes, "the image")
    if summary is not None:
        if summary.chunks == 0:
            raise ImageFormatError(f"{source.name}: no chunks")
        result.covered_end_bytes = summary.covered_end_bytes
        target.require(result.covered_end_bytes, "the image")
        progress.total = summary.data_bytes
    seen = Coverage()
    first_ids: ImageSummary = ImageSummary()

    # A random-access source hands out header areas here and its data to the workers (source.load), so that
    # reading the image is spread over the cores too.
    load = getattr(source, "load", None) if summary is not None else None

    def checked_chunks() -> Iterator[tuple[ChunkHeader, bytes, int]]:
        for index, chunk in source.header_areas() if load else source.chunks():
            header = decode(chunk, index)
            check_image_id(first_ids, header, index)
            first_ids.add(header)
            check_overlap(seen, header, index)
            end = header.covered_end_bytes
            target.require(end, f"chunk {index}")
            result.covered_end_bytes = max(result.covered_end_bytes, end)
            result.versions.add(header.version)
            yield header, chunk, index

    def work(item) -> tuple[int, int]:
        header, chunk, index = item
        if load:
            chunk = load(index, header.regionsize + header.size)
        return restore_chunk(target, header, chunk, index, zero)

    # Enough chunks in flight that a worker never waits while another inflates a big one (about 1 MiB each).
    for data, zeroed in ordered_map(work, checked_chunks(), workers, depth=4 * workers):
        result.chunks += 1
        result.data_bytes += data
        result.zeroed_bytes += zeroed
        total_chunks = getattr(source, "total_chunks", None) if summary is None else None
        progress.update(result.data_bytes, result.chunks / total_chunks if total_chunks else None)
    if zero and target.is_block and target.size > result.covered_end_bytes:
        # As imageunzip -z: the rest of the device after the image is free space too.
        target.zero(result.covered_end_bytes, target.size - result.covered_end_bytes)
        result.zeroed_bytes += target.size - result.covered_end_bytes
    for warning in target.finish():
        progress.warn(warning)
    return result
