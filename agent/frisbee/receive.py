"""A frisbee server as a chunk source: the client state machine on a network thread, chunks handed to the consumer.

The network thread owns the socket: it receives (30 ms at most per wait, as frisbee), feeds the Client, fires
its timers and sends what it asks. Completed chunks wait in `_ready` until the consumer takes them; the Client
counts them against its memory budget, so a slow disk writer makes the network side drop new blocks (to be asked
for again later) instead of growing memory.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Iterator

from .. import linux
from ..errors import NetworkError, NodeagentError, SourceError
from ..ndz.header import HEADER_AREA
from .client import ChunkComplete, Client, Finished, Joined, TimedOut
from .fastpath import feed_batch
from .net import Endpoint, open_endpoint

RECV_TIMEOUT = 0.03  # frisbee's PKTRCV_TIMEOUT
RECV_BATCH = 64  # datagrams handled per lock hold
RECV_SOCKBUF = 4 << 20
STOP_JOIN = 2.0  # seconds close() waits for the network thread


def _route_source(addr: str, port: int) -> str | None:
    """The local address the kernel would send from towards addr (no packet is sent), or None."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)  # addr may be a broadcast address
            probe.connect((addr, port))
            return probe.getsockname()[0]
    except OSError:
        return None


class FrisbeeSource:
    """The image served by a frisbee server (frisbeed or `nodeagent serve`) at addr:port, as a ChunkSource.

    addr: multicast group, broadcast address (with broadcast=True) or, for unicast, the server's address.
    ifaddr: the interface to use (frisbee -i); without it, the address the kernel routes `addr` from.
    idle_timeout: seconds without a packet from the server before giving up (frisbee -T; 0 = never).
    memory_mb: 1 MiB chunk buffers, partly received or waiting for the consumer (frisbee -M).
    progress: optional object whose `done` (bytes written so far) goes into frisbeed's PROGRESS reports.
    fast: receive in batches and take BLOCKs in C (agent/frisbee/fastpath.py); None: when the compiled module is
    there. False: the pure-Python reference path, one datagram at a time.
    """

    def __init__(
        self,
        addr: str,
        port: int,
        ifaddr: str | None = None,
        broadcast: bool = False,
        idle_timeout: float = 0,
        memory_mb: int = 32,
        progress=None,
        *,
        rng: random.Random | None = None,
        fast: bool | None = None,
    ) -> None:
        self.name = f"frisbee {addr}:{port}"
        self._where = f"{addr}:{port}"
        self._idle_timeout = idle_timeout
        self._progress = progress
        if memory_mb < 1:
            raise SourceError(f"{self.name}: memory must be at least 1 MB, not {memory_mb}")
        # frisbee tags packets with the host name's address unless given -i; that is often 127.0.1.1 on Debian,
        # which servers then reject. The address the route to the server uses is what they will see.
        if ifaddr is None:
            ifaddr = _route_source(addr, port)
        # frisbee's largest socket buffer (-k 4096): a node busy writing its disk must not lose a burst meanwhile.
        self._endpoint: Endpoint = open_endpoint("client", addr, port, ifaddr, broadcast, sockbuf=RECV_SOCKBUF)
        self._client = Client(
            self._endpoint.local_ip,
            port=self._endpoint.port,
            session_addr=self._endpoint.dest[0],
            rng=rng,
            memory_mb=memory_mb,
            idle_timeout=idle_timeout,
            wall_offset=time.time() - time.monotonic(),
        )
        self._batch: linux.FrisbeeBatch | None = None
        if fast is not False:
            try:
                self._batch = linux.FrisbeeBatch()
            except linux.ExtensionMissingError:
                if fast:
                    raise
        self._cond = threading.Condition()  # guards the Client and everything below
        self._ready: dict[int, bytes] = {}  # completed chunks not yet taken, in arrival order
        self._total_chunks: int | None = None
        self._finished = False
        self._error: BaseException | None = None
        self._stop = False
        self.total_bytes: int | None = None
        self._thread = threading.Thread(target=self._run, name="frisbee-receive", daemon=True)
        self._thread.start()

    # -----------------------------------------------------------------------------------------------------------
    # the consumer's side (ChunkSource)

    def header_areas(self) -> None:
        return None  # chunks come once, in whatever order the network delivers them

    def preflight(self) -> tuple[int, bytes]:
        """Wait for the image's last chunk (asked for first) and return (its index, its header area). The chunk
        stays queued: chunks() still yields it. Call before chunks()."""
        with self._cond:
            while self._error is None and (self._total_chunks is None or self._total_chunks - 1 not in self._ready):
                if self._finished or self._total_chunks == 0:
                    break
                self._cond.wait()
            self._raise_error()
            last = (self._total_chunks or 0) - 1
            if last < 0:
                raise SourceError(f"{self.name}: the image is empty")
            if last not in self._ready:
                raise SourceError(f"{self.name}: chunk {last} was taken before preflight()")
            return last, self._ready[last][:HEADER_AREA]

    def chunks(self) -> Iterator[tuple[int, bytes]]:
        while True:
            with self._cond:
                while not self._ready and self._error is None and not self._finished:
                    self._cond.wait()
                self._raise_error()
                if not self._ready:
                    if not self._total_chunks:
                        raise SourceError(f"{self.name}: the image is empty")
                    return
                index = next(iter(self._ready))
                data = self._ready.pop(index)
                self._client.chunk_taken(index, time.monotonic())  # its buffer is free: the network may fill it
            yield index, data

    def close(self) -> None:
        with self._cond:
            self._stop = True
            if self._error is None and not self._finished:
                self._error = SourceError(f"{self.name}: closed")  # wakes a consumer waiting on another thread
            self._cond.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(STOP_JOIN)
        self._endpoint.close()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    @property
    def stats(self):
        return self._client.stats

    @property
    def drops(self) -> int | None:
        """Datagrams the socket dropped for want of buffer space (SO_RXQ_OVFL; None: not known on this path)."""
        return None if self._batch is None else self._batch.drops

    @property
    def total_chunks(self) -> int | None:
        """Chunks in the image, once the server has answered our JOIN (None before)."""
        return self._total_chunks

    # -----------------------------------------------------------------------------------------------------------
    # the network thread

    def _run(self) -> None:
        client, endpoint = self._client, self._endpoint
        try:
            with self._cond:
                client.start(time.monotonic())
                out = client.outgoing()
            while True:
                for data, dest in out:
                    endpoint.send(data, dest)
                with self._cond:
                    if self._stop or client.done:
                        return
                    wait = min(RECV_TIMEOUT, max(0.0, client.next_deadline() - time.monotonic()))
                if self._batch is not None:
                    endpoint.wait(wait)
                    count, others = endpoint.recv_batch(self._batch)  # one recvmmsg, the GIL released
                else:
                    got = endpoint.recv(wait)
                with self._cond:
                    now = time.monotonic()
                    if self._batch is not None:
                        events = feed_batch(client, self._batch, now) if count else []
                        for data, source in others:
                            events += client.receive(data, source, now)
                    else:
                        events = self._receive_one_by_one(got, now)
                    now = time.monotonic()
                    if now >= client.next_deadline():
                        events += client.timer(now)
                    if self._progress is not None:
                        client.bytes_out = int(self._progress.done)
                    out = client.outgoing()
                    self._handle(events)
        except NodeagentError as err:
            self._fail(err)
        except OSError as err:
            self._fail(NetworkError(f"{self.name}: {err.strerror or err}"))
        except BaseException as err:  # a bug: still wake the consumer, with the cause in the message
            self._fail(SourceError(f"{self.name}: receiver failed: {type(err).__name__}: {err}"))

    def _receive_one_by_one(self, got, now: float) -> list:
        """The reference path: datagram by datagram, what else is queued under one lock (a burst arrives
        together). Called with the lock held."""
        events: list = []
        taken = 0
        while got is not None:
            events += self._client.receive(got[0], got[1], now)
            taken += 1
            got = self._endpoint.recv(0) if taken < RECV_BATCH else None
        return events

    def _handle(self, events) -> None:
        """Called with the lock held."""
        for event in events:
            if isinstance(event, ChunkComplete):
                self._ready[event.index] = event.data
            elif isinstance(event, Joined):
                self.total_bytes, self._total_chunks = event.total_bytes, event.total_chunks
            elif isinstance(event, Finished):
                self._finished = True
            elif isinstance(event, TimedOut):
                self._error = NetworkError(
                    f"no packets from the frisbee server {self._where} for {self._idle_timeout:g} s"
                )
        if events:
            self._cond.notify_all()

    def _fail(self, err: BaseException) -> None:
        with self._cond:
            if self._error is None:
                self._error = err
            self._cond.notify_all()
