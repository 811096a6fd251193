"""Which sectors of a disk hold data worth imaging: the partition table, then each partition's filesystem
allocation maps (ext2/3/4, FAT, swap). Pure: the only I/O is through the caller's `read(offset, size)`; what the
caller should warn about is returned in DiskMap.warnings.

Every inconsistency in on-disk data is reported as agent.errors.FilesystemError; a recognised filesystem
that uses features we cannot reason about is imaged whole (kind 'raw'), never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from agent.errors import FilesystemError
from agent.fs import ext, fat, mbr, swap
from agent.fs.gpt import read_gpt
from agent.fs.ranges import Range, RangeSet
from agent.fs.window import SECTOR, UnsupportedFilesystem, Window

__all__ = ["SECTOR", "Part", "DiskMap", "scan_disk", "raw_map"]

ReadFn = Callable[[int, int], bytes]

# Content probes, in order. Each module has probe(window) -> bool and scan(window) -> (kind, ranges, span).
_FILESYSTEMS = (ext, fat, swap)


@dataclass
class Part:
    """One thing found on the disk, for the lines `save` prints about each partition."""

    index: int  # partition number (1-based; 0 for a bare filesystem / whole disk)
    start: int  # first sector
    count: int  # sectors
    kind: str  # 'ext2', 'ext3', 'ext4', 'fat12', 'fat16', 'fat32', 'swap', 'raw', 'extended'
    allocated: int  # sectors of it that will be imaged


@dataclass
class DiskMap:
    ranges: list[tuple[int, int]]  # (start_sector, sector_count), sorted, non-overlapping, adjacent merged
    parts: list[Part]
    scheme: str  # 'mbr', 'gpt', 'bare' (a filesystem without partition table), 'raw' (nothing recognised)
    warnings: list[str] = field(default_factory=list, compare=False)  # what was imaged whole, not understood, and why


def raw_map(disk_sectors: int) -> DiskMap:
    """Every sector (for --raw, or a disk with nothing we recognise)."""
    if disk_sectors <= 0:
        return DiskMap([], [], "raw")
    return DiskMap([(0, disk_sectors)], [Part(0, 0, disk_sectors, "raw", disk_sectors)], "raw")


def scan_disk(read: ReadFn, disk_sectors: int) -> DiskMap:
    """Map the sectors of a disk of `disk_sectors` sectors that an image must hold."""
    if disk_sectors < 0:
        raise ValueError(f"disk_sectors must not be negative, got {disk_sectors}")
    if disk_sectors == 0:
        return raw_map(0)
    warnings: list[str] = []
    disk_map = _scan(Window(read, 0, disk_sectors, "the disk"), warnings)
    disk_map.warnings = warnings
    return disk_map


def _scan(disk: Window, warnings: list[str]) -> DiskMap:
    sector0 = disk.read(0, SECTOR)
    if mbr.has_boot_signature(sector0):
        if mbr.is_protective(sector0):
            return _scan_gpt(disk, warnings)
        if mbr.looks_like_mbr(sector0):
            # A FAT boot sector also ends in 55AA, and its boot code (or the fake table `mkfs.fat --mbr`
            # writes, one partition from sector 0) can pass for a partition table.
            fat_boot_sector = fat.probe(disk)
            try:
                layout = mbr.read_mbr(disk, sector0)
            except FilesystemError:
                if not fat_boot_sector and not ext.probe(disk):
                    raise
            else:
                if fat_boot_sector:
                    warnings.append("sector 0 is both a valid partition table and a FAT boot sector; imaging it all")
                    return raw_map(disk.sectors)
                return _scan_mbr(disk, layout, warnings)
    return _scan_bare(disk, warnings)


def _scan_bare(disk: Window, warnings: list[str]) -> DiskMap:
    recognised, kind, ranges = _scan_content(disk, warnings)
    if not recognised:
        return raw_map(disk.sectors)
    part = Part(0, 0, disk.sectors, kind, sum(count for _, count in ranges))
    return DiskMap(ranges, [part], "bare")


def _scan_mbr(disk: Window, layout: mbr.MbrLayout, warnings: list[str]) -> DiskMap:
    used = RangeSet()
    used.add(0, min(p.start for p in layout.primaries))  # MBR and boot loader area (e.g. GRUB's core.img)
    parts = {}
    for p in sorted(layout.data_partitions, key=lambda p: p.start):
        parts[p.index] = _scan_partition(disk, p.index, p.start, p.count, used, warnings)
    extended = layout.extended
    if extended:
        for sector in layout.ebr_sectors:
            used.add(sector, 1)
        parts[extended.index] = Part(
            extended.index, extended.start, extended.count, "extended", len(layout.ebr_sectors)
        )
    return DiskMap(used.ranges(), [parts[i] for i in sorted(parts)], "mbr")


def _scan_gpt(disk: Window, warnings: list[str]) -> DiskMap:
    layout = read_gpt(disk)
    used = RangeSet()
    # Protective MBR, primary header and entries, and whatever boot code sits before the first partition.
    used.add(0, min([p.start for p in layout.partitions], default=layout.first_usable))
    parts = [
        _scan_partition(disk, p.index, p.start, p.count, used, warnings)
        for p in sorted(layout.partitions, key=lambda p: p.start)
    ]
    for start, count in layout.metadata:  # the backup header and entries are at the disk's end
        used.add(start, count)
    return DiskMap(used.ranges(), sorted(parts, key=lambda p: p.index), "gpt")


def _scan_partition(disk: Window, index: int, start: int, count: int, used: RangeSet, warnings: list[str]) -> Part:
    win = disk.sub(start, count, f"partition {index}")
    _, kind, ranges = _scan_content(win, warnings)
    used.add_all(ranges, offset=start)
    return Part(index, start, count, kind, sum(n for _, n in ranges))


def _scan_content(win: Window, warnings: list[str]) -> tuple[bool, str, list[Range]]:
    """(recognised, kind, ranges relative to the window) for whatever the window holds."""
    whole = [(0, win.sectors)] if win.sectors else []
    found = [fs for fs in _FILESYSTEMS if fs.probe(win)]
    if not found:
        return False, "raw", whole
    if len(found) > 1:
        # e.g. a stale ext superblock under a newer FAT: guessing wrong would drop data, so keep it all.
        names = ", ".join(fs.__name__.rsplit(".", 1)[-1] for fs in found)
        warnings.append(f"{win.what}: signatures of several filesystems ({names}); imaging it whole")
        return False, "raw", whole
    try:
        kind, ranges, span = found[0].scan(win)
    except UnsupportedFilesystem as why:
        warnings.append(f"{win.what}: {why}; imaging it whole")
        return True, "raw", whole
    except FilesystemError as err:  # say which partition
        if str(err).startswith(win.what):
            raise
        raise FilesystemError(f"{win.what}: {err}") from None
    if span < win.sectors:
        # Past the filesystem's end the partition may hold something else (e.g. RAID metadata at the end of
        # a partition): not ours to judge, keep it.
        ranges = ranges + [(span, win.sectors - span)]
    return True, kind, ranges
