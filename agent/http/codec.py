"""An HTTP/1.1 client conversation as a sans-I/O engine (agent/sansio.py): one request, one response, then close.

The application builds it with the request (method, URL, headers, body framing), streams a request body with
`send_data`/`send_end` (Content-Length or chunked), and feeds what the socket reads to `receive`, which returns
`Response`, `Data` and `EndOfMessage` events. Response bodies framed by Content-Length, chunked encoding or the
connection's end are all decoded. Keep-alive is not used: every request says `Connection: close`, so whatever
follows the response on the connection is an error, and a connection closed too early is a `ConnectionLost`
(worth retrying), while a malformed response is a plain NetworkError (not worth it).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import NetworkError
from ..sansio import Engine, Outgoing
from .url import Url

MAX_HEAD = 64 << 10  # status line + headers
MAX_LINE = 4096  # a chunk-size line or a trailer line


class ConnectionLost(NetworkError):
    """The connection ended (or went silent) before the response was complete: the request may be retried."""


@dataclass(frozen=True)
class Response:
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]  # (lower-case name, value) in order

    def header(self, name: str) -> str | None:
        """The value of header `name` (repeated headers joined with ', '), or None."""
        values = [v for k, v in self.headers if k == name]
        return ", ".join(values) if values else None


@dataclass(frozen=True)
class Data:
    data: bytes


@dataclass(frozen=True)
class EndOfMessage:
    pass


@dataclass(frozen=True)
class Stalled:
    seconds: float  # nothing arrived for this long


def _content_length(values: list[str], what: str) -> int:
    lengths = {v.strip() for value in values for v in value.split(",")}
    if len(lengths) != 1 or not next(iter(lengths)).isdigit():
        raise NetworkError(f"{what}: bad Content-Length {', '.join(values)!r}")
    return int(lengths.pop())


class ClientConnection(Engine):
    """One HTTP/1.1 request and its response.

    body: None (no body), an int (Content-Length, then send_data the bytes), or "chunked" (send_data pieces,
    then send_end). idle_timeout: seconds without input after which timer() reports Stalled (0: never).
    """

    def __init__(self, method: str, url: Url, headers=(), body=None, idle_timeout: float = 0, now: float = 0.0):
        self.method = method
        self.url = url
        self._what = f"{url}"
        self._chunked_out = body == "chunked"
        lines = [f"{method} {url.target} HTTP/1.1", f"Host: {url.authority}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in headers]
        if self._chunked_out:
            lines.append("Transfer-Encoding: chunked")
        elif body is not None:
            lines.append(f"Content-Length: {body}")
        self._out: list[Outgoing] = [Outgoing(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), None)]
        self._idle = idle_timeout
        self._last = now
        self._stalled = False
        self._buf = b""  # unparsed head, chunk-size or trailer bytes
        self._state = "head"
        self._left = 0  # body or chunk bytes still to come
        self.response: Response | None = None
        self.body_received = 0
        self.body_length: int | None = None  # Content-Length, when the body has one

    # ------------------------------------------------------------------------------------------------ the request

    def send_data(self, data: bytes) -> None:
        if self._chunked_out:
            if data:
                self._out += [Outgoing(b"%x\r\n" % len(data), None), Outgoing(data, None), Outgoing(b"\r\n", None)]
        else:
            self._out.append(Outgoing(data, None))

    def send_end(self) -> None:
        if self._chunked_out:
            self._out.append(Outgoing(b"0\r\n\r\n", None))

    def outgoing(self) -> list[Outgoing]:
        out, self._out = self._out, []
        return out

    # ----------------------------------------------------------------------------------------------- the response

    @property
    def done(self) -> bool:
        return self._state == "done"

    def timer(self, now: float) -> list:
        if self._idle and not self._stalled and self._state != "done" and now >= self._last + self._idle:
            self._stalled = True
            return [Stalled(now - self._last)]
        return []

    def next_deadline(self) -> float:
        if not self._idle or self._stalled or self._state == "done":
            return float("inf")
        return self._last + self._idle

    def receive(self, data: bytes, source=None, now: float = 0.0) -> list:
        self._last = now
        if not data:
            return self._closed()
        events: list = []
        while data:
            state = self._state
            if state in ("body", "chunk"):
                n = min(self._left, len(data))
                piece, data = (data, b"") if n == len(data) else (data[:n], data[n:])
                self._left -= n
                self.body_received += n
                events.append(Data(piece))
                if not self._left:
                    if state == "body":
                        events += self._end()
                    else:
                        self._state = "chunk-crlf"
            elif state == "close-body":
                self.body_received += len(data)
                events.append(Data(data))
                data = b""
            elif state == "done":
                raise NetworkError(f"{self._what}: data after the end of the response (Connection: close)")
            else:
                data = self._line_state(data, events)
        return events

    def _find(self, buf: bytes, sep: bytes, limit: int, what: str) -> int:
        """Where `sep` starts in buf; -1 (keeping buf for the next input) while it has not come."""
        end = buf.find(sep)
        if end < 0:
            if len(buf) > limit:
                raise NetworkError(f"{self._what}: {what} longer than {limit} bytes")
            self._buf = buf
        else:
            self._buf = b""
        return end

    def _line_state(self, data: bytes, events: list) -> bytes:
        """Head, chunk-size, chunk-CRLF and trailer states: collect bytes up to a line end, parse, return the rest."""
        buf = self._buf + data if self._buf else data
        state = self._state
        if state == "head":
            end = self._find(buf, b"\r\n\r\n", MAX_HEAD, "response head")
            if end < 0:
                return b""
            self._head(buf[:end].decode("latin-1"), events)
            return buf[end + 4 :]
        if state == "chunk-crlf":  # exactly CRLF (or a bare LF) must follow a chunk's data
            if buf[:2] == b"\r\n" or buf[:1] == b"\n":
                self._buf = b""
                self._state = "chunk-size"
                return buf[2:] if buf[:1] == b"\r" else buf[1:]
            if buf != b"\r":
                raise NetworkError(f"{self._what}: chunked body: no CRLF after a chunk's data")
            self._buf = buf
            return b""
        end = self._find(buf, b"\n", MAX_LINE, "chunked body line")
        if end < 0:
            return b""
        line, rest = buf[:end].rstrip(b"\r"), buf[end + 1 :]
        if state == "chunk-size":
            size = line.split(b";", 1)[0].strip()
            try:
                self._left = int(size, 16)
                if not size or size[:1] in b"+-" or self._left < 0:
                    raise ValueError
            except ValueError:
                raise NetworkError(f"{self._what}: chunked body: bad chunk size {line[:40]!r}") from None
            self._state = "chunk" if self._left else "trailers"
        elif state == "trailers":
            if not line:
                events += self._end()
        return rest

    def _head(self, head: str, events: list) -> None:
        lines = head.split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
            raise NetworkError(f"{self._what}: not an HTTP/1.x response: {lines[0][:60]!r}")
        status = int(code)
        headers = []
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon or not name or name != name.strip() or line[:1] in " \t":
                raise NetworkError(f"{self._what}: malformed header line {line[:60]!r}")
            headers.append((name.lower(), value.strip()))
        if 100 <= status < 200:
            if status == 101:
                raise NetworkError(f"{self._what}: the server switched protocols (101)")
            return  # an interim response (100 Continue): the real one follows
        response = Response(status, reason, tuple(headers))
        self.response = response
        events.append(response)
        coding = response.header("transfer-encoding")
        lengths = [v for k, v in headers if k == "content-length"]
        if self.method == "HEAD" or status in (204, 304):
            events += self._end()
        elif coding is not None:
            if coding.split(",")[-1].strip().lower() != "chunked":
                raise NetworkError(f"{self._what}: unsupported Transfer-Encoding {coding!r}")
            self._state = "chunk-size"
        elif lengths:
            self.body_length = self._left = _content_length(lengths, self._what)
            self._state = "body" if self._left else "done"
            if not self._left:
                events.append(EndOfMessage())
        else:
            self._state = "close-body"

    def _end(self) -> list:
        self._state = "done"
        return [EndOfMessage()]

    def _closed(self) -> list:
        state = self._state
        if state == "done":
            return []
        if state == "close-body":
            return self._end()
        self._state = "done"
        if state == "head":
            raise ConnectionLost(f"{self._what}: connection closed before a complete response head")
        if state == "body":
            raise ConnectionLost(
                f"{self._what}: connection closed after {self.body_received} of {self.body_length} body bytes"
            )
        raise ConnectionLost(f"{self._what}: connection closed inside the chunked body ({self.body_received} bytes)")
