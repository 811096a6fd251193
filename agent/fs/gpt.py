"""The GUID partition table (UEFI spec, ch. 5): primary header at LBA 1, backup header at the disk's last LBA,
each with its own copy of the partition entry array. Assumes 512-byte logical sectors."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from agent.errors import FilesystemError
from agent.fs.ranges import Range
from agent.fs.window import SECTOR, Window

SIGNATURE = b"EFI PART"
PRIMARY_LBA = 1
HEADER = struct.Struct("<8sIII4xQQQQ16sQIII")  # fields up to the entry array CRC: 92 bytes
MIN_HEADER_SIZE = HEADER.size
ENTRY_FIELDS = struct.Struct("<16s16sQQ")  # type GUID, unique GUID, first LBA, last LBA (inclusive)
MAX_ENTRY_ARRAY_BYTES = 4 << 20  # 32768 entries of 128 bytes; real tables hold 128
EMPTY_TYPE = bytes(16)


@dataclass(frozen=True)
class GptHeader:
    my_lba: int
    alternate_lba: int
    first_usable: int
    last_usable: int
    entries_lba: int
    entry_count: int
    entry_size: int
    entries_crc: int

    @property
    def entries_sectors(self) -> int:
        return -(-self.entry_count * self.entry_size // SECTOR)


@dataclass(frozen=True)
class GptPartition:
    index: int  # 1-based entry number
    start: int
    count: int


@dataclass
class GptLayout:
    partitions: list[GptPartition]
    first_usable: int
    metadata: list[Range]  # both headers and both entry arrays: a restored disk needs them all


def read_gpt(disk: Window) -> GptLayout:
    primary = _read_header(disk, PRIMARY_LBA)
    primary_entries = _read_entries(disk, primary) if primary else None
    backup_lba = primary.alternate_lba if primary else disk.sectors - 1
    backup = _read_header(disk, backup_lba)
    backup_entries = _read_entries(disk, backup) if backup else None

    if primary and primary_entries is not None:
        header, raw_entries = primary, primary_entries
    elif backup and backup_entries is not None:
        header, raw_entries = backup, backup_entries
    elif disk.size >= 4096 + SECTOR and disk.read(4096, 8) == SIGNATURE:
        raise FilesystemError("GPT: the table is written for 4096-byte sectors, which is not supported")
    else:
        raise FilesystemError("GPT: protective MBR found but neither GPT header (nor its entry array) is valid")

    partitions = _parse_partitions(raw_entries, header, disk.sectors)
    metadata = [(PRIMARY_LBA, 1)]
    if primary:
        metadata.append((primary.entries_lba, primary.entries_sectors))
    if 0 < backup_lba < disk.sectors:
        metadata.append((backup_lba, 1))
        if backup:
            metadata.append((backup.entries_lba, backup.entries_sectors))
        else:
            # Broken backup: keep where its entry array belongs (just before it), so a restore carries the
            # same bytes the source had.
            start = max(backup_lba - header.entries_sectors, 1)
            metadata.append((start, backup_lba - start))
    return GptLayout(partitions, header.first_usable, metadata)


def _read_header(disk: Window, lba: int) -> GptHeader | None:
    """The header at `lba` if it is a valid one (signature, size, CRC, and it says it is at `lba`), else None."""
    if not 0 < lba < disk.sectors:
        return None
    raw = disk.read(lba * SECTOR, SECTOR)
    signature, _revision, size, crc, *fields = HEADER.unpack_from(raw)
    if signature != SIGNATURE or not MIN_HEADER_SIZE <= size <= SECTOR:
        return None
    if zlib.crc32(raw[:16] + b"\0\0\0\0" + raw[20:size]) != crc:
        return None
    my_lba, alternate, first_usable, last_usable, _guid, entries_lba, count, entry_size, entries_crc = fields
    header = GptHeader(my_lba, alternate, first_usable, last_usable, entries_lba, count, entry_size, entries_crc)
    if my_lba != lba:
        return None
    if entry_size < 128 or entry_size % 8 or count * entry_size > MAX_ENTRY_ARRAY_BYTES:
        return None
    if not (0 < entries_lba and entries_lba + header.entries_sectors <= disk.sectors):
        return None
    if not 0 < first_usable <= last_usable + 1 or last_usable >= disk.sectors:
        return None
    return header


def _read_entries(disk: Window, header: GptHeader) -> bytes | None:
    raw = disk.read(header.entries_lba * SECTOR, header.entry_count * header.entry_size)
    return raw if zlib.crc32(raw) == header.entries_crc else None


def _parse_partitions(raw: bytes, header: GptHeader, disk_sectors: int) -> list[GptPartition]:
    partitions = []
    for i in range(header.entry_count):
        type_guid, _unique, first, last = ENTRY_FIELDS.unpack_from(raw, i * header.entry_size)
        if type_guid == EMPTY_TYPE:
            continue
        p = GptPartition(i + 1, first, last - first + 1)
        if last >= disk_sectors:
            raise FilesystemError(f"GPT: partition {p.index} (sectors {first}..{last}) runs past the end of the disk")
        if first > last or first < header.first_usable or last > header.last_usable:
            raise FilesystemError(
                f"GPT: partition {p.index} (sectors {first}..{last}) lies outside the usable area "
                f"{header.first_usable}..{header.last_usable}"
            )
        partitions.append(p)
    ordered = sorted(partitions, key=lambda p: p.start)
    for a, b in zip(ordered, ordered[1:]):
        if b.start < a.start + a.count:
            raise FilesystemError(f"GPT: partitions {a.index} and {b.index} overlap")
    return partitions
