"""ext2/3/4: the blocks in use, from each block group's block bitmap.

Layout facts from the kernel's "ext4 Data Structures and Algorithms" documentation: superblock at byte 1024;
block groups of s_blocks_per_group blocks from s_first_data_block; each group's descriptor gives where its
block bitmap, inode bitmap and inode table are (anywhere, with flex_bg); superblock + descriptor table backups
sit at the start of some groups (sparse_super, sparse_super2, meta_bg decide which).
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass

from agent.errors import FilesystemError
from agent.fs.ranges import Range, RangeSet, set_bit_runs
from agent.fs.window import SECTOR, UnsupportedFilesystem, Window


SUPERBLOCK_OFFSET = 1024
SUPERBLOCK_SIZE = 1024
MAGIC = 0xEF53
MAGIC_OFFSET = SUPERBLOCK_OFFSET + 0x38

COMPAT_HAS_JOURNAL = 0x0004
COMPAT_SPARSE_SUPER2 = 0x0200

INCOMPAT_COMPRESSION = 0x0001
INCOMPAT_FILETYPE = 0x0002
INCOMPAT_RECOVER = 0x0004
INCOMPAT_JOURNAL_DEV = 0x0008
INCOMPAT_META_BG = 0x0010
INCOMPAT_EXTENTS = 0x0040
INCOMPAT_64BIT = 0x0080
INCOMPAT_MMP = 0x0100
INCOMPAT_FLEX_BG = 0x0200
INCOMPAT_EA_INODE = 0x0400
INCOMPAT_DIRDATA = 0x1000
INCOMPAT_CSUM_SEED = 0x2000
INCOMPAT_LARGEDIR = 0x4000
INCOMPAT_INLINE_DATA = 0x8000
INCOMPAT_ENCRYPT = 0x10000
INCOMPAT_CASEFOLD = 0x20000
# Features that change nothing about which blocks are in use or how the block bitmaps say so (or that
# we handle: meta_bg, 64bit, flex_bg). Any other incompat bit: we cannot tell, so the partition is imaged whole.
UNDERSTOOD_INCOMPAT = (
    INCOMPAT_FILETYPE | INCOMPAT_META_BG | INCOMPAT_EXTENTS | INCOMPAT_64BIT | INCOMPAT_MMP | INCOMPAT_FLEX_BG
    | INCOMPAT_EA_INODE | INCOMPAT_DIRDATA | INCOMPAT_CSUM_SEED | INCOMPAT_LARGEDIR | INCOMPAT_INLINE_DATA
    | INCOMPAT_ENCRYPT | INCOMPAT_CASEFOLD
)
EXT4_ONLY_INCOMPAT = INCOMPAT_EXTENTS | INCOMPAT_64BIT | INCOMPAT_FLEX_BG | INCOMPAT_MMP | INCOMPAT_INLINE_DATA

RO_COMPAT_SPARSE_SUPER = 0x0001
RO_COMPAT_HUGE_FILE = 0x0008
RO_COMPAT_GDT_CSUM = 0x0010
RO_COMPAT_DIR_NLINK = 0x0020
RO_COMPAT_EXTRA_ISIZE = 0x0040
RO_COMPAT_BIGALLOC = 0x0200
RO_COMPAT_METADATA_CSUM = 0x0400
EXT4_ONLY_RO_COMPAT = (
    RO_COMPAT_HUGE_FILE | RO_COMPAT_GDT_CSUM | RO_COMPAT_DIR_NLINK | RO_COMPAT_EXTRA_ISIZE | RO_COMPAT_BIGALLOC
    | RO_COMPAT_METADATA_CSUM
)

BG_BLOCK_UNINIT = 0x0002  # bg_flags: block bitmap not initialised on disk (only meaningful with group checksums)

MAX_LOG_BLOCK_SIZE = 6  # 64 KiB blocks
MAX_LOG_CLUSTER_RATIO = 16

# Group descriptor: block bitmap, inode bitmap, inode table (low 32 bits), 6 bytes of counts, bg_flags;
# with 64bit, the high 32 bits of the first three at offset 0x20.
DESC_LO = struct.Struct("<III6xH")
DESC_HI = struct.Struct("<III")
DESC_HI_OFFSET = 0x20


@dataclass(frozen=True)
class Superblock:
    blocks_count: int
    first_data_block: int
    block_size: int
    cluster_ratio: int  # blocks per allocation unit (bigalloc); 1 otherwise
    blocks_per_group: int
    clusters_per_group: int  # bits per block bitmap
    inodes_per_group: int
    inode_size: int
    compat: int
    incompat: int
    ro_compat: int
    reserved_gdt_blocks: int
    desc_size: int
    first_meta_bg: int
    backup_groups: tuple[int, int]  # sparse_super2

    @property
    def group_count(self) -> int:
        return -(-(self.blocks_count - self.first_data_block) // self.blocks_per_group)

    @property
    def descs_per_block(self) -> int:
        return self.block_size // self.desc_size

    @property
    def descriptor_blocks(self) -> int:
        return -(-self.group_count // self.descs_per_block)

    @property
    def inode_table_blocks(self) -> int:
        return -(-self.inodes_per_group * self.inode_size // self.block_size)

    @property
    def kind(self) -> str:
        if self.incompat & EXT4_ONLY_INCOMPAT or self.ro_compat & EXT4_ONLY_RO_COMPAT:
            return "ext4"
        return "ext3" if self.compat & COMPAT_HAS_JOURNAL else "ext2"

    def has(self, incompat: int = 0, ro_compat: int = 0, compat: int = 0) -> bool:
        return bool(self.incompat & incompat or self.ro_compat & ro_compat or self.compat & compat)


def _has_magic(raw_superblock: bytes) -> bool:
    return struct.unpack_from("<H", raw_superblock, 0x38)[0] == MAGIC


def probe(win: Window) -> bool:
    """The ext magic, and a superblock plausible enough that it is not a stray pair of bytes."""
    if win.size < SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE:
        return False
    raw = win.read(SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE)
    if not _has_magic(raw):
        return False
    log_block, = struct.unpack_from("<I", raw, 0x18)
    blocks_per_group, = struct.unpack_from("<I", raw, 0x20)
    inodes_per_group, = struct.unpack_from("<I", raw, 0x28)
    rev_level, = struct.unpack_from("<I", raw, 0x4C)
    return log_block <= MAX_LOG_BLOCK_SIZE and rev_level <= 1 and blocks_per_group > 0 and inodes_per_group > 0


def parse_superblock(raw: bytes) -> Superblock:
    """Decode and sanity-check the fields we rely on; FilesystemError if they contradict each other."""
    (_inodes_count, blocks_lo, first_data_block, log_block, log_cluster, blocks_per_group, clusters_per_group,
     inodes_per_group) = struct.unpack_from("<II12xIIIIII", raw, 0)
    if not _has_magic(raw):
        raise FilesystemError("ext: bad superblock magic")
    rev_level, = struct.unpack_from("<I", raw, 0x4C)
    inode_size, = struct.unpack_from("<H", raw, 0x58)
    compat, incompat, ro_compat = struct.unpack_from("<III", raw, 0x5C)
    reserved_gdt, = struct.unpack_from("<H", raw, 0xCE)
    desc_size, = struct.unpack_from("<H", raw, 0xFE)
    first_meta_bg, = struct.unpack_from("<I", raw, 0x104)
    blocks_hi, = struct.unpack_from("<I", raw, 0x150)
    backup_groups = struct.unpack_from("<II", raw, 0x24C)

    def bad(why: str) -> FilesystemError:
        return FilesystemError(f"ext: inconsistent superblock: {why}")

    if log_block > MAX_LOG_BLOCK_SIZE:
        raise bad(f"block size 2^{10 + log_block}")
    block_size = 1024 << log_block
    if rev_level == 0:
        inode_size = 128
    elif inode_size < 128 or inode_size > block_size or inode_size & (inode_size - 1):
        raise bad(f"inode size {inode_size}")
    if incompat & INCOMPAT_64BIT:
        if desc_size < 64 or desc_size > 1024 or desc_size & (desc_size - 1):
            raise bad(f"group descriptor size {desc_size}")
    else:
        desc_size, blocks_hi = 32, 0
    blocks_count = blocks_lo | blocks_hi << 32
    if ro_compat & RO_COMPAT_BIGALLOC:
        if not log_block <= log_cluster <= log_block + MAX_LOG_CLUSTER_RATIO:
            raise bad(f"cluster size 2^{10 + log_cluster} with block size {block_size}")
        cluster_ratio = 1 << (log_cluster - log_block)
    else:
        cluster_ratio, clusters_per_group = 1, blocks_per_group
    if (not 0 < clusters_per_group <= 8 * block_size or clusters_per_group % 8
            or clusters_per_group * cluster_ratio != blocks_per_group):
        raise bad(f"{blocks_per_group} blocks / {clusters_per_group} clusters per group")
    if not 0 < inodes_per_group <= 8 * block_size:
        raise bad(f"{inodes_per_group} inodes per group")
    # The superblock (byte 1024) is in block s_first_data_block: block 1 with 1 KiB blocks, else block 0.
    expected_first = 1 if block_size == 1024 and cluster_ratio == 1 else 0
    if first_data_block != expected_first:
        raise bad(f"first data block {first_data_block} with block size {block_size}")
    if blocks_count <= first_data_block:
        raise bad(f"{blocks_count} blocks")
    return Superblock(
        blocks_count, first_data_block, block_size, cluster_ratio, blocks_per_group, clusters_per_group,
        inodes_per_group, inode_size, compat, incompat, ro_compat, reserved_gdt, desc_size, first_meta_bg,
        backup_groups,
    )


def check_supported(sb: Superblock) -> None:
    unknown = sb.incompat & ~UNDERSTOOD_INCOMPAT
    if sb.incompat & INCOMPAT_RECOVER:
        # The journal holds committed changes not yet written home: the bitmaps on disk may miss blocks.
        raise UnsupportedFilesystem(f"{sb.kind} needs journal recovery (not cleanly unmounted; run e2fsck)")
    if sb.incompat & INCOMPAT_JOURNAL_DEV:
        raise UnsupportedFilesystem(f"{sb.kind} external journal device")
    if unknown:
        raise UnsupportedFilesystem(f"{sb.kind} with unknown incompatible features 0x{unknown:x}")
    if sb.cluster_ratio > 1 and sb.block_size == 1024:
        raise UnsupportedFilesystem(f"{sb.kind} with bigalloc and 1 KiB blocks")


class Geometry:
    """Where the fixed metadata of each group is: which groups carry superblock/descriptor backups."""

    def __init__(self, sb: Superblock) -> None:
        self.sb = sb
        self.meta_bg = sb.has(incompat=INCOMPAT_META_BG)
        self.sparse_super = sb.has(ro_compat=RO_COMPAT_SPARSE_SUPER)
        self.sparse_super2 = sb.has(compat=COMPAT_SPARSE_SUPER2)
        if self.meta_bg and sb.first_meta_bg > sb.descriptor_blocks:
            raise FilesystemError(f"ext: first_meta_bg {sb.first_meta_bg} beyond the descriptor table")

    def group_first_block(self, group: int) -> int:
        return self.sb.first_data_block + group * self.sb.blocks_per_group

    def has_super(self, group: int) -> bool:
        if group == 0:
            return True
        if self.sparse_super2:
            return group in self.sb.backup_groups
        if group == 1 or not self.sparse_super:
            return True
        if group % 2 == 0:
            return False
        return any(_is_power_of(group, base) for base in (3, 5, 7))

    def _in_old_style_metagroup(self, group: int) -> bool:
        return not self.meta_bg or group // self.sb.descs_per_block < self.sb.first_meta_bg

    def base_metadata_blocks(self, group: int) -> int:
        """Blocks at the start of `group` holding the superblock copy, descriptor table (copy) and reserved
        descriptor blocks; this is what the kernel marks in use in a BLOCK_UNINIT group, besides bitmaps
        and inode tables."""
        has_super = self.has_super(group)
        if self._in_old_style_metagroup(group):
            if not has_super:
                return 0
            table = self.sb.first_meta_bg if self.meta_bg else self.sb.descriptor_blocks
            return 1 + table + self.sb.reserved_gdt_blocks
        # meta_bg: each metagroup's descriptor block lives in its first, second and last group.
        per = self.sb.descs_per_block
        first = group // per * per
        return int(has_super) + int(group in (first, first + 1, first + per - 1))

    def descriptor_block(self, nr: int) -> int:
        """Where descriptor block `nr` (descriptors of groups nr*per .. nr*per+per-1) is stored."""
        if not self.meta_bg or nr < self.sb.first_meta_bg:
            return self.sb.first_data_block + 1 + nr
        group = nr * self.sb.descs_per_block
        return self.group_first_block(group) + int(self.has_super(group))


def _is_power_of(n: int, base: int) -> bool:
    while n % base == 0:
        n //= base
    return n == 1


@dataclass
class GroupTable:
    """The descriptors we need, in compact arrays (a 2 TiB filesystem has 16384 groups)."""

    block_bitmap: array
    inode_bitmap: array
    inode_table: array
    flags: array


def read_group_table(win: Window, sb: Superblock, geo: Geometry) -> GroupTable:
    table = GroupTable(array("Q"), array("Q"), array("Q"), array("H"))
    per = sb.descs_per_block
    wide = sb.desc_size >= 64
    for nr in range(sb.descriptor_blocks):
        block = geo.descriptor_block(nr)
        if block >= sb.blocks_count:
            raise FilesystemError(f"ext: group descriptor block {block} lies beyond the filesystem's end")
        raw = win.read(block * sb.block_size, sb.block_size)
        for i in range(min(per, sb.group_count - nr * per)):
            offset = i * sb.desc_size
            block_bitmap, inode_bitmap, inode_table, flags = DESC_LO.unpack_from(raw, offset)
            if wide:
                bb_hi, ib_hi, it_hi = DESC_HI.unpack_from(raw, offset + DESC_HI_OFFSET)
                block_bitmap |= bb_hi << 32
                inode_bitmap |= ib_hi << 32
                inode_table |= it_hi << 32
            table.block_bitmap.append(block_bitmap)
            table.inode_bitmap.append(inode_bitmap)
            table.inode_table.append(inode_table)
            table.flags.append(flags)
    return table


def _check_group_metadata(sb: Superblock, table: GroupTable) -> None:
    itable_blocks = sb.inode_table_blocks
    for g in range(sb.group_count):
        for what, start, count in (
            ("block bitmap", table.block_bitmap[g], 1),
            ("inode bitmap", table.inode_bitmap[g], 1),
            ("inode table", table.inode_table[g], itable_blocks),
        ):
            if start < sb.first_data_block or start + count > sb.blocks_count:
                raise FilesystemError(
                    f"ext: group {g}'s {what} at block {start} (+{count}) lies outside the filesystem "
                    f"({sb.blocks_count} blocks)"
                )


def scan(win: Window) -> tuple[str, list[Range], int]:
    """(kind, sector ranges relative to the window, sectors the filesystem spans) of an ext2/3/4 filesystem
    at the window's start."""
    sb = parse_superblock(win.read(SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE))
    check_supported(sb)
    if sb.block_size < SECTOR:
        raise FilesystemError(f"ext: block size {sb.block_size} is below the sector size")
    spb = sb.block_size // SECTOR  # sectors per block
    if sb.blocks_count * spb > win.sectors:
        raise FilesystemError(
            f"ext: filesystem of {sb.blocks_count} blocks of {sb.block_size} bytes is larger than "
            f"{win.what} ({win.sectors} sectors)"
        )
    geo = Geometry(sb)
    table = read_group_table(win, sb, geo)
    _check_group_metadata(sb, table)
    csum_groups = sb.has(ro_compat=RO_COMPAT_GDT_CSUM | RO_COMPAT_METADATA_CSUM)

    used = RangeSet()

    ratio = sb.cluster_ratio

    def add_blocks(first: int, count: int) -> None:
        # Whole allocation units: with bigalloc the kernel marks the cluster holding any metadata block.
        end = min(-(-(first + count) // ratio) * ratio, sb.blocks_count)
        first -= first % ratio
        used.add(first * spb, (end - first) * spb)

    add_blocks(0, sb.first_data_block + 1)  # boot block and primary superblock
    for g in range(sb.group_count):
        first = geo.group_first_block(g)
        blocks = min(sb.blocks_per_group, sb.blocks_count - first)
        add_blocks(first, min(geo.base_metadata_blocks(g), blocks))
        uninit = csum_groups and table.flags[g] & BG_BLOCK_UNINIT
        if uninit and g == 0:
            raise FilesystemError("ext: block bitmap of group 0 is marked uninitialised")
        if uninit:
            # Not initialised on disk: in use are just the base metadata (above) and bitmaps / inode tables
            # that lie in this group, which are added for every group below.
            continue
        bitmap = win.read(table.block_bitmap[g] * sb.block_size, sb.block_size)
        clusters = -(-blocks // ratio)  # bits past the filesystem's end in a partial last group are padding
        for bit, nbits in set_bit_runs(bitmap, clusters):
            start = first + bit * ratio
            add_blocks(start, min(nbits * ratio, first + blocks - start))

    # Bitmaps and inode tables are in use wherever they are (with flex_bg, usually in another group),
    # bitmap or not: these arrive out of order and RangeSet merges them at the end.
    itable_blocks = sb.inode_table_blocks
    for g in range(sb.group_count):
        add_blocks(table.block_bitmap[g], 1)
        add_blocks(table.inode_bitmap[g], 1)
        add_blocks(table.inode_table[g], itable_blocks)
    return sb.kind, used.ranges(), sb.blocks_count * spb
