"""Frisbee datagrams without sockets: byte layouts at the offsets of Emulab's Packet_t, round trips, validation."""

from __future__ import annotations

import os
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.frisbee.packets import (
    BITMAP_BYTES,
    BLOCK_DATA_OFFSET,
    BLOCK_SIZE,
    BLOCKS_PER_CHUNK,
    CHUNK_BYTES,
    REPLY_TYPE,
    REQUEST_TYPE,
    Block,
    Join,
    Join2,
    JoinReply,
    Leave,
    Leave2,
    PacketError,
    PRequest,
    Progress,
    Request,
    bitmap_of,
    block_header,
    blocks_in,
    chunk_blocks,
    decode,
    encode,
    total_chunks,
)

IP = "192.168.7.42"
IP_RAW = bytes([192, 168, 7, 42])  # in_addr: network order, whatever the host order of the other fields
STATS = bytes(range(256)) * 4 + b"\x01\x02\x03\x04"  # 1028 bytes, recognisable


def header(ptype: int, subtype: int, datalen: int, ip: bytes = IP_RAW) -> bytes:
    return struct.pack("<iiI", ptype, subtype, datalen) + ip


def test_constants():
    assert (BLOCK_SIZE, BLOCKS_PER_CHUNK, CHUNK_BYTES, BITMAP_BYTES) == (1024, 1024, 1 << 20, 128)
    assert (REQUEST_TYPE, REPLY_TYPE) == (1, 2)


# --- byte layouts, built by hand at the documented offsets ------------------------------------------------------------

LAYOUTS = [
    # message, hand-built datagram
    (Join(0xDEADBEEF), header(1, 1, 4) + struct.pack("<I", 0xDEADBEEF)),
    (JoinReply(53), header(2, 1, 4) + struct.pack("<i", 53)),
    (Leave(7, 12), header(1, 2, 8) + struct.pack("<Ii", 7, 12)),
    (Leave2(7, 12, STATS), header(1, 5, 1036) + struct.pack("<Ii", 7, 12) + STATS),
    (Request(3, 0, 1024), header(1, 4, 12) + struct.pack("<iii", 3, 0, 1024)),
    (PRequest(9, 1, bytes([0x81]) + bytes(127)), header(1, 6, 136) + struct.pack("<ii", 9, 1) + b"\x81" + bytes(127)),
    (
        Join2(99, 0, 1024, 1024, (5 << 32) + 17, True),
        header(2, 7, 24) + struct.pack("<IiiiQ", 99, 0, 1024, 1024, (5 << 32) + 17),
    ),
    (Join2(99, 0, 1024, 1024, 0, False), header(1, 7, 24) + struct.pack("<IiiiQ", 99, 0, 1024, 1024, 0)),
    (Progress(5, 0, 10, 1, 1, False), header(1, 8, 16) + struct.pack("<IIIHH", 5, 0, 10, 1, 1)),
    (
        Progress(5, 0x0A0B0C0D, 1700000000, 1, 42, True, (3, 2, 1 << 33), STATS),
        header(2, 8, 1060) + struct.pack("<IIIHHIIQ", 5, 0x0A0B0C0D, 1700000000, 1, 42, 3, 2, 1 << 33) + STATS,
    ),
]


@pytest.mark.parametrize("msg,raw", LAYOUTS, ids=lambda v: type(v).__name__ if not isinstance(v, bytes) else "")
def test_layout_matches_hand_built_struct(msg, raw):
    assert encode(msg, IP) == raw
    assert decode(raw) == (msg, IP)


def test_block_layout():
    data = os.urandom(BLOCK_SIZE)
    raw = encode(Block(12, 1023, data), "10.1.2.3")
    assert len(raw) == 1048
    ptype, subtype, datalen = struct.unpack_from("<iiI", raw)
    assert (ptype, subtype, datalen) == (1, 3, 1032)  # BLOCKs go out as type REQUEST
    assert raw[12:16] == bytes([10, 1, 2, 3])
    assert struct.unpack_from("<ii", raw, 16) == (12, 1023)
    assert raw[24:] == data
    assert decode(raw) == (Block(12, 1023, data), "10.1.2.3")


def test_reply_type_join_is_a_join_reply_in_the_same_union_slot():
    raw = header(1, 1, 4) + struct.pack("<I", 1234)
    assert decode(raw)[0] == Join(1234)
    assert decode(header(2, 1, 4) + raw[16:])[0] == JoinReply(1234)


def test_progress_summary_only():
    msg = Progress(1, 2, 3, 1, 4, True, (5, 6, 7))
    raw = encode(msg, IP)
    assert struct.unpack_from("<I", raw, 8) == (32,)
    assert decode(raw)[0] == msg


def test_srcip_round_trips_any_address():
    for ip in ("0.0.0.0", "255.255.255.255", "127.0.0.1", "239.192.1.1"):
        assert decode(encode(Join(1), ip))[1] == ip


# --- round trips ---------------------------------------------------------------------------------------------------

