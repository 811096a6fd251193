"""Save with our `save`, restore with our `image`, on real filesystems made by mkfs and sfdisk."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest

from agent.ndz.header import CHUNK_SIZE, decode
from conftest import loop_device, needs_root
from fs_helpers import (
    MIB,
    e2fsck_clean,
    extract,
    fill_mounted,
    fsck_fat_clean,
    make_file,
    mounted,
    mtools_digest,
    mtools_fill,
    partition,
    run,
    sfdisk_dump,
    tree_digest,
    write_junk,
)

pytestmark = needs_root


def ext4(path: Path, size: int, *features: str) -> Path:
    make_file(path, size)
    run("mkfs.ext4", "-q", "-F", *(["-O", ",".join(features)] if features else []), path)
    with mounted(path) as root:
        fill_mounted(root, random.Random(str(path)), junk_bytes=16 * MIB)
    return path


def image_versions(path: Path) -> set[tuple[int, str]]:
    data = path.read_bytes()
    return {(h.version, h.codec) for h in (decode(data[i : i + 4096], i) for i in range(0, len(data), CHUNK_SIZE))}


def save_and_restore(run_cli, disk: Path, tmp_path: Path, *flags: str, onto: Path | None = None) -> tuple[Path, Path]:
    image = tmp_path / "saved.ndz"
    proc = run_cli("save", *flags, disk, image, check=True)
    assert "Saved" in proc.err
    restored = onto or tmp_path / "restored.img"
    run_cli("image", image, restored, check=True)
    return image, restored


@pytest.mark.parametrize(
    "features,flags,expect",
    [
        ((), (), {(3, "zlib")}),  # Debian's default ext4 has 64bit: the real imagezip refuses it, we do not
        (("^64bit",), (), {(3, "zlib")}),
        ((), ("--v5",), {(5, "zlib")}),
        ((), ("--zstd",), {(3, "zstd")}),
        ((), ("-z", "9"), {(3, "zlib")}),
    ],
)
def test_bare_ext4(features, flags, expect, tmp_path, run_cli):
    disk = ext4(tmp_path / "disk.img", 64 * MIB, *features)
    image, restored = save_and_restore(run_cli, disk, tmp_path, *flags)
    assert image_versions(image) == expect
    assert restored.stat().st_size == disk.stat().st_size
    e2fsck_clean(restored)
    with mounted(disk, readonly=True) as a, mounted(restored, readonly=True) as b:
        assert tree_digest(a) == tree_digest(b)
    # Free space (16 MiB of deleted junk) is left out: much smaller than a raw image of the same disk.
    raw = tmp_path / "raw.ndz"
    run_cli("save", "-r", disk, raw, check=True)
    assert image.stat().st_size * 4 < raw.stat().st_size


def test_bare_fat32(tmp_path, run_cli):
    disk = make_file(tmp_path / "fat.img", 64 * MIB)
    run("mkfs.vfat", "-F", "32", "-s", "1", disk)
    files = mtools_fill(disk, 0, random.Random(5), tmp_path)
    _, restored = save_and_restore(run_cli, disk, tmp_path)
    fsck_fat_clean(restored)
    assert mtools_digest(restored, 0, files) == files


def test_mbr_disk_onto_a_dirty_loop_device(tmp_path, run_cli):
    """ext4 + swap + FAT16 in an MBR; restored without -z onto a device full of junk: filesystems still right."""
    disk = make_file(tmp_path / "disk.img", 96 * MIB)
    parts = partition(
        disk, "label: dos\nstart=2048, size=98304, type=83\nstart=100352, size=16384, type=82\nstart=116736, size=65536, type=6\n"
    )
    (p1, p2, p3) = [(p["start"] * 512, p["size"] * 512) for p in parts]
    run("mkfs.ext4", "-q", "-F", "-E", f"offset={p1[0]}", disk, f"{p1[1] // 1024}k")
    with mounted(disk, p1[0], p1[1]) as root:
        fill_mounted(root, random.Random(1))
    swap = make_file(tmp_path / "swap.img", p2[1])
    run("mkswap", "-q", swap)
    subprocess.run(["dd", f"if={swap}", f"of={disk}", "bs=1M", f"seek={p2[0]}", "oflag=seek_bytes", "conv=notrunc", "status=none"], check=True)
    fat = make_file(tmp_path / "fat.img", p3[1])
    run("mkfs.vfat", "-F", "16", fat)
    files = mtools_fill(fat, 0, random.Random(2), tmp_path)
    subprocess.run(["dd", f"if={fat}", f"of={disk}", "bs=1M", f"seek={p3[0]}", "oflag=seek_bytes", "conv=notrunc", "status=none"], check=True)
    write_junk(disk, 181 * MIB // 2 + 512 * 1024, 4 * MIB, random.Random(3))  # the unpartitioned tail

    target = tmp_path / "target.img"
    target.write_bytes(random.Random(4).randbytes(96 * MIB))
    with loop_device(target) as dev:
        image, _ = save_and_restore(run_cli, disk, tmp_path, onto=Path(dev))
    assert sfdisk_dump(target) == sfdisk_dump(disk)
    e2fsck_clean(extract(target, *p1, tmp_path / "p1.img"))
    with mounted(disk, p1[0], p1[1], readonly=True) as a, mounted(target, p1[0], p1[1], readonly=True) as b:
        assert tree_digest(a) == tree_digest(b)
    assert subprocess.run(["swaplabel", str(extract(target, *p2, tmp_path / "p2.img"))]).returncode == 0
    fat_back = extract(target, *p3, tmp_path / "p3.img")
    fsck_fat_clean(fat_back)
    assert mtools_digest(fat_back, 0, files) == files
    assert image.stat().st_size < 16 * MIB


def test_gpt_disk_from_a_block_device_through_pipes(tmp_path, run_cli):
    """GPT with ext4 + EFI FAT32; saved from a loop device to stdout, restored from stdin."""
    disk = make_file(tmp_path / "disk.img", 160 * MIB)
    parts = partition(
        disk,
        "label: gpt\nstart=2048, size=131072, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n"
        "start=133120, size=131072, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n",
    )
    (p1, p2) = [(p["start"] * 512, p["size"] * 512) for p in parts]
    fat = make_file(tmp_path / "efi.img", p1[1])
    run("mkfs.vfat", "-F", "32", "-s", "1", fat)
    files = mtools_fill(fat, 0, random.Random(6), tmp_path)
    subprocess.run(["dd", f"if={fat}", f"of={disk}", "bs=1M", f"seek={p1[0]}", "oflag=seek_bytes", "conv=notrunc", "status=none"], check=True)
    run("mkfs.ext4", "-q", "-F", "-E", f"offset={p2[0]}", disk, f"{p2[1] // 1024}k")
    with mounted(disk, p2[0], p2[1]) as root:
        fill_mounted(root, random.Random(7))

    with loop_device(disk) as dev:
        saved = run_cli("save", dev, "-", check=True)
    restored = tmp_path / "restored.img"
    run_cli("image", "-", restored, input=saved.stdout, check=True)
    assert restored.stat().st_size == disk.stat().st_size
    verify = run("sfdisk", "--verify", restored)
    assert "No errors detected" in verify.stdout and not verify.stderr.strip()
    assert sfdisk_dump(restored) == sfdisk_dump(disk)
    assert mtools_digest(extract(restored, *p1, tmp_path / "efi-back.img"), 0, files) == files
    e2fsck_clean(extract(restored, *p2, tmp_path / "root-back.img"))
    with mounted(disk, p2[0], p2[1], readonly=True) as a, mounted(restored, p2[0], p2[1], readonly=True) as b:
        assert tree_digest(a) == tree_digest(b)


def test_file_of_odd_size_round_trips_exactly(tmp_path, run_cli):
    """A source that is not a whole number of sectors: the short last sector travels as imagezip's SHORTSECTOR."""
    disk = tmp_path / "odd.bin"
    disk.write_bytes(random.Random(8).randbytes(1_300_000))
    image, restored = save_and_restore(run_cli, disk, tmp_path, "-r")
    assert restored.read_bytes() == disk.read_bytes()
    info = run_cli("info", image, check=True).out
    assert "shortsector@2539" in info


def test_failed_save_leaves_no_image(tmp_path, run_cli):
    dest = tmp_path / "out.ndz"
    proc = run_cli("save", "/dev/null", dest)
    assert proc.returncode != 0 and "Traceback" not in proc.err
    assert not dest.exists() and not (tmp_path / "out.ndz.part").exists()


def test_demo(tmp_path, run_cli):
    proc = run_cli("demo", tmp_path / "demo", check=True)
    assert "demo OK" in proc.out
    assert (tmp_path / "demo" / "disk.img").stat().st_size == 48 * MIB
