"""Frisbee datagrams (Emulab `Packet_t`): decode, validate and encode, pure.

Every datagram is a 16-byte header `{int32 type, int32 subtype, uint32 datalen, in_addr srcip}` followed by
`datalen` bytes of body. Integers are little-endian (frisbee sends its x86 structs as they are, no htonl);
srcip is the sender's IPv4 address as 4 raw bytes in network order (an `in_addr`).

Validation is as strict as frisbee's PacketReceive + PacketValid, minus the checks that need the image size
(chunk < number of chunks): those are the receiver's job. Anything that fails raises PacketError, and nothing
else: receivers drop such a datagram and count it.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import Iterable, Union

BLOCK_SIZE = 1024
BLOCKS_PER_CHUNK = 1024
CHUNK_BYTES = BLOCK_SIZE * BLOCKS_PER_CHUNK
BITMAP_BYTES = BLOCKS_PER_CHUNK // 8
STATS_BYTES = 1028  # ClientStats_t: int32 version + 256 x uint32

REQUEST_TYPE = 1  # PKTTYPE_REQUEST
REPLY_TYPE = 2  # PKTTYPE_REPLY

# PKTSUBTYPE_*
JOIN, LEAVE, BLOCK, REQUEST, LEAVE2, PREQUEST, JOIN2, PROGRESS = range(1, 9)

HEADER = struct.Struct("<iiI4s")
MAX_DATALEN = 1064  # sizeof(Packet_t) - header: frisbee receives at most 1080 bytes, a longer body is cut off

_JOIN = struct.Struct("<I")  # clientid; the reply has int32 blockcount in the same place (a union)
_JOIN_REPLY = struct.Struct("<i")
_LEAVE = struct.Struct("<Ii")  # clientid elapsed
_BLOCK = struct.Struct("<ii")  # chunk block, then 1024 bytes
_REQUEST = struct.Struct("<iii")  # chunk block count
_PREQUEST = struct.Struct("<ii")  # chunk retries, then the 128-byte map
_JOIN2 = struct.Struct("<IiiiQ")  # clientid blockcount chunksize blocksize bytecount
_PROGRESS = struct.Struct("<IIIHH")  # clientid who when what seq
_SUMMARY = struct.Struct("<IIQ")  # chunks_in chunks_out bytes_out

# Least datalen per subtype (sizeof the message in the union).
BODY_SIZE = {
    JOIN: 4,
    LEAVE: 8,
    BLOCK: 8 + BLOCK_SIZE,
    REQUEST: 12,
    LEAVE2: 8 + STATS_BYTES,
    PREQUEST: 8 + BITMAP_BYTES,
    JOIN2: 24,
    PROGRESS: 16,  # the header only: that is all a server's request carries
}
_PROGRESS_SUMMARY_LEN = 16 + 16
_PROGRESS_FULL_LEN = 16 + 16 + STATS_BYTES  # what a client's report carries when it reports anything

PROGRESS_SUMMARY = 1  # Progress.what bits
PROGRESS_STATS = 2


class PacketError(ValueError):
    """A datagram that is not a valid frisbee packet (receivers drop it and count it), or a message that
    cannot be encoded as one."""


@dataclass(frozen=True)
class Join:
    """JOIN request (v1): a client wants the image; the reply tells it the number of 1 KiB blocks."""

    clientid: int


@dataclass(frozen=True)
class JoinReply:
    """JOIN reply (v1): blocks of 1 KiB in the file (the client assumes blockcount * 1024 bytes)."""

    blockcount: int


@dataclass(frozen=True)
class Join2:
    """JOIN2, both ways. The server's reply carries the exact bytecount (any file, not only 1 MiB multiples)."""

    clientid: int
    blockcount: int
    chunksize: int
    blocksize: int
    bytecount: int
    reply: bool


@dataclass(frozen=True)
class Leave:
    clientid: int
    elapsed: int


@dataclass(frozen=True)
class Leave2:
    clientid: int
    elapsed: int
    stats: bytes  # the raw 1028-byte ClientStats_t


@dataclass(frozen=True)
class Block:
    chunk: int
    block: int
    data: bytes  # exactly BLOCK_SIZE bytes; a short last block of the file is zero-padded


@dataclass(frozen=True)
class Request:
    """Blocks [block, block + count) of a chunk (a client asks for a new chunk with block 0, count 1024)."""

    chunk: int
    block: int
    count: int


