"""The frisbee server: the scheduler without sockets, the shell on loopback UDP, and the real frisbee client
against our server inside private network namespaces (when NODEAGENT_FRISBEE names the real client binary)."""

from __future__ import annotations

import contextlib
import errno
import itertools
import math
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import AddressInUseError, NetworkError, NodeagentError, SourceError
from agent.frisbee.net import mode_of, open_endpoint, subnet_broadcast
from agent.frisbee.packets import (
    BLOCK_SIZE,
    CHUNK_BYTES,
    Block,
    Join,
    Join2,
    JoinReply,
    Leave,
    Leave2,
    PRequest,
    Progress,
    PacketError,
    Request,
    accept_source,
    bitmap_of,
    chunk_blocks,
    decode,
    encode,
    encode_block,
    total_chunks,
)
from agent.frisbee.serve import log_line, serve
from agent.frisbee.server import (
    CATCHUP, WIRE_BITS_PER_BLOCK, BadPacket, BlocksDue, ForgedSource, Idle, Pacing, Server,
)
from agent.netif import IPv4Interface, ipv4_interfaces
from net_helpers import BROADCAST, lan

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "imagezip"
SIZE = 3 * CHUNK_BYTES + 5000  # 3 full chunks and a last chunk of 5 blocks, the last one short
IP = "10.0.0.2"  # a client
SERVER, PORT = "10.0.0.1", 5000


def make(total: int = SIZE, **kw) -> Server:
    return Server(total, SERVER, port=PORT, **kw)


def unpaced(total: int = SIZE, **kw) -> Server:
    return make(total, pacing=Pacing.from_bandwidth(0), **kw)


def deliver(server: Server, msg, ip: str = IP, now: float = 0.0) -> list:
    """msg as a datagram from ip (its header naming ip) on the session port; the server's events."""
    return server.receive(encode(msg, ip), (ip, PORT), now)


def ask(server: Server, msg, ip: str = IP, now: float = 0.0) -> list:
    """Deliver msg; the replies the server queued, decoded."""
    deliver(server, msg, ip, now)
    return [decode(out.data)[0] for out in server.outgoing()]


class Sends(NamedTuple):
    blocks: list[tuple[int, int]]
    wake_at: float | None  # None: only when a message arrives
    done: bool


def poll(server: Server, now: float) -> Sends:
    """timer(now), whether due or not (early calls send nothing), and next_deadline: the blocks due, when next."""
    events = server.timer(now)
    blocks = [(e.chunk, b) for e in events if isinstance(e, BlocksDue) for b in range(e.block, e.block + e.count)]
    deadline = server.next_deadline()
    return Sends(blocks, None if deadline == math.inf else deadline, any(isinstance(e, Idle) for e in events))


def pending(server: Server) -> int:
    """Blocks queued or in the current run."""
    run = server._run
    return sum(w.bits.bit_count() for w in server._queue) + (run[2] - run[1] if run else 0)


def drain(server: Server, start: float = 0.0, limit: float = 100.0) -> list[tuple[int, int]]:
    """Run the pacing clock (polling exactly at each wake-up) until the queue is empty."""
    now, out = start, []
    while now < limit:
        sends = poll(server, now)
        out += sends.blocks
        if not pending(server):
            return out
        now = sends.wake_at
    raise AssertionError("queue never drained")


# --- joins ---------------------------------------------------------------------------------------------------------


def test_join_replies_carry_the_size():
    server = make(SIZE)
    assert ask(server, Join(5), IP, 0) == [JoinReply(3 * 1024 + 5)]
    assert ask(server, Join2(9, 0, 1024, 1024, 0, False), IP, 0) == [Join2(9, 0, 1024, 1024, SIZE, True)]


def test_join_replies_are_immediate_even_mid_burst():
    server = make(SIZE)
    ask(server, Request(0, 0, 1024), IP, 0)
    assert len(poll(server, 0.0).blocks) == 16
    # The burst budget is spent until t=2 ms, but a JOIN is answered now, ahead of the queued blocks.
    assert ask(server, Join(1), IP, 0.0005) == [JoinReply(3 * 1024 + 5)]
    assert poll(server, 0.0005).blocks == []


def test_garbage_and_forged_sources_are_dropped_and_counted():
    server = make(SIZE, session_addr="239.1.1.1")
    assert server.receive(b"garbage", (IP, PORT), 0) == [BadPacket((IP, PORT), "short datagram (7 bytes)")]
    assert deliver(server, Join(1), "10.0.0.9", 0) != []  # any host may join...
    assert server.receive(encode(Join(1), "10.0.0.9"), (IP, PORT), 0) == [ForgedSource((IP, PORT), "10.0.0.9")]
    assert server.receive(encode(Request(0, 0, 1), IP), (IP, PORT + 1), 0) == [ForgedSource((IP, PORT + 1), IP)]
    assert server.stats["bad_packets"] == 3 and server.stats["joins"] == 1 and pending(server) == 0
    assert [decode(d.data)[0] for d in server.outgoing()] == [JoinReply(3 * 1024 + 5)]  # one reply, the join's
    # From the session address, the header names the sender (packets.accept_source).
    assert server.receive(encode(Request(0, 0, 1), "10.0.0.9"), ("239.1.1.1", PORT), 0) == []
    assert pending(server) == 1 and server.stats["bad_packets"] == 3


