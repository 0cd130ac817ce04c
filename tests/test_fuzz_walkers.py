"""Fuzzing the filesystem metadata readers with Hypothesis (issue 26), on a fixed budget
(derandomized: CI runs the same examples every time): the metadata prefetch's walkers
(ext4, XFS, NTFS) and fsread's libraries (pytsk3, libfsxfs) over small real images,
made once per module, whose metadata Hypothesis overwrites (superblock fields, group
descriptors, inode tables, AG headers, inobt blocks, inode chunks, MFT records,
attribute headers, index blocks) with drawn bytes and integers, huge and negative-looking
ones among them.

A walk must end with its waves or WalkStopped, every read and every extent inside the
volume (the runner asserts it), and its work bounded by the volume's size: bytes read,
reads, waves and extents are counted, not timed. A reader must answer a tree or its one
typed error (FilesystemUnreadable) with a printable one-line reason, reading no more
than a few times the volume. Cases the fuzzing (or writing it) found are kept below as
plain tests."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ebsfs.engine.fsmeta import ext4, ntfs, xfs
from ebsfs.engine.fsmeta.walk import Extent
from ebsfs.engine.fsmeta.walkers import WALKERS
from ebsfs.errors import FilesystemUnreadable
from ebsfs.forensics import fsread
from tests.disks import MiB, build_ext4, build_xfs, partition_files, stage_files
from tests.fsmeta_helpers import Image, WalkResult, run_walker

BUDGET = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
READ_FACTOR = 4
"""Bytes a walk may read, in volumes: each piece of metadata is read about once (the
descriptors, the inode tables, the tree blocks: a volume's worth each at the very most)."""
LIBRARY_READ_FACTOR = 16
"""The same for a forensic library, which re-reads what its caches dropped."""

Patch = tuple[int, bytes]


# -- what to overwrite -----------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A kind of metadata: where it lies, the size of its records (a superblock, a
    descriptor, an inode, a B+tree block, an MFT record) and the offsets in a record of
    the fields worth hitting (numbers a parser trusts)."""

    name: str
    extents: tuple[Extent, ...]
    stride: int
    fields: tuple[int, ...]


NUMBERS = st.one_of(
    st.integers(0, 4096),
    st.sampled_from([-1, -2, -(2**31), 2**31 - 1, -(2**63), 2**63 - 1, 2**32 - 1, 2**16 - 1]),
    st.integers(-(2**63), 2**64 - 1),
)
"""Small counts and offsets, edges, and anything: two's complement when negative."""


@st.composite
def value(draw: st.DrawFn, big_endian: bool) -> bytes:
    """Bytes to write: an integer of 1 to 8 bytes, or noise."""
    if draw(st.integers(0, 3)) == 0:
        return draw(st.binary(min_size=1, max_size=48))
    width = draw(st.sampled_from((1, 2, 4, 8)))
    number = draw(NUMBERS) % (1 << (8 * width))
    return number.to_bytes(width, "big" if big_endian else "little")


