"""The socket shell around codec.ClientConnection: connect, send, read events; follow redirects for GET.

Socket failures become ConnectionLost naming the URL and the errno, so callers retry them like a cut connection.
"""

from __future__ import annotations

import errno as errnos
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Iterator

from ..errors import NetworkError, UsageError
from .codec import ClientConnection, ConnectionLost, Data, EndOfMessage, Response, Stalled
from .url import Url, resolve

RECV_SIZE = 256 << 10
CONNECT_TIMEOUT = 10.0
REDIRECTS = {301, 302, 303, 307, 308}
MAX_REDIRECTS = 5


def describe_oserror(err: OSError) -> str:
    """'connection refused (ECONNREFUSED)', 'timed out': the errno by name, for one-line messages."""
    if isinstance(err, (socket.timeout, TimeoutError)) and not err.errno:
        return "timed out"
    if isinstance(err, socket.gaierror):
        return f"cannot resolve the host name ({err.strerror})"
    name = errnos.errorcode.get(err.errno or 0)
    text = (err.strerror or os.strerror(err.errno or 0)).lower()
    return f"{text} ({name})" if name else text


def connect(url: Url, timeout: float = CONNECT_TIMEOUT) -> socket.socket:
    try:
        sock = socket.create_connection((url.host, url.port), timeout=timeout)
    except OSError as err:
        raise ConnectionLost(f"{url}: connect: {describe_oserror(err)}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class Exchange:
    """One request and its response on a connection of its own."""

    def __init__(self, method: str, url: Url, headers=(), body=None, idle_timeout: float = 30.0) -> None:
        self.url = url
        self.sock = connect(url)
        self.conn = ClientConnection(method, url, headers, body, idle_timeout, time.monotonic())
        self._events: deque = deque()
        self.response: Response | None = None
        self._flush()

    def _flush(self) -> None:
        try:
            for data, _ in self.conn.outgoing():
                self.sock.sendall(data)
        except OSError as err:
            raise ConnectionLost(f"{self.url}: send: {describe_oserror(err)}") from None

    def send_data(self, data: bytes) -> None:
        self.conn.send_data(data)
        self._flush()

    def send_end(self) -> None:
        self.conn.send_end()
        self._flush()

    def _next_event(self):
        while not self._events:
            now = time.monotonic()
            self.sock.settimeout(max(0.001, min(self.conn.next_deadline() - now, 3600)))
            try:
                data = self.sock.recv(RECV_SIZE)
            except (socket.timeout, TimeoutError):
                events = self.conn.timer(time.monotonic())
                for event in events:
                    if isinstance(event, Stalled):
                        raise ConnectionLost(f"{self.url}: no data for {event.seconds:.0f} s") from None
                continue
            except OSError as err:
                raise ConnectionLost(f"{self.url}: receive: {describe_oserror(err)}") from None
            self._events.extend(self.conn.receive(data, None, time.monotonic()))
        return self._events.popleft()

    def read_response(self) -> Response:
        if self.response is None:
            event = self._next_event()
            assert isinstance(event, Response)
            self.response = event
        return self.response

    def body(self) -> Iterator[bytes]:
        """The response body in pieces as they arrive; ends after checking nothing follows it."""
        self.read_response()
        while True:
            event = self._next_event()
            if isinstance(event, Data):
                yield event.data
            elif isinstance(event, EndOfMessage):
                break
        # We asked for Connection: close: the server closes now. Bytes instead mean the body was longer than
        # its framing said (a lying Content-Length), which the codec refuses.
        self.sock.settimeout(1.0)
        try:
            self.conn.receive(self.sock.recv(RECV_SIZE), None, time.monotonic())
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()

    def reset(self) -> None:
        """Close with a TCP reset, so the peer sees an error rather than a clean end (a failed upload)."""
        reset_socket(self.sock)


def reset_socket(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # linger 0 s: RST
    except OSError:
        pass
    sock.close()


def get(url: Url, headers=(), idle_timeout: float = 30.0) -> Exchange:
    """GET url, following up to MAX_REDIRECTS redirects; returns the exchange whose response is not a redirect
    (its `url` the final one), with the response head read."""
    for _ in range(MAX_REDIRECTS + 1):
        exchange = Exchange("GET", url, headers, idle_timeout=idle_timeout)
        try:
            response = exchange.read_response()
        except BaseException:
            exchange.close()
            raise
        location = response.header("location")
        if response.status not in REDIRECTS or location is None:
            return exchange
        exchange.close()
        try:
            url = resolve(url, location)
            if url.scheme != "http":
                raise UsageError("not an http:// URL")
        except UsageError as err:  # a bad, https or tcp Location
            raise NetworkError(f"{exchange.url}: HTTP {response.status} redirect to {location!r}: {err}") from None
    raise NetworkError(f"{url}: more than {MAX_REDIRECTS} redirects")
