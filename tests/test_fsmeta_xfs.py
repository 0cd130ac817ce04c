"""The XFS metadata walker (ebsfs/engine/fsmeta/xfs.py), checked against independent
readers on real images made by mkfs.xfs: libfsxfs (what `diff --files` reads XFS
with) walking the whole tree through a reader that records what it reads, and a scan of
the image for every B+tree and directory block by its magic. The walker runs over the
image file through the shared runner (tests/fsmeta_helpers.py), no engine. Hostile
input: random bytes over the metadata, self-referencing B+tree pointers, huge counts.

Run with `-s` to see the figures (coverage, blocks, waves, time)."""

from __future__ import annotations

import contextlib
import os
import random
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ebsfs.constants import BLOCK_SIZE
from ebsfs.engine.fsmeta import xfs
from ebsfs.engine.fsmeta.walk import Extent
from ebsfs.forensics.fsread import read_tree
from tests.disks import MiB, build_xfs, loop_device
from tests.fsmeta_helpers import MARKER, Image, WalkResult, blocks_of, run_walker, told_runs

pyfsxfs = pytest.importorskip("pyfsxfs")

IMAGE_SIZE = 512 * MiB
METADATA_MAGICS = (b"IAB3", b"BMA3", b"XDB3", b"XDD3", b"XDF3")
"""Blocks a walk must reach (v5): inobt, bmbt, directory data/block/free-index."""


# -- helpers ------------------------------------------------------------------------------


def walk(image: Image, probe: bool = True) -> WalkResult:
    """The XFS walker over `image` through the shared runner (claiming its head first)."""
    return run_walker(xfs.WALKER, image, probe=probe)


def file_content(data: bytes) -> bool:
    """Only the marker (and zeros: holes, the tail of a file): file data, no metadata."""
    return MARKER in data and not data.replace(MARKER, b"").strip(b"\0")


