"""`ebsfs diff --files`: which files changed between two snapshots, from metadata.

Unit tier: tree comparison on hand-made trees. Emulator tier (root: loop devices,
ntfs-3g): real ext4, XFS and NTFS pairs made with mkfs, mount and ordinary tools
(tests/snapshot_pairs.py), loaded with the second's parent = the first, read through
one engine; the listing must be exactly the scenario's, and GetSnapshotBlock calls
(the emulator's counters) stay under 10 % of the written blocks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import ebsfs.fileobj
from ebsfs.cli import main as cli
from ebsfs.constants import BLOCK_SIZE
from ebsfs.emulator import EmulatorServer
from ebsfs.forensics.filediff import ChangedBlocks, FileChange, compare_trees, diff_files
from ebsfs.forensics.fsread import DIRECTORY, FILE, Entry, Tree
from tests.snapshot_pairs import GPT_PARTS, MiB, expected, make_gpt_pair, make_pair

FIRST, SECOND = "snap-0f1a", "snap-0f2b"
needs_root = pytest.mark.mount  # loop devices, mount, ntfs-3g


# -- unit tier --------------------------------------------------------------------------


def entry(inode: int, parent: int, name: str, kind: str = FILE, **fields: object) -> Entry:
    values: dict[str, object] = dict(
        size=10,
        mode=0o644,
        uid=0,
        gid=0,
        atime=1,
        mtime=2,
        ctime=3,
        crtime=4,
        generation=None,
        extents=((4096 * inode, 4096),),
        inline=None,
    )
    if kind == DIRECTORY:
        values.update(size=4096, extents=())
    values.update(fields)
    e = Entry(inode=inode, kind=kind, **values)  # type: ignore[arg-type]
    if parent:
        e.links.append((parent, name))
    return e


def tree(*entries: Entry) -> Tree:
    root = entry(2, 0, "", DIRECTORY)
    return Tree("ext4", 4096, 2, {2: root, **{e.inode: e for e in entries}})


def listing(changes: list[FileChange]) -> list[tuple[str, ...]]:
    return [
        ("R", c.old_path or "", c.path) if "renamed" in c.reasons else (c.change[0].upper(), c.path)
        for c in changes
    ]


def nothing_changed(offset: int, length: int) -> list[tuple[int, int]]:
    return []


def all_changed(offset: int, length: int) -> list[tuple[int, int]]:
    return [(offset, length)]


def test_changed_blocks_intersect_byte_ranges() -> None:
    changed = ChangedBlocks([(BLOCK_SIZE, BLOCK_SIZE), (4 * BLOCK_SIZE, 2 * BLOCK_SIZE)])
    assert changed.pieces(0, BLOCK_SIZE) == []
    assert changed.pieces(BLOCK_SIZE - 10, 20) == [(BLOCK_SIZE, 10)]
    assert changed.pieces(0, 10 * BLOCK_SIZE) == [
        (BLOCK_SIZE, BLOCK_SIZE),
        (4 * BLOCK_SIZE, 2 * BLOCK_SIZE),
    ]
    assert changed.pieces(5 * BLOCK_SIZE + 1, 1) == [(5 * BLOCK_SIZE + 1, 1)]
    assert not changed.touches(6 * BLOCK_SIZE, BLOCK_SIZE)


def test_a_neighbour_in_a_changed_block_is_not_listed_but_a_raw_write_is() -> None:
    """Same metadata and extents inside changed blocks: the bytes decide."""
    before = tree(entry(12, 2, "a"), entry(13, 2, "b"))
    after = tree(entry(12, 2, "a"), entry(13, 2, "b"))
    compared: list[list[tuple[int, int]]] = []

    def same(pieces: list[tuple[int, int]]) -> bool:
        compared.append(pieces)
        return pieces != [(4096 * 13, 4096)]  # b's bytes differ, a's do not

    changes = compare_trees(before, after, all_changed, same)
    assert listing(changes) == [("M", "/b")]
    assert changes[0].reasons == ["content"]
    assert sorted(compared) == [[(4096 * 12, 4096)], [(4096 * 13, 4096)]]
    assert compare_trees(before, after, nothing_changed, same) == []


def test_metadata_changes_and_what_they_are() -> None:
    before = tree(
        entry(12, 2, "log"), entry(13, 2, "tool"), entry(14, 2, "suid"), entry(15, 2, "read")
    )
    after = tree(
        entry(12, 2, "log", size=20, mtime=5, ctime=5),
        entry(13, 2, "tool", extents=((999 * 4096, 4096),), ctime=6),
        entry(14, 2, "suid", mode=0o4755, ctime=7),
        entry(15, 2, "read", atime=9),
    )
    changes = compare_trees(before, after, nothing_changed, lambda p: True)
    assert {c.path: c.reasons for c in changes} == {
        "/log": ["content", "size", "mtime", "ctime"],
        "/tool": ["content", "ctime"],
        "/suid": ["mode", "ctime"],
    }
    with_atime = compare_trees(before, after, nothing_changed, lambda p: True, atime=True)
    assert {c.path: c.reasons for c in with_atime}["/read"] == ["atime"]


def test_renames_replacements_and_reused_inodes() -> None:
    before = tree(
        entry(10, 2, "dir", DIRECTORY),
        entry(11, 10, "inner"),
        entry(12, 2, "old-name"),
        entry(13, 2, "config"),
        entry(14, 2, "gone"),
    )
    after = tree(
        entry(10, 2, "moved", DIRECTORY),  # a directory renamed: its files are not
        entry(11, 10, "inner"),
        entry(12, 2, "new-name", ctime=8),
        entry(16, 2, "config", crtime=9),  # saved by an editor: a new inode
        entry(14, 2, "fresh", crtime=10),
    )  # inode 14 freed and used again
    changes = compare_trees(before, after, nothing_changed, lambda p: True)
    assert listing(changes) == [
        ("M", "/config"),
        ("A", "/fresh"),
        ("D", "/gone"),
        ("R", "/dir", "/moved"),
        ("R", "/old-name", "/new-name"),
    ]
    assert {c.path: c.reasons for c in changes}["/config"] == ["replaced", "crtime"]


def test_a_new_hard_link_is_an_added_name() -> None:
    before = tree(entry(12, 2, "a"))
    linked = entry(12, 2, "a", ctime=5)
    linked.links.append((2, "b"))
    changes = compare_trees(before, tree(linked), nothing_changed, lambda p: True)
    assert listing(changes) == [("M", "/a"), ("A", "/b")]


# -- emulator tier: real filesystems ----------------------------------------------------


def load(emulator: EmulatorServer, before: Path, after: Path) -> None:
    emulator.store.add_image(FIRST, before)
    emulator.store.add_image(SECOND, after, parent=FIRST)


def names(result_files: list[dict[str, object]]) -> list[tuple[str, ...]]:
    found: list[tuple[str, ...]] = []
    for f in result_files:
        if "renamed" in f["reasons"]:  # type: ignore[operator]
            found.append(("R", str(f["old_path"]), str(f["path"])))
        else:
            found.append((str(f["change"])[0].upper(), str(f["path"])))
    return sorted(found)


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@needs_root
@pytest.mark.parametrize("fstype", ["ext4", "xfs", "ntfs"])
def test_the_listing_is_exactly_what_changed(
    fstype: str, emulator: EmulatorServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pair = make_pair(fstype, tmp_path, 512 * MiB)
    load(emulator, pair.before, pair.after)
    code, out, err = run_cli(
        capsys, "diff", "--files", "--json", "--endpoint-url", emulator.url, FIRST, SECOND
    )
    assert (code, err) == (0, "")
    result = json.loads(out)
    assert (result["first"], result["second"]) == (FIRST, SECOND)
    assert names(result["files"]) == expected(fstype)
    by_path = {f["path"]: f for f in result["files"]}
    for f in result["files"]:
        assert f["partition"] is None
        assert f["type"] in ("file", "dir", "symlink")
    assert by_path["/tmp/.x"]["type"] == "dir"
    assert by_path["/tmp/.x/payload.sh"]["after"]["size"] == 45
    assert by_path["/home/alice/todo.txt"]["after"] is None
    tool = by_path["/usr/bin/tool"]  # written in place, mtime put back: ctime betrays it
    assert tool["reasons"] == ["content", "ctime"]
    assert tool["before"]["mtime"] == tool["after"]["mtime"]
    log = by_path["/var/log/auth.log"]
    assert log["after"]["size"] - log["before"]["size"] == 90
    assert by_path["/etc/passwd"]["after"]["mtime"].startswith("2017-07-14T02:40:00")
    assert [fs["type"] for fs in result["filesystems"]] == [fstype]

    code, text, _ = run_cli(
        capsys, "diff", "--files", "--endpoint-url", emulator.url, FIRST, SECOND
    )
    assert code == 0
    assert "R\t/srv/data/report.txt\t/srv/data/report-final.txt" in text
    assert "M\t/usr/bin/tool\tcontent,ctime\n" in text
    assert f"{FIRST} -> {SECOND}: {len(expected(fstype))} changed in 1 filesystem" in text


@needs_root
@pytest.mark.parametrize("fstype", ["ext4", "xfs", "ntfs"])
def test_metadata_only_costs_under_a_tenth_of_the_written_blocks(
    fstype: str, emulator: EmulatorServer, tmp_path: Path
) -> None:
    """Two 2 GiB snapshots holding 300 MB of files."""
    pair = make_pair(fstype, tmp_path, 2048 * MiB, bulk_bytes=300 * 1000**2)
    load(emulator, pair.before, pair.after)
    written = len(emulator.store.get(SECOND).indexes)
    assert written > 570  # 300 MB of files in 512 KiB blocks, and more
    first, second = ebsfs.fileobj.open_snapshots(
        [FIRST, SECOND], endpoint_url=emulator.url, readahead=False, hedge=False
    )  # no hedge: blocks are counted below, and a hedge would count twice
    with first, second:
        result = diff_files(first, second)
    found = sorted(
        ("R", c.old_path or "", c.path) if "renamed" in c.reasons else (c.change[0].upper(), c.path)
        for c in result.filesystems[0].changes
    )
    assert found == expected(fstype)
    gets = sum(emulator.counters.block_gets.values())
    print(
        f"{fstype}: {gets} GetSnapshotBlock calls for {written} written blocks "
        f"({100 * gets / written:.1f} %)"
    )
    assert gets < written / 10
    assert max(emulator.counters.block_gets.values()) == 1  # each block fetched once


@needs_root
def test_partitions_and_a_partition_holding_no_filesystem(
    emulator: EmulatorServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before, after = make_gpt_pair(tmp_path)
    load(emulator, before, after)
    code, out, err = run_cli(
        capsys, "diff", "--files", "--endpoint-url", emulator.url, FIRST, SECOND
    )
    assert code == 0
    assert "Traceback" not in out + err
    sections = out.split("# ")
    for (number, fstype, _, _), section in zip(GPT_PARTS[:3], sections[1:4], strict=True):
        assert section.startswith(f"partition {number} ({fstype}): ")
        lines = [
            tuple(line.split("\t")[: 3 if line.startswith("R") else 2])
            for line in section.splitlines()[1:]
        ]
        assert sorted(lines) == expected(fstype)
    none_offset = GPT_PARTS[3][2]
    assert sections[4].startswith(
        "partition 4 (unknown): files not listed: no filesystem ebsfs can read"
    )
    assert (
        f"changed byte ranges of partition 4 (offsets in the volume):\n"
        f"{none_offset + 5 * MiB:>16} {BLOCK_SIZE:>14}\n" in out
    )

    code, out, err = run_cli(
        capsys, "diff", "--files", "--json", "--endpoint-url", emulator.url, FIRST, SECOND
    )
    result = json.loads(out)
    assert {f["partition"] for f in result["files"]} == {1, 2, 3}
    note = result["filesystems"][3]
    assert note["partition"] == 4 and note["note"].startswith("no filesystem")
    assert note["ranges"] == [{"offset": none_offset + 5 * MiB, "length": BLOCK_SIZE}]
    assert err == "ebsfs: note: partition 4: files not listed: " + note["note"] + "\n"


@needs_root
def test_a_raw_write_under_unchanged_metadata_is_found(
    emulator: EmulatorServer, tmp_path: Path
) -> None:
    """Bytes written straight to the disk, past the filesystem: no inode knows."""
    import pytsk3

    pair = make_pair("ext4", tmp_path, 256 * MiB)
    fs = pytsk3.FS_Info(pytsk3.Img_Info(str(pair.after)))
    blob = fs.open("/srv/data/blob.bin")
    run = next(iter(next(iter(blob))))
    with open(pair.after, "r+b") as f:
        f.seek(run.addr * 4096 + 5000)
        f.write(b"implant")
    load(emulator, pair.before, pair.after)
    first, second = ebsfs.fileobj.open_snapshots([FIRST, SECOND], endpoint_url=emulator.url)
    with first, second:
        changes = diff_files(first, second).filesystems[0].changes
    raw = [c for c in changes if c.path == "/srv/data/blob.bin"]
    assert [c.reasons for c in raw] == [["content"]]
    assert len(changes) == len(expected("ext4")) + 1


@needs_root
@pytest.mark.parametrize("damage", ["superblock", "no-xfs-library"])
def test_an_unreadable_filesystem_is_a_note_and_its_byte_ranges(
    damage: str,
    emulator: EmulatorServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fstype = "ext4" if damage == "superblock" else "xfs"
    pair = make_pair(fstype, tmp_path, 512 * MiB)
    if damage == "superblock":
        with open(pair.after, "r+b") as f:
            f.seek(1024)
            f.write(bytes(1024))
        reason = (
            "no filesystem ebsfs can read (The Sleuth Kit recognises none here) "
            "(in the second snapshot)"
        )
    else:
        monkeypatch.setitem(sys.modules, "pyfsxfs", None)  # as if not installed
        reason = (
            "XFS needs the optional extra: pip install 'ebsfs[xfs]' "
            "(libfsxfs-python, LGPL-3.0) (in the first snapshot)"
        )
    load(emulator, pair.before, pair.after)
    code, out, err = run_cli(
        capsys, "diff", "--files", "--endpoint-url", emulator.url, FIRST, SECOND
    )
    assert code == 0
    assert err == ""
    assert out.startswith(f"# the volume (unknown): files not listed: {reason}\n")
    assert "changed byte ranges of the volume (offsets in the volume):\n" in out
    ranges = out.split("(offsets in the volume):\n")[1].splitlines()
    changed = emulator.store.changed_indexes(FIRST, SECOND)
    assert sum(int(line.split()[1]) for line in ranges) == len(changed) * BLOCK_SIZE


# -- the Python face: two snapshots on one engine ---------------------------------------


def test_open_snapshots_shares_one_engine_and_fetches_unchanged_blocks_once(
    emulator: EmulatorServer,
) -> None:
    old = {i: bytes([i + 1]) * BLOCK_SIZE for i in range(6)}
    emulator.store.add_snapshot(FIRST, old, volume_size_gib=1)
    emulator.store.add_snapshot(SECOND, {2: b"\xee" * BLOCK_SIZE}, parent=FIRST)
    first, second = ebsfs.fileobj.open_snapshots(
        [FIRST, SECOND], endpoint_url=emulator.url, readahead=False
    )
    assert first.pread(6 * BLOCK_SIZE, 0) == b"".join(old[i] for i in range(6))
    assert second.pread(BLOCK_SIZE, 2 * BLOCK_SIZE) == b"\xee" * BLOCK_SIZE
    assert second.pread(BLOCK_SIZE, 3 * BLOCK_SIZE) == old[3]
    assert sum(emulator.counters.block_gets.values()) == 7  # block 3 of SECOND not fetched
    assert [r.first_block for r in second.changes_since(first).ranges()] == [2]
    with (
        ebsfs.open(FIRST, endpoint_url=emulator.url) as alone,
        pytest.raises(ValueError, match="one open_snapshots"),
    ):
        second.changes_since(alone)
    first.close()  # the other file still reads: the engine stops with the last one
    assert second.pread(4, 5 * BLOCK_SIZE) == old[5][:4]
    second.close()
    with pytest.raises(ValueError, match="closed"):
        second.pread(4, 0)


@needs_root
@pytest.mark.expected_log(r"partition table could not be read")
def test_a_failing_read_is_the_engines_error_not_damage(
    emulator: EmulatorServer, tmp_path: Path
) -> None:
    from ebsfs.errors import EbsfsError

    pair = make_pair("ext4", tmp_path, 128 * MiB)
    load(emulator, pair.before, pair.after)
    first, second = ebsfs.fileobj.open_snapshots(
        [FIRST, SECOND], endpoint_url=emulator.url, read_timeout=1.0
    )
    emulator.faults.stall_rate = 1.0  # every block body stalls past the read timeout
    with first, second, pytest.raises(EbsfsError, match="took over 1s"):
        diff_files(first, second)
