"""The .ndz format without disks or sockets: headers, codecs, chunk packing."""

from __future__ import annotations

import os
import random
import struct
import zlib

import pytest

from agent.errors import ImageFormatError
from agent.ndz import codec
from agent.ndz.chunker import (
    ChunkPacker,
    Fit,
    Piece,
    pack_piece,
    plan_pieces,
    split_extents,
    tail_extents,
)
from agent.ndz.header import (
    CHUNK_MAX,
    CHUNK_SIZE,
    HEADER_AREA,
    SECTOR,
    ChunkHeader,
    Reloc,
    decode,
    encode,
    magic_of,
    max_regions,
)

# --- headers ------------------------------------------------------------------------------------------------------


def regions_of(chunks) -> list[tuple[int, int]]:
    """All regions of an image, merged where chunks continue each other."""
    merged: list[list[int]] = []
    for h in chunks:
        for start, count in h.regions:
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1][1] += count
            else:
                merged.append([start, count])
    return [tuple(r) for r in merged]


def v3(regions=((0, 8),), first=0, last=100, size=1000, **kw) -> ChunkHeader:
    return ChunkHeader(version=3, codec="zlib", size=size, index=0, regions=tuple(regions), first_sector=first, last_sector=last, **kw)


@pytest.mark.parametrize("version,codec_name", [(3, "zlib"), (5, "zlib"), (3, "zstd"), (5, "zstd")])
def test_encode_decode_round_trip(version, codec_name):
    h = ChunkHeader(
        version=version,
        codec=codec_name,
        size=12345,
        index=7,
        regions=((10, 5), (100, 1 << 20)),
        first_sector=3,
        last_sector=(1 << 33) if version == 5 else 2_000_000,
        relocs=(Reloc(6, 100 + (1 << 20) - 1, 0, 100),),
        image_id=os.urandom(16) if version == 5 else None,
    )
    area = encode(h)
    assert len(area) == HEADER_AREA
    assert decode(area) == h


def test_v3_layout_is_the_c_struct_layout():
    area = encode(v3(regions=((2, 3),), first=1, last=9, size=77))
    assert area[:4] == bytes.fromhex("6b696969")
    assert struct.unpack_from("<IIiiiiIIi", area) == (magic_of(3), 77, 0, 0, 4096, 1, 1, 9, 0)
    assert struct.unpack_from("<II", area, 36) == (2, 3)


def test_v5_layout_has_padding_and_64_bit_fields():
    h = ChunkHeader(version=5, codec="zlib", size=5, index=1, regions=((0, 1),), first_sector=0, last_sector=1 << 40, image_id=b"u" * 16)
    area = encode(h)
    assert struct.unpack_from("<QQ16s", area, 40) == (0, 1 << 40, b"u" * 16)
    assert struct.unpack_from("<QQ", area, 72) == (0, 1)


def test_zstd_chunks_have_a_magic_imageunzip_rejects():
    area = encode(v3()).replace(b"kiii", b"kiii")
    zstd_area = encode(ChunkHeader(version=3, codec="zstd", size=9, index=0, regions=((0, 1),), first_sector=0, last_sector=1))
    (magic,) = struct.unpack_from("<I", zstd_area)
    assert not magic_of(1) <= magic <= magic_of(6)  # outside every magic the real tools accept
    assert zstd_area[:4] == b"kiiz" and area[:4] == b"kiii"
    assert decode(zstd_area).codec == "zstd"


def test_v1_chunks_are_read():
    area = struct.pack("<IIiiii", magic_of(1), 50, 0, 3, 4096, 2) + struct.pack("<IIII", 0, 4, 10, 2)
    h = decode(area + bytes(4096 - len(area)))
    assert (h.version, h.regions, h.first_sector, h.covered_end_sector) == (1, ((0, 4), (10, 2)), None, 12)


def _raw(version, *fields, regions=(), relocs=b""):
    hdr = {2: "<IIiiiiIIi", 3: "<IIiiiiIIi"}[version]
    area = struct.pack(hdr, magic_of(version), *fields) + b"".join(struct.pack("<II", *r) for r in regions) + relocs
    return area + bytes(4096 - len(area))


