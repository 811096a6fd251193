"""Helpers for tests/test_fs.py: make real filesystems and partitioned disks in files, fill them, scan them,
and copy only the scanned ranges into a fresh zero-filled file."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

from agent.fs import SECTOR, DiskMap, scan_disk

MIB = 1 << 20
MTOOLS_ENV = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}  # mtools refuses some valid geometries without it

_HERE = Path(__file__).resolve().parent
MANIFEST_PATHS = (
    _HERE / "fixtures" / "imagezip" / "manifest.json",
    _HERE.parent.parent / "shared" / "fixtures" / "imagezip" / "manifest.json",
)


def run(*args, input: str | None = None, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], input=input, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc


def manifest() -> dict | None:
    for path in MANIFEST_PATHS:
        if path.exists():
            return json.loads(path.read_text())
    return None


# --- scanning and copying ------------------------------------------------------------------------------


def file_reader(fd: int):
    return lambda offset, size: os.pread(fd, size, offset)


def scan_file(path: Path) -> DiskMap:
    fd = os.open(path, os.O_RDONLY)
    try:
        return scan_disk(file_reader(fd), os.fstat(fd).st_size // SECTOR)
    finally:
        os.close(fd)


def copy_ranges(src: Path, dst: Path, ranges: list[tuple[int, int]]) -> None:
    """A new zero-filled file the size of src holding only src's sectors in `ranges`."""
    size = src.stat().st_size
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.truncate(size)
        for start, count in ranges:
            offset, left = start * SECTOR, count * SECTOR
            while left:
                piece = os.pread(fin.fileno(), min(left, 8 * MIB), offset)
                assert piece, "range beyond the source's end"
                os.pwrite(fout.fileno(), piece, offset)
                offset += len(piece)
                left -= len(piece)


def assert_well_formed(disk_map: DiskMap, disk_sectors: int) -> None:
    """Sorted, non-overlapping, merged, non-empty ranges inside the disk."""
    previous_end = -1
    for start, count in disk_map.ranges:
        assert count > 0 and start >= 0 and start + count <= disk_sectors, (start, count)
        assert start > previous_end, f"ranges overlap or are not merged at {start}"
        previous_end = start + count


def covered(ranges: list[tuple[int, int]], start: int, count: int) -> int:
    """How many of sectors [start, start+count) the ranges cover."""
    end = start + count
    return sum(max(0, min(e, end) - max(s, start)) for s, e in ((s, s + c) for s, c in ranges))


def sectors(ranges: list[tuple[int, int]]) -> int:
    return sum(count for _, count in ranges)


# --- building disks ------------------------------------------------------------------------------------


def make_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def write_junk(path: Path, offset: int, size: int, rng: random.Random) -> None:
    """Random bytes where nothing should be imaged from (gaps, tails, free space)."""
    with open(path, "r+b") as f:
        os.pwrite(f.fileno(), rng.randbytes(size), offset)


def copy_into(disk: Path, offset: int, src: Path) -> None:
    """Write a filesystem made in its own file into the disk file at byte `offset`, keeping holes."""
    with open(src, "rb") as fin, open(disk, "r+b") as fout:
        size = os.fstat(fin.fileno()).st_size
        pos = 0
        while pos < size:
            piece = os.pread(fin.fileno(), min(4 * MIB, size - pos), pos)
            if piece.strip(b"\0"):
                os.pwrite(fout.fileno(), piece, offset + pos)
            pos += len(piece)


def partition(disk: Path, script: str) -> list[dict]:
    """Partition the disk file with sfdisk; returns sfdisk's JSON list of partitions (start, size, type)."""
    run("sfdisk", "--no-reread", "--no-tell-kernel", "-q", disk, input=script)
    return json.loads(run("sfdisk", "-J", disk).stdout)["partitiontable"]["partitions"]


def sfdisk_dump(disk: Path) -> str:
    proc = run("sfdisk", "-d", disk)
    assert not proc.stderr.strip(), proc.stderr
    return proc.stdout.replace(str(disk), "DISK")


@contextlib.contextmanager
def mounted(image: Path, offset: int = 0, size: int | None = None, readonly: bool = False) -> Iterator[Path]:
    point = Path(tempfile.mkdtemp(prefix="fs-test-mnt-"))
    options = ["loop", f"offset={offset}"]
    if size is not None:
        options.append(f"sizelimit={size}")
    if readonly:
        options.append("ro")
    try:
        run("mount", "-o", ",".join(options), image, point)
        try:
            yield point
        finally:
            run("umount", point, check=False)
    finally:
        point.rmdir()


# --- filling filesystems -------------------------------------------------------------------------------


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fill_mounted(root: Path, rng: random.Random, junk_bytes: int = 3 * MIB) -> None:
    """Write junk and delete it (so free space holds old data), then a small tree of files."""
    junk = root / "junk.bin"
    _fsync_write(junk, rng.randbytes(junk_bytes))  # fsync: with delayed allocation it must reach the disk
    junk.unlink()
    os.sync()
    (root / "etc").mkdir()
    (root / "etc" / "hostname").write_text("node1.example.org\n")
    (root / "data").mkdir()
    (root / "data" / "random.bin").write_bytes(rng.randbytes(MIB + 12345))
    (root / "data" / "empty").write_bytes(b"")
    with open(root / "data" / "sparse.bin", "wb") as f:  # holes are not allocated: must still read back
        f.seek(5 * MIB)
        f.write(b"end of a sparse file")
    (root / "data" / "hostname-link").symlink_to("../etc/hostname")
    docs = root / "usr" / "share" / "doc"
    docs.mkdir(parents=True)
    for i in range(150):
        (docs / f"small-{i:03}.txt").write_bytes(rng.randbytes(7 * i + 1))
    os.sync()


