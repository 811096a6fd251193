"""The save side of the format, pure: disk ranges -> pieces -> full 1 MiB chunks.

`plan_pieces` cuts the sector ranges to image into pieces of 64 KiB of input (zlib). Pieces are compressed anywhere
(see codec.compress_piece) and handed, in order, to a `ChunkPacker`, which fills chunks the way imagezip does (as
full as they go, a region table of at most 507 or 251 entries, sector ranges that tile the disk) and says when a
piece must be split or compressed again. The I/O shell (agent.io.save) reads the disk and runs the compressors.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from . import codec as codecs
from .header import CHUNK_MAX, CHUNK_SIZE, RELOC_SHORTSECTOR, SECTOR, ChunkHeader, Reloc, encode, max_regions

Extents = tuple[tuple[int, int], ...]  # (start sector, sector count) in stream order

PIECE_BYTES = {"zlib": 64 << 10, "zstd": 512 << 10}
MIN_ROOM = 4096  # a chunk with less free room than this is closed rather than topped up (imagezip: 8 KiB)


@dataclass(frozen=True)
class PiecePlan:
    """Which disk sectors one piece holds, and which precede it (its compression dictionary)."""

    extents: Extents
    dict_extents: Extents = ()

    @property
    def nbytes(self) -> int:
        return extents_bytes(self.extents)


@dataclass(frozen=True)
class Piece:
    """A compressed piece, ready for the packer."""

    extents: Extents
    data: bytes
    adler: int  # Adler-32 of the input (zlib only; 1 otherwise)
    dict_bytes: int  # input before it that it was compressed against (its back-references may reach there)

    @property
    def nbytes(self) -> int:
        return extents_bytes(self.extents)


def random_uuid4() -> bytes:
    """16 random bytes marked as a version-4 UUID (RFC 4122), as uuid.uuid4().bytes; without the uuid module,
    whose import (it pulls in platform) costs the static binary's start-up ~2 ms."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    return bytes(b)


def extents_bytes(extents: Iterable[tuple[int, int]]) -> int:
    return sum(count for _, count in extents) * SECTOR


def split_extents(extents: Extents, sectors: int) -> tuple[Extents, Extents]:
    """The first `sectors` sectors of `extents`, and the rest."""
    head: list[tuple[int, int]] = []
    for i, (start, count) in enumerate(extents):
        if sectors <= 0:
            return tuple(head), tuple(extents[i:])
        if count <= sectors:
            head.append((start, count))
            sectors -= count
        else:
            head.append((start, sectors))
            return tuple(head), ((start + sectors, count - sectors), *extents[i + 1 :])
    return tuple(head), ()


def tail_extents(extents: Extents, sectors: int) -> Extents:
    """The last `sectors` sectors of `extents`."""
    total = sum(count for _, count in extents)
    return split_extents(extents, max(0, total - sectors))[1]


def plan_pieces(ranges: Iterable[tuple[int, int]], codec: str) -> Iterator[PiecePlan]:
    """Cut sorted disk ranges into pieces of PIECE_BYTES of input (the last may be shorter)."""
    piece_sectors = PIECE_BYTES[codec] // SECTOR
    dict_sectors = codecs.ZLIB_WINDOW // SECTOR if codec == "zlib" else 0
    current: list[tuple[int, int]] = []
    filled = 0
    previous: Extents = ()
    for start, count in ranges:
        while count:
            take = min(count, piece_sectors - filled)
            current.append((start, take))
            filled += take
            start += take
            count -= take
            if filled == piece_sectors:
                extents = tuple(current)
                yield PiecePlan(extents, tail_extents(previous, dict_sectors) if dict_sectors else ())
                previous, current, filled = extents, [], 0
    if current:
        yield PiecePlan(tuple(current), tail_extents(previous, dict_sectors) if dict_sectors else ())


class Fit(enum.Enum):
    FITS = "fits"
    FRESH_NEEDED = "fresh"  # compressed against a dictionary the chunk does not hold: compress again without
    SPLIT = "split"  # does not fit whole: take `prefix_sectors` into this chunk, the rest into the next


@dataclass(frozen=True)
class Verdict:
    fit: Fit
    prefix_sectors: int = 0  # for SPLIT: how much to try (0: close the chunk, nothing more fits)