@pytest.mark.parametrize(
    "area,message",
    [
        (b"\x7fELF" + bytes(4092), "bad magic"),
        (struct.pack("<I", magic_of(4)) + bytes(4092), "version 4"),
        (struct.pack("<I", magic_of(6)) + bytes(4092), "version 6"),
        (b"kii", "truncated"),
        (struct.pack("<I", magic_of(3)) + bytes(10), "truncated"),
        (_raw(3, 10, 0, 0, 4096, 600, 0, 10, 0), "need"),  # 600 regions overflow the 4096-byte header
        (_raw(3, 10, 0, 0, 4096, 1, 0, 10, 300, regions=[(0, 1)]), "need"),  # relocations overflow it
        (_raw(3, 10, 0, 0, 4096, -1, 0, 10, 0), "negative"),
        (_raw(3, CHUNK_SIZE, 0, 0, 4096, 1, 0, 10, 0, regions=[(0, 1)]), "does not fit"),
        (_raw(3, 0, 0, 0, 4096, 1, 0, 10, 0, regions=[(0, 1)]), "does not fit"),
        (_raw(3, 10, 0, 0, 4096, 2, 0, 10, 0, regions=[(4, 2), (1, 1)]), "overlaps or precedes"),
        (_raw(3, 10, 0, 0, 4096, 2, 0, 10, 0, regions=[(0, 4), (3, 1)]), "overlaps or precedes"),
        (_raw(3, 10, 0, 0, 4096, 1, 5, 10, 0, regions=[(2, 1)]), "overlaps or precedes"),  # before firstsect
        (_raw(3, 10, 0, 0, 4096, 1, 0, 10, 0, regions=[(8, 4)]), "runs past"),
        (_raw(3, 10, 0, 0, 4096, 1, 0, 10, 0, regions=[(8, 0)]), "empty"),
        (_raw(3, 10, 0, 0, 4096, 0, 0, 10, 0), "no regions"),
        (_raw(3, 10, 0, 0, 4096, 1, 9, 3, 0, regions=[(0, 1)]), "reversed"),
        (_raw(3, 10, 0, 0, 4096, 1, 0, 10, 1, regions=[(0, 2)], relocs=struct.pack("<IIII", 6, 0, 0, 100)), "short-sector"),
    ],
)
def test_bad_headers_give_one_line_errors_naming_the_chunk(area, message):
    with pytest.raises(ImageFormatError) as err:
        decode(area, 42)
    assert str(err.value).startswith("chunk 42: ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_max_regions_matches_imagezip():
    assert max_regions(3) == 507 and max_regions(5) == 251


# --- codecs -------------------------------------------------------------------------------------------------------


def test_adler32_combine():
    rng = random.Random(1)
    for _ in range(50):
        a, b = rng.randbytes(rng.randrange(0, 5000)), rng.randbytes(rng.randrange(0, 70000))
        assert codec.adler32_combine(zlib.adler32(a), zlib.adler32(b), len(b)) == zlib.adler32(a + b)


@pytest.mark.parametrize("level", [1, 4, 6, 9])
def test_concatenated_pieces_are_one_ordinary_zlib_stream(level):
    rng = random.Random(level)
    parts = [rng.randbytes(3000) * 20, bytes(50000), b"text " * 9000]
    pieces, adler, prev = [], 1, b""
    for p in parts:
        pieces.append(codec.compress_piece("zlib", level, p, prev))
        adler = codec.adler32_combine(adler, zlib.adler32(p), len(p))
        prev = p
    stream = codec.assemble("zlib", level, pieces, adler)
    assert zlib.decompress(stream) == b"".join(parts)  # what the real imageunzip does with it


def test_zstd_pieces_concatenate():
    parts = [b"a" * 100000, os.urandom(5000)]
    stream = codec.assemble("zstd", 3, [codec.compress_piece("zstd", 3, p) for p in parts], 1)
    assert b"".join(codec.decompress("zstd", stream, 105000)) == b"".join(parts)


@pytest.mark.parametrize("name", ["zlib", "zstd"])
@pytest.mark.parametrize("size", [1 << 20, 20 << 20])  # zlib: one call, and bounded pieces
def test_decompress_is_bounded_and_checks_the_size(name, size):
    data = bytes(size)  # inflates 1000-fold: large ones must come out in bounded pieces
    stream = zlib.compress(data) if name == "zlib" else codec.compress_piece("zstd", 3, data)
    pieces = list(codec.decompress(name, stream, len(data)))
    assert max(map(len, pieces)) <= max(codec.PIECE_OUT, codec.ONE_SHOT_MAX) and sum(map(len, pieces)) == len(data)
    with pytest.raises(ImageFormatError, match="more than"):
        list(codec.decompress(name, stream, len(data) - 512))
    with pytest.raises(ImageFormatError, match="inflates to"):
        list(codec.decompress(name, stream, len(data) + 512))
    with pytest.raises(ImageFormatError, match="corrupt|ends early|inflates to"):
        list(codec.decompress(name, stream[: len(stream) // 2], len(data)))
    garbled = bytearray(stream)
    garbled[len(garbled) // 2] ^= 0xFF
    garbled[len(garbled) // 3] ^= 0x55
    with pytest.raises(ImageFormatError, match="chunk 3"):
        list(codec.decompress(name, bytes(garbled), len(data), 3))


# --- packing ------------------------------------------------------------------------------------------------------


class MemoryDisk:
    def __init__(self, data: bytes):
        self.data = data

    def read_extents(self, extents) -> bytes:
        return b"".join(self.data[s * SECTOR : (s + n) * SECTOR] for s, n in extents)


def make_disk(rng: random.Random, sectors: int) -> bytes:
    """Runs of random, text-like and zero data, so ratios change under the packer's feet."""
    words = [rng.randbytes(rng.randrange(2, 9)).hex() for _ in range(300)]
    out = bytearray()
    while len(out) < sectors * SECTOR:
        kind = rng.choice("rtz")
        n = rng.randrange(1, 600) * SECTOR
        if kind == "r":
            out += rng.randbytes(n)
        elif kind == "t":
            out += " ".join(rng.choice(words) for _ in range(n // 5)).encode()[:n].ljust(n, b".")
        else:
            out += bytes(n)
    return bytes(out[: sectors * SECTOR])


def save_in_memory(disk: MemoryDisk, ranges, total, codec_name="zlib", level=4, version=3):
    packer = ChunkPacker(codec_name, level, version, total)

    def compress(extents, dict_extents=()):
        data = disk.read_extents(extents)
        dictionary = disk.read_extents(dict_extents) if dict_extents else b""
        return Piece(tuple(extents), codec.compress_piece(codec_name, level, data, dictionary), zlib.adler32(data), len(dictionary))

    chunks = []
    for plan in plan_pieces(ranges, codec_name):
        pack_piece(packer, compress(plan.extents, plan.dict_extents), compress)
        chunks += packer.ready()
    packer.finish()
    return chunks + packer.ready()


def restore_in_memory(chunks, total) -> bytearray:
    out = bytearray(total * SECTOR)
    for i, chunk in enumerate(chunks):
        assert len(chunk) == CHUNK_SIZE
        h = decode(chunk, i)
        data = b"".join(codec.decompress(h.codec, chunk[HEADER_AREA : HEADER_AREA + h.size], h.data_bytes, i))
        if h.codec == "zlib":
            assert zlib.decompress(chunk[HEADER_AREA : HEADER_AREA + h.size]) == data
        pos = 0
        for start, count in h.regions:
            out[start * SECTOR : (start + count) * SECTOR] = data[pos : pos + count * SECTOR]
            pos += count * SECTOR
    return out


@pytest.mark.parametrize("codec_name,version", [("zlib", 3), ("zlib", 5), ("zstd", 3)])
def test_packed_chunks_restore_the_ranges_and_are_full(codec_name, version):
    rng = random.Random(7)
    total = 40000
    disk = MemoryDisk(make_disk(rng, total))
    ranges = [(0, 3000), (3100, 9000), (12105, 1), (12110, 20000), (35000, 5000)]
    chunks = save_in_memory(disk, ranges, total, codec_name, version=version)
    hs = [decode(c, i) for i, c in enumerate(chunks)]
    assert {h.version for h in hs} == {version}
    assert regions_of(hs) == ranges
    assert hs[0].first_sector == 0 and hs[-1].last_sector == total
    for a, b in zip(hs, hs[1:]):
        assert a.last_sector == b.first_sector == b.regions[0][0]
        assert a.size > CHUNK_MAX - 8192  # as full as imagezip's (it stops below 8 KiB free)
    assert [h.index for h in hs] == list(range(len(hs)))
    if version == 5:
        assert len({h.image_id for h in hs}) == 1 and hs[0].image_id != bytes(16)
    expected = bytearray(total * SECTOR)
    for start, count in ranges:
        expected[start * SECTOR : (start + count) * SECTOR] = disk.data[start * SECTOR : (start + count) * SECTOR]
    assert restore_in_memory(chunks, total) == expected


def test_packing_ratio_is_close_to_one_stream():
    rng = random.Random(3)
    total = 30000
    disk = MemoryDisk(make_disk(rng, total))
    chunks = save_in_memory(disk, [(0, total)], total)
    ours = sum(decode(c).size for c in chunks)
    one_stream = len(zlib.compress(disk.data, 4))
    assert ours < one_stream * 1.03


@pytest.mark.parametrize("version", [3, 5])
def test_region_table_limit(version):
    """Thousands of one-sector ranges: chunks end when the region table is full, as imagezip's do."""
    total = 20000
    disk = MemoryDisk(os.urandom(total * SECTOR))
    ranges = [(s, 1) for s in range(0, total, 2)]
    chunks = save_in_memory(disk, ranges, total, version=version)
    hs = [decode(c, i) for i, c in enumerate(chunks)]
    assert max(len(h.regions) for h in hs) == max_regions(version)
    assert regions_of(hs) == ranges


def test_extent_helpers():
    ext = ((0, 4), (10, 3), (20, 5))
    assert split_extents(ext, 5) == (((0, 4), (10, 1)), ((11, 2), (20, 5)))
    assert split_extents(ext, 0) == ((), ext)
    assert split_extents(ext, 99) == (ext, ())
    assert tail_extents(ext, 6) == ((11, 2), (20, 5)) or tail_extents(ext, 6) == ((12, 1), (20, 5))
    assert sum(n for _, n in tail_extents(ext, 6)) == 6


def test_dictionary_never_reaches_before_a_chunk_start():
    """Text whose back-references lean on the previous piece: after a split, a chunk may start with a short rest of
    a piece; the next piece's dictionary then reaches before the chunk and must be dropped."""
    rng = random.Random(11)
    words = [rng.randbytes(rng.randrange(3, 12)).hex().encode() for _ in range(2000)]
    text = b" ".join(rng.choice(words) for _ in range(3_000_000))
    total = len(text) // SECTOR
    disk = MemoryDisk(text[: total * SECTOR])
    chunks = save_in_memory(disk, [(0, total)], total)
    assert len(chunks) > 8
    assert restore_in_memory(chunks, total) == disk.data


def test_packer_wants_a_fresh_piece_when_its_dictionary_is_not_in_the_chunk():
    packer = ChunkPacker("zlib", 4, 3, 10_000)
    small = Piece(((0, 2),), codec.compress_piece("zlib", 4, bytes(1024)), zlib.adler32(bytes(1024)), 0)
    packer.add(small)  # a chunk that starts with only 1 KiB of input
    with_dict = Piece(((2, 64),), b"x" * 100, 1, 32 << 10)
    assert packer.judge(with_dict).fit is Fit.FRESH_NEEDED
    packer.add(Piece(((2, 62),), b"x" * 100, 1, 1024))  # a dictionary that is all inside the chunk is fine
    assert packer.judge(Piece(((64, 64),), b"x" * 100, 1, 32 << 10)).fit is Fit.FITS


def test_v5_image_ids_are_version_4_uuids():
    import uuid

    from agent.ndz.chunker import random_uuid4

    ids = {random_uuid4() for _ in range(200)}
    assert len(ids) == 200
    for raw in ids:
        u = uuid.UUID(bytes=raw)
        assert (u.version, u.variant) == (4, uuid.RFC_4122)
