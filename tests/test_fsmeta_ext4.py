"""The ext4 walker of the metadata prefetch (issue 25) against real images made by
mke2fs: it covers what The Sleuth Kit reads to list every file (an independent parser),
never a block of file content, in a few waves; and hostile metadata ends it quickly."""

from __future__ import annotations

import os
import random
import re
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest

from ebsfs.constants import BLOCK_SIZE
from ebsfs.engine.fsmeta import ext4, ext4layout
from ebsfs.engine.fsmeta.walk import HEAD_SIZE
from tests.disks import EPOCH, MiB, build_ext4, partition_files, stage_files
from tests.fsmeta_helpers import (
    MARKER,
    WalkResult,
    blocks_of,
    content_blocks,
    library_reads,
    marker_file,
    run_walker,
    scribble,
    told_runs,
)

QUICK = 2.0
"""Seconds a walk of a damaged image may take (a clean one takes a fraction)."""


def linux_root(
    dirs: int = 300, per_dir: int = 10, big: tuple[int, ...] = (3, 5, 6)
) -> dict[str, bytes]:
    """A tree shaped like a small Linux root: `dirs` package directories of small files,
    one directory of 1,500 names (an htree over many blocks), a 24-level chain, large
    files of MARKER (`big` MiB each) and a sparse file of 700 extents (an extent tree of
    depth 1: mke2fs -d leaves zero blocks as holes)."""
    rng = random.Random("ebsfs-fsmeta-ext4")
    tops = ["etc", "usr/share/doc", "usr/lib/python3/dist-packages", "usr/include", "opt/app"]
    files: dict[str, bytes] = {}
    for d in range(dirs):
        for f in range(per_dir):
            size = rng.choice((0, 30, 200, 1500, 4000, 9000, 20000))
            files[f"{tops[d % len(tops)]}/pkg{d:03d}/file{f}.conf"] = rng.randbytes(size)
    for i in range(1500):
        files[f"var/lib/dpkg/info/lib-some-long-package-name-{i:05d}.list"] = b"/usr\n"
    files["/".join(f"deep{i}" for i in range(24)) + "/bottom.txt"] = b"bottom\n"
    for i, mib in enumerate(big):
        files[f"var/cache/big{i}.bin"] = marker_file(mib * MiB + 123)
    files["var/lib/fragmented.db"] = (MARKER * 512 + bytes(4096)) * 700
    return files


def mkfs(path: Path, size: int, files: dict[str, bytes], *options: str) -> None:
    """mke2fs -d with other options than build_ext4's (block size, features)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        stage_files(files, root)
        with open(path, "wb") as f:
            f.truncate(size)
        subprocess.run(
            ["mke2fs", "-q", "-F", *options, "-d", str(root), str(path)],
            check=True,
            capture_output=True,
            env={**os.environ, "E2FSPROGS_FAKE_TIME": str(EPOCH)},
        )


def debugfs(path: Path, *requests: str, write: bool = False) -> str:
    """Run debugfs requests on an image (its output), to find things independently."""
    return subprocess.run(
        ["debugfs", *(["-w"] if write else []), "-f", "-", str(path)],
        input="".join(f"{r}\n" for r in requests),
        check=True,
        capture_output=True,
        text=True,
    ).stdout


SYMLINKS = ("symlink etc/fast /usr/bin/x", "symlink etc/slow /" + "long-target/" * 10)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three layouts: ext4 as build_ext4 makes it (4 KiB blocks, flex_bg, 64-bit
    descriptors, metadata_csum, 4 groups); ext3 with 1 KiB blocks (block maps, no
    checksums so whole inode tables, 8 groups); ext4 with meta_bg descriptors spread
    over the disk (1 KiB blocks, 64 groups)."""
    tmp = tmp_path_factory.mktemp("ext4")
    made = {
        "ext4": tmp / "ext4.img",
        "ext3-1k": tmp / "ext3.img",
        "meta_bg": tmp / "meta_bg.img",
    }
    build_ext4(
        made["ext4"], 512 * MiB, linux_root(), "fsmeta", "5e1f0e5e-0000-4000-8000-000000002500"
    )
    small = linux_root(dirs=60, per_dir=5, big=(3,))
    mkfs(made["ext3-1k"], 64 * MiB, small, "-t", "ext3", "-b", "1024")
    # 1 KiB blocks, 1 MiB groups: 64 groups, 16 descriptors a block, so 4 meta groups
    meta = ("-t", "ext4", "-b", "1024", "-g", "1024", "-O", "meta_bg,^resize_inode")
    mkfs(made["meta_bg"], 64 * MiB, small, *meta)
    for path in made.values():
        debugfs(path, *SYMLINKS, write=True)
    return made


