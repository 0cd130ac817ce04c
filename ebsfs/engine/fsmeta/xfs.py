"""The XFS walker: where an XFS filesystem keeps what a tree walk reads (AG headers,
inode B+trees, inode chunks in use, directory blocks, block-map B+tree blocks).

The walk keeps a frontier of tasks, one per metadata piece found but not yet parsed;
each wave is the whole frontier, so every AG's inode B+tree and every inode's block map
descend together and the walk costs one round trip per level of the deepest tree:
superblock, AG headers, inobt levels, inode chunks, bmbt levels, directory blocks.

Layout (big-endian, xfsprogs' libxfs/xfs_format.h): v5 ("CRC") and v4 filesystems,
v1-v3 inodes, 64-bit extent counters (NREXT64) and sparse inode chunks. Nothing is
trusted: every number is checked against the superblock's geometry and the size, a
B+tree block is followed only one level down from its parent and only once, and a piece
that fails a check is dropped (its branch ends) until MAX_DAMAGE pieces have failed.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ebsfs.engine.fsmeta.walk import FILE_RUN_MIN, Extent, FileRun, Read, WalkStopped, Wave

MAX_AGS = 65536
"""Allocation groups walked; mkfs makes tens, a few thousand at the very most."""
MAX_LEVELS = 9
"""Depth of any B+tree (inobt or bmbt): the format's own limits are below this."""
MAX_BTREE_BLOCKS = 500_000
"""inobt and bmbt blocks parsed in one walk."""
MAX_INOBT_RECORDS = 1_000_000
"""inobt records examined in one walk: 64 million inode slots, 16 x MAX_INODES. Without
it, leaves of free records, which cost a few steps each and count against nothing else,
could hold the engine's loop for some 2 minutes within MAX_BTREE_BLOCKS."""
MAX_INODES = 4_000_000
"""Inodes in use parsed in one walk (a Linux root has 100,000-500,000)."""
MAX_EXTENTS = 4_000_000
"""Extents yielded in one walk, all waves together."""
MAX_DAMAGE = 1000
"""Pieces that failed a check before the walk gives up on the filesystem."""
SYMLINK_MAPS = 3
"""XFS_SYMLINK_MAPS: a remote symlink target (at most 1024 bytes) has at most this many
extents, each of at most this many blocks."""

SB_BYTES = 512
"""The superblock's fields all lie in the first sector, whatever the sector size."""
CHUNK_INODES = 64
INODES_PER_HOLE_BIT = 4
ALL_INODES = (1 << CHUNK_INODES) - 1
_HOLES = tuple(
    sum(0xF << (INODES_PER_HOLE_BIT * i) for i in range(8) if byte >> i & 1) for byte in range(256)
)
"""A byte of a holemask -> the inodes its 8 bits cover (4 each)."""
EXTENT_SIZE = 16

S_IFMT, S_IFDIR, S_IFREG, S_IFLNK = 0o170000, 0o040000, 0o100000, 0o120000
FMT_LOCAL, FMT_EXTENTS, FMT_BTREE = 1, 2, 3
INCOMPAT_SPINODES = 1 << 1
DIFLAG2_NREXT64 = 1 << 4

_SB = struct.Struct(">4sIQ")  # magic, blocksize, dblocks
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_SHORT_HEADER = struct.Struct(">4sHH")  # magic, level, numrecs (both block forms)
_INOBT_REC = struct.Struct(">IHBBQ")  # startino, holemask, count, freecount, free
_EXTENT = struct.Struct(">QQ")

# Tasks of the frontier: what a fetched piece is, hence how it is parsed.
SUPER, AG_HEADERS, INOBT, INODES, BMBT, DATA = range(6)


