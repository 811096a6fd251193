"""The frisbee server shell (`nodeagent serve`, like frisbeed): a file, a UDP endpoint and the scheduler on real time.

It answers JOINs at once, reads the blocks the scheduler asks for with pread (a short last block is padded with
zeros; JOIN2 tells clients the exact size) and sends them, and returns after idle_timeout seconds without requests.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from typing import Callable

from .. import linux
from ..errors import NodeagentError, SourceError
from .net import Endpoint, open_endpoint
from .packets import BLOCK_SIZE, CHUNK_BYTES, block_prefix, total_blocks
from .server import (
    BadPacket,
    BlocksDue,
    ClientJoined,
    ClientLeft,
    ClientReport,
    ForgedSource,
    Idle,
    Pacing,
    RequestOutsideFile,
    Server,
    SpuriousLeave,
)

MAX_FILE_BYTES = (2**31 - 1) * BLOCK_SIZE  # JOIN's block count is an int32
RECV_BATCH = 64  # datagrams taken between two timer calls, so a flood of requests cannot starve sending
BAD_PACKETS_LOGGED = 10  # and as many requests outside the file: a client (or a forger) cannot flood the log
STOP_CHECK = 0.1  # seconds between looks at the stop event while idle


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def serve(
    path: str,
    addr: str,
    port: int,
    ifaddr: str | None = None,
    broadcast: bool = False,
    bandwidth: int | None = None,
    idle_timeout: float = 1800,
    log: Callable[[str], None] = _stderr,
    *,
    loop: bool = False,
    reuse_addr: bool = False,
    stop: threading.Event | None = None,
    on_ready: Callable[[Endpoint], None] | None = None,
    batched: bool = True,
) -> dict[str, int]:
    """Serve the file at path to frisbee clients of addr:port until idle (frisbeed -m addr -p port [-i ifaddr]
    [-b] [-W bandwidth] [-T idle_timeout]). bandwidth: bits/s, None = frisbeed's default, 0 = unlimited.
    idle_timeout: seconds without requests (0: never; negative: 2 s after the last client leaves).
    loop/reuse_addr: hear our own multicast and share the port (tests with clients on the same host).
    stop: ends the loop when set. on_ready: called with the endpoint once bound (port 0 picks a free port).
    batched: send BLOCKs in batches from C when the compiled module is there (False: the engine's datagrams one
    by one, the reference).
    Returns the scheduler's counters. Raises NodeagentError."""
    if bandwidth is not None and bandwidth < 0:
        raise NodeagentError(f"bandwidth must be 0 (unlimited) or more bits/s, not {bandwidth}")
    pacing = Pacing.from_bandwidth(bandwidth)
    fd, size = _open_file(path)
    try:
        with open_endpoint(
            "server", addr, port, ifaddr, broadcast, loop, reuse_addr=reuse_addr, log=log
        ) as endpoint:
            log(f"Opened {path}: {total_blocks(size)} blocks ({size} bytes)")
            log(pacing.describe())
            if on_ready is not None:
                on_ready(endpoint)
            server = Server(
                size, endpoint.local_ip, port=endpoint.port, session_addr=endpoint.dest[0], pacing=pacing,
                idle_timeout=idle_timeout, now=time.monotonic(),
            )
            session = _Session(path, fd, size, endpoint, server, log, batched)
            session.run(stop)
            log(f"Exiting: {session.summary()}")
            return dict(server.stats)
    finally:
        os.close(fd)


def _open_file(path: str) -> tuple[int, int]:
    from ..io.blockfile import open_block_file

    file = open_block_file(path, os.O_RDONLY, SourceError)
    if file.size > MAX_FILE_BYTES:
        file.close()
        raise SourceError(f"{path}: {file.size} bytes is more than frisbee can serve ({MAX_FILE_BYTES})")
    return file.fd, file.size