def report(name: str, **numbers: object) -> None:
    print(f"\n[{name}] " + ", ".join(f"{k}={v}" for k, v in numbers.items()))


@pytest.mark.parametrize("layout", ["ext4", "ext3-1k", "meta_bg"])
def test_the_walk_covers_what_sleuthkit_reads_and_no_file_content(
    images: dict[str, Path], layout: str
) -> None:
    """Measured at 512 KiB. The Sleuth Kit also reads every inode slot of every group
    (its search for orphan files, which `fls -r` does too): the walker's last wave is
    those slots, so both what TSK reads outside them (`coverage`, the unused slots
    found by dumpe2fs) and everything it reads (`raw_coverage`) are held to the bar.
    The waves before the last (the tree) stay a small share of the disk."""
    path = images[layout]
    walk = run_walker(ext4.WALKER, path)
    assert walk.stopped is None
    assert walk.unannounced == [], "read what no earlier wave announced: a miss per read"
    library = blocks_of(library_reads(path))
    content = content_blocks(path)
    ours = blocks_of(walk.extents)
    tree = blocks_of([extent for wave in walk.waves[:-1] for extent in wave])
    wanted = library - content - inside(unused_inode_slots(path))
    coverage = len(wanted & ours) / len(wanted)
    raw = len((library - content) & ours) / len(library - content)
    total = os.path.getsize(path) // BLOCK_SIZE
    report(
        layout,
        waves=len(walk.waves),
        extents=len(walk.extents),
        bytes=walk.total,
        blocks=f"{len(ours)}/{total}",
        tree_blocks=len(tree),
        library_blocks=len(wanted),
        coverage=f"{coverage:.1%}",
        raw_coverage=f"{raw:.1%}",
        missed=sorted(wanted - ours),
        content_blocks=len(content),
        seconds=f"{walk.seconds:.3f}",
    )
    assert coverage >= 0.9
    assert raw >= 0.9
    assert not ours & content, "a block of nothing but file content was yielded"
    assert len(walk.waves) <= 7
    assert len(tree) < total / 4
    if layout == "ext4":
        assert len(content) >= 20  # the large files lie in marker-only blocks: can fail
    if layout == "meta_bg":  # the superblock and 4 descriptor blocks, 16 MiB apart
        assert len(walk.waves[0]) == 5


