"""FAT12/16/32: reserved sectors, the FATs and the root directory are kept; of the data area, the clusters
whose FAT entry is non-zero (layout and type rules from Microsoft's FAT specification, "FAT: General
Overview of On-Disk Format")."""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Iterator

from agent.errors import FilesystemError
from agent.fs.ranges import Range, RangeSet
from agent.fs.window import SECTOR, Window

# Boot sector / BPB up to BPB_TotSec32, then the FAT32 extension up to BPB_RootClus.
BPB = struct.Struct("<3s8xHBHBHHBH8xI")
BPB32 = struct.Struct("<IHHI")  # BPB_FATSz32, BPB_ExtFlags, BPB_FSVer, BPB_RootClus
BPB32_OFFSET = 36

BYTES_PER_SECTOR = (512, 1024, 2048, 4096)
MEDIA_BYTES = frozenset({0xF0} | set(range(0xF8, 0x100)))
FAT12_MAX_CLUSTERS = 4084  # fewer than 4085 clusters: FAT12
FAT16_MAX_CLUSTERS = 65524  # fewer than 65525: FAT16
FIRST_CLUSTER = 2  # entries 0 and 1 are reserved
FAT32_ACTIVE_FAT_ONLY = 0x80  # BPB_ExtFlags: mirroring off, only the FAT numbered in bits 0-3 is used
BAD_CLUSTER = {"fat12": 0xFF7, "fat16": 0xFFF7, "fat32": 0x0FFFFFF7}
# Where a bad-cluster mark starts in a FAT16 / FAT32 table (FAT32 entries: the top 4 bits are reserved).
BAD_MARK = {
    "fat16": re.compile(rb"(?=\xf7\xff)"),
    "fat32": re.compile(rb"(?=\xf7\xff\xff[" + bytes(range(0x0F, 0x100, 0x10)) + rb"])"),
}
NON_ZERO_BYTES = re.compile(rb"[^\x00]+")
FAT_CHUNK = 1 << 20  # bytes of FAT read at a time: memory stays flat for a 2 TB FAT32


@dataclass(frozen=True)
class Bpb:
    bytes_per_sector: int
    sectors_per_cluster: int
    reserved_sectors: int
    fat_count: int
    root_entries: int
    total_sectors: int
    media: int
    fat16_size: int  # BPB_FATSz16: zero means a FAT32 BPB
    fat_size: int
    ext_flags: int


def parse_bpb(boot: bytes) -> Bpb | None:
    """The BPB of a FAT boot sector, or None if this is not one (every field must be in its allowed range)."""
    (jump, bps, spc, reserved, fats, root_entries, total16, media, fat16, total32) = BPB.unpack_from(boot)
    fat32_size, ext_flags, _version, _root_cluster = BPB32.unpack_from(boot, BPB32_OFFSET)
    plausible = (
        jump[0] in (0xEB, 0xE9)
        and bps in BYTES_PER_SECTOR
        and spc in (1, 2, 4, 8, 16, 32, 64, 128)
        and reserved > 0
        and fats > 0
        and media in MEDIA_BYTES
        and (total16 or total32)
        and (fat16 or fat32_size)
    )
    if not plausible:
        return None
    return Bpb(
        bps, spc, reserved, fats, root_entries, total16 or total32, media, fat16, fat16 or fat32_size,
        ext_flags if not fat16 else 0,
    )


def probe(win: Window) -> bool:
    """A plausible BPB whose first FAT starts with the media byte, as every FAT's entry 0 does."""
    if win.sectors < 1:
        return False
    bpb = parse_bpb(win.read(0, SECTOR))
    if bpb is None:
        return False
    fat_start = bpb.reserved_sectors * bpb.bytes_per_sector
    if fat_start + 2 > win.size:
        return False
    entry0 = win.read(fat_start, 2)
    return entry0[0] == bpb.media and entry0[1] == 0xFF


@dataclass(frozen=True)
class Volume:
    kind: str
    scale: int  # 512-byte sectors per FAT sector
    sectors_per_cluster: int
    fat_offset: int  # bytes from the volume start to the FAT in use
    first_data_sector: int  # in FAT sectors
    cluster_count: int
    total_sectors: int  # in FAT sectors

    @property
    def entry_bits(self) -> int:
        return {"fat12": 12, "fat16": 16, "fat32": 32}[self.kind]


