"""The frisbee server shell (`nodeagent serve`, like frisbeed): a file, a UDP endpoint and the scheduler on real time.

It answers JOINs at once, reads the blocks the scheduler asks for with pread (a short last block is padded with
zeros; JOIN2 tells clients the exact size) and sends them, and returns after idle_timeout seconds without requests.
"""

from __future__ import annotations

import os
import stat
import sys
import threading
import time
from typing import Callable

from ..errors import NodeagentError, SourceError
from .net import Endpoint, accept_source, open_endpoint
from .packets import BLOCK_SIZE, CHUNK_BYTES, PacketError, decode, encode, encode_block, total_blocks
from .server import Pacing, Server

MAX_FILE_BYTES = (2**31 - 1) * BLOCK_SIZE  # JOIN's block count is an int32
READ_BLOCKS = 32  # blocks per pread, as frisbeed's SERVER_READ_SIZE
RECV_BATCH = 64  # datagrams taken between two polls, so a flood of requests cannot starve sending
BAD_PACKETS_LOGGED = 10
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
) -> dict[str, int]:
    """Serve the file at path to frisbee clients of addr:port until idle (frisbeed -m addr -p port [-i ifaddr]
    [-b] [-W bandwidth] [-T idle_timeout]). bandwidth: bits/s, None = frisbeed's default, 0 = unlimited.
    idle_timeout: seconds without requests (0: never; negative: 2 s after the last client leaves).
    loop/reuse_addr: hear our own multicast and share the port (tests with clients on the same host).
    stop: ends the loop when set. on_ready: called with the endpoint once bound (port 0 picks a free port).
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
            server = Server(size, pacing=pacing, idle_timeout=idle_timeout, now=time.monotonic(), log=log)
            session = _Session(path, fd, size, endpoint, server, log)
            session.run(stop)
            log(f"Exiting: {session.summary()}")
            return dict(session.server.stats, bad_packets=session.bad_packets)
    finally:
        os.close(fd)


def _open_file(path: str) -> tuple[int, int]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise SourceError(f"{path}: {err.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise SourceError(f"{path}: not a regular file or block device")
        size = os.lseek(fd, 0, os.SEEK_END)
        if size > MAX_FILE_BYTES:
            raise SourceError(f"{path}: {size} bytes is more than frisbee can serve ({MAX_FILE_BYTES})")
    except OSError as err:
        os.close(fd)
        raise SourceError(f"{path}: {err.strerror}") from None
    except BaseException:
        os.close(fd)
        raise
    return fd, size


class _Session:
    def __init__(self, path: str, fd: int, size: int, endpoint: Endpoint, server: Server, log):
        self.path, self.fd, self.size = path, fd, size
        self.endpoint, self.server, self.log = endpoint, server, log
        self.bad_packets = 0
        self.started = time.monotonic()

    def run(self, stop: threading.Event | None) -> None:
        endpoint, server = self.endpoint, self.server
        while stop is None or not stop.is_set():
            for _ in range(RECV_BATCH):
                got = endpoint.recv(0)
                if got is None:
                    break
                self._handle(*got)
            now = time.monotonic()
            sends = server.poll(now)
            if sends.done:
                idle = server.idle_timeout
                self.log("Last client left!" if idle < 0 else f"No requests for {idle:g} seconds")
                return
            self._send_blocks(sends.blocks)
            wait = None if sends.wake_at is None else sends.wake_at - time.monotonic()
            if stop is not None:
                wait = STOP_CHECK if wait is None else min(wait, STOP_CHECK)
            if wait is None or wait > 0:
                got = endpoint.recv(wait)
                if got is not None:
                    self._handle(*got)

    def _handle(self, datagram: bytes, source: tuple[str, int]) -> None:
        try:
            msg, hdr_ip = decode(datagram)
        except PacketError as err:
            self._bad(f"bad packet from {source[0]}:{source[1]}: {err}")
            return
        endpoint = self.endpoint
        if not accept_source(msg, hdr_ip, source[0], source[1], session_addr=endpoint.dest[0],
                             port=endpoint.port, client=False):
            self._bad(f"bad message source {source[0]}:{source[1]} (header says {hdr_ip})")
            return
        for reply in self.server.receive(msg, hdr_ip, time.monotonic()):
            endpoint.send(encode(reply, endpoint.local_ip))

    def _bad(self, why: str) -> None:
        self.bad_packets += 1
        if self.bad_packets <= BAD_PACKETS_LOGGED:
            self.log(why + ("; not logging more" if self.bad_packets == BAD_PACKETS_LOGGED else ""))

    def _send_blocks(self, blocks: list[tuple[int, int]]) -> None:
        """Read consecutive blocks with one pread (at most READ_BLOCKS) and send them."""
        i = 0
        while i < len(blocks):
            chunk, first = blocks[i]
            n = 1
            while n < READ_BLOCKS and i + n < len(blocks) and blocks[i + n] == (chunk, first + n):
                n += 1
            data = self._read(chunk * CHUNK_BYTES + first * BLOCK_SIZE, n * BLOCK_SIZE)
            ip = self.endpoint.local_ip
            for k in range(n):
                self.endpoint.send(encode_block(chunk, first + k, data[k * BLOCK_SIZE : (k + 1) * BLOCK_SIZE], ip))
            i += n

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
            f"{self.bad_packets} bad packets"
        )