@dataclass(frozen=True)
class PRequest:
    """Partial request: the blocks whose bit is set in blockmap (LSB-first, 128 bytes). retries != 0 means the
    last request for this chunk was the sender's own (a hint for congestion control)."""

    chunk: int
    retries: int
    blockmap: bytes


@dataclass(frozen=True)
class Progress:
    """PROGRESS: the server's request (reply False; who/summary/stats unused) or a client's report."""

    clientid: int
    who: int
    when: int
    what: int
    seq: int
    reply: bool
    summary: tuple[int, int, int] | None = None  # chunks_in, chunks_out, bytes_out
    stats: bytes = b""  # empty or a raw 1028-byte ClientStats_t


Message = Union[Join, JoinReply, Join2, Leave, Leave2, Block, Request, PRequest, Progress]


# ---------------------------------------------------------------------------------------------------------------
# decode


def decode(datagram: bytes) -> tuple[Message, str]:
    """One UDP payload -> (message, srcip from its header as a dotted quad). Raises PacketError."""
    if len(datagram) < HEADER.size:
        raise PacketError(f"short datagram ({len(datagram)} bytes)")
    ptype, subtype, datalen, rawip = HEADER.unpack_from(datagram)
    if ptype not in (REQUEST_TYPE, REPLY_TYPE):
        raise PacketError(f"bad packet type {ptype}")
    need = BODY_SIZE.get(subtype)
    if need is None:
        raise PacketError(f"unknown subtype {subtype}")
    if datalen > MAX_DATALEN:
        raise PacketError(f"datalen {datalen} exceeds {MAX_DATALEN}")
    if len(datagram) < HEADER.size + datalen:
        raise PacketError(f"truncated: datalen {datalen} but {len(datagram) - HEADER.size} body bytes")
    if datalen < need:
        raise PacketError(f"datalen {datalen} too small for subtype {subtype} (needs {need})")
    body = memoryview(datagram)[HEADER.size : HEADER.size + datalen]
    msg = _DECODERS[subtype](body, ptype == REPLY_TYPE)
    _check(msg)
    return msg, socket.inet_ntoa(rawip)


_BLOCK_HEAD = struct.Struct("<iiI4sii")  # the header and the chunk/block fields of a BLOCK


def block_header(datagram: bytes) -> tuple[int, int, bytes] | None:
    """(chunk, block, raw srcip) of a well-formed BLOCK, else None (then use decode()).

    The receiver's fast path: a BLOCK is most of what a client sees, and this checks what decode() checks for one
    without building a message or copying its data.
    """
    if len(datagram) < HEADER.size + BODY_SIZE[BLOCK]:
        return None
    ptype, subtype, datalen, rawip, chunk, block = _BLOCK_HEAD.unpack_from(datagram)
    if (
        subtype != BLOCK
        or ptype != REQUEST_TYPE
        or not BODY_SIZE[BLOCK] <= datalen <= MAX_DATALEN
        or len(datagram) < HEADER.size + datalen
        or chunk < 0
        or not 0 <= block < BLOCKS_PER_CHUNK
    ):
        return None
    return chunk, block, rawip


BLOCK_DATA_OFFSET = HEADER.size + 8


def _decode_join(body, reply):
    if reply:
        return JoinReply(*_JOIN_REPLY.unpack_from(body))
    return Join(*_JOIN.unpack_from(body))


def _decode_join2(body, reply):
    return Join2(*_JOIN2.unpack_from(body), reply=reply)


def _decode_block(body, reply):
    chunk, block = _BLOCK.unpack_from(body)
    return Block(chunk, block, bytes(body[8 : 8 + BLOCK_SIZE]))


def _decode_prequest(body, reply):
    chunk, retries = _PREQUEST.unpack_from(body)
    return PRequest(chunk, retries, bytes(body[8 : 8 + BITMAP_BYTES]))


def _decode_leave2(body, reply):
    clientid, elapsed = _LEAVE.unpack_from(body)
    return Leave2(clientid, elapsed, bytes(body[8 : 8 + STATS_BYTES]))


def _decode_progress(body, reply):
    summary = _SUMMARY.unpack_from(body, 16) if len(body) >= _PROGRESS_SUMMARY_LEN else None
    stats = bytes(body[32:_PROGRESS_FULL_LEN]) if len(body) >= _PROGRESS_FULL_LEN else b""
    return Progress(*_PROGRESS.unpack_from(body), reply=reply, summary=summary, stats=stats)


