"""An image checked chunk by chunk in file order, as it streams in (an upload): pure.

Each chunk must be a whole 1 MiB with a valid header, numbered in order, tiling the sectors of the one before it
(its first sector is the previous chunk's last), and of the same image (V5 image id). Nothing in an image says
how many chunks it has (imagezip stopped filling `blocktotal` in V2), so the end is the stream's: it must fall
on a chunk boundary, and a sender that fails resets its connection rather than closing it.
"""

from __future__ import annotations

from ..errors import ImageFormatError
from .header import CHUNK_SIZE, ChunkHeader, decode


class ChunkSequence:
    def __init__(self) -> None:
        self.count = 0
        self.data_bytes = 0
        self._prev: ChunkHeader | None = None

    def add(self, chunk) -> ChunkHeader:
        """Check the next chunk (bytes-like, exactly CHUNK_SIZE); returns its header."""
        index = self.count
        if len(chunk) != CHUNK_SIZE:
            raise ImageFormatError(f"chunk {index}: {len(chunk)} bytes, not {CHUNK_SIZE}: the image ends inside it")
        header = decode(chunk, index)
        if header.index != index:
            raise ImageFormatError(f"chunk {index}: its header says it is chunk {header.index}")
        prev = self._prev
        if prev is not None:
            if header.version != prev.version and 1 in (header.version, prev.version):
                raise ImageFormatError(f"chunk {index}: version {header.version} after version {prev.version}")
            if header.image_id != prev.image_id:
                raise ImageFormatError(f"chunk {index}: belongs to another image (image id differs from chunk {index - 1}'s)")
            if header.first_sector is not None and header.first_sector != prev.last_sector:
                raise ImageFormatError(
                    f"chunk {index}: starts at sector {header.first_sector}, but chunk {index - 1} ends at sector "
                    f"{prev.last_sector}: the chunks do not tile (one missing or out of order?)"
                )
            if header.first_sector is None and header.regions[0][0] < prev.covered_end:
                raise ImageFormatError(f"chunk {index}: its first region overlaps chunk {index - 1}'s")
        self._prev = header
        self.count += 1
        self.data_bytes += header.data_bytes
        return header

    def finish(self) -> None:
        if not self.count:
            raise ImageFormatError("no chunks: the image is empty")