@st.composite
def damage(draw: st.DrawFn, targets: list[Target], big_endian: bool) -> list[Patch]:
    """One to six overwrites, each in a chosen kind of metadata: on one of its fields,
    or anywhere in it."""
    patches = []
    for _ in range(draw(st.integers(1, 6))):
        target = draw(st.sampled_from(targets))
        at, length = draw(st.sampled_from(target.extents))
        if draw(st.booleans()) and target.fields:
            record = draw(st.integers(0, max(0, length // target.stride - 1)))
            offset = at + record * target.stride + draw(st.sampled_from(target.fields))
        else:
            offset = at + draw(st.integers(0, length - 1))
        patches.append((offset, draw(value(big_endian))))
    return patches


def damaged(image: bytes, patches: list[Patch]) -> Image:
    (found := Image(image)).patches = list(patches)
    return found


def within(
    extents: list[Extent], stride: int, test: Callable[[bytes], bool], image: bytes
) -> list[Extent]:
    """The `stride`-long pieces of `extents` whose bytes pass `test` (to sort a clean
    walk's extents by what they hold)."""
    found = []
    for offset, length in extents:
        for at in range(offset, offset + length - stride + 1, stride):
            if test(image[at : at + stride]):
                found.append((at, stride))
    return found


# -- the checks --------------------------------------------------------------------------


def check_walk(walk: WalkResult, size: int, max_waves: int) -> None:
    """Ended (the runner let only WalkStopped through and checked every read and extent
    lies in the volume), with bounded work."""
    event(f"walk: {(walk.stopped or 'finished')[:40]}")
    assert len(walk.waves) <= max_waves, len(walk.waves)
    for wave in walk.waves:
        assert len(wave) <= size // 256 + 2, len(wave)
        assert sum(length for _, length in wave) <= 2 * size
    assert sum(length for _, length in walk.reads) <= READ_FACTOR * size
    assert len(walk.reads) <= size // 256


def check_reader(image: Image) -> None:
    """A tree or FilesystemUnreadable, reasons printable on one line, reads bounded."""
    try:
        tree = fsread.read_tree(image)
    except FilesystemUnreadable as err:
        event(f"reader: {str(err)[:40]}")
        assert str(err).isprintable(), str(err)
    else:
        event(f"reader: a tree, {len(tree.unreadable)} unreadable")
        assert all(u.reason.isprintable() for u in tree.unreadable)
    assert sum(length for _, length in image.reads) <= LIBRARY_READ_FACTOR * image.size


def run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=120)


def tree_files(tag: str) -> dict[str, bytes]:
    """partition_files and a directory of many names (several blocks, an htree or a
    leaf/node directory), a chain of directories and an empty one."""
    files = partition_files(tag, big_size=300 * 1024)
    for i in range(200):
        files[f"many/a-rather-long-file-name-of-some-package-{i:04d}.list"] = b"x" * (i % 7)
    files["/".join(f"d{i}" for i in range(8)) + "/bottom.txt"] = b"bottom\n"
    return files


# -- ext4 -------------------------------------------------------------------------------

EXT4_SB: tuple[int, ...] = (0, 4, 0x14, 0x18, 0x20, 0x28, 0x4C, 0x54, 0x58, 0x5C, 0x60, 0x64)
EXT4_SB += (0xE0, 0xFE, 0x104, 0x150, 0x24C, 0x250)
EXT4_DESC = (0x00, 0x04, 0x08, 0x0E, 0x12, 0x1C, 0x20, 0x24, 0x28, 0x2E, 0x32)
EXT4_INODE = (0x00, 0x04, 0x1A, 0x20, 0x28, 0x2A, 0x2C, 0x2E, 0x34, 0x38, 0x3C, 0x58, 0x6C)
"""mode, size, links, flags, i_block (extent header: magic, entries, max, depth; the
first entry; the indirect pointers), size_high."""
EXT4_NODE = (0, 2, 4, 6, 12, 16, 18, 20, 24, 28, 32, 36)


@dataclass(frozen=True)
class Volume:
    image: bytes
    targets: list[Target]


def ext4_targets(
    walk: WalkResult, trees_walk: WalkResult, desc: int, inode_size: int, block: int
) -> list[Target]:
    """`trees_walk`: the same walk without the unused slots, which ride with the first
    level of the trees."""
    descriptors = tuple(walk.waves[0][1:])
    tables = tuple(walk.waves[1])
    trees = tuple(e for wave in trees_walk.waves[2:] for e in wave) or tables
    return [
        Target("superblock", ((1024, 1024),), 1024, EXT4_SB),
        Target("descriptors", descriptors, desc, EXT4_DESC),
        Target("inode tables", tables, inode_size, EXT4_INODE),
        Target("tree blocks", trees, block, EXT4_NODE),
    ]


@pytest.fixture(scope="module")
def ext4_volumes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Volume]:
    """ext4 as build_ext4 makes it (4 KiB blocks, extents, flex_bg, 64-bit descriptors,
    metadata_csum) and ext3 (1 KiB blocks, block maps: indirect blocks), with slow
    symlinks."""
    tmp = tmp_path_factory.mktemp("fuzz-ext4")
    made: dict[str, Volume] = {}
    for name, size, desc, block in (("ext4", 24 * MiB, 64, 4096), ("ext3", 8 * MiB, 32, 1024)):
        path = tmp / f"{name}.img"
        files = tree_files(name)
        if name == "ext4":
            build_ext4(path, size, files, "fuzz", "5e1f0e5e-0000-4000-8000-000000002601")
        else:
            with tempfile.TemporaryDirectory() as staged:
                stage_files(files, Path(staged))
                with open(path, "wb") as f:
                    f.truncate(size)
                options = ["-t", "ext3", "-b", "1024", "-I", "256", "-d", staged]
                run("mke2fs", "-q", "-F", *options, str(path))
        run("debugfs", "-w", "-R", f"symlink slow /{'long-target/' * 10}", str(path))
        image = path.read_bytes()
        clean = run_walker(ext4.WALKER, Image(image))
        assert clean.stopped is None and len(clean.waves) >= 3, clean.stopped
        with pytest.MonkeyPatch.context() as patch:  # the trees' blocks, not the slots'
            patch.setattr(ext4.Ext4Walker, "_unused_slots", lambda *_: False)
            trees = run_walker(ext4.WALKER, Image(image))
        made[name] = Volume(image, ext4_targets(clean, trees, desc, 256, block))
    return made


@pytest.mark.parametrize("layout", ["ext4", "ext3"])
@BUDGET
@given(data=st.data())
def test_the_ext4_walker_ends_within_bounds(
    ext4_volumes: dict[str, Volume], layout: str, data: st.DataObject
) -> None:
    volume = ext4_volumes[layout]
    patches = data.draw(damage(volume.targets, big_endian=False))
    walk = run_walker(ext4.WALKER, damaged(volume.image, patches))
    check_walk(walk, len(volume.image), ext4.MAX_WAVES + 3)


@BUDGET
@given(data=st.data())
def test_the_sleuth_kit_on_damaged_ext4_answers_or_refuses(
    ext4_volumes: dict[str, Volume], data: st.DataObject
) -> None:
    volume = ext4_volumes["ext4"]
    check_reader(damaged(volume.image, data.draw(damage(volume.targets, big_endian=False))))


# -- XFS --------------------------------------------------------------------------------

XFS_SB = (4, 8, 84, 88, 100, 102, 104, 106, 120, 121, 123, 124, 192, 216)
XFS_AG = (0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40)
"""Each of the AGF, AGI, AGFL sectors: magic, version, seqno, length, roots, levels."""
XFS_BTREE = (0, 4, 6, 8, 16, 56, 60, 62, 63, 64, 72, 80, 88)
"""Magic, level, numrecs, siblings; the first records (inobt at 56, bmbt at 72)."""
XFS_INODE = (0, 2, 4, 5, 24, 76, 82, 120, 152, 176, 178, 180, 184, 192, 200)
"""Magic, mode, version, format, nextents (both), forkoff, flags2, the inode's own
number; the data fork (extents, or a bmbt root's level, numrecs, keys, pointers)."""


@pytest.fixture(scope="module")
def xfs_volume(tmp_path_factory: pytest.TempPathFactory) -> Volume:
    """A small XFS (v5, mkfs.xfs -p: no mount), its clean walk's extents sorted by what
    they hold."""
    path = tmp_path_factory.mktemp("fuzz-xfs") / "xfs.img"
    build_xfs(path, 64 * MiB, tree_files("xfs"), "fuzz", "5e1f0e5e-0000-4000-8000-000000002602")
    image = path.read_bytes()
    clean = run_walker(xfs.WALKER, Image(image))
    assert clean.stopped is None, clean.stopped
    block = struct.unpack_from(">I", image, 4)[0]
    inode = struct.unpack_from(">H", image, 104)[0]
    sector = struct.unpack_from(">H", image, 102)[0]
    below = [e for wave in clean.waves[2:] for e in wave]
    inobt = within(below, block, lambda b: b[:4] == b"IAB3", image)
    inodes = within(below, inode, lambda b: b[:2] == b"IN", image)
    data = within(below, block, lambda b: b[:4] in (b"XDB3", b"XDD3", b"XDF3", b"BMA3"), image)
    assert inobt and inodes and data
    return Volume(
        image,
        [
            Target("superblock", ((0, 512),), 512, XFS_SB),
            Target("AG headers", tuple(clean.waves[1]), sector, XFS_AG),
            Target("inobt", tuple(inobt), block, XFS_BTREE),
            Target("inodes", tuple(inodes), inode, XFS_INODE),
            Target("directory blocks", tuple(data), block, XFS_BTREE),
        ],
    )


@BUDGET
@given(data=st.data())
def test_the_xfs_walker_ends_within_bounds(xfs_volume: Volume, data: st.DataObject) -> None:
    patches = data.draw(damage(xfs_volume.targets, big_endian=True))
    walk = run_walker(xfs.WALKER, damaged(xfs_volume.image, patches))
    check_walk(walk, len(xfs_volume.image), 4 * xfs.MAX_LEVELS + 9)


@BUDGET
@given(data=st.data())
def test_libfsxfs_on_damaged_xfs_answers_or_refuses(
    xfs_volume: Volume, data: st.DataObject
) -> None:
    pytest.importorskip("pyfsxfs")
    check_reader(damaged(xfs_volume.image, data.draw(damage(xfs_volume.targets, big_endian=True))))


# -- NTFS -------------------------------------------------------------------------------

NTFS_BOOT = (0x03, 0x0B, 0x0D, 0x28, 0x30, 0x38, 0x40, 0x44)
NTFS_RECORD = (0x04, 0x06, 0x14, 0x16, 0x18, 0x1C, 0x20, 0x28)
"""Update sequence (offset, count), first attribute, flags, bytes used and allocated,
base record."""
NTFS_ATTRIBUTE = (0x00, 0x04, 0x08, 0x09, 0x0A, 0x10, 0x14, 0x18, 0x20, 0x28, 0x30, 0x38, 0x40)
"""Relative to an attribute: type, length, non-resident, name, value length and offset
(resident) or VCNs, runlist offset, sizes (non-resident), the first runlist bytes."""
RECORD, INDEX_BLOCK = 1024, 4096


def sign(raw: bytearray) -> bytes:
    """Make an MFT record or an index block pass its update-sequence check (the end of
    each 512 bytes set to the sequence number; the array keeps the bytes the fixup puts
    back): the parser then meets the damage instead of skipping the record."""
    usa = struct.unpack_from("<H", raw, 4)[0]
    if usa + 2 * (len(raw) // 512 + 1) > len(raw):
        return bytes(raw)
    for i in range(1, len(raw) // 512 + 1):
        raw[i * 512 - 2 : i * 512] = raw[usa : usa + 2]
    return bytes(raw)


@pytest.fixture(scope="module")
def ntfs_volume(tmp_path_factory: pytest.TempPathFactory) -> Volume:
    """A 16 MiB mkntfs volume with a few files copied in by ntfscp (no mount): enough
    names for the root's index to need INDX blocks."""
    for tool in ("mkntfs", "ntfscp"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} (ntfs-3g) is not installed")
    tmp = tmp_path_factory.mktemp("fuzz-ntfs")
    path = tmp / "ntfs.img"
    with open(path, "wb") as f:
        f.truncate(16 * MiB)
    run("mkntfs", "-q", "-F", "-Q", "-s", "512", str(path))
    source = tmp / "file"
    for i in range(12):
        source.write_bytes(bytes([i]) * (100 + 700 * i))
        name = f"/{'a-long-name-to-fill-the-index-' * 4}{i:02d}.txt"
        run("ntfscp", "-q", str(path), str(source), name)
    image = path.read_bytes()
    clean = run_walker(ntfs.WALKER, Image(image))
    assert clean.stopped is None, clean.stopped
    mft = clean.waves[2]
    records = within(mft, RECORD, lambda b: b[:4] == b"FILE", image)
    attributes = []
    for at, _ in records:
        fixed = ntfs.fixed(image[at : at + RECORD], RECORD)
        for attr in ntfs.attributes(fixed) if fixed else []:
            attributes.append((at + attr.start, attr.end - attr.start))
    index = within(clean.waves[-1], 4096, lambda b: b[:4] == b"INDX", image)
    assert records and attributes and index
    return Volume(
        image,
        [
            Target("boot sector", ((0, 512),), 512, NTFS_BOOT),
            Target("MFT records", tuple(records), RECORD, NTFS_RECORD),
            Target("MFT record 0", (records[0],), RECORD, NTFS_RECORD),
            Target("attributes", tuple(attributes), 4096, NTFS_ATTRIBUTE),
            Target("index blocks", tuple(index), 4096, (0, 4, 6, 0x18, 0x1C, 0x20, 0x40, 0x48)),
        ],
    )


def resigned(image: bytes, patches: list[Patch], which: list[bool]) -> list[Patch]:
    """The patches, with each MFT record and index block they touch replaced whole and
    re-signed where `which` says so (the others left torn: the check must catch them)."""
    data = damaged(image, patches)
    units = set()
    for offset, _ in patches:
        block = offset - offset % INDEX_BLOCK
        if data.pread(4, block) == b"INDX":
            units.add((block, INDEX_BLOCK))
        else:
            units.add((offset - offset % RECORD, RECORD))
    out = list(patches)
    for n, (start, size) in enumerate(sorted(units)):
        raw = bytearray(data.pread(size, start))
        if raw[:4] in (b"FILE", b"INDX") and which[n % len(which)]:
            out.append((start, sign(raw)))
    return out


@st.composite
def ntfs_damage(draw: st.DrawFn, volume: Volume) -> list[Patch]:
    patches = draw(damage(volume.targets, big_endian=False))
    return resigned(volume.image, patches, draw(st.lists(st.booleans(), min_size=1, max_size=4)))


@BUDGET
@given(data=st.data())
def test_the_ntfs_walker_ends_within_bounds(ntfs_volume: Volume, data: st.DataObject) -> None:
    walk = run_walker(ntfs.WALKER, damaged(ntfs_volume.image, data.draw(ntfs_damage(ntfs_volume))))
    check_walk(walk, len(ntfs_volume.image), 4 + ntfs.MAX_MFT_SEGMENTS)


@BUDGET
@given(data=st.data())
def test_the_sleuth_kit_on_damaged_ntfs_answers_or_refuses(
    ntfs_volume: Volume, data: st.DataObject
) -> None:
    check_reader(damaged(ntfs_volume.image, data.draw(ntfs_damage(ntfs_volume))))


def test_walker_modules_are_the_ones_fuzzed() -> None:
    """A walker added to fsmeta must be fuzzed here too."""
    assert {w.name for w in WALKERS} == {w.name for w in (ext4.WALKER, xfs.WALKER, ntfs.WALKER)}


# -- cases found -------------------------------------------------------------------------


def xfs_v4(records: list[tuple[int, int]]) -> Image:
    """A made-up 16 MiB XFS (v4, one AG, 4 KiB blocks, 256-byte inodes): every inode a
    sane regular file, and an inobt of one root over leaves holding `records`
    (startino, free mask), 255 a leaf."""
    block, agblocks, inode = 4096, 4096, 256
    image = bytearray(agblocks * block)
    struct.pack_into(">4sIQ", image, 0, b"XFSB", block, agblocks)
    struct.pack_into(">II", image, 84, agblocks, 1)
    struct.pack_into(">HHHH", image, 100, 0x34A4, 512, inode, block // inode)
    struct.pack_into(">5B", image, 120, 12, 9, 8, 4, 12)
    root, per_leaf = 1000, (block - 16) // 16
    leaves = [records[i : i + per_leaf] for i in range(0, len(records), per_leaf)]
    struct.pack_into(">4sIIIIII", image, 1024, b"XAGI", 1, 0, agblocks, 0, root, 2)
    struct.pack_into(">4sHH", image, root * block, b"IABT", 1, len(leaves))
    for n, leaf in enumerate(leaves):
        struct.pack_into(
            ">I", image, root * block + 16 + (block - 16) // 8 * 4 + 4 * n, root + 1 + n
        )
        at = (root + 1 + n) * block
        struct.pack_into(">4sHH", image, at, b"IABT", 0, len(leaf))
        for r, (startino, free) in enumerate(leaf):
            struct.pack_into(">IHBBQ", image, at + 16 + 16 * r, startino, 0, 64, 0, free)
    for ino in range(64, 8192):
        struct.pack_into(">2sHBB", image, ino * inode, b"IN", 0o100644, 2, 2)
    return Image(bytes(image))


@pytest.mark.parametrize(
    "records",
    [
        [(64 + k, 0) for k in range(20 * 255)],
        [(64 * j, (1 << k) - 1) for j in range(1, 81) for k in range(64)],
    ],
    ids=["chunks one inode apart", "one chunk many times, its runs shifted"],
)
def test_overlapping_xfs_inode_chunks_are_not_read_again_and_again(
    records: list[tuple[int, int]],
) -> None:
    """Found writing the fuzzing: inobt records whose chunks overlap (a startino not a
    multiple of 64, or a chunk listed again with another free mask) made the walker
    read and parse the same inodes up to 64 times: 80 MiB read and 300,000 inodes
    parsed on this 16 MiB volume, 64 times the volume up to MAX_INODES on a larger one.
    XFS has one record per chunk, at a multiple of 64: any other is damage."""
    image = xfs_v4(records)
    walk = run_walker(xfs.WALKER, image)
    read = sum(length for _, length in walk.reads)
    print(f"\n{len(records)} records: {read / MiB:.1f} MiB read, {walk.stopped}")
    assert read <= 2 * image.size


def lines_run_in(module: ModuleType, fn: Callable[[], object]) -> int:
    """Python lines run inside `module` during fn(): work counted, not timed."""
    count = 0

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal count
        if event == "line":
            count += 1
        return local

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        return local if frame.f_code.co_filename == module.__file__ else None

    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    return count


@pytest.mark.parametrize("free", [2**64 - 1, 2**64 - 2], ids=["all free", "one in use"])
def test_each_xfs_inode_chunk_record_costs_a_few_steps(free: int) -> None:
    """Found writing the fuzzing: every inobt record cost a loop over its 64 inodes,
    free or not: 7.4 s of CPU for the 910,000 records a 16 MiB volume can hold (14 MiB
    of inobt leaves; 0.9 s now), some 20 minutes on the engine's loop for the 2 GiB
    MAX_BTREE_BLOCKS allows. Counted in lines of the walker run: about 470 a record
    before, beside those parsing the inodes in use (one a record here, or none)."""
    records = [(64 * (1 + r % 120), free) for r in range(4 * 255)]
    image = xfs_v4(records)
    lines = lines_run_in(xfs, lambda: run_walker(xfs.WALKER, image))
    in_use = 0 if free == 2**64 - 1 else len({startino for startino, _ in records})
    print(f"\n{lines / len(records):.0f} lines a record, {in_use} inodes in use")
    assert lines < 40 * len(records) + 60 * in_use


def test_xfs_inobt_records_examined_are_capped(monkeypatch) -> None:
    """Records of free chunks cost a few steps each and counted against no cap: 2 GiB of
    inobt leaves (within MAX_BTREE_BLOCKS) held the engine's loop for about 2 minutes.
    The walk stops once MAX_INOBT_RECORDS were examined (lowered here to 500 of 1,020)."""
    monkeypatch.setattr(xfs, "MAX_INOBT_RECORDS", 500)
    image = xfs_v4([(64 * (1 + r % 120), 2**64 - 1) for r in range(4 * 255)])
    walk = run_walker(xfs.WALKER, image)
    assert walk.stopped is not None and "inobt records" in walk.stopped