class ChunkPacker:
    """Packs compressed pieces into chunks. Feed pieces in disk order; collect chunks from `ready()`."""

    def __init__(
        self,
        codec: str,
        level: int,
        version: int,
        total_sectors: int,
        image_id: bytes | None = None,
        short_sector: tuple[int, int] | None = None,
    ) -> None:
        if version == 3 and total_sectors >= 1 << 32:
            raise ValueError("a disk of 2^32 sectors or more needs version 5 chunks")
        self.codec, self.level, self.version = codec, level, version
        self.total_sectors = total_sectors
        self.short_sector = short_sector  # (sector, valid bytes): the disk ends inside this sector
        self.image_id = (image_id or random_uuid4()) if version >= 5 else None
        # Leave room for the short-sector relocation (at most 24 bytes, two region slots) when there may be one.
        self._region_limit = max_regions(version) - (2 if short_sector else 0)
        self._capacity = CHUNK_MAX - codecs.stream_overhead(codec)
        self._index = 0
        self._first_sector = 0  # where the chunk being filled starts (the previous chunk's last sector)
        self._held: tuple[list[tuple[int, int]], bytes] | None = None  # closed chunk waiting for its last sector
        self._ready: list[bytes] = []
        self._new_chunk()

    def _new_chunk(self) -> None:
        self._regions: list[list[int]] = []
        self._pieces: list[bytes] = []
        self._used = 0
        self._in_bytes = 0
        self._adler = 1

    @property
    def room(self) -> int:
        return self._capacity - self._used

    def _new_regions(self, extents: Extents) -> int:
        n = len(extents)
        if self._regions and extents and self._regions[-1][0] + self._regions[-1][1] == extents[0][0]:
            n -= 1  # continues the last region
        return n

    def judge(self, piece: Piece) -> Verdict:
        """Can `piece` go into the chunk being filled?"""
        if piece.dict_bytes > self._in_bytes:  # it would refer back past the start of this chunk's stream
            return Verdict(Fit.FRESH_NEEDED)
        slots = self._region_limit - len(self._regions)
        if len(piece.data) <= self.room and self._new_regions(piece.extents) <= slots:
            return Verdict(Fit.FITS)
        # The prefix must fit both the region table and the room left.
        sectors_by_slots = 0
        allowed = slots + (1 if self._new_regions(piece.extents) < len(piece.extents) else 0)
        for _, count in piece.extents[:allowed]:
            sectors_by_slots += count
        room = self.room
        if room < MIN_ROOM:
            return Verdict(Fit.SPLIT, 0)
        # First guess from this piece's own ratio, which holds well for the next few KiB of the same data.
        guess = (piece.nbytes * room // max(1, len(piece.data))) * 98 // 100
        prefix = min(guess // SECTOR, sectors_by_slots, piece.nbytes // SECTOR - 1)
        return Verdict(Fit.SPLIT, max(0, prefix))

    def safe_prefix_sectors(self) -> int:
        """Sectors that fit the room whatever the data (compression's worst case)."""
        lo, hi = 0, self.room // SECTOR
        while lo < hi:  # largest n with piece_bound(n * SECTOR) <= room
            mid = (lo + hi + 1) // 2
            if codecs.piece_bound(self.codec, mid * SECTOR) <= self.room:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def add(self, piece: Piece) -> None:
        """Append a piece that `judge` said FITS (or a prefix that fits)."""
        assert len(piece.data) <= self.room and piece.dict_bytes <= self._in_bytes
        for start, count in piece.extents:
            if self._regions and self._regions[-1][0] + self._regions[-1][1] == start:
                self._regions[-1][1] += count
            else:
                if not self._regions and self._held is not None:
                    self._release_held(start)
                self._regions.append([start, count])
        assert len(self._regions) <= self._region_limit
        self._pieces.append(piece.data)
        self._used += len(piece.data)
        self._in_bytes += piece.nbytes
        if self.codec == "zlib":
            self._adler = codecs.adler32_combine(self._adler, piece.adler, piece.nbytes)

    def close_chunk(self) -> None:
        """End the chunk being filled (it is emitted once the next chunk's first sector is known)."""
        if not self._pieces:
            return
        stream = codecs.assemble(self.codec, self.level, self._pieces, self._adler)
        self._held = ([tuple(r) for r in self._regions], stream)
        self._new_chunk()

    def finish(self) -> None:
        """No more pieces: close and emit everything."""
        self.close_chunk()
        if self._held is not None:
            self._release_held(self.total_sectors)

    def ready(self) -> list[bytes]:
        """Full 1 MiB chunks completed since the last call, in order."""
        out, self._ready = self._ready, []
        return out

    @property
    def chunks_written(self) -> int:
        return self._index

    def _release_held(self, last_sector: int) -> None:
        regions, stream = self._held
        relocs = ()
        if self.short_sector is not None and regions[-1][0] + regions[-1][1] == self.short_sector[0] + 1:
            relocs = (Reloc(RELOC_SHORTSECTOR, self.short_sector[0], 0, self.short_sector[1]),)
        header = ChunkHeader(
            version=self.version,
            codec=self.codec,
            size=len(stream),
            index=self._index,
            regions=tuple(regions),
            first_sector=self._first_sector,
            last_sector=last_sector,
            relocs=relocs,
            image_id=self.image_id,
        )
        chunk = encode(header) + stream
        self._ready.append(chunk + bytes(CHUNK_SIZE - len(chunk)))
        self._index += 1
        self._first_sector = last_sector
        self._held = None

def pack_piece(packer: ChunkPacker, piece: Piece, recompress: Callable[[Extents], Piece]) -> None:
    """Put one piece into the packer, splitting it or compressing it again (with `recompress`, no dictionary)
    as the packer asks."""
    while True:
        verdict = packer.judge(piece)
        if verdict.fit is Fit.FITS:
            packer.add(piece)
            return
        if verdict.fit is Fit.FRESH_NEEDED:
            piece = recompress(piece.extents)
            continue
        head = None
        sectors = verdict.prefix_sectors
        if sectors:
            head = recompress(split_extents(piece.extents, sectors)[0])
            if packer.judge(head).fit is not Fit.FITS:  # the ratio guess was too bold: take what surely fits
                sectors = min(sectors, packer.safe_prefix_sectors())
                head = recompress(split_extents(piece.extents, sectors)[0]) if sectors else None
        if head is None:
            packer.close_chunk()
            if not piece.dict_bytes:
                continue
            piece = recompress(piece.extents)
            continue
        packer.add(head)
        piece = recompress(split_extents(piece.extents, sectors)[1])



def choose_version(total_sectors: int, want_v5: bool) -> int:
    """V3 unless asked for V5 or a sector number needs more than 32 bits."""
    return 5 if want_v5 or total_sectors >= 1 << 32 else 3
