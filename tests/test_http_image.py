"""`nodeagent image http://...` against Debian's nginx in a network namespace, through a fault-injecting proxy.

Server 10.77.0.1 runs nginx (ranges; /noranges/ without; /redirect/ redirects; /busy/ answers 503); the node
10.77.0.2 runs the agent and, for the cut tests, tests/fault_proxy.py on 10.77.0.2:9000.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import time
from pathlib import Path

import pytest

from conftest import FIXTURES, loop_device, needs_root
from http_helpers import fault_proxy, nginx
from net_helpers import lan

from agent.io.save import save
from agent.ndz.header import CHUNK_SIZE

pytestmark = [needs_root, pytest.mark.skipif(shutil.which("nginx", path="/usr/sbin:/usr/bin") is None,
                                             reason="nginx not installed (tests/run installs it)")]

PROXY = 9000


def make_disk(path: Path, size: int, seed: int) -> Path:
    """Half random, half zero 4 KiB blocks: compresses to about half, so the image has many chunks."""
    rng = random.Random(seed)
    path.write_bytes(b"".join(rng.randbytes(4096) + bytes(4096) for _ in range(size // 8192)))
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """(server host, node host, nginx, www folder, work folder) with big.ndz (about 24 chunks) and its disk."""
    work = tmp_path_factory.mktemp("http")
    www = work / "www"
    www.mkdir()
    disk = make_disk(work / "disk.raw", 48 << 20, seed=5)
    save(str(disk), str(www / "big.ndz"), raw=True)
    shutil.copy(FIXTURES / "fsA-raw-v3.ndz", www / "small.ndz")
    with lan(2) as (server, node), nginx(server, www, work / "nginx") as web:
        yield server, node, web, www, work


def run_image(node, *args, timeout=120):
    proc = node.run(node.nodeagent("image", "-q", *map(str, args)), timeout=timeout)
    proc.err = proc.stderr.decode()
    return proc


def assert_one_line_error(proc, status: int, *words: str) -> str:
    assert proc.returncode == status, proc.err
    last = proc.err.strip().splitlines()[-1]
    assert "Traceback" not in proc.err, proc.err
    for word in words:
        assert word in last, last
    return last


def restored_by_file(www: Path, name: str, work: Path, run_cli) -> Path:
    out = work / f"{name}.from-file"
    if not out.exists():
        run_cli("image", "-q", www / name, out, check=True)
    return out


def image_requests(web, name: str) -> list[str]:
    return [line for line in web.access_log() if line.startswith(f"GET /{name} ")]


def test_image_from_url_equals_image_from_file_last_chunk_first(site, tmp_path, run_cli):
    server, node, web, www, work = site
    out = tmp_path / "out"
    before = len(image_requests(web, "big.ndz"))
    proc = run_image(node, f"{web.url}/big.ndz", out)
    assert proc.returncode == 0, proc.err
    assert out.read_bytes() == restored_by_file(www, "big.ndz", work, run_cli).read_bytes()
    total = (www / "big.ndz").stat().st_size
    requests = image_requests(web, "big.ndz")[before:]
    assert requests == [
        f'GET /big.ndz 206 "bytes=-{CHUNK_SIZE}" {CHUNK_SIZE}',
        f'GET /big.ndz 206 "bytes=0-{total - CHUNK_SIZE - 1}" {total - CHUNK_SIZE}',
    ]


def test_small_disk_refused_before_any_write(site, tmp_path):
    server, node, web, www, work = site
    small = tmp_path / "small-disk"
    small.write_bytes(b"\xa5" * (8 << 20))
    before = len(image_requests(web, "big.ndz"))
    with loop_device(small) as dev:
        proc = run_image(node, f"{web.url}/big.ndz", dev)
    assert_one_line_error(proc, 7, "the image needs", "the device has")
    assert small.read_bytes() == b"\xa5" * (8 << 20)
    assert len(image_requests(web, "big.ndz")) == before + 1  # only the last chunk was fetched


def test_cut_connections_resume_at_the_first_incomplete_chunk(site, tmp_path, run_cli):
    server, node, web, www, work = site
    out = tmp_path / "out"
    cuts = 4
    with fault_proxy(node, PROXY, f"{server.addr}:{web.port}", "--cut-after", 2_600_000, "--cuts", cuts) as log:
        proc = run_image(node, "-T", 20, f"http://{node.addr}:{PROXY}/big.ndz", out)
        conns = log()
    assert proc.returncode == 0, proc.err
    assert out.read_bytes() == restored_by_file(www, "big.ndz", work, run_cli).read_bytes()
    resumes = [line for line in proc.err.splitlines() if "resuming at chunk" in line]
    assert len(resumes) == cuts, proc.err
    assert "restart" not in proc.err
    # Each cut costs at most one chunk fetched twice: what came through the proxy, less the response heads, is
    # the image plus less than a chunk per cut.
    total = (www / "big.ndz").stat().st_size
    relayed = sum(int(line.split()[2]) for line in conns if "upstream" in line)
    heads = 400 * len(conns)
    assert sum(", cut" in line for line in conns) == cuts
    assert total <= relayed - heads + 400 * len(conns) and relayed - heads - total < cuts * CHUNK_SIZE, conns
    ranges = [line.split('"')[1] for line in image_requests(web, "big.ndz")[-cuts - 1 :]]
    assert all(int(r[len("bytes=") :].split("-")[0]) % CHUNK_SIZE == 0 for r in ranges), ranges


def test_server_without_ranges_restarts_with_a_warning(site, tmp_path, run_cli):
    server, node, web, www, work = site
    out = tmp_path / "out"
    with fault_proxy(node, PROXY, f"{server.addr}:{web.port}", "--cut-after", 5_000_000, "--cuts", 2):
        proc = run_image(node, "-T", 20, f"http://{node.addr}:{PROXY}/noranges/big.ndz", out)
    assert proc.returncode == 0, proc.err
    assert "does not support ranges" in proc.err
    assert proc.err.count("restarting from byte 0") >= 2 and "resuming" not in proc.err, proc.err
    assert out.read_bytes() == restored_by_file(www, "big.ndz", work, run_cli).read_bytes()


def test_redirect_followed(site, tmp_path, run_cli):
    server, node, web, www, work = site
    out = tmp_path / "out"
    proc = run_image(node, f"{web.url}/redirect/small.ndz", out)
    assert proc.returncode == 0, proc.err
    assert out.read_bytes() == restored_by_file(www, "small.ndz", work, run_cli).read_bytes()


def test_404_fails_at_once_naming_url_status_and_chunk(site, tmp_path):
    server, node, web, www, work = site
    started = time.monotonic()
    proc = run_image(node, f"{web.url}/missing.ndz", tmp_path / "out")
    assert_one_line_error(proc, 6, f"{web.url}/missing.ndz", "HTTP 404", "at the last chunk (fetched first)")
    assert time.monotonic() - started < 10
    assert not (tmp_path / "out").exists()


def test_5xx_retried_until_T_without_progress(site, tmp_path):
    server, node, web, www, work = site
    started = time.monotonic()
    proc = run_image(node, "-T", 2, f"{web.url}/busy/small.ndz", tmp_path / "out")
    assert_one_line_error(proc, 6, "HTTP 503", "giving up after 2 s without progress", "at the last chunk")
    assert 2 <= time.monotonic() - started < 15
    assert proc.err.count("retrying in") >= 2


def test_connection_refused_names_errno(site, tmp_path):
    server, node, web, www, work = site
    proc = run_image(node, "-T", 1, f"http://{server.addr}:9/small.ndz", tmp_path / "out")
    assert_one_line_error(proc, 6, "connection refused (ECONNREFUSED)", "at the last chunk", "giving up")


@pytest.mark.parametrize("lie", [1000, -1000])
def test_lying_content_length(site, tmp_path, lie):
    server, node, web, www, work = site
    target = tmp_path / "out"
    with fault_proxy(node, PROXY, f"{server.addr}:{web.port}", "--lie-length", lie):
        proc = run_image(node, "-T", 3, f"http://{node.addr}:{PROXY}/big.ndz", target)
    assert_one_line_error(proc, 6, "Content-Length", "disagrees with Content-Range", "at the last chunk")
    assert not target.exists()


@pytest.mark.parametrize("lie, words", [
    (1000, "connection closed after 7340032 of 7341032 body bytes at chunk 7; giving up"),  # a chunk 7 that never comes
    (-1000, "data after the end of the response (Connection: close) at chunk 6"),
])
def test_lying_content_length_without_ranges(site, tmp_path, lie, words):
    server, node, web, www, work = site
    with fault_proxy(node, PROXY, f"{server.addr}:{web.port}", "--lie-length", lie):
        proc = run_image(node, "-T", 3, f"http://{node.addr}:{PROXY}/noranges/small.ndz", tmp_path / "out")
    assert_one_line_error(proc, 6, words)


def test_image_cut_inside_its_last_chunk_refused_before_any_write(site, tmp_path):
    server, node, web, www, work = site
    data = (www / "big.ndz").read_bytes()
    (www / "cut.ndz").write_bytes(data[: len(data) - CHUNK_SIZE + 5000])
    target = tmp_path / "out"
    target.write_bytes(b"\x5a" * 4096)
    proc = run_image(node, f"{web.url}/cut.ndz", target)
    chunks = len(data) // CHUNK_SIZE
    assert_one_line_error(proc, 3, f"chunk {chunks - 1}: truncated")
    assert target.read_bytes() == b"\x5a" * 4096


def test_sha256_checked_while_streaming(site, tmp_path, run_cli):
    server, node, web, www, work = site
    digest = hashlib.sha256((www / "small.ndz").read_bytes()).hexdigest()
    good = run_image(node, "--sha256", digest.upper(), f"{web.url}/small.ndz", tmp_path / "good")
    assert good.returncode == 0, good.err
    wrong = "0" * 64
    proc = run_image(node, "--sha256", wrong, f"{web.url}/small.ndz", tmp_path / "bad")
    assert_one_line_error(proc, 4, f"{web.url}/small.ndz", digest, "does not match", wrong)
    proc = run_image(node, "--sha256", "1234", f"{web.url}/small.ndz", tmp_path / "usage")
    assert_one_line_error(proc, 2, "not a SHA-256 digest")


def test_sidecar_sha256_used_when_present(site, tmp_path):
    server, node, web, www, work = site
    shutil.copy(www / "small.ndz", www / "side.ndz")
    sidecar = www / "side.ndz.sha256"
    digest = hashlib.sha256((www / "side.ndz").read_bytes()).hexdigest()
    try:
        sidecar.write_text(f"{'f' * 64}  other.ndz\n{digest}  side.ndz\n")
        assert run_image(node, f"{web.url}/side.ndz", tmp_path / "a").returncode == 0
        sidecar.write_text(f"{'e' * 64}  side.ndz\n")
        proc = run_image(node, f"{web.url}/side.ndz", tmp_path / "b")
        assert_one_line_error(proc, 4, "does not match", f"{web.url}/side.ndz.sha256")
    finally:
        os.unlink(sidecar)