def test_echoes_of_server_traffic_are_ignored():
    server = make(SIZE, idle_timeout=10)
    echoes = (JoinReply(7), Join2(1, 0, 1024, 1024, 9, True), Block(0, 0, bytes(1024)), Progress(1, 0, 5, 1, 1, False))
    for msg in echoes:
        assert ask(server, msg, IP, 5) == []
    assert pending(server) == 0
    assert poll(server, 10).done  # none of them counted as activity


# --- the work queue ---------------------------------------------------------------------------------------------------


def test_requests_for_a_queued_chunk_merge():
    server = unpaced()
    ask(server, Request(1, 0, 10), IP, 0)
    ask(server, Request(2, 0, 3), "10.0.0.3", 0)
    ask(server, PRequest(1, 0, bitmap_of(range(5, 21))), "10.0.0.4", 0)
    assert server.stats["merged"] == 1
    assert drain(server) == [(1, b) for b in range(21)] + [(2, 0), (2, 1), (2, 2)]


def test_full_request_for_the_chunk_being_sent_is_dropped():
    server = make(SIZE)
    ask(server, Request(0, 0, 1024), IP, 0)
    first = poll(server, 0).blocks
    assert first == [(0, b) for b in range(16)]
    ask(server, Request(0, 0, 1024), "10.0.0.3", 0.001)  # a late joiner: it catches the rest as it goes by
    ask(server, PRequest(0, 0, bytes([0xFF]) * 128), "10.0.0.4", 0.001)  # a full map is a full request too
    assert server.stats["dropped"] == 2
    assert first + drain(server, 0.002) == [(0, b) for b in range(1024)]


def test_partial_request_for_the_chunk_being_sent_is_kept():
    server = make(SIZE)
    ask(server, Request(0, 0, 1024), IP, 0)
    ask(server, Request(1, 0, 1024), IP, 0)
    sent = poll(server, 0).blocks
    ask(server, PRequest(0, 1, bitmap_of([3])), "10.0.0.3", 0.001)  # lost block 3 of the chunk in flight
    sent += drain(server, 0.002)
    assert sent == [(0, b) for b in range(1024)] + [(1, b) for b in range(1024)] + [(0, 3)]


def test_head_entry_only_takes_blocks_ahead_of_the_run():
    server = make(SIZE)
    ask(server, Request(0, 0, 100), IP, 0)
    ask(server, Request(0, 200, 100), IP, 0)  # merged: the head entry holds 0-99 and 200-299
    ask(server, Request(1, 0, 1), IP, 0)
    sent = poll(server, 0).blocks  # the run 0-99 of chunk 0 starts
    ask(server, PRequest(0, 0, bitmap_of([150])), IP, 0.001)  # ahead of the run: merged into the head entry
    ask(server, PRequest(0, 0, bitmap_of([50])), IP, 0.001)  # behind the run's end: to the back of the queue
    sent += drain(server, 0.002)
    expect = [(0, b) for b in range(100)] + [(0, 150)] + [(0, b) for b in range(200, 300)] + [(1, 0), (0, 50)]
    assert sent == expect


def test_a_queued_chunk_is_sent_once_for_many_requests():
    server = unpaced()
    for i in range(20):
        ask(server, Request(2, 0, 1024), f"10.0.1.{i}", 0)
    assert drain(server) == [(2, b) for b in range(1024)]


def test_no_per_client_state():
    # Anyone may ask, joined or not, and the same chunk is sent again whenever asked again after it went by.
    server = unpaced()
    ask(server, Request(1, 0, 1024), "10.0.0.3", 0)
    assert len(drain(server)) == 1024
    ask(server, Request(1, 0, 1024), "10.0.0.3", 1)
    assert len(drain(server, 1)) == 1024
    assert server.stats["joins"] == 0


def test_out_of_range_requests_are_ignored():
    server = unpaced()
    ask(server, Request(4, 0, 1024), IP, 0)  # chunks are 0..3
    ask(server, PRequest(99, 0, bitmap_of([0])), IP, 0)
    ask(server, PRequest(3, 0, bitmap_of([5, 6, 1000])), IP, 0)  # the last chunk has blocks 0..4 only
    ask(server, PRequest(0, 0, bytes(128)), IP, 0)  # an empty map
    assert pending(server) == 0
    assert server.stats["ignored"] == 4


def test_the_last_chunk_is_clipped_to_the_file():
    server = unpaced()
    ask(server, Request(3, 0, 1024), IP, 0)
    assert drain(server) == [(3, b) for b in range(5)]


def test_empty_file():
    server = unpaced(0)
    assert ask(server, Join(1), IP, 0) == [JoinReply(0)]
    assert ask(server, Join2(1, 0, 1024, 1024, 0, False), IP, 0)[0].bytecount == 0
    ask(server, Request(0, 0, 1), IP, 0)
    assert pending(server) == 0


# --- pacing --------------------------------------------------------------------------------------------------------


