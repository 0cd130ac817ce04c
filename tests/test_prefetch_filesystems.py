"""The metadata prefetch (issue 25) end to end on real filesystems: ext4, XFS and NTFS
images made by mkfs (NTFS filled through an ntfs-3g mount: the mount tier), served by
the in-process emulator and read through `ebsfs.open`, so the real engine runs the real
walkers. What the prefetch fetched is seen from the service's side (the emulator's
GetSnapshotBlock calls) and checked against where file content and directories lie,
found without the walkers (pytsk3, dumpe2fs, libfsxfs, superblock fields, magic
numbers): no block of file content, every directory's blocks, no more blocks than the
budget. Damaged or hostile metadata ends the walk quickly with a log line, and every
read still returns the image's bytes. `diff --files` lists the same with the prefetch
on and off, and with it on the tool itself waits for fewer calls.

Run with `-s` to see the figures."""

from __future__ import annotations

import logging
import os
import random
import re
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import ebsfs
from ebsfs.constants import BLOCK_SIZE
from ebsfs.emulator import EmulatorServer, Faults, SnapshotStore
from ebsfs.engine.fsmeta.walk import HEAD_SIZE, Extent
from ebsfs.fileobj import SnapshotFile
from ebsfs.forensics.filediff import FileDiff
from tests.disks import MiB, build_ext4, build_ntfs, build_xfs
from tests.fsmeta_helpers import blocks_of, content_blocks, marker_file

SNAP = "snap-0fe7"
FIRST, SECOND = "snap-0d1f", "snap-0d2f"
SIZES = {"ext4": 160 * MiB, "xfs": 64 * MiB, "ntfs": 64 * MiB}
"""ext4: two block groups (4 KiB blocks); XFS: four allocation groups of 16 MiB."""
QUICK = 10.0
"""Seconds a walk may take, damaged or not (a clean one takes a fraction of one)."""
BUDGET = 2
"""Blocks of the small budget: each clean walk wants more than this."""
PIECE = 8 * MiB
"""Bytes compared at once when the whole image is read back."""

FSTYPES = [
    "ext4",
    "xfs",
    pytest.param("ntfs", marks=pytest.mark.mount),  # build_ntfs fills through ntfs-3g
]


# -- the images ---------------------------------------------------------------------------


def tree() -> dict[str, bytes]:
    """About 430 small text files in about 150 nested directories, one directory of 200
    names (several blocks, an index), and three large files of MARKER only, so blocks of
    nothing but file content can be found without the walkers."""
    rng = random.Random("prefetch-filesystems")
    files: dict[str, bytes] = {}
    for top in ("etc", "usr/lib", "usr/share/doc", "var/lib", "opt/app", "home/alice"):
        for p in range(8):
            for s in range(2):
                for i in range(4):
                    name = f"{top}/pkg{p}/sub{s}/file{i}.txt"
                    files[name] = (f"{name}: line\n" * rng.randint(1, 300)).encode()
            files[f"{top}/pkg{p}/readme"] = f"package {p} of {top}\n".encode()
    for i in range(200):
        files[f"var/spool/mail/message-{i:05d}.eml"] = f"message {i}\n".encode()
    for i, size in enumerate((3 * MiB + 100, 2 * MiB + 7, 4 * MiB)):
        files[f"var/cache/big{i}.bin"] = marker_file(size)
    return files


