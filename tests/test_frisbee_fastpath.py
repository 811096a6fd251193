"""The client's receive fast path (recvmmsg batches, BLOCKs taken in C) against the pure-Python reference path.

The same datagram sequences, hostile ones included, go over loopback to two sockets: one is read datagram by
datagram into a Client's receive() (the reference), the other in batches through linux.FrisbeeBatch and
fastpath.feed_batch into a second Client with the same seed. Both must end with the same events, statistics,
requests and chunk data.
"""

from __future__ import annotations

import random
import socket

import pytest

from agent import linux
from agent.frisbee import packets as P
from agent.frisbee.client import ChunkComplete, Client
from agent.frisbee.fastpath import feed_batch
from agent.frisbee.net import open_endpoint
from agent.frisbee.server import Server
from conftest import needs_root
from net_helpers import lan

SERVER, FOREIGN, ME = "127.0.0.1", "127.0.0.3", "127.0.0.2"
ROUND = 40  # datagrams sent before both sides read them (well inside both receive buffers)


def _udp(ip: str = "127.0.0.1", port: int = 0, rcvbuf: int = 4 << 20) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((ip, port))
    return sock


class Pair:
    """A reference client and a fast-path client fed the same datagrams, with the same clock."""

    def __init__(self, total: int, port_checked: bool = True, memory_mb: int = 4, seed: int = 5):
        self.ref_sock, self.fast_sock = _udp(), _udp()
        self.server = _udp(SERVER)
        self.server_port = self.server.getsockname()[1]
        port = self.server_port if port_checked else None
        self.ref, self.fast = (
            Client(ME, port=port, session_addr="239.1.2.3", rng=random.Random(seed), memory_mb=memory_mb)
            for _ in range(2)
        )
        for client in (self.ref, self.fast):
            client.start(0.0)
            client.outgoing()
        self.batch = linux.FrisbeeBatch()
        self.ref_events: list = []
        self.fast_events: list = []
        self.in_python = 0  # datagrams the C scan left to the Client
        self.total = total
        self.join = P.encode(P.Join2(self.ref.clientid, 0, 1024, 1024, total, reply=True), SERVER)

    def play(self, datagrams: list[tuple[socket.socket, bytes]], start: float = 1.0) -> None:
        for k in range(0, len(datagrams), ROUND):
            now = start + k / 1000
            part = datagrams[k : k + ROUND]
            for sender, data in part:
                sender.sendto(data, self.ref_sock.getsockname())
                sender.sendto(data, self.fast_sock.getsockname())
            for _ in part:
                data, source = self.ref_sock.recvfrom(2048)
                self.ref_events += self.ref.receive(data, source, now)
            got = 0
            while got < len(part):
                got += self.batch.recv(self.fast_sock)
                self.fast_events += self._feed(now)
            self.ref_events += self.ref.timer(now)
            self.fast_events += self.fast.timer(now)

    def _feed(self, now: float) -> list:
        # Count the datagrams the scan hands over: feed_batch reads them with datagram().
        original = self.batch.datagram

        def counted(i):
            self.in_python += 1
            return original(i)

        self.batch.datagram = counted
        try:
            return feed_batch(self.fast, self.batch, now)
        finally:
            del self.batch.datagram

    def assert_same(self) -> None:
        assert self.fast_events == self.ref_events
        assert self.fast.stats == self.ref.stats
        assert self.fast.outgoing() == self.ref.outgoing()
        assert self.fast.done == self.ref.done

    def close(self) -> None:
        for sock in (self.ref_sock, self.fast_sock, self.server):
            sock.close()


@pytest.fixture
def pair_of():
    made = []

    def make(*args, **kw) -> Pair:
        made.append(Pair(*args, **kw))
        return made[-1]

    yield make
    for pair in made:
        pair.close()


def _block(chunk: int, block: int, fill: int | None = None, srcip: str = SERVER) -> bytes:
    data = bytes([fill if fill is not None else (chunk * 7 + block) % 251]) * 1024
    return P.encode(P.Block(chunk, block, data), srcip)