_DECODERS = {
    JOIN: _decode_join,
    LEAVE: lambda body, reply: Leave(*_LEAVE.unpack_from(body)),
    BLOCK: _decode_block,
    REQUEST: lambda body, reply: Request(*_REQUEST.unpack_from(body)),
    LEAVE2: _decode_leave2,
    PREQUEST: _decode_prequest,
    JOIN2: _decode_join2,
    PROGRESS: _decode_progress,
}


# ---------------------------------------------------------------------------------------------------------------
# who may send what


def server_only(msg: Message) -> bool:
    """Messages only a server sends: BLOCKs and PROGRESS requests."""
    return isinstance(msg, Block) or (isinstance(msg, Progress) and not msg.reply)


def accept_source(
    msg: Message,
    hdr_ip: str,
    from_ip: str,
    from_port: int,
    *,
    session_addr: str | None,
    port: int | None,
    client: bool,
) -> bool:
    """frisbee's PacketReceive rule, for clients and servers alike: the header's srcip must be the UDP source
    address, and the UDP source port the session port (port None: not checked). Datagrams from the session
    address itself (newer clients sending from the group, or the unicast peer) are taken at their header's word,
    except, on a client, the messages only a server sends (session_addr None: no such exception)."""
    if from_ip == session_addr and not (client and server_only(msg)):
        from_ip = hdr_ip
    return hdr_ip == from_ip and (port is None or from_port == port)


# ---------------------------------------------------------------------------------------------------------------
# validation shared by decode and encode


def _check(msg: Message) -> None:
    """The range rules of PacketValid/ClientRequest that hold for any image."""
    if isinstance(msg, Block):
        if msg.chunk < 0 or not 0 <= msg.block < BLOCKS_PER_CHUNK:
            raise PacketError(f"BLOCK out of range: chunk {msg.chunk} block {msg.block}")
    elif isinstance(msg, Request):
        if (
            msg.chunk < 0
            or not 0 <= msg.block < BLOCKS_PER_CHUNK
            or msg.count < 1
            or msg.block + msg.count > BLOCKS_PER_CHUNK
        ):
            raise PacketError(f"REQUEST out of range: chunk {msg.chunk} block {msg.block} count {msg.count}")
    elif isinstance(msg, PRequest):
        if msg.chunk < 0:
            raise PacketError(f"PREQUEST out of range: chunk {msg.chunk}")
    elif isinstance(msg, JoinReply):
        if msg.blockcount < 0:
            raise PacketError(f"JOIN reply with negative block count {msg.blockcount}")


# ---------------------------------------------------------------------------------------------------------------
# encode


def encode(msg: Message, srcip: str) -> bytes:
    """The full UDP payload (header + body) for msg, sent by srcip (dotted quad). Raises PacketError."""
    _check(msg)
    try:
        ptype, subtype, body = _encode_body(msg)
    except struct.error as err:
        raise PacketError(f"cannot encode {msg!r:.80}: {err}") from None
    return HEADER.pack(ptype, subtype, len(body), _packed_ip(srcip)) + body


def encode_block(chunk: int, block: int, data: bytes, srcip: str) -> bytes:
    """encode(Block(chunk, block, data), srcip) without building the message: the server's hot path."""
    if not 0 <= chunk < 2**31 or not 0 <= block < BLOCKS_PER_CHUNK or len(data) != BLOCK_SIZE:
        raise PacketError(f"BLOCK out of range: chunk {chunk} block {block} ({len(data)} bytes)")
    return b"".join((_block_header(srcip), _BLOCK.pack(chunk, block), data))


def encode_blocks(chunk: int, first: int, data: bytes, srcip: str) -> list[bytes]:
    """encode_block for each BLOCK_SIZE piece of data, blocks first, first + 1, ...: a run of the server's hot
    path, checked once."""
    count, rest = divmod(len(data), BLOCK_SIZE)
    if rest or not 0 <= chunk < 2**31 or not 0 <= first <= first + count <= BLOCKS_PER_CHUNK:
        raise PacketError(f"BLOCKs out of range: chunk {chunk} blocks {first}+{len(data) / BLOCK_SIZE:g}")
    # One name per line: Nuitka 4.3.3 fails to clone a tuple assignment holding a memoryview() call.
    head = _block_header(srcip)
    pack = _BLOCK.pack
    view = memoryview(data)
    return [
        b"".join((head, pack(chunk, first + k), view[k * BLOCK_SIZE : (k + 1) * BLOCK_SIZE])) for k in range(count)
    ]


def block_prefix(srcip: str) -> bytes:
    """The first 16 bytes of every BLOCK encode_blocks makes for srcip (for a sender that builds the rest)."""
    return _block_header(srcip)