class Volumes:
    """One image per filesystem, built on first use (NTFS needs root: only the tests
    marked `mount` ask for it)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._built: dict[str, Path] = {}

    def path(self, fstype: str) -> Path:
        if fstype not in self._built:
            path = self.directory / f"{fstype}.img"
            size = SIZES[fstype]
            if fstype == "ext4":
                build_ext4(path, size, tree(), "prefetch", "5e1f0e5e-0000-4000-8000-000000002525")
            elif fstype == "xfs":
                build_xfs(path, size, tree(), "prefetch", "5e1f0e5e-0000-4000-8000-000000002526")
            else:
                build_ntfs(path, size, tree(), "prefetch", "5E1F0E5E00002527")
            self._built[fstype] = path
        return self._built[fstype]


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> Volumes:
    return Volumes(tmp_path_factory.mktemp("prefetch-filesystems"))


# -- where the directories are, found without the walkers -----------------------------------


def tsk_directories(path: Path) -> tuple[Any, list[Any]]:
    """pytsk3's filesystem and a File for every directory (the root included, TSK's
    virtual $OrphanFiles not)."""
    import pytsk3

    fs = pytsk3.FS_Info(pytsk3.Img_Info(str(path)))
    root = fs.open("/")
    found = [root]
    seen = {int(root.info.meta.addr)}
    stack = [root.as_directory()]
    while stack:
        for entry in stack.pop():
            name, meta = entry.info.name.name, entry.info.meta
            if name in (b".", b"..", b"$OrphanFiles") or meta is None:
                continue
            if meta.type != pytsk3.TSK_FS_META_TYPE_DIR or int(meta.addr) in seen:
                continue
            seen.add(int(meta.addr))
            found.append(fs.open_meta(inode=meta.addr))
            stack.append(entry.as_directory())
    return fs, found


def runs(f: Any, block_size: int, kind: int | None = None) -> list[Extent]:
    """Byte extents of the non-resident attributes of a pytsk3 File (of type `kind`
    only, when given), holes left out."""
    import pytsk3

    skip = pytsk3.TSK_FS_ATTR_RUN_FLAG_SPARSE | pytsk3.TSK_FS_ATTR_RUN_FLAG_FILLER
    found = []
    for attr in f:
        if not int(attr.info.flags) & pytsk3.TSK_FS_ATTR_NONRES:
            continue
        if kind is not None and int(attr.info.type) != kind:
            continue
        for run in attr:
            if not int(run.flags) & skip and int(run.len) > 0:
                found.append((int(run.addr) * block_size, int(run.len) * block_size))
    return found


def ext4_directories(path: Path) -> list[Extent]:
    """Every directory's blocks (pytsk3) and its inode (the inode tables dumpe2fs names)."""
    fs, directories = tsk_directories(path)
    out = subprocess.run(["dumpe2fs", str(path)], capture_output=True, text=True).stdout
    head = dict(re.findall(r"^([A-Za-z ]+):\s+(\S+)", out, re.M))
    bs, ipg, isize = (int(head[k]) for k in ("Block size", "Inodes per group", "Inode size"))
    tables = [int(start) for start in re.findall(r"Inode table at (\d+)-\d+", out)]
    extents = []
    for d in directories:
        extents += runs(d, bs)
        group, slot = divmod(int(d.info.meta.addr) - 1, ipg)
        extents.append((tables[group] * bs + slot * isize, isize))
    return extents


def ntfs_directories(path: Path) -> list[Extent]:
    """Every directory's index blocks ($INDEX_ALLOCATION's runs, pytsk3) and its MFT
    record (placed through $MFT's own runs, the record size from the boot sector)."""
    import pytsk3

    fs, directories = tsk_directories(path)
    cluster = int(fs.info.block_size)
    with open(path, "rb") as f:
        boot = f.read(512)
    per_record = struct.unpack_from("<b", boot, 0x40)[0]
    record = 1 << -per_record if per_record < 0 else per_record * cluster
    mft: list[tuple[int, int, int]] = []  # (first byte in $MFT, byte on disk, length)
    for attr in fs.open_meta(inode=0):
        if int(attr.info.type) == pytsk3.TSK_FS_ATTR_TYPE_NTFS_DATA:
            mft += [
                (int(run.offset) * cluster, int(run.addr) * cluster, int(run.len) * cluster)
                for run in attr
            ]
    extents = []
    for d in directories:
        extents += runs(d, cluster, pytsk3.TSK_FS_ATTR_TYPE_NTFS_IDXALLOC)
        at = int(d.info.meta.addr) * record
        extents += [(disk + at - vcn, record) for vcn, disk, n in mft if vcn <= at < vcn + n]
    return extents