def test_default_pacing_is_frisbeeds():
    pacing = Pacing.from_bandwidth(None)
    assert (pacing.burst, pacing.interval) == (16, 0.002)
    assert WIRE_BITS_PER_BLOCK == 9168
    assert pacing.describe() == "Maximum send bandwidth 73.344 Mbits/sec (8000 blocks/sec)"


@pytest.mark.parametrize(
    "bps,blocks_per_second,interval",
    [
        (50_000_000, 50_000_000 / 9168, 0.001),  # ~5.45k blocks/s in bursts of 5.45 (the fraction carried)
        (1_000_000_000, 1_000_000_000 / 9168, 0.001),
        (9168 * 1000, 1000, 0.001),
        (9168 * 400, 400, 0.003),  # below one block per ms: one burst every 3 ms (2.5 ms rounded up to the clock)
    ],
)
def test_bandwidth_to_bursts(bps, blocks_per_second, interval):
    pacing = Pacing.from_bandwidth(bps)
    assert pacing.interval == pytest.approx(interval)
    assert pacing.blocks_per_second == pytest.approx(blocks_per_second)


def test_rates_over_a_second():
    # A 3 MiB file is only 3077 blocks, so use a bigger one for the rate itself.
    big = 100 * CHUNK_BYTES
    for bps, expect in [(None, 8000), (50_000_000, 5454), (9168 * 400, 400)]:
        server = make(big, pacing=Pacing.from_bandwidth(bps))
        for chunk in range(100):
            ask(server, Request(chunk, 0, 1024), IP, 0)
        now, count, bursts = 0.0, 0, set()
        while now < 1.0 - 1e-9:
            sends = poll(server, now)
            count += len(sends.blocks)
            bursts.add(len(sends.blocks))
            now = sends.wake_at
        assert abs(count - expect) <= 1, (bps, count)  # frisbeed truncates bursts to whole blocks; we carry
        assert max(bursts) <= int(Pacing.from_bandwidth(bps).burst) + 1


def test_polling_early_sends_nothing():
    server = make(SIZE)
    ask(server, Request(0, 0, 1024), IP, 0)
    assert len(poll(server, 0).blocks) == 16
    sends = poll(server, 0.0015)
    assert sends.blocks == [] and sends.wake_at == pytest.approx(0.002)


def test_late_polls_catch_up_at_most_10_ms():
    server = make(SIZE)
    ask(server, Request(0, 0, 1024), IP, 0)
    poll(server, 0)
    sends = poll(server, 0.5)  # 249 bursts late: make up 5 of them (10 ms), then keep the schedule
    assert len(sends.blocks) == 16 * 6 and sends.wake_at == pytest.approx(0.502)
    sends = poll(server, 0.0025 + 0.5)  # slightly late: keep the schedule
    assert len(sends.blocks) == 16 and sends.wake_at == pytest.approx(0.504)
    sends = poll(server, 0.5071)  # one and a half bursts late: one made up
    assert len(sends.blocks) == 32 and sends.wake_at == pytest.approx(0.508)


def test_rate_holds_when_woken_late():
    """A server polled only every 7 ms (descheduled on a busy machine) still sends -W on average."""
    big = 100 * CHUNK_BYTES
    server = make(big, pacing=Pacing.from_bandwidth(50_000_000))
    for chunk in range(100):
        ask(server, Request(chunk, 0, 1024), IP, 0)
    count, now = 0, 0.0
    while now < 1.0 - 1e-9:
        sends = poll(server, now)
        count += len(sends.blocks)
        assert len(sends.blocks) <= 5.46 * 11
        now = max(sends.wake_at, now + 0.007)
    assert abs(count - 5454) <= 60


def test_unlimited_hands_out_batches_at_once():
    server = unpaced()
    ask(server, Request(0, 0, 1024), IP, 0)
    sends = poll(server, 7.0)
    assert len(sends.blocks) == 32 and sends.wake_at == 7.0
    assert Pacing.from_bandwidth(0).describe() == "Maximum send bandwidth unlimited"


def test_negative_bandwidth_refused():
    with pytest.raises(ValueError):
        Pacing.from_bandwidth(-1)


# --- idle timeout and bookkeeping ------------------------------------------------------------------------------------


def test_idle_timeout_counts_from_the_last_request_or_send():
    server = make(SIZE, idle_timeout=30, now=100)
    sends = poll(server, 120)
    assert sends.wake_at == 130 and not sends.done and not sends.blocks
    ask(server, Request(0, 0, 16), IP, 125)  # one burst's worth
    assert poll(server, 126).blocks and not poll(server, 150).done  # idle since the send at 126
    assert poll(server, 156).done


def test_leaves_do_not_keep_the_server_alive():
    server = make(SIZE, idle_timeout=30, now=0)
    ask(server, Join(1), IP, 0)
    ask(server, Leave(1, 12), IP, 20)
    assert poll(server, 30).done


def test_idle_timeout_zero_never_ends():
    server = make(SIZE, idle_timeout=0)
    sends = poll(server, 1e9)
    assert not sends.done and sends.wake_at is None