@dataclass(frozen=True, slots=True)
class _Geometry:
    """What the superblock says about where things are, already checked."""

    size: int
    block: int
    sector: int
    inode: int
    agblocks: int
    agcount: int
    dblocks: int
    agblklog: int
    inopblog: int
    dir_block: int
    v5: bool
    sparse: bool

    def ag_blocks(self, agno: int) -> int:
        """Blocks in AG `agno` (the last one may be short)."""
        return min(self.agblocks, self.dblocks - agno * self.agblocks)

    def ag_start(self, agno: int) -> int:
        return agno * self.agblocks * self.block

    def fsblock(self, fsb: int, count: int) -> Extent | None:
        """The bytes of `count` blocks from file-system block `fsb` (AG number in its
        high bits), or None if they leave their AG."""
        agno, agbno = fsb >> self.agblklog, fsb & ((1 << self.agblklog) - 1)
        if agno >= self.agcount or count < 1 or agbno + count > self.ag_blocks(agno):
            return None
        return (self.ag_start(agno) + agbno * self.block, count * self.block)

    def inode_number(self, agno: int, agino: int) -> int:
        return (agno << (self.agblklog + self.inopblog)) | agino


@dataclass(frozen=True, slots=True)
class _Task:
    """One piece to fetch and then parse: `kind` says how; `agno`, `level` and `flag`
    carry what the parent knew (AG, expected B+tree level, directory or not / first
    inode of a run)."""

    kind: int
    offset: int
    length: int
    agno: int = 0
    level: int = 0
    flag: int = 0


def _power_of_two(value: int, low: int, high: int) -> bool:
    return low <= value <= high and value & (value - 1) == 0


def _geometry(sb: bytes, size: int) -> _Geometry:
    """The checked geometry of superblock `sb`; WalkStopped if it is not sane."""
    if len(sb) < 256:
        raise WalkStopped("XFS: superblock cut short")
    magic, block, dblocks = _SB.unpack_from(sb, 0)
    if magic != b"XFSB":
        raise WalkStopped("XFS: no superblock magic")
    agblocks, agcount = struct.unpack_from(">II", sb, 84)
    version, sector, inode, inopblock = struct.unpack_from(">HHHH", sb, 100)
    blocklog, _sectlog, _inodelog, inopblog, agblklog = struct.unpack_from(">5B", sb, 120)
    dirblklog = sb[192]
    incompat = _U32.unpack_from(sb, 216)[0]
    v5 = version & 0xF == 5
    sane = (
        _power_of_two(block, 512, 65536)
        and 1 << blocklog == block
        and _power_of_two(sector, 512, block)
        and _power_of_two(inode, 256, min(2048, block))
        and inopblock == block // inode
        and 1 << inopblog == inopblock
        and agcount >= 1
        and agblocks >= 64
        and agblklog <= 31
        and (1 << agblklog) >= agblocks
        and agblklog + inopblog <= 32
        and dirblklog <= 8
        and block << dirblklog <= 65536
        and (agcount - 1) * agblocks < dblocks <= agcount * agblocks
    )
    if not sane:
        raise WalkStopped("XFS: superblock geometry is not sane")
    if agcount > MAX_AGS:
        raise WalkStopped(f"XFS: {agcount} allocation groups (more than {MAX_AGS})")
    if dblocks * block > size:
        raise WalkStopped(f"XFS: {dblocks * block} bytes claimed on {size}")
    return _Geometry(
        size=size,
        block=block,
        sector=sector,
        inode=inode,
        agblocks=agblocks,
        agcount=agcount,
        dblocks=dblocks,
        agblklog=agblklog,
        inopblog=inopblog,
        dir_block=block << dirblklog,
        v5=v5,
        sparse=v5 and bool(incompat & INCOMPAT_SPINODES),
    )