@dataclass(frozen=True)
class XfsGeometry:
    """Superblock fields (xfs_format.h), read here rather than by the walker."""

    block: int
    agblocks: int
    agcount: int
    sector: int
    inode: int
    inopblog: int
    agblklog: int
    rootino: int

    @classmethod
    def of(cls, path: Path) -> XfsGeometry:
        with open(path, "rb") as f:
            sb = f.read(512)
        assert sb[:4] == b"XFSB"
        return cls(
            block=struct.unpack_from(">I", sb, 4)[0],
            agblocks=struct.unpack_from(">I", sb, 84)[0],
            agcount=struct.unpack_from(">I", sb, 88)[0],
            sector=struct.unpack_from(">H", sb, 102)[0],
            inode=struct.unpack_from(">H", sb, 104)[0],
            inopblog=sb[123],
            agblklog=sb[124],
            rootino=struct.unpack_from(">Q", sb, 56)[0],
        )

    def inode_offset(self, ino: int) -> int:
        agno = ino >> (self.inopblog + self.agblklog)
        agino = ino & ((1 << (self.inopblog + self.agblklog)) - 1)
        block = agno * self.agblocks + (agino >> self.inopblog)
        return block * self.block + (agino & ((1 << self.inopblog) - 1)) * self.inode


XFS_DIR_MAGICS = (b"XDB3", b"XDD3", b"XDF3")
"""v5 directory blocks: single-block, data and free-index (xfs_da_format.h)."""
XFS_DA_MAGICS = (0x3DF1, 0x3DFF, 0x3EBE)
"""v5 directory leaf, leafn and da-node blocks: a 16-bit magic at byte 8."""


def xfs_directories(path: Path) -> list[Extent]:
    """Every directory's inode (libfsxfs names the directories; the superblock places
    the inodes) and every directory block in the image (by its magic)."""
    pyfsxfs = pytest.importorskip("pyfsxfs")  # an optional extra, as in test_fsmeta_xfs
    geo = XfsGeometry.of(path)
    volume = pyfsxfs.volume()
    volume.open(str(path))
    try:
        stack = [volume.get_root_directory()]
        extents = []
        while stack:
            d = stack.pop()
            extents.append((geo.inode_offset(int(d.inode_number)), geo.inode))
            for k in range(int(d.number_of_sub_file_entries)):
                child = d.get_sub_file_entry(k)
                if int(child.file_mode) & 0o170000 == 0o040000:
                    stack.append(child)
    finally:
        volume.close()
    with open(path, "rb") as f:
        data = f.read()
    for at in range(0, len(data), geo.block):
        da = struct.unpack_from(">H", data, at + 8)[0]
        if data[at : at + 4] in XFS_DIR_MAGICS or da in XFS_DA_MAGICS:
            extents.append((at, geo.block))
    return extents


DIRECTORIES: dict[str, Callable[[Path], list[Extent]]] = {
    "ext4": ext4_directories,
    "xfs": xfs_directories,
    "ntfs": ntfs_directories,
}


# -- serving and walking ------------------------------------------------------------------


@contextmanager
def serving(*snapshots: tuple[str, Path], latency: float = 0.0) -> Iterator[EmulatorServer]:
    """The emulator holding image files as snapshots, each a child of the one before."""
    store = SnapshotStore(Faults(latency=latency, list_rate=0, get_rate=0, seed=1))
    parent = None
    for snapshot_id, path in snapshots:
        store.add_image(snapshot_id, path, parent=parent)
        parent = snapshot_id
    with EmulatorServer(store) as server:
        yield server


def settled(f: SnapshotFile, label: str, limit: float = QUICK) -> dict[str, Any]:
    """The walk's counters once it has ended (finished or stopped), waiting at most
    `limit` seconds."""
    deadline = time.monotonic() + limit
    while True:
        walks = f.stats()["metadata_prefetch"]["filesystems"]
        if label in walks and walks[label]["state"] != "running":
            return dict(walks[label])
        assert time.monotonic() < deadline, f"{label}: no end of the walk in {limit} s: {walks}"
        time.sleep(0.01)


def gets(server: EmulatorServer, snapshot_id: str) -> set[int]:
    """The blocks of a snapshot the service was asked for so far."""
    return {i for (s, i), n in server.counters.block_gets.items() if s == snapshot_id and n}


def reads_back(f: SnapshotFile, path: Path) -> None:
    """Every byte read through `f` is the image file's: all of it in order, then 200
    reads of odd sizes at odd offsets (and zeros past it: the volume is whole GiB)."""
    with open(path, "rb") as local:
        size = os.fstat(local.fileno()).st_size
        assert f.size >= size
        for offset in range(0, size, PIECE):
            assert f.pread(PIECE, offset) == os.pread(local.fileno(), PIECE, offset), offset
        assert f.pread(PIECE, size) == bytes(min(PIECE, f.size - size))
        rng = random.Random(size)
        for _ in range(200):
            offset, length = rng.randrange(size), rng.choice((1, 511, 4097, BLOCK_SIZE + 3))
            assert f.pread(length, offset) == os.pread(local.fileno(), length, offset), offset


