"""Changed blocks: `ebsfs diff`, and a lineage mounted together sharing unchanged blocks."""

from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path

import pytest
import trio

from ebsfs.constants import BLOCK_SIZE
from ebsfs.emulator import EmulatorServer
from ebsfs.engine.diff import Diff, diff_snapshots
from ebsfs.engine.remote import RemoteSnapshots
from ebsfs.service.api import ChangedBlock, ChangedPage
from tests.fakes import pattern_block
from tests.mounting import drop_page_cache, ebsfs, mounted, needs_fuse

PARENT, CHILD, OTHER = "snap-0aa1", "snap-0aa2", "snap-0bb1"
CHANGED = [3, 4, 5, 100, 1500, 1501]


@pytest.fixture
def lineage(emulator: EmulatorServer) -> EmulatorServer:
    store = emulator.store
    store.add_snapshot(PARENT, {i: pattern_block(1, i) for i in range(0, 200)}, volume_size_gib=1)
    changes = {i: pattern_block(2, i) for i in CHANGED if i != 100}
    changes[100] = bytes(BLOCK_SIZE)  # overwritten with zeros: changed, still present
    store.add_snapshot(CHILD, changes, parent=PARENT)
    store.add_snapshot(OTHER, {0: pattern_block(3, 0)}, volume_size_gib=1)
    return emulator


def child_block(i: int) -> bytes:
    if i == 100:
        return bytes(BLOCK_SIZE)
    if i in CHANGED:
        return pattern_block(2, i)
    return pattern_block(1, i) if i < 200 else bytes(BLOCK_SIZE)


def test_ranges_merge_adjacent_blocks() -> None:
    diff = Diff("a", "b", 1024**3, BLOCK_SIZE)
    for i in CHANGED + [5, 100]:  # repeats are ignored
        diff.record(ChangedBlock(i, "t", "t"))
    ranges = list(diff.ranges())
    assert [(r.first_block, r.last_block) for r in ranges] == [(3, 5), (100, 100), (1500, 1501)]
    assert ranges[0].offset == 3 * BLOCK_SIZE and ranges[0].length == 3 * BLOCK_SIZE
    assert diff.changed_count == len(CHANGED) and diff.range_count == 3


class SyntheticChanges:
    """ListChangedBlocks of a huge volume where every other block changed."""

    def __init__(self, changed: int) -> None:
        self.changed = changed

    def list_changed_blocks(
        self, first_id, second_id, start_index=0, next_token=None, max_results=10000
    ):
        start = int(next_token) if next_token else start_index // 2
        stop = min(start + min(max_results, 2000), self.changed)  # short pages, as allowed
        return ChangedPage(
            [ChangedBlock(2 * n, "a", "b") for n in range(start, stop)],
            str(stop) if stop < self.changed else None,
            float("inf"),
            16 * 1024**4,
        )


def peak_bytes(changed: int, out_path: Path) -> int:
    """Peak memory allocated while listing `changed` changes and writing the JSON."""
    tracemalloc.start()
    try:
        remote = RemoteSnapshots(SyntheticChanges(changed))  # type: ignore[arg-type]
        diff = trio.run(diff_snapshots, remote, "snap-01", "snap-02")
        with out_path.open("w") as out:
            diff.write_json(out)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_diff_of_any_size_holds_bounded_memory(tmp_path: Path, monkeypatch) -> None:
    """Four times the changed blocks (10,000 to 40,000 separate ranges) must not take
    more memory: ranges go to a temporary file and the JSON is written piece by piece.
    (Holding every index and building the JSON whole grew by about 6 MiB here.)"""
    monkeypatch.setattr("ebsfs.engine.diff.SPOOL_IN_MEMORY", 64 * 1024)
    out_path = tmp_path / "diff.json"
    small = peak_bytes(10_000, out_path)
    changed = 40_000
    large = peak_bytes(changed, out_path)
    assert large - small < 1024 * 1024, f"{small / 2**20:.1f} -> {large / 2**20:.1f} MiB"
    data = json.loads(out_path.read_text())
    assert data["changed_blocks"] == list(range(0, 2 * changed, 2))
    assert len(data["ranges"]) == changed and data["ranges"][-1]["last_block"] == 2 * changed - 2
    assert data["changed_bytes"] == changed * BLOCK_SIZE