def test_negative_idle_timeout_ends_after_the_last_client_leaves():
    server = make(SIZE, idle_timeout=-1)
    assert poll(server, 1e6).wake_at is None  # nobody came yet: wait
    ask(server, Join(1), IP, 10)
    ask(server, Join(2), "10.0.0.3", 10)
    ask(server, Leave(1, 5), IP, 15)
    assert not poll(server, 100).done
    ask(server, Leave2(2, 6, bytes(1028)), "10.0.0.3", 100)
    assert not poll(server, 101).done and poll(server, 102).done


def test_log_lines():
    # The engine reports joins, leaves and reports as events; the shell's log_line words them.
    server = make(SIZE)
    events = deliver(server, Join(77), IP, 0)
    events += deliver(server, Progress(77, 0, 5, 1, 1, True, (1, 2, 3)), IP, 1)
    events += deliver(server, Leave2(77, 42, bytes(1028)), IP, 2)
    events += deliver(server, Leave(78, 1), IP, 2)
    lines = [log_line(e) for e in events]
    assert "10.0.0.2 (id 77) joins (v1)" in lines[0]
    assert "recv=1 decomp=2 written=3" in lines[1]
    assert "ran for 42 seconds" in lines[2]
    assert "spurious leave" in lines[3]


@st.composite
def request_streams(draw):
    """Any valid message a client could send (chunks partly outside the file), at increasing times."""
    block = st.integers(0, 1023)
    msg = st.one_of(
        st.builds(lambda c, b, n: Request(c, b, min(n, 1024 - b)), st.integers(0, 6), block, st.integers(1, 1024)),
        st.builds(PRequest, st.integers(0, 6), st.integers(0, 1), st.binary(min_size=128, max_size=128)),
        st.builds(Join, st.integers(0, 3)),
        st.builds(Leave, st.integers(0, 3), st.integers(0, 9)),
    )
    return draw(st.lists(st.tuples(msg, st.floats(0, 0.01)), max_size=40))