def log_line(event) -> str | None:
    """The log line of a server event (None: not one to log)."""
    kind = type(event)
    if kind is ClientJoined:
        return f"{event.ip} (id {event.clientid}) joins (v{event.version}); {event.clients} active clients"
    if kind is ClientLeft:
        return (f"{event.ip} (id {event.clientid}): leaves, ran for {event.elapsed} seconds; "
                f"{event.clients} active clients")
    if kind is SpuriousLeave:
        return f"{event.ip} (id {event.clientid}): spurious leave ignored"
    if kind is ClientReport:
        return (f"{event.ip} (id {event.clientid}): reports recv={event.chunks_in} decomp={event.chunks_out} "
                f"written={event.bytes_out}")
    if kind is RequestOutsideFile:
        return f"{event.ip}: request for chunk {event.chunk} outside the file ({event.chunks} chunks) ignored"
    if kind is BadPacket:
        return f"bad packet from {event.source[0]}:{event.source[1]}: {event.reason}"
    if kind is ForgedSource:
        return f"bad message source {event.source[0]}:{event.source[1]} (header says {event.header_ip})"
    if kind is Idle:
        return "Last client left!" if event.idle_timeout < 0 else f"No requests for {event.idle_timeout:g} seconds"
    return None


class _Session:
    """Drives the Server engine on real time: the socket, the file and the log."""

    def __init__(self, path: str, fd: int, size: int, endpoint: Endpoint, server: Server, log, batched: bool):
        self.path, self.fd, self.size = path, fd, size
        self.endpoint, self.server, self.log = endpoint, server, log
        self.logged = {BadPacket: 0, RequestOutsideFile: 0}  # capped kinds (ForgedSource counts as BadPacket)
        self.started = time.monotonic()
        self.over = False
        self.batched = linux.available() and batched

    def run(self, stop: threading.Event | None) -> None:
        endpoint, server = self.endpoint, self.server
        while stop is None or not stop.is_set():
            for _ in range(RECV_BATCH):
                got = endpoint.recv(0)
                if got is None:
                    break
                self._handle(server.receive(got[0], got[1], time.monotonic()))
            for data, dest in server.outgoing():  # JOIN replies: ahead of any blocks
                endpoint.send(data, dest)
            now = time.monotonic()
            if now >= server.next_deadline():
                self._handle(server.timer(now))  # sends the blocks due
            if self.over:
                return
            deadline = server.next_deadline()
            wait = None if deadline == math.inf else deadline - time.monotonic()
            if stop is not None:
                wait = STOP_CHECK if wait is None else min(wait, STOP_CHECK)
            if wait is None or wait > 0:
                got = endpoint.recv(wait)
                if got is not None:
                    self._handle(server.receive(got[0], got[1], time.monotonic()))

    def _handle(self, events: list) -> None:
        for event in events:
            kind = type(event)
            if kind is BlocksDue:
                self._send_blocks(event)
                continue
            if kind is Idle:
                self.over = True
            elif kind is ForgedSource or kind is BadPacket or kind is RequestOutsideFile:
                capped = RequestOutsideFile if kind is RequestOutsideFile else BadPacket
                self.logged[capped] += 1
                count = self.logged[capped]
                if count > BAD_PACKETS_LOGGED:
                    continue
                if count == BAD_PACKETS_LOGGED:
                    self.log(log_line(event) + "; not logging more")
                    continue
            line = log_line(event)
            if line is not None:
                self.log(line)

    def _send_blocks(self, due: BlocksDue) -> None:
        """Read the run with one pread and send its BLOCKs: in batches from C (the engine's encoding, checked
        against send_blocks() by the tests), or the engine's datagrams one by one without the compiled module."""
        chunk, block = due.chunk, due.block
        data = self._read(chunk * CHUNK_BYTES + block * BLOCK_SIZE, due.count * BLOCK_SIZE)
        if self.batched:
            self.endpoint.send_blocks(block_prefix(self.server.myip), chunk, block, data)
            return
        for datagram in self.server.send_blocks(chunk, block, data):
            self.endpoint.send(datagram)

    def _read(self, offset: int, length: int) -> bytes:
        want = min(length, self.size - offset)
        try:
            data = os.pread(self.fd, want, offset)
            while len(data) < want:  # pread may return less than asked (devices, signals)
                more = os.pread(self.fd, want - len(data), offset + len(data))
                if not more:
                    raise SourceError(f"{self.path}: file shrank while being served (EOF at {offset + len(data)})")
                data += more
        except OSError as err:
            raise SourceError(f"{self.path}: read at offset {offset}: {err.strerror}") from None
        return data + bytes(length - want)  # the short last block goes out zero-padded

    def summary(self) -> str:
        s = self.server.stats
        return (
            f"{s['blocks']} blocks sent in {time.monotonic() - self.started:.1f} s; {s['joins']} joins, "
            f"{s['leaves']} leaves, {s['requests']} requests ({s['merged']} merged, {s['dropped']} dropped), "
            f"{s['bad_packets']} bad packets"
        )
