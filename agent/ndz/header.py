"""Chunk headers of Emulab imagezip `.ndz` images: decode and encode, pure.

Every chunk is 1 MiB: a header area of `regionsize` (4096) bytes holding the block header, the region table and
the relocation table, then one compressed stream of `size` bytes, then zero padding. All fields are little-endian
C structs (x86 host order), as the real imagezip writes them.

Versions read: V1, V2, V3, V5 (and our zstd variants of V3/V5). V4 and V6 (the never-deployed crypto formats) are
refused. Versions written: V3 and V5.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ..errors import ImageFormatError

SECTOR = 512
CHUNK_SIZE = 1 << 20
HEADER_AREA = 4096  # DEFAULTREGIONSIZE
CHUNK_MAX = CHUNK_SIZE - HEADER_AREA  # most compressed bytes a chunk can hold

MAGIC_BASE = 0x69696969
MAX_SECTOR_END = ((1 << 63) - 1) // SECTOR  # a byte offset past this does not fit off_t: no disk or file reaches it


def magic_of(version: int) -> int:
    return MAGIC_BASE + version - 1


# Our zstd extension: the top byte of the magic becomes 'z' (bytes on disk "kiiz" for V3, "miiz" for V5). The real
# imageunzip and frisbee then stop with "Bad Magic Number" instead of inflating zstd data as zlib.
ZSTD_TAG = 0x7A
_ZSTD_MAGICS = {(magic_of(v) & 0x00FFFFFF) | (ZSTD_TAG << 24): v for v in (3, 5)}

# Relocation types (imagehdr.h). Only SHORTSECTOR changes what we write; the others fix BSD disklabels and LILO
# maps for slice-relative restores, which a Linux node agent never does.
RELOC_NAMES = {
    0: "none",
    1: "fbsd-disklabel",
    2: "obsd-disklabel",
    3: "lilo-sadd",
    4: "lilo-mapsect",
    5: "lilo-cksum",
    6: "shortsector",
    100: "addpartoffset",
    101: "xor16cksum",
    102: "cksumrange",
}
RELOC_SHORTSECTOR = 6

_V1 = struct.Struct("<IIiiii")  # magic size blockindex blocktotal regionsize regioncount
_V2 = struct.Struct("<IIiiiiIIi")  # + firstsect lastsect reloccount
_V5 = struct.Struct("<IIiiiiIIi4xQQ16s")  # + pad firstsect64 lastsect64 imageid
_REGION32 = struct.Struct("<II")
_REGION64 = struct.Struct("<QQ")
_RELOC32 = struct.Struct("<IIII")  # type sector sectoff size
_RELOC64 = struct.Struct("<IIQQ")  # type sectoff sector size

_LAYOUT = {  # version -> (header struct, region struct, reloc struct)
    1: (_V1, _REGION32, None),
    2: (_V2, _REGION32, _RELOC32),
    3: (_V2, _REGION32, _RELOC32),
    5: (_V5, _REGION64, _RELOC64),
}


def max_regions(version: int) -> int:
    """How many regions fit in a 4 KiB header area with no relocations."""
    hdr, region, _ = _LAYOUT[version]
    return (HEADER_AREA - hdr.size) // region.size


@dataclass(frozen=True)
class Reloc:
    type: int
    sector: int
    offset: int  # byte offset inside the sector
    size: int

    @property
    def name(self) -> str:
        return RELOC_NAMES.get(self.type, f"type-{self.type}")


@dataclass(frozen=True)
class ChunkHeader:
    version: int
    codec: str  # "zlib" or "zstd"
    size: int  # compressed bytes after the header area
    index: int
    regions: tuple[tuple[int, int], ...]  # (start sector, sector count), sorted, disjoint
    first_sector: int | None = None  # None in V1, which has no sector range
    last_sector: int | None = None  # exclusive
    relocs: tuple[Reloc, ...] = ()
    image_id: bytes | None = None  # V5 only
    regionsize: int = HEADER_AREA
    blocktotal: int = 0

    @property
    def data_bytes(self) -> int:
        """Bytes the compressed stream must inflate to."""
        return sum(count for _, count in self.regions) * SECTOR

    @property
    def covered_end_sector(self) -> int:
        """First sector past everything this chunk describes."""
        ends = [start + count for start, count in self.regions]
        if self.last_sector is not None:
            ends.append(self.last_sector)
        return max(ends, default=0)

    @property
    def data_end_bytes(self) -> int:
        """Where this chunk's data ends on the target: a short last sector (SHORTSECTOR) ends early."""
        start, count = self.regions[-1]
        end = (start + count) * SECTOR
        for r in self.relocs:
            if r.type == RELOC_SHORTSECTOR and r.sector == start + count - 1:
                end = r.sector * SECTOR + r.size
        return end

    @property
    def covered_end_bytes(self) -> int:
        """Bytes a target needs to hold this chunk: the covered end, unless the image ends in a short sector."""
        full = self.covered_end_sector * SECTOR
        if self.data_end_bytes < (self.regions[-1][0] + self.regions[-1][1]) * SECTOR and full == (
            self.regions[-1][0] + self.regions[-1][1]
        ) * SECTOR:
            return self.data_end_bytes
        return full