@dataclass
class Walked:
    """One walk through `ebsfs.open`: its counters, the blocks the service was asked for
    besides the head's, and how long it took from the head read."""

    walk: dict[str, Any]
    prefetch: dict[str, Any]
    fetched: set[int]
    seconds: float


def walk_image(path: Path, **options: Any) -> Walked:
    """Serve `path`, open it as a tool would, read its head, wait for the walk to end;
    then check that every read returns the file's bytes."""
    with (
        serving((SNAP, path)) as server,
        open(path, "rb") as local,
        ebsfs.open(SNAP, endpoint_url=server.url, readahead=False, **options) as f,
    ):
        started = time.monotonic()
        assert f.pread(HEAD_SIZE, 0) == local.read(HEAD_SIZE)
        walk = settled(f, SNAP)
        seconds = time.monotonic() - started
        prefetch = f.stats()["metadata_prefetch"]
        fetched = gets(server, SNAP) - {0}  # block 0: the head, the tool's own read
        reads_back(f, path)
    return Walked(walk, prefetch, fetched, seconds)


# -- a clean filesystem ------------------------------------------------------------------------


@pytest.mark.parametrize("fstype", FSTYPES)
def test_the_prefetch_fetches_the_directories_and_no_file_content(
    volumes: Volumes, fstype: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Read the head as a tool does: the walk finishes, every block the service was
    asked for besides the head's is one the prefetch counted, none holds only file
    content, and every directory's blocks (its entries and its inode) are among them."""
    caplog.set_level(logging.INFO, "ebsfs.engine.metaprefetch")
    path = volumes.path(fstype)
    content = content_blocks(path)
    directories = blocks_of(DIRECTORIES[fstype](path))
    walked = walk_image(path)
    print(
        f"\n{fstype}: {walked.walk}, {len(walked.fetched)} blocks fetched besides the head "
        f"in {walked.seconds:.2f} s; {len(directories)} blocks of directories, "
        f"{len(content)} of file content only"
    )
    assert len(content) >= 12  # 9 MiB of MARKER: the check below can fail
    assert len(directories) >= 3
    assert (walked.walk["filesystem"], walked.walk["state"]) == (fstype, "finished")
    assert walked.walk["blocks"] == len(walked.fetched) == walked.prefetch["blocks"]
    assert not walked.fetched & content, "blocks of nothing but file content were prefetched"
    assert directories <= walked.fetched | {0}, sorted(directories - walked.fetched - {0})
    assert len(walked.fetched) > BUDGET  # the budget test below stops these walks
    assert any(
        re.search(rf"{SNAP}: {fstype} metadata prefetch finished: \d+ waves", r.getMessage())
        for r in caplog.records
    )


@pytest.mark.parametrize("fstype", FSTYPES)
def test_a_small_budget_bounds_the_blocks_and_stops_the_walk(
    volumes: Volumes, fstype: str, caplog: pytest.LogCaptureFixture
) -> None:
    """`prefetch_metadata_budget` of 2 blocks, where the clean walk fetches 6-11: the
    service is asked for no more than 2 blocks besides the head, the walk says it
    stopped for the budget, one INFO line says so, and every read stays exact."""
    caplog.set_level(logging.INFO, "ebsfs.engine.metaprefetch")
    walked = walk_image(volumes.path(fstype), prefetch_metadata_budget=BUDGET * BLOCK_SIZE)
    print(f"\n{fstype} with a budget of {BUDGET} blocks: {walked.walk}")
    assert walked.prefetch["budget_blocks"] == BUDGET
    assert len(walked.fetched) <= BUDGET
    assert walked.prefetch["blocks"] <= BUDGET
    assert (walked.walk["state"], walked.walk["reason"]) == ("stopped", "budget spent")
    spent = [r for r in caplog.records if f"budget of {BUDGET} blocks" in r.getMessage()]
    assert len(spent) == 1 and spent[0].levelno == logging.INFO


# -- damaged and hostile metadata -----------------------------------------------------------


Patch = tuple[int, bytes]


def ext4_damage(path: Path, case: str, rng: random.Random) -> list[Patch]:
    """Group descriptors (block 1, 4 KiB blocks) or group 0's inode table (dumpe2fs)
    overwritten with random bytes; or the superblock's inodes per group 2^32 - 1; or
    every descriptor's bitmaps and inode table moved to block 2^64 - 1 with every inode
    counted in use."""
    out = subprocess.run(["dumpe2fs", str(path)], capture_output=True, text=True).stdout
    assert "Block size:               4096" in out
    groups = len(re.findall(r"^Group \d+:", out, re.M))
    table = int(re.findall(r"Inode table at (\d+)-\d+", out)[0]) * 4096
    size = int(re.findall(r"^Group descriptor size:\s+(\d+)", out, re.M)[0])
    assert size == 64  # 64bit: the high halves below are there
    if case == "random descriptors":
        return [(4096, rng.randbytes(4096))]
    if case == "random inode table":
        return [(table, rng.randbytes(256 * 1024))]
    if case == "huge inodes per group":
        return [(1024 + 0x28, struct.pack("<I", 0xFFFFFFFF))]
    assert case == "huge pointers"
    with open(path, "rb") as f:
        descriptors = bytearray(os.pread(f.fileno(), size * groups, 4096))
    for g in range(groups):
        at = size * g
        for lo in (0x0, 0x4, 0x8, 0x20, 0x24, 0x28):  # block/inode bitmap, table: lo, hi
            struct.pack_into("<I", descriptors, at + lo, 0xFFFFFFFF)
        struct.pack_into("<H", descriptors, at + 0x12, 0)  # flags: no INODE_UNINIT
        struct.pack_into("<H", descriptors, at + 0x1C, 0)  # no unused inodes
    return [(4096, bytes(descriptors))]


def xfs_damage(path: Path, case: str, rng: random.Random) -> list[Patch]:
    """Every AG's headers (AGF, AGI, AGFL: sectors 1-3 of the AG) or the root inode's
    chunk of 64 inodes overwritten with random bytes; or the superblock's AG count
    2^32 - 1; or every AGI claiming an inode B+tree root past the end, 2^32 - 1 levels
    and inodes."""
    geo = XfsGeometry.of(path)
    ags = [agno * geo.agblocks * geo.block for agno in range(geo.agcount)]
    if case == "random AG headers":
        return [(ag + geo.sector, rng.randbytes(3 * geo.sector)) for ag in ags]
    if case == "random inode chunk":
        chunk = geo.inode_offset(geo.rootino & ~63)
        return [(chunk, rng.randbytes(64 * geo.inode))]
    if case == "huge AG count":
        return [(88, struct.pack(">I", 0xFFFFFFFF))]
    assert case == "huge AGI"
    agi = 2 * geo.sector  # magic, version, seqno, length, then count, root, level at 16
    huge = struct.pack(">III", 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)
    return [(ag + agi + 16, huge) for ag in ags]


def ntfs_damage(path: Path, case: str, rng: random.Random) -> list[Patch]:
    """MFT records 1-64 (the system files, the root directory, the first files)
    overwritten with random bytes; or the boot sector's MFT position moved 4 PiB away,
    or into a large file's content."""
    with open(path, "rb") as f:
        boot = f.read(512)
    cluster = struct.unpack_from("<H", boot, 0x0B)[0] * boot[0x0D]
    mft = struct.unpack_from("<Q", boot, 0x30)[0] * cluster
    if case == "random MFT records":
        return [(mft + 1024, rng.randbytes(64 * 1024))]
    if case == "MFT 4 PiB away":
        return [(0x30, struct.pack("<Q", 2**52 // cluster))]
    assert case == "MFT in a file's content"  # MARKER starts with FILE, as a record does
    return [(0x30, struct.pack("<Q", min(content_blocks(path)) * BLOCK_SIZE // cluster))]


DAMAGE: dict[str, Callable[[Path, str, random.Random], list[Patch]]] = {
    "ext4": ext4_damage,
    "xfs": xfs_damage,
    "ntfs": ntfs_damage,
}
CASES = [
    *[
        ("ext4", c)
        for c in (
            "random descriptors",
            "random inode table",
            "huge inodes per group",
            "huge pointers",
        )
    ],
    *[("xfs", c) for c in ("random AG headers", "random inode chunk", "huge AG count", "huge AGI")],
    *[
        pytest.param("ntfs", c, marks=pytest.mark.mount)
        for c in ("random MFT records", "MFT 4 PiB away", "MFT in a file's content")
    ],
]


@pytest.mark.parametrize(("fstype", "case"), CASES)
def test_damaged_metadata_ends_the_walk_with_a_line_and_reads_stay_exact(
    volumes: Volumes, fstype: str, case: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A sparse copy of the image with metadata overwritten (found from the superblock,
    the boot sector or dumpe2fs, not by the walker): the walk starts, ends within QUICK
    seconds with one line saying how (and why, when it stopped), and every read returns
    the damaged image's bytes."""
    caplog.set_level(logging.INFO, "ebsfs.engine.metaprefetch")
    damaged = tmp_path / "damaged.img"
    subprocess.run(["cp", "--sparse=always", volumes.path(fstype), damaged], check=True)
    patches = DAMAGE[fstype](damaged, case, random.Random(case))
    with open(damaged, "r+b") as f:
        for offset, data in patches:
            os.pwrite(f.fileno(), data, offset)
    walked = walk_image(damaged)
    walk = walked.walk
    print(f"\n{fstype}, {case}: {walk} in {walked.seconds:.2f} s")
    assert walk["filesystem"] == fstype  # it ended within QUICK seconds: settled() waited
    ended = [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith(f"{SNAP}: {fstype} metadata prefetch {walk['state']}")
    ]
    assert len(ended) == 1, ended
    assert walk["state"] == "finished" or f"({walk['reason']})" in ended[0]


# -- diff --files --------------------------------------------------------------------------


@pytest.mark.mount  # snapshot_pairs: loop devices, mount, ntfs-3g
@pytest.mark.parametrize("fstype", ["ext4", "xfs", "ntfs"])
def test_diff_files_lists_the_same_with_the_prefetch_on_and_off(
    fstype: str, tmp_path: Path
) -> None:
    """Two snapshots of one volume (the second's parent the first) at 10 ms a call, read
    as `ebsfs diff --files` reads them (one engine, no read-ahead): the listing and every
    entry compared are the same with the prefetch on and off; with it on both snapshots
    were walked, and the tool's own reads asked the service for fewer blocks. diff_files
    itself says nothing of the prefetch: the files' stats() do."""
    from tests.snapshot_pairs import expected, make_pair

    if fstype == "xfs":
        pytest.importorskip("pyfsxfs")  # diff --files reads XFS through the optional extra
    pair = make_pair(fstype, tmp_path, 128 * MiB)
    found: dict[bool, tuple[FileDiff, dict[str, Any], list[dict[str, Any]]]] = {}
    for on in (False, True):
        with serving((FIRST, pair.before), (SECOND, pair.after), latency=0.01) as server:
            first, second = ebsfs.open_snapshots(
                [FIRST, SECOND], endpoint_url=server.url, readahead=False, prefetch_metadata=on
            )
            with first, second:
                result = ebsfs.diff_files(first, second)
                walks = [settled(second, label) for label in (FIRST, SECOND)] if on else []
                stats = second.stats()
        found[on] = (result, stats, walks)
        print(f"\n{fstype} prefetch {'on' if on else 'off'}: {stats['metadata_prefetch']}")
    (off, off_stats, _), (on_, on_stats, walks) = found[False], found[True]
    tool_off = off_stats["blocks_fetched"]
    tool_on = on_stats["blocks_fetched"] - on_stats["metadata_prefetch"]["blocks"]
    print(f"{fstype}: blocks the diff's own reads asked for: off {tool_off}, on {tool_on}")
    listing = sorted(
        ("R", c.old_path or "", c.path) if "renamed" in c.reasons else (c.change[0].upper(), c.path)
        for c in on_.filesystems[0].changes
    )
    assert listing == expected(fstype)
    assert on_.filesystems == off.filesystems  # every change, entry and count
    assert off_stats["metadata_prefetch"] == {"enabled": False}
    assert [w["filesystem"] for w in walks] == [fstype, fstype]
    assert [w["state"] for w in walks] == ["finished", "finished"]
    assert walks[0]["blocks"] > 0
    assert tool_on < tool_off
