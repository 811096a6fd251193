"""The frisbee client's protocol logic (frisbee's client.c receive thread), a sans-I/O engine (agent/sansio.py).

The shell owns the socket and the clock: it calls `start` once, feeds every datagram to `receive`, calls `timer`
when `next_deadline` has passed, sends `outgoing()` and calls `chunk_taken` once a completed chunk has left its
hands. `server_block` is the seam for a receive fast path that parses BLOCKs itself (they are nearly all of the
traffic): it takes a BLOCK already known to be well formed and from our server. `fast_target` and `fast_blocks`
serve one that also stores them (fastpath.py, in C): the engine names the one chunk whose blocks it may copy and
mark, and accounts for them afterwards exactly as receive() would have.

What it does, as frisbee does it:
  * JOIN: JOIN2 and JOIN v1 every 500 ms until the first reply; the server that answers is the only one whose
    BLOCKs are accepted from then on.
  * Requests are receiver-driven: chunks in a random order (but the image's last chunk first), at most
    `readahead` unseen chunks asked for at a time and none while `inprogress` chunks are partly filled. A new
    chunk is asked for with REQUEST{chunk, 0, n}, missing blocks with PREQUEST{chunk, retries, bitmap}.
  * Any block of a chunk not yet complete is kept (it may answer another client's request) if a buffer is free.
  * Requests and partial requests seen on the group (and blocks we had no room for) stamp their chunk: nobody
    asks again for a chunk somebody asked for in the last second, unless nothing useful has arrived for a while
    (the idle timer).
And where frisbee is weak:
  * the idle timer runs on time since the last useful block, not on receive timeouts (a stream of useless
    packets, e.g. blocks of chunks already done, no longer starves re-requests);
  * when the server moves on from a chunk (it sends a chunk's blocks in ascending runs), the holes its run left
    behind are asked for at once, with the next read-ahead, instead of after the idle timer (a lossy network
    then keeps the server busy: about 25% faster at 10-30% loss in the simulated tests);
  * it backs off geometrically to one request a second while the server is silent, and a snooped request never
    shortens a backed-off wait;
  * the server-silence timeout (`idle_timeout`) is paused while we are asking for nothing because every buffer
    holds a chunk the consumer has not taken yet (a slow disk is not a dead server);
  * one buffer is kept for the image's last chunk until it arrives, so a full memory budget cannot keep the
    caller's size check (which needs that chunk's header) waiting forever.
"""

from __future__ import annotations

import random
import socket
import struct
from dataclasses import dataclass
from typing import Union

from ..errors import NetworkError
from ..sansio import Address, Engine, Outgoing
from .packets import (
    BLOCK_DATA_OFFSET,
    BLOCK_SIZE,
    BLOCKS_PER_CHUNK,
    CHUNK_BYTES,
    PROGRESS_STATS,
    PROGRESS_SUMMARY,
    STATS_BYTES,
    Block,
    Join,
    Join2,
    JoinReply,
    Leave2,
    PacketError,
    PRequest,
    Progress,
    Request,
    accept_source,
    block_header,
    chunk_blocks,
    decode,
    encode,
    total_chunks,
)

JOIN_INTERVAL = 0.5  # frisbee re-sends its JOIN every 500 ms
IDLE_DELAY = 0.09  # 3 receive timeouts of 30 ms without a useful block: ask again
MAX_IDLE_DELAY = 1.0  # the backed-off request rate while the server is silent: about one a second
REDO_DELAY = 1.0  # CLIENT_REQUEST_REDO_DELAY: a chunk somebody asked for is not asked for again within 1 s
MAX_REPORT_INTERVAL = 4295  # frisbee caps the PROGRESS report interval (its fsleep limit)


# ---------------------------------------------------------------------------------------------------------------
# events out


@dataclass(frozen=True)
class Joined:
    total_bytes: int
    total_chunks: int


@dataclass(frozen=True)
class ChunkComplete:
    index: int
    data: bytes  # exactly CHUNK_BYTES; a short last chunk is padded with zeros


@dataclass(frozen=True)
class Finished:
    pass


@dataclass(frozen=True)
class TimedOut:
    silent: float  # seconds without a packet from the server


Event = Union[Joined, ChunkComplete, Finished, TimedOut]
# Outgoing.dest is None (the session address: group, broadcast or unicast server) or an IP, same port.