def read_volume(win: Window) -> Volume:
    bpb = parse_bpb(win.read(0, SECTOR))
    if bpb is None:
        raise FilesystemError("FAT: not a FAT boot sector")

    def bad(why: str) -> FilesystemError:
        return FilesystemError(f"FAT: inconsistent boot sector: {why}")

    bps = bpb.bytes_per_sector
    root_dir_sectors = -(-bpb.root_entries * 32 // bps)
    first_data = bpb.reserved_sectors + bpb.fat_count * bpb.fat_size + root_dir_sectors
    if first_data >= bpb.total_sectors:
        raise bad(f"data area starts at sector {first_data} of {bpb.total_sectors}")
    clusters = (bpb.total_sectors - first_data) // bpb.sectors_per_cluster
    if clusters < 1:
        raise bad("no clusters")
    if bpb.fat16_size == 0:
        # A FAT32 BPB. Microsoft types by cluster count alone, but mkfs.fat and Linux also make and read
        # small FAT32 volumes below 65525 clusters; reading those as FAT16 would misread every entry.
        kind = "fat32"
        if bpb.root_entries:
            raise bad("FAT32 with a fixed root directory")
    elif clusters <= FAT12_MAX_CLUSTERS:
        kind = "fat12"
    elif clusters <= FAT16_MAX_CLUSTERS:
        kind = "fat16"
    else:
        raise bad(f"{clusters} clusters, too many for FAT12/16, but the boot sector is not FAT32's")
    active_fat = 0
    if kind == "fat32" and bpb.ext_flags & FAT32_ACTIVE_FAT_ONLY:
        active_fat = bpb.ext_flags & 0x0F
        if active_fat >= bpb.fat_count:
            raise bad(f"active FAT {active_fat} of {bpb.fat_count}")
    volume = Volume(
        kind, bps // SECTOR, bpb.sectors_per_cluster,
        (bpb.reserved_sectors + active_fat * bpb.fat_size) * bps, first_data, clusters, bpb.total_sectors,
    )
    if (clusters + FIRST_CLUSTER) * volume.entry_bits > bpb.fat_size * bps * 8:
        raise bad(f"a FAT of {bpb.fat_size} sectors cannot hold {clusters} clusters")
    return volume


def allocated_clusters(win: Window, vol: Volume) -> Iterator[Range]:
    """(first_cluster, count) runs of clusters whose FAT entry is neither free (0) nor marked bad."""
    if vol.kind == "fat12":
        yield from _fat12_runs(win, vol)
        return
    entry_bytes = vol.entry_bits // 8
    entries = vol.cluster_count + FIRST_CLUSTER
    chunk_entries = FAT_CHUNK // entry_bytes
    for chunk_first in range(0, entries, chunk_entries):
        count = min(chunk_entries, entries - chunk_first)
        data = win.read(vol.fat_offset + chunk_first * entry_bytes, count * entry_bytes)
        runs = _non_zero_entry_runs(data, entry_bytes, chunk_first)
        bad = [
            chunk_first + m.start() // entry_bytes
            for m in BAD_MARK[vol.kind].finditer(data)
            if m.start() % entry_bytes == 0
        ]
        for first, end in _without(runs, bad):
            first = max(first, FIRST_CLUSTER)
            if end > first:
                yield (first, end - first)


def _non_zero_entry_runs(data: bytes, entry_bytes: int, first_entry: int) -> list[tuple[int, int]]:
    """[first, end) entry runs with a non-zero byte, found by a regex over the bytes (C speed): a run of
    non-zero bytes touches entries that are all non-zero; zero bytes between runs belong to free entries
    unless they share an entry with a non-zero byte."""
    runs: list[tuple[int, int]] = []
    for m in NON_ZERO_BYTES.finditer(data):
        first = first_entry + m.start() // entry_bytes
        end = first_entry + (m.end() - 1) // entry_bytes + 1
        if runs and first <= runs[-1][1]:
            runs[-1] = (runs[-1][0], max(end, runs[-1][1]))
        else:
            runs.append((first, end))
    return runs


def _without(runs: list[tuple[int, int]], points: list[int]) -> Iterator[tuple[int, int]]:
    """The [first, end) runs minus the (sorted) single entries in points."""
    i = 0
    for first, end in runs:
        cur = first
        while i < len(points) and points[i] < end:
            point = points[i]
            i += 1
            if point < cur:
                continue
            if point > cur:
                yield (cur, point)
            cur = point + 1
        if cur < end:
            yield (cur, end)


def _fat12_runs(win: Window, vol: Volume) -> Iterator[Range]:
    # At most 4086 entries of 12 bits (6 KiB): a plain loop is fast enough.
    entries = vol.cluster_count + FIRST_CLUSTER
    data = win.read(vol.fat_offset, (entries * 3 + 1) // 2) + b"\0"
    run_first = None
    for n in range(FIRST_CLUSTER, entries + 1):
        in_use = False
        if n < entries:
            pair = data[n * 3 // 2] | data[n * 3 // 2 + 1] << 8
            value = pair >> 4 if n & 1 else pair & 0xFFF
            in_use = value != 0 and value != BAD_CLUSTER["fat12"]
        if in_use and run_first is None:
            run_first = n
        elif not in_use and run_first is not None:
            yield (run_first, n - run_first)
            run_first = None


def scan(win: Window) -> tuple[str, list[Range], int]:
    """(kind, sector ranges relative to the window, sectors the volume spans) of a FAT volume."""
    vol = read_volume(win)
    if vol.total_sectors * vol.scale > win.sectors:
        raise FilesystemError(
            f"FAT: volume of {vol.total_sectors * vol.scale} sectors is larger than {win.what} "
            f"({win.sectors} sectors)"
        )
    used = RangeSet()
    used.add(0, vol.first_data_sector * vol.scale)  # boot sector, reserved sectors, FATs, root directory
    cluster_sectors = vol.sectors_per_cluster * vol.scale
    data_start = vol.first_data_sector * vol.scale
    for first, count in allocated_clusters(win, vol):
        used.add(data_start + (first - FIRST_CLUSTER) * cluster_sectors, count * cluster_sectors)
    return vol.kind, used.ranges(), vol.total_sectors * vol.scale