def test_clean_transfer_same_result_mostly_in_c(pair_of):
    total = 3 * P.CHUNK_BYTES + 5000  # a short last chunk: 5 blocks, the last one partly past the end
    pair = pair_of(total)
    s = pair.server
    seq = [(s, pair.join)]
    seq += [(s, _block(3, b)) for b in (0, 4, 1, 2, 3)]  # the partial block is copied in C, not the last one
    for chunk in (0, 1, 2):
        seq += [(s, _block(chunk, b)) for b in range(1024)]
    pair.play(seq)
    pair.assert_same()
    chunks = {e.index: e.data for e in pair.fast_events if isinstance(e, ChunkComplete)}
    assert sorted(chunks) == [0, 1, 2, 3] and pair.fast.done
    assert chunks[1][5 * 1024 : 6 * 1024] == bytes([(7 + 5) % 251]) * 1024
    assert chunks[3][4 * 1024 : 4 * 1024 + 904] == bytes([(21 + 4) % 251]) * 904
    assert not chunks[3][4 * 1024 + 904 :].strip(b"\0")  # past the end of the file: zeros, as the reference
    # The join, and per chunk its first block and its completing block, go to Python; the rest is taken in C.
    assert pair.in_python <= 1 + 2 * 4
    assert pair.fast.stats.useful_blocks == 3 * 1024 + 5


def test_lossy_duplicated_interleaved_same_result(pair_of):
    total = 6 * P.CHUNK_BYTES
    for seed in range(3):
        rng = random.Random(seed)
        pair = pair_of(total, seed=seed)
        s = pair.server
        seq = [(s, pair.join)]
        for _ in range(2):  # a lossy pass with duplicates and chunk switches, then everything again
            order = list(range(6))
            rng.shuffle(order)
            for chunk in order:
                for b in range(1024):
                    if rng.random() < 0.15:
                        continue
                    seq.append((s, _block(chunk, b, fill=chunk)))
                    if rng.random() < 0.03:
                        seq.append(seq[-1])
                    if rng.random() < 0.01:  # a block of another chunk in the middle of a run
                        seq.append((s, _block(rng.randrange(6), rng.randrange(1024), fill=None)))
        pair.play(seq)
        pair.assert_same()
        assert pair.fast.stats.dup_blocks > 0 and pair.fast.stats.no_room > 0


def test_hostile_datagrams_same_result(pair_of):
    """Wrong source host or port, a forged srcip, chunk and block numbers outside the image, short and long
    datagrams, bad datalen, other messages: in the middle of runs the C path is armed for."""
    total = 2 * P.CHUNK_BYTES + 3 * 1024
    pair = pair_of(total)
    s = pair.server
    foreign = _udp(FOREIGN, pair.server_port)  # the session port: only the host differs
    other_port = _udp(SERVER)
    try:
        good = [_block(0, b) for b in range(1024)]
        hostile = [
            (foreign, _block(0, 7, fill=0xFF)),  # another host claiming to be the server
            (foreign, _block(0, 7, fill=0xFF, srcip=FOREIGN)),  # another server's block
            (other_port, _block(0, 8, fill=0xFF)),  # the server's address, another port
            (s, _block(0, 9, fill=0xFF, srcip=FOREIGN)),  # the header names another host
            (s, _block(5, 1)),  # chunk outside the image
            (s, _block(2, 3)),  # block past the short last chunk
            (s, _block(0, 10)[:-1]),  # one byte short
            (s, _block(0, 11)[:30]),
            (s, b""),
            (s, b"\x01\0\0\0"),
            (s, _block(0, 12) + bytes(3000)),  # longer than a receive buffer: cut
            (s, _block(0, 13)[:8] + (2000).to_bytes(4, "little") + _block(0, 13)[12:]),  # datalen too large
            (s, _block(0, 14)[:8] + (100).to_bytes(4, "little") + _block(0, 14)[12:]),  # datalen too small
            (s, _block(0, 18)[:8] + (1064).to_bytes(4, "little") + _block(0, 18)[12:]),  # longer than sent
            (s, _block(0, 15)[:4] + (2).to_bytes(4, "little") + _block(0, 15)[8:]),  # another subtype
            (s, _block(0, 16)[:16] + (-1).to_bytes(4, "little", signed=True) + _block(0, 16)[20:]),
            (s, _block(0, 17)[:20] + (1024).to_bytes(4, "little") + _block(0, 17)[24:]),  # block 1024
            (foreign, P.encode(P.Request(1, 0, 1024), FOREIGN)),  # another client's request: snooped
            (foreign, P.encode(P.PRequest(0, 1, bytes([0xFF]) * 128), FOREIGN)),
        ]
        seq = [(s, pair.join)] + [(s, d) for d in good[:6]]
        for i, bad in enumerate(hostile):
            seq.append(bad)
            seq.append((s, good[6 + i]))  # the fast path must be armed again after each
        seq += [(s, d) for d in good[6 + len(hostile) :]]
        seq += [(s, _block(1, b)) for b in range(1024)]
        seq += [(s, _block(0, b)) for b in range(0, 1024, 50)]  # blocks of a chunk already done
        seq += [(s, _block(2, b)) for b in range(3)]
        pair.play(seq)
        pair.assert_same()
        stats = pair.fast.stats
        assert stats.foreign_blocks == 1 and stats.bad_packets >= 10 and stats.dup_chunks > 0
        chunk0 = next(e.data for e in pair.fast_events if isinstance(e, ChunkComplete) and e.index == 0)
        assert b"\xff" * 1024 not in chunk0  # (the good blocks hold values below 251)
    finally:
        foreign.close()
        other_port.close()


