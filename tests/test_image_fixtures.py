"""Restoring images written by the real Emulab imagezip, onto files and loop devices."""

from __future__ import annotations

import hashlib
import subprocess

import pytest

from agent.ndz.header import CHUNK_SIZE, decode
from test_ndz_format import regions_of
from conftest import FIXTURES, MANIFEST, loop_device, mounted, needs_root, sha256_file, tree_of

FS_A = MANIFEST["fixtures"]["fsA"]
DISK_B = MANIFEST["fixtures"]["diskB"]


def headers(path):
    data = path.read_bytes()
    return [decode(data[i : i + 4096], i // CHUNK_SIZE) for i in range(0, len(data), CHUNK_SIZE)]


def e2fsck_clean(path, offset: int | None = None):
    if offset:
        with loop_device(path, offset=offset, sizelimit=40960 * 512) as dev:
            proc = subprocess.run(["e2fsck", "-fn", dev], capture_output=True, text=True)
    else:
        proc = subprocess.run(["e2fsck", "-fn", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", ["fsA-fsaware-v3.ndz", "fsA-fsaware-v5.ndz", "diskB-mbr-v3.ndz", "fsA-raw-v3.ndz"])
def test_headers_match_what_imagedump_reports(name):
    image = FS_A["images"].get(name) or DISK_B["images"][name]
    hs = headers(FIXTURES / name)
    assert len(hs) == image["chunks"]
    assert {h.version for h in hs} == {image["version"]}
    assert hs[0].first_sector == image["covered_sectors"][0]
    assert hs[-1].last_sector - 1 == image["covered_sectors"][1]
    assert sum(h.data_bytes for h in hs) == image["allocated_bytes"]
    for a, b in zip(hs, hs[1:]):
        assert a.last_sector == b.first_sector  # imagezip tiles the disk
    if name.startswith("diskB"):
        assert [r for h in hs for r in h.regions] == [tuple(r) for r in DISK_B["regions"]]
        assert regions_of(hs)[3] == (22530, 5870 + 2037 + 285)  # a region split across chunks merges back


@needs_root
@pytest.mark.parametrize("name", ["fsA-fsaware-v3.ndz", "fsA-fsaware-v5.ndz"])
def test_fsaware_image_restores_to_a_new_file(name, tmp_path, run_cli, tmp_path_factory):
    out = tmp_path / "fsA.img"
    proc = run_cli("image", FIXTURES / name, out, check=True)
    assert "Wrote" in proc.err
    assert out.stat().st_size == FS_A["source_bytes"]  # extended to the covered end, mountable as is
    e2fsck_clean(out)
    with mounted(out, tmp_path_factory) as root:
        assert tree_of(root) == MANIFEST["tree"]


def test_raw_image_restores_byte_identical(tmp_path, run_cli):
    out = tmp_path / "raw.img"
    run_cli("image", FIXTURES / "fsA-raw-v3.ndz", out, check=True)
    assert sha256_file(out) == FS_A["source_sha256"]


def test_stdin_source_gives_the_same_bytes(tmp_path, run_cli):
    out = tmp_path / "raw.img"
    run_cli("image", "-", out, input=(FIXTURES / "fsA-raw-v3.ndz").read_bytes(), check=True)
    assert sha256_file(out) == FS_A["source_sha256"]


@needs_root
def test_mbr_disk_restores_onto_a_loop_device(tmp_path, tmp_path_factory, run_cli):
    backing = tmp_path / "diskB.img"
    backing.write_bytes(b"\0" * DISK_B["source_bytes"])
    with loop_device(backing) as dev:
        run_cli("image", FIXTURES / "diskB-mbr-v3.ndz", dev, check=True)
    assert hashlib.sha256(backing.read_bytes()[:512]).hexdigest() == DISK_B["mbr_sha256"]
    e2fsck_clean(backing, offset=2048 * 512)
    with mounted(backing, tmp_path_factory, offset=2048 * 512) as root:
        assert tree_of(root) == MANIFEST["tree"]
    # Only the first 64 sectors of the swap partition are in the image; the rest stays as it was (zeros).
    data = backing.read_bytes()
    assert data[(43008 + 64) * 512 : 59392 * 512] == bytes((59392 - 43008 - 64) * 512)


@needs_root
def test_fsaware_image_onto_loop_device_mounts(tmp_path, tmp_path_factory, run_cli):
    backing = tmp_path / "dev.img"
    backing.write_bytes(b"\0" * FS_A["source_bytes"])
    with loop_device(backing) as dev:
        run_cli("image", FIXTURES / "fsA-fsaware-v3.ndz", dev, check=True)
        e2fsck_clean(dev)
    with mounted(backing, tmp_path_factory) as root:
        assert tree_of(root) == MANIFEST["tree"]


@needs_root
def test_zero_fills_free_space_exactly(tmp_path, run_cli):
    """-z on a dirty device gives what a zeroed device gives, and writes nothing past the image's end."""
    clean = tmp_path / "clean.img"
    clean.write_bytes(b"\0" * FS_A["source_bytes"])
    run_cli("image", FIXTURES / "fsA-fsaware-v3.ndz", clean, check=True)
    dirty = tmp_path / "dirty.img"
    dirty.write_bytes(b"\xa5" * (FS_A["source_bytes"] + (1 << 20)))
    with loop_device(dirty, sizelimit=FS_A["source_bytes"]) as dev:
        proc = run_cli("image", "-z", FIXTURES / "fsA-fsaware-v3.ndz", dev, check=True)
    assert "zeroed" in proc.err
    data = dirty.read_bytes()
    assert data[: FS_A["source_bytes"]] == clean.read_bytes()
    assert data[FS_A["source_bytes"] :] == b"\xa5" * (1 << 20)  # beyond the device: untouched


@needs_root
def test_device_too_small_is_refused_before_any_write(tmp_path, run_cli):
    backing = tmp_path / "small.img"
    backing.write_bytes(b"\x5a" * (8 << 20))
    with loop_device(backing) as dev:
        proc = run_cli("image", FIXTURES / "fsA-fsaware-v3.ndz", dev)
    assert proc.returncode != 0
    assert proc.err.count("\n") == 1 and "Traceback" not in proc.err
    assert "needs 16777216 bytes" in proc.err
    assert backing.read_bytes() == b"\x5a" * (8 << 20)


@needs_root
def test_stdin_to_small_device_stops_at_the_first_chunk_that_does_not_fit(tmp_path, run_cli):
    backing = tmp_path / "small.img"
    backing.write_bytes(b"\x5a" * (8 << 20))
    with loop_device(backing) as dev:
        proc = run_cli("image", "-", dev, input=(FIXTURES / "fsA-raw-v3.ndz").read_bytes())
    assert proc.returncode != 0 and "Traceback" not in proc.err
    assert "chunk 2" in proc.err  # chunks 0 and 1 end below 8 MiB, chunk 2 does not
    assert len(backing.read_bytes()) == 8 << 20


def image_onto_mounted_device(run_cli, tmp_path, tmp_path_factory, *flags):
    """Run `image` onto a loop device whose filesystem is mounted read-only meanwhile."""
    backing = tmp_path / "fs.img"
    run_cli("image", FIXTURES / "fsA-raw-v3.ndz", backing, check=True)
    with loop_device(backing) as dev:
        point = tmp_path_factory.mktemp("mnt")
        subprocess.run(["mount", "-o", "ro", dev, str(point)], check=True)
        try:
            return run_cli("image", *flags, FIXTURES / "fsA-raw-v3.ndz", dev)
        finally:
            subprocess.run(["umount", str(point)], check=True)


@needs_root
def test_mounted_target_is_refused(tmp_path, tmp_path_factory, run_cli):
    proc = image_onto_mounted_device(run_cli, tmp_path, tmp_path_factory)
    assert proc.returncode != 0
    assert "mounted on" in proc.err and "--force" in proc.err


def test_zero_fills_free_space_of_a_file_target(tmp_path, run_cli):
    """-z on a dirty regular file (hole punching) gives what a new file gives."""
    clean = tmp_path / "clean.img"
    run_cli("image", FIXTURES / "fsA-fsaware-v5.ndz", clean, check=True)
    dirty = tmp_path / "dirty.img"
    dirty.write_bytes(b"\xa5" * FS_A["source_bytes"])
    run_cli("image", "--zero", FIXTURES / "fsA-fsaware-v5.ndz", dirty, check=True)
    assert dirty.read_bytes() == clean.read_bytes()


def test_file_target_is_never_shrunk(tmp_path, run_cli):
    out = tmp_path / "big.img"
    out.write_bytes(b"\x11" * (20 << 20))
    run_cli("image", FIXTURES / "fsA-raw-v3.ndz", out, check=True)
    data = out.read_bytes()
    assert len(data) == 20 << 20 and data[16 << 20 :] == b"\x11" * (4 << 20)
    assert sha256_file(out, length=16 << 20) == FS_A["source_sha256"]


@needs_root
def test_force_writes_to_a_mounted_device(tmp_path, tmp_path_factory, run_cli):
    proc = image_onto_mounted_device(run_cli, tmp_path, tmp_path_factory, "--force")
    assert proc.returncode == 0, proc.err
