"""`nodeagent info`: an image described chunk by chunk, like imagedump (optionally verified by decompressing)."""

from __future__ import annotations

from collections.abc import Iterator

from .io.sources import FileSource
from .io.workers import default_workers, ordered_map
from .ndz import codec
from .ndz.check import check_headers
from .ndz.header import SECTOR, ChunkHeader, decode

MiB = 1 << 20


def _check_chunk(item) -> None:
    index, chunk = item
    header = decode(chunk, index)
    payload = memoryview(chunk)[header.regionsize : header.regionsize + header.size]
    if len(payload) < header.size:
        from .errors import ImageFormatError

        raise ImageFormatError(f"chunk {index}: truncated: {len(chunk)} bytes, its header says {header.regionsize + header.size}")
    for _ in codec.decompress(header.codec, payload, header.data_bytes, index):
        pass


def describe(path: str, regions: bool = False, check: bool = False) -> Iterator[str]:
    """imagedump's description of the image at path; raises ImageFormatError (or SourceError) where restoring it
    would be refused before the first write (any bad header, overlapping chunks, a truncated file)."""
    source = FileSource(path)
    try:
        lines = []

        def describe_chunk(index: int, h: ChunkHeader) -> None:
            span = f"sectors [{h.first_sector}-{h.last_sector - 1}]" if h.first_sector is not None else "no sector range (V1)"
            relocs = f", relocations: {', '.join(f'{r.name}@{r.sector}' for r in h.relocs)}" if h.relocs else ""
            lines.append(
                f"chunk {index}: V{h.version} {h.codec}, {h.size} compressed bytes, {span}, "
                f"{len(h.regions)} regions, {h.data_bytes} data bytes{relocs}"
            )
            if regions:
                lines.extend(f"  region [{start}-{start + count - 1}] {count} sectors" for start, count in h.regions)

        summary = check_headers(source.header_areas(), source.size, describe_chunk)
        versions = ", ".join(f"V{v}" for v in sorted(summary.versions))
        yield (
            f"{path}: {summary.chunks} chunks, {versions}, {'/'.join(sorted(summary.codecs))}, "
            f"covered sector range [0-{summary.covered_end_sector - 1}] ({summary.covered_end_sector * SECTOR / MiB:.1f} MiB)"
        )
        for image_id in sorted(summary.image_ids):
            h = image_id.hex()  # UUID text form (the uuid module would cost start-up time: it imports platform)
            yield f"image id {h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
        yield from lines
        ratio = summary.data_bytes / summary.compressed_bytes if summary.compressed_bytes else 0
        yield (
            f"total: {summary.data_bytes} data bytes ({summary.data_bytes / MiB:.1f} MiB) in "
            f"{summary.compressed_bytes} compressed bytes, ratio {ratio:.2f}"
        )
        if check:
            workers = default_workers()
            for _ in ordered_map(_check_chunk, source.chunks(), workers, 2 * workers + 2):
                pass
            yield f"check: all {summary.chunks} chunks decompress to their regions"
    finally:
        source.close()
