"""frisbeed's scheduler, sans-I/O: decoded requests in, JOIN replies and paced (chunk, block) sends out.

The server is nearly stateless, as in Emulab: it answers JOINs with the file's size and otherwise serves a FIFO
queue of (chunk, block set) work. A request for a chunk already queued is merged into that entry, a full-chunk
request for the chunk being sent right now is dropped (the asker sees those blocks go by anyway), and nothing is
remembered about who got what: clients join late or leave at will and simply ask again for what they miss.

Time is a float in seconds supplied by the caller; the caller also does all reading and sending.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Callable

from .packets import (
    BLOCK_SIZE,
    BLOCKS_PER_CHUNK,
    Block,
    Join,
    Join2,
    JoinReply,
    Leave,
    Leave2,
    Message,
    PRequest,
    Progress,
    Request,
    chunk_blocks,
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


@dataclass(frozen=True)
class Sends:
    """What poll() asks of the caller: send these blocks now, call poll again at wake_at (None: only when a
    message arrives), and stop when done (idle timeout)."""

    blocks: list[tuple[int, int]]
    wake_at: float | None
    done: bool = False


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


class Server:
    """The scheduler of one served file of total_bytes bytes."""

    def __init__(
        self,
        total_bytes: int,
        *,
        pacing: Pacing | None = None,
        idle_timeout: float = 1800,
        now: float = 0.0,
        log: Callable[[str], None] = lambda line: None,
    ):
        self.total_bytes = total_bytes
        self.blocks = total_blocks(total_bytes)
        self.chunks = total_chunks(total_bytes)
        self.pacing = pacing or Pacing.from_bandwidth(None)
        self.idle_timeout = idle_timeout
        self.log = log
        self._queue: deque[_Work] = deque()
        self._newest: dict[int, _Work] = {}  # chunk -> its newest (tail-most) queue entry, where requests merge
        self._run: tuple[int, int, int] | None = None  # (chunk, next block, end) being sent
        self._run_full = False  # the run is a whole chunk
        self._next_burst: float | None = None  # None: idle, the next burst goes out at once
        self._credit = 0.0
        self._last_activity = now  # last request, or when the queue last drained
        self._clients: dict[int, str] = {}  # clientid -> ip, for log lines and the negative idle timeout
        self._seen_clients = False
        self._last_leave = now
        self.stats = {"joins": 0, "leaves": 0, "requests": 0, "merged": 0, "dropped": 0, "ignored": 0, "blocks": 0}

    # --- incoming --------------------------------------------------------------------------------------------------

    def receive(self, msg: Message, srcip: str, now: float) -> list[Message]:
        """Take one valid, decoded message from srcip. Returns the replies to send at once (JOIN replies: they
        go ahead of any queued blocks and outside the rate limit)."""
        if isinstance(msg, Join):
            self._joined(msg.clientid, srcip, 1, now)
            return [JoinReply(self.blocks)]
        if isinstance(msg, Join2) and not msg.reply:
            self._joined(msg.clientid, srcip, 2, now)
            return [Join2(msg.clientid, 0, BLOCKS_PER_CHUNK, BLOCK_SIZE, self.total_bytes, reply=True)]
        if isinstance(msg, Request):
            self._request(msg.chunk, ((1 << msg.count) - 1) << msg.block, srcip, now)
        elif isinstance(msg, PRequest):
            self._request(msg.chunk, int.from_bytes(msg.blockmap, "little"), srcip, now)
        elif isinstance(msg, (Leave, Leave2)):
            self._left(msg.clientid, srcip, msg.elapsed, now)
        elif isinstance(msg, Progress) and msg.reply:
            self._report(msg, srcip, now)
        # Anything else is an echo of a server's own sending (JOIN replies, BLOCKs, PROGRESS requests): ignored.
        return []

    def _joined(self, clientid: int, srcip: str, version: int, now: float) -> None:
        self.stats["joins"] += 1
        self._last_activity = now
        if clientid not in self._clients and len(self._clients) < MAX_TRACKED_CLIENTS:
            self._clients[clientid] = srcip
            self._seen_clients = True
        self.log(f"{srcip} (id {clientid}) joins (v{version}); {len(self._clients)} active clients")

    def _left(self, clientid: int, srcip: str, elapsed: int, now: float) -> None:
        self.stats["leaves"] += 1
        if self._clients.pop(clientid, None) is None:
            self.log(f"{srcip} (id {clientid}): spurious leave ignored")
            return
        self._last_leave = now
        self.log(f"{srcip} (id {clientid}): leaves, ran for {elapsed} seconds; {len(self._clients)} active clients")

    def _report(self, msg: Progress, srcip: str, now: float) -> None:
        if msg.clientid not in self._clients or msg.when == 0:
            return
        self._last_activity = now  # a reporting client keeps the server alive, as in frisbeed
        if msg.summary is not None:
            chunks_in, chunks_out, bytes_out = msg.summary
            self.log(f"{srcip} (id {msg.clientid}): reports recv={chunks_in} decomp={chunks_out} written={bytes_out}")

    def _request(self, chunk: int, bits: int, srcip: str, now: float) -> None:
        size = chunk_blocks(self.total_bytes, chunk)
        bits &= (1 << size) - 1  # nothing past the end of the file (and nothing at all of a chunk outside it)
        if not bits:
            self.stats["ignored"] += 1
            self.log(f"{srcip}: request for chunk {chunk} outside the file ({self.chunks} chunks) ignored")
            return
        self.stats["requests"] += 1
        self._last_activity = now
        full = bits == (1 << size) - 1
        run = self._run
        if full and run is not None and run[0] == chunk and self._run_full:
            self.stats["dropped"] += 1  # every block of it is on its way already
            return
        entry = self._newest.get(chunk)
        if entry is not None and entry is self._queue[0] and run is not None and run[0] == chunk:
            # The head entry is the one being drained: only merge blocks that still lie ahead of the run, so a
            # client cannot keep the head chunk busy forever; earlier ones queue up at the back.
            if (bits & -bits).bit_length() - 1 < run[2]:
                entry = None
        if entry is not None:
            self.stats["merged"] += 1
            entry.bits |= bits
            return
        entry = _Work(chunk, bits)
        self._queue.append(entry)
        self._newest[chunk] = entry

    # --- outgoing ----------------------------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Blocks queued or in the current run."""
        run = self._run
        return sum(w.bits.bit_count() for w in self._queue) + (run[2] - run[1] if run else 0)

    def poll(self, now: float) -> Sends:
        """The blocks due at `now`, paced in bursts, and when to poll next."""
        if not self._has_work():
            return Sends([], self._idle_deadline(), self._idle_done(now))
        pacing = self.pacing
        if pacing.interval is None:
            blocks = self._take(UNLIMITED_BATCH)
            if not self._has_work():
                self._went_idle(now)
                return Sends(blocks, self._idle_deadline())
            return Sends(blocks, now)
        due = self._next_burst
        if due is not None and now < due:
            return Sends([], due)
        # A burst is due. Bursts missed because we woke late (a busy machine) are made up for, at most CATCHUP
        # seconds' worth at once, so -W stays the rate actually sent without ever flooding the switch; frisbeed
        # restarts its clock instead and falls below -W whenever it is descheduled.
        missed = 0 if due is None else int((now - due) / pacing.interval)
        self._credit += pacing.burst * (1 + min(missed, math.ceil(CATCHUP / pacing.interval)))
        count = int(self._credit)
        self._credit -= count
        blocks = self._take(count)
        self._next_burst = (now if due is None else due + missed * pacing.interval) + pacing.interval
        if not self._has_work():
            self._went_idle(now)
            return Sends(blocks, self._idle_deadline())
        return Sends(blocks, self._next_burst)

    def _has_work(self) -> bool:
        return self._run is not None or bool(self._queue)

    def _take(self, count: int) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        while len(out) < count:
            if self._run is None and not self._dequeue():
                break
            chunk, block, end = self._run
            n = min(count - len(out), end - block)
            out.extend((chunk, b) for b in range(block, block + n))
            block += n
            self._run = (chunk, block, end) if block < end else None
        self.stats["blocks"] += len(out)
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