u32 = st.integers(0, 2**32 - 1)
i32 = st.integers(-(2**31), 2**31 - 1)
nat32 = st.integers(0, 2**31 - 1)
u16 = st.integers(0, 2**16 - 1)
ips = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))


@st.composite
def requests(draw):
    block = draw(st.integers(0, BLOCKS_PER_CHUNK - 1))
    return Request(draw(nat32), block, draw(st.integers(1, BLOCKS_PER_CHUNK - block)))


messages = st.one_of(
    st.builds(Join, u32),
    st.builds(JoinReply, nat32),
    st.builds(Join2, u32, i32, i32, i32, st.integers(0, 2**64 - 1), st.booleans()),
    st.builds(Leave, u32, i32),
    st.builds(Leave2, u32, i32, st.binary(min_size=1028, max_size=1028)),
    st.builds(Block, nat32, st.integers(0, 1023), st.binary(min_size=1024, max_size=1024)),
    requests(),
    st.builds(PRequest, nat32, i32, st.binary(min_size=128, max_size=128)),
    st.builds(
        Progress,
        u32,
        u32,
        u32,
        u16,
        u16,
        st.booleans(),
        st.none() | st.tuples(u32, u32, st.integers(0, 2**64 - 1)),
        st.just(b"") | st.binary(min_size=1028, max_size=1028),
    ),
)


@settings(max_examples=400, deadline=None)
@given(messages, ips)
def test_round_trip_every_type(msg, ip):
    got, got_ip = decode(encode(msg, ip))
    if isinstance(msg, Progress) and msg.stats and msg.summary is None:
        msg = Progress(**{**msg.__dict__, "summary": (0, 0, 0)})  # stats travel behind a (zero) summary
    assert (got, got_ip) == (msg, ip)


# --- validation -------------------------------------------------------------------------------------------------------

GOOD_REQUEST = header(1, 4, 12) + struct.pack("<iii", 0, 0, 1024)


@pytest.mark.parametrize(
    "raw,why",
    [
        (b"", "short"),
        (GOOD_REQUEST[:15], "short"),
        (header(0, 4, 12) + GOOD_REQUEST[16:], "type"),
        (header(3, 4, 12) + GOOD_REQUEST[16:], "type"),
        (header(-1, 4, 12) + GOOD_REQUEST[16:], "type"),
        (header(1, 0, 12) + GOOD_REQUEST[16:], "subtype"),
        (header(1, 9, 12) + GOOD_REQUEST[16:], "subtype"),
        (header(1, 4, 11) + GOOD_REQUEST[16:27], "datalen"),  # body smaller than a request
        (header(1, 4, 13) + GOOD_REQUEST[16:], "truncated"),  # datalen claims more than arrived
        (header(1, 4, 2000) + GOOD_REQUEST[16:] + bytes(2000), "exceeds"),  # more than a Packet_t holds
        (header(1, 3, 1031) + bytes(1031), "datalen"),
        (header(1, 1, 3) + bytes(3), "datalen"),
        (header(1, 2, 7) + bytes(7), "datalen"),
        (header(1, 5, 1035) + bytes(1035), "datalen"),
        (header(1, 6, 135) + bytes(135), "datalen"),
        (header(1, 7, 23) + bytes(23), "datalen"),
        (header(1, 8, 15) + bytes(15), "datalen"),
    ],
)
def test_malformed_datagrams(raw, why):
    with pytest.raises(PacketError, match=why):
        decode(raw)


@pytest.mark.parametrize(
    "chunk,block,count",
    [(-1, 0, 1), (0, -1, 1), (0, 1024, 1), (0, 0, 0), (0, 0, -5), (0, 0, 1025), (0, 1000, 25), (0, 1023, 2)],
)
def test_request_ranges(chunk, block, count):
    raw = header(1, 4, 12) + struct.pack("<iii", chunk, block, count)
    with pytest.raises(PacketError, match="out of range"):
        decode(raw)
    with pytest.raises(PacketError):
        encode(Request(chunk, block, count), IP)


@pytest.mark.parametrize("block,count", [(0, 1), (0, 1024), (1023, 1), (1000, 24)])
def test_request_edges_are_valid(block, count):
    assert decode(header(1, 4, 12) + struct.pack("<iii", 7, block, count))[0] == Request(7, block, count)


@pytest.mark.parametrize("chunk,block", [(-1, 0), (0, -1), (0, 1024), (-(2**31), 5)])
def test_block_ranges(chunk, block):
    with pytest.raises(PacketError, match="out of range"):
        decode(header(1, 3, 1032) + struct.pack("<ii", chunk, block) + bytes(1024))


def test_prequest_negative_chunk():
    with pytest.raises(PacketError, match="out of range"):
        decode(header(1, 6, 136) + struct.pack("<ii", -1, 0) + bytes(128))


def test_join_reply_negative_blockcount():
    with pytest.raises(PacketError):
        decode(header(2, 1, 4) + struct.pack("<i", -1))


def test_longer_datalen_and_trailing_bytes_are_accepted_as_frisbee_does():
    # PacketValid wants datalen >= the body; PacketReceive wants the datagram >= 16 + datalen.
    raw = header(1, 4, 40) + struct.pack("<iii", 2, 3, 4) + bytes(28) + b"trailing"
    assert decode(raw) == (Request(2, 3, 4), IP)


