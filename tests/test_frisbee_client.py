"""The frisbee client: the sans-I/O state machine on a fake clock, then against our server, then over real sockets."""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time

import pytest

from agent.errors import NetworkError
from agent.frisbee import packets as P
from agent.frisbee.client import (
    ChunkComplete,
    Client,
    Finished,
    Joined,
    TimedOut,
)
from agent.frisbee.receive import FrisbeeSource
from agent.frisbee.serve import serve
from agent.frisbee.server import BlocksDue, Server
from agent.io.image import restore
from agent.io.target import Target
from agent.sansio import Outgoing
from conftest import FIXTURES, needs_root
from net_helpers import enter_netns, lan

SERVER, ME, OTHER, PORT = "10.0.0.1", "10.0.0.2", "10.0.0.3", 5000
MiB = 1 << 20


def image_bytes(size: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(size)


def sent(client: Client) -> list:
    return [P.decode(d.data)[0] for d in client.outgoing()]


def deliver(client: Client, msg, now: float, src: str = SERVER, port: int = PORT, hdr_ip: str | None = None):
    return client.receive(P.encode(msg, hdr_ip or src), (src, port), now)


def joined(total_bytes: int, seed: int = 1, v2: bool = True, **kw) -> Client:
    client = Client(ME, port=PORT, rng=random.Random(seed), **kw)
    client.start(0.0)
    sent(client)
    reply = (
        P.Join2(client.clientid, 0, 1024, 1024, total_bytes, reply=True)
        if v2
        else P.JoinReply(-(-total_bytes // 1024))
    )
    events = deliver(client, reply, 0.0)
    # JOIN v1 tells only the number of 1 KiB blocks: the size is rounded up to a whole block.
    size = total_bytes if v2 else -(-total_bytes // 1024) * 1024
    assert events[0] == Joined(size, P.total_chunks(total_bytes))
    return client


def block_of(data: bytes, chunk: int, block: int) -> P.Block:
    start = chunk * MiB + block * 1024
    return P.Block(chunk, block, data[start : start + 1024].ljust(1024, b"\0"))


def feed_chunk(client: Client, data: bytes, chunk: int, now: float, skip=()) -> list:
    events = []
    for b in range(P.chunk_blocks(len(data), chunk)):
        if b not in skip:
            events += deliver(client, block_of(data, chunk, b), now)
    return events


def requested_chunks(msgs) -> list[int]:
    return [m.chunk for m in msgs if isinstance(m, (P.Request, P.PRequest))]


# ---------------------------------------------------------------------------------------------------------------
# joining


def test_join_sends_join2_and_join_every_500ms():
    client = Client(ME, port=PORT, rng=random.Random(3))
    client.start(10.0)
    first = sent(client)
    assert first == [P.Join2(client.clientid, 0, 1024, 1024, 0, reply=False), P.Join(client.clientid)]
    assert client.next_deadline() == pytest.approx(10.5)
    assert client.timer(10.4) == [] and sent(client) == []
    client.timer(10.5)
    assert sent(client) == first
    # Data and other clients' traffic before our reply are thrown away; a JOIN2 reply for another client too.
    assert deliver(client, P.Block(0, 0, bytes(1024)), 10.6) == []
    assert deliver(client, P.Join2(client.clientid + 1, 0, 1024, 1024, MiB, reply=True), 10.6) == []
    assert client.server_ip is None


def test_join2_reply_gives_exact_size_and_last_chunk_is_asked_first():
    client = Client(ME, port=PORT, rng=random.Random(3))
    client.start(0.0)
    sent(client)
    events = deliver(client, P.Join2(client.clientid, 0, 1024, 1024, 2 * MiB + 512 * 1024 + 100, reply=True), 0.1)
    assert events == [Joined(2 * MiB + 512 * 1024 + 100, 3)]
    assert client.server_ip == SERVER
    msgs = sent(client)
    assert msgs[0] == P.Request(2, 0, 513)  # the short last chunk: 512 blocks and one partial block
    assert len(msgs) == 2 and isinstance(msgs[1], P.Request) and msgs[1].count == 1024


def test_join_v1_reply_gives_blockcount_times_1024():
    client = Client(ME, port=PORT, rng=random.Random(3))
    client.start(0.0)
    sent(client)
    assert deliver(client, P.JoinReply(3 * 1024), 0.2) == [Joined(3 * MiB, 3)]
    assert sent(client)[0] == P.Request(2, 0, 1024)


def test_join2_reply_with_other_block_sizes_is_refused():
    client = Client(ME, port=PORT, rng=random.Random(3))
    client.start(0.0)
    with pytest.raises(NetworkError, match="8192"):
        deliver(client, P.Join2(client.clientid, 0, 128, 8192, MiB, reply=True), 0.1)


# ---------------------------------------------------------------------------------------------------------------
# what is asked for, and in which order


def run_in_order(seed: int, chunks: int = 20) -> list[int]:
    """Complete every chunk as soon as it is asked for; the order of first requests."""
    data = bytes(chunks * MiB)
    client = joined(len(data), seed=seed)
    order: list[int] = []
    now = 0.0
    while not client.done:
        for chunk in requested_chunks(sent(client)):
            if chunk not in order:
                order.append(chunk)
        now += 0.01
        feed_chunk(client, data, order[len([c for c in order if client._done[c]])], now)
        for c in list(client._untaken):
            client.chunk_taken(c, now)
    return order


def test_request_order_last_chunk_first_then_random_per_client():
    a, b = run_in_order(1), run_in_order(2)
    assert a[0] == b[0] == 19
    assert sorted(a) == sorted(b) == list(range(20))
    assert a[1:] != sorted(a[1:]) and a != b
    assert run_in_order(1) == a  # seeded: deterministic


def test_readahead_two_chunks_and_no_readahead_with_eight_in_progress():
    data = image_bytes(40 * MiB)
    client = joined(len(data))
    first = sent(client)
    assert [type(m) for m in first] == [P.Request, P.Request] and first[0].chunk == 39
    # Blocks of 8 chunks arrive (as if requested by other clients): 8 partly filled chunks in progress.
    busy = list(range(8))
    for c in busy:
        deliver(client, block_of(data, c, 0), 0.01)
    sent(client)
    client.timer(client.next_deadline())
    msgs = sent(client)
    assert all(isinstance(m, P.PRequest) for m in msgs)  # missing blocks only: no read-ahead
    assert sorted(m.chunk for m in msgs) == busy
    # A chunk completes: 7 in progress. Nothing asked for in the last second is asked for again.
    feed_chunk(client, data, 0, 0.3, skip={0})
    assert not [m for m in sent(client) if m.chunk in busy]
    # The idle timer: the missing blocks of the 7, and the two next unseen chunks of the order again.
    client.timer(client.next_deadline())
    msgs = sent(client)
    assert sorted(m.chunk for m in msgs if m.chunk in busy) == busy[1:]
    ahead = [m.chunk for m in msgs if m.chunk not in busy]
    assert ahead == client._unseen(2) and ahead[0] == 39
    assert all(isinstance(m, P.PRequest) and m.retries == 1 for m in msgs if m.chunk == 39)  # a repeat


def test_partial_chunk_prequest_lists_the_missing_blocks():
    data = image_bytes(2 * MiB + 300 * 1024)
    client = joined(len(data))
    ahead = client._order[1]
    assert requested_chunks(sent(client)) == [2, ahead]
    other = 1 - ahead  # the chunk we have not asked for
    # Chunk 2 (300 blocks, ours) arrives with holes; the other chunk gets one block from someone else's request.
    feed_chunk(client, data, 2, 0.05, skip={5, 6, 299})
    deliver(client, block_of(data, other, 10), 0.05)
    sent(client)
    client.timer(0.5)
    msgs = {m.chunk: m for m in sent(client) if isinstance(m, P.PRequest)}
    assert P.blocks_in(msgs[2].blockmap) == [5, 6, 299] and msgs[2].retries == 1  # our re-request
    assert P.blocks_in(msgs[other].blockmap) == [b for b in range(1024) if b != 10] and msgs[other].retries == 0
    assert P.blocks_in(msgs[ahead].blockmap) == list(range(1024)) and msgs[ahead].retries == 1
    assert client.stats.lost_blocks >= 3 + 1023 + 1024


def test_server_moving_on_triggers_rerequest_of_the_holes():
    data = image_bytes(3 * MiB)
    client = joined(len(data))
    sent(client)
    feed_chunk(client, data, 2, 0.05, skip={100, 1023})
    assert sent(client) == []  # no hurry while the run goes on
    # The server sends another chunk: the hole its run of chunk 2 passed is lost (1023 may still come).
    deliver(client, block_of(data, 0, 0), 0.06)
    msgs = sent(client)
    assert isinstance(msgs[0], P.PRequest) and msgs[0].chunk == 2 and P.blocks_in(msgs[0].blockmap) == [100]
    # Runs interleave: nothing is behind the short run of chunk 0, nor behind block 100 of chunk 2.
    deliver(client, block_of(data, 2, 100), 0.07)
    deliver(client, block_of(data, 0, 1), 0.08)
    assert sent(client) == []
    client.timer(client.next_deadline())
    assert {m.chunk: P.blocks_in(m.blockmap) for m in sent(client)}[2] == [1023]


def test_snooped_requests_suppress_our_duplicates():
    data = image_bytes(20 * MiB)

    def after_first_chunk(snoop) -> list[int]:
        client = joined(len(data))
        first = requested_chunks(sent(client))
        third = client._unseen(3)[2]
        if snoop:
            deliver(client, snoop(third), 0.05, src=OTHER)
        events = feed_chunk(client, data, first[0], 0.06)
        assert isinstance(events[-1], ChunkComplete)
        return third, requested_chunks(sent(client))

    third, asked = after_first_chunk(None)
    assert third in asked  # the chunk done: ask for the next unseen one
    for snoop in (lambda c: P.Request(c, 0, 1024), lambda c: P.PRequest(c, 1, P.bitmap_of(range(1024)))):
        third, asked = after_first_chunk(snoop)
        assert third not in asked  # someone asked for it 10 ms ago: it is on its way
    # A BLOCK from another host is neither data nor a stamp (it is not from our server).
    third, asked = after_first_chunk(lambda c: P.Block(c, 0, bytes(1024)))
    assert third in asked


def test_snooped_request_only_for_blocks_we_have_does_not_stamp():
    data = image_bytes(4 * MiB)
    client = joined(len(data))
    sent(client)
    feed_chunk(client, data, 1, 0.01, skip={7})
    client._stamp[1] = float("-inf")
    deliver(client, P.Request(1, 0, 5), 0.02, src=OTHER)  # blocks 0-4: we have them
    assert client._stamp[1] == float("-inf")
    deliver(client, P.PRequest(1, 0, P.bitmap_of([7])), 0.03, src=OTHER)  # block 7: we need it
    assert client._stamp[1] == 0.03


def test_blocks_from_another_host_are_ignored():
    data = image_bytes(2 * MiB)
    client = joined(len(data))
    sent(client)
    assert deliver(client, block_of(data, 1, 0), 0.01, src=OTHER) == []
    assert client.stats.foreign_blocks == 1 and not client._filling
    # A header naming our server but sent from elsewhere, and a datagram from another port: dropped.
    deliver(client, block_of(data, 1, 0), 0.01, src=OTHER, hdr_ip=SERVER)
    deliver(client, block_of(data, 1, 0), 0.01, port=PORT + 1)
    assert client.stats.bad_packets == 2 and not client._filling
    client.receive(b"garbage", (SERVER, PORT), 0.01)
    assert client.stats.bad_packets == 3
    deliver(client, block_of(data, 1, 0), 0.01)
    assert list(client._filling) == [1]
    # From our server but outside the file: chunk 2 of 2, and block 512 of a 512-block last chunk.
    short = joined(MiB + 512 * 1024)
    deliver(short, P.Block(2, 0, bytes(1024)), 0.01)
    deliver(short, P.Block(1, 512, bytes(1024)), 0.01)
    assert short.stats.bad_packets == 2 and not short._filling


def test_the_session_address_is_taken_at_its_header_word_except_for_server_messages():
    # packets.accept_source, as the server applies it: from the session address (here a unicast server's), the
    # header names the sender; but BLOCKs and PROGRESS requests must come from the host their header names.
    data = image_bytes(2 * MiB)
    client = joined(len(data), session_addr=SERVER)
    sent(client)
    deliver(client, P.Request(1, 0, 1024), 0.01, src=SERVER, hdr_ip=OTHER)  # another client's, relayed
    assert client._stamp[1] == 0.01 and client.stats.bad_packets == 0
    deliver(client, block_of(data, 1, 0), 0.02, src=SERVER, hdr_ip=OTHER)
    deliver(client, P.Progress(client.clientid, 0, 0, 1, 1, reply=False), 0.02, src=SERVER, hdr_ip=OTHER)
    assert client.stats.bad_packets == 2 and not client._filling and sent(client) == []
    # Without a session address nothing is taken at its header's word.
    plain = joined(len(data))
    deliver(plain, P.Request(1, 0, 1024), 0.01, src=SERVER, hdr_ip=OTHER)
    assert plain.stats.bad_packets == 1 and plain._stamp[1] != 0.01


def test_server_block_is_the_fast_path_seam():
    """server_block(chunk, block, payload) takes what a fast path parsed itself, with the same effect as receive()."""
    data = image_bytes(MiB + 3000)
    fast, slow = joined(len(data)), joined(len(data))
    before = Client(ME, port=PORT, rng=random.Random(1))
    before.start(0.0)
    assert before.server_block(0, 0, bytes(1024), 0.0) == [] and before.stats.blocks == 0  # no server yet
    events_fast, events_slow = [], []
    for chunk in (1, 0):
        for b in range(P.chunk_blocks(len(data), chunk)):
            block = block_of(data, chunk, b)
            events_fast += fast.server_block(chunk, b, memoryview(block.data), 0.5)
            events_slow += deliver(slow, block, 0.5)
    assert events_fast == events_slow == [
        ChunkComplete(1, data[MiB:].ljust(MiB, b"\0")), ChunkComplete(0, data[:MiB]), Finished()
    ]
    assert fast.stats == slow.stats and fast.stats.blocks == 1024 + 3
    assert fast.server_block(0, 0, bytes(1024), 0.6) == [] and fast.stats.blocks == 1024 + 3  # done: not taken


def test_idle_rerequest_backs_off_to_once_a_second_and_resets_on_blocks():
    data = image_bytes(4 * MiB)
    client = joined(len(data))
    sent(client)
    times = []
    now = 0.0
    while now < 6:
        now = client.next_deadline()
        client.timer(now)
        if sent(client):
            times.append(now)
    gaps = [round(b - a, 3) for a, b in zip([0.0, *times], times)]
    assert gaps[:5] == [0.09, 0.18, 0.36, 0.72, 1.0] and set(gaps[5:]) == {1.0}
    # The server answers: back to asking 90 ms after the last useful block.
    deliver(client, block_of(data, 0, 0), now + 0.5)
    assert client.next_deadline() == pytest.approx(now + 0.59)
    client.timer(now + 0.59)
    sent(client)
    assert client.next_deadline() == pytest.approx(now + 0.59 + 0.18)


def test_memory_limit_drops_blocks_of_new_chunks_and_keeps_room_for_the_last():
    data = image_bytes(10 * MiB)
    client = joined(len(data), memory_mb=3)
    sent(client)
    for c in (0, 1, 2):
        deliver(client, block_of(data, c, 0), 0.01)
    assert sorted(client._filling) == [0, 1] and client.stats.no_room == 1  # the third buffer waits for chunk 9
    feed_chunk(client, data, 9, 0.02)
    feed_chunk(client, data, 0, 0.02)
    feed_chunk(client, data, 1, 0.02)
    assert client._untaken == {0, 1, 9}
    dropped = client.stats.no_room
    assert deliver(client, block_of(data, 3, 0), 0.03) == [] and client.stats.no_room == dropped + 1
    assert client._stamp[3] == 0.03  # a block we had no room for: someone asked, it is on its way
    sent(client)
    client.timer(1.0)
    assert sent(client) == []  # no buffer free: nothing to ask for
    client.chunk_taken(9, 1.1)
    assert requested_chunks(sent(client))  # a buffer is free: ask at once, not at the next idle tick
    deliver(client, block_of(data, 3, 0), 1.2)
    assert 3 in client._filling


def test_timeout_after_idle_seconds_without_server_packets():
    # Before the JOIN reply.
    client = Client(ME, port=PORT, rng=random.Random(1), idle_timeout=5)
    client.start(0.0)
    now = 0.0
    events = []
    while not events:
        now = client.next_deadline()
        events = client.timer(now)
    assert events == [TimedOut(5.0)] and now == 5.0 and client.done
    # After joining: other hosts' packets do not count; the server's do.
    data = image_bytes(3 * MiB)
    client = joined(len(data), idle_timeout=5)
    deliver(client, P.Request(0, 0, 1024), 4.0, src=OTHER)
    deliver(client, block_of(data, 0, 0), 3.0)
    now, events = 0.0, []
    while not events:
        now = client.next_deadline()
        events = client.timer(now)
    assert events == [TimedOut(5.0)] and now == pytest.approx(8.0)
    # 0 means forever.
    client = joined(len(data))
    for _ in range(100):
        assert client.timer(client.next_deadline()) == []


def test_no_timeout_while_every_buffer_waits_for_the_consumer():
    data = image_bytes(4 * MiB)
    client = joined(len(data), memory_mb=2, idle_timeout=5)
    feed_chunk(client, data, 3, 0.1)
    feed_chunk(client, data, 0, 0.1)
    for t in range(1, 60):
        assert client.timer(float(t)) == []
    client.chunk_taken(3, 60.0)
    assert client.timer(64.0) == []
    assert client.timer(65.5) == [TimedOut(5.5)]


def test_completion_hands_out_padded_chunks_and_sends_leave2_once():
    data = image_bytes(MiB + 3000)  # any file: a short last chunk ending mid-block
    client = joined(len(data))
    sent(client)
    events = feed_chunk(client, data, 1, 0.5)
    assert events == [ChunkComplete(1, data[MiB:].ljust(MiB, b"\0"))]
    events = feed_chunk(client, data, 0, 0.7)
    assert events == [ChunkComplete(0, data[:MiB]), Finished()]
    msgs = sent(client)
    leave = [m for m in msgs if isinstance(m, P.Leave2)]
    assert len(leave) == 1 and leave[0].clientid == client.clientid and len(leave[0].stats) == P.STATS_BYTES
    assert client.done and client.next_deadline() == float("inf")
    assert client.timer(100.0) == [] and deliver(client, block_of(data, 0, 0), 100.0) == [] and sent(client) == []


def test_progress_request_is_answered_to_the_server():
    data = image_bytes(2 * MiB)
    client = joined(len(data), wall_offset=1_700_000_000.0)
    sent(client)
    feed_chunk(client, data, 1, 0.2)
    client.chunk_taken(1, 0.3)
    client.bytes_out = 12345
    sent(client)
    # Not ours, or not from our server: ignored.
    deliver(client, P.Progress(client.clientid + 1, 0, 0, 1, 1, reply=False), 1.0)
    deliver(client, P.Progress(client.clientid, 0, 0, 1, 1, reply=False), 1.0, src=OTHER)
    assert sent(client) == []
    deliver(client, P.Progress(client.clientid, 0, 30, P.PROGRESS_SUMMARY, 1, reply=False), 1.0)
    out = client.outgoing()
    assert len(out) == 1 and out[0].dest == SERVER
    report = P.decode(out[0].data)[0]
    assert report.reply and report.clientid == client.clientid and report.seq == 1
    assert report.who == int.from_bytes(bytes([10, 0, 0, 2]), "little") and report.when == 1_700_000_001
    assert report.summary == (1, 1, 12345) and len(report.stats) == P.STATS_BYTES
    assert len(out[0].data) == 16 + 16 + 16 + P.STATS_BYTES  # frisbeed reads only a full-size report
    # Then every 30 s, with the next sequence number; a request for everyone (clientid 0) answers too.
    client.timer(31.0)
    reports = [m for m in sent(client) if isinstance(m, P.Progress)]
    assert [r.seq for r in reports] == [2]
    deliver(client, P.Progress(0, 0, 0, 0, 9, reply=False), 32.0)
    (report,) = sent(client)
    assert report.seq == 3 and report.what == 0 and report.summary is None
    assert client._report_at is None  # a request with when == 0: one report, no more periodic ones


def test_server_restart_silence_then_blocks_again_finishes():
    data = image_bytes(3 * MiB)
    client = joined(len(data), idle_timeout=0)
    sent(client)
    feed_chunk(client, data, 2, 0.1)
    feed_chunk(client, data, 0, 0.2, skip=set(range(500, 1024)))
    # The server dies: 20 s of silence. We keep asking, about once a second.
    now, asked = 0.2, []
    while now < 20:
        now = client.next_deadline()
        client.timer(now)
        asked += [(now, m) for m in sent(client)]
    late = [t for t, m in asked if t > 10]
    assert 8 <= len({round(t, 3) for t in late}) <= 11
    # A new server process at the same address answers the requests: no re-JOIN needed.
    events = []
    for _, m in asked[-3:]:
        if isinstance(m, P.PRequest):
            for b in P.blocks_in(m.blockmap):
                events += deliver(client, block_of(data, m.chunk, b), now)
        elif isinstance(m, P.Request):
            events += feed_chunk(client, data, m.chunk, now)
    assert isinstance(events[-1], Finished)
    assert sorted(e.index for e in events if isinstance(e, ChunkComplete)) == [0, 1]


def test_datagram_type():
    client = Client(ME, port=PORT, rng=random.Random(1))
    client.start(0.0)
    out = client.outgoing()
    assert out and all(isinstance(d, Outgoing) and d.dest is None for d in out)


# ---------------------------------------------------------------------------------------------------------------
# against our sans-I/O server, in memory: one group, lossy receivers


class Session:
    """One server and some clients on a simulated LAN: every datagram reaches every other party, each receiver
    losing `loss` of what it receives (seeded). Time jumps from deadline to deadline."""

    def __init__(self, data: bytes, loss: float, seed: int, clients: int = 1, **client_kw):
        self.data, self.loss, self.rng = data, loss, random.Random(seed)
        self.server = Server(len(data), SERVER, port=PORT, now=0.0)
        self.server_alive = True
        self.clients = [
            Client(f"10.0.0.{10 + i}", port=PORT, rng=random.Random(seed * 100 + i), **client_kw)
            for i in range(clients)
        ]
        self.received: list[dict[int, bytes]] = [{} for _ in self.clients]
        self.finished = [False] * clients
        self.now = 0.0
        for c in self.clients:
            c.start(0.0)

    def lost(self) -> bool:
        return self.rng.random() < self.loss

    def to_client(self, i: int, datagram: bytes, src: str) -> None:
        if self.lost():
            return
        for event in self.clients[i].receive(datagram, (src, PORT), self.now):
            self.on_event(i, event)

    def on_event(self, i: int, event) -> None:
        if isinstance(event, ChunkComplete):
            assert event.index not in self.received[i]
            self.received[i][event.index] = event.data
            self.clients[i].chunk_taken(event.index, self.now)
        elif isinstance(event, Finished):
            self.finished[i] = True
        elif isinstance(event, TimedOut):
            raise AssertionError(f"client {i} timed out")

    def step(self) -> None:
        busy = True
        while busy:
            busy = False
            for i, client in enumerate(self.clients):
                for d in client.outgoing():
                    busy = True
                    raw = d.data
                    for j in range(len(self.clients)):
                        if j != i and d.dest is None:
                            self.to_client(j, raw, client.myip)
                    if self.server_alive and not self.lost():
                        self.server.receive(raw, (client.myip, PORT), self.now)
                        self.from_server()  # JOIN replies, at once
            if self.server_alive and self.now >= self.server.next_deadline():
                for event in self.server.timer(self.now):
                    if isinstance(event, BlocksDue):
                        start = event.chunk * MiB + event.block * 1024
                        data = self.data[start : start + event.count * 1024].ljust(event.count * 1024, b"\0")
                        for raw in self.server.send_blocks(event.chunk, event.block, data):
                            busy = True
                            for j in range(len(self.clients)):
                                self.to_client(j, raw, SERVER)
        if all(self.finished):
            return
        deadlines = [c.next_deadline() for c in self.clients]
        if self.server_alive:
            deadlines.append(self.server.next_deadline())
        self.now = max(self.now, min(deadlines))
        for i, c in enumerate(self.clients):
            if self.now >= c.next_deadline():
                for event in c.timer(self.now):
                    self.on_event(i, event)

    def from_server(self) -> None:
        """Deliver the server's replies to every client."""
        for d in self.server.outgoing():
            for j in range(len(self.clients)):
                self.to_client(j, d.data, SERVER)

    def run(self, until: float = 600.0) -> None:
        while not all(self.finished) and self.now < until:
            self.step()

    def check(self) -> None:
        assert all(self.finished), f"unfinished at {self.now:.1f} s: {[len(r) for r in self.received]}"
        chunks = P.total_chunks(len(self.data))
        padded = self.data.ljust(chunks * MiB, b"\0")
        for got in self.received:
            assert sorted(got) == list(range(chunks))
            assert b"".join(got[i] for i in range(chunks)) == padded


@pytest.mark.parametrize("loss", [0.0, 0.1, 0.3])
def test_against_our_server_with_loss(loss):
    data = image_bytes(6 * MiB + 5000)
    session = Session(data, loss, seed=int(loss * 100) + 1)
    session.run()
    session.check()
    client = session.clients[0]
    if loss:
        assert client.stats.prequests > 0 and client.stats.lost_blocks > 0
    else:
        assert client.stats.dup_blocks == 0 and client.stats.rerequests == 0


def test_several_clients_on_one_group_share_the_blocks():
    data = image_bytes(8 * MiB)
    session = Session(data, 0.1, seed=5, clients=4, memory_mb=4)
    session.run()
    session.check()
    # Snooping and shared blocks: far fewer blocks sent than 4 separate transfers would need.
    assert session.server.stats["blocks"] < 2.5 * 8 * 1024


def test_server_restart_mid_transfer_against_our_server():
    data = image_bytes(8 * MiB)
    session = Session(data, 0.1, seed=9, clients=2)
    while len(session.received[0]) < 3:
        session.step()
    # The server dies for 5 s; a new process (no state, same address) takes over.
    session.server_alive = False
    died = session.now
    while session.now < died + 5:
        session.step()
    assert not all(session.finished)
    session.server, session.server_alive = Server(len(data), SERVER, port=PORT, now=session.now), True
    session.run(until=session.now + 120)
    session.check()


# ---------------------------------------------------------------------------------------------------------------
# real sockets: FrisbeeSource against `nodeagent serve` and the real frisbeed, on hosts in network namespaces of
# our own (a server and a client cannot share one address: frisbee uses the same port in both directions)

FRISBEED = os.environ.get("NODEAGENT_FRISBEED", "")


class _OurServer:
    """serve() (the shell of `nodeagent serve`) on a thread inside a namespace, until closed."""

    def __init__(self, ns: str, path, addr: str, port: int, ifaddr: str, **kw):
        self.stop = threading.Event()
        self.log: list[str] = []
        self.error: BaseException | None = None

        def run():
            try:
                enter_netns(ns)
                serve(str(path), addr, port, ifaddr=ifaddr, log=self.log.append, stop=self.stop, **kw)
            except BaseException as err:
                self.error = err

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        assert self.error is None, self.error


def _restore_from(source: FrisbeeSource, out_path):
    target = Target(str(out_path))
    try:
        return restore(source, target)
    finally:
        source.close()
        target.close()


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def cli_restore_sha(tmp_path, run_cli):
    """sha256 of `python -m agent image` of an image into a file."""

    def restore_with_cli(image) -> str:
        out = tmp_path / f"reference-{image.stem}.img"
        run_cli("image", "-q", image, out, check=True)
        return _sha(out)

    return restore_with_cli


@needs_root
@pytest.mark.parametrize("fast", [True, False])  # the receive fast path in C, and the pure-Python reference
def test_frisbee_source_unicast_from_our_server(tmp_path, cli_restore_sha, fast):
    image = FIXTURES / "fsA-raw-v3.ndz"
    with lan(2) as (server_host, client_host):
        # Unicast: the server's -m is the client's address, the client's the server's.
        server = _OurServer(server_host.ns, image, client_host.addr, 5101, server_host.addr, bandwidth=200_000_000)
        try:
            source = client_host.call(lambda: FrisbeeSource(server_host.addr, 5101, idle_timeout=10, fast=fast))
            assert (source.drops is not None) == fast
            index, area = source.preflight()
            assert index == 6 and area == image.read_bytes()[6 * MiB : 6 * MiB + 4096]
            result = _restore_from(source, tmp_path / "out.img")
        finally:
            server.close()
    assert result.chunks == 7
    assert _sha(tmp_path / "out.img") == cli_restore_sha(image)
    assert source.stats.chunks_out == 7 and source.stats.foreign_blocks == 0
    assert any("leaves" in line for line in server.log)  # our LEAVE2 reached it


@needs_root
def test_frisbee_source_slow_consumer_small_memory():
    """A consumer slower than the network with 2 MiB of buffers: memory stays bounded, the image is right."""
    image = FIXTURES / "fsA-raw-v3.ndz"
    with lan(2) as (server_host, client_host):
        server = _OurServer(server_host.ns, image, client_host.addr, 5102, server_host.addr)
        try:
            source = client_host.call(lambda: FrisbeeSource(server_host.addr, 5102, idle_timeout=10, memory_mb=2))
            got = {}
            for index, chunk in source.chunks():
                got[index] = chunk
                with source._cond:
                    client = source._client
                    assert len(client._filling) + len(client._untaken) <= 2
                time.sleep(0.2)
            source.close()
        finally:
            server.close()
    assert b"".join(got[i] for i in range(7)) == image.read_bytes()
    assert source.stats.chunks_in == 7 and source.stats.useful_blocks == 7 * 1024


@needs_root
@pytest.mark.skipif(not os.access(FRISBEED, os.X_OK), reason="set NODEAGENT_FRISBEED to the real frisbeed")
def test_frisbee_source_multicast_from_the_real_frisbeed(tmp_path, cli_restore_sha):
    image = FIXTURES / "diskB-mbr-v3.ndz"
    group = "239.192.1.21"
    with lan(2) as (server_host, client_host):
        # -H 1: frisbeed asks every client for a PROGRESS report each second.
        argv = [FRISBEED, "-d", "-H", "1", "-T", "20", "-m", group, "-p", 5103, "-i", server_host.addr, image]
        frisbeed = server_host.popen(server_host.cmd(*argv))
        try:
            time.sleep(0.2)
            source = client_host.call(lambda: FrisbeeSource(group, 5103, ifaddr=client_host.addr, idle_timeout=10))
            result = _restore_from(source, tmp_path / "out.img")
            time.sleep(0.3)
        finally:
            frisbeed.terminate()
            _, log = frisbeed.communicate(timeout=10)
    log = log.decode()
    assert result.chunks == 3 and _sha(tmp_path / "out.img") == cli_restore_sha(image)
    clientid = source._client.clientid
    assert f"id {clientid}): reports summary" in log  # our PROGRESS answer was read
    assert "leaves at" in log and f"Client {clientid} Stats" in log  # LEAVE2 with its stats


@needs_root
def test_frisbee_source_times_out_without_a_server():
    with lan(2) as (nobody, client_host):
        source = client_host.call(lambda: FrisbeeSource(nobody.addr, 5104, idle_timeout=1))
        start = time.monotonic()
        with pytest.raises(NetworkError, match=rf"^no packets from the frisbee server {nobody.addr}:5104 for 1 s$"):
            source.preflight()
        assert 0.9 < time.monotonic() - start < 5
        source.close()