def data_regions(path: Path) -> Iterator[tuple[int, int]]:
    """(offset, length) of the allocated regions of a sparse file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size, offset = os.fstat(fd).st_size, 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:
                return
            end = os.lseek(fd, start, os.SEEK_HOLE)
            yield start, end - start
            offset = end
    finally:
        os.close(fd)


def magic_blocks(path: Path, fs_block: int) -> dict[bytes, list[int]]:
    """Offsets of every filesystem block that starts with one of METADATA_MAGICS."""
    found: dict[bytes, list[int]] = {m: [] for m in METADATA_MAGICS}
    with open(path, "rb") as f:
        for start, length in data_regions(path):
            f.seek(start)
            data = f.read(length)
            for at in range(0, len(data), fs_block):
                magic = data[at : at + 4]
                if magic in found:
                    found[magic].append(start + at)
    return found


def covered(offset: int, extents: list[Extent]) -> bool:
    return any(o <= offset < o + n for o, n in extents)


def linux_root() -> dict[str, bytes]:
    """A small Linux root: ~350 directories, ~3,300 small files (a few directories large
    enough for XFS's leaf and node formats), and three large files of MARKER."""
    rng = random.Random("ebsfs-fsmeta-xfs")
    files: dict[str, bytes] = {}

    def text(name: str, low: int = 40, high: int = 3000) -> bytes:
        line = f"# {name}: generated for the walker test\n".encode()
        return (line * (rng.randint(low, high) // len(line) + 1))[: rng.randint(low, high)]

    for i in range(1200):
        files[f"usr/bin/tool-{i:04d}-{rng.randrange(16**6):06x}"] = text(f"bin{i}")
    for i in range(250):
        for name in ("copyright", "changelog.Debian", "README", "NEWS")[: 2 + i % 3]:
            files[f"usr/share/doc/package-{i:03d}/{name}"] = text(f"doc{i}{name}")
    for i in range(40):
        for j in range(10):
            files[f"etc/conf{i:02d}.d/{j:02d}-setting.conf"] = text(f"etc{i}.{j}", 10, 300)
    for i in range(50):
        for j in range(8):
            files[f"usr/lib/python3/dist-packages/mod{i:02d}/part{j}.py"] = text(f"py{i}.{j}")
    for i, mib in enumerate((4, 6, 9)):
        files[f"var/lib/images/blob{i}.img"] = MARKER * (mib * MiB // len(MARKER))
    return files


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def root_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("xfs") / "root.img"
    build_xfs(path, IMAGE_SIZE, linux_root(), "fsmeta-xfs", "5e1f0e5e-0000-4000-8000-0000000000f5")
    return path


def library_blocks(image: Image) -> tuple[set[int], int]:
    """The 512 KiB blocks libfsxfs reads walking the whole tree, and the entries read."""
    image.reads.clear()
    tree = read_tree(image)
    return blocks_of(image.reads), len(tree.entries)


def content_blocks(path: Path, indexes: set[int]) -> set[int]:
    """Those of `indexes` that hold nothing but file content (the marker)."""
    found = set()
    with open(path, "rb") as f:
        for index in indexes:
            f.seek(index * BLOCK_SIZE)
            if file_content(f.read(BLOCK_SIZE)):
                found.add(index)
    return found


def check(path: Path, label: str, library: bool = True, magic: bool = True) -> WalkResult:
    """The walk ends, names no block of file content, and (`library`) covers >= 90 %
    of the non-content blocks libfsxfs reads walking the tree, and (`magic`) reaches
    every inobt, bmbt and directory block in the image."""
    image = Image(path)
    walked = walk(image)
    assert walked.stopped is None
    ours = blocks_of(walked.extents)
    said = (
        f"\n{label}: walker {len(walked.waves)} waves, {len(walked.extents)} extents, "
        f"{walked.total / MiB:.2f} MiB ({walked.total / image.size:.2%} of "
        f"{image.size // MiB} MiB), {len(ours)} blocks of {image.size // BLOCK_SIZE}, "
        f"{walked.seconds * 1000:.0f} ms"
    )
    assert not content_blocks(path, ours), "the walker named file content"
    if library:
        theirs, entries = library_blocks(image)
        theirs_meta = theirs - content_blocks(path, theirs)
        coverage = len(ours & theirs_meta) / len(theirs_meta)
        said += (
            f"; libfsxfs ({entries} entries) read {len(theirs)} blocks, "
            f"{len(theirs_meta)} not content: coverage {coverage:.1%}, "
            f"missed {sorted(theirs_meta - ours)}"
        )
        assert coverage >= 0.9, said
    if magic:
        magics = magic_blocks(path, struct.unpack(">I", image.pread(4, 4))[0])
        said += f"; magic blocks { {m.decode(): len(v) for m, v in magics.items()} }"
        for name, offsets in magics.items():
            missing = [o for o in offsets if not covered(o, walked.extents)]
            assert not missing, f"{name!r} blocks the walk did not reach: {missing[:10]}"
        assert magics[b"IAB3"] and magics[b"XDD3"]
    print(said)
    return walked


# -- the walk on real images -------------------------------------------------------------


def test_walker_covers_what_libfsxfs_reads_and_no_file_content(root_image: Path) -> None:
    walked = check(root_image, "mkfs.xfs -p tree")
    # superblock, AG headers, inobt (one level here), inode chunks, directory blocks
    assert len(walked.waves) <= 6
    assert walked.total < 0.02 * IMAGE_SIZE
    assert len(blocks_of(walked.extents)) < 0.1 * (IMAGE_SIZE // BLOCK_SIZE)


@contextlib.contextmanager
def mounted_rw(image: Path, target: Path) -> Iterator[Path]:
    """The image mounted read-write through its own loop device, always undone."""
    with loop_device(image, writable=True) as device:
        target.mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "xfs", device, str(target)], check=True)
        try:
            yield target
        finally:
            subprocess.run(["umount", str(target)], check=True)


def write_every_other_block(path: Path, blocks: int) -> None:
    """A file of `blocks` 4 KiB blocks of MARKER with a hole after each: one extent
    per block (and one for each hole XFS preallocated, unwritten)."""
    with open(path, "wb") as f:
        for i in range(blocks):
            f.seek(2 * i * 4096)
            f.write(MARKER * 512)


@pytest.mark.mount
def test_block_maps_in_btree_format(tmp_path: Path) -> None:
    """Files and directories whose block maps outgrow the inode, made through the
    kernel's own XFS on a loop mount: files written every other 4 KiB (~200 extents: a
    bmbt of one level; ~12,000: two levels) and three directories grown in turn, a preallocated
    file between each two entries (fragmented: bmbt of one level). libfsxfs 20260901
    reads no bmbt of two levels ("unsupported B+ tree node level"), so the library's
    coverage is measured once that file is removed."""
    path = tmp_path / "btree.img"
    build_xfs(
        path,
        320 * MiB,
        {"etc/hostname": b"btree\n"},
        "fsmeta-bt",
        "5e1f0e5e-0000-4000-8000-0000000000f6",
    )
    with mounted_rw(path, tmp_path / "mnt") as mnt:
        write_every_other_block(mnt / "deep.bin", 6000)
        write_every_other_block(mnt / "wide.bin", 100)
        for name in ("a", "b", "c"):
            (mnt / name).mkdir()
        for i in range(2000):
            for name in ("a", "b", "c"):
                (mnt / name / f"entry-with-a-rather-long-name-{i:05d}").touch()
                # allocated now (not at writeback), between the directories' blocks
                fd = os.open(mnt / f"{name}-{i}.dat", os.O_CREAT | os.O_WRONLY, 0o644)
                os.posix_fallocate(fd, 0, 4096)
                os.close(fd)
    walked = check(path, "bmbt of two levels", library=False)
    assert len(magic_blocks(path, 4096)[b"BMA3"]) > 40  # deep.bin: ~12,000 extents
    # superblock, AG headers, inobt, inodes, deep.bin's bmbt node with the directories'
    # bmbt leaves, then deep.bin's bmbt leaves with the directories' blocks
    assert len(walked.waves) == 6
    with mounted_rw(path, tmp_path / "mnt") as mnt:
        (mnt / "deep.bin").unlink()
    check(path, "bmbt of one level", magic=False)  # deep.bin's blocks stay, stale


def test_large_files_runs_are_told_never_fetched(root_image: Path) -> None:
    """The three large files' extents (4, 6 and 9 MiB of MARKER) are told as runs, and
    nothing else: every told run holds file content only and is in no wave."""
    told, waves = told_runs(xfs.WALKER, root_image)
    data = root_image.read_bytes()
    assert told and all(n >= xfs.FILE_RUN_MIN for _, n in told)
    for offset, length in told:
        assert file_content(data[offset : offset + length])
    assert sum(n for _, n in told) >= (4 + 6 + 9) * MiB - len(told) * 4096
    fetched = [e for wave in waves for e in wave]
    for offset, length in told:
        assert not any(o < offset + length and offset < o + n for o, n in fetched)


# -- hostile input ----------------------------------------------------------------------


def superblock(image: Image) -> dict[str, int]:
    sb = image.pread(512, 0)
    return {
        "block": struct.unpack_from(">I", sb, 4)[0],
        "sector": struct.unpack_from(">H", sb, 102)[0],
    }


def test_random_bytes_over_the_metadata_end_the_walk_quickly(
    root_image: Path, tmp_path: Path
) -> None:
    """A share of every metadata extent but the superblock overwritten with random bytes
    (1/64, 1/4, all of it), in a sparse copy of the image; then the same sparing the
    AG headers and the first 8 bytes of every 512 (magic numbers, levels, record counts:
    the walk goes on into random pointers, records and inodes)."""
    clean = walk(Image(root_image))
    shares = (1 / 64, 1 / 4, 1.0)
    for trial, (share, spare) in enumerate([(s, 0) for s in shares] + [(s, 8) for s in shares]):
        rng = random.Random(trial)
        damaged = tmp_path / f"damaged{trial}.img"
        subprocess.run(["cp", "--sparse=always", str(root_image), str(damaged)], check=True)
        with open(damaged, "r+b") as f:
            # the superblock stays (what lies below it is on trial); sparing, the AG
            # headers too, so the damage meets the inobt, the inodes and the bmbt
            for offset, length in [e for wave in clean.waves[2 if spare else 1 :] for e in wave]:
                f.seek(offset)
                original = f.read(length)
                data = bytearray(original)
                if share >= 1:
                    data[:] = rng.randbytes(length)
                else:
                    for at in rng.sample(range(length), k=max(1, int(length * share))):
                        data[at] = rng.randrange(256)
                for sector in range(0, length, 512) if spare else ():
                    data[sector : sector + spare] = original[sector : sector + spare]
                f.seek(offset)
                f.write(data)
        walked = walk(Image(damaged))
        damaged.unlink()
        print(
            f"\nrandom bytes over {share:.0%} of the metadata, sparing {spare} bytes a "
            f"sector (seed {trial}): "
            f"{walked.stopped or 'finished'}, {len(walked.waves)} waves, "
            f"{walked.total / MiB:.2f} MiB (clean {clean.total / MiB:.2f}), "
            f"{walked.seconds:.2f} s"
        )
        assert walked.seconds < 5
        assert walked.total < IMAGE_SIZE / 4
        assert len(walked.waves) <= 4 * xfs.MAX_LEVELS + 9


def test_hostile_superblocks_stop_the_walk(root_image: Path) -> None:
    cases = {
        "agcount 2**32-1": (88, struct.pack(">I", 2**32 - 1)),
        "dblocks 2**64-1": (8, struct.pack(">Q", 2**64 - 1)),
        "blocksize 3": (4, struct.pack(">I", 3)),
        "inode size 0": (104, struct.pack(">H", 0)),
        "agblocks 1": (84, struct.pack(">I", 1)),
    }
    for name, (offset, patch) in cases.items():
        image = Image(root_image)
        image.patches = [(offset, patch)]
        walked = walk(image, probe=False)
        assert walked.stopped is not None, name
        assert len(walked.waves) == 1, name


def test_self_referencing_and_huge_btrees_are_cut(root_image: Path) -> None:
    image = Image(root_image)
    geo = superblock(image)
    agi = 2 * geo["sector"]
    root = struct.unpack(">I", image.pread(4, agi + 20))[0]
    node = root * geo["block"]
    maxrecs = (geo["block"] - 56) // 8
    # AG 0's inobt: a root of level 1 whose only child is itself
    image.patches = [
        (agi + 24, struct.pack(">I", 2)),
        (node + 4, struct.pack(">HH", 1, 1)),
        (node + 56 + maxrecs * 4, struct.pack(">I", root)),
    ]
    walked = walk(image)
    clean = walk(Image(root_image))
    assert walked.stopped is None and len(walked.waves) <= len(clean.waves)
    assert walked.total < clean.total  # AG 0's inodes are gone, the other AGs' stay
    # a leaf claiming 65,535 records; an AGI claiming 2**32-1 levels
    image.patches = [(node + 4, struct.pack(">HH", 0, 0xFFFF))]
    assert walk(image).total < clean.total
    image.patches = [(agi + 24, struct.pack(">I", 2**32 - 1))]
    assert walk(image).total < clean.total


def test_every_inode_a_directory_with_hostile_extents(tmp_path: Path) -> None:
    """A made-up filesystem: a sane superblock and AG 0, one inobt leaf naming 1,024
    chunks all in use, and every inode a directory whose extents claim the whole
    disk, the same block, or blocks past the end."""
    block, agblocks, inode = 4096, 4096, 512
    size = agblocks * block
    sb = bytearray(512)
    struct.pack_into(">4sIQ", sb, 0, b"XFSB", block, agblocks)
    struct.pack_into(">II", sb, 84, agblocks, 1)
    struct.pack_into(">HHHH", sb, 100, 0xB4A5, 512, inode, block // inode)
    struct.pack_into(">5B", sb, 120, 12, 9, 9, 3, 12)
    image = bytearray(size)
    image[: len(sb)] = sb
    struct.pack_into(">4sIIIIII", image, 1024, b"XAGI", 1, 0, agblocks, 0, 8, 1)
    leaf = 8 * block
    records = (block - 56) // 16
    struct.pack_into(">4sHH", image, leaf, b"IAB3", 0, records)
    rng = random.Random(7)
    for r in range(records):
        struct.pack_into(">IHBBQ", image, leaf + 56 + 16 * r, 64 * (r + 2), 0, 64, 0, 0)
    for ino in range(128, 64 * (records + 2)):
        at = ino * inode
        if at + inode > size:
            break
        struct.pack_into(">2sHBB", image, at, b"IN", 0o040755, 3, 2)
        struct.pack_into(">Q", image, at + 152, ino)
        struct.pack_into(">I", image, at + 76, rng.choice([21, 2**32 - 1, 1]))
        for e in range(21):
            fsb, count = rng.choice([(0, 2**21 - 1), (16, 1), (2**52 - 1, 5), (100, agblocks)])
            l0 = fsb >> 43
            l1 = ((fsb & (2**43 - 1)) << 21) | count
            struct.pack_into(">QQ", image, at + 176 + 16 * e, l0, l1)
    path = tmp_path / "hostile.img"
    path.write_bytes(image)
    walked = walk(Image(path))
    print(
        f"\nhostile directories: {walked.stopped}, {len(walked.waves)} waves, "
        f"{len(walked.extents)} extents, {walked.seconds:.2f} s"
    )
    assert walked.seconds < 5
    assert walked.stopped is not None or len(walked.extents) < 100