def test_type_is_not_checked_where_frisbee_does_not():
    # A REPLY-typed BLOCK/REQUEST/LEAVE passes PacketValid; receivers decide what to make of it.
    assert decode(header(2, 4, 12) + struct.pack("<iii", 0, 0, 1))[0] == Request(0, 0, 1)


@pytest.mark.parametrize(
    "msg",
    [
        Block(0, 0, bytes(1023)),
        Block(0, 0, bytes(1025)),
        PRequest(0, 0, bytes(127)),
        Leave2(1, 1, bytes(1000)),
        Progress(1, 1, 1, 2, 1, True, None, bytes(5)),
        Join(2**32),
        Join(-1),
        Join2(1, 0, 1024, 1024, -1, True),
        Leave(1, 2**31),
    ],
)
def test_encode_refuses_what_cannot_be_sent(msg):
    with pytest.raises(PacketError):
        encode(msg, IP)


@pytest.mark.parametrize("ip", ["1.2.3", "256.1.1.1", "::1", "host", ""])
def test_encode_refuses_bad_srcip(ip):
    with pytest.raises(PacketError, match="IPv4"):
        encode(Join(1), ip)


def test_encode_refuses_non_messages():
    with pytest.raises(PacketError):
        encode("JOIN", IP)


# --- fuzz: decode only ever raises PacketError ---------------------------------------------------------------------


def _decodes_or_packet_error(raw: bytes) -> None:
    try:
        msg, ip = decode(raw)
    except PacketError:
        return
    # Whatever decodes must re-encode to something that decodes the same.
    assert decode(encode(msg, ip)) == (msg, ip)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=1200))
def test_fuzz_random_bytes(raw):
    _decodes_or_packet_error(raw)


@settings(max_examples=1500, deadline=None)
@given(
    st.integers(-1, 3), st.integers(-1, 9), st.integers(0, 1100), st.binary(min_size=4, max_size=4),
    st.binary(max_size=1100),
)
def test_fuzz_plausible_headers(ptype, subtype, datalen, ip, body):
    _decodes_or_packet_error(struct.pack("<iiI", ptype, subtype, datalen) + ip + body)


# --- block maps and sizes ------------------------------------------------------------------------------------------


def test_bitmap_is_lsb_first():
    m = bitmap_of([0, 9, 1023])
    assert len(m) == 128
    assert m[0] == 0x01 and m[1] == 0x02 and m[127] == 0x80 and sum(m) == 0x83
    assert blocks_in(m) == [0, 9, 1023]
    assert blocks_in(bytes([0xFF]) * 128) == list(range(1024))
    assert bitmap_of([]) == bytes(128) and blocks_in(bytes(128)) == []


@given(st.sets(st.integers(0, 1023)))
def test_bitmap_round_trip(blocks):
    m = bitmap_of(blocks)
    assert blocks_in(m) == sorted(blocks)
    assert all(bool(m[b // 8] & (1 << (b % 8))) == (b in blocks) for b in range(1024))


@pytest.mark.parametrize("bad", [-1, 1024])
def test_bitmap_of_refuses_out_of_chunk_blocks(bad):
    with pytest.raises(PacketError):
        bitmap_of([bad])


def test_blocks_in_needs_128_bytes():
    with pytest.raises(PacketError):
        blocks_in(bytes(127))


@pytest.mark.parametrize(
    "size,chunks,last_blocks",
    [
        (0, 0, None),
        (1, 1, 1),
        (1024, 1, 1),
        (1025, 1, 2),
        (CHUNK_BYTES, 1, 1024),
        (CHUNK_BYTES + 1, 2, 1),
        (3 * CHUNK_BYTES, 3, 1024),
        (3 * CHUNK_BYTES + 5000, 4, 5),
    ],
)
def test_sizes(size, chunks, last_blocks):
    assert total_chunks(size) == chunks
    if chunks:
        assert chunk_blocks(size, chunks - 1) == last_blocks
        assert all(chunk_blocks(size, c) == 1024 for c in range(chunks - 1))
    assert chunk_blocks(size, chunks) == 0 and chunk_blocks(size, -1) == 0


@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=0, max_size=1100), st.integers(0, 1047), st.binary(min_size=1, max_size=4))
def test_block_fast_path_agrees_with_decode(noise, at, patch):
    """block_header accepts exactly the BLOCKs decode accepts, with the same fields."""
    good = bytearray(encode(Block(3, 7, bytes(range(256)) * 4), "10.1.2.3"))
    good[at : at + len(patch)] = patch
    for datagram in (bytes(good), noise):
        head = block_header(datagram)
        try:
            msg, srcip = decode(datagram)
        except PacketError:
            msg = None
        if isinstance(msg, Block):
            assert head == (msg.chunk, msg.block, socket.inet_aton(srcip))
            assert datagram[BLOCK_DATA_OFFSET : BLOCK_DATA_OFFSET + 1024] == msg.data
        else:
            assert head is None
