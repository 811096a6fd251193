"""The MBR (DOS) partition table, with its chain of extended boot records (EBRs) for logical partitions."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from agent.errors import FilesystemError
from agent.fs.window import SECTOR, Window

BOOT_SIGNATURE = b"\x55\xaa"
TABLE_OFFSET = 446
ENTRY = struct.Struct("<B3xB3xII")  # boot flag, (CHS start), type, (CHS end), first LBA, sector count
EXTENDED_TYPES = frozenset({0x05, 0x0F, 0x85})
GPT_PROTECTIVE_TYPE = 0xEE
FIRST_LOGICAL_INDEX = 5  # Linux numbers logical partitions from 5 whatever the primaries are
MAX_LOGICAL = 256  # far beyond any real chain; stops a looping or endless one


@dataclass(frozen=True)
class Entry:
    flag: int
    type: int
    start: int
    count: int

    @property
    def empty(self) -> bool:
        return self.type == 0 or self.count == 0


@dataclass(frozen=True)
class MbrPartition:
    index: int
    start: int
    count: int
    type: int

    @property
    def end(self) -> int:
        return self.start + self.count


@dataclass
class MbrLayout:
    primaries: list[MbrPartition]  # non-empty primary entries, extended ones included
    logicals: list[MbrPartition] = field(default_factory=list)
    ebr_sectors: list[int] = field(default_factory=list)

    @property
    def extended(self) -> MbrPartition | None:
        return next((p for p in self.primaries if p.type in EXTENDED_TYPES), None)

    @property
    def data_partitions(self) -> list[MbrPartition]:
        """Partitions that hold data (primaries that are not extended, and logicals), by index."""
        return [p for p in self.primaries if p.type not in EXTENDED_TYPES] + self.logicals


def has_boot_signature(sector: bytes) -> bool:
    return sector[510:512] == BOOT_SIGNATURE


def parse_entries(sector: bytes) -> list[Entry]:
    return [Entry(*ENTRY.unpack_from(sector, TABLE_OFFSET + 16 * i)) for i in range(4)]


def _flags_valid(entries: list[Entry]) -> bool:
    # The boot flag is 0x00 or 0x80 in a real table; in a FAT boot sector these bytes are boot code or text.
    return all(e.flag in (0x00, 0x80) for e in entries)


def is_protective(sector: bytes) -> bool:
    """A protective (or hybrid) MBR in front of a GPT."""
    entries = parse_entries(sector)
    return _flags_valid(entries) and any(e.type == GPT_PROTECTIVE_TYPE for e in entries)


def looks_like_mbr(sector: bytes) -> bool:
    """Signature, sane boot flags and at least one partition: worth reading as a partition table."""
    entries = parse_entries(sector)
    return has_boot_signature(sector) and _flags_valid(entries) and any(not e.empty for e in entries)


def read_mbr(disk: Window, sector0: bytes) -> MbrLayout:
    """The primaries of sector 0 and, if there is an extended partition, the logicals in its EBR chain."""
    primaries = [
        MbrPartition(i + 1, e.start, e.count, e.type) for i, e in enumerate(parse_entries(sector0)) if not e.empty
    ]
    for p in primaries:
        _check_inside(p, 1, disk.sectors, "the disk")
    _check_disjoint(primaries)
    extendeds = [p for p in primaries if p.type in EXTENDED_TYPES]
    if len(extendeds) > 1:
        raise FilesystemError("MBR: more than one extended partition")
    layout = MbrLayout(primaries)
    if extendeds:
        _read_ebr_chain(disk, extendeds[0], layout)
    return layout


def _read_ebr_chain(disk: Window, extended: MbrPartition, layout: MbrLayout) -> None:
    """Follow the EBRs: each holds one logical partition (relative to the EBR) and a link to the next EBR
    (relative to the start of the extended partition)."""
    ebr = extended.start
    index = FIRST_LOGICAL_INDEX
    seen: set[int] = set()
    while True:
        if ebr in seen or len(seen) >= MAX_LOGICAL:
            raise FilesystemError(f"MBR: the chain of extended boot records loops or never ends (at sector {ebr})")
        if not extended.start <= ebr < extended.end:
            raise FilesystemError(f"MBR: extended boot record at sector {ebr} lies outside the extended partition")
        seen.add(ebr)
        layout.ebr_sectors.append(ebr)
        sector = disk.read(ebr * SECTOR, SECTOR)
        if not has_boot_signature(sector):
            break  # as Linux does: an EBR without signature ends the chain (e.g. an empty extended partition)
        next_ebr = None
        for e in parse_entries(sector):
            if e.empty:
                continue
            if e.type in EXTENDED_TYPES:
                if next_ebr is None:
                    next_ebr = extended.start + e.start
                continue
            logical = MbrPartition(index, ebr + e.start, e.count, e.type)
            _check_inside(logical, ebr + 1, extended.end, f"extended partition {extended.index}")
            layout.logicals.append(logical)
            index += 1
        if next_ebr is None:
            break
        ebr = next_ebr
    ebr_as_parts = [MbrPartition(0, s, 1, 0) for s in layout.ebr_sectors]
    _check_disjoint(layout.logicals + ebr_as_parts)


def _check_inside(p: MbrPartition, lowest: int, end: int, container: str) -> None:
    if p.start < lowest or p.end > end:
        raise FilesystemError(
            f"MBR: partition {p.index} (sectors {p.start}+{p.count}) does not fit in {container} "
            f"(sectors {lowest}..{end - 1})"
        )


def _check_disjoint(parts: list[MbrPartition]) -> None:
    ordered = sorted(parts, key=lambda p: p.start)
    for a, b in zip(ordered, ordered[1:]):
        if b.start < a.end:
            what_a = f"partition {a.index}" if a.index else f"the EBR at sector {a.start}"
            what_b = f"partition {b.index}" if b.index else f"the EBR at sector {b.start}"
            raise FilesystemError(f"MBR: {what_a} and {what_b} overlap")