@settings(max_examples=200, deadline=None)
@given(request_streams(), st.sampled_from([None, 0, 50_000_000]))
def test_any_request_stream_is_served_within_the_file_and_the_rate(stream, bps):
    server = make(SIZE, pacing=Pacing.from_bandwidth(bps))
    wanted: set[tuple[int, int]] = set()
    sent: list[tuple[int, int]] = []
    now = 0.0
    for msg, dt in stream:
        now += dt
        ask(server, msg, IP, now)
        if isinstance(msg, Request):
            wanted |= {(msg.chunk, b) for b in range(msg.block, msg.block + msg.count)}
        elif isinstance(msg, PRequest):
            wanted |= {(msg.chunk, b) for b in range(1024) if msg.blockmap[b // 8] >> (b % 8) & 1}
        sends = poll(server, now)
        # A late poll makes up for at most CATCHUP seconds of missed bursts.
        catchup = 1 + math.ceil(CATCHUP / server.pacing.interval) if bps != 0 else 0
        assert len(sends.blocks) <= (32 if bps == 0 else math.ceil(server.pacing.burst * catchup))
        sent += sends.blocks
    sent += drain(server, now, now + 100)
    inside = {(c, b) for c, b in wanted if b < chunk_blocks(SIZE, c)}
    assert set(sent) == inside  # everything asked for inside the file, nothing else (dropped repeats were in flight)


# --- packet sources (frisbee's PacketReceive rule) ---------------------------------------------------------------


@pytest.mark.parametrize(
    "msg,hdr_ip,from_ip,from_port,client,ok",
    [
        (Request(0, 0, 1), "10.0.0.2", "10.0.0.2", 5000, False, True),
        (Request(0, 0, 1), "10.0.0.9", "10.0.0.2", 5000, False, False),  # header lies about the sender
        (Request(0, 0, 1), "10.0.0.2", "10.0.0.2", 5001, False, False),  # wrong source port
        (Request(0, 0, 1), "10.0.0.9", "239.1.1.1", 5000, False, True),  # from the group: header believed
        (Block(0, 0, bytes(1024)), "10.0.0.1", "239.1.1.1", 5000, True, False),  # only a server sends BLOCKs
        (Progress(1, 0, 1, 1, 1, False), "10.0.0.1", "239.1.1.1", 5000, True, False),
        (Progress(1, 0, 1, 1, 1, True), "10.0.0.1", "239.1.1.1", 5000, True, True),
        (Block(0, 0, bytes(1024)), "10.0.0.1", "10.0.0.1", 5000, True, True),
    ],
)
def test_accept_source(msg, hdr_ip, from_ip, from_port, client, ok):
    assert accept_source(msg, hdr_ip, from_ip, from_port, session_addr="239.1.1.1", port=5000, client=client) is ok


def test_mode_by_address():
    assert mode_of("239.192.1.1", False) == "multicast"
    assert mode_of("224.0.0.251", True) == "multicast"
    assert mode_of("255.255.255.255", True) == "broadcast"
    assert mode_of("10.1.2.3", False) == "unicast"


def test_subnet_broadcast_choice():
    found = [
        IPv4Interface("lo", "127.0.0.1", 0x1 | 0x8, None),
        IPv4Interface("eth0", "10.1.2.3", 0x1 | 0x2, "10.1.2.255"),
        IPv4Interface("eth1", "10.9.0.1", 0x2, "10.9.255.255"),  # down
    ]
    assert subnet_broadcast("10.1.2.3", found) == "10.1.2.255"
    assert subnet_broadcast("10.9.0.1", found) is None
    assert subnet_broadcast("127.0.0.1", found) is None
    assert any(i.name == "lo" and i.addr == "127.0.0.1" and i.broadcast is None for i in ipv4_interfaces())


# --- the shell on loopback -----------------------------------------------------------------------------------------

CLIENT_IP, SERVER_IP = "127.0.0.2", "127.0.0.1"
_ports = itertools.count(41000 + os.getpid() % 1000 * 7)


def free_port() -> int:
    while True:
        port = next(_ports)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port


class TinyClient:
    """A raw-socket frisbee client on 127.0.0.2 talking unicast to a server on 127.0.0.1 (whose -m is us)."""

    def __init__(self, port: int):
        self.port = port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the server holds 0.0.0.0:port
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((CLIENT_IP, port))

    def send(self, msg, ip: str = CLIENT_IP) -> None:
        self.sock.sendto(encode(msg, ip), (SERVER_IP, self.port))

    def recv(self, timeout: float = 5.0):
        self.sock.settimeout(timeout)
        datagram, source = self.sock.recvfrom(2048)
        assert source == (SERVER_IP, self.port)
        return decode(datagram)

    def join(self, msg):
        for _ in range(20):  # as frisbee: resend until the reply comes
            self.send(msg)
            with contextlib.suppress(socket.timeout):
                while True:
                    reply, ip = self.recv(0.5)
                    if not isinstance(reply, Block):
                        return reply, ip
        raise AssertionError("no JOIN reply")

    def fetch(self, size: int, chunks: list[int] | None = None) -> dict[tuple[int, int], bytes]:
        """Request chunks, re-request what is missing (PREQUEST) until every block is in."""
        chunks = list(range(total_chunks(size))) if chunks is None else chunks
        got: dict[tuple[int, int], bytes] = {}
        for c in chunks:
            self.send(Request(c, 0, chunk_blocks(size, c)))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                msg, ip = self.recv(0.3)
                assert ip == SERVER_IP
                got[msg.chunk, msg.block] = msg.data
            except socket.timeout:
                missing = {c: [b for b in range(chunk_blocks(size, c)) if (c, b) not in got] for c in chunks}
                if not any(missing.values()):
                    return got
                for c, blocks in missing.items():
                    if blocks:
                        self.send(PRequest(c, 1, bitmap_of(blocks)))
        raise AssertionError("blocks still missing after 60 s")

    def close(self):
        self.sock.close()


@contextlib.contextmanager
def serving(path: Path, port: int, **kw):
    stop, ready, result = threading.Event(), threading.Event(), {}
    lines: list[str] = []

    def run():
        try:
            result["stats"] = serve(
                str(path), CLIENT_IP, port, SERVER_IP, reuse_addr=True, stop=stop,
                on_ready=lambda ep: ready.set(), log=lines.append, **kw,
            )
        except BaseException as err:  # handed to the test
            result["error"] = err
            ready.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10)
    if "error" in result:
        raise result["error"]
    client = TinyClient(port)
    try:
        yield client, result, lines
    finally:
        client.close()
        stop.set()
        thread.join(10)
        assert not thread.is_alive()
    if "error" in result:
        raise result["error"]


def assemble(got: dict[tuple[int, int], bytes], size: int) -> bytes:
    return b"".join(got[k] for k in sorted(got))


@pytest.fixture
def odd_file(tmp_path) -> tuple[Path, bytes]:
    data = os.urandom(SIZE)  # not a multiple of the block size: the last block goes out padded
    path = tmp_path / "odd.bin"
    path.write_bytes(data)
    return path, data


@pytest.mark.parametrize("batched", [True, False])  # BLOCKs sent in batches from C, or the engine's one by one
def test_serve_delivers_the_file_bytes(odd_file, batched):
    path, data = odd_file
    with serving(path, free_port(), batched=batched) as (client, result, lines):
        reply, ip = client.join(Join2(4242, 0, 1024, 1024, 0, False))
        assert (reply, ip) == (Join2(4242, 0, 1024, 1024, SIZE, True), SERVER_IP)
        reply, _ = client.join(Join(4242))
        assert reply == JoinReply(3 * 1024 + 5)
        started = time.monotonic()
        got = client.fetch(SIZE)
        elapsed = time.monotonic() - started
        client.send(Leave2(4242, 3, bytes(1028)))
        time.sleep(0.2)
    blob = assemble(got, SIZE)
    assert blob[:SIZE] == data and blob[SIZE:] == bytes(len(blob) - SIZE)
    assert len(got) == 3 * 1024 + 5
    # Default pacing is 8000 blocks/s: 3077 blocks cannot arrive in much less than 0.38 s.
    assert elapsed > 3077 / 8000 - 0.02
    assert any("Maximum send bandwidth 73.344 Mbits/sec" in line for line in lines)
    assert any("ran for 3 seconds" in line for line in lines)
    assert result["stats"]["blocks"] >= 3077


@pytest.mark.parametrize("batched", [True, False])
def test_serve_unlimited_and_single_chunk(odd_file, batched):
    path, data = odd_file
    with serving(path, free_port(), bandwidth=0, batched=batched) as (client, result, lines):
        got = client.fetch(SIZE, [2])
    assert assemble(got, SIZE) == data[2 * CHUNK_BYTES : 3 * CHUNK_BYTES]


def test_serve_drops_bad_packets_and_keeps_going(odd_file):
    path, data = odd_file
    with serving(path, free_port(), bandwidth=0) as (client, result, lines):
        client.sock.sendto(b"garbage", (SERVER_IP, client.port))
        client.sock.sendto(encode(Request(0, 0, 1024), CLIENT_IP)[:20], (SERVER_IP, client.port))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:  # right header, wrong source port
            other.bind((CLIENT_IP, 0))
            other.sendto(encode(Request(1, 0, 1024), CLIENT_IP), (SERVER_IP, client.port))
        client.send(Request(9, 0, 1024))  # no chunk 9
        got = client.fetch(SIZE, [3])
        time.sleep(0.1)
    assert assemble(got, SIZE)[: SIZE - 3 * CHUNK_BYTES] == data[3 * CHUNK_BYTES :]
    assert result["stats"]["bad_packets"] == 3
    assert result["stats"]["ignored"] == 1
    assert any("bad message source" in line for line in lines)
    assert (1, 0) not in got


def test_serve_caps_the_log_of_requests_outside_the_file(odd_file):
    path, data = odd_file
    with serving(path, free_port(), bandwidth=0) as (client, result, lines):
        for _ in range(25):
            client.send(Request(9, 0, 1024))  # there is no chunk 9
        for _ in range(3):
            client.send(PRequest(0, 0, bytes(128)))  # an empty map: outside the file too
        got = client.fetch(SIZE, [3])  # the server keeps serving meanwhile
        time.sleep(0.1)
    assert assemble(got, SIZE)[: SIZE - 3 * CHUNK_BYTES] == data[3 * CHUNK_BYTES :]
    assert result["stats"]["ignored"] == 28
    outside = [line for line in lines if "outside the file" in line]
    assert len(outside) == 10 and outside[-1].endswith("; not logging more"), outside
    assert not [line for line in lines if line.startswith("bad ")]  # a cap of its own


def test_serve_returns_when_idle(odd_file):
    path, _ = odd_file
    port = free_port()
    started = time.monotonic()
    stats = serve(str(path), CLIENT_IP, port, SERVER_IP, idle_timeout=0.4, log=lambda line: None)
    assert 0.35 < time.monotonic() - started < 5
    assert stats["blocks"] == 0


def test_serve_errors_are_one_line_nodeagent_errors(tmp_path, odd_file):
    path, _ = odd_file
    with pytest.raises(SourceError, match="No such file"):
        serve(str(tmp_path / "missing.ndz"), CLIENT_IP, free_port(), SERVER_IP)
    with pytest.raises(SourceError, match="not a regular file"):
        serve(str(tmp_path), CLIENT_IP, free_port(), SERVER_IP)
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("0.0.0.0", port))
        with pytest.raises(AddressInUseError, match="in use") as info:
            serve(str(path), CLIENT_IP, port, SERVER_IP)
    assert info.value.exit_status == errno.EADDRINUSE == 98 and isinstance(info.value, NetworkError)
    with pytest.raises(NodeagentError, match="not an IPv4"):
        serve(str(path), "a" * 64, free_port())  # a bad name that fails in the IDNA codec, before any DNS query
    with pytest.raises(NodeagentError, match="bandwidth"):
        serve(str(path), CLIENT_IP, free_port(), SERVER_IP, bandwidth=-1)


