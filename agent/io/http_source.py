"""An image on an HTTP server as a chunk source: last chunk first, then the rest in order, resumed exactly.

Where the server supports ranges, the first request asks for the image's last 1 MiB: its Content-Range tells the
image's size, and the last chunk's header how far the image reaches, so the restore sizes the target before any
write (as the file and frisbee sources do), and the chunk count (Content-Range) must match the last chunk's own
index. Then chunks 0..N-2 stream in order. Only complete chunks are handed on, so a lost connection (or a 5xx)
resumes with `Range:` at the first chunk not yet complete, after a jittered backoff, until -T seconds pass
without a chunk: nothing is handed on twice, nothing skipped, and at most one chunk is fetched twice per cut.
A server without ranges is read from the start (restarted from byte 0 after a cut, skipping what was handed on).
4xx fails at once. --sha256 (or a SHA256SUMS-style URL.sha256 next to the image) is checked as bytes arrive,
before the last chunk is handed on.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Iterator

from ..errors import ChecksumError, ImageFormatError, NetworkError, SourceError, UsageError
from ..http.client import Exchange, get
from ..http.codec import ConnectionLost
from ..http.url import parse
from ..ndz.header import CHUNK_SIZE, HEADER_AREA, decode

STALL = 30.0  # seconds without a byte before a connection counts as lost (less with a smaller -T)
BACKOFF_FIRST = 0.25
BACKOFF_MAX = 8.0
SIDECAR_MAX = 64 << 10
LAST_FIRST = "at the last chunk (fetched first)"


def parse_digest(text: str, what: str) -> str:
    digest = text.strip().lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise UsageError(f"{what}: not a SHA-256 digest (64 hex digits): {text.strip()[:80]!r}")
    return digest


def digest_from_sums(text: str, name: str, what: str) -> str:
    """The digest for `name` in SHA256SUMS-style text ('HEX  NAME' or 'HEX *NAME' lines), or its only digest."""
    entries = []
    for line in text.splitlines():
        fields = line.split(None, 1)
        if fields and not line.startswith("#"):
            entries.append((fields[0], fields[1].lstrip("*").strip().rsplit("/", 1)[-1] if len(fields) > 1 else ""))
    matching = [digest for digest, file in entries if file == name] or (
        [entries[0][0]] if len(entries) == 1 else []
    )
    if not matching:
        raise ChecksumError(f"{what}: no SHA-256 for {name}")
    try:
        return parse_digest(matching[0], what)
    except UsageError as err:
        raise ChecksumError(str(err)) from None


def _content_range(value: str | None, what: str) -> tuple[int, int, int]:
    """'bytes A-B/T' -> (A, B + 1, T)."""
    try:
        unit, _, spec = (value or "").partition(" ")
        span, _, total = spec.partition("/")
        first, _, last = span.partition("-")
        start, end, size = int(first), int(last) + 1, int(total)
        if unit != "bytes" or not 0 <= start < end <= size:
            raise ValueError
        return start, end, size
    except ValueError:
        raise NetworkError(f"{what}: bad Content-Range {value!r}") from None


class HttpSource:
    """The .ndz image at an http:// URL, as a ChunkSource.

    idle_timeout: give up after this many seconds without a complete chunk (-T; 0: retry forever).
    sha256: the expected digest of the whole image file (hex), or None to use URL.sha256 when the server has one.
    warn: called with one-line messages (cuts, retries, restarts).
    """

    def __init__(self, url: str, idle_timeout: float = 0, sha256: str | None = None, warn=None, *,
                 clock=time.monotonic, sleep=time.sleep, rng: random.Random | None = None) -> None:
        self.url = parse(url)
        if self.url.scheme != "http":
            raise UsageError(f"{url}: expected http://HOST[:PORT]/PATH")
        self.name = str(self.url)
        self._warn = warn or (lambda message: None)
        self._timeout = idle_timeout
        self._stall = min(idle_timeout, STALL) if idle_timeout else STALL
        self._clock, self._sleep, self._rng = clock, sleep, rng or random.Random()
        self._progress_at = clock()
        self._backoff = BACKOFF_FIRST
        self.total_bytes: int | None = None
        self.total_chunks: int | None = None
        self._validator: str | None = None  # ETag or Last-Modified of the first response
        self._last: bytes | None = None  # the last chunk, fetched first (servers with ranges)
        self._stream: tuple[Exchange, int] | None = None  # an open response and the byte its body starts at
        self.resumes = self.restarts = 0
        self._ranges = True  # until the server shows otherwise
        self._digest_from = "--sha256"
        self._digest = parse_digest(sha256, "--sha256") if sha256 is not None else None
        self._retrying(self._first_request, LAST_FIRST)
        if sha256 is None:
            try:
                self._digest = self._sidecar_digest()
            except BaseException:
                self.close()
                raise
        self._hash = hashlib.sha256() if self._digest else None

    # ------------------------------------------------------------------------------------------------ requests

    def _retrying(self, attempt, where: str):
        """attempt() until it succeeds; cuts and 5xx are retried after a jittered backoff until -T without progress.
        Failures name the chunk (`where`)."""
        while True:
            try:
                return attempt()
            except ConnectionLost as err:
                self._pause(err, where, "retrying")
            except (NetworkError, SourceError) as err:
                raise type(err)(f"{err} {where}") from None

    def _pause(self, err: ConnectionLost, where: str, action: str) -> None:
        """Wait before the next attempt (backoff doubling to BACKOFF_MAX, jittered), or give up past -T."""
        waited = self._clock() - self._progress_at
        if self._timeout and waited >= self._timeout:
            raise NetworkError(f"{err} {where}; giving up after {waited:.0f} s without progress") from None
        delay = min(self._backoff, BACKOFF_MAX) * self._rng.uniform(0.5, 1.5)
        if self._timeout:
            delay = max(0.0, min(delay, self._progress_at + self._timeout - self._clock()))
        self._backoff *= 2
        self._warn(f"{err} {where}; {action} in {delay:.1f} s")
        self._sleep(delay)

    def _request(self, range_spec: str | None, url=None) -> Exchange:
        exchange = get(url or self.url, [("Range", range_spec)] if range_spec else [], self._stall)
        response = exchange.response
        status = response.status
        if status in (200, 206):
            return exchange
        exchange.close()
        what = f"{exchange.url}: HTTP {status} {response.reason}".rstrip()
        if status >= 500:
            raise ConnectionLost(what)
        if status == 416 and range_spec and range_spec.startswith("bytes=-"):
            raise SourceError(f"{what}: the image is empty")
        raise NetworkError(what)

    def _sidecar_digest(self) -> str | None:
        url = self.url._replace(target=self.url.target.split("?", 1)[0] + ".sha256")

        def fetch() -> str | None:
            try:
                exchange = self._request(None, url)
            except ConnectionLost:
                raise
            except NetworkError as err:
                if "HTTP 4" not in str(err):
                    raise
                return None  # no sidecar: nothing to check
            try:
                body = b""
                for piece in exchange.body():
                    body += piece
                    if len(body) > SIDECAR_MAX:
                        raise ChecksumError(f"{url}: larger than {SIDECAR_MAX} bytes, not a SHA256SUMS file")
            finally:
                exchange.close()
            return body.decode("latin-1")

        text = self._retrying(fetch, "fetching the digest")
        if text is None:
            return None
        self._digest_from = str(url)
        return digest_from_sums(text, self.url.target.split("?", 1)[0].rsplit("/", 1)[-1], str(url))

    def _check_validator(self, exchange: Exchange) -> None:
        response = exchange.response
        validator = response.header("etag") or response.header("last-modified")
        if self._validator is None:
            self._validator = validator
        elif validator is not None and validator != self._validator:
            raise SourceError(f"{exchange.url}: the image changed on the server ({validator}, was {self._validator})")

    def _first_request(self) -> None:
        exchange = self._request(f"bytes=-{CHUNK_SIZE}")
        self._check_validator(exchange)
        response = exchange.response
        what = str(exchange.url)
        if response.status == 200:
            self._warn(f"{what}: the server does not support ranges: no last-chunk-first size check, and a cut "
                       "connection restarts from byte 0")
            if exchange.conn.body_length is None and response.header("transfer-encoding") is None:
                exchange.close()
                raise NetworkError(f"{what}: no Content-Length: a cut image could not be told from a whole one")
            self._ranges = False
            self.total_bytes = exchange.conn.body_length
            if self.total_bytes is not None:
                self.total_chunks = -(-self.total_bytes // CHUNK_SIZE)
            self._stream = (exchange, 0)
            self._progress_at = self._clock()
            return
        try:
            start, end, total = _content_range(response.header("content-range"), what)
            if exchange.conn.body_length not in (None, end - start):
                raise NetworkError(f"{what}: Content-Length {exchange.conn.body_length} disagrees with "
                                   f"Content-Range {response.header('content-range')}")
            body = b"".join(exchange.body())
        finally:
            exchange.close()
        count = -(-total // CHUNK_SIZE)
        last_offset = (count - 1) * CHUNK_SIZE
        if len(body) != end - start or start > last_offset:
            raise NetworkError(f"{what}: asked for the last {CHUNK_SIZE} bytes, got bytes {start}-{end - 1} of {total}")
        last = body[last_offset - start :]
        header = decode(last[:HEADER_AREA], count - 1)
        if header.index != count - 1:
            raise ImageFormatError(
                f"{what}: {total} bytes make {count} chunks, but the last chunk's header says it is chunk "
                f"{header.index}: the image and the server's size disagree"
            )
        if len(last) < header.regionsize + header.size:
            raise ImageFormatError(
                f"{what}: chunk {count - 1}: truncated: {len(last)} bytes, its header says {header.regionsize + header.size}"
            )
        self.total_bytes, self.total_chunks, self._last = total, count, last
        self._progress_at = self._clock()

    def _open_stream(self, index: int, end: int | None) -> None:
        offset = index * CHUNK_SIZE
        spec = f"bytes={offset}-{'' if end is None else end - 1}" if self._last is not None or index else None
        exchange = self._request(spec)
        try:
            self._check_validator(exchange)
            if exchange.response.status == 206:
                start, stop, total = _content_range(exchange.response.header("content-range"), str(exchange.url))
                if start != offset or total != self.total_bytes:
                    raise NetworkError(f"{exchange.url}: asked for bytes from {offset} of {self.total_bytes}, "
                                       f"got {start}-{stop - 1} of {total}")
                self._stream = (exchange, offset)
                return
            if exchange.conn.body_length not in (None, self.total_bytes):
                raise SourceError(f"{exchange.url}: the image changed on the server ({exchange.conn.body_length} "
                                  f"bytes, was {self.total_bytes})")
        except BaseException:
            exchange.close()
            raise
        if index:
            self.restarts += 1
            self._warn(f"{exchange.url}: the server ignored Range: restarting from byte 0, skipping the {index} "
                       "chunks already written")
        self._stream = (exchange, 0)

    # ------------------------------------------------------------------------------------------ ChunkSource

    def header_areas(self) -> None:
        return None

    def preflight(self) -> tuple[int, bytes] | None:
        """The last chunk's (index, header area), fetched first; None from a server without ranges."""
        if self._last is None:
            return None
        return self.total_chunks - 1, self._last[:HEADER_AREA]

    def chunks(self) -> Iterator[tuple[int, bytes]]:
        end = (self.total_chunks - 1) * CHUNK_SIZE if self._last is not None else self.total_bytes
        index = 0
        while end is None or index * CHUNK_SIZE < end:
            if self._stream is None:
                self._retrying(lambda: self._open_stream(index, end), f"at chunk {index}")
            exchange, position = self._stream
            try:
                for chunk in self._chunks_of(exchange, position, index, end):
                    self._hand_on(index, chunk)
                    yield index, chunk
                    index += 1
                exchange.close()
                self._stream = None
                break
            except ConnectionLost as err:
                self.close()
                self.resumes += 1
                again = f"resuming at chunk {index} (byte {index * CHUNK_SIZE})" if self._ranges else "restarting from byte 0"
                self._pause(err, f"at chunk {index}", again)
            except (NetworkError, SourceError) as err:
                self.close()
                raise type(err)(f"{err} at chunk {index}") from None
        if self._last is not None:
            self._hand_on(self.total_chunks - 1, self._last, last=True)
            yield self.total_chunks - 1, self._last
        elif self._hash is not None:
            self._check_digest()

    def _chunks_of(self, exchange: Exchange, position: int, index: int, end: int | None) -> Iterator[bytearray]:
        """Complete chunks from `index` on, out of a body that starts at byte `position`. Each is filled in one
        buffer of its own as pieces arrive (one copy, no joins)."""
        skip = index * CHUNK_SIZE - position
        stop = None if end is None else end - index * CHUNK_SIZE  # bytes wanted from this body after the skip
        buf, fill = bytearray(CHUNK_SIZE), 0
        for piece in exchange.body():
            view = memoryview(piece)
            if skip:
                if len(view) <= skip:
                    skip -= len(view)
                    continue
                view, skip = view[skip:], 0
            if stop is not None:
                view = view[:stop]  # past `end`: read on to the body's end (its framing is checked there), unused
                stop -= len(view)
            while view:
                n = min(len(view), CHUNK_SIZE - fill)
                buf[fill : fill + n] = view[:n]
                fill += n
                view = view[n:]
                if fill == CHUNK_SIZE:
                    yield buf
                    buf, fill = bytearray(CHUNK_SIZE), 0
            if stop == 0 and fill:
                yield buf[:fill]  # the short last chunk of an image that is not whole chunks
                fill = 0
        if stop:
            raise ConnectionLost(f"{exchange.url}: the response ended {stop} bytes early")
        if fill:
            yield buf[:fill]

    def _hand_on(self, index: int, chunk: bytes, last: bool = False) -> None:
        header = decode(chunk[:HEADER_AREA], index)
        if header.index != index:
            raise ImageFormatError(f"{self.name}: chunk {index}: its header says it is chunk {header.index}")
        if self._hash is not None:
            self._hash.update(chunk)
            if last:
                self._check_digest()
        self._progress_at = self._clock()
        self._backoff = BACKOFF_FIRST

    def _check_digest(self) -> None:
        got = self._hash.hexdigest()
        if got != self._digest:
            raise ChecksumError(f"{self.name}: SHA-256 {got} does not match {self._digest} ({self._digest_from})")

    def close(self) -> None:
        if self._stream is not None:
            self._stream[0].close()
            self._stream = None
