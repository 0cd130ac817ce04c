"""ext2/3/4's layout as the superblock and group descriptors describe it: block and
inode sizes, the groups, where each group's descriptors, inode table and bitmap are.
Every count is checked against the device's size before the walk (ext4.py) trusts it."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from ebsfs.engine.fsmeta.walk import Extent, WalkStopped

SUPERBLOCK = 1024
MAGIC = 0xEF53

MAX_GROUPS = 1 << 19
"""Block groups read: 64 TiB of 4 KiB blocks, the largest EBS volume."""

# Superblock features that change where metadata is (ext4's disk layout document).
INCOMPAT_COMPRESSION = 0x1
INCOMPAT_JOURNAL_DEV = 0x8
INCOMPAT_META_BG = 0x10
INCOMPAT_64BIT = 0x80
INCOMPAT_KNOWN = 0x3F7DF  # every incompat feature e2fsprogs 1.47 knows
RO_COMPAT_SPARSE_SUPER = 0x1
RO_COMPAT_GDT_CSUM = 0x10
RO_COMPAT_METADATA_CSUM = 0x400
COMPAT_HAS_JOURNAL = 0x4
COMPAT_RESIZE_INODE = 0x10
COMPAT_SPARSE_SUPER2 = 0x200

ROOT_INODE = 2
RESIZE_INODE = 7


@dataclass(frozen=True)
class Geometry:
    """What the superblock says, checked."""

    block_size: int
    blocks: int
    """Blocks a pointer may name: the superblock's count, cut to the device's size."""
    groups: int
    inodes_per_group: int
    inode_size: int
    desc_size: int
    first_ino: int
    journal: int
    """The journal's inode: reserved, yet its block map is read at every open (jbd2,
    The Sleuth Kit), so its indirect or extent-tree blocks are fetched."""
    uninit_valid: bool
    """GDT_CSUM or METADATA_CSUM: bg_itable_unused and INODE_UNINIT can be trusted."""
    descriptors: list[Extent] = field(hash=False)
    """Where the group descriptors are, in group order."""
    reserved_gdt: list[Extent] = field(hash=False, default_factory=list)
    """Group 0's reserved GDT blocks (resize_inode: room for the descriptors of a grown
    filesystem), right after its descriptors. They are the resize inode's indirect
    blocks, which The Sleuth Kit reads through first thing at every open: on an 8 GiB
    disk 4 MiB past the superblock, two round trips of `fls -r` (issue 25)."""


def u32(raw: bytes, offset: int) -> int:
    return int(struct.unpack_from("<I", raw, offset)[0])


def u16(raw: bytes, offset: int) -> int:
    return int(struct.unpack_from("<H", raw, offset)[0])


def geometry(sb: bytes, size: int) -> Geometry:
    """The layout a superblock (its 1024 bytes) describes, or WalkStopped saying why it
    cannot be followed."""
    if len(sb) < 1024 or u16(sb, 0x38) != MAGIC:
        raise WalkStopped("no ext2/3/4 superblock")
    log_block = u32(sb, 0x18)
    if log_block > 6:
        raise WalkStopped(f"block size 2^{10 + log_block} bytes")
    bs = 1024 << log_block
    compat, incompat, ro_compat = u32(sb, 0x5C), u32(sb, 0x60), u32(sb, 0x64)
    for flag, name in (
        (INCOMPAT_JOURNAL_DEV, "an external journal device, no filesystem"),
        (INCOMPAT_COMPRESSION, "compression"),
        (~INCOMPAT_KNOWN & 0xFFFFFFFF, f"unknown incompat features {incompat:#x}"),
    ):
        if incompat & flag:
            raise WalkStopped(f"ext4 with {name}")
    wide = bool(incompat & INCOMPAT_64BIT)
    desc_size = u16(sb, 0xFE) if wide else 32
    if desc_size < 32 or desc_size > bs or desc_size & (desc_size - 1):
        raise WalkStopped(f"group descriptors of {desc_size} bytes")
    blocks_count = u32(sb, 0x04) | (u32(sb, 0x150) << 32 if wide else 0)
    first_data = u32(sb, 0x14)
    per_group, ipg = u32(sb, 0x20), u32(sb, 0x28)
    # mke2fs's own bounds: at least 256 blocks a group (bigalloc groups are larger).
    if not 0 < ipg <= 8 * bs or per_group < 256 or first_data >= blocks_count:
        raise WalkStopped("damaged superblock (group sizes)")
    if blocks_count > size // bs + per_group:  # its groups' descriptors would be parsed in vain
        raise WalkStopped(f"{blocks_count} blocks claimed, the device holds {size // bs}")
    groups = -(-(blocks_count - first_data) // per_group)
    if groups > MAX_GROUPS or groups * ipg != u32(sb, 0x00):
        raise WalkStopped(f"damaged superblock ({groups} groups, {u32(sb, 0)} inodes)")
    revision = u32(sb, 0x4C)
    inode_size = u16(sb, 0x58) if revision else 128
    first_ino = u32(sb, 0x54) if revision else 11
    if inode_size < 128 or inode_size > bs or inode_size & (inode_size - 1):
        raise WalkStopped(f"inodes of {inode_size} bytes")
    per_block = bs // desc_size
    if incompat & INCOMPAT_META_BG:
        first_meta = min(u32(sb, 0x104), -(-groups // per_block))
    else:
        first_meta = -(-groups // per_block)
    gdt = (first_data + 1) * bs
    descriptors = [(gdt, min(first_meta * per_block, groups) * desc_size)]
    backups = (u32(sb, 0x24C), u32(sb, 0x250))
    for meta in range(first_meta * per_block, groups, per_block):
        # meta_bg: each run of per_block groups keeps its descriptors in its first group,
        # after that group's superblock copy if it has one.
        sparse = ro_compat & RO_COMPAT_SPARSE_SUPER, compat & COMPAT_SPARSE_SUPER2
        start = first_data + meta * per_group + (1 if _has_super(meta, *sparse, backups) else 0)
        descriptors.append((start * bs, min(per_block, groups - meta) * desc_size))
    reserved_gdt = []
    if compat & COMPAT_RESIZE_INODE and not incompat & INCOMPAT_META_BG:
        # The resize inode's double-indirect block names at most bs / 4 of them.
        count = min(u16(sb, 0xCE), bs // 4)
        start = gdt + -(-descriptors[0][1] // bs) * bs
        if count and start + count * bs <= min(blocks_count, size // bs) * bs:
            reserved_gdt.append((start, count * bs))
    return Geometry(
        block_size=bs,
        blocks=min(blocks_count, size // bs),
        groups=groups,
        inodes_per_group=ipg,
        inode_size=inode_size,
        desc_size=desc_size,
        first_ino=max(first_ino, ROOT_INODE + 1),
        journal=u32(sb, 0xE0) if compat & COMPAT_HAS_JOURNAL else 0,
        uninit_valid=bool(ro_compat & (RO_COMPAT_GDT_CSUM | RO_COMPAT_METADATA_CSUM)),
        descriptors=[d for d in descriptors if d[1] > 0],
        reserved_gdt=reserved_gdt,
    )


def _has_super(group: int, sparse: int, sparse2: int, backups: tuple[int, int]) -> bool:
    """Whether a group starts with a copy of the superblock."""
    if group == 0:
        return True
    if sparse2:
        return group in backups
    if not sparse:
        return True
    if group == 1:
        return True
    for base in (3, 5, 7):
        n = base
        while n < group:
            n *= base
        if n == group:
            return True
    return False


class _Descriptor(NamedTuple):
    """The fields of a group descriptor the walk uses (64-bit halves joined)."""

    bitmap: int
    table: int
    free: int
    flags: int
    unused: int


def descriptors(geo: Geometry, gdt: bytes) -> Iterator[_Descriptor]:
    """Each group's descriptor in group order, up to the first the table cuts short."""
    for group in range(geo.groups):
        raw = gdt[group * geo.desc_size : (group + 1) * geo.desc_size]
        if len(raw) < 32:
            return
        bitmap, table = u32(raw, 0x04), u32(raw, 0x08)
        free, flags, unused = u16(raw, 0x0E), u16(raw, 0x12), u16(raw, 0x1C)
        if geo.desc_size >= 64:
            bitmap |= u32(raw, 0x24) << 32
            table |= u32(raw, 0x28) << 32
            free |= u16(raw, 0x2E) << 16
            unused |= u16(raw, 0x32) << 16
        yield _Descriptor(bitmap, table, free, flags, unused)