@dataclass
class ClientStats:
    join_attempts: int = 0
    blocks: int = 0  # BLOCKs from our server
    useful_blocks: int = 0
    dup_blocks: int = 0  # a block of a chunk in progress we already had
    dup_chunks: int = 0  # a block of a chunk already complete
    no_room: int = 0  # blocks dropped: no free chunk buffer
    foreign_blocks: int = 0  # BLOCKs from a host that is not our server
    bad_packets: int = 0  # undecodable, srcip not the sender, wrong port, out of range
    requests: int = 0  # REQUEST + PREQUEST sent
    prequests: int = 0
    rerequests: int = 0  # requests for a chunk we had asked for before
    full_rerequests: int = 0
    lost_blocks: int = 0  # blocks asked for in PREQUESTs
    idles: int = 0  # idle timer firings
    chunks_in: int = 0  # chunks complete
    chunks_out: int = 0  # chunks taken by the consumer


class _Buffer:
    """One chunk being filled: its bytes and a bitmask of the blocks still missing (bit b = block b)."""

    __slots__ = ("data", "missing")

    def __init__(self, blocks: int) -> None:
        self.data = bytearray(CHUNK_BYTES)
        self.missing = (1 << blocks) - 1


_JOINING, _RECEIVING, _DONE = "joining", "receiving", "done"
_CLIENT_STATS = struct.Struct("<i iii QQ iiiiiiiii IIIIIIIIII i IIII")


