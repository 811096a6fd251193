"""`nodeagent receive`: take one image upload over TCP (frisuploadd's job), keeping it only if it is whole.

Flags mean what frisuploadd's do: only CLIENT may upload (other connections are refused and logged), -i the local
address to listen on, -T the most seconds the upload may take, -I the most seconds without data, -s the most bytes.
There is no header before the image bytes and the end is the sender's close, as frisupload sends in direct mode.
The upload goes to FILE.part, chunk by chunk checked as it arrives (agent/ndz/sequence.py; -c also inflates each
one), and is renamed to FILE only when the stream ended cleanly on a chunk boundary: a cut, reset, short or
malformed upload leaves no FILE. FILE is never replaced without --force. Memory: one 1 MiB buffer.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from dataclasses import dataclass

from ..errors import AddressInUseError, DestinationError, NetworkError, UsageError
from ..http.client import describe_oserror
from ..ndz import codec
from ..ndz.header import CHUNK_SIZE
from ..ndz.sequence import ChunkSequence


@dataclass
class ReceiveResult:
    chunks: int
    image_bytes: int
    data_bytes: int
    seconds: float


def _listen(ifaddr: str | None, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    where = f"{ifaddr or '0.0.0.0'}:{port}"
    try:
        sock.bind((ifaddr or "0.0.0.0", port))
        sock.listen(4)
    except OSError as err:
        sock.close()
        kind = AddressInUseError if err.errno == errno.EADDRINUSE else NetworkError
        raise kind(f"listen on {where}: {describe_oserror(err)}") from None
    return sock


class _Clock:
    """The -T deadline of the whole upload and the -I limit of each wait, as socket timeouts."""

    def __init__(self, total: float, idle: float) -> None:
        self.end = time.monotonic() + total if total else None
        self.idle = idle

    def timeout(self) -> float | None:
        left = None if self.end is None else self.end - time.monotonic()
        if left is not None and left <= 0:
            return 0.0
        waits = [w for w in (left, self.idle or None) if w is not None]
        return min(waits) if waits else None


def _accept(listener: socket.socket, client: str, clock: _Clock, log) -> socket.socket:
    while True:
        listener.settimeout(clock.timeout())
        try:
            conn, (addr, port) = listener.accept()
        except (socket.timeout, TimeoutError):
            raise NetworkError(f"no connection from {client} in time") from None
        if addr == client:
            return conn
        log(f"refused a connection from {addr}:{port}: only {client} may upload")
        conn.close()


def receive(path: str, client: str, port: int, ifaddr: str | None = None, timeout: float = 0, idle: float = 0,
            max_size: int = 0, check: bool = False, force: bool = False, log=lambda message: None) -> ReceiveResult:
    try:
        socket.inet_aton(client)
    except OSError:
        raise UsageError(f"-m {client}: not an IPv4 address") from None
    if not force and os.path.lexists(path):
        raise DestinationError(f"{path}: exists (--force replaces it)")
    clock = _Clock(timeout, idle)
    listener = _listen(ifaddr, port)
    part = f"{path}.part"
    try:
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError as err:
        listener.close()
        raise DestinationError(f"{part}: {err.strerror}") from None
    started = time.monotonic()
    try:
        log(f"listening on {ifaddr or '0.0.0.0'}:{port} for an image from {client}")
        try:
            conn = _accept(listener, client, clock, log)
        finally:
            listener.close()
        with conn:
            log(f"upload from {client} started")
            sequence = _stream(conn, fd, part, client, clock, max_size, check)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        if force:
            os.replace(part, path)
        else:
            try:
                os.link(part, path)  # never replaces a FILE that appeared meanwhile
            except FileExistsError:
                raise DestinationError(f"{path}: exists (--force replaces it)") from None
            os.unlink(part)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(part)
        except OSError:
            pass
        raise
    return ReceiveResult(sequence.count, sequence.count * CHUNK_SIZE, sequence.data_bytes, time.monotonic() - started)


def _stream(conn: socket.socket, fd: int, part: str, client: str, clock: _Clock, max_size: int, check: bool) -> ChunkSequence:
    sequence = ChunkSequence()
    buf = bytearray(CHUNK_SIZE)
    view = memoryview(buf)
    fill = total = 0
    while True:
        conn.settimeout(clock.timeout())
        try:
            n = conn.recv_into(view[fill:])
        except (socket.timeout, TimeoutError):
            late = clock.end is not None and time.monotonic() >= clock.end
            why = "the upload did not finish within -T" if late else f"no data for {clock.idle:g} s"
            raise NetworkError(f"{client}: {why} ({total} bytes, chunk {sequence.count})") from None
        except OSError as err:
            raise NetworkError(f"{client}: {describe_oserror(err)} after {total} bytes (chunk {sequence.count}): "
                               "the upload failed") from None
        if not n:
            if fill:
                sequence.add(view[:fill])  # raises: the stream ended inside this chunk
            sequence.finish()
            return sequence
        fill += n
        total += n
        if max_size and total > max_size:
            raise DestinationError(f"{client}: the upload is larger than -s {max_size} bytes")
        if fill == CHUNK_SIZE:
            header = sequence.add(buf)
            if check:
                payload = view[header.regionsize : header.regionsize + header.size]
                for _ in codec.decompress(header.codec, payload, header.data_bytes, header.index):
                    pass
            _write_all(fd, view, part)
            fill = 0


def _write_all(fd: int, view: memoryview, part: str) -> None:
    while view:
        try:
            view = view[os.write(fd, view) :]
        except OSError as err:
            raise DestinationError(f"{part}: write failed: {err.strerror}") from None