def test_endpoint_reports_the_bound_port_and_sockopts():
    with open_endpoint("server", CLIENT_IP, 0, SERVER_IP) as ep:
        assert ep.port > 0 and ep.dest == (CLIENT_IP, ep.port) and ep.local_ip == SERVER_IP and ep.mode == "unicast"
        assert ep.recv(0) is None
        sock = ep._socks[0]
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= 1 << 20
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 0  # frisbeed: a busy port is an error


def test_encode_block_is_encode_of_block():
    data = os.urandom(BLOCK_SIZE)
    assert encode_block(5, 17, data, "10.0.0.1") == encode(Block(5, 17, data), "10.0.0.1")


def test_send_blocks_encodes_a_run():
    data = os.urandom(3 * BLOCK_SIZE)
    run = [encode(Block(2, 1021 + k, data[k * BLOCK_SIZE : (k + 1) * BLOCK_SIZE]), SERVER) for k in range(3)]
    assert make().send_blocks(2, 1021, data) == run
    for chunk, first, size in ((2, 1022, 3 * BLOCK_SIZE), (-1, 0, BLOCK_SIZE), (0, 0, BLOCK_SIZE + 1)):
        with pytest.raises(PacketError):
            make().send_blocks(chunk, first, bytes(size))  # past the chunk's end, a bad chunk, not whole blocks


# --- interop: the real frisbee client against our server, in private network namespaces --------------------------

FRISBEE = os.environ.get("NODEAGENT_FRISBEE", "")
needs_frisbee = pytest.mark.skipif(
    not (FRISBEE and os.access(FRISBEE, os.X_OK) and os.geteuid() == 0),
    reason="set NODEAGENT_FRISBEE to the real frisbee client (and run as root: network namespaces)",
)
_nets = itertools.count(1)


