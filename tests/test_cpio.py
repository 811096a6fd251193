"""staticbuild.cpio (the build side, csrc/staticbuild): archives written here are read back with GNU cpio (listing and extraction)."""

from __future__ import annotations

import io
import os
import shutil
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from staticbuild import BuildError
from staticbuild.cpio import HEADER_SIZE, CpioError, CpioWriter

ROOT = os.geteuid() == 0


@pytest.fixture(scope="session")
def gnu_cpio() -> str:
    exe = shutil.which("cpio")
    if exe is None and ROOT and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "cpio"], capture_output=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        exe = shutil.which("cpio")
    if exe is None:
        pytest.fail("GNU cpio is needed for these tests: apt-get install cpio")
    return exe


def build(fn, **kw) -> bytes:
    out = io.BytesIO()
    with CpioWriter(out, **kw) as w:
        fn(w)
    return out.getvalue()


def cpio_list(gnu_cpio, archive: bytes, verbose=False) -> list[str]:
    proc = subprocess.run([gnu_cpio, "-itvn" if verbose else "-it", "--quiet"], input=archive, capture_output=True,
                          check=True)
    return proc.stdout.decode().splitlines()


def cpio_extract(gnu_cpio, archive: bytes, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [gnu_cpio, "-idm", "--quiet", "--no-absolute-filenames"],
        input=archive, cwd=dest, capture_output=True, check=True,
    )


def parse(archive: bytes) -> list[dict]:
    """A small strict newc reader: checks magic, alignment and the trailer; returns the entries."""
    entries, off = [], 0
    while True:
        assert off % 4 == 0, off
        assert archive[off : off + 6] == b"070701", (off, archive[off : off + 6])
        vals = [int(archive[off + 6 + 8 * i : off + 14 + 8 * i], 16) for i in range(13)]
        keys = "ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check".split()
        e = dict(zip(keys, vals))
        name_end = off + HEADER_SIZE + e["namesize"]
        assert archive[name_end - 1] == 0
        e["name"] = archive[off + HEADER_SIZE : name_end - 1].decode()
        data_at = (name_end + 3) & ~3
        assert archive[name_end:data_at] == b"\0" * (data_at - name_end)
        e["data"] = archive[data_at : data_at + e["filesize"]]
        off = (data_at + e["filesize"] + 3) & ~3
        assert archive[data_at + e["filesize"] : off] == b"\0" * (off - data_at - e["filesize"])
        if e["name"] == "TRAILER!!!":
            assert off == len(archive)
            return entries
        entries.append(e)


def test_exact_bytes_of_one_file():
    archive = build(lambda w: w.add_file("a", b"xyz", 0o640))
    head = b"070701" + b"".join(b"%08X" % v for v in (1, 0o100640, 0, 0, 1, 0, 3, 0, 0, 0, 0, 2, 0))
    assert archive[:112] == head + b"a\0"  # 110 + 2 bytes of name: aligned, no padding
    assert archive[112:116] == b"xyz\0"  # 3 bytes of data, 1 of padding
    trailer = b"070701" + b"".join(b"%08X" % v for v in (0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 11, 0))
    assert archive[116:] == trailer + b"TRAILER!!!\0" + b"\0\0\0"
    assert len(archive) % 4 == 0


