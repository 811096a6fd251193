"""Where `save` sends an image over the network: one TCP byte stream (as frisupload sends to frisuploadd, or
`imagezip | nc`), or an HTTP PUT with a chunked body (nginx's dav module, any WebDAV server).

A save that fails resets the connection (TCP RST) instead of closing it, so the receiver sees an error, never a
clean end after a whole number of chunks; an HTTP upload also never sends its final empty chunk.
"""

from __future__ import annotations

import socket

from ..errors import NetworkError
from ..http.client import Exchange, connect, describe_oserror, reset_socket
from ..http.url import Url, parse

CLOSE_WAIT = 60.0  # seconds a receiver may take to take one chunk, or to close after our end (ours renames first)


class TcpSink:
    def __init__(self, url: Url) -> None:
        self.dest = str(url)
        self.written = 0
        self.sock = connect(url)
        self.sock.settimeout(CLOSE_WAIT)

    def write(self, chunk: bytes) -> None:
        try:
            self.sock.sendall(chunk)
        except OSError as err:
            raise NetworkError(f"{self.dest}: send: {describe_oserror(err)} after {self.written} bytes "
                               f"(chunk {self.written >> 20})") from None
        self.written += len(chunk)

    def commit(self) -> None:
        """End the stream and wait for the receiver to close its side: then it has read everything."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.settimeout(CLOSE_WAIT)
            while self.sock.recv(4096):
                pass
        except OSError as err:
            raise NetworkError(f"{self.dest}: after {self.written} bytes: {describe_oserror(err)}") from None
        finally:
            self.sock.close()

    def abort(self) -> None:
        reset_socket(self.sock)


class HttpPutSink:
    def __init__(self, url: Url) -> None:
        self.dest = str(url)
        self.written = 0
        self.exchange = Exchange("PUT", url, [("Content-Type", "application/octet-stream")], body="chunked",
                                 idle_timeout=CLOSE_WAIT)
        self.exchange.sock.settimeout(CLOSE_WAIT)

    def _refused(self, err: NetworkError) -> NetworkError:
        """A server that stops reading mid-upload usually said why first (413, 403...): report that."""
        try:
            response = self.exchange.read_response()
            return NetworkError(f"{self.dest}: HTTP {response.status} {response.reason} after {self.written} bytes")
        except NetworkError:
            return err

    def write(self, chunk: bytes) -> None:
        try:
            self.exchange.send_data(chunk)
        except NetworkError as err:
            raise self._refused(err) from None
        self.written += len(chunk)

    def commit(self) -> None:
        try:
            self.exchange.send_end()
            response = self.exchange.read_response()
            if not 200 <= response.status < 300:
                raise NetworkError(f"{self.dest}: HTTP {response.status} {response.reason}".rstrip())
            for _ in self.exchange.body():
                pass
        except NetworkError as err:
            raise self._refused(err) if self.exchange.response is None else err from None
        finally:
            self.exchange.close()

    def abort(self) -> None:
        self.exchange.reset()


def open_net_sink(dest: str) -> TcpSink | HttpPutSink:
    url = parse(dest)
    return TcpSink(url) if url.scheme == "tcp" else HttpPutSink(url)
