"""agent.linux against the real kernel: loop devices and a regular file.

Needs root and loop devices (losetup); skipped otherwise.  Every loop device a
test sets up is detached in a finally.

Observed behaviour (kernel 6.x, util-linux 2.38):
* BLKRRPART on a loop device set up without partition scanning fails with
  EINVAL (the disk is flagged as unable to hold partitions); with
  ``losetup -P`` it succeeds, even with no partition table on the device.
* BLKZEROOUT needs sector-aligned offset and length (else EINVAL); on a loop
  device it punches holes in the backing file, so the range reads zeros.
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


@needs_loop
def test_accepts_file_objects(loop):
    dev, _ = loop
    with open(dev, "rb") as f:
        assert linux.block_size_bytes(f) == DEVICE_SIZE


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
def test_zero_out(loop):
    _, fd = loop
    window, offset, length = 8 * MiB, 3 * MiB + 512, 2 * MiB + 1024
    _fill(fd, offset, length, window)
    linux.zero_out(fd, offset, length)
    _check_zeroed(fd, offset, length, window)


@needs_loop
def test_zero_out_to_end_of_device(loop):
    _, fd = loop
    offset = DEVICE_SIZE - MiB
    _fill(fd, offset, MiB, DEVICE_SIZE)
    linux.zero_out(fd, offset, MiB)
    _check_zeroed(fd, offset, MiB, DEVICE_SIZE)


@needs_loop
def test_unaligned_range_is_einval(loop):
    _, fd = loop
    with pytest.raises(LinuxError) as info:
        linux.zero_out(fd, 100, 512)
    assert info.value.errno == errno.EINVAL


@needs_loop
def test_range_past_end_fails(loop):
    _, fd = loop
    with pytest.raises(LinuxError):
        linux.zero_out(fd, DEVICE_SIZE - 512, 1024)


@needs_loop
def test_empty_range_is_a_no_op(loop, tmp_path):
    _, fd = loop
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


# ----------------------------------------------------------------- booting another kernel
# kexec_load, kexec_file_load and reboot would replace or stop this machine: the tests never let them reach the
# kernel.  `boot_calls` swaps the C functions for recorders, so a test can check both what is refused before the
# call and what a valid call would pass; the real functions are only checked to exist.

_BOOT_FUNCTIONS = ("na_kexec_file_load", "na_kexec_load", "na_reboot")


class _RecordingLib:
    """agent._linux.lib with the boot system calls replaced by recorders that report success."""

    def __init__(self, real):
        self._real = real
        self.calls: list[tuple[str, tuple]] = []

    def __getattr__(self, name):
        if name in _BOOT_FUNCTIONS:
            return lambda *args: self.calls.append((name, args)) or 0
        return getattr(self._real, name)


@pytest.fixture
def boot_calls(monkeypatch):
    fake = _RecordingLib(linux._lib())
    monkeypatch.setattr(linux, "_lib", lambda: fake)
    return fake.calls


def test_boot_wrappers_and_constants_exist():
    from agent import _linux

    for name in _BOOT_FUNCTIONS + ("na_finit_module", "na_mount", "na_umount2", "na_sync"):
        assert callable(getattr(_linux.lib, name))
    for name in sorted(linux.CONSTANTS):
        assert isinstance(getattr(linux, name), int), name
    commands = [linux.LINUX_REBOOT_CMD_KEXEC, linux.LINUX_REBOOT_CMD_RESTART, linux.LINUX_REBOOT_CMD_POWER_OFF,
                linux.LINUX_REBOOT_CMD_HALT]
    assert len(set(commands)) == 4
    assert linux.KEXEC_ARCH_DEFAULT & ~linux.KEXEC_ARCH_MASK == 0
    assert _linux.ffi.sizeof("struct kexec_segment") == 4 * _linux.ffi.sizeof("void *")
    with pytest.raises(AttributeError):
        linux.NOT_A_CONSTANT


def test_kexec_file_load_arguments(boot_calls, tmp_path):
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"not a kernel")
    with open(kernel, "rb") as k, open(kernel, "rb") as i:
        linux.kexec_file_load(k, None, "console=ttyS0 quiet")
        linux.kexec_file_load(k.fileno(), i, "root=/dev/sda1", flags=linux.KEXEC_FILE_ON_CRASH)
        linux.kexec_file_load(None, None, None, flags=linux.KEXEC_FILE_UNLOAD)
        linux.kexec_file_load(k, -1, "", flags=linux.KEXEC_FILE_NO_INITRAMFS)
        (n1, a1), (n2, a2), (n3, a3), (_, a4) = boot_calls
        assert a4 == (k.fileno(), -1, b"", linux.KEXEC_FILE_NO_INITRAMFS)
        assert n1 == n2 == n3 == "na_kexec_file_load"
        assert a1 == (k.fileno(), -1, b"console=ttyS0 quiet", linux.KEXEC_FILE_NO_INITRAMFS)
        assert a2 == (k.fileno(), i.fileno(), b"root=/dev/sda1", linux.KEXEC_FILE_ON_CRASH)
        assert a3[:2] == (-1, -1) and a3[3] == linux.KEXEC_FILE_UNLOAD | linux.KEXEC_FILE_NO_INITRAMFS

        bad = [
            lambda: linux.kexec_file_load(k, i, "", flags=linux.KEXEC_FILE_NO_INITRAMFS),
            lambda: linux.kexec_file_load(k, None, "a\0b"),
            lambda: linux.kexec_file_load(k, None, "", flags=1 << 20),
            lambda: linux.kexec_file_load(k, None, "", flags=-1),
            lambda: linux.kexec_file_load(None, None, ""),
            lambda: linux.kexec_file_load(-1, -1, ""),
        ]
        for call in bad:
            with pytest.raises(ValueError):
                call()
    assert len(boot_calls) == 4


def test_kexec_load_arguments(boot_calls):
    from agent import _linux

    page = os.sysconf("SC_PAGE_SIZE")
    data = b"\x90" * 100
    linux.kexec_load(0x100000, [linux.KexecSegment(data, 0x100000, page), linux.KexecSegment(b"", 2 * page, page)])
    (name, (entry, count, segments, flags)), = boot_calls
    assert (name, entry, count, flags) == ("na_kexec_load", 0x100000, 2, linux.KEXEC_ARCH_DEFAULT)
    assert _linux.ffi.buffer(segments[0].buf, segments[0].bufsz)[:] == data
    assert int(_linux.ffi.cast("uintptr_t", segments[0].mem)) == 0x100000
    assert (segments[0].memsz, segments[1].bufsz, segments[1].memsz) == (page, 0, page)

    linux.kexec_load(0, [], linux.KEXEC_ARCH_DEFAULT | linux.KEXEC_ON_CRASH)  # unload the crash kernel
    assert boot_calls[1][1][1] == 0

    seg = linux.KexecSegment(data, 0x100000, page)
    bad = [
        lambda: linux.kexec_load(0, [seg] * (linux.KEXEC_SEGMENT_MAX + 1)),
        lambda: linux.kexec_load(0, [linux.KexecSegment(data, 0x100001, page)]),
        lambda: linux.kexec_load(0, [linux.KexecSegment(data, 0x100000, page + 1)]),
        lambda: linux.kexec_load(0, [linux.KexecSegment(bytes(page + 1), 0x100000, page)]),
        lambda: linux.kexec_load(0, [seg], flags=linux.KEXEC_ON_CRASH << 8),
        lambda: linux.kexec_load(-1, [seg]),
    ]
    for call in bad:
        with pytest.raises(ValueError):
            call()
    assert len(boot_calls) == 2


def test_reboot_arguments(boot_calls):
    linux.reboot(linux.LINUX_REBOOT_CMD_KEXEC)
    assert boot_calls == [("na_reboot", (linux.LINUX_REBOOT_CMD_KEXEC,))]
    for cmd in (0, 1, -1, linux.LINUX_REBOOT_CMD_KEXEC + 1):
        if cmd in (linux.LINUX_REBOOT_CMD_RESTART, linux.LINUX_REBOOT_CMD_POWER_OFF, linux.LINUX_REBOOT_CMD_HALT):
            continue
        with pytest.raises(ValueError):
            linux.reboot(cmd)
    assert len(boot_calls) == 1


# ----------------------------------------------------------------- modules, mounts, sync


def test_finit_module_bad_fd_is_ebadf():
    """Never loads anything: fd -1 is refused before any file is read.  A kernel built without module support
    (no /proc/modules, e.g. a Firecracker guest) answers ENOSYS to every call instead."""
    with pytest.raises(LinuxError) as info:
        linux.finit_module(-1)
    modules = os.path.exists("/proc/modules")
    assert info.value.errno == (errno.EBADF if modules else errno.ENOSYS)
    assert str(info.value).startswith("finit_module fd -1: ")
    with pytest.raises(ValueError):
        linux.finit_module(-1, flags=1 << 20)
    with pytest.raises(ValueError):
        linux.finit_module(-1, "a=1\0")


def test_sync():
    linux.sync()


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount)")


def _mounted_at(path: Path) -> bool:
    return any(line.split()[4] == str(path) for line in Path("/proc/self/mountinfo").read_text().splitlines())


@contextlib.contextmanager
def _tmpfs(point: Path, flags: int = 0, data: str | None = "size=1m"):
    linux.mount("tmpfs", point, "tmpfs", flags, data)
    try:
        yield point
    finally:
        if _mounted_at(point):
            subprocess.run(["umount", "-l", str(point)], check=False)


@needs_root
def test_mount_tmpfs_and_umount(tmp_path):
    point = tmp_path / "mnt"
    point.mkdir()
    flags = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC
    with _tmpfs(point, flags, "size=1m,mode=0700"):
        assert _mounted_at(point)
        st_flags = os.statvfs(point).f_flag
        assert st_flags & os.ST_NOSUID and st_flags & os.ST_NODEV and st_flags & os.ST_NOEXEC
        assert not st_flags & os.ST_RDONLY
        assert os.stat(point).st_mode & 0o777 == 0o700
        (point / "f").write_bytes(b"x")
        linux.umount(point)
        assert not _mounted_at(point)
        assert not (point / "f").exists()


@needs_root
def test_mount_read_only(tmp_path):
    point = tmp_path / "ro"
    point.mkdir()
    with _tmpfs(point, linux.MS_RDONLY, None):
        assert os.statvfs(point).f_flag & os.ST_RDONLY
        with pytest.raises(OSError) as info:
            (point / "f").write_bytes(b"x")
        assert info.value.errno == errno.EROFS
        linux.umount(point)


@needs_root
def test_umount_detach_while_busy(tmp_path):
    point = tmp_path / "busy"
    point.mkdir()
    with _tmpfs(point):
        fd = os.open(point / "f", os.O_CREAT | os.O_RDWR)
        try:
            with pytest.raises(LinuxError) as info:
                linux.umount(point)
            assert info.value.errno == errno.EBUSY
            assert str(info.value).startswith(f"umount {point}: ")
            linux.umount(point, linux.MNT_DETACH)
            assert not _mounted_at(point)
            os.write(fd, b"still writable")  # a lazily detached filesystem lives on while in use
        finally:
            os.close(fd)


@needs_root
def test_mount_errors(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(LinuxError) as info:
        linux.mount("tmpfs", missing, "tmpfs")
    assert info.value.errno == errno.ENOENT
    assert str(info.value).startswith(f"mount tmpfs (tmpfs) on {missing}: ")
    with pytest.raises(LinuxError) as info:
        linux.umount(tmp_path)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(ValueError):
        linux.umount(tmp_path, 1 << 20)
    with pytest.raises(ValueError):
        linux.mount("tmpfs", tmp_path, "tmpfs", 0, "size=1m\0")
