"""The HTTP/1.1 codec, URLs, SHA256SUMS parsing and the in-order image check: pure code, fed byte by byte."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import ChecksumError, ImageFormatError, NetworkError, UsageError
from agent.http.codec import ClientConnection, ConnectionLost, Data, EndOfMessage, Response, Stalled
from agent.http.url import parse, resolve
from agent.io.http_source import digest_from_sums
from agent.ndz.header import CHUNK_SIZE
from agent.ndz.sequence import ChunkSequence

FIXTURES = Path(__file__).parent / "fixtures" / "imagezip"
URL = parse("http://10.77.0.1:8080/images/a.ndz")


def feed(raw: bytes, split: int | None = None, method: str = "GET", close: bool = False):
    """Response, body and whether EndOfMessage came, feeding `raw` in two pieces cut at `split`."""
    conn = ClientConnection(method, URL)
    events = []
    pieces = [raw] if split is None else [raw[:split], raw[split:]]
    for piece in pieces:
        if piece:
            events += conn.receive(piece, None, 1.0)
    if close:
        events += conn.receive(b"", None, 2.0)
    responses = [e for e in events if isinstance(e, Response)]
    body = b"".join(e.data for e in events if isinstance(e, Data))
    return responses, body, any(isinstance(e, EndOfMessage) for e in events)


def test_request_head():
    conn = ClientConnection("GET", URL, [("Range", "bytes=-1048576")])
    (head, dest), = conn.outgoing()
    assert dest is None
    assert head == (
        b"GET /images/a.ndz HTTP/1.1\r\nHost: 10.77.0.1:8080\r\nConnection: close\r\nRange: bytes=-1048576\r\n\r\n"
    )
    assert conn.outgoing() == []


def test_chunked_upload_framing():
    conn = ClientConnection("PUT", parse("http://h/u/x.ndz"), body="chunked")
    conn.send_data(b"hello")
    conn.send_data(b"")  # nothing: an empty chunk would end the body
    conn.send_data(b"x" * 300)
    conn.send_end()
    wire = b"".join(data for data, _ in conn.outgoing())
    assert wire.startswith(b"PUT /u/x.ndz HTTP/1.1\r\nHost: h\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert wire.endswith(b"\r\n\r\n5\r\nhello\r\n12c\r\n" + b"x" * 300 + b"\r\n0\r\n\r\n")


CL_RESPONSE = b"HTTP/1.1 206 Partial Content\r\nContent-Length: 11\r\nContent-Range: bytes 0-10/20\r\nETag: \"a\"\r\n\r\nhello world"
CHUNKED_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;ext=1\r\nhello\r\n1\r\n \r\nA\r\nworld, too\r\n0\r\nX-Trailer: yes\r\n\r\n"
)


@pytest.mark.parametrize("raw, body", [(CL_RESPONSE, b"hello world"), (CHUNKED_RESPONSE, b"hello world, too")])
def test_body_framing_split_anywhere(raw, body):
    for split in range(len(raw) + 1):
        responses, got, ended = feed(raw, split)
        assert len(responses) == 1 and got == body and ended, split
    assert responses[0].header("etag" if raw is CL_RESPONSE else "transfer-encoding") in ('"a"', "chunked")


def test_close_delimited_body_ends_at_close():
    responses, body, ended = feed(b"HTTP/1.0 200 OK\r\n\r\nabc", close=True)
    assert responses[0].status == 200 and body == b"abc" and ended


def test_interim_100_skipped_and_no_body_statuses():
    responses, body, ended = feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    assert [r.status for r in responses] == [201] and ended
    responses, body, ended = feed(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert ended and body == b""
    responses, body, ended = feed(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", method="HEAD")
    assert ended and body == b""


@pytest.mark.parametrize(
    "raw, words",
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "after 5 of 10 body bytes"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel", "inside the chunked body"),
        (b"HTTP/1.1 200 OK\r\nContent-", "before a complete response head"),
    ],
)
def test_early_close_is_connection_lost(raw, words):
    with pytest.raises(ConnectionLost, match=words):
        feed(raw, close=True)


@pytest.mark.parametrize(
    "raw, words",
    [
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP/1.x response"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "not an HTTP/1.x response"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "unsupported Transfer-Encoding"),
        (b"HTTP/1.1 200 OK\r\n folded: x\r\n\r\n", "malformed header line"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXY", "no CRLF after a chunk"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nabc", "data after the end of the response"),
        (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 20000, "longer than"),
    ],
)
def test_malformed_response_is_a_network_error_not_retried(raw, words):
    with pytest.raises(NetworkError, match=words) as caught:
        feed(raw)
    assert not isinstance(caught.value, ConnectionLost)
    assert str(URL) in str(caught.value)


def test_stall_timer():
    conn = ClientConnection("GET", URL, idle_timeout=5, now=100.0)
    assert conn.next_deadline() == 105.0
    assert conn.timer(104.9) == []
    conn.receive(b"HTTP/1.1 200 OK\r\n", None, 104.0)
    assert conn.next_deadline() == 109.0
    assert conn.timer(109.5) == [Stalled(5.5)]
    assert conn.timer(120) == [] and conn.next_deadline() == float("inf")  # reported once
    assert ClientConnection("GET", URL).next_deadline() == float("inf")


def test_urls():
    assert parse("http://10.0.0.1/x.ndz") == ("http", "10.0.0.1", 80, "/x.ndz")
    assert str(parse("HTTP://h:8080")) == "http://h:8080/"
    assert parse("http://[::1]:81/a?b#frag") == ("http", "::1", 81, "/a?b")
    assert parse("tcp://10.0.0.1:7000") == ("tcp", "10.0.0.1", 7000, "")
    base = parse("http://h:81/dir/a.ndz?q")
    assert resolve(base, "/other/b.ndz") == ("http", "h", 81, "/other/b.ndz")
    assert resolve(base, "b.ndz") == ("http", "h", 81, "/dir/b.ndz")
    assert resolve(base, "http://g/c") == ("http", "g", 80, "/c")
    for bad, words in [
        ("https://h/x", "HTTPS is not supported"), ("ftp://h/x", "expected"), ("http://h:0/x", "bad port"),
        ("http://h:99999/", "bad port"), ("tcp://h", "expected tcp://HOST:PORT"), ("tcp://h:1/p", "no path"),
        ("http:///x", "no host"), ("http://u:p@h/", "passwords"), ("http://h/a b", "spaces"),
    ]:
        with pytest.raises(UsageError, match=words):
            parse(bad)


def test_sha256sums():
    a, b = "a" * 64, "B" * 64
    assert digest_from_sums(f"{a}  other.ndz\n{b} *dir/x.ndz\n", "x.ndz", "sums") == "b" * 64
    assert digest_from_sums(f"{a}\n", "x.ndz", "sums") == a  # a lone digest
    assert digest_from_sums(f"# comment\n{a}  renamed.ndz\n", "x.ndz", "sums") == a
    with pytest.raises(ChecksumError, match="no SHA-256 for x.ndz"):
        digest_from_sums(f"{a}  y.ndz\n{b}  z.ndz\n", "x.ndz", "sums")
    with pytest.raises(ChecksumError, match="not a SHA-256 digest"):
        digest_from_sums("1234  x.ndz\n", "x.ndz", "sums")


def chunks_of(path: Path) -> list[bytes]:
    data = path.read_bytes()
    return [data[i : i + CHUNK_SIZE] for i in range(0, len(data), CHUNK_SIZE)]


@pytest.mark.parametrize("name", ["fsA-raw-v3.ndz", "fsA-fsaware-v5.ndz", "diskB-mbr-v3.ndz"])
def test_sequence_accepts_real_images(name):
    sequence = ChunkSequence()
    for chunk in chunks_of(FIXTURES / name):
        sequence.add(chunk)
    sequence.finish()
    assert sequence.count == len(chunks_of(FIXTURES / name))


def test_sequence_refuses_gaps_order_and_cuts():
    chunks = chunks_of(FIXTURES / "fsA-raw-v3.ndz")
    with pytest.raises(ImageFormatError, match="chunk 1: its header says it is chunk 2"):
        sequence = ChunkSequence()
        for chunk in [chunks[0], chunks[2]]:
            sequence.add(chunk)
    with pytest.raises(ImageFormatError, match="chunk 1: 1000 bytes, not 1048576: the image ends inside it"):
        sequence = ChunkSequence()
        sequence.add(chunks[0])
        sequence.add(chunks[1][:1000])
    with pytest.raises(ImageFormatError, match="empty"):
        ChunkSequence().finish()
    # A chunk renumbered to hide a missing one still does not tile.
    renumbered = bytearray(chunks[2])
    renumbered[8:12] = (1).to_bytes(4, "little")
    sequence = ChunkSequence()
    sequence.add(chunks[0])
    with pytest.raises(ImageFormatError, match="do not tile"):
        sequence.add(bytes(renumbered))


@pytest.mark.parametrize(
    "args, words",
    [
        (["image", "https://127.0.0.1/x.ndz", "{tmp}/out"], "HTTPS is not supported"),
        (["image", "--sha256", "xyz", "http://127.0.0.1:9/x.ndz", "{tmp}/out"], "not a SHA-256 digest"),
        (["save", "-r", "{tmp}/disk", "tcp://127.0.0.1"], "expected tcp://HOST:PORT"),
        (["save", "-r", "{tmp}/disk", "http://127.0.0.1:0/x"], "bad port"),
        (["receive", "-m", "node1.example", "-p", "7000", "{tmp}/f"], "not an IPv4 address"),
    ],
)
def test_bad_network_arguments_are_usage_errors_before_any_traffic(args, words, tmp_path, run_cli):
    (tmp_path / "disk").write_bytes(bytes(1 << 20))
    proc = run_cli(*[a.format(tmp=tmp_path) for a in args])
    assert proc.returncode == 2, proc.err
    assert len(proc.err.strip().splitlines()) == 1 and words in proc.err and "Traceback" not in proc.err
    assert not (tmp_path / "out").exists() and not (tmp_path / "f").exists()
