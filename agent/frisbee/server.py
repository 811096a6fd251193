"""frisbeed's scheduler, a sans-I/O engine: datagrams in; JOIN replies, paced runs of blocks and log events out.

The server is nearly stateless, as in Emulab: it answers JOINs with the file's size and otherwise serves a FIFO
queue of (chunk, block set) work. A request for a chunk already queued is merged into that entry, a full-chunk
request for the chunk being sent right now is dropped (the asker sees those blocks go by anyway), and nothing is
remembered about who got what: clients join late or leave at will and simply ask again for what they miss.

Time is a float in seconds supplied by the caller; the caller also does all reading and sending (see Server).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Union

from ..sansio import Address, Engine, Outgoing
from .packets import (
    BLOCK_SIZE,
    BLOCKS_PER_CHUNK,
    Join,
    Join2,
    JoinReply,
    Leave,
    Leave2,
    Message,
    PacketError,
    PRequest,
    Progress,
    Request,
    accept_source,
    chunk_blocks,
    decode,
    encode,
    encode_blocks,
    total_blocks,
    total_chunks,
)

# frisbeed's pacing constants (decls.h / server.c).
BURST_SIZE = 16  # SERVER_BURST_SIZE: blocks per burst by default
BURST_GAP = 0.002  # SERVER_BURST_GAP: 2000 us between bursts by default
CLOCK = 0.001  # frisbeed assumes a 1 ms sleep resolution on Linux and paces in whole ticks
CATCHUP = 0.010  # the most sending time a late burst makes up for
WIRE_BITS_PER_BLOCK = (1080 + 28 + 38) * 8  # sizeof(Packet_t) + IP/UDP + Ethernet framing, in bits
UNLIMITED_BATCH = 32  # blocks handed out per poll when unpaced (frisbeed's SERVER_READ_SIZE)
LEAVE_GRACE = 2.0  # with a negative idle timeout, exit this long after the last client leaves
MAX_TRACKED_CLIENTS = 1024  # clients remembered for log lines only (frisbeed's MAXCLIENTS)


@dataclass(frozen=True)
class Pacing:
    """Bursts of `burst` blocks every `interval` seconds; burst may be fractional (the remainder is carried to
    the next burst, so the average rate is what was asked for). interval None = unlimited."""

    burst: float
    interval: float | None

    @classmethod
    def from_bandwidth(cls, bits_per_second: int | None) -> Pacing:
        """frisbeed -W: None = the default 16 blocks / 2 ms (73.344 Mbit/s), 0 = unlimited."""
        if bits_per_second is None:
            return cls(BURST_SIZE, BURST_GAP)
        if bits_per_second < 0:
            raise ValueError(f"bandwidth must be >= 0, not {bits_per_second}")
        if bits_per_second == 0:
            return cls(1, None)
        blocks_per_second = bits_per_second / WIRE_BITS_PER_BLOCK
        # One burst per clock tick; below one block per tick, stretch the gap to whole ticks as frisbeed does.
        interval = CLOCK if blocks_per_second >= 1 / CLOCK else math.ceil(1 / blocks_per_second / CLOCK) * CLOCK
        return cls(blocks_per_second * interval, interval)

    @property
    def blocks_per_second(self) -> float:
        return math.inf if self.interval is None else self.burst / self.interval

    def describe(self) -> str:
        if self.interval is None:
            return "Maximum send bandwidth unlimited"
        bps = self.blocks_per_second
        return f"Maximum send bandwidth {bps * WIRE_BITS_PER_BLOCK / 1e6:.3f} Mbits/sec ({bps:.0f} blocks/sec)"


# ---------------------------------------------------------------------------------------------------------------
# events out (the shell logs them, except BlocksDue and Idle, which it acts on)


@dataclass(frozen=True)
class BlocksDue:
    """Send blocks [block, block + count) of chunk now: read them and hand them to `send_blocks`."""

    chunk: int
    block: int
    count: int


@dataclass(frozen=True)
class Idle:
    """The idle timeout has passed (negative idle_timeout: the last client left): the session is over."""

    idle_timeout: float


@dataclass(frozen=True)
class ClientJoined:
    ip: str
    clientid: int
    version: int  # JOIN (1) or JOIN2 (2)
    clients: int  # active clients now


@dataclass(frozen=True)
class ClientLeft:
    ip: str
    clientid: int
    elapsed: int  # seconds, as the client reports
    clients: int


@dataclass(frozen=True)
class SpuriousLeave:
    """A LEAVE from a client that never joined (or left already): ignored."""

    ip: str
    clientid: int


@dataclass(frozen=True)
class ClientReport:
    """A PROGRESS report with a summary."""

    ip: str
    clientid: int
    chunks_in: int
    chunks_out: int
    bytes_out: int


@dataclass(frozen=True)
class RequestOutsideFile:
    """A request for no block inside the file (a chunk past its end, or an empty map): ignored."""

    ip: str
    chunk: int
    chunks: int  # chunks in the file


@dataclass(frozen=True)
class BadPacket:
    """A datagram that is not a valid frisbee packet: dropped."""

    source: Address
    reason: str


@dataclass(frozen=True)
class ForgedSource:
    """A datagram whose header does not name its sender, or from another port (packets.accept_source): dropped."""

    source: Address
    header_ip: str


Event = Union[
    BlocksDue, Idle, ClientJoined, ClientLeft, SpuriousLeave, ClientReport, RequestOutsideFile, BadPacket, ForgedSource
]


class _Work:
    """A queue entry: a chunk and the set of its blocks wanted (bit b = block b)."""

    __slots__ = ("chunk", "bits")

    def __init__(self, chunk: int, bits: int):
        self.chunk = chunk
        self.bits = bits


def _first_run(bits: int) -> tuple[int, int]:
    """(first block, length) of the lowest contiguous run of set bits; bits must be non-zero."""
    start = (bits & -bits).bit_length() - 1
    shifted = bits >> start
    return start, ((shifted + 1) & ~shifted).bit_length() - 1  # trailing ones of shifted


class Server(Engine):
    """The scheduler of one served file of total_bytes bytes, a sans-I/O engine (agent/sansio.py).

    receive() takes every datagram that reaches the server's socket; JOIN replies go out at once (ahead of any
    queued blocks, outside the rate limit) through outgoing(). timer() hands out the paced blocks as BlocksDue
    events, whose bytes the shell reads and gives to send_blocks(), which returns their BLOCK datagrams.
    """

    def __init__(
        self,
        total_bytes: int,
        myip: str,
        *,
        port: int | None = None,
        session_addr: str | None = None,
        pacing: Pacing | None = None,
        idle_timeout: float = 1800,
        now: float = 0.0,
    ):
        """myip: the srcip of what we send. port, session_addr: the session's, for packets.accept_source (None:
        any source port; no datagram comes from the session address). idle_timeout: seconds without requests
        before Idle (0: never; negative: LEAVE_GRACE after the last client leaves)."""
        self.total_bytes = total_bytes
        self.myip = myip
        self.port = port
        self.session_addr = session_addr
        self.blocks = total_blocks(total_bytes)
        self.chunks = total_chunks(total_bytes)
        self.pacing = pacing or Pacing.from_bandwidth(None)
        self.idle_timeout = idle_timeout
        self._outbox: list[Outgoing] = []
        self._queue: deque[_Work] = deque()
        self._newest: dict[int, _Work] = {}  # chunk -> its newest (tail-most) queue entry, where requests merge
        self._run: tuple[int, int, int] | None = None  # (chunk, next block, end) being sent
        self._run_full = False  # the run is a whole chunk
        self._next_burst: float | None = None  # None: idle, the next burst goes out at once
        self._credit = 0.0
        self._clock = now  # the latest `now` given: when work is due at once
        self._finished = False
        self._last_activity = now  # last request, or when the queue last drained
        self._clients: dict[int, str] = {}  # clientid -> ip, for log lines and the negative idle timeout
        self._seen_clients = False
        self._last_leave = now
        self.stats = {
            "joins": 0, "leaves": 0, "requests": 0, "merged": 0, "dropped": 0, "ignored": 0, "blocks": 0,
            "bad_packets": 0,
        }

    # --- incoming --------------------------------------------------------------------------------------------------

    def receive(self, data: bytes, source: Address, now: float) -> list[Event]:
        """One UDP payload from source (ip, port)."""
        self._clock = now
        try:
            msg, hdr_ip = decode(data)
        except PacketError as err:
            self.stats["bad_packets"] += 1
            return [BadPacket(source, str(err))]
        if not accept_source(
            msg, hdr_ip, source[0], source[1], session_addr=self.session_addr, port=self.port, client=False
        ):
            self.stats["bad_packets"] += 1
            return [ForgedSource(source, hdr_ip)]
        if isinstance(msg, Join):
            self._reply(JoinReply(self.blocks))
            return [self._joined(msg.clientid, hdr_ip, 1, now)]
        if isinstance(msg, Join2) and not msg.reply:
            self._reply(Join2(msg.clientid, 0, BLOCKS_PER_CHUNK, BLOCK_SIZE, self.total_bytes, reply=True))
            return [self._joined(msg.clientid, hdr_ip, 2, now)]
        if isinstance(msg, Request):
            return self._request(msg.chunk, ((1 << msg.count) - 1) << msg.block, hdr_ip, now)
        if isinstance(msg, PRequest):
            return self._request(msg.chunk, int.from_bytes(msg.blockmap, "little"), hdr_ip, now)
        if isinstance(msg, (Leave, Leave2)):
            return [self._left(msg.clientid, hdr_ip, msg.elapsed, now)]
        if isinstance(msg, Progress) and msg.reply:
            return self._report(msg, hdr_ip, now)
        # Anything else is an echo of a server's own sending (JOIN replies, BLOCKs, PROGRESS requests): ignored.
        return []

    def _reply(self, msg: Message) -> None:
        self._outbox.append(Outgoing(encode(msg, self.myip), None))

    def _joined(self, clientid: int, srcip: str, version: int, now: float) -> ClientJoined:
        self.stats["joins"] += 1
        self._last_activity = now
        if clientid not in self._clients and len(self._clients) < MAX_TRACKED_CLIENTS:
            self._clients[clientid] = srcip
            self._seen_clients = True
        return ClientJoined(srcip, clientid, version, len(self._clients))

    def _left(self, clientid: int, srcip: str, elapsed: int, now: float) -> ClientLeft | SpuriousLeave:
        self.stats["leaves"] += 1
        if self._clients.pop(clientid, None) is None:
            return SpuriousLeave(srcip, clientid)
        self._last_leave = now
        return ClientLeft(srcip, clientid, elapsed, len(self._clients))

    def _report(self, msg: Progress, srcip: str, now: float) -> list[Event]:
        if msg.clientid not in self._clients or msg.when == 0:
            return []
        self._last_activity = now  # a reporting client keeps the server alive, as in frisbeed
        if msg.summary is None:
            return []
        return [ClientReport(srcip, msg.clientid, *msg.summary)]

    def _request(self, chunk: int, bits: int, srcip: str, now: float) -> list[Event]:
        size = chunk_blocks(self.total_bytes, chunk)
        bits &= (1 << size) - 1  # nothing past the end of the file (and nothing at all of a chunk outside it)
        if not bits:
            self.stats["ignored"] += 1
            return [RequestOutsideFile(srcip, chunk, self.chunks)]
        self.stats["requests"] += 1
        self._last_activity = now
        full = bits == (1 << size) - 1
        run = self._run
        if full and run is not None and run[0] == chunk and self._run_full:
            self.stats["dropped"] += 1  # every block of it is on its way already
            return []
        entry = self._newest.get(chunk)
        if entry is not None and entry is self._queue[0] and run is not None and run[0] == chunk:
            # The head entry is the one being drained: only merge blocks that still lie ahead of the run, so a
            # client cannot keep the head chunk busy forever; earlier ones queue up at the back.
            if (bits & -bits).bit_length() - 1 < run[2]:
                entry = None
        if entry is not None:
            self.stats["merged"] += 1
            entry.bits |= bits
            return []
        entry = _Work(chunk, bits)
        self._queue.append(entry)
        self._newest[chunk] = entry
        return []

    # --- outgoing ----------------------------------------------------------------------------------------------------

    def send_blocks(self, chunk: int, block: int, data: bytes) -> list[bytes]:
        """The bytes of a BlocksDue(chunk, block, count), count * BLOCK_SIZE of them (a short last block of the
        file zero-padded) -> their BLOCK datagrams, all for the session address. Returned rather than queued in
        outgoing(), as h11's send() returns bytes: the hot path, where an Outgoing per block would cost more than
        encoding the block."""
        return encode_blocks(chunk, block, data, self.myip)

    def outgoing(self) -> list[Outgoing]:
        out, self._outbox = self._outbox, []
        return out

    def next_deadline(self) -> float:
        if self._finished:
            return math.inf
        if self._has_work():
            if self._next_burst is None or self.pacing.interval is None:
                return self._clock  # at once (idle until now, or unpaced)
            return self._next_burst
        deadline = self._idle_deadline()
        return math.inf if deadline is None else deadline

    def timer(self, now: float) -> list[Event]:
        """The blocks due at `now`, paced in bursts; Idle once the idle timeout has passed."""
        self._clock = now
        if self._finished:
            return []
        if not self._has_work():
            if self._idle_done(now):
                self._finished = True
                return [Idle(self.idle_timeout)]
            return []
        pacing = self.pacing
        if pacing.interval is None:
            due = self._take(UNLIMITED_BATCH)
        else:
            burst = self._next_burst
            if burst is not None and now < burst:
                return []
            # A burst is due. Bursts missed because we woke late (a busy machine) are made up for, at most CATCHUP
            # seconds' worth at once, so -W stays the rate actually sent without ever flooding the switch; frisbeed
            # restarts its clock instead and falls below -W whenever it is descheduled.
            missed = 0 if burst is None else int((now - burst) / pacing.interval)
            self._credit += pacing.burst * (1 + min(missed, math.ceil(CATCHUP / pacing.interval)))
            count = int(self._credit)
            self._credit -= count
            due = self._take(count)
            self._next_burst = (now if burst is None else burst + missed * pacing.interval) + pacing.interval
        if not self._has_work():
            self._went_idle(now)
        return due

    def _has_work(self) -> bool:
        return self._run is not None or bool(self._queue)

    def _take(self, count: int) -> list[Event]:
        """Up to count blocks, as runs of consecutive blocks of one chunk."""
        out: list[Event] = []
        left = count
        while left:
            if self._run is None and not self._dequeue():
                break
            chunk, block, end = self._run
            n = min(left, end - block)
            out.append(BlocksDue(chunk, block, n))
            left -= n
            block += n
            self._run = (chunk, block, end) if block < end else None
        self.stats["blocks"] += count - left
        return out

    def _dequeue(self) -> bool:
        """Move the head entry's first contiguous run of blocks into the current run."""
        if not self._queue:
            return False
        head = self._queue[0]
        size = chunk_blocks(self.total_bytes, head.chunk)
        full = head.bits == (1 << size) - 1
        start, length = _first_run(head.bits)
        head.bits &= ~(((1 << length) - 1) << start)
        if not head.bits:
            self._queue.popleft()
            if self._newest.get(head.chunk) is head:
                del self._newest[head.chunk]
        self._run = (head.chunk, start, start + length)
        self._run_full = full
        return True

    def _went_idle(self, now: float) -> None:
        # The next burst starts afresh, and the idle timeout counts from the last block sent.
        self._next_burst = None
        self._credit = 0.0
        self._last_activity = max(self._last_activity, now)

    # --- idle timeout ------------------------------------------------------------------------------------------------

    def _idle_deadline(self) -> float | None:
        if self.idle_timeout > 0:
            return self._last_activity + self.idle_timeout
        if self.idle_timeout < 0 and self._seen_clients and not self._clients:
            return self._last_leave + LEAVE_GRACE
        return None

    def _idle_done(self, now: float) -> bool:
        deadline = self._idle_deadline()
        return deadline is not None and now >= deadline
