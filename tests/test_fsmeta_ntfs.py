"""The NTFS metadata walker (ebsfs/engine/fsmeta/ntfs.py).

Unit tier: hand-made volumes (a boot sector and MFT records written here) for what is
yielded and what is not, and hostile ones (self-referencing $MFT segments, huge runs,
run floods, random bytes over the MFT of an mkntfs image) that must end quickly with
WalkStopped or a short result. Mount tier (ntfs-3g fills the image): a small Linux-like
tree, checked against an independent reader: the blocks pytsk3 reads walking the whole
tree (ebsfs.forensics.fsread) must be covered, and no walker byte may lie in a file's
data (its extents as pytsk3 gives them, and blocks made only of the large files'
marker)."""

from __future__ import annotations

import bisect
import os
import random
import shutil
import struct
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

from ebsfs.constants import BLOCK_SIZE
from ebsfs.engine.fsmeta import ntfs
from ebsfs.engine.fsmeta.walk import HEAD_SIZE, Extent
from ebsfs.forensics import fsread
from tests.disks import MiB, build_ntfs
from tests.fsmeta_helpers import MARKER, Image, WalkResult, blocks_of, run_walker, told_runs

CLUSTER, RECORD, MFT_LCN = 4096, 1024, 4


# -- helpers ----------------------------------------------------------------------------


def walk(volume: Image) -> WalkResult:
    """The NTFS walker over `volume` through the shared runner (claiming its boot sector
    first)."""
    return run_walker(ntfs.WALKER, volume, probe=True)


# -- hand-made volumes ------------------------------------------------------------------


def number(n: int, signed: bool) -> bytes:
    for width in range(1, 9):
        try:
            return n.to_bytes(width, "little", signed=signed)
        except OverflowError:
            continue
    raise ValueError(n)


def runlist(runs: Sequence[tuple[int | None, int]]) -> bytes:
    out, previous = bytearray(), 0
    for lcn, count in runs:
        length = number(count, False)
        delta = b"" if lcn is None else number(lcn - previous, True)
        out += bytes([len(delta) << 4 | len(length)]) + length + delta
        previous = previous if lcn is None else lcn
    return bytes(out + b"\0")


def align8(n: int) -> int:
    return (n + 7) // 8 * 8


def nonresident(
    kind: int,
    runs: Sequence[tuple[int | None, int]] | bytes,
    data_size: int | None = None,
    first: int = 0,
    last: int | None = None,
    name: str = "",
    initialized: int | None = None,
) -> bytes:
    encoded = runs if isinstance(runs, bytes) else runlist(runs)
    clusters = 0 if isinstance(runs, bytes) else sum(c for _, c in runs)
    last = first + clusters - 1 if last is None else last
    size = clusters * CLUSTER if data_size is None else data_size
    label = name.encode("utf-16-le")
    at = align8(0x40 + len(label))
    length = align8(at + len(encoded))
    head = struct.pack(
        "<IIBBHHHQQHH4xQQQ",
        kind,
        length,
        1,
        len(name),
        0x40,
        0,
        0,
        first,
        last,
        at,
        0,
        clusters * CLUSTER,
        size,
        size if initialized is None else initialized,
    )
    return (head + label).ljust(at, b"\0") + encoded.ljust(length - at, b"\0")


def resident(kind: int, value: bytes, name: str = "") -> bytes:
    label = name.encode("utf-16-le")
    at = align8(0x18 + len(label))
    length = align8(at + len(value))
    head = struct.pack("<IIBBHHHIHBx", kind, length, 0, len(name), 0x18, 0, 0, len(value), at, 0)
    return (head + label).ljust(at, b"\0") + value.ljust(length - at, b"\0")


def list_entry(kind: int, record: int, first: int = 0) -> bytes:
    return struct.pack("<IHBBQQH6x", kind, 0x20, 0, 0x1A, first, record, 0)