def test_diff_json_lists_exactly_the_changed_blocks_with_short_pages(lineage) -> None:
    lineage.faults.short_pages = 1.0
    result = ebsfs("diff", "--json", "--endpoint-url", lineage.url, PARENT, CHILD)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["changed_blocks"] == CHANGED
    assert data["first"] == PARENT and data["second"] == CHILD
    assert data["block_size"] == BLOCK_SIZE and data["volume_size"] == 1024**3
    assert data["ranges"][0] == {
        "offset": 3 * BLOCK_SIZE,
        "length": 3 * BLOCK_SIZE,
        "first_block": 3,
        "last_block": 5,
    }
    assert data["only_in_second"] == 2  # 1500 and 1501 were never in the parent
    assert lineage.counters.calls["ListChangedBlocks"] > 3


def test_diff_text_summary(lineage) -> None:
    result = ebsfs("diff", "--endpoint-url", lineage.url, PARENT, CHILD)
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert "6 blocks changed" in first and "3.0 MiB" in first and "3 ranges" in first
    assert f"{1500 * BLOCK_SIZE}" in result.stdout


@pytest.mark.parametrize(
    "first,second,words",
    [
        (PARENT, OTHER, ["not of the same volume lineage"]),
        (PARENT, "snap-0fff", ["snapshot not found"]),
        ("snap-XYZ", CHILD, ["invalid snapshot id"]),
    ],
)
def test_diff_errors(lineage, first, second, words) -> None:
    result = ebsfs("diff", "--endpoint-url", lineage.url, first, second)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0]


@needs_fuse
@pytest.mark.mount
def test_child_read_after_parent_fetches_only_changed_blocks(lineage, tmp_path: Path) -> None:
    # --no-hedge: the counts below are of blocks fetched once; a hedge (a second call
    # for a slow block, which a loaded machine can cause) is a deliberate duplicate.
    with mounted(
        lineage.url, [PARENT, CHILD], tmp_path / "mnt", "--cache-size", "256M", "--no-hedge"
    ) as mnt:
        assert os.getxattr(mnt / f"{CHILD}.img", "user.ebsfs.base_snapshot") == PARENT.encode()
        with open(mnt / f"{PARENT}.img", "rb") as f:
            parent = f.read(2048 * BLOCK_SIZE)
        parent_gets = sum(lineage.counters.block_gets.values())
        assert parent_gets == 200
        drop_page_cache()
        with open(mnt / f"{CHILD}.img", "rb") as f:
            child = f.read(2048 * BLOCK_SIZE)
        child_gets = {i for (s, i), n in lineage.counters.block_gets.items() if s == CHILD}
        assert child_gets == set(CHANGED)  # everything else came from the parent's cache
        assert sum(lineage.counters.block_gets.values()) == parent_gets + len(CHANGED)
        for i in range(0, 2048):
            assert child[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE] == child_block(i), i
        assert parent[: 200 * BLOCK_SIZE] == b"".join(pattern_block(1, i) for i in range(200))
        report = (mnt / f"{CHILD}.changes").read_text()
        assert report.startswith(f"{PARENT} -> {CHILD}: 6 blocks changed")
        lines = report.splitlines()
        assert lines[-1].split() == [str(1500 * BLOCK_SIZE), str(2 * BLOCK_SIZE), "1500-1501"]
        assert sorted(os.listdir(mnt)) == sorted(
            [f"{PARENT}.img", f"{CHILD}.img", f"{CHILD}.changes"]
        )


@needs_fuse
@pytest.mark.mount
def test_unrelated_snapshots_mount_together_without_sharing(lineage, tmp_path: Path) -> None:
    with mounted(lineage.url, [PARENT, OTHER], tmp_path / "mnt") as mnt:
        assert sorted(os.listdir(mnt)) == sorted([f"{PARENT}.img", f"{OTHER}.img"])
        with open(mnt / f"{OTHER}.img", "rb") as f:
            assert f.read(BLOCK_SIZE) == pattern_block(3, 0)
