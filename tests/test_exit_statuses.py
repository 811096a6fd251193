"""Each kind of failure comes out of the real command as its own exit status (agent/errors.py, README "Exit
statuses"), with one line on stderr; flags go anywhere among the positionals, as with getopt."""

from __future__ import annotations

import io
import os
import shlex
import subprocess
import zlib
from dataclasses import replace

import pytest

from agent import cli
from agent.errors import ImageFormatError
from agent.ndz.header import CHUNK_SIZE, HEADER_AREA, ChunkHeader, decode, encode
from agent.progress import Progress
from conftest import FIXTURES, ROOT, loop_device, needs_root, sh
from test_bad_input import one_line_error

GOOD = FIXTURES / "fsA-fsaware-v3.ndz"
RAW = FIXTURES / "fsA-raw-v3.ndz"


def status(proc, expected: int, *words) -> None:
    one_line_error(proc, *words)
    assert proc.returncode == expected, (proc.returncode, proc.err)


# --- one status per kind, from the real command ------------------------------------------------------------------


def test_usage_is_2(run_cli, tmp_path):
    status(run_cli("save", "-z", "12", RAW, tmp_path / "x.ndz"), 2, "level")
    status(run_cli("image", RAW), 2, "SOURCE TARGET")
    status(run_cli("image", "frisbee://239.192.1.1", tmp_path / "x"), 2, "frisbee://ADDR:PORT")


def test_truncated_image_is_3(run_cli, tmp_path):
    src = tmp_path / "short.ndz"
    src.write_bytes(GOOD.read_bytes()[: CHUNK_SIZE + 300_000])
    status(run_cli("image", src, tmp_path / "out.img"), 3, "chunk 1", "truncated")
    status(run_cli("info", src), 3, "chunk 1", "truncated")  # info too, not only with -c


def test_missing_image_is_5(run_cli, tmp_path):
    status(run_cli("image", tmp_path / "none.ndz", tmp_path / "out.img"), 5, "No such file")
    status(run_cli("info", tmp_path / "none.ndz"), 5, "No such file")
    status(run_cli("save", tmp_path / "none.img", tmp_path / "x.ndz"), 5, "No such file")


def test_unwritable_target_is_9(run_cli, tmp_path):
    status(run_cli("image", RAW, tmp_path / "no-dir" / "x.img"), 9, "No such file")
    status(run_cli("image", RAW, "/dev/null"), 9, "not a block device or regular file")


def test_save_into_a_directory_is_11_and_leaves_nothing(run_cli, tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4 << 20))
    dest = tmp_path / "images"
    dest.mkdir()
    status(run_cli("save", disk, dest), 11, "is a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.img", "images"]
    assert list(dest.iterdir()) == []


@needs_root
def test_loop_device_too_small_is_7_and_untouched(run_cli, tmp_path):
    backing = tmp_path / "small.img"
    backing.write_bytes(b"\x55" * (8 << 20))
    with loop_device(backing) as dev:
        status(run_cli("image", GOOD, dev), 7, dev, "needs")
    assert backing.read_bytes() == b"\x55" * (8 << 20)


@needs_root
def test_mounted_loop_device_is_8(run_cli, tmp_path):
    backing = tmp_path / "fs.img"
    backing.write_bytes(bytes(32 << 20))
    sh("mkfs.ext4", "-q", "-F", str(backing))
    point = tmp_path / "mnt"
    point.mkdir()
    with loop_device(backing) as dev:
        sh("mount", dev, str(point))
        try:
            status(run_cli("image", GOOD, dev), 8, dev, "mounted")
        finally:
            subprocess.run(["umount", str(point)], check=False)