def _fail(index: int | str, why: str) -> ImageFormatError:
    return ImageFormatError(f"chunk {index}: {why}")


def decode(buf: bytes | memoryview, index: int | str = "?") -> ChunkHeader:
    """Decode and validate the header area at the start of one chunk.

    `index` names the chunk in error messages (its position in the file or on the wire).
    """
    if len(buf) < 4:
        raise _fail(index, f"truncated: {len(buf)} bytes, no chunk header")
    (magic,) = struct.unpack_from("<I", buf)
    codec = "zlib"
    if magic in _ZSTD_MAGICS:
        version, codec = _ZSTD_MAGICS[magic], "zstd"
    elif MAGIC_BASE <= magic <= magic_of(6):
        version = magic - MAGIC_BASE + 1
    else:
        raise _fail(index, f"bad magic {magic:#010x}: not an imagezip (.ndz) chunk")
    if version in (4, 6):
        raise _fail(index, f"image version {version} (signed/encrypted chunks) is unsupported")
    hdr_struct, region_struct, reloc_struct = _LAYOUT[version]
    if len(buf) < hdr_struct.size:
        raise _fail(index, f"truncated: {len(buf)} bytes, header needs {hdr_struct.size}")
    fields = hdr_struct.unpack_from(buf)
    _, size, blockindex, blocktotal, regionsize, regioncount = fields[:6]
    first = last = None
    reloccount = 0
    image_id = None
    if version >= 2:
        first, last, reloccount = fields[6:9]
    if version == 5:
        first, last, image_id = fields[9], fields[10], fields[11]

    if regioncount < 0 or reloccount < 0:
        raise _fail(index, f"negative region ({regioncount}) or relocation ({reloccount}) count")
    table_end = hdr_struct.size + regioncount * region_struct.size
    if reloc_struct is not None:
        table_end += reloccount * reloc_struct.size
    if regionsize < table_end or regionsize > HEADER_AREA:
        raise _fail(
            index,
            f"{regioncount} regions and {reloccount} relocations need {table_end} header bytes, "
            f"header area is {regionsize} (at most {HEADER_AREA})",
        )
    if size <= 0 or regionsize + size > CHUNK_SIZE:
        raise _fail(index, f"compressed size {size} does not fit in a {CHUNK_SIZE}-byte chunk")
    if len(buf) < table_end:
        raise _fail(index, f"truncated: {len(buf)} bytes, header tables need {table_end}")
    if regioncount == 0:
        raise _fail(index, "no regions")
    if first is not None and first > last:
        raise _fail(index, f"sector range [{first}, {last}) is reversed")

    regions = []
    prev_end = first if first is not None else 0
    offset = hdr_struct.size
    for i in range(regioncount):
        start, count = region_struct.unpack_from(buf, offset)
        offset += region_struct.size
        if count == 0:
            raise _fail(index, f"region {i} is empty")
        if start < prev_end:
            raise _fail(index, f"region {i} at sector {start} overlaps or precedes the previous one (ends {prev_end})")
        prev_end = start + count
        if last is not None and prev_end > last:
            raise _fail(index, f"region {i} [{start}, {prev_end}) runs past the chunk's last sector {last}")
        regions.append((start, count))
    if max(prev_end, last or 0) > MAX_SECTOR_END:
        raise _fail(index, f"sector range ends at {max(prev_end, last or 0)}, past the 2^63 bytes any disk or file can hold")

    relocs = []
    for i in range(reloccount):
        if reloc_struct is _RELOC32:
            rtype, sector, sectoff, rsize = reloc_struct.unpack_from(buf, offset)
        else:
            rtype, sectoff, sector, rsize = reloc_struct.unpack_from(buf, offset)
        offset += reloc_struct.size
        if sectoff + rsize > SECTOR:
            raise _fail(index, f"relocation {i} spans past its sector ({sectoff}+{rsize} > {SECTOR})")
        if rtype == RELOC_SHORTSECTOR and (sectoff != 0 or not 0 < rsize < SECTOR or not regions or sector != regions[-1][0] + regions[-1][1] - 1):
            raise _fail(index, f"short-sector relocation {i} (sector {sector}, {rsize} bytes) is not the chunk's last sector")
        relocs.append(Reloc(rtype, sector, sectoff, rsize))

    return ChunkHeader(
        version=version,
        codec=codec,
        size=size,
        index=blockindex,
        regions=tuple(regions),
        first_sector=first,
        last_sector=last,
        relocs=tuple(relocs),
        image_id=image_id,
        regionsize=regionsize,
        blocktotal=blocktotal,
    )