def test_gnu_cpio_extracts_everything(gnu_cpio, tmp_path):
    big = os.urandom(3 * 1024 * 1024 + 5)

    def fill(w):
        w.add_dir("bin")
        w.add_file("bin/tool", b"#!/bin/sh\necho hi\n", 0o755)
        w.add_dir("etc", 0o750)
        w.add_file("etc/secret", b"s3cret", 0o600)
        w.add_file("etc/empty", b"")
        w.add_file_from("big", io.BytesIO(big), len(big), 0o444)
        w.add_symlink("sh", "bin/tool")
        w.add_symlink("etc/abs", "/nonexistent/target")
        w.add_file("suid", b"x", 0o4755)
        w.add_dir("tmp", 0o1777)

    archive = build(fill)
    assert cpio_list(gnu_cpio, archive) == [
        "bin", "bin/tool", "etc", "etc/secret", "etc/empty", "big", "sh", "etc/abs", "suid", "tmp",
    ]
    dest = tmp_path / "x"
    old = os.umask(0)
    try:
        cpio_extract(gnu_cpio, archive, dest)
    finally:
        os.umask(old)
    assert (dest / "bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (dest / "etc/secret").read_bytes() == b"s3cret"
    assert (dest / "etc/empty").read_bytes() == b""
    assert (dest / "big").read_bytes() == big
    assert os.readlink(dest / "sh") == "bin/tool"
    assert os.readlink(dest / "etc/abs") == "/nonexistent/target"
    modes = {n: stat.S_IMODE(os.lstat(dest / n).st_mode) for n in
             ("bin", "bin/tool", "etc", "etc/secret", "etc/empty", "big", "suid", "tmp")}
    assert modes == {"bin": 0o755, "bin/tool": 0o755, "etc": 0o750, "etc/secret": 0o600, "etc/empty": 0o644,
                     "big": 0o444, "suid": 0o4755, "tmp": 0o1777}
    assert os.stat(dest / "big").st_mtime == 0  # -m keeps our mtime 0
    if ROOT:
        assert os.stat(dest / "etc/secret").st_uid == 0


def test_owner_and_mtime(gnu_cpio):
    archive = build(lambda w: (w.add_file("f", b"1", uid=1000, gid=100, mtime=86400 * 365),
                               w.add_file("g", b"2")), uid=7, gid=8)
    lines = cpio_list(gnu_cpio, archive, verbose=True)
    assert "1000" in lines[0].split()[2] and lines[0].split()[3] == "100" and "1971" in lines[0]
    assert lines[1].split()[2:4] == ["7", "8"] and "1970" in lines[1]
    e = parse(archive)
    assert (e[0]["uid"], e[0]["gid"], e[0]["mtime"]) == (1000, 100, 86400 * 365)


def test_device_nodes(gnu_cpio, tmp_path):
    def fill(w):
        w.add_dir("dev")
        w.add_device("dev/console", "c", 5, 1, 0o600)
        w.add_device("dev/null", "c", 1, 3, 0o666)
        w.add_device("dev/sda1", "b", 8, 1, 0o660, gid=6)
        w.add_device("dev/big", "b", 259, 70000)
        w.add_fifo("dev/initctl", 0o600)

    archive = build(fill)
    lines = cpio_list(gnu_cpio, archive, verbose=True)
    got = {line.split()[-1]: line.split() for line in lines}
    assert got["dev/console"][0] == "crw-------" and got["dev/console"][4:6] == ["5,", "1"]
    assert got["dev/null"][0] == "crw-rw-rw-" and got["dev/null"][4:6] == ["1,", "3"]
    assert got["dev/sda1"][0] == "brw-rw----" and got["dev/sda1"][4:6] == ["8,", "1"]
    assert got["dev/big"][4:6] == ["259,", "70000"]
    assert got["dev/initctl"][0] == "prw-------"
    e = {x["name"]: x for x in parse(archive)}
    assert (e["dev/sda1"]["rdevmajor"], e["dev/sda1"]["rdevminor"]) == (8, 1)
    assert e["dev/sda1"]["mode"] == stat.S_IFBLK | 0o660 and e["dev/sda1"]["gid"] == 6
    if ROOT:  # mknod needs root
        dest = tmp_path / "x"
        cpio_extract(gnu_cpio, archive, dest)
        st = os.lstat(dest / "dev/sda1")
        assert stat.S_ISBLK(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (8, 1)
        st = os.lstat(dest / "dev/null")
        assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3)
        assert stat.S_ISFIFO(os.lstat(dest / "dev/initctl").st_mode)


def test_padding_every_length_mod_4(gnu_cpio, tmp_path):
    """Names of 1..9 characters (namesize 2..10) crossed with file sizes 0..9, and symlink targets 1..9."""
    contents = {}

    def fill(w):
        for n in range(1, 10):
            for size in range(10):
                name = ("n" * n) + f".{size}" if n > 1 else chr(ord("a") + size)
                data = bytes((i * 7 + n) % 251 + 1 for i in range(size))
                w.add_file(name, data)
                contents[name] = data
            target = "t" * n
            w.add_symlink(f"l{n}", target)
        w.add_dir("dirs")
        for n in range(1, 6):
            w.add_dir("dirs/" + "x" * n)

    archive = build(fill)
    entries = parse(archive)  # checks every offset is 4-aligned and the padding is zeros
    assert len(entries) == len(contents) + 9 + 6
    assert [e["ino"] for e in entries] == list(range(1, len(entries) + 1))
    names = cpio_list(gnu_cpio, archive)
    assert names == [e["name"] for e in entries]
    dest = tmp_path / "x"
    cpio_extract(gnu_cpio, archive, dest)
    for name, data in contents.items():
        assert (dest / name).read_bytes() == data, name
    for n in range(1, 10):
        assert os.readlink(dest / f"l{n}") == "t" * n


def make_tree(base: Path, order: list[str]) -> None:
    base.mkdir()
    for name in order:
        p = base / name
        if name.endswith("/"):
            p.mkdir()
        elif name.startswith("link"):
            p.symlink_to("../target")
        else:
            p.write_bytes(name.encode() * 3)


def test_add_tree_reproducible(gnu_cpio, tmp_path):
    names = ["b/", "a/", "a/z", "a/y", "Z", "link", "b/c/", "b/c/d", "a/link2", "é"]
    make_tree(tmp_path / "one", names)
    make_tree(tmp_path / "two", ["a/", "b/", "b/c/"] + [n for n in reversed(names) if not n.endswith("/")])
    os.chmod(tmp_path / "two" / "a" / "z", 0o600)
    os.chmod(tmp_path / "one" / "a" / "z", 0o600)
    os.utime(tmp_path / "two" / "Z", (12345, 12345))
    one = build(lambda w: w.add_tree(tmp_path / "one"))
    two = build(lambda w: w.add_tree(tmp_path / "two"))
    assert one == two
    assert one == build(lambda w: w.add_tree(tmp_path / "one"))
    assert cpio_list(gnu_cpio, one) == ["Z", "a", "a/link2", "a/y", "a/z", "b", "b/c", "b/c/d", "link", "é"]
    e = {x["name"]: x for x in parse(one)}
    assert e["a/z"]["mode"] == stat.S_IFREG | 0o600
    assert stat.S_ISLNK(e["link"]["mode"]) and e["link"]["data"] == b"../target"
    assert all(x["mtime"] == 0 and x["uid"] == 0 and x["gid"] == 0 for x in e.values())
    kept = {x["name"]: x for x in parse(build(lambda w: w.add_tree(tmp_path / "two", keep_mtime=True)))}
    assert kept["Z"]["mtime"] == 12345


def test_add_tree_prefix_and_hard_links(gnu_cpio, tmp_path):
    src = tmp_path / "src"
    src.mkdir(mode=0o700)
    os.chmod(src, 0o700)
    (src / "f").write_bytes(b"data")
    os.link(src / "f", src / "g")
    os.mkfifo(src / "p")

    def fill(w):
        w.add_dir("usr")
        w.add_tree(src, "usr/lib/mods")

    archive = build(fill)
    e = {x["name"]: x for x in parse(archive)}
    assert list(e) == ["usr", "usr/lib", "usr/lib/mods", "usr/lib/mods/f", "usr/lib/mods/g", "usr/lib/mods/p"]
    assert e["usr/lib"]["mode"] == stat.S_IFDIR | 0o755
    assert e["usr/lib/mods"]["mode"] == stat.S_IFDIR | 0o700
    assert e["usr/lib/mods/f"]["data"] == e["usr/lib/mods/g"]["data"] == b"data"
    assert e["usr/lib/mods/f"]["nlink"] == e["usr/lib/mods/g"]["nlink"] == 1  # separate copies
    assert e["usr/lib/mods/f"]["ino"] != e["usr/lib/mods/g"]["ino"]
    dest = tmp_path / "x"
    cpio_extract(gnu_cpio, archive, dest)
    assert (dest / "usr/lib/mods/g").read_bytes() == b"data"
    assert stat.S_ISFIFO(os.lstat(dest / "usr/lib/mods/p").st_mode)


def test_add_tree_refuses_sockets(tmp_path):
    src = tmp_path / "s"
    src.mkdir()
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(src / "sock"))
        with pytest.raises(CpioError, match="cannot archive"):
            build(lambda w: w.add_tree(src))
    finally:
        s.close()


