"""ext2/3/4 metadata for the prefetch, one wave per level: the superblock and group
descriptors; the inode tables in use (and their bitmaps, which tools check); then every
directory's and slow symlink's blocks with every extent-tree or indirect block, of files
too, level by level, the first level joined by the rest of every inode table and
bitmap, which The Sleuth Kit reads through looking for orphan files (`fls -r` lists
them under $OrphanFiles, after the tree): mostly never written, so mostly free, but the
first blocks of each flex group's tables are, and each cost `fls -r` a round trip of
its own.

These are what `fls -r`, a timeline or `diff --files` read one dependent block at a
time. A regular file's data (its leaf extents, its direct blocks) is never followed.
Checksums are not verified (the stdlib has no crc32c): every pointer is checked against
the filesystem's size instead, every tree node is visited once, every loop is capped."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ebsfs.engine.fsmeta.ext4layout import (
    MAGIC,
    RESIZE_INODE,
    ROOT_INODE,
    SUPERBLOCK,
    Geometry,
    descriptors,
    geometry,
    u16,
    u32,
)
from ebsfs.engine.fsmeta.walk import FILE_RUN_MIN, Extent, FileRun, Read, WalkStopped, Wave

EXTENT_MAGIC = 0xF30A

MAX_INODES = 1 << 24
"""Inode slots examined in all (4 GiB of tables at 256 bytes an inode)."""
MAX_EXTENTS = 1 << 21
"""Extents yielded in all; reaching it ends the walk after the wave in hand."""
MAX_DEPTH = 5
"""ext4's own limit on an extent tree's depth (a block map has 3 levels)."""
MAX_WAVES = 12
"""Levels below the inode tables are at most MAX_DEPTH + 1: more means a loop."""
MAX_DIR_BYTES = 1 << 32
"""Largest directory or symlink whose blocks are followed (largedir's own ceiling)."""
TABLE_SLICE = 512
"""Inodes parsed per read. The walk parses on the engine's loop, which the tools' reads
wait for between two reads: about 7 us an inode parsed here (py-spy), so a group's
8,192 inodes at once held them some 55 ms, 512 about 3.5 ms. The scan (`_SCAN`) passes
over free slots and small files at under 1 us each."""
MAX_SLOT_SWEEP = 1 << 30
"""Bytes of unused inode slots in the last wave at the most (4 million inodes of 256
bytes, a 64 GiB filesystem at mkfs's default ratio): past it, the slots of the first
groups only."""

BG_INODE_UNINIT = 0x1
INODE_EXTENTS_FL = 0x80000
INODE_INLINE_DATA_FL = 0x10000000
S_IFMT, S_IFDIR, S_IFREG, S_IFLNK = 0xF000, 0x4000, 0x8000, 0xA000
FAST_SYMLINK = 60
"""A symlink target shorter than this is kept in i_block itself."""

_INODE = struct.Struct("<H2xI18xH4xI4x60s8xI")
"""mode, size_lo, links_count, flags, i_block, size_high: the first 112 bytes."""
_SCAN = "<H2xI18xH4xI10xH60xI"
"""mode, size_lo, links_count, flags, the inline extent header's depth, size_high: what
tells an inode the walk has nothing to do for (`_Pass.skips`), read for a whole slice of
a table at once (struct.iter_unpack, padded to the inode size)."""
_HEADER = struct.Struct("<HHHH4x")
"""Extent header: magic, entries, max, depth."""
_LEAF = struct.Struct("<IHHI")
"""Extent: first logical block, length, start (high 16, low 32 bits)."""
_INDEX = struct.Struct("<IIH2x")
"""Extent index: first logical block, child (low 32, high 16 bits)."""
UNWRITTEN = 32768
"""An extent longer than this is unwritten (reads as zeros): nothing to fetch."""


@dataclass(frozen=True)
class _Node:
    """A block of a tree to read once its wave is fetched."""

    block: int
    level: int
    """Extent node: the depth its header must state. Block map: 1 = indirect, 2, 3."""
    extents: bool
    data: bool
    """A directory or symlink: leaf extents / mapped blocks are metadata too."""
    blocks: int
    """The file's length in blocks: nothing mapped at or beyond it is followed."""
    first: int = 0
    """Block map: the logical block the node starts at."""


class _Pass:
    """One walk's state: what the next wave holds and which nodes it must parse."""

    def __init__(self, geo: Geometry, file_run: FileRun | None = None) -> None:
        self.geo = geo
        self.file_run = file_run
        """Told of each long extent of a regular file's data (walk.py FileRun)."""
        self.wave: list[Extent] = []
        self.nodes: list[_Node] = []
        self.seen: set[int] = set()
        self.count = 0
        self.room = geo.blocks
        """Blocks still allowed: real metadata never adds up to more than the disk."""
        self.stopped = ""
        self.run_blocks = -(-FILE_RUN_MIN // geo.block_size)
        """Blocks a file run spans at the least (walk.py FILE_RUN_MIN)."""

    def extent(self, block: int, count: int) -> bool:
        """Add blocks to the wave if they lie in the filesystem and the cap allows."""
        if block <= 0 or count <= 0 or block + count > self.geo.blocks:
            return False
        if self.count >= MAX_EXTENTS:
            self.stopped = f"more than {MAX_EXTENTS} extents"
            return False
        if count > self.room:
            self.stopped = "more metadata than the disk holds"
            return False
        self.count += 1
        self.room -= count
        self.wave.append((block * self.geo.block_size, count * self.geo.block_size))
        return True

    def node(self, node: _Node) -> None:
        """A tree block: fetched in this wave, parsed after it; each block once."""
        if node.block not in self.seen and self.extent(node.block, 1):
            self.seen.add(node.block)
            self.nodes.append(node)

    def take(self) -> Wave:
        """The wave in hand, merged (flex_bg tables and runs of blocks touch)."""
        merged: list[Extent] = []
        for offset, length in sorted(self.wave):
            if merged and offset <= merged[-1][0] + merged[-1][1]:
                last = merged[-1]
                merged[-1] = (last[0], max(last[1], offset + length - last[0]))
            else:
                merged.append((offset, length))
        self.wave = []
        return merged

    def skips(self, mode: int, size: int, links: int, flags: int, depth: int) -> bool:
        """True for an inode `inode` would queue nothing for, told from a few fields in
        C (`_SCAN`): free slots, and small regular files whose tree is all in the inode.
        A table of 40,000 small files parsed in 0.32 s inode by inode, which the walk's
        next wave (and `fls -r`) waited for."""
        if not links or not mode:
            return True
        if mode & S_IFMT != S_IFREG:
            return False
        blocks = -(-size // self.geo.block_size)
        if blocks >= self.run_blocks:
            return False  # may hold a file run to tell
        if flags & INODE_EXTENTS_FL:
            return depth == 0  # its extents are in the inode: nothing to fetch
        return blocks <= 12  # direct blocks only: no indirect block to fetch

    def inode(self, raw: memoryview, number: int) -> None:
        """Queue what one inode's tree needs, if it is in use and holds any."""
        mode, size_lo, links, flags, iblock, size_hi = _INODE.unpack_from(raw)
        if not links or not mode:
            return
        if number == RESIZE_INODE:
            self.extent(struct.unpack_from("<I", iblock, 13 * 4)[0], 1)
            return  # its double-indirect block: its indirect ones are the reserved GDT
        if number < self.geo.first_ino and number not in (ROOT_INODE, self.geo.journal):
            return  # reserved inodes no tool walking the tree reads
        kind = mode & S_IFMT
        if kind not in (S_IFDIR, S_IFREG, S_IFLNK) or flags & INODE_INLINE_DATA_FL:
            return
        size = size_lo | size_hi << 32
        extents = bool(flags & INODE_EXTENTS_FL)
        if kind == S_IFLNK and size < FAST_SYMLINK and not extents:
            return
        data = kind != S_IFREG
        if data and size > MAX_DIR_BYTES:
            size = MAX_DIR_BYTES
        blocks = -(-size // self.geo.block_size)
        if extents:
            self.extent_node(bytes(iblock), _Node(0, -1, True, data, blocks))
        else:
            self.inode_map(struct.unpack("<15I", iblock), data, blocks)

    def extent_node(self, raw: bytes, node: _Node) -> None:
        """An extent tree node: its children next wave; a directory's data extents too."""
        magic, entries, maximum, depth = _HEADER.unpack_from(raw)
        capacity = (len(raw) - _HEADER.size) // _LEAF.size
        if magic != EXTENT_MAGIC or entries > min(maximum, capacity) or depth > MAX_DEPTH:
            return
        if node.level >= 0 and depth != node.level:
            return  # a child must be exactly one level down: this cuts cycles too
        for i in range(entries):
            at = _HEADER.size + i * _LEAF.size
            if depth == 0:
                if not node.data:
                    self._file_runs(raw, entries, node)  # a file's data is not ours
                    return
                logical, length, hi, lo = _LEAF.unpack_from(raw, at)
                if length <= UNWRITTEN and logical < node.blocks:
                    self.extent(hi << 32 | lo, min(length, node.blocks - logical))
            else:
                logical, lo, hi = _INDEX.unpack_from(raw, at)
                if logical < node.blocks:
                    self.node(_Node(hi << 32 | lo, depth - 1, True, node.data, node.blocks))

    def _file_runs(self, raw: bytes, entries: int, node: _Node) -> None:
        """Tell the long written extents of a regular file's leaf (inside the
        filesystem, within the file's size) as file runs."""
        if self.file_run is None:
            return
        bs = self.geo.block_size
        for i in range(entries):
            logical, length, hi, lo = _LEAF.unpack_from(raw, _HEADER.size + i * _LEAF.size)
            start = hi << 32 | lo
            if length > UNWRITTEN:
                continue  # unwritten: reads as zeros, whatever its blocks hold
            length = min(length, node.blocks - logical)
            if length >= self.run_blocks and start > 0 and start + length <= self.geo.blocks:
                self.file_run(start * bs, length * bs)

    def inode_map(self, pointers: tuple[int, ...], data: bool, blocks: int) -> None:
        """An old block-mapped inode: 12 direct blocks, then indirect, double, triple."""
        per = self.geo.block_size // 4
        if data:
            for logical, block in enumerate(pointers[:12]):
                if logical < blocks and block:
                    self.extent(block, 1)
        first = 12
        for level, block in enumerate(pointers[12:], start=1):
            if first < blocks and block:
                self.node(_Node(block, level, False, data, blocks, first))
            first += per**level

    def map_node(self, raw: bytes, node: _Node) -> None:
        """An indirect block: its pointers are data (level 1) or lower indirect blocks."""
        pointers = struct.unpack(f"<{len(raw) // 4}I", raw)
        span = (self.geo.block_size // 4) ** (node.level - 1)
        for i, block in enumerate(pointers):
            logical = node.first + i * span
            if logical >= node.blocks:
                return
            if not block:
                continue
            if node.level > 1:
                self.node(_Node(block, node.level - 1, False, node.data, node.blocks, logical))
            elif node.data:
                self.extent(block, 1)


class Ext4Walker:
    """ext2, ext3 and ext4 (the superblock magic is the same)."""

    name = "ext4"

    def probe(self, head: bytes) -> bool:
        """The superblock magic and a block size ext4 allows."""
        return (
            len(head) >= SUPERBLOCK + 1024
            and u16(head, SUPERBLOCK + 0x38) == MAGIC
            and u32(head, SUPERBLOCK + 0x18) <= 6
        )

    reports_file_runs = True

    async def walk(
        self, read: Read, size: int, file_run: FileRun | None = None
    ) -> AsyncIterator[Wave]:
        """Superblock and descriptors; reserved GDT blocks and inode tables; then the
        trees level by level; regular files' long extents told to `file_run` as they
        are parsed."""
        if size < SUPERBLOCK + 1024:
            raise WalkStopped("too small for ext2/3/4")
        geo = geometry(await read(SUPERBLOCK, 1024), size)
        for offset, length in geo.descriptors:
            if offset + length > size:
                raise WalkStopped("group descriptors past the end of the filesystem")
        yield [(SUPERBLOCK, 1024), *geo.descriptors]
        gdt = b"".join([await read(offset, length) for offset, length in geo.descriptors])
        walk = _Pass(geo, file_run)
        # Not in the first wave: the walk goes on only once a wave is in, and these
        # 4 MiB (an 8 GiB disk) held the inode tables back a round trip.
        for offset, length in geo.reserved_gdt:
            walk.extent(offset // geo.block_size, length // geo.block_size)
        tables = self._tables(walk, gdt)
        if walk.wave:
            yield walk.take()
        scan = struct.Struct(_SCAN + f"{geo.inode_size - struct.calcsize(_SCAN)}x")
        examined = 0
        for group, block, used in tables:
            if examined + used > MAX_INODES:
                walk.stopped = f"more than {MAX_INODES} inodes"
                break
            examined += used
            first = group * geo.inodes_per_group + 1
            for start in range(0, used, TABLE_SLICE):
                count = min(TABLE_SLICE, used - start)
                at = block * geo.block_size + start * geo.inode_size
                raw = memoryview(await read(at, count * geo.inode_size))
                raw = raw[: len(raw) // geo.inode_size * geo.inode_size]
                for i, (mode, lo, links, flags, depth, hi) in enumerate(scan.iter_unpack(raw)):
                    if not walk.skips(mode, lo | hi << 32, links, flags, depth):
                        inode = raw[i * geo.inode_size : (i + 1) * geo.inode_size]
                        walk.inode(inode, first + start + i)
        # The unused slots ride with the first level of the trees, after its extents
        # (the budget is spent in wave order): TSK reads them only after the tree, but
        # a wave of their own cost the walk a round trip more.
        tree = walk.take()
        self._unused_slots(walk, gdt, tables)
        slots = walk.take()
        for level in range(MAX_WAVES):
            nodes, walk.nodes = walk.nodes, []
            wave = tree + slots if level == 0 else walk.take()
            if wave:
                yield wave
            if walk.stopped:
                raise WalkStopped(walk.stopped)
            if not nodes:
                return
            for node in nodes:
                found = await read(node.block * geo.block_size, geo.block_size)
                if len(found) < geo.block_size:
                    continue
                if node.extents:
                    walk.extent_node(found, node)
                else:
                    walk.map_node(found, node)
        raise WalkStopped(f"trees deeper than {MAX_WAVES} levels")

    def _unused_slots(self, walk: _Pass, gdt: bytes, read: list[tuple[int, int, int]]) -> bool:
        """Queue every inode table's blocks not read yet and every group's inode bitmap
        (up to MAX_SLOT_SWEEP bytes, in group order); True if any were queued."""
        geo = walk.geo
        done = {group: used for group, _, used in read}
        room = MAX_SLOT_SWEEP // geo.block_size
        full = -(-geo.inodes_per_group * geo.inode_size // geo.block_size)
        for group, desc in enumerate(descriptors(geo, gdt)):
            if room <= 0:
                break
            skip = -(-done.get(group, 0) * geo.inode_size // geo.block_size)
            count = min(full - skip, room)
            if count > 0 and walk.extent(desc.table + skip, count):
                room -= count
                if group not in done:
                    walk.extent(desc.bitmap, 1)
        return bool(walk.wave)

    def _tables(self, walk: _Pass, gdt: bytes) -> list[tuple[int, int, int]]:
        """(group, first block, inodes in use) of each inode table worth reading, its
        blocks and the group's inode bitmap added to the wave."""
        geo = walk.geo
        tables = []
        for group, desc in enumerate(descriptors(geo, gdt)):
            used = geo.inodes_per_group
            if geo.uninit_valid:
                if desc.flags & BG_INODE_UNINIT:
                    continue
                used = max(0, used - desc.unused)
            elif desc.free == used:
                continue  # no inode in use: the count is journalled with the bitmap
            length = -(-used * geo.inode_size // geo.block_size)
            if used == 0:
                continue
            if walk.extent(desc.table, length):
                walk.extent(desc.bitmap, 1)
                tables.append((group, desc.table, used))
        return tables


WALKER = Ext4Walker()