class Client(Engine):
    """One frisbee client session. See the module docstring; all times are the caller's `now` (seconds)."""

    def __init__(
        self,
        myip: str,
        *,
        port: int | None = None,
        session_addr: str | None = None,
        rng: random.Random | None = None,
        memory_mb: int = 32,
        readahead: int = 2,
        inprogress: int = 8,
        idle_timeout: float = 0,
        randomize: bool = True,
        wall_offset: float = 0.0,
    ) -> None:
        """myip: our address (the srcip of what we send). port: the session port; datagrams from another source
        port are dropped (None: not checked). session_addr: the session address (group, broadcast or unicast
        server), for packets.accept_source (None: no datagram comes from it). memory_mb: chunk buffers of 1 MiB,
        partly filled or complete and not yet taken. idle_timeout: seconds of server silence before TimedOut (0:
        never). wall_offset: added to `now` to get the wall-clock time PROGRESS reports carry."""
        if memory_mb < 1 or readahead < 1 or inprogress < 1:
            raise ValueError("memory_mb, readahead and inprogress must be at least 1")
        self.myip = myip
        self.port = port
        self.session_addr = session_addr
        self.rng = rng if rng is not None else random.Random()
        self.memory_mb = memory_mb
        self.readahead = readahead
        self.inprogress = inprogress
        self.idle_timeout = idle_timeout
        self.randomize = randomize
        self.wall_offset = wall_offset
        self.clientid = self.rng.randrange(1, 1 << 31)  # as random(); 0 would mean "all clients" in PROGRESS
        self.stats = ClientStats()
        self.bytes_out = 0  # bytes written to disk, for PROGRESS reports: set by the caller if it knows
        self.server_ip: str | None = None
        self.total_bytes = 0
        self.total_chunks = 0
        self._phase = _JOINING
        self._started = self._last_server = self._join_at = 0.0
        self._outbox: list[Outgoing] = []
        self._report_at: float | None = None
        self._report_interval = 0
        self._report_what = 0
        self._report_seq = 0
        self._setup(0)

    # -----------------------------------------------------------------------------------------------------------
    # the caller's interface

    def start(self, now: float) -> None:
        """Begin: the first JOINs are queued."""
        self._started = self._last_server = now
        self._send_joins(now)

    @property
    def done(self) -> bool:
        return self._phase == _DONE

    def outgoing(self) -> list[Outgoing]:
        out, self._outbox = self._outbox, []
        return out

    def next_deadline(self) -> float:
        """When `timer` must next be called (inf: never)."""
        if self._phase == _DONE:
            return float("inf")
        deadline = self._join_at if self._phase == _JOINING else self._idle_at
        if self._report_at is not None:
            deadline = min(deadline, self._report_at)
        if self.idle_timeout:
            deadline = min(deadline, self._last_server + self.idle_timeout)
        return deadline

    def timer(self, now: float) -> list[Event]:
        if self._phase == _DONE:
            return []
        if self._phase == _RECEIVING and self._stalled():
            self._last_server = now  # waiting for the consumer, not for the server
        if self.idle_timeout and now - self._last_server >= self.idle_timeout:
            self._phase = _DONE
            return [TimedOut(now - self._last_server)]
        if self._phase == _JOINING:
            if now >= self._join_at:
                self._send_joins(now)
            return []
        if now >= self._idle_at:
            self.stats.idles += 1
            self._request(now, timedout=True)
            # Back off while the server sends nothing at all: 180, 360, 720 ms, then once a second.
            self._backoff = min(self._backoff + 1, 16)
            self._idle_at = now + min(MAX_IDLE_DELAY, IDLE_DELAY * 2**self._backoff)
        if self._report_at is not None and now >= self._report_at:
            self._send_report(now)
            self._report_at = now + self._report_interval
        return []

    def chunk_taken(self, index: int, now: float) -> None:
        """The consumer has taken chunk `index` (its ChunkComplete): its buffer is free again."""
        if index not in self._untaken:
            return
        starved = self._free_buffers() == 0
        self._untaken.discard(index)
        self.stats.chunks_out += 1
        if starved and self._phase == _RECEIVING:
            self._last_server = max(self._last_server, now)  # the silence we caused does not count
            self._request(now, timedout=False)  # we may have stopped asking: resume now, not at the next idle tick

    def receive(self, data: bytes, source: Address, now: float) -> list[Event]:
        """One UDP payload from source (ip, port)."""
        if self._phase == _DONE:
            return []
        ip, port = source[0], source[1]
        if self._phase == _RECEIVING:
            head = block_header(data)  # the fast path for what almost every datagram is
            # accept_source for a BLOCK on a client is "the header names the sender and the port is ours".
            if head is not None and head[2] == self._server_raw and ip == self.server_ip and (
                self.port is None or port == self.port
            ):
                self._last_server = now  # server_block(), inline: a call per block costs a few percent
                return self._got_block(head[0], head[1], memoryview(data)[BLOCK_DATA_OFFSET:], now)
        try:
            msg, srcip = decode(data)
        except PacketError:
            self.stats.bad_packets += 1
            return []
        if not accept_source(msg, srcip, ip, port, session_addr=self.session_addr, port=self.port, client=True):
            self.stats.bad_packets += 1
            return []
        if self._phase == _JOINING:
            return self._join_reply(msg, srcip, now)
        from_server = srcip == self.server_ip
        if from_server:
            self._last_server = now
        if isinstance(msg, Block):
            if not from_server:
                self.stats.foreign_blocks += 1
                return []
            return self.server_block(msg.chunk, msg.block, msg.data, now)
        if isinstance(msg, (Request, PRequest)):
            self._snoop(msg, now)
        elif isinstance(msg, Progress) and not msg.reply and from_server and msg.clientid in (0, self.clientid):
            self._progress_request(msg, now)
        return []  # JOINs and LEAVEs of other clients, replies: nothing to do

    def server_block(self, chunk: int, block: int, payload, now: float) -> list[Event]:
        """A BLOCK from our server (`server_ip` on `port`), its header already checked as block_header() does;
        payload: its data (at least BLOCK_SIZE bytes, any bytes-like). Only while receiving: before the JOIN reply
        and after Finished there is no server to take blocks from."""
        if self._phase != _RECEIVING:
            return []
        self._last_server = now
        return self._got_block(chunk, block, payload, now)

    def fast_target(self) -> tuple[int, bytearray, int, int, int, int] | None:
        """What a receive fast path may take by itself: BLOCKs of the chunk the server is sending (that of the last
        BLOCK) while it is partly filled here, from our server. (chunk, its buffer, missing-blocks map, blocks in
        the chunk, bytes of the file in it, highest block of the run so far), or None."""
        if self._phase != _RECEIVING:
            return None
        chunk = self._last_chunk
        buf = self._filling.get(chunk)
        if buf is None:
            return None
        size = min(CHUNK_BYTES, self.total_bytes - chunk * CHUNK_BYTES)
        return chunk, buf.data, buf.missing, chunk_blocks(self.total_bytes, chunk), size, self._run_top

    def fast_blocks(self, blocks: int, useful: int, dups: int, missing: int, run_top: int, now: float) -> None:
        """A fast path took `blocks` BLOCKs of the fast_target chunk from our server (in range; `useful` of them
        new, copied into its buffer, none the last missing one; `dups` already there): account for them exactly as
        receive() would have, all at `now`. `missing` and `run_top` are the chunk's map and highest block after."""
        if not blocks:
            return
        self.stats.blocks += blocks
        self.stats.useful_blocks += useful
        self.stats.dup_blocks += dups
        self._backoff = 0
        self._last_server = self._last_block_at = now
        if useful:
            self._idle_at = now + IDLE_DELAY
        self._filling[self._last_chunk].missing = missing
        self._run_top = max(self._run_top, run_top)

    # -----------------------------------------------------------------------------------------------------------
    # joining

    def _send(self, msg, to: str | None = None) -> None:
        self._outbox.append(Outgoing(encode(msg, self.myip), to))

    def _send_joins(self, now: float) -> None:
        # JOIN2 gives the exact size of any file; JOIN v1 is what older servers (and every frisbee) understand.
        self._send(Join2(self.clientid, 0, BLOCKS_PER_CHUNK, BLOCK_SIZE, 0, reply=False))
        self._send(Join(self.clientid))
        self.stats.join_attempts += 1
        self._join_at = now + JOIN_INTERVAL

    def _join_reply(self, msg, srcip: str, now: float) -> list[Event]:
        if isinstance(msg, JoinReply):
            total = msg.blockcount * BLOCK_SIZE
        elif isinstance(msg, Join2) and msg.reply and msg.clientid == self.clientid:
            if msg.chunksize != BLOCKS_PER_CHUNK or msg.blocksize != BLOCK_SIZE:
                raise NetworkError(
                    f"the frisbee server {srcip} sends {msg.chunksize} blocks of {msg.blocksize} bytes per chunk; "
                    f"only {BLOCKS_PER_CHUNK} x {BLOCK_SIZE} is supported"
                )
            total = msg.bytecount
        else:
            return []  # data before our reply: frisbee throws it away too
        self.server_ip = srcip
        self._server_raw = socket.inet_aton(srcip)
        self._last_server = now
        self._setup(total)
        self._phase = _RECEIVING
        events: list[Event] = [Joined(self.total_bytes, self.total_chunks)]
        if self.total_chunks == 0:
            return events + self._finish(now)
        self._request(now, timedout=True)
        self._idle_at = now + IDLE_DELAY
        return events

    def _setup(self, total: int) -> None:
        self.total_bytes = total
        n = self.total_chunks = total_chunks(total)
        self.max_buffers = min(self.memory_mb, n)
        self._done = bytearray(n)
        self._ours = bytearray(n)
        self._stamp = [float("-inf")] * n  # when somebody last asked for the chunk
        self._filling: dict[int, _Buffer] = {}
        self._untaken: set[int] = set()
        self._backoff = 0
        self._idle_at = 0.0
        self._last_chunk = -1  # the chunk of the last BLOCK from the server, and when it came
        self._run_top = 0  # the highest block of that chunk received since the server switched to it
        self._last_block_at = float("-inf")
        # Request order: the last chunk first (its header tells the caller the image's size), the rest shuffled.
        rest = list(range(n - 1))
        if self.randomize:
            self.rng.shuffle(rest)
        self._order = [n - 1, *rest] if n else []
        self._position = [0] * n
        for p, chunk in enumerate(self._order):
            self._position[chunk] = p
        # _skip[p] == p while order[p] is unseen (no buffer, not done); else it points further on (union-find with
        # path compression), so "the first k unseen chunks in order" costs about k steps however far we are.
        self._skip = list(range(n + 1))

    # -----------------------------------------------------------------------------------------------------------
    # receiving

    def _got_block(self, chunk: int, block: int, data, now: float) -> list[Event]:
        self.stats.blocks += 1
        self._backoff = 0  # the server is alive
        if chunk >= self.total_chunks or block >= chunk_blocks(self.total_bytes, chunk):
            self.stats.bad_packets += 1  # outside the file (frisbee's PacketValid, and past a short last chunk)
            return []
        events = self._store_block(chunk, block, data, now)
        previous, top = self._last_chunk, self._run_top
        if chunk == previous:
            self._run_top = max(top, block)
            self._last_block_at = now
            return events
        self._last_chunk, self._run_top = chunk, block
        buf = self._filling.get(previous)
        if buf is not None and self._stamp[previous] <= self._last_block_at and self._phase == _RECEIVING:
            # The server sends a chunk's blocks in ascending runs, one run at a time: it has moved on, so the holes
            # below the last block of the run are lost. Ask for them now rather than after the idle timer, unless
            # somebody already has since (holes above may still be on their way: the idle timer covers those).
            behind = buf.missing & ((1 << top) - 1)
            if behind:
                self._send_missing(previous, behind, now)
                self._read_ahead(now, timedout=False)
        self._last_block_at = now
        return events

    def _store_block(self, chunk: int, block: int, data, now: float) -> list[Event]:
        if self._done[chunk]:
            self.stats.dup_chunks += 1
            return []
        buf = self._filling.get(chunk)
        if buf is None:
            if not self._room_for(chunk):
                self.stats.no_room += 1
                self._stamp[chunk] = now  # it is on its way for someone: no need to ask ourselves just now
                return []
            buf = self._filling[chunk] = _Buffer(chunk_blocks(self.total_bytes, chunk))
            self._mark_seen(chunk)
        bit = 1 << block
        if not buf.missing & bit:
            self.stats.dup_blocks += 1
            return []
        offset = block * BLOCK_SIZE
        # Copy no more than the file holds: the bytes after its end stay zero whatever the server padded with.
        n = min(BLOCK_SIZE, self.total_bytes - chunk * CHUNK_BYTES - offset)
        buf.data[offset : offset + n] = data[:n]
        buf.missing ^= bit
        self.stats.useful_blocks += 1
        self._idle_at = now + IDLE_DELAY
        if buf.missing:
            return []
        del self._filling[chunk]
        self._done[chunk] = 1
        self._untaken.add(chunk)
        self.stats.chunks_in += 1
        events: list[Event] = [ChunkComplete(chunk, bytes(buf.data))]
        if self.stats.chunks_in == self.total_chunks:
            return events + self._finish(now)
        self._request(now, timedout=False)  # keep the pipeline full
        return events

    def _finish(self, now: float) -> list[Event]:
        elapsed = int(now - self._started)
        self._send(Leave2(self.clientid, elapsed, self._client_stats(now)))
        self._phase = _DONE
        return [Finished()]

    def _free_buffers(self) -> int:
        return self.max_buffers - len(self._filling) - len(self._untaken)

    def _room_for(self, chunk: int) -> bool:
        free = self._free_buffers()
        last = self.total_chunks - 1
        if chunk != last and not self._done[last] and last not in self._filling:
            free -= 1  # the last chunk's buffer
        return free > 0

    def _stalled(self) -> bool:
        """Every buffer holds a complete chunk the consumer has not taken: we ask for nothing, on purpose."""
        return not self._filling and self._free_buffers() <= 0

    def _mark_seen(self, chunk: int) -> None:
        p = self._position[chunk]
        self._skip[p] = p + 1

    def _next_unseen(self, p: int) -> int:
        root = p
        while self._skip[root] != root:
            root = self._skip[root]
        while self._skip[p] != root:
            self._skip[p], p = root, self._skip[p]
        return root

    def _unseen(self, count: int) -> list[int]:
        """The first `count` chunks of the request order that have no buffer and are not done."""
        out = []
        p = self._next_unseen(0)
        while p < self.total_chunks and len(out) < count:
            out.append(self._order[p])
            p = self._next_unseen(p + 1)
        return out

    # -----------------------------------------------------------------------------------------------------------
    # requesting

    def _request(self, now: float, timedout: bool) -> None:
        """frisbee's RequestChunk: ask for the missing blocks of partly filled chunks, then for read-ahead.

        Unless `timedout` (nothing useful arrived for a while), skip chunks somebody asked for in the last second.
        """
        for chunk, buf in self._filling.items():
            if timedout or now - self._stamp[chunk] >= REDO_DELAY:
                self._send_missing(chunk, buf.missing, now)
        self._read_ahead(now, timedout)

    def _read_ahead(self, now: float, timedout: bool) -> None:
        free = self._free_buffers()
        if free <= 0 or len(self._filling) >= self.inprogress:
            return
        # Read-ahead: the next unseen chunks count even when someone else already asked for them (on their way).
        for chunk in self._unseen(min(self.readahead, free)):
            if timedout or now - self._stamp[chunk] >= REDO_DELAY:
                self._request_chunk(chunk, now)

    def _request_chunk(self, chunk: int, now: float) -> None:
        blocks = chunk_blocks(self.total_bytes, chunk)
        if self._ours[chunk]:
            # A repeat is a PREQUEST with retries set: the server counts those for its congestion control.
            self.stats.full_rerequests += 1
            self._send_missing(chunk, (1 << blocks) - 1, now)
            return
        self._send(Request(chunk, 0, blocks))
        self.stats.requests += 1
        self._stamp[chunk] = now
        self._ours[chunk] = 1

    def _send_missing(self, chunk: int, missing: int, now: float) -> None:
        retries = self._ours[chunk]
        self._send(PRequest(chunk, retries, missing.to_bytes(BLOCKS_PER_CHUNK // 8, "little")))
        self.stats.requests += 1
        self.stats.prequests += 1
        self.stats.rerequests += retries
        self.stats.lost_blocks += missing.bit_count()
        self._stamp[chunk] = now
        self._ours[chunk] = 1

    def _snoop(self, msg: Request | PRequest, now: float) -> None:
        """Another client's request (frisbee's RequestStamp): stamp the chunk if the answer will be of use to us."""
        chunk = msg.chunk
        if chunk >= self.total_chunks or self._done[chunk]:
            return
        buf = self._filling.get(chunk)
        if buf is not None:
            if isinstance(msg, Request):
                wanted = ((1 << msg.count) - 1) << msg.block
            else:
                wanted = int.from_bytes(msg.blockmap, "little")
            if not buf.missing & wanted:
                return  # only blocks we already have: we will still have to ask ourselves
        self._stamp[chunk] = now
        # Something we need is on its way: wait a full idle period before asking again, but never shorten a
        # backed-off wait (that would undo the backoff whenever another client asks).
        self._idle_at = max(self._idle_at, now + IDLE_DELAY)

    # -----------------------------------------------------------------------------------------------------------
    # PROGRESS reports and statistics

    def _progress_request(self, msg: Progress, now: float) -> None:
        """The server asks for reports: answer now, and every `when` seconds if it is not 0."""
        self._report_what = msg.what & (PROGRESS_SUMMARY | PROGRESS_STATS)
        self._report_interval = min(msg.when, MAX_REPORT_INTERVAL)
        if self._report_seq == 0:
            self._report_seq = msg.seq or 1
        self._send_report(now)
        self._report_at = now + self._report_interval if self._report_interval else None

    def _send_report(self, now: float) -> None:
        what = self._report_what
        report = Progress(
            self.clientid,
            who=int.from_bytes(socket.inet_aton(self.myip), "little"),  # an in_addr, as it sits in memory
            when=max(1, int(self.wall_offset + now)),  # the server ignores a report with when == 0
            what=what,
            seq=self._report_seq & 0xFFFF,
            reply=True,
            summary=(self.stats.chunks_in, self.stats.chunks_out, self.bytes_out) if what else None,
            # frisbeed only reads a report whose datalen covers the whole message, stats included.
            stats=self._client_stats(now) if what else b"",
        )
        self._report_seq += 1
        self._send(report, to=self.server_ip)  # unicast to the server, as frisbee's PacketReply

    def _client_stats(self, now: float) -> bytes:
        """A ClientStats_t (version 1) for LEAVE2 and PROGRESS, with the counters we keep."""
        s = self.stats
        run = max(0.0, now - self._started)
        counters = [
            0, s.no_room, s.dup_chunks, s.dup_blocks, s.prequests, s.idles, s.join_attempts,
            s.requests, 0, 0,  # nochunksready .. writeridles
        ]
        fields = _CLIENT_STATS.pack(
            1,  # version
            int(run), int(run * 1000) % 1000, 0,  # runsec runmsec delayms
            self.bytes_out, 0,  # rbyteswritten ebyteswritten
            self.max_buffers, self.readahead, self.inprogress,
            30000, 0, 3, 0, int(REDO_DELAY * 1e6), int(self.randomize),  # pkttimeout .. randomize
            *(c & 0xFFFFFFFF for c in counters),  # uint32 counters wrap, as frisbee's do
            0,  # writebufmem
            *(c & 0xFFFFFFFF for c in (s.lost_blocks, s.rerequests, 0, s.full_rerequests)),
        )
        return fields.ljust(STATS_BYTES, b"\0")