def unused_inode_slots(path: Path) -> list[tuple[int, int]]:
    """Byte ranges of inode tables no inode uses yet, as dumpe2fs reports them (INODE_UNINIT
    groups whole, others past bg_itable_unused); none without checksummed descriptors."""
    out = subprocess.run(["dumpe2fs", str(path)], capture_output=True, text=True).stdout
    head = dict(re.findall(r"^([A-Za-z ]+):\s+(\S+)", out, re.M))
    bs, ipg, isize = (int(head[k]) for k in ("Block size", "Inodes per group", "Inode size"))
    ranges = []
    for group in re.split(r"\nGroup \d+:", out)[1:]:
        start, end = (int(n) for n in re.findall(r"Inode table at (\d+)-(\d+)", group)[0])
        unused = re.findall(r"(\d+) unused inodes", group)
        if "INODE_UNINIT" in group:
            ranges.append((start * bs, (end + 1 - start) * bs))
        elif unused:
            used = -(-(ipg - int(unused[0])) * isize // bs)
            ranges.append(((start + used) * bs, (end + 1 - start - used) * bs))
    return ranges


def inside(ranges: list[tuple[int, int]]) -> set[int]:
    """The 512 KiB blocks lying wholly inside the union of `ranges`."""
    merged: list[list[int]] = []
    for offset, length in sorted(ranges):
        if merged and offset <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], offset + length)
        else:
            merged.append([offset, offset + length])
    return {b for start, end in merged for b in range(-(-start // BLOCK_SIZE), end // BLOCK_SIZE)}


def test_waves_come_level_by_level(images: dict[str, Path]) -> None:
    """Wave 1 is the superblock and descriptors; wave 2 the inode tables and bitmaps
    (flex_bg packs them: a few extents); what the trees need comes after."""
    walk = run_walker(ext4.WALKER, images["ext4"])
    assert walk.waves[0][0] == (1024, 1024)
    assert all(offset < HEAD_SIZE for offset, _ in walk.waves[0])
    stats = debugfs(images["ext4"], "stats")
    assert "flex_bg" in stats and "metadata_csum" in stats and "64bit" in stats
    # 4,800 inodes in use of 32,768: only group 0's table, in use up to its last inode
    assert sum(length for _, length in walk.waves[1]) < 3 * MiB
    # the fragmented file's extent leaves (depth 1) and the htree's blocks come later
    assert len(walk.waves) >= 3


def test_a_regular_files_extent_leaves_are_fetched_not_its_data(images: dict[str, Path]) -> None:
    path = images["ext4"]
    out = debugfs(path, "stat var/lib/fragmented.db")
    tree_blocks = [int(b) for b in re.findall(r"\(ETB0\):(\d+)", out)]
    assert len(tree_blocks) >= 2  # 700 extents: leaves of 340 under the inode's index
    walk = run_walker(ext4.WALKER, path)
    yielded = walk.extents
    for block in tree_blocks:
        assert any(o <= block * 4096 < o + n for o, n in yielded), block
    big = debugfs(path, "stat var/cache/big0.bin")
    first_data = int(re.findall(r"\(0-\d+\):(\d+)", big)[0])
    assert not any(o <= first_data * 4096 < o + n for o, n in yielded)


def test_large_files_runs_are_told_never_fetched(images: dict[str, Path]) -> None:
    """The extents of regular files of 1 MiB or more are told (for read-ahead of a
    reader starting there) exactly where debugfs says the files' data lies; a small
    file's or the 700 one-block extents of the fragmented file are not; no run is in a
    wave (file data is never prefetched)."""
    path = images["ext4"]
    told, waves = told_runs(ext4.WALKER, path)
    runs: list[tuple[int, int]] = []
    for name in ("var/cache/big0.bin", "var/cache/big1.bin", "var/cache/big2.bin", "<8>"):
        out = debugfs(path, f"stat {name}")  # <8>: the journal, read whole by jbd2
        for first, last, start in re.findall(r"\((\d+)-(\d+)\):(\d+)", out):
            length = int(last) - int(first) + 1
            if length * 4096 >= ext4.FILE_RUN_MIN:
                runs.append((int(start) * 4096, length * 4096))
    assert runs and sorted(told) == sorted(runs)
    fetched = [e for wave in waves for e in wave]
    for offset, length in told:
        assert not any(o < offset + length and offset < o + n for o, n in fetched)


# -- hostile input ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, WalkResult]:
    """A 24 MiB ext4 image and its clean walk (the metadata to scribble over)."""
    path = tmp_path_factory.mktemp("small") / "small.img"
    build_ext4(
        path, 24 * MiB, partition_files("hostile"), "h", "5e1f0e5e-0000-4000-8000-000000002501"
    )
    debugfs(path, *SYMLINKS, "mkdir a", "mkdir a/b", write=True)
    walk = run_walker(ext4.WALKER, path)
    assert walk.stopped is None and len(walk.waves) >= 3
    return path.read_bytes(), walk


def walk_bytes(image: bytes, tmp_path: Path) -> WalkResult:
    path = tmp_path / "damaged.img"
    path.write_bytes(image)
    return run_walker(ext4.WALKER, path)


def ends_quickly(walk: WalkResult, size: int) -> None:
    assert walk.seconds < QUICK
    assert walk.total <= 2 * size
    assert len(walk.waves) <= ext4.MAX_WAVES + 2


@pytest.mark.parametrize("seed", range(40))
def test_random_bytes_over_the_metadata(
    small: tuple[bytes, WalkResult], seed: int, tmp_path: Path
) -> None:
    image, clean = small
    # the superblock and descriptors in a quarter of the runs, what lies below in the rest
    targets = clean.waves[0] if seed % 4 == 0 else [e for wave in clean.waves[1:] for e in wave]
    walk = walk_bytes(scribble(image, targets, seed, pieces=10 + seed * 5), tmp_path)
    ends_quickly(walk, len(image))


def put(image: bytearray, offset: int, data: bytes) -> None:
    image[offset : offset + len(data)] = data


def root_inode(image: bytes, tmp_path: Path) -> int:
    """Byte offset of inode 2, found by debugfs (not by the walker's parser)."""
    path = tmp_path / "probe.img"
    path.write_bytes(image)
    return inode_offset(path, 2)


def inode_offset(path: Path, number: int) -> int:
    """Byte offset of an inode of a 4 KiB-block image, found by debugfs."""
    out = debugfs(path, f"imap <{number}>")
    block = int(out.split("located at block ")[1].split(",")[0])
    return block * 4096 + int(out.split("offset ")[1].split()[0], 16)


def extent_header(entries: int, depth: int, maximum: int = 4) -> bytes:
    return struct.pack("<HHHHI", ext4.EXTENT_MAGIC, entries, maximum, depth, 0)


FREE = 5000
"""A block of the 24 MiB image nothing uses (of 6,144)."""


@pytest.mark.parametrize(
    "case", ["index_to_itself", "deep_cycle", "indirect_to_itself", "huge_leaf", "huge_dir"]
)
def test_self_referencing_trees_and_huge_counts(
    small: tuple[bytes, WalkResult], case: str, tmp_path: Path
) -> None:
    image = bytearray(small[0])
    inode = root_inode(small[0], tmp_path)
    block = FREE * 4096
    flags, iblock, size = inode + 0x20, inode + 0x28, inode + 0x04
    if case == "index_to_itself":  # depth 1 in the inode, the child claims depth 1 again
        put(image, iblock, extent_header(1, 1) + struct.pack("<IIH2x", 0, FREE, 0))
        put(image, block, extent_header(1, 1, 340) + struct.pack("<IIH2x", 0, FREE, 0))
    elif case == "deep_cycle":  # depth 5 and every child the same block
        put(image, iblock, extent_header(1, 5) + struct.pack("<IIH2x", 0, FREE, 0))
        put(image, block, extent_header(340, 4, 340) + struct.pack("<IIH2x", 0, FREE, 0) * 340)
    elif case == "indirect_to_itself":  # block map: a double indirect block naming itself
        put(image, flags, struct.pack("<I", 0))
        put(image, iblock, struct.pack("<15I", *[0] * 13, FREE, 0))
        put(image, block, struct.pack("<I", FREE) * 1024)
        put(image, size, struct.pack("<I", 0xFFFFFFFF))
    elif case == "huge_leaf":  # 340 extents of nearly the whole disk, a 4 GiB directory
        put(image, iblock, extent_header(1, 1) + struct.pack("<IIH2x", 0, FREE, 0))
        leaf = struct.pack("<IHHI", 0, 6000, 0, 1)
        put(image, block, extent_header(340, 0, 340) + leaf * 340)
        put(image, size, struct.pack("<I", 0xFFFFFFFF))
    elif case == "huge_dir":  # the root claims 2^64 - 1 bytes: its real blocks, no more
        put(image, size, struct.pack("<I", 0xFFFFFFFF))
        put(image, inode + 0x6C, struct.pack("<I", 0xFFFFFFFF))
    walk = walk_bytes(bytes(image), tmp_path)
    report(case, stopped=walk.stopped, waves=len(walk.waves), bytes=walk.total, s=walk.seconds)
    ends_quickly(walk, len(image))
    assert walk.unannounced == []
    if case == "huge_leaf":  # bounded by the disk: one merged extent, fetched once
        assert walk.total <= len(image) + small[1].total
    elif case != "huge_dir":  # the root's tree was cut: nothing under FREE but FREE itself
        assert blocks_of(walk.extents) <= blocks_of(small[1].extents) | {block // BLOCK_SIZE}


def superblock_field(offset: int, fmt: str, value: int) -> tuple[int, str, int]:
    return 1024 + offset, fmt, value


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (superblock_field(0x60, "<I", ext4layout.INCOMPAT_COMPRESSION), "compression"),
        (superblock_field(0x60, "<I", ext4layout.INCOMPAT_JOURNAL_DEV), "journal"),
        (superblock_field(0x60, "<I", 0x80000000), "unknown incompat"),
        (superblock_field(0x18, "<I", 40), "block size"),
        (superblock_field(0x28, "<I", 0xFFFFFFFF), "damaged superblock"),
        (superblock_field(0x04, "<I", 0xFFFFFFFF), "the device holds"),  # 2 s of descriptors
        (superblock_field(0x00, "<I", 0xFFFFFFFF), "damaged superblock"),
        (superblock_field(0x58, "<H", 100), "inodes of 100 bytes"),
        (superblock_field(0xFE, "<H", 48), "descriptors of 48 bytes"),
        (superblock_field(0x38, "<H", 0), "no ext2/3/4 superblock"),
    ],
)
def test_what_cannot_be_followed_is_named(
    small: tuple[bytes, WalkResult], change: tuple[int, str, int], reason: str, tmp_path: Path
) -> None:
    """Incompat features are set beside the image's own; other fields replaced."""
    image = bytearray(small[0])
    offset, fmt, value = change
    if offset == 1024 + 0x60:
        value |= struct.unpack_from(fmt, image, offset)[0]
    put(image, offset, struct.pack(fmt, value))
    walk = walk_bytes(bytes(image), tmp_path)
    assert walk.stopped is not None and reason in walk.stopped, walk.stopped
    assert walk.waves == []


def test_groups_all_naming_one_table_are_bounded(images: dict[str, Path], tmp_path: Path) -> None:
    """ext3 with 1 KiB blocks (32-byte descriptors at 2048): every descriptor rewritten
    to name group 0's table, and the walk still ends quickly."""
    image = bytearray(images["ext3-1k"].read_bytes())
    groups = debugfs(images["ext3-1k"], "stats").count(" Group ")
    assert groups >= 8
    first = bytes(image[2048 : 2048 + 32])
    for g in range(groups):
        put(image, 2048 + g * 32, first)
    walk = walk_bytes(bytes(image), tmp_path)
    assert walk.stopped is None
    ends_quickly(walk, len(image))
    assert len(walk.waves[1]) <= 2  # the one table and its bitmap (perhaps merged)


def test_the_reserved_gdt_blocks_come_with_the_inode_tables(tmp_path: Path) -> None:
    """resize_inode: group 0's reserved GDT blocks follow its descriptors (1 MiB of them
    here, 4 MiB on an 8 GiB disk), where dumpe2fs says. They are the resize inode's
    indirect blocks, which `fls -r` reads through as it starts (strace; pytsk3's tree
    listing does not): with the inode tables, the wave after the descriptors, they cost
    no round trip of their own (on the 8 GiB disk of bench_walk.py they had cost `fls
    -r` two; in the first wave they held the inode tables back one).
    The resize inode's double-indirect block comes with the tree. A hostile count is
    cut to what that block can name (block size / 4); a double-indirect pointer past the
    filesystem's end is not fetched."""
    path = tmp_path / "growable.img"
    mkfs(path, 2048 * MiB, {"etc/hostname": b"growable\n"}, "-t", "ext4", "-b", "4096")
    dumped = subprocess.run(["dumpe2fs", str(path)], capture_output=True, text=True).stdout
    first, last = (int(n) for n in re.findall(r"Reserved GDT blocks at (\d+)-(\d+)", dumped)[0])
    reserved = (first * 4096, (last + 1 - first) * 4096)
    dind = int(re.findall(r"\(DIND\):(\d+)", debugfs(path, "stat <7>"))[0])
    walk = run_walker(ext4.WALKER, path)
    assert walk.stopped is None
    assert reserved[1] > BLOCK_SIZE  # past the first block
    assert [e for e in walk.waves[0] if e[0] >= reserved[0]] == []  # the walk's next step
    assert blocks_of([reserved]) <= blocks_of(walk.waves[1])  # waits for the first wave only
    later = blocks_of(e for wave in walk.waves[1:] for e in wave)
    assert blocks_of([(dind * 4096, 4096)]) <= later
    with open(path, "r+b") as f:
        os.pwrite(f.fileno(), struct.pack("<H", 0xFFFF), 1024 + 0xCE)
    with open(path, "rb") as f:
        superblock = os.pread(f.fileno(), 1024, 1024)
    geo = ext4layout.geometry(superblock, os.path.getsize(path))
    assert geo.reserved_gdt == [(first * 4096, 1024 * 4096)]
    assert run_walker(ext4.WALKER, path).stopped is None
    # The resize inode's double-indirect pointer past the filesystem's end: not fetched.
    with open(path, "r+b") as f:
        os.pwrite(f.fileno(), struct.pack("<I", 0xFFFFFFFF), inode_offset(path, 7) + 0x28 + 13 * 4)
    beyond = run_walker(ext4.WALKER, path)
    assert beyond.stopped is None
    assert all(offset + length <= os.path.getsize(path) for offset, length in beyond.extents)


def test_probe() -> None:
    head = bytearray(HEAD_SIZE)
    assert not ext4.WALKER.probe(bytes(head))
    put(head, 1024 + 0x38, struct.pack("<H", ext4layout.MAGIC))
    assert ext4.WALKER.probe(bytes(head))
    put(head, 1024 + 0x18, struct.pack("<I", 9))
    assert not ext4.WALKER.probe(bytes(head))
    assert not ext4.WALKER.probe(b"\0" * 100)


def test_the_unused_inode_slots_come_with_the_first_tree_level_and_within_their_cap(
    images: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rest of the inode tables (TSK's orphan search reads them) rides with the
    first level of the trees, after that level's extents (the budget is spent in wave
    order), so it costs the walk no round trip of its own: never a slot read in another
    wave, never more than MAX_SLOT_SWEEP bytes."""
    path = images["ext4"]
    unused = inside(unused_inode_slots(path))
    whole = run_walker(ext4.WALKER, path)
    first_level = whole.waves[2]
    assert unused and unused <= blocks_of(first_level)
    assert not blocks_of([e for n, w in enumerate(whole.waves) if n != 2 for e in w]) & unused
    with monkeypatch.context() as patch:
        patch.setattr(ext4.Ext4Walker, "_unused_slots", lambda *_: False)
        tree = run_walker(ext4.WALKER, path).waves[2]
    assert tree and first_level[: len(tree)] == tree, "the tree's extents come first"
    assert unused <= blocks_of(first_level[len(tree) :])
    monkeypatch.setattr(ext4, "MAX_SLOT_SWEEP", 8 * 4096)
    capped = run_walker(ext4.WALKER, path)
    assert len(capped.waves) == len(whole.waves)
    swept = capped.waves[2][len(tree) :]
    assert swept and sum(length for _, length in swept) <= 8 * 4096 + 4 * 4096  # + bitmaps


def test_a_hostile_slot_sweep_stays_in_the_volume_and_under_its_cap(
    images: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Crafted for the slot sweep: every group but 0 claims no inode in use (so the
    sweep, not the tables wave, takes its table) and names group 0's table, or one at
    the volume's very end, past it, or at 2^32-1. The sweep must yield nothing outside
    the volume (run_walker checks every extent), keep within MAX_SLOT_SWEEP (here 64
    blocks) plus one bitmap a group, and end quickly."""
    image = bytearray(images["ext3-1k"].read_bytes())
    groups = debugfs(images["ext3-1k"], "stats").count(" Group ")
    assert groups >= 8
    per_group = struct.unpack_from("<I", image, 1024 + 0x28)[0]
    first = bytes(image[2048 : 2048 + 32])
    blocks = len(image) // 1024
    for g in range(1, groups):
        put(image, 2048 + g * 32, first)
        put(image, 2048 + g * 32 + 0x0E, struct.pack("<H", per_group))  # none in use
    for g, table in ((1, blocks - 1), (2, blocks + 10), (3, 0xFFFFFFFF)):
        put(image, 2048 + g * 32 + 0x08, struct.pack("<I", table))
    monkeypatch.setattr(ext4, "MAX_SLOT_SWEEP", 0)
    before = walk_bytes(bytes(image), tmp_path).waves
    monkeypatch.setattr(ext4, "MAX_SLOT_SWEEP", 64 * 1024)
    walk = walk_bytes(bytes(image), tmp_path)
    ends_quickly(walk, len(image))
    assert len(walk.waves) == len(before)  # the sweep rides with the first tree level
    assert walk.waves[2][: len(before[2])] == before[2]
    sweep = sum(length for _, length in walk.waves[2][len(before[2]) :])
    assert 0 < sweep <= 64 * 1024 + groups * 1024  # the sweep had tables to take


def test_hostile_file_extents_are_not_told_as_runs() -> None:
    """Crafted leaf of a regular file (the attacker writes the extents): one at block
    0, one past the filesystem's end, one whose length overflows it, an unwritten one
    (length > 32768), one past the file's size, one too short to tell: none is told;
    only the one honest extent is, cut to the file's size."""
    geo = ext4layout.Geometry(4096, 100_000, 1, 8192, 256, 64, 11, 8, True, [])
    told: list[tuple[int, int]] = []
    walk = ext4._Pass(geo, lambda o, n: told.append((o, n)))
    leaves = [
        (0, 512, 0, 0),  # at block 0: the superblock's, never a file's
        (512, 512, 0, 200_000),  # past the end
        (1024, 512, 0, 99_800),  # runs over the end
        (1536, 40_000, 0, 10_000),  # unwritten
        (9_000, 512, 0, 20_000),  # past the file's size
        (2048, 100, 0, 30_000),  # shorter than FILE_RUN_MIN
        (2560, 600, 0, 40_000),  # honest; the file ends 400 blocks in
    ]
    raw = struct.pack("<HHHH4x", ext4.EXTENT_MAGIC, len(leaves), 340, 0) + b"".join(
        struct.pack("<IHHI", *leaf) for leaf in leaves
    )
    walk.extent_node(raw, ext4._Node(0, -1, True, False, 2960))
    assert told == [(40_000 * 4096, 400 * 4096)]
    assert walk.wave == []  # a file's data is never fetched


@pytest.mark.parametrize(
    "options, tree_label",
    [(("-t", "ext4"), "ETB0"), (("-t", "ext3", "-b", "1024"), "IND")],
)
def test_small_files_with_a_tree_outside_the_inode_are_not_skipped(
    tmp_path: Path, options: tuple[str, ...], tree_label: str
) -> None:
    """The table scan skips small regular files without parsing them (`_Pass.skips`):
    only those whose whole tree is in the inode. A small file of 10 extents (an extent
    tree of depth 1) or past 12 blocks of 1 KiB (an indirect block) still has that tree
    block fetched."""
    files = {
        "small-fragmented.db": (MARKER * 512 + bytes(4096)) * 10,  # 80 KiB, 10 extents
        "small-mapped.txt": MARKER * 2600,  # 20.8 KB: 21 blocks of 1 KiB
        "tiny.txt": b"tiny\n",
    }
    path = tmp_path / "small.img"
    mkfs(path, 16 * MiB, files, *options)
    name = "small-fragmented.db" if tree_label == "ETB0" else "small-mapped.txt"
    out = debugfs(path, f"stat {name}")
    tree_blocks = [int(b) for b in re.findall(rf"\({tree_label}\):(\d+)", out)]
    assert tree_blocks, out
    block_size = int(re.findall(r"Block size:\s+(\d+)", debugfs(path, "stats"))[0])
    walk = run_walker(ext4.WALKER, path)
    for block in tree_blocks:
        assert any(o <= block * block_size < o + n for o, n in walk.extents), block
