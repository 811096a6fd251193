"""agent.linux against the real kernel: loop devices and a regular file.

Needs root and loop devices (losetup); skipped otherwise.  Every loop device a
test sets up is detached in a finally.

Observed behaviour (kernel 6.x, util-linux 2.38):
* BLKRRPART on a loop device set up without partition scanning fails with
  EINVAL (the disk is flagged as unable to hold partitions); with
  ``losetup -P`` it succeeds, even with no partition table on the device.
* BLKDISCARD/BLKZEROOUT need sector-aligned offset and length (else EINVAL); on
  a loop device both punch holes in the backing file, so the range reads zeros.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import linux
from agent.errors import LinuxError, NodeagentError

MiB = 1024 * 1024
DEVICE_SIZE = 64 * MiB

needs_loop = pytest.mark.skipif(
    os.geteuid() != 0
    or shutil.which("losetup") is None
    or not os.path.exists("/dev/loop-control"),
    reason="needs root and loop devices",
)


@contextlib.contextmanager
def loop_device(backing: Path, *losetup_args: str):
    """Attach backing to a free loop device; yield (path, fd opened O_RDWR)."""
    dev = subprocess.run(
        ["losetup", "--find", "--show", *losetup_args, str(backing)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    fd = -1
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
        yield dev, fd
    finally:
        if fd >= 0:
            os.close(fd)
        subprocess.run(["losetup", "-d", dev], check=True)


def make_backing(path: Path, size: int = DEVICE_SIZE) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def pattern(length: int, seed: int = 0) -> bytes:
    """Non-zero bytes, different at every 256-byte stride."""
    block = bytes(((i * 7 + seed) % 255) + 1 for i in range(4096))
    return (block * (length // len(block) + 1))[:length]


def pread_all(fd: int, length: int, offset: int) -> bytes:
    chunks = []
    while length:
        data = os.pread(fd, length, offset)
        assert data, "unexpected end of device"
        chunks.append(data)
        length -= len(data)
        offset += len(data)
    return b"".join(chunks)


@pytest.fixture
def loop(tmp_path):
    with loop_device(make_backing(tmp_path / "disk.img")) as dev_fd:
        yield dev_fd


# ----------------------------------------------------------------- block devices


@needs_loop
def test_sizes(loop):
    _, fd = loop
    assert linux.block_size_bytes(fd) == DEVICE_SIZE
    assert linux.logical_sector_size(fd) == 512


@needs_loop
def test_accepts_file_objects(loop):
    dev, _ = loop
    with open(dev, "rb") as f:
        assert linux.block_size_bytes(f) == DEVICE_SIZE


@needs_loop
def test_logical_sector_size_4096(tmp_path):
    with loop_device(make_backing(tmp_path / "disk.img"), "-b", "4096") as (_, fd):
        assert linux.logical_sector_size(fd) == 4096
        assert linux.block_size_bytes(fd) == DEVICE_SIZE


@needs_loop
def test_flush_buffers(loop):
    _, fd = loop
    os.pwrite(fd, pattern(4096), 0)
    linux.flush_buffers(fd)
    assert pread_all(fd, 4096, 0) == pattern(4096)


@needs_loop
def test_reread_partitions_without_partscan_is_einval(loop):
    dev, fd = loop
    with pytest.raises(LinuxError) as info:
        linux.reread_partitions(fd)
    assert info.value.errno == errno.EINVAL
    assert str(info.value).startswith(f"BLKRRPART {dev}: ")
    assert isinstance(info.value, NodeagentError)


@needs_loop
def test_reread_partitions_with_partscan(tmp_path):
    with loop_device(make_backing(tmp_path / "disk.img"), "-P") as (_, fd):
        linux.reread_partitions(fd)  # no partition table: still succeeds


def _check_zeroed(fd: int, offset: int, length: int, window: int) -> None:
    before = pattern(offset)
    after = pattern(window - offset - length, seed=1)
    assert pread_all(fd, offset, 0) == before
    assert pread_all(fd, length, offset) == bytes(length)
    assert pread_all(fd, len(after), offset + length) == after


def _fill(fd: int, offset: int, length: int, window: int) -> None:
    os.pwrite(fd, pattern(offset), 0)
    os.pwrite(fd, pattern(length, seed=2), offset)
    os.pwrite(fd, pattern(window - offset - length, seed=1), offset + length)
    os.fsync(fd)


@needs_loop
@pytest.mark.parametrize("op", [linux.discard, linux.zero_out], ids=["discard", "zero_out"])
def test_discard_and_zero_out(loop, op):
    _, fd = loop
    window, offset, length = 8 * MiB, 3 * MiB + 512, 2 * MiB + 1024
    _fill(fd, offset, length, window)
    op(fd, offset, length)
    _check_zeroed(fd, offset, length, window)


@needs_loop
def test_zero_out_to_end_of_device(loop):
    _, fd = loop
    offset = DEVICE_SIZE - MiB
    _fill(fd, offset, MiB, DEVICE_SIZE)
    linux.zero_out(fd, offset, MiB)
    _check_zeroed(fd, offset, MiB, DEVICE_SIZE)


@needs_loop
@pytest.mark.parametrize("op", [linux.discard, linux.zero_out], ids=["discard", "zero_out"])
def test_unaligned_range_is_einval(loop, op):
    _, fd = loop
    with pytest.raises(LinuxError) as info:
        op(fd, 100, 512)
    assert info.value.errno == errno.EINVAL


@needs_loop
def test_range_past_end_fails(loop):
    _, fd = loop
    with pytest.raises(LinuxError):
        linux.zero_out(fd, DEVICE_SIZE - 512, 1024)


@needs_loop
def test_empty_range_is_a_no_op(loop, tmp_path):
    _, fd = loop
    linux.discard(fd, 512, 0)
    linux.zero_out(fd, DEVICE_SIZE, 0)
    with open(make_backing(tmp_path / "f", 4096), "r+b") as f:
        linux.punch_hole(f, 0, 0)


def test_negative_range_is_value_error():
    with pytest.raises(ValueError):
        linux.zero_out(0, -512, 512)
    with pytest.raises(ValueError):
        linux.punch_hole(0, 0, -1)


@pytest.fixture(scope="module")
def shared_loop(tmp_path_factory):
    with loop_device(make_backing(tmp_path_factory.mktemp("shared") / "disk.img")) as dev_fd:
        yield dev_fd


@needs_loop
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    start=st.integers(min_value=0, max_value=4096),
    sectors=st.integers(min_value=0, max_value=2048),
)
def test_zero_out_any_aligned_range(shared_loop, start, sectors):
    _, fd = shared_loop
    window = 4 * MiB
    offset, length = start * 512, sectors * 512
    if offset + length > window:
        length = window - offset
    _fill(fd, offset, length, window)
    linux.zero_out(fd, offset, length)
    _check_zeroed(fd, offset, length, window)


# ----------------------------------------------------------------- regular files


def test_punch_hole_keeps_size(tmp_path):
    path = tmp_path / "target.img"
    size = 4 * MiB
    path.write_bytes(pattern(size))
    offset, length = MiB, MiB + 8192
    with open(path, "r+b") as f:
        try:
            linux.punch_hole(f.fileno(), offset, length)
        except LinuxError as err:
            if err.errno == errno.EOPNOTSUPP:
                pytest.skip(f"{tmp_path} has no hole punching")
            raise
    data = path.read_bytes()
    assert len(data) == size
    assert data[:offset] == pattern(size)[:offset]
    assert data[offset : offset + length] == bytes(length)
    assert data[offset + length :] == pattern(size)[offset + length :]


def test_punch_hole_past_eof_keeps_size(tmp_path):
    path = tmp_path / "small.img"
    path.write_bytes(pattern(8192))
    with open(path, "r+b") as f:
        try:
            linux.punch_hole(f, 4096, MiB)
        except LinuxError as err:
            if err.errno == errno.EOPNOTSUPP:
                pytest.skip(f"{tmp_path} has no hole punching")
            raise
    assert path.read_bytes() == pattern(8192)[:4096] + bytes(4096)


def test_ioctl_on_regular_file_names_the_path(tmp_path):
    path = make_backing(tmp_path / "plain", 4096)
    with open(path, "rb") as f:
        with pytest.raises(LinuxError) as info:
            linux.block_size_bytes(f)
    assert info.value.errno == errno.ENOTTY
    assert str(info.value).startswith(f"BLKGETSIZE64 {path}: ")


def test_bad_fd_is_ebadf():
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(LinuxError) as info:
        linux.flush_buffers(r)
    assert info.value.errno == errno.EBADF


# ----------------------------------------------------------------- missing extension


def test_missing_extension_fails_on_first_use_not_import(monkeypatch):
    monkeypatch.setattr(linux, "_linux", None)
    monkeypatch.setattr(linux, "_import_error", ImportError("No module named 'agent._linux'"))
    with pytest.raises(linux.ExtensionMissingError) as info:
        linux.block_size_bytes(0)
    assert isinstance(info.value, NodeagentError)
    assert "python build.py ext" in str(info.value)
    assert "pip install ." in str(info.value)


def test_import_without_extension_succeeds():
    code = (
        "import sys; sys.modules['agent._linux'] = None\n"
        "import agent.linux as L\n"
        "try:\n"
        "    L.punch_hole(0, 0, 0)\n"
        "except L.ExtensionMissingError as e:\n"
        "    print('missing:', e)\n"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, check=True, capture_output=True, text=True
    ).stdout
    assert out.startswith("missing: ")