def test_writes_incrementally():
    class Recorder(io.RawIOBase):
        def __init__(self):
            self.sizes, self.total = [], 0

        def writable(self):
            return True

        def write(self, b):
            self.sizes.append(len(b))
            self.total += len(b)
            return len(b)

    class Source(io.RawIOBase):  # 5 MiB of zeros, never materialised
        left = 5 << 20

        def readable(self):
            return True

        def read(self, n=-1):
            n = min(n, self.left)
            self.left -= n
            return bytes(n)

    out = Recorder()
    w = CpioWriter(out)
    w.add_file_from("big", Source(), 5 << 20)
    w.close()
    assert max(out.sizes) <= 1 << 20
    assert out.total == w.offset == 116 + (5 << 20) + 124


def test_errors():
    w = CpioWriter(io.BytesIO())
    w.add_dir("a")
    w.add_file("a/f", b"")
    for bad, msg in [
        (lambda: w.add_file("a/f", b""), "already in the archive"),
        (lambda: w.add_file("nodir/f", b""), "parent directory .* not in the archive"),
        (lambda: w.add_file("a/f/g", b""), "parent directory .* not in the archive"),
        (lambda: w.add_file("../etc", b""), r"'\.\.' component"),
        (lambda: w.add_file("a//b", b""), "empty"),
        (lambda: w.add_file("", b""), "empty entry name"),
        (lambda: w.add_file("TRAILER!!!", b""), "reserved"),
        (lambda: w.add_file("m", b"", 0o170644), "bits beyond"),
        (lambda: w.add_device("d", "x", 1, 1), "'c' or 'b'"),
        (lambda: w.add_device("d", "c", 1, 1 << 32), "32 bits"),
        (lambda: w.add_symlink("s", ""), "bad symlink target"),
        (lambda: w.add_file_from("short", io.BytesIO(b"abc"), 10), "7 bytes short of 10"),
    ]:
        with pytest.raises(CpioError, match=msg) as info:
            bad()
        assert isinstance(info.value, BuildError) and "\n" not in str(info.value)
    w.close()
    with pytest.raises(CpioError, match="closed"):
        w.add_dir("b")


def test_leading_slash_and_dot_are_dropped():
    entries = parse(build(lambda w: (w.add_dir("/etc"), w.add_file("./etc/x", b"1"))))
    assert [e["name"] for e in entries] == ["etc", "etc/x"]


def test_no_trailer_after_exception():
    out = io.BytesIO()
    with pytest.raises(RuntimeError):
        with CpioWriter(out) as w:
            w.add_file("f", b"1")
            raise RuntimeError
    assert b"TRAILER!!!" not in out.getvalue()