def test_unchecked_port_same_result(pair_of):
    pair = pair_of(P.CHUNK_BYTES, port_checked=False)
    other_port = _udp(SERVER)
    try:
        s = pair.server
        seq = [(s, pair.join)] + [(s if b % 2 else other_port, _block(0, b)) for b in range(1024)]
        pair.play(seq)
        pair.assert_same()
        assert pair.fast.done and pair.in_python <= 3
    finally:
        other_port.close()


def test_drop_counter_counts_what_the_socket_dropped():
    """SO_RXQ_OVFL: the count every datagram carries is the number the full receive queue dropped."""
    receiver = _udp(rcvbuf=4096)  # the kernel doubles it: room for a few 1 KiB datagrams only
    receiver.setsockopt(socket.SOL_SOCKET, linux.SO_RXQ_OVFL, 1)
    sender = _udp()
    batch = linux.FrisbeeBatch()
    try:
        for b in range(200):
            sender.sendto(_block(0, b), receiver.getsockname())
        received = 0
        while n := batch.recv(receiver):
            received += n
        assert 0 < received < 200
        # A datagram carries the count as of its queueing: the next one after the overflow carries them all.
        sender.sendto(_block(0, 0), receiver.getsockname())
        assert batch.recv(receiver) == 1
        assert batch.drops == 200 - received
    finally:
        receiver.close()
        sender.close()


# ---------------------------------------------------------------------------------------------------------------
# the send side: Endpoint.send_blocks puts on the wire exactly the datagrams of Server.send_blocks


@needs_root
@pytest.mark.parametrize("gso", [True, False])
@pytest.mark.parametrize("group", ["239.192.9.9", None])  # multicast, unicast
def test_send_blocks_same_datagrams_as_the_engine(gso, group):
    data = random.Random(3).randbytes(150 * 1024)  # more than one UDP_SEGMENT send and one sendmmsg batch
    with lan(2) as (server_host, client_host):
        addr = group or client_host.addr
        receiver = client_host.call(lambda: open_endpoint("client", group or server_host.addr, 5400,
                                                          client_host.addr, sockbuf=8 << 20))
        sender = server_host.call(lambda: open_endpoint("server", addr, 5400, server_host.addr))
        try:
            sender._gso = gso
            sender.send_blocks(P.block_prefix(sender.local_ip), 3, 7, data[: 143 * 1024])
            sender.send_blocks(P.block_prefix(sender.local_ip), 4, 0, data[143 * 1024 :])
            got = []
            while (datagram := receiver.recv(1.0)) is not None:
                got.append(datagram)
            assert sender._gso == gso  # the veth takes UDP segmentation: no fallback
        finally:
            receiver.close()
            sender.close()
    engine = Server(10 * P.CHUNK_BYTES, server_host.addr, port=5400, session_addr=addr)
    want = engine.send_blocks(3, 7, data[: 143 * 1024]) + engine.send_blocks(4, 0, data[143 * 1024 :])
    assert [d for d, _ in got] == want
    assert {source for _, source in got} == {(server_host.addr, 5400)}