def start_server(host, path: Path, addr: str, port: int, *, broadcast=False, bandwidth=None):
    code = (
        "import sys; from agent.frisbee.serve import serve; "
        f"serve({str(path)!r}, {addr!r}, {port}, {host.addr!r}, broadcast={broadcast}, bandwidth={bandwidth!r}, "
        "idle_timeout=-1)"  # the server ends 2 s after its last client leaves
    )
    return host.popen(host.python(code))


def frisbee_argv(host, out: Path, addr: str, port: int, *flags: str) -> list[str]:
    return host.cmd(FRISBEE, "-m", addr, "-p", port, "-i", host.addr, "-T", "20", *flags, out)


def run_frisbee(host, out: Path, addr: str, port: int, *flags: str) -> subprocess.CompletedProcess:
    return host.run(frisbee_argv(host, out, addr, port, *flags), timeout=120, text=True)


def finish(server: subprocess.Popen) -> str:
    try:
        _, err = server.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        _, err = server.communicate()
        raise AssertionError(f"our server did not end after its client left:\n{err.decode()}")
    assert server.returncode == 0, err.decode()
    return err.decode()


def nodeagent_restore(image: Path, out: Path) -> bytes:
    subprocess.run([sys.executable, "-m", "agent", "image", "-q", str(image), str(out)], check=True, cwd=ROOT)
    return out.read_bytes()


def same_restore(frisbee_out: Path, expected: bytes) -> bool:
    # frisbee, like imageunzip, truncates a regular-file target and stops at the last sector it writes.
    got = frisbee_out.read_bytes()
    return len(got) <= len(expected) and got == expected[: len(got)] and not expected[len(got) :].strip(b"\0")


@needs_frisbee
@pytest.mark.parametrize(
    "mode,image",
    [
        ("multicast", "diskB-mbr-v3.ndz"),
        ("multicast", "fsA-fsaware-v5.ndz"),
        ("unicast", "fsA-raw-v3.ndz"),
        ("broadcast", "fsA-fsaware-v3.ndz"),
    ],
)
def test_real_frisbee_client_from_our_server(mode, image, tmp_path):
    source = FIXTURES / image
    expected = nodeagent_restore(source, tmp_path / "nodeagent.img")
    out = tmp_path / "frisbee.img"
    port = 5000 + next(_nets)
    with lan(2) as (server_host, client_host):
        if mode == "multicast":
            saddr = caddr = "239.192.7.1"
        elif mode == "unicast":
            saddr, caddr = client_host.addr, server_host.addr  # each names the other
        else:
            saddr = caddr = "255.255.255.255"  # narrowed to the subnet by -i on both sides
        server = start_server(server_host, source, saddr, port, broadcast=mode == "broadcast")
        time.sleep(0.5)
        flags = ["-b"] if mode == "broadcast" else []
        client = run_frisbee(client_host, out, caddr, port, *flags)
        log = finish(server)
    assert client.returncode == 0, client.stdout + client.stderr
    assert same_restore(out, expected), f"frisbee's restore differs from nodeagent image's\n{client.stderr}"
    assert "joins (v1)" in log and "ran for" in log
    if mode == "broadcast":
        assert f"Limiting broadcasts using {BROADCAST}" in log


@needs_frisbee
def test_real_frisbee_client_raw_file_mode(tmp_path):
    # frisbee -N joins with JOIN2 and writes the file as received: any file, of any size, byte for byte.
    data = os.urandom(2 * CHUNK_BYTES + 777)
    source = tmp_path / "any.bin"
    source.write_bytes(data)
    out = tmp_path / "copy.bin"
    with lan(2) as (server_host, client_host):
        server = start_server(server_host, source, "239.192.7.2", 5100, bandwidth=200_000_000)
        time.sleep(0.5)
        client = run_frisbee(client_host, out, "239.192.7.2", 5100, "-N")
        log = finish(server)
    assert client.returncode == 0, client.stdout + client.stderr
    assert out.read_bytes() == data
    assert "joins (v2)" in log


@needs_frisbee
def test_two_real_clients_at_once(tmp_path):
    source = FIXTURES / "fsA-raw-v3.ndz"
    expected = nodeagent_restore(source, tmp_path / "nodeagent.img")
    outs = [tmp_path / "a.img", tmp_path / "b.img"]
    # One host each: a real frisbee binds INADDR_ANY:port too, which a second client on the same host cannot.
    with lan(3) as (server_host, *client_hosts):
        server = start_server(server_host, source, "239.192.7.3", 5200)
        time.sleep(0.5)
        clients = [
            host.popen(frisbee_argv(host, o, "239.192.7.3", 5200), stderr=subprocess.STDOUT, text=True)
            for host, o in zip(client_hosts, outs)
        ]
        logs = [c.communicate(timeout=120)[0] for c in clients]
        finish(server)
    assert [c.returncode for c in clients] == [0, 0], logs
    assert all(same_restore(o, expected) for o in outs)