@functools.lru_cache(maxsize=64)
def _block_header(srcip: str) -> bytes:
    return HEADER.pack(REQUEST_TYPE, BLOCK, _BLOCK.size + BLOCK_SIZE, _packed_ip(srcip))


@functools.lru_cache(maxsize=64)
def _packed_ip(srcip: str) -> bytes:
    try:
        return ipaddress.IPv4Address(srcip).packed
    except ValueError:
        raise PacketError(f"not an IPv4 address: {srcip!r}") from None


def _exact(name: str, value: bytes, size: int) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)) or len(value) != size:
        raise PacketError(f"{name} must be {size} bytes")
    return bytes(value)


def _encode_body(msg: Message) -> tuple[int, int, bytes]:
    if isinstance(msg, Block):
        return REQUEST_TYPE, BLOCK, _BLOCK.pack(msg.chunk, msg.block) + _exact("block data", msg.data, BLOCK_SIZE)
    if isinstance(msg, Request):
        return REQUEST_TYPE, REQUEST, _REQUEST.pack(msg.chunk, msg.block, msg.count)
    if isinstance(msg, PRequest):
        bitmap = _exact("blockmap", msg.blockmap, BITMAP_BYTES)
        return REQUEST_TYPE, PREQUEST, _PREQUEST.pack(msg.chunk, msg.retries) + bitmap
    if isinstance(msg, Join):
        return REQUEST_TYPE, JOIN, _JOIN.pack(msg.clientid)
    if isinstance(msg, JoinReply):
        return REPLY_TYPE, JOIN, _JOIN_REPLY.pack(msg.blockcount)
    if isinstance(msg, Join2):
        fields = _JOIN2.pack(msg.clientid, msg.blockcount, msg.chunksize, msg.blocksize, msg.bytecount)
        return (REPLY_TYPE if msg.reply else REQUEST_TYPE), JOIN2, fields
    if isinstance(msg, Leave):
        return REQUEST_TYPE, LEAVE, _LEAVE.pack(msg.clientid, msg.elapsed)
    if isinstance(msg, Leave2):
        return REQUEST_TYPE, LEAVE2, _LEAVE.pack(msg.clientid, msg.elapsed) + _exact("stats", msg.stats, STATS_BYTES)
    if isinstance(msg, Progress):
        body = _PROGRESS.pack(msg.clientid, msg.who, msg.when, msg.what, msg.seq)
        if msg.summary is not None or msg.stats:
            body += _SUMMARY.pack(*(msg.summary or (0, 0, 0)))
        if msg.stats:
            body += _exact("stats", msg.stats, STATS_BYTES)
        return (REPLY_TYPE if msg.reply else REQUEST_TYPE), PROGRESS, body
    raise PacketError(f"not a frisbee message: {type(msg).__name__}")


# ---------------------------------------------------------------------------------------------------------------
# block maps and sizes


def bitmap_of(blocks: Iterable[int]) -> bytes:
    """Block numbers -> 128-byte map, bit b = map[b // 8] & (1 << (b % 8)). Raises PacketError out of range."""
    bits = 0
    for b in blocks:
        if not 0 <= b < BLOCKS_PER_CHUNK:
            raise PacketError(f"block {b} outside a chunk")
        bits |= 1 << b
    # LSB-first within each byte and byte i holding blocks 8i..8i+7 is exactly a little-endian integer.
    return bits.to_bytes(BITMAP_BYTES, "little")


def blocks_in(bitmap: bytes) -> list[int]:
    """The set bits of a 128-byte map, ascending."""
    bits = int.from_bytes(_exact("blockmap", bitmap, BITMAP_BYTES), "little")
    out = []
    while bits:
        low = bits & -bits
        out.append(low.bit_length() - 1)
        bits ^= low
    return out


def total_blocks(total_bytes: int) -> int:
    return -(-total_bytes // BLOCK_SIZE)


def total_chunks(total_bytes: int) -> int:
    return -(-total_blocks(total_bytes) // BLOCKS_PER_CHUNK)


def chunk_blocks(total_bytes: int, chunk: int) -> int:
    """Blocks in that chunk: BLOCKS_PER_CHUNK except maybe the last; 0 for a chunk outside the file."""
    if not 0 <= chunk < total_chunks(total_bytes):
        return 0
    return min(BLOCKS_PER_CHUNK, total_blocks(total_bytes) - chunk * BLOCKS_PER_CHUNK)
