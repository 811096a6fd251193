"""Bad images and bad arguments: one clear line, a non-zero exit, nothing written outside the target."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import ImageFormatError
from agent.io.image import restore_chunk
from agent.ndz.header import CHUNK_SIZE, decode
from conftest import FIXTURES, loop_device, needs_root

GOOD = (FIXTURES / "fsA-fsaware-v3.ndz").read_bytes()


def one_line_error(proc, *words):
    assert proc.returncode not in (0, None), proc.err
    assert "Traceback" not in proc.err, proc.err
    lines = [line for line in proc.err.splitlines() if line.strip()]
    assert len(lines) == 1, proc.err
    for word in words:
        assert word in lines[0], lines[0]


def mutated(offset: int, data: bytes) -> bytes:
    image = bytearray(GOOD)
    image[offset : offset + len(data)] = data
    return bytes(image)


CASES = {
    "truncated-in-data": (GOOD[: CHUNK_SIZE + 300_000], ["chunk 1", "truncated"]),
    "wrong-magic": (mutated(CHUNK_SIZE, b"\xde\xad\xbe\xef"), ["chunk 1", "bad magic"]),
    "corrupt-stream": (mutated(CHUNK_SIZE + 4096 + 500_000, b"\xff" * 64), ["chunk 1", "corrupt"]),
    "regions-overflow": (mutated(CHUNK_SIZE + 20, struct.pack("<i", 100_000)), ["chunk 1", "header bytes"]),
    "relocs-overflow": (mutated(2 * CHUNK_SIZE + 32, struct.pack("<i", 1000)), ["chunk 2", "relocations"]),
    "size-lies": (mutated(CHUNK_SIZE + 4, struct.pack("<I", 2_000_000)), ["chunk 1", "does not fit"]),
    "size-lies-short": (mutated(CHUNK_SIZE + 4, struct.pack("<I", 500_000)), ["chunk 1"]),
    "region-outside-chunk": (mutated(CHUNK_SIZE + 36, struct.pack("<II", 30_000, 2037)), ["chunk 1"]),
    "unsorted-regions": (mutated(2 * CHUNK_SIZE + 36, struct.pack("<IIII", 19458, 576, 16137, 2427)), ["chunk 2", "overlaps"]),
    "data-region-grows": (mutated(CHUNK_SIZE + 40, struct.pack("<I", 2038)), ["chunk 1"]),
    "version-4": (mutated(0, struct.pack("<I", 0x6969696C)), ["chunk 0", "unsupported"]),
    "not-an-image": (b"hello world\n" * 1000, ["chunk 0", "bad magic"]),
}


# Refused by what the headers and the file size show: before the first write.
HEADER_LEVEL = {
    "truncated-in-data", "wrong-magic", "regions-overflow", "relocs-overflow", "size-lies", "region-outside-chunk",
    "unsorted-regions", "version-4", "not-an-image",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_image_file(case, tmp_path, run_cli):
    data, words = CASES[case]
    src = tmp_path / "bad.ndz"
    src.write_bytes(data)
    out = tmp_path / "out.img"
    proc = run_cli("image", src, out)
    one_line_error(proc, *words)
    assert proc.returncode == 3  # ImageFormatError
    if case in HEADER_LEVEL:
        assert not out.exists()  # not even created
        # An existing target is left exactly as it was: not written, not grown.
        out.write_bytes(b"\x77" * 4096)
        one_line_error(run_cli("image", src, out), *words)
        assert out.read_bytes() == b"\x77" * 4096


def test_a_refusal_in_the_first_chunks_data_leaves_no_new_file(tmp_path, run_cli):
    src = tmp_path / "bad.ndz"
    src.write_bytes(mutated(4096 + 500_000, b"\xff" * 64)[:CHUNK_SIZE])  # one chunk; a corrupt stream, a fine header
    out = tmp_path / "out.img"
    one_line_error(run_cli("image", src, out), "chunk 0", "corrupt")
    assert not out.exists()


@pytest.mark.parametrize("case", ["wrong-magic", "corrupt-stream", "regions-overflow", "truncated-in-data"])
def test_bad_image_on_stdin(case, tmp_path, run_cli):
    data, words = CASES[case]
    one_line_error(run_cli("image", "-", tmp_path / "out.img", input=data), *words)


@needs_root
@pytest.mark.parametrize("case", ["region-outside-chunk", "corrupt-stream", "unsorted-regions"])
def test_bad_image_never_writes_outside_a_device(case, tmp_path, run_cli):
    """The device is a window on a bigger file: bytes around the window must stay as they were."""
    backing = tmp_path / "backing.img"
    backing.write_bytes(b"\x77" * (18 << 20))
    with loop_device(backing, offset=1 << 20, sizelimit=16 << 20) as dev:
        src = tmp_path / "bad.ndz"
        src.write_bytes(CASES[case][0])
        one_line_error(run_cli("image", src, dev))
    data = backing.read_bytes()
    assert data[: 1 << 20] == b"\x77" * (1 << 20) and data[17 << 20 :] == b"\x77" * (1 << 20)


def test_overlapping_chunks_are_refused(tmp_path, run_cli):
    src = tmp_path / "twice.ndz"
    src.write_bytes(GOOD[:CHUNK_SIZE] * 2)
    one_line_error(run_cli("image", src, tmp_path / "out.img"), "chunk 1", "overlaps")


def test_an_image_concatenated_with_itself_is_refused_before_any_write(tmp_path, run_cli):
    src = tmp_path / "twice.ndz"
    src.write_bytes(GOOD * 2)
    out = tmp_path / "out.img"
    out.write_bytes(b"\x77" * 4096)
    proc = run_cli("image", src, out)
    one_line_error(proc, "chunk 3", "overlaps")
    assert proc.returncode == 3 and out.read_bytes() == b"\x77" * 4096


def test_mixed_images_are_refused(tmp_path, run_cli):
    v5 = bytearray((FIXTURES / "fsA-fsaware-v5.ndz").read_bytes())
    v5[2 * CHUNK_SIZE + 56 : 2 * CHUNK_SIZE + 72] = b"another-image-id"
    src = tmp_path / "mixed.ndz"
    src.write_bytes(bytes(v5))
    one_line_error(run_cli("image", src, tmp_path / "out.img"), "chunk 2", "another image")


@pytest.mark.parametrize(
    "args,words",
    [
        (["image", "/nonexistent.ndz", "/tmp/x.img"], ["No such file"]),
        (["image", "tests", "/tmp/x.img"], ["not a regular file"]),
        (["image", FIXTURES / "fsA-raw-v3.ndz", "/dev/null"], ["not a block device or regular file"]),
        (["image", FIXTURES / "fsA-raw-v3.ndz", "/nonexistent-dir/x.img"], ["No such file"]),
        (["info", "/nonexistent.ndz"], ["No such file"]),
        (["save", "/nonexistent.img", "/tmp/x.ndz"], ["No such file"]),
        (["save", "-z", "12", FIXTURES / "fsA-raw-v3.ndz", "/tmp/x.ndz"], ["level"]),
    ],
)
def test_bad_arguments(args, words, run_cli):
    one_line_error(run_cli(*args), *words)


class NullTarget:
    """Records writes; restore_chunk must only ever write inside the chunk's declared regions."""

    def __init__(self):
        self.writes = []

    def write(self, data, offset):
        self.writes.append((offset, len(data)))

    def zero(self, offset, length):
        self.writes.append((offset, length))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 4200), st.binary(min_size=1, max_size=8)), min_size=1, max_size=6))
def test_fuzzed_chunks_fail_cleanly(edits):
    """Random edits to a real chunk's header and data: either a valid chunk or an ImageFormatError, never another
    exception, and writes only inside the regions the header declares."""
    chunk = bytearray(GOOD[2 * CHUNK_SIZE : 2 * CHUNK_SIZE + 4096 + 150_000])
    for offset, data in edits:
        chunk[offset : offset + len(data)] = data
    chunk = bytes(chunk)
    try:
        header = decode(chunk, 2)
        target = NullTarget()
        restore_chunk(target, header, chunk, 2, zero=True)
    except ImageFormatError as err:
        assert "\n" not in str(err) and str(err).startswith("chunk 2")
        return
    lo = header.first_sector * 512
    hi = header.last_sector * 512
    assert all(lo <= off and off + n <= hi for off, n in target.writes)


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=0, max_size=4096))
def test_fuzzed_header_bytes(data):
    try:
        decode(data, 0)
    except ImageFormatError:
        pass
