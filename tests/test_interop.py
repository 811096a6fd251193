"""Interoperability with the REAL Emulab tools: our images through imageunzip/imagedump, imagezip's images through ours.

The real binaries are named by environment variables; a test that needs one is skipped when it is not given:

    NODEAGENT_IMAGEZIP=/opt/emulab-bin/imagezip NODEAGENT_IMAGEUNZIP=/opt/emulab-bin/imageunzip \
    NODEAGENT_IMAGEDUMP=/opt/emulab-bin/imagedump python3 -m pytest -q tests/test_interop.py

What the real tools do that the tests work around:
- `imageunzip IMG OUT` opens a regular OUT with O_TRUNC and writes only the image's regions, so OUT ends at the
  last written sector: it is truncated back up to the disk size (a zero tail) before comparing or mounting.
  `imageunzip -z` is never used (it writes far past the end of a regular file).
- `imagezip` refuses ext4 with the `64bit` feature: disks for it are made with `mkfs.ext4 -O ^64bit`.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.ndz.header import CHUNK_SIZE, SECTOR, ChunkHeader, decode
from conftest import FIXTURES, MANIFEST, needs_root
from fs_helpers import (
    MIB,
    e2fsck_clean,
    extract,
    fill_mounted,
    make_file,
    mounted,
    partition,
    run,
    sfdisk_dump,
    tree_digest,
    write_junk,
)

# --- the real tools ------------------------------------------------------------------------------------


def _real_tool(variable: str, name: str):
    @pytest.fixture(scope="session")  # session scope: set up (or skipped) before any disk is built
    def tool() -> str:
        path = os.environ.get(variable, "")
        if not path:
            pytest.skip(f"{variable} is not set: no real Emulab {name} to test against")
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            pytest.skip(f"{variable}={path!r} is not an executable file: no real Emulab {name} to test against")
        return path

    return tool


imagezip = _real_tool("NODEAGENT_IMAGEZIP", "imagezip")
imageunzip = _real_tool("NODEAGENT_IMAGEUNZIP", "imageunzip")
imagedump = _real_tool("NODEAGENT_IMAGEDUMP", "imagedump")


def real_imagezip(tool: str, disk: Path, image: Path, *flags: str) -> Path:
    image.unlink(missing_ok=True)
    run(tool, *flags, disk, image)
    return image


def real_imageunzip(tool: str, image: Path, out: Path, size: int) -> Path:
    """Restore with the real imageunzip onto a zeroed file of `size` bytes; the result is `size` bytes long."""
    out.unlink(missing_ok=True)
    make_file(out, size)
    run(tool, image, out)
    written = out.stat().st_size
    assert written <= size, f"real imageunzip wrote {written} bytes into {out.name}, past the disk's {size}"
    os.truncate(out, size)  # it truncates the file and stops at the last sector it wrote
    return out


def our_image(run_cli, image: Path, out: Path, size: int) -> Path:
    """Restore with our `nodeagent image` onto a zeroed file of `size` bytes."""
    out.unlink(missing_ok=True)
    make_file(out, size)
    proc = run_cli("image", image, out, check=True)
    assert "Wrote" in proc.err
    assert out.stat().st_size == size, f"nodeagent image changed {out.name}'s size to {out.stat().st_size}"
    return out


def our_save(run_cli, disk: Path, image: Path, *flags: str) -> Path:
    image.unlink(missing_ok=True)
    proc = run_cli("save", *flags, disk, image, check=True)
    assert "Saved" in proc.err
    return image


# --- reading images and their descriptions -------------------------------------------------------------


def headers(image: Path) -> list[ChunkHeader]:
    data = image.read_bytes()
    assert len(data) % CHUNK_SIZE == 0, f"{image.name} is {len(data)} bytes, not whole 1 MiB chunks"
    return [decode(data[i : i + 4096], i // CHUNK_SIZE) for i in range(0, len(data), CHUNK_SIZE)]


def data_sectors(image: Path) -> int:
    return sum(count for h in headers(image) for _, count in h.regions)


def imagedump_summary(tool: str, image: Path) -> dict:
    """What the real `imagedump -d` says of an image, in a form our `info` can be compared with."""
    proc = run(tool, "-d", image, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"real imagedump rejected {image.name} ({proc.returncode}):\n{out}"
    head = re.search(r": \d+ bytes, (\d+) chunks, version (\d+)", out)
    covered = re.search(r"covered sector range: \[(\d+)-(\d+)\]", out)
    compressed = re.search(r"(\d+) bytes of compressed data", out)
    allocated = re.search(r"compression of allocated data \((\d+) bytes\)", out)
    assert head and covered and compressed and allocated, f"unexpected imagedump output:\n{out}"
    chunks = re.findall(r"Chunk (\d+): (\d+) compressed bytes, sector range \[(\d+)-(\d+)\], (\d+) regions", out)
    return {
        "chunks": int(head.group(1)),
        "versions": [int(head.group(2))],
        "covered": (int(covered.group(1)), int(covered.group(2))),
        "compressed_bytes": int(compressed.group(1)),
        "data_bytes": int(allocated.group(1)),
        "per_chunk": [tuple(map(int, c)) for c in chunks],
    }


def info_summary(run_cli, image: Path) -> dict:
    """What our `nodeagent info` says of an image, in the same form."""
    out = run_cli("info", image, check=True).out
    head = re.search(r": (\d+) chunks, (V\d+(?:, V\d+)*), \S+, covered sector range \[(\d+)-(\d+)\]", out)
    total = re.search(r"^total: (\d+) data bytes .* in (\d+) compressed bytes", out, re.M)
    assert head and total, f"unexpected nodeagent info output:\n{out}"
    chunks = re.findall(r"^chunk (\d+): V\d+ \w+, (\d+) compressed bytes, sectors \[(\d+)-(\d+)\], (\d+) regions", out, re.M)
    return {
        "chunks": int(head.group(1)),
        "versions": [int(v) for v in re.findall(r"V(\d+)", head.group(2))],
        "covered": (int(head.group(3)), int(head.group(4))),
        "compressed_bytes": int(total.group(2)),
        "data_bytes": int(total.group(1)),
        "per_chunk": [tuple(map(int, c)) for c in chunks],
    }


def assert_info_matches_imagedump(run_cli, tool: str, image: Path) -> dict:
    ours, real = info_summary(run_cli, image), imagedump_summary(tool, image)
    assert ours == real, f"{image.name}: nodeagent info {ours} != real imagedump {real}"
    return ours


# --- comparing restores --------------------------------------------------------------------------------


def assert_same_bytes(a: Path, b: Path, image: Path, what: str) -> None:
    """a and b are byte-identical; otherwise fail naming the first differing byte, its sector and chunk."""
    size_a, size_b = a.stat().st_size, b.stat().st_size
    assert size_a == size_b, f"{what}: {a.name} is {size_a} bytes, {b.name} is {size_b}"
    first, bad_sectors = None, 0
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for offset in range(0, size_a, MIB):
            pa, pb = fa.read(MIB), fb.read(MIB)
            if pa == pb:
                continue
            for s in range(0, len(pa), SECTOR):
                if pa[s : s + SECTOR] != pb[s : s + SECTOR]:
                    bad_sectors += 1
                    if first is None:
                        first = offset + s + next(i for i in range(SECTOR) if pa[s + i] != pb[s + i])
    if first is None:
        return
    sector = first // SECTOR
    where = "outside every chunk's sector range"
    for h in headers(image):
        if h.first_sector is not None and h.first_sector <= sector < h.last_sector:
            region = next((r for r in h.regions if r[0] <= sector < r[0] + r[1]), None)
            where = f"chunk {h.index}, " + (f"region [{region[0]}-{region[0] + region[1] - 1}]" if region else "in no region")
            break
    pytest.fail(
        f"{what}: {a.name} and {b.name} differ first at byte {first} (sector {sector}, {where} of {image.name}); "
        f"{bad_sectors} sectors differ in all"
    )


def same_file(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            pa, pb = fa.read(MIB), fb.read(MIB)
            if pa != pb:
                return False
            if not pa:
                return True


# --- the disks -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Disk:
    name: str
    path: Path
    fs: tuple[int, int]  # byte offset and size of the ext4 filesystem on it
    mbr: bool = False

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def build_ext4(workdir: Path, name: str, *features: str) -> Disk:
    disk = make_file(workdir / f"{name}.img", 64 * MIB)
    run("mkfs.ext4", "-q", "-F", *(["-O", ",".join(features)] if features else []), disk)
    with mounted(disk) as root:
        fill_mounted(root, random.Random(name))
    return Disk(name, disk, (0, 64 * MIB))


def build_mbr(workdir: Path, name: str) -> Disk:
    """96 MiB MBR disk: an ext4 (without 64bit, for imagezip), a swap partition, junk in the unpartitioned tail."""
    disk = make_file(workdir / f"{name}.img", 96 * MIB)
    parts = partition(disk, "label: dos\nstart=2048, size=98304, type=83\nstart=100352, size=16384, type=82\n")
    (p1, p2) = [(p["start"] * SECTOR, p["size"] * SECTOR) for p in parts]
    run("mkfs.ext4", "-q", "-F", "-O", "^64bit", "-E", f"offset={p1[0]}", disk, f"{p1[1] // 1024}k")
    with mounted(disk, p1[0], p1[1]) as root:
        fill_mounted(root, random.Random(name))
    swap = make_file(workdir / "swap.img", p2[1])
    run("mkswap", "-q", swap)
    subprocess.run(
        ["dd", f"if={swap}", f"of={disk}", "bs=1M", f"seek={p2[0]}", "oflag=seek_bytes", "conv=notrunc", "status=none"],
        check=True,
    )
    swap.unlink()
    write_junk(disk, p2[0] + p2[1] + MIB, 4 * MIB, random.Random(name + " tail"))
    return Disk(name, disk, p1, mbr=True)


BUILDERS = {
    "ext4": lambda d: build_ext4(d, "ext4", "^64bit"),  # what the real imagezip can read
    "ext4-64bit": lambda d: build_ext4(d, "ext4-64bit"),  # Debian's default: only we can save it
    "mbr": lambda d: build_mbr(d, "mbr"),
}


@pytest.fixture(scope="module")
def disks(tmp_path_factory):
    """disks(name) -> Disk, each built once per module, on first use."""
    built: dict[str, Disk] = {}

    def get(name: str) -> Disk:
        if name not in built:
            built[name] = BUILDERS[name](tmp_path_factory.mktemp(name))
        return built[name]

    return get


def check_filesystem(disk: Disk, restored: Path, tmp_path: Path) -> None:
    """The restored disk's ext4 is clean and holds the source's files (and the same partition table)."""
    offset, size = disk.fs
    if disk.mbr:
        assert sfdisk_dump(restored) == sfdisk_dump(disk.path)
        e2fsck_clean(extract(restored, offset, size, tmp_path / "fs-check.img"))
    else:
        e2fsck_clean(restored)
    with mounted(disk.path, offset, size, readonly=True) as a, mounted(restored, offset, size, readonly=True) as b:
        assert tree_digest(a) == tree_digest(b)


# --- 1. our images through the real imageunzip and imagedump -------------------------------------------


@needs_root
@pytest.mark.parametrize(
    "kind,flags",
    [
        *((kind, flags) for kind in ("ext4", "ext4-64bit", "mbr") for flags in ((), ("--v5",), ("-z", "9"))),
        ("ext4", ("-r",)),
        ("mbr", ("-r",)),
    ],
    ids=lambda v: " ".join(v) or "default" if isinstance(v, tuple) else v,
)
def test_our_image_restored_by_real_imageunzip(kind, flags, disks, tmp_path, run_cli, imageunzip, imagedump):
    disk = disks(kind)
    image = our_save(run_cli, disk.path, tmp_path / "ours.ndz", *flags)
    expected_version = 5 if "--v5" in flags else 3
    assert {(h.version, h.codec) for h in headers(image)} == {(expected_version, "zlib")}

    real = real_imageunzip(imageunzip, image, tmp_path / "real-restore.img", disk.size)
    ours = our_image(run_cli, image, tmp_path / "our-restore.img", disk.size)
    assert_same_bytes(real, ours, image, "real imageunzip vs nodeagent image of our image")
    if "-r" in flags:
        assert_same_bytes(real, disk.path, image, "real imageunzip of our raw image vs the source disk")
    check_filesystem(disk, real, tmp_path)

    summary = assert_info_matches_imagedump(run_cli, imagedump, image)
    assert summary["versions"] == [expected_version]
    assert summary["covered"] == (0, disk.size // SECTOR - 1)


def test_odd_sized_raw_image_restored_by_real_imageunzip(tmp_path, run_cli, imageunzip):
    """A source that is not whole sectors: our SHORTSECTOR relocation makes the real imageunzip stop at its end."""
    source = tmp_path / "odd.bin"
    source.write_bytes(random.Random(8).randbytes(1_300_000))
    image = our_save(run_cli, source, tmp_path / "odd.ndz", "-r")
    out = tmp_path / "odd.out"
    run(imageunzip, image, out)
    assert out.stat().st_size == 1_300_000
    assert same_file(out, source), "real imageunzip's restore of our odd-sized raw image differs from the source"


# --- 2. the real imagezip's images through ours --------------------------------------------------------


@needs_root
@pytest.mark.parametrize(
    "kind,flags",
    [
        ("ext4", ("-l",)),
        ("ext4", ("-l", "-5")),
        ("mbr", ()),
        ("mbr", ("-5",)),
        ("ext4", ("-r",)),
        ("mbr", ("-r",)),
    ],
    ids=lambda v: " ".join(v) or "whole-disk" if isinstance(v, tuple) else v,
)
def test_real_imagezip_image_restored_by_us(kind, flags, disks, tmp_path, run_cli, imagezip, imageunzip, imagedump):
    disk = disks(kind)
    image = real_imagezip(imagezip, disk.path, tmp_path / "real.ndz", *flags)
    assert {h.version for h in headers(image)} == {5 if "-5" in flags else 3}

    ours = our_image(run_cli, image, tmp_path / "our-restore.img", disk.size)
    real = real_imageunzip(imageunzip, image, tmp_path / "real-restore.img", disk.size)
    assert_same_bytes(ours, real, image, "nodeagent image vs real imageunzip of imagezip's image")
    if "-r" in flags:
        assert_same_bytes(ours, disk.path, image, "nodeagent image of imagezip's raw image vs the source disk")
    check_filesystem(disk, ours, tmp_path)
    assert_info_matches_imagedump(run_cli, imagedump, image)


# --- 3. our zstd extension is refused cleanly ----------------------------------------------------------


@pytest.mark.parametrize("flags", [("--zstd",), ("--zstd", "--v5")], ids=" ".join)
@pytest.mark.parametrize("precreated", [False, True], ids=["new-output", "zeroed-output"])
def test_real_imageunzip_refuses_our_zstd_image(flags, precreated, tmp_path, run_cli, imageunzip):
    disk = make_file(tmp_path / "disk.img", 32 * MIB)
    run("mkfs.ext4", "-q", "-F", "-O", "^64bit", disk)
    write_junk(disk, 20 * MIB, MIB, random.Random(9))  # something besides metadata, in case it counts as used
    image = our_save(run_cli, disk, tmp_path / "zstd.ndz", *flags)
    assert {h.codec for h in headers(image)} == {"zstd"}

    out = tmp_path / "out.img"
    if precreated:
        make_file(out, 32 * MIB)
    proc = run(imageunzip, image, out, check=False)
    said = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"real imageunzip accepted a zstd image:\n{said}"
    assert "magic" in said.lower(), f"real imageunzip failed, but not about the magic:\n{said}"
    if out.exists():
        size = out.stat().st_size
        assert size <= 32 * MIB, f"real imageunzip grew the output to {size} bytes"
        with open(out, "rb") as f:
            while piece := f.read(MIB):
                assert not piece.strip(b"\0"), "real imageunzip wrote data from a zstd image"


# --- 4. our filesystem-aware images are as small as imagezip's -----------------------------------------


@needs_root
@pytest.mark.parametrize("kind,real_flags", [("ext4", ("-l",)), ("mbr", ())], ids=["bare-ext4", "mbr"])
def test_image_sizes_match_imagezip(kind, real_flags, disks, tmp_path, run_cli, imagezip):
    disk = disks(kind)
    ours = our_save(run_cli, disk.path, tmp_path / "ours.ndz")
    real = real_imagezip(imagezip, disk.path, tmp_path / "real.ndz", *real_flags)
    our_sectors, real_sectors = data_sectors(ours), data_sectors(real)
    assert abs(our_sectors - real_sectors) <= 0.03 * real_sectors, (
        f"we image {our_sectors} sectors, the real imagezip {real_sectors}"
    )
    assert ours.stat().st_size <= real.stat().st_size + CHUNK_SIZE, (
        f"our image is {ours.stat().st_size} bytes, imagezip's {real.stat().st_size}"
    )


# --- 5. `nodeagent info` agrees with imagedump on the imagezip fixtures --------------------------------


FIXTURE_IMAGES = {name: image for fixture in MANIFEST["fixtures"].values() for name, image in fixture["images"].items()}


@pytest.mark.parametrize("name", sorted(FIXTURE_IMAGES))
def test_info_of_fixtures_matches_real_imagedump(name, run_cli, imagedump):
    summary = assert_info_matches_imagedump(run_cli, imagedump, FIXTURES / name)
    expected = FIXTURE_IMAGES[name]
    assert summary["chunks"] == expected["chunks"]
    assert summary["versions"] == [expected["version"]]
    assert list(summary["covered"]) == expected["covered_sectors"]
    assert summary["data_bytes"] == expected["allocated_bytes"]
