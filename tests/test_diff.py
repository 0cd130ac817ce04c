"""Changed blocks: `ebsfs diff`, and a lineage mounted together sharing unchanged blocks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ebsfs import BLOCK_SIZE
from ebsfs.diff import Diff
from ebsfs.emulator import EmulatorServer
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
    diff = Diff("a", "b", 1024**3, BLOCK_SIZE, changed_blocks=CHANGED)
    assert [(r.first_block, r.last_block) for r in diff.ranges()] == [(3, 5), (100, 100),
                                                                      (1500, 1501)]
    assert diff.ranges()[0].offset == 3 * BLOCK_SIZE and diff.ranges()[0].length == 3 * BLOCK_SIZE


def test_diff_json_lists_exactly_the_changed_blocks_with_short_pages(lineage) -> None:
    lineage.faults.short_pages = 1.0
    result = ebsfs("diff", "--json", "--endpoint-url", lineage.url, PARENT, CHILD)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["changed_blocks"] == CHANGED
    assert data["first"] == PARENT and data["second"] == CHILD
    assert data["block_size"] == BLOCK_SIZE and data["volume_size"] == 1024**3
    assert data["ranges"][0] == {"offset": 3 * BLOCK_SIZE, "length": 3 * BLOCK_SIZE,
                                 "first_block": 3, "last_block": 5}
    assert data["only_in_second"] == 2  # 1500 and 1501 were never in the parent
    assert lineage.counters.calls["ListChangedBlocks"] > 3


def test_diff_text_summary(lineage) -> None:
    result = ebsfs("diff", "--endpoint-url", lineage.url, PARENT, CHILD)
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert "6 blocks changed" in first and "3.0 MiB" in first and "3 ranges" in first
    assert f"{1500 * BLOCK_SIZE}" in result.stdout


@pytest.mark.parametrize("first,second,words", [
    (PARENT, OTHER, ["not of the same volume lineage"]),
    (PARENT, "snap-0fff", ["snapshot not found"]),
    ("snap-XYZ", CHILD, ["invalid snapshot id"]),
])
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
    with mounted(lineage.url, [PARENT, CHILD], tmp_path / "mnt", "--cache-size", "256M") as mnt:
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
        assert sorted(os.listdir(mnt)) == sorted([f"{PARENT}.img", f"{CHILD}.img",
                                                  f"{CHILD}.changes"])


@needs_fuse
@pytest.mark.mount
def test_unrelated_snapshots_mount_together_without_sharing(lineage, tmp_path: Path) -> None:
    with mounted(lineage.url, [PARENT, OTHER], tmp_path / "mnt") as mnt:
        assert sorted(os.listdir(mnt)) == sorted([f"{PARENT}.img", f"{OTHER}.img"])
        with open(mnt / f"{OTHER}.img", "rb") as f:
            assert f.read(BLOCK_SIZE) == pattern_block(3, 0)