def fill_like_manifest(root: Path, tree: dict, rng: random.Random) -> None:
    """What the imagezip fixtures were made of: 4 MiB written and deleted, then files of the manifest's
    sizes (random contents: only the allocation matters) and its symlinks."""
    _fsync_write(root / "junk.bin", rng.randbytes(4 * MIB))
    (root / "junk.bin").unlink()
    os.sync()
    for name, entry in sorted(tree.items()):
        path = root / name.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        if "symlink" in entry:
            path.symlink_to(entry["symlink"])
        else:
            path.write_bytes(rng.randbytes(entry["size"]))
    os.sync()


def tree_digest(root: Path) -> dict[str, str]:
    """{relative path: sha256 of contents, 'dir', or 'link -> target'} for everything under root."""
    tree = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "lost+found"]
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = str(full.relative_to(root))
            if full.is_symlink():
                tree[rel] = "link -> " + os.readlink(full)
            elif full.is_dir():
                tree[rel] = "dir"
            else:
                tree[rel] = hashlib.sha256(full.read_bytes()).hexdigest()
    return tree


def mtools_fill(image: Path, offset: int, rng: random.Random, workdir: Path) -> dict[str, str]:
    """Fill a FAT volume with mtools (no vfat in this kernel): junk written then deleted, a fragmented file,
    a few directories. Returns {path: sha256} of what stays."""
    target = f"{image}@@{offset}"

    def put(name: str, data: bytes) -> None:
        local = workdir / "upload.bin"
        local.write_bytes(data)
        run("mcopy", "-o", "-i", target, local, f"::{name}", env=MTOOLS_ENV)

    put("/JUNK.BIN", rng.randbytes(600 * 1024))
    put("/A.BIN", rng.randbytes(100 * 1024))
    put("/B.BIN", rng.randbytes(50 * 1024))
    run("mdel", "-i", target, "::/JUNK.BIN", "::/A.BIN", env=MTOOLS_ENV)
    files = {
        "/B.BIN": rng.randbytes(50 * 1024),
        "/FRAG.BIN": rng.randbytes(900 * 1024),  # fills the freed holes, so its chain is fragmented
        "/EMPTY.TXT": b"",
        "/DOCS/README.TXT": b"hello from a FAT volume\r\n",
        "/DOCS/DEEP/NESTED.BIN": rng.randbytes(9000),
    }
    run("mmd", "-i", target, "::/DOCS", "::/DOCS/DEEP", env=MTOOLS_ENV)
    for name, data in files.items():
        put(name, data)
    for i in range(40):  # enough entries for the root/dir to span several sectors
        name = f"/DOCS/F{i:03}.TXT"
        files[name] = rng.randbytes(i * 37)
        put(name, files[name])
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


def mtools_digest(image: Path, offset: int, names) -> dict[str, str]:
    out = {}
    for name in names:
        proc = subprocess.run(
            ["mcopy", "-n", "-i", f"{image}@@{offset}", f"::{name}", "-"], capture_output=True, env=MTOOLS_ENV
        )
        assert proc.returncode == 0, proc.stderr
        out[name] = hashlib.sha256(proc.stdout).hexdigest()
    return out


# --- checking ------------------------------------------------------------------------------------------


def extract(disk: Path, offset: int, size: int, dst: Path) -> Path:
    """Copy one partition out of a disk file (fsck tools take no offset)."""
    with open(disk, "rb") as fin, open(dst, "wb") as fout:
        fout.truncate(size)
        pos = 0
        while pos < size:
            piece = os.pread(fin.fileno(), min(8 * MIB, size - pos), offset + pos)
            if piece.strip(b"\0"):
                os.pwrite(fout.fileno(), piece, pos)
            pos += len(piece)
    return dst


def e2fsck_clean(image: Path) -> None:
    proc = run("e2fsck", "-fn", image, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def fsck_fat_clean(image: Path) -> str:
    proc = run("fsck.vfat", "-n", "-v", image, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def ext_used_blocks(image: Path) -> tuple[int, list[tuple[int, int]]]:
    """(block size, used block ranges) of an ext filesystem according to dumpe2fs, our oracle: libext2fs
    reads the bitmaps itself and works out BLOCK_UNINIT groups its own way."""
    out = run("dumpe2fs", image).stdout
    block_size = int(re.search(r"^Block size:\s+(\d+)", out, re.M).group(1))
    blocks = int(re.search(r"^Block count:\s+(\d+)", out, re.M).group(1))
    cluster = re.search(r"^Cluster size:\s+(\d+)", out, re.M)
    ratio = int(cluster.group(1)) // block_size if cluster else 1
    free = []
    for listing in re.findall(r"^\s+Free blocks: (.*)$", out, re.M):
        for item in filter(None, (x.strip() for x in listing.split(","))):
            first, _, last = item.partition("-")
            # With bigalloc, dumpe2fs names each free cluster by its first block.
            end = int(last or first) // ratio * ratio + ratio
            free.append((int(first), min(end, blocks)))
    used, cursor = [], 0
    for first, end in sorted(free):
        if first > cursor:
            used.append((cursor, first - cursor))
        cursor = max(cursor, end)
    if cursor < blocks:
        used.append((cursor, blocks - cursor))
    return block_size, used


def in_blocks(ranges: list[tuple[int, int]], block_size: int) -> list[tuple[int, int]]:
    per = block_size // SECTOR
    assert all(s % per == 0 and c % per == 0 for s, c in ranges), "ranges not block-aligned"
    return [(s // per, c // per) for s, c in ranges]


def dumpe2fs_group_flags(image: Path) -> list[str]:
    return re.findall(r"^Group \d+: .*$", run("dumpe2fs", image).stdout, re.M)