def sign(raw: bytearray, size: int = RECORD, usn: int = 7) -> bytearray:
    """Write the update-sequence array of a record whose header is in place."""
    usa = struct.unpack_from("<H", raw, 4)[0]
    struct.pack_into("<H", raw, usa, usn)
    for i in range(1, size // 512 + 1):
        end = i * 512
        raw[usa + 2 * i : usa + 2 * i + 2] = raw[end - 2 : end]
        struct.pack_into("<H", raw, end - 2, usn)
    return raw


def record(attrs: list[bytes], flags: int = 1, base: int = 0, size: int = RECORD) -> bytes:
    count = size // 512 + 1
    first = align8(0x30 + 2 * count)
    body = b"".join(attrs) + struct.pack("<II", 0xFFFFFFFF, 0)
    used = first + len(body)
    assert used <= size
    raw = bytearray(size)
    struct.pack_into(
        "<4sHHQHHHHIIQH", raw, 0, b"FILE", 0x30, count, 0, 1, 1, first, flags, used, size, base, 0
    )
    raw[first:used] = body
    return bytes(sign(raw, size))


def boot(
    cluster: int = CLUSTER, mft_lcn: int = MFT_LCN, per_record: int = -10, size: int = 0
) -> bytes:
    raw = bytearray(512)
    raw[0:3] = b"\xeb\x52\x90"
    raw[3:11] = b"NTFS    "
    struct.pack_into("<HB", raw, 0x0B, 512, cluster // 512 if cluster >= 512 else cluster)
    struct.pack_into("<QQQb", raw, 0x28, size // 512, mft_lcn, mft_lcn + 1, per_record)
    raw[510:512] = b"\x55\xaa"
    return bytes(raw)


def volume(records: dict[int, bytes], mft_records: int = 64, size: int = 16 * MiB) -> Image:
    """A hand-made volume: the boot sector, the MFT at cluster MFT_LCN (record 0 made
    here unless given), zeros elsewhere."""
    records = dict(records)
    if 0 not in records:
        clusters = mft_records * RECORD // CLUSTER
        records[0] = record([nonresident(0x80, [(MFT_LCN, clusters)])])
    data = bytearray(MFT_LCN * CLUSTER + mft_records * RECORD)
    data[0:512] = boot(size=size)
    for n, raw in records.items():
        at = MFT_LCN * CLUSTER + n * RECORD
        data[at : at + RECORD] = raw
    return Image(bytes(data), size)


IDX, DATA, ALIST = 0xA0, 0x80, 0x20


def test_what_is_yielded_and_what_is_not() -> None:
    vol = volume(
        {
            5: record([nonresident(IDX, [(100, 2), (200, 1)], name="$I30")], flags=3),
            10: record([nonresident(DATA, [(300, 32)])]),  # $UpCase: read at open
            9: record([nonresident(DATA, [(340, 4)], name="$SDS"), nonresident(DATA, [(350, 1)])]),
            30: record([nonresident(DATA, [(400, 10)])]),  # a file: its data is content
            31: record([nonresident(IDX, [(500, 1)], name="$I30")], flags=2),  # not in use
            33: record([nonresident(ALIST, [(700, 1)], data_size=100)]),
            34: record([nonresident(IDX, [(800, 2)], first=2, name="$I30")], base=33),
            35: record([nonresident(IDX, [(900, 1), (None, 5), (901, 2)], name="$I30")], flags=3),
        }
    )
    torn = bytearray(record([nonresident(IDX, [(600, 1)], name="$I30")], flags=3))
    torn[1022] ^= 0xFF  # a torn write: the fixup check fails, the record is skipped
    vol.patches.append((MFT_LCN * CLUSTER + 32 * RECORD, bytes(torn)))
    walked = walk(vol)
    assert walked.stopped is None
    mft = MFT_LCN * CLUSTER
    c = CLUSTER
    assert walked.waves == [
        [(0, 512)],
        [(mft, RECORD)],
        [(mft, 64 * RECORD)],
        [
            (100 * c, 2 * c),
            (200 * c, c),
            (300 * c, 32 * c),
            (340 * c, 4 * c),
            (700 * c, c),
            (800 * c, 2 * c),
            (900 * c, 3 * c),
        ],
    ]


def test_the_mft_continued_in_extension_records_is_followed() -> None:
    """$MFT with an attribute list: its $DATA's second segment lives in record 40, which
    the first segment reaches."""
    first = nonresident(DATA, [(MFT_LCN, 16)], data_size=32 * CLUSTER, last=15)
    listed = resident(ALIST, list_entry(DATA, 0) + list_entry(DATA, 40, first=16))
    second = nonresident(DATA, [(1000, 16)], first=16)
    directory = nonresident(IDX, [(2000, 1)], name="$I30")
    vol = volume(
        {0: record([listed, first]), 40: record([second], base=0)},
        mft_records=64,
    )
    vol.patches.append((1000 * CLUSTER + 10 * RECORD, record([directory], flags=3)))  # record 74
    walked = walk(vol)
    assert walked.stopped is None
    mft = MFT_LCN * CLUSTER
    assert walked.waves[2] == [(mft + 40 * RECORD, RECORD)]
    assert walked.waves[3] == [(mft, 16 * CLUSTER), (1000 * CLUSTER, 16 * CLUSTER)]
    assert walked.waves[4] == [(2000 * CLUSTER, CLUSTER)]


# -- hostile volumes --------------------------------------------------------------------


@pytest.mark.parametrize(
    "boot_sector",
    [
        b"\0" * 512,
        boot(cluster=0),
        boot(cluster=3 * 512),
        boot(per_record=-40),
        boot(per_record=0),
        boot(per_record=100),
        boot(mft_lcn=1 << 60),
        boot(mft_lcn=0),
    ],
)
def test_a_bad_boot_sector_stops_the_walk(boot_sector: bytes) -> None:
    vol = volume({})
    vol.patches.append((0, boot_sector))
    walked = run_walker(ntfs.WALKER, vol)  # no probe: the walker must stop by itself
    assert walked.stopped is not None
    assert walked.reads == [(0, 512)]


def test_self_referencing_mft_segments_end() -> None:
    """$MFT's attribute list names record 0 itself, record 1 (whose segment points back
    at the MFT) and record 2 (whose segment claims 2**40 clusters from VCN 16)."""
    first = nonresident(DATA, [(MFT_LCN, 16)], data_size=1 << 62, initialized=1 << 62, last=15)
    entries = b"".join(list_entry(DATA, n, first=16) for n in (0, 1, 2, 3))
    vol = volume(
        {
            0: record([resident(ALIST, entries), first]),
            1: record([nonresident(DATA, [(MFT_LCN, 16)], first=16)], base=0),
            2: record([nonresident(DATA, [(MFT_LCN, 1 << 40)], first=16)], base=0),
            3: record([resident(ALIST, entries)], base=0),
        }
    )
    walked = walk(vol)
    assert walked.seconds < 5 and len(walked.waves) <= 6
    assert sum(n for _, n in walked.extents) <= vol.size


def test_huge_runs_and_sizes_are_cut_at_the_volume() -> None:
    huge = [(MFT_LCN, 1 << 40)]
    vol = volume(
        {
            0: record([nonresident(DATA, huge, data_size=1 << 63, initialized=1 << 63)]),
            7: record([nonresident(IDX, [(1000, 1 << 50), (-5, 3), (1 << 50, 2)], name="$I30")]),
            8: record([nonresident(ALIST, [(3000, 1 << 50)], data_size=1 << 63)]),
        }
    )
    walked = walk(vol)
    assert walked.stopped is None
    mft = MFT_LCN * CLUSTER
    assert walked.waves[2] == [(mft, vol.size - mft)]
    assert walked.seconds < 10


def test_a_flood_of_runs_stops_at_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ntfs, "MAX_EXTENTS", 2000)

    def scattered(n: int) -> list[tuple[int | None, int]]:
        return [(n * 1000 + 2 * i, 1) for i in range(250)]  # 250 runs, none adjacent

    vol = volume(
        {n: record([nonresident(IDX, scattered(n))]) for n in range(16, 64)}, size=512 * MiB
    )
    walked = walk(vol)
    assert walked.stopped is not None and "2000" in walked.stopped
    assert len(walked.extents) <= 2000


def test_damaged_attribute_headers_skip_the_record_only() -> None:
    good = record([nonresident(IDX, [(1000, 1)], name="$I30")])
    zero_length = bytearray(good)
    struct.pack_into("<I", zero_length, 0x38 + 4, 0)  # an attribute of length 0: no loop
    past_end = bytearray(good)
    struct.pack_into("<I", past_end, 0x38 + 4, 1 << 31)
    bad_runs = bytearray(good)
    struct.pack_into("<H", bad_runs, 0x38 + 0x20, 0xFFF0)  # runlist offset outside
    vol = volume(
        {
            20: bytes(sign(zero_length)),
            21: bytes(sign(past_end)),
            22: bytes(sign(bad_runs)),
            23: record([nonresident(IDX, [(2000, 1)], name="$I30")]),
        }
    )
    walked = walk(vol)
    assert walked.waves[-1] == [(2000 * CLUSTER, CLUSTER)]


def flagged(attribute: bytes, flags: int) -> bytes:
    """An attribute header with its flags (compressed, encrypted, sparse) set."""
    return attribute[:0x0C] + struct.pack("<H", flags) + attribute[0x0E:]


def test_a_user_files_long_plain_runs_are_told_within_its_initialized_size() -> None:
    """Told: the long allocated runs of a user file's unnamed $DATA, cut at its
    initialized size and at the volume. Not told: holes, short runs, compressed or
    encrypted streams, named streams, directories, records not in use, the volume's
    own files, segments not starting at VCN 0. None is fetched."""
    mb = MiB // CLUSTER
    vol = volume(
        {
            30: record([nonresident(DATA, [(1000, 2 * mb)])]),
            31: record([nonresident(DATA, [(2000, mb + 44), (None, 100), (3000, mb), (3500, 9)])]),
            32: record([nonresident(DATA, [(4000, 2 * mb)], initialized=MiB + MiB // 2 + 100)]),
            33: record([nonresident(DATA, [(4600, 2 * mb)], initialized=MiB // 2)]),
            34: record([flagged(nonresident(DATA, [(5000, 2 * mb)]), 0x0001)]),
            35: record([flagged(nonresident(DATA, [(5600, 2 * mb)]), 0x4000)]),
            36: record([nonresident(DATA, [(6000, 2 * mb)])], flags=3),
            37: record([nonresident(DATA, [(6600, 2 * mb)], name="ads")]),
            38: record([nonresident(DATA, [(7000, 2 * mb)])], flags=0),
            12: record([nonresident(DATA, [(7600, 2 * mb)])]),
            39: record([nonresident(DATA, [(8000, 2 * mb)], first=5)]),
            40: record([nonresident(DATA, [(16000, 2 * mb)])]),  # past the volume's end
        },
        size=64 * MiB,
    )
    told: list[Extent] = []
    waves: list[list[Extent]] = []

    async def read(offset: int, length: int) -> bytes:
        return vol.pread(length, offset)

    async def drive() -> None:
        async for wave in ntfs.WALKER.walk(read, vol.size, lambda o, n: told.append((o, n))):
            waves.append(wave)

    trio.run(drive)
    c = CLUSTER
    assert sorted(told) == [
        (1000 * c, 2 * MiB),
        (2000 * c, MiB + 44 * c),
        (3000 * c, MiB),
        (4000 * c, MiB + MiB // 2 + 100),
        (16000 * c, 64 * MiB - 16000 * c),
    ]
    assert overlaps([e for wave in waves for e in wave], told) == []


@pytest.fixture(scope="module")
def blank_ntfs(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A fresh mkntfs volume of 32 MiB (no mount needed)."""
    if not shutil.which("mkntfs"):
        pytest.skip("mkntfs (ntfs-3g) is not installed")
    path = tmp_path_factory.mktemp("ntfs") / "blank.img"
    with open(path, "wb") as f:
        f.truncate(32 * MiB)
    subprocess.run(
        ["mkntfs", "-q", "-F", "-Q", "-s", "512", str(path)],
        check=True,
        timeout=60,
        capture_output=True,
    )
    return path.read_bytes()


def test_random_bytes_over_the_mft_end_quickly(blank_ntfs: bytes) -> None:
    """Random spans over the boot sector and the MFT's first records, some left torn
    (the fixup check must catch them), some re-signed so the parser meets the garbage."""
    size = len(blank_ntfs)
    clean = walk(Image(blank_ntfs, size))
    assert clean.stopped is None
    mft, length = clean.waves[2][0]  # mkntfs's MFT: one extent
    rng = random.Random(25)
    outcomes = {"stopped": 0, "finished": 0}
    start = time.monotonic()
    for trial in range(300):
        vol = Image(blank_ntfs, size)
        n = rng.randrange(length // RECORD)  # $MFT, the system files, the root
        at = mft + n * RECORD
        if trial % 10 == 0:
            vol.patches.append((rng.randrange(0x0B, 0x48), rng.randbytes(4)))
        else:
            raw = bytearray(blank_ntfs[at : at + RECORD])
            lo = rng.randrange(0x38, RECORD)
            hi = rng.randrange(lo, min(RECORD, lo + rng.choice([2, 8, 64, 1024])) + 1)
            raw[lo:hi] = rng.randbytes(hi - lo)
            vol.patches.append((at, bytes(sign(raw) if trial % 2 else raw)))
        if not ntfs.WALKER.probe(vol.pread(HEAD_SIZE, 0)):
            outcomes["stopped"] += 1
            continue
        walked = walk(vol)
        assert walked.seconds < 2 and len(walked.waves) <= 4 + ntfs.MAX_MFT_SEGMENTS
        outcomes["stopped" if walked.stopped else "finished"] += 1
    print(f"random damage: {outcomes} in {time.monotonic() - start:.1f} s")
    assert outcomes["finished"] > 100


# -- a real volume (ntfs-3g) against pytsk3 ----------------------------------------------


def linux_root() -> dict[str, bytes]:
    """A small Linux root: about 300 directories, 3,000 small files (some kept inside
    their MFT record, some in clusters), a directory of 700 names, and four large
    files of MARKER only."""
    rng = random.Random("ntfs-walk")
    files: dict[str, bytes] = {}
    dirs = ["etc", "usr/bin", "usr/lib", "var/log", "home/alice", "srv/www"]
    for i in range(300):
        parent = rng.choice(dirs)
        dirs.append(f"{parent}/d{i:03}")
    for i in range(3000):
        size = rng.choice([0, 40, 300, 900, 2000, 5000, 14000])
        where = "usr/bin" if i < 700 else rng.choice(dirs)
        files[f"{where}/f{i:04}.txt"] = (f"file {i} " * (size // 7 + 1)).encode()[:size]
    for d in dirs:
        files[f"{d}/README"] = d.encode()
    for i in range(4):
        files[f"var/lib/big{i}.img"] = MARKER * ((6 * MiB + i * 4096 * 7) // len(MARKER))
    return files


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """linux_root() in a 256 MiB NTFS volume (mkntfs, then an ntfs-3g mount: root)."""
    path = tmp_path_factory.mktemp("ntfs-tree") / "ntfs.img"
    size = 256 * MiB
    build_ntfs(path, size, linux_root(), "ntfs-walk", "5E1F0E5E000000F1")
    return path, size


class Recording:
    """A PositionalReader over the image file that notes every range read."""

    def __init__(self, path: Path, size: int) -> None:
        self.size = size
        self.fd = os.open(path, os.O_RDONLY)
        self.ranges: list[Extent] = []

    def pread(self, size: int, offset: int) -> bytes:
        self.ranges.append((offset, size))
        return os.pread(self.fd, size, offset)


def classify(path: Path, size: int) -> tuple[set[int], set[int]]:
    """(blocks of MARKER only: file content, blocks of zeros only: never written)."""
    whole, zero = MARKER * (BLOCK_SIZE // len(MARKER)), bytes(BLOCK_SIZE)
    content, empty = set(), set()
    with open(path, "rb") as f:
        for b in range(size // BLOCK_SIZE):
            data = f.read(BLOCK_SIZE)
            if data == whole:
                content.add(b)
            elif data == zero:
                empty.add(b)
    return content, empty


def overlaps(extents: list[Extent], others: list[Extent]) -> list[tuple[Extent, Extent]]:
    """Pairs (a, b) with a in the merged `extents` and b in `others` sharing a byte."""
    merged = ntfs.merged(extents)
    starts = [o for o, _ in merged]
    found = []
    for offset, length in others:
        i = bisect.bisect_right(starts, offset + length - 1) - 1
        if i >= 0 and merged[i][0] + merged[i][1] > offset:
            found.append((merged[i], (offset, length)))
    return found


@pytest.fixture(scope="module")
def read_by_pytsk3(populated: tuple[Path, int]) -> tuple[fsread.Tree, list[Extent]]:
    """The populated volume's tree as pytsk3 reads it, and the ranges it read."""
    path, size = populated
    source = Recording(path, size)
    try:
        return fsread.read_tree(source), source.ranges
    finally:
        os.close(source.fd)


@pytest.mark.mount
def test_a_real_tree_is_covered_without_file_content(
    populated: tuple[Path, int], read_by_pytsk3: tuple[fsread.Tree, list[Extent]]
) -> None:
    path, size = populated
    tree, ranges = read_by_pytsk3
    assert tree.fstype == "ntfs" and len(tree.entries) > 3000
    walked = walk(Image(path, size))
    assert walked.stopped is None

    content, empty = classify(path, size)
    assert len(content) >= 4 * 11  # four files of 6 MiB
    # pytsk3's FS_Info tries other filesystems first and reads zeros far into the
    # volume (52 MiB here): blocks never written, which a snapshot does not hold.
    library = blocks_of(ranges) - content - empty
    mine = blocks_of(walked.extents)
    covered = len(library & mine) / len(library)
    data = [e for entry in tree.entries.values() for e in entry.extents]
    total = sum(n for _, n in walked.extents)
    print(
        f"ntfs walk: {len(walked.waves)} waves {[len(w) for w in walked.waves]}, "
        f"{total / MiB:.1f} MiB in {len(mine)} blocks ({100 * total / size:.1f} % of the "
        f"volume, {len(mine)} of {size // BLOCK_SIZE - len(empty)} written blocks) in "
        f"{walked.seconds:.2f} s; pytsk3 read {len(blocks_of(ranges))} blocks, "
        f"{len(library)} of them written and not file content: {100 * covered:.1f} % "
        f"covered, missed {sorted(library - mine)}; {len(content)} blocks of file content"
    )
    assert covered >= 0.9
    assert not mine & content
    assert overlaps(walked.extents, data) == []  # not one byte of any file's data
    assert len(walked.waves) <= 5
    assert total < size / 10


@pytest.mark.mount
def test_large_files_runs_are_told_where_pytsk3_finds_their_data(
    populated: tuple[Path, int], read_by_pytsk3: tuple[fsread.Tree, list[Extent]]
) -> None:
    """The runs of 1 MiB or more of the four large files are told exactly where
    pytsk3 (an independent reader) finds their data, and none is in a wave."""
    tree, _ = read_by_pytsk3
    expected = [
        extent
        for entry in tree.entries.values()
        if entry.kind == fsread.FILE
        for extent in entry.extents
        if extent[1] >= ntfs.FILE_RUN_MIN
    ]
    told, waves = told_runs(ntfs.WALKER, populated[0])
    assert len(expected) >= 4 and sorted(told) == sorted(expected)
    assert overlaps([e for wave in waves for e in wave], told) == []


@pytest.mark.mount
def test_random_bytes_over_a_real_mft_end_quickly(populated: tuple[Path, int]) -> None:
    path, size = populated
    vol = Image(path, size)
    clean = walk(vol)
    mft, length = clean.waves[2][0]
    rng = random.Random(2025)
    for _ in range(20):
        vol.patches = []
        for _ in range(50):  # 50 records hit, half re-signed
            at = mft + rng.randrange(length // RECORD) * RECORD
            raw = bytearray(vol.pread(RECORD, at))
            lo = rng.randrange(0x38, RECORD - 8)
            raw[lo : lo + 8] = rng.randbytes(8)
            vol.patches.append((at, bytes(sign(raw) if rng.random() < 0.5 else raw)))
        walked = walk(vol)  # the runner checks every extent lies in the volume
        assert walked.seconds < 5 and len(walked.waves) <= 5