@needs_frisbee
def test_real_frisbee_client_recovers_losses_from_our_unpaced_server(tmp_path):
    # A 16 KiB client socket buffer against an unpaced server: the client drops blocks (typically ~20%) and asks
    # for them again with PREQUESTs, which our server merges and serves.
    source = FIXTURES / "fsA-raw-v3.ndz"
    expected = nodeagent_restore(source, tmp_path / "nodeagent.img")
    out = tmp_path / "frisbee.img"
    with lan(2) as (server_host, client_host):
        server = start_server(server_host, source, "239.192.7.4", 5300, bandwidth=0)
        time.sleep(0.5)
        client = run_frisbee(client_host, out, "239.192.7.4", 5300, "-k", "16")
        finish(server)
    assert client.returncode == 0, client.stdout + client.stderr
    assert same_restore(out, expected), client.stderr


# --- our client-side endpoint (net.open_endpoint "client") against our server, in namespaces ------------------------

needs_root_netns = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")


def endpoint_client(addr: str, port: int, ifaddr: str, broadcast: bool, size: int) -> None:
    """Run in the client namespace: fetch the whole file through a client endpoint, print its sha256."""
    import hashlib

    got: dict[tuple[int, int], bytes] = {}
    with open_endpoint("client", addr, port, ifaddr, broadcast) as ep:
        server_ip = None
        while server_ip is None:
            ep.send(encode(Join(99), ep.local_ip))
            if (got_dgram := ep.recv(0.5)) is not None:
                msg, hdr_ip = decode(got_dgram[0])
                ok = accept_source(msg, hdr_ip, *got_dgram[1], session_addr=ep.dest[0], port=ep.port, client=True)
                if ok and isinstance(msg, JoinReply):
                    assert msg.blockcount * BLOCK_SIZE == size
                    server_ip = hdr_ip
        chunks = total_chunks(size)
        for c in range(chunks):
            ep.send(encode(Request(c, 0, chunk_blocks(size, c)), ep.local_ip))
        while len(got) < size // BLOCK_SIZE:
            item = ep.recv(1.0)
            if item is None:
                for c in range(chunks):
                    missing = [b for b in range(chunk_blocks(size, c)) if (c, b) not in got]
                    if missing:
                        ep.send(encode(PRequest(c, 1, bitmap_of(missing)), ep.local_ip))
                continue
            msg, hdr_ip = decode(item[0])
            ok = accept_source(msg, hdr_ip, *item[1], session_addr=ep.dest[0], port=ep.port, client=True)
            if ok and isinstance(msg, Block) and hdr_ip == server_ip:
                got[msg.chunk, msg.block] = msg.data
        ep.send(encode(Leave(99, 1), ep.local_ip))
    print(hashlib.sha256(b"".join(got[k] for k in sorted(got))).hexdigest())


@needs_root_netns
@pytest.mark.parametrize("mode", ["multicast", "broadcast", "unicast"])
def test_client_endpoint_against_our_server(mode, tmp_path):
    import hashlib

    source = FIXTURES / "fsA-fsaware-v3.ndz"
    size = source.stat().st_size
    port = 5400 + next(_nets)
    with lan(2) as (server_host, client_host):
        saddr, caddr = {
            "multicast": ("239.192.7.5", "239.192.7.5"),
            "broadcast": ("255.255.255.255", "255.255.255.255"),
            "unicast": (client_host.addr, server_host.addr),
        }[mode]
        server = start_server(server_host, source, saddr, port, broadcast=mode == "broadcast")
        time.sleep(0.5)
        code = (
            "import test_frisbee_server as t; "
            f"t.endpoint_client({caddr!r}, {port}, {client_host.addr!r}, {mode == 'broadcast'}, {size})"
        )
        client = client_host.run(client_host.python(code), timeout=120, text=True)
        log = finish(server)
    assert client.returncode == 0, client.stderr
    assert client.stdout.strip() == hashlib.sha256(source.read_bytes()).hexdigest()
    assert "(id 99) joins (v1)" in log and "bad" not in log.split("Exiting:")[0]
    if mode == "broadcast":  # the subnet broadcast found through SIOCGIFADDR/SIOCGIFBRDADDR on the server's side
        assert f"Limiting broadcasts using {BROADCAST}" in log


@needs_root_netns
def test_server_survives_icmp_errors_from_a_vanished_unicast_client(tmp_path):
    # The unicast client asks for a chunk and goes away: every BLOCK to it draws an ICMP port unreachable, which
    # IP_RECVERR reports on the server's socket. The server carries on and ends by its idle timeout.
    source = FIXTURES / "fsA-raw-v3.ndz"
    with lan(2) as (server_host, client_host):
        sip, cip = server_host.addr, client_host.addr
        code = (
            "from agent.frisbee.serve import serve; "
            f"serve({str(source)!r}, {cip!r}, 5500, {sip!r}, idle_timeout=1)"
        )
        server = server_host.popen(server_host.python(code))
        time.sleep(0.5)
        request = (
            "import socket; from agent.frisbee.packets import Request, encode; "
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            f"s.bind(({cip!r}, 5500)); s.sendto(encode(Request(0, 0, 1024), {cip!r}), ({sip!r}, 5500))"
        )
        client_host.run(client_host.python(request), check=True)
        log = finish(server)
    assert "Exiting: 1024 blocks sent" in log, log