def encode(h: ChunkHeader) -> bytes:
    """The 4096-byte header area for `h` (V3 or V5, zlib or zstd)."""
    if h.version not in (3, 5):
        raise ValueError(f"writing version {h.version} is not supported")
    hdr_struct, region_struct, reloc_struct = _LAYOUT[h.version]
    if hdr_struct.size + len(h.regions) * region_struct.size + len(h.relocs) * reloc_struct.size > HEADER_AREA:
        raise ValueError(f"{len(h.regions)} regions do not fit a version {h.version} header")
    magic = magic_of(h.version)
    if h.codec == "zstd":
        magic = (magic & 0x00FFFFFF) | (ZSTD_TAG << 24)
    elif h.codec != "zlib":
        raise ValueError(f"unknown codec {h.codec}")
    common = (magic, h.size, h.index, 0, HEADER_AREA, len(h.regions))
    if h.version == 3:
        head = hdr_struct.pack(*common, h.first_sector, h.last_sector, len(h.relocs))
    else:
        # V5 leaves the 32-bit sector fields 0 and uses the 64-bit ones.
        head = hdr_struct.pack(*common, 0, 0, len(h.relocs), h.first_sector, h.last_sector, h.image_id or bytes(16))
    parts = [head]
    parts += [region_struct.pack(start, count) for start, count in h.regions]
    for r in h.relocs:
        if reloc_struct is _RELOC32:
            parts.append(reloc_struct.pack(r.type, r.sector, r.offset, r.size))
        else:
            parts.append(reloc_struct.pack(r.type, r.offset, r.sector, r.size))
    area = b"".join(parts)
    return area + bytes(HEADER_AREA - len(area))


@dataclass
class ImageSummary:
    """What `info` prints and what imaging needs to know before writing: built from all headers."""

    chunks: int = 0
    versions: set[int] = field(default_factory=set)
    codecs: set[str] = field(default_factory=set)
    covered_end_sector: int = 0
    covered_end_bytes: int = 0
    data_bytes: int = 0
    compressed_bytes: int = 0
    image_ids: set[bytes] = field(default_factory=set)

    def add(self, h: ChunkHeader) -> None:
        self.chunks += 1
        self.versions.add(h.version)
        self.codecs.add(h.codec)
        self.covered_end_sector = max(self.covered_end_sector, h.covered_end_sector)
        self.covered_end_bytes = max(self.covered_end_bytes, h.covered_end_bytes)
        self.data_bytes += h.data_bytes
        self.compressed_bytes += h.size
        if h.image_id is not None:
            self.image_ids.add(h.image_id)
