"""The checks an image passes before anything is written: every header valid, one image id, no region overlapping
another chunk's, every chunk's data inside the file. Pure: headers come in as bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ..errors import ImageFormatError
from .coverage import Coverage
from .header import CHUNK_SIZE, ChunkHeader, ImageSummary, decode


def check_headers(
    areas: Iterable[tuple[int, bytes]],
    file_size: int | None = None,
    on_header: Callable[[int, ChunkHeader], None] | None = None,
) -> ImageSummary:
    """Decode and check the header area of every chunk of a file of `file_size` bytes (None: not known);
    `on_header(index, header)` sees each header once it is checked. Raises ImageFormatError at the first problem."""
    summary = ImageSummary()
    seen = Coverage()
    for index, area in areas:
        header = decode(area, index)
        check_image_id(summary, header, index)
        check_overlap(seen, header, index)
        end = index * CHUNK_SIZE + header.regionsize + header.size
        if file_size is not None and end > file_size:
            raise ImageFormatError(
                f"chunk {index}: truncated: its data ends at byte {end} of the image, the file has {file_size} bytes"
            )
        summary.add(header)
        if on_header is not None:
            on_header(index, header)
    return summary


def check_image_id(summary: ImageSummary, header: ChunkHeader, index) -> None:
    """Refuse a chunk of another image (V5 image ids differ)."""
    if header.image_id is not None and summary.image_ids and header.image_id not in summary.image_ids:
        raise ImageFormatError(f"chunk {index}: belongs to another image (image id differs from the first chunk's)")


def check_overlap(seen: Coverage, header: ChunkHeader, index) -> None:
    """Refuse a chunk whose regions meet sectors already in `seen`; add its regions to `seen`."""
    for start, count in header.regions:
        clash = seen.overlap(start, start + count)
        if clash:
            raise ImageFormatError(
                f"chunk {index}: region at sector {start} overlaps sectors {clash[0]}-{clash[1] - 1} already written"
            )
        seen.add(start, start + count)