class _Walk:
    """One walk's state: the frontier, what was seen, the counts against the caps."""

    def __init__(self, read: Read, geo: _Geometry, file_run: FileRun | None = None) -> None:
        self.read = read
        self.geo = geo
        self.file_run = file_run
        """Told of each long written extent of a regular file (walk.py FileRun)."""
        self.next: list[_Task] = []
        self.seen: set[int] = set()  # offsets of B+tree blocks and data extents queued
        self.extents = 0
        self.btree_blocks = 0
        self.inodes = 0
        self.inobt_records = 0
        self.damage = 0
        self.chunks: set[tuple[int, int]] = set()
        """(AG, first inode) of each inode chunk whose inodes were queued."""
        self.inode_room = geo.dblocks * geo.block // geo.inode
        """Inodes still allowed to be queued: never more than the filesystem holds, so
        overlapping chunks (damage) cannot have the same inodes parsed again and again."""

    # -- bookkeeping ---------------------------------------------------------------

    def damaged(self) -> None:
        """One piece failed a check: its branch ends; too many and the walk does."""
        self.damage += 1
        if self.damage > MAX_DAMAGE:
            raise WalkStopped(f"XFS: more than {MAX_DAMAGE} damaged metadata pieces")

    def queue(self, task: _Task) -> None:
        """Add a piece to the next wave, once, if it lies within the filesystem."""
        if task.offset < 0 or task.length <= 0 or task.offset + task.length > self.geo.size:
            self.damaged()
            return
        if task.offset in self.seen:
            if task.kind in (INOBT, BMBT):
                self.damaged()  # a second way into a B+tree block: a loop, cut here
            return
        self.seen.add(task.offset)
        self.extents += 1
        if self.extents > MAX_EXTENTS:
            raise WalkStopped(f"XFS: more than {MAX_EXTENTS} metadata extents")
        self.next.append(task)

    def queue_btree(self, kind: int, fsb_or_agbno: int, agno: int, level: int, flag: int) -> None:
        """A B+tree block, by file-system block (bmbt) or by AG block (inobt)."""
        if kind == INOBT:
            if not 0 < fsb_or_agbno < self.geo.ag_blocks(agno):
                self.damaged()
                return
            where: Extent | None = (
                self.geo.ag_start(agno) + fsb_or_agbno * self.geo.block,
                self.geo.block,
            )
        else:
            where = self.geo.fsblock(fsb_or_agbno, 1)
        if where is None:
            self.damaged()
            return
        self.queue(_Task(kind, where[0], where[1], agno, level, flag))

    # -- parsing, one kind of piece each -----------------------------------------

    async def parse(self, task: _Task) -> None:
        if task.kind == DATA:
            return  # directory blocks and symlink targets: the tool reads them, we do not
        if task.kind == AG_HEADERS:
            await self.agi(task.agno)
            return
        data = await self.read(task.offset, task.length)
        if len(data) < task.length:
            self.damaged()
        elif task.kind in (INOBT, BMBT):
            self.btree_blocks += 1
            if self.btree_blocks > MAX_BTREE_BLOCKS:
                raise WalkStopped(f"XFS: more than {MAX_BTREE_BLOCKS} B+tree blocks")
            if task.kind == INOBT:
                self.inobt(data, task)
            else:
                self.bmbt(data, task)
        elif task.kind == INODES:
            self.inode_run(data, task)

    async def agi(self, agno: int) -> None:
        """The AGI names the root of the AG's inode B+tree and its height."""
        geo = self.geo
        agi = await self.read(geo.ag_start(agno) + 2 * geo.sector, 64)
        if len(agi) < 32 or agi[:4] != b"XAGI":
            self.damaged()
            return
        seqno, _length, _count, root, levels = struct.unpack_from(">IIIII", agi, 8)
        if seqno != agno or not 1 <= levels <= MAX_LEVELS:
            self.damaged()
            return
        self.queue_btree(INOBT, root, agno, levels - 1, 0)

    def btree_header(self, data: bytes, task: _Task, magics: tuple[bytes, bytes]) -> int:
        """The number of records of a B+tree block at the level its parent expects,
        or -1 if it is not one."""
        magic, level, numrecs = _SHORT_HEADER.unpack_from(data, 0)
        if magic != magics[self.geo.v5] or level != task.level or numrecs == 0:
            return -1
        return numrecs

    def inobt(self, data: bytes, task: _Task) -> None:
        header = 56 if self.geo.v5 else 16
        numrecs = self.btree_header(data, task, (b"IABT", b"IAB3"))
        if task.level > 0:
            maxrecs = (len(data) - header) // 8
            if not 0 < numrecs <= maxrecs:
                self.damaged()
                return
            pointers = header + maxrecs * 4
            for i in range(numrecs):
                agbno = _U32.unpack_from(data, pointers + 4 * i)[0]
                self.queue_btree(INOBT, agbno, task.agno, task.level - 1, 0)
            return
        if not 0 < numrecs <= (len(data) - header) // _INOBT_REC.size:
            self.damaged()
            return
        self.inobt_records += numrecs
        if self.inobt_records > MAX_INOBT_RECORDS:
            raise WalkStopped(f"XFS: more than {MAX_INOBT_RECORDS} inobt records")
        for i in range(numrecs):
            self.inode_chunk(task.agno, *_INOBT_REC.unpack_from(data, header + 16 * i))

    def inode_chunk(
        self, agno: int, startino: int, holemask: int, _count: int, _freecount: int, free: int
    ) -> None:
        """Queue the runs of inodes in use of one chunk (not free, not in a hole), found
        with bit operations: a walk may meet millions of records, most of them free."""
        geo = self.geo
        if startino + CHUNK_INODES > geo.ag_blocks(agno) << geo.inopblog:
            self.damaged()
            return
        in_use = ~free & ALL_INODES
        if geo.sparse and holemask:  # not sparse: those bytes are the free count's high half
            in_use &= ~(_HOLES[holemask & 0xFF] | _HOLES[holemask >> 8] << 32)
        if not in_use:
            return
        if (agno, startino) in self.chunks:
            self.damaged()  # one record per chunk: a second one would queue its inodes again
            return
        self.chunks.add((agno, startino))
        base = geo.ag_start(agno) + startino * geo.inode
        while in_use:
            start = (in_use & -in_use).bit_length() - 1
            ones = in_use >> start
            count = (~ones & (ones + 1)).bit_length() - 1  # the run: trailing ones
            in_use &= ~(((1 << count) - 1) << start)
            self.inode_room -= count
            if self.inode_room < 0:
                raise WalkStopped("XFS: inode chunks overlap (more inodes than it holds)")
            self.queue(
                _Task(
                    INODES, base + start * geo.inode, count * geo.inode, agno, flag=startino + start
                )
            )

    def inode_run(self, data: bytes, task: _Task) -> None:
        size = self.geo.inode
        for i in range(len(data) // size):
            self.inodes += 1
            if self.inodes > MAX_INODES:
                raise WalkStopped(f"XFS: more than {MAX_INODES} inodes in use")
            number = self.geo.inode_number(task.agno, task.flag + i)
            self.inode(memoryview(data)[i * size : (i + 1) * size], number)

    def inode(self, raw: memoryview, number: int) -> None:
        """Queue what walking this inode needs: a directory's blocks and block map, a
        regular file's block map (never its data), a symlink's target."""
        if raw[:2] != b"IN":
            self.damaged()
            return
        mode, version, fmt = struct.unpack_from(">HBB", raw, 2)
        kind = mode & S_IFMT
        if kind not in (S_IFDIR, S_IFREG, S_IFLNK) or fmt not in (FMT_EXTENTS, FMT_BTREE):
            return  # local (short-form) directories and symlinks live in the inode
        if version == 3:
            if not self.geo.v5 or _U64.unpack_from(raw, 152)[0] != number:
                self.damaged()  # a v5 inode names itself: stale or misplaced otherwise
                return
            core = 176
            wide = _U64.unpack_from(raw, 120)[0] & DIFLAG2_NREXT64
            nextents = _U64.unpack_from(raw, 24)[0] if wide else _U32.unpack_from(raw, 76)[0]
        elif version in (1, 2):
            core = 100
            nextents = _U32.unpack_from(raw, 76)[0]
        else:
            self.damaged()
            return
        forkoff = raw[82]
        fork_size = forkoff * 8 if forkoff else len(raw) - core
        if core + fork_size > len(raw):
            self.damaged()
            return
        fork = raw[core : core + fork_size]
        if fmt == FMT_EXTENTS:
            if kind == S_IFREG:  # a regular file's extents are its data: only told
                if nextents * EXTENT_SIZE <= fork_size:
                    self.file_runs(fork, nextents)
                return
            if nextents * EXTENT_SIZE > fork_size:
                self.damaged()
                return
            if kind == S_IFLNK and nextents > SYMLINK_MAPS:
                self.damaged()
                return
            self.data_extents(fork, nextents, kind == S_IFLNK)
        else:
            self.bmbt_root(fork, kind == S_IFDIR)

    def data_extents(self, records: memoryview | bytes, count: int, symlink: bool) -> None:
        """Queue the blocks of a directory's (or symlink's) extent records."""
        for i in range(count):
            l0, l1 = _EXTENT.unpack_from(records, i * EXTENT_SIZE)
            if l0 >> 63:
                continue  # unwritten: nothing on disk to read
            fsb = ((l0 & 0x1FF) << 43) | (l1 >> 21)
            blocks = l1 & 0x1FFFFF
            if symlink and blocks > SYMLINK_MAPS:
                self.damaged()
                return
            where = self.geo.fsblock(fsb, blocks)
            if where is None:
                self.damaged()
                continue
            self.queue(_Task(DATA, *where))

    def file_runs(self, records: memoryview | bytes, count: int) -> None:
        """Tell a regular file's long written extents (its data is never queued)."""
        if self.file_run is None:
            return
        for i in range(count):
            l0, l1 = _EXTENT.unpack_from(records, i * EXTENT_SIZE)
            blocks = l1 & 0x1FFFFF
            if l0 >> 63 or blocks * self.geo.block < FILE_RUN_MIN:
                continue  # unwritten, or short enough for read-ahead's own ramp
            where = self.geo.fsblock(((l0 & 0x1FF) << 43) | (l1 >> 21), blocks)
            if where is not None:
                self.file_run(*where)

    def bmbt_root(self, fork: memoryview, directory: bool) -> None:
        """The block map's root in the inode: level, records, keys then pointers."""
        level, numrecs = struct.unpack_from(">HH", fork, 0)
        maxrecs = (len(fork) - 4) // 16
        if not 1 <= level <= MAX_LEVELS or not 0 < numrecs <= maxrecs:
            self.damaged()
            return
        pointers = 4 + maxrecs * 8
        for i in range(numrecs):
            fsb = _U64.unpack_from(fork, pointers + 8 * i)[0]
            self.queue_btree(BMBT, fsb, 0, level - 1, int(directory))

    def bmbt(self, data: bytes, task: _Task) -> None:
        header = 72 if self.geo.v5 else 24
        numrecs = self.btree_header(data, task, (b"BMAP", b"BMA3"))
        maxrecs = (len(data) - header) // 16
        if not 0 < numrecs <= maxrecs:
            self.damaged()
            return
        if task.level > 0:
            pointers = header + maxrecs * 8
            for i in range(numrecs):
                fsb = _U64.unpack_from(data, pointers + 8 * i)[0]
                self.queue_btree(BMBT, fsb, 0, task.level - 1, task.flag)
        elif task.flag:  # a directory's extents; a file's are its data
            self.data_extents(memoryview(data)[header:], numrecs, False)
        else:
            self.file_runs(memoryview(data)[header:], numrecs)


def _merged(tasks: list[_Task]) -> Wave:
    """A wave's byte extents, sorted, touching ones joined."""
    wave: Wave = []
    for offset, length in sorted((t.offset, t.length) for t in tasks):
        if wave and offset <= wave[-1][0] + wave[-1][1]:
            last_offset, last_length = wave[-1]
            wave[-1] = (last_offset, max(last_length, offset + length - last_offset))
        else:
            wave.append((offset, length))
    return wave


class XfsWalker:
    """walk.Walker for XFS."""

    name = "xfs"

    def probe(self, head: bytes) -> bool:
        return (
            len(head) >= 8
            and head[:4] == b"XFSB"
            and _power_of_two(_U32.unpack_from(head, 4)[0], 512, 65536)
        )

    reports_file_runs = True

    async def walk(
        self, read: Read, size: int, file_run: FileRun | None = None
    ) -> AsyncIterator[Wave]:
        if size < SB_BYTES:
            raise WalkStopped("XFS: smaller than a superblock")
        yield [(0, SB_BYTES)]
        geo = _geometry(await read(0, SB_BYTES), size)
        state = _Walk(read, geo, file_run)
        for agno in range(geo.agcount):
            offset = geo.ag_start(agno) + geo.sector
            state.queue(_Task(AG_HEADERS, offset, 3 * geo.sector, agno))
        for _wave in range(4 * MAX_LEVELS + 8):  # every chain is shorter than this
            if not state.next:
                return
            tasks, state.next = state.next, []
            yield _merged(tasks)
            for task in tasks:
                await state.parse(task)
        raise WalkStopped("XFS: more waves than any tree has levels")


WALKER = XfsWalker()