@needs_root
def test_no_space_for_a_saved_image_is_11_and_leaves_no_part_file(run_cli, tmp_path):
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        for _ in range(8):
            f.write(os.urandom(1 << 20))  # incompressible: the image needs about 8 MiB
    small = tmp_path / "small"
    small.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small))
    try:
        status(run_cli("save", "-r", disk, small / "x.ndz"), 11, "x.ndz", "No space left")
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_internal_error_is_one_line_and_1(monkeypatch, capsys, tmp_path):
    def broken(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(cli, "_info", broken)
    assert cli.main(["info", str(GOOD)]) == 1
    assert capsys.readouterr().err == "nodeagent info: internal error: ZeroDivisionError: division by zero\n"
    monkeypatch.setenv("NODEAGENT_DEBUG", "1")
    assert cli.main(["info", str(GOOD)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("nodeagent info: internal error: ZeroDivisionError: division by zero\n")


def test_the_reporter_carries_the_kind():
    out = io.StringIO()
    p = Progress("written", stream=out, command="image")
    assert p.fail(ImageFormatError("chunk 1: truncated")) == 3
    assert (p.failure_kind, out.getvalue()) == ("image", "nodeagent image: chunk 1: truncated\n")
    p.warn("careful")
    assert out.getvalue().endswith("nodeagent image: warning: careful\n")


# --- flags anywhere --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, expect",
    [
        (["image", "frisbee://239.192.1.1:7000", "-i", "10.0.0.2", "/dev/sda"], {"paths": ["frisbee://239.192.1.1:7000", "/dev/sda"], "ifaddr": "10.0.0.2"}),
        (["image", "-z", "a.ndz", "--force", "b.img", "-q"], {"paths": ["a.ndz", "b.img"], "zero": True, "force": True, "quiet": True}),
        (["image", "-m", "239.1.1.1", "T", "-p", "7000", "-T", "5"], {"paths": ["T"], "port": 7000, "timeout": 5.0}),
        (["save", "disk", "-z", "9", "out.ndz", "--zstd"], {"disk": "disk", "dest": "out.ndz", "level": 9, "zstd": True}),
        (["save", "disk", "out.ndz", "-r", "--v5", "-q"], {"raw": True, "v5": True, "quiet": True}),
        (["serve", "file", "-m", "239.1.1.1", "-p", "7000", "-W", "0"], {"file": "file", "port": 7000, "bandwidth": 0}),
        (["info", "x.ndz", "-r", "-c"], {"image": "x.ndz", "regions": True, "check": True}),
        (["getmac", "eth0"], {"iface": "eth0"}),
        (["kexec", "-l", "vmlinuz", "-e", "--initrd", "initrd.img", "-s"], {"load": "vmlinuz", "exec": True, "initrd": "initrd.img", "syscall": "s"}),
        (["kexec", "--disk", "/dev/sda", "-e"], {"disk": "/dev/sda", "exec": True}),
        (["demo", "dir"], {"dir": "dir"}),
    ],
)
def test_flags_anywhere_parse(argv, expect):
    args = cli.build_parser().parse_args(argv)
    assert {key: getattr(args, key) for key in expect} == expect


def test_flags_anywhere_run(run_cli, tmp_path):
    out = tmp_path / "out.img"
    assert run_cli("image", GOOD, "-q", out).returncode == 0
    proc = run_cli("save", out, "-q", tmp_path / "again.ndz", "--v5")
    assert proc.returncode == 0 and proc.err == "", proc.err
    proc = run_cli("info", tmp_path / "again.ndz", "-r")
    assert proc.returncode == 0 and "V5" in proc.out and "  region [" in proc.out, proc.err


@pytest.mark.parametrize(
    "argv, words",
    [
        (["image", "-m", "239.1.1.1", "-p", "99999", "-T", "1", "T"], ["-p", "1..65535"]),
        (["image", "-m", "239.1.1.1", "-p", "0", "T"], ["-p"]),
        (["serve", "-m", "239.1.1.1", "-p", "70000", "F"], ["-p"]),
        (["serve", "-m", "239.1.1.1", "-p", "7000", "-T", "inf", "F"], ["-T", "inf"]),
        (["serve", "-m", "239.1.1.1", "-p", "7000", "-T", "1e300", "F"], ["-T"]),
        (["serve", "-m", "239.1.1.1", "-p", "7000", "-T", "nan", "F"], ["-T", "nan"]),
        (["image", "-m", "239.1.1.1", "-p", "7000", "-T", "-5", "T"], ["-T"]),
        (["image", "-m", "239.1.1.1", "-p", "7000", "-M", "0", "T"], ["-M"]),
        (["serve", "-m", "239.1.1.1", "-p", "7000", "-W", "-1", "F"], ["-W"]),
    ],
)
def test_numbers_out_of_range_are_usage_errors(argv, words, run_cli):
    proc = run_cli(*argv, timeout=20)
    assert proc.returncode == 2, proc.err
    assert "Traceback" not in proc.err and proc.err.splitlines()[-1].startswith(f"nodeagent {argv[0]}: error:")
    for word in words:
        assert word in proc.err.splitlines()[-1]


# --- closed standard streams, FIFOs ----------------------------------------------------------------------------


def shell(cli_command, argv, redirect: str, tmp_path) -> subprocess.CompletedProcess:
    cmd = f"{shlex.join([*cli_command, *map(str, argv)])} {redirect}"
    proc = subprocess.run(["sh", "-c", cmd], capture_output=True, timeout=60, cwd=ROOT)
    proc.err = proc.stderr.decode(errors="replace")
    return proc


def test_closed_stdin_is_one_line(cli_command, tmp_path):
    out = tmp_path / "t.img"
    status(shell(cli_command, ["image", "-", out], "<&-", tmp_path), 5, "stdin is closed")
    assert not out.exists()


def test_closed_stdout_is_one_line(cli_command, tmp_path):
    status(shell(cli_command, ["save", RAW, "-"], ">&-", tmp_path), 11, "stdout is closed")


@pytest.mark.parametrize("argv", [["info", "{fifo}"], ["image", "{fifo}", "{out}"], ["save", "{fifo}", "{out}"]])
def test_fifo_without_writer_is_refused_not_waited_on(argv, run_cli, tmp_path):
    fifo, out = tmp_path / "fifo", tmp_path / "out"
    os.mkfifo(fifo)
    proc = run_cli(*[a.format(fifo=fifo, out=out) for a in argv], timeout=30)
    status(proc, 5, "fifo", "not a regular file")
    assert not out.exists()


# --- images refused by what their headers say --------------------------------------------------------------------


def test_sector_past_2_to_63_bytes_is_an_image_error(run_cli, tmp_path):
    image = bytearray((FIXTURES / "fsA-fsaware-v5.ndz").read_bytes())
    h = decode(bytes(image[:HEADER_AREA]), 0)
    image[:HEADER_AREA] = encode(replace(h, last_sector=(1 << 55)))
    src = tmp_path / "huge.ndz"
    src.write_bytes(bytes(image))
    out = tmp_path / "out.img"
    status(run_cli("image", src, out), 3, "chunk 0", "2^63")
    status(run_cli("image", "-", out, input=bytes(image)), 3, "chunk 0", "2^63")
    assert not out.exists()


def _bomb(claimed_sectors: int, inflated: int) -> bytes:
    """One V3 chunk whose header claims `claimed_sectors` sectors and whose zlib stream inflates to `inflated`."""
    deflater = zlib.compressobj(9)
    block = bytes(1 << 20)
    stream = b"".join(deflater.compress(block) for _ in range(inflated >> 20)) + deflater.flush()
    header = ChunkHeader(3, "zlib", len(stream), 0, ((0, claimed_sectors),), first_sector=0, last_sector=claimed_sectors)
    chunk = encode(header) + stream
    return chunk + bytes(CHUNK_SIZE - len(chunk))


def test_zip_bomb_is_refused_in_bounded_memory(cli_command, tmp_path):
    """512 bytes claimed, 900 MiB inside: under a 700 MiB address-space limit, a clean image error, not a
    MemoryError (or 2 GiB of RSS without the limit)."""
    src = tmp_path / "bomb.ndz"
    src.write_bytes(_bomb(1, 900 << 20))
    out = tmp_path / "out.img"
    cmd = f"ulimit -v {700 << 10}; exec {shlex.join([*cli_command, 'image', str(src), str(out)])}"
    proc = subprocess.run(["sh", "-c", cmd], capture_output=True, timeout=120, cwd=ROOT)
    proc.err = proc.stderr.decode(errors="replace")
    status(proc, 3, "chunk 0", "more than the 512 bytes")
    assert not out.exists()


def test_a_failed_rename_at_the_end_of_a_save_is_one_error_and_no_part_file(tmp_path):
    """Sink.commit: the rename fails (DEST became a non-empty folder meanwhile): a DestinationError, not a raw
    OSError, and abort() afterwards neither closes the fd twice nor leaves DEST.part."""
    from agent.errors import DestinationError
    from agent.io.save import Sink

    dest = tmp_path / "x.ndz"
    sink = Sink(str(dest))
    sink.write(b"chunk" * 100)
    dest.mkdir()
    (dest / "keep").write_bytes(b"")
    with pytest.raises(DestinationError, match="x.ndz"):
        sink.commit()
    sink.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.ndz"]


def test_refused_files_do_not_leak_their_fd(tmp_path):
    from agent.errors import SourceError
    from agent.io.save import Disk
    from agent.io.sources import FileSource

    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        for make, path in ((FileSource, empty), (Disk, empty), (FileSource, tmp_path), (Disk, "/dev/null")):
            with pytest.raises(SourceError):
                make(str(path))
    assert len(os.listdir("/proc/self/fd")) == before
