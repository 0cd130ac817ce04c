"""Real mounts with --cache-dir against the emulator: remounts cost no block calls, damage
in the cache files is caught and refetched, a mount killed mid-read leaves a usable
cache, the size bound in allocated bytes, private modes, lineage across sessions, two
mounts on one directory, a full disk, and `ebsfs stats` against the emulator's own
counters."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ebsfs.constants import BLOCK_SIZE, GIB
from ebsfs.diskcache.directory import DATA_DIR, INDEX_NAME
from ebsfs.emulator import EmulatorServer
from ebsfs.emulator.diskimage import random_image
from tests.mounting import (
    ebsfs,
    force_unmount,
    mounted,
    needs_fuse,
    serving_pid,
    wait_gone,
)

pytestmark = [needs_fuse, pytest.mark.mount]
PARENT, CHILD, OTHER = "snap-0ca1", "snap-0ca2", "snap-0cb1"
SIZE = 40 * 1024 * 1024
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dcm") / "parent.img"
    random_image(path, SIZE, seed=23, sparse_every=3)
    return path


@pytest.fixture
def served(emulator: EmulatorServer, source: Path) -> EmulatorServer:
    emulator.store.add_image(PARENT, source)
    return emulator


def data_file(cache: Path, snapshot_id: str = PARENT) -> Path:
    """The one data file of a snapshot's first shard (named by its origin too)."""
    (found,) = (cache / DATA_DIR).glob(f"{snapshot_id}.*.0")
    return found


def volume_sha256(data: bytes, volume: int = GIB) -> str:
    digest = hashlib.sha256(data)
    zeros = bytes(MIB)
    for _ in range((volume - len(data)) // MIB):
        digest.update(zeros)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MIB):
            digest.update(chunk)
    return digest.hexdigest()


def head(path: Path, size: int = SIZE) -> bytes:
    with open(path, "rb") as f:
        return f.read(size)


def gets(emulator: EmulatorServer, snapshot_id: str | None = None) -> int:
    return sum(n for (s, _), n in emulator.counters.block_gets.items() if snapshot_id in (None, s))


def stats_of(mnt: Path) -> dict:
    result = ebsfs("stats", "--json", str(mnt))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512 + sum(p.lstat().st_blocks * 512 for p in path.rglob("*"))


def present(emulator: EmulatorServer, snapshot_id: str) -> list[int]:
    return emulator.store.get(snapshot_id).indexes


def test_a_remount_rereads_the_whole_snapshot_with_no_block_calls(served, source, tmp_path) -> None:
    cache = tmp_path / "cache"
    want = volume_sha256(source.read_bytes())
    # --no-hedge: blocks are counted below; a hedge (a call slow on a loaded machine,
    # asked again) would count twice.
    options = ["--cache-dir", str(cache), "--no-hedge"]
    with mounted(served.url, [PARENT], tmp_path / "m1", *options) as mnt:
        assert file_sha256(mnt / f"{PARENT}.img") == want
    assert gets(served) == len(present(served, PARENT))
    served.counters.reset()
    with mounted(served.url, [PARENT], tmp_path / "m2", "--cache-dir", str(cache)) as mnt:
        assert file_sha256(mnt / f"{PARENT}.img") == want
        report = stats_of(mnt)
    assert served.counters.calls["GetSnapshotBlock"] == 0
    assert report["disk_hits"] == len(present(served, PARENT))
    assert report["calls"]["GetSnapshotBlock"] == 0 and report["blocks_fetched"] == 0


@pytest.mark.expected_log(r"failed its SHA-256 check")
def test_bytes_flipped_in_the_cache_files_are_caught_and_refetched(
    served, source, tmp_path
) -> None:
    cache = tmp_path / "cache"
    with mounted(served.url, [PARENT], tmp_path / "m1", "--cache-dir", str(cache)) as mnt:
        assert head(mnt / f"{PARENT}.img") == source.read_bytes()
    blocks = present(served, PARENT)
    flipped = [blocks[0], blocks[7], blocks[-1]]
    with open(data_file(cache), "r+b") as f:
        for n, index in enumerate(flipped):
            f.seek(index * BLOCK_SIZE + 4096 * n + 17)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0x5A]))
    # And a checksum in the index that no longer fits its block.
    wrong_sum = blocks[3]
    with sqlite3.connect(cache / INDEX_NAME) as conn:
        conn.execute(
            "UPDATE blocks SET checksum = 'AAAA' || substr(checksum, 5) WHERE idx = ?", (wrong_sum,)
        )
    served.counters.reset()
    with mounted(served.url, [PARENT], tmp_path / "m2", "--cache-dir", str(cache)) as mnt:
        assert head(mnt / f"{PARENT}.img") == source.read_bytes()
        report = stats_of(mnt)
    refetched = sorted(i for (_, i) in served.counters.block_gets)
    assert refetched == sorted([*flipped, wrong_sum])
    assert report["disk_cache"]["damaged"] == 4
    # Stored again, good: a third mount fetches nothing.
    served.counters.reset()
    with mounted(served.url, [PARENT], tmp_path / "m3", "--cache-dir", str(cache)) as mnt:
        assert head(mnt / f"{PARENT}.img") == source.read_bytes()
    assert gets(served) == 0


@pytest.mark.expected_log(r"failed its SHA-256 check", r"cache index .* is damaged")
def test_truncated_or_overwritten_cache_files_never_serve_bad_bytes(
    served, source, tmp_path
) -> None:
    cache = tmp_path / "cache"
    with mounted(served.url, [PARENT], tmp_path / "m1", "--cache-dir", str(cache)) as mnt:
        assert head(mnt / f"{PARENT}.img") == source.read_bytes()
    os.truncate(data_file(cache), SIZE // 2 + 1000)
    served.counters.reset()
    with mounted(served.url, [PARENT], tmp_path / "m2", "--cache-dir", str(cache)) as mnt:
        assert head(mnt / f"{PARENT}.img") == source.read_bytes()
    blocks = present(served, PARENT)
    assert sorted(i for (_, i) in served.counters.block_gets) == [
        i for i in blocks if (i + 1) * BLOCK_SIZE > SIZE // 2 + 1000
    ]
    with open(cache / INDEX_NAME, "r+b") as f:
        f.write(os.urandom(4096))  # the index's header and first page
    served.counters.reset()
    # --no-hedge: blocks are counted below; a hedge (a call slow on a loaded machine,
    # asked again) would count twice.
    options = ["--cache-dir", str(cache), "--no-hedge"]
    with mounted(served.url, [PARENT], tmp_path / "m3", *options) as mnt:
        assert head(mnt / f"{PARENT}.img") == source.read_bytes()
    assert gets(served) == len(blocks)  # an empty cache, refilled


def test_a_mount_killed_mid_read_leaves_a_cache_that_serves_exact_bytes(
    served, source, tmp_path
) -> None:
    cache = tmp_path / "cache"
    served.faults.latency = 0.05  # slow enough to be killed half way
    mnt = tmp_path / "m1"
    with mounted(served.url, [PARENT], mnt, "--cache-dir", str(cache), "--max-fetches", "4"):
        pid = serving_pid(mnt)
        reader = subprocess.Popen(
            [sys.executable, "-c", f"open({str(mnt / (PARENT + '.img'))!r}, 'rb').read()"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 30
            while stats_of(mnt)["disk_cache"]["stored"] < 8:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            os.kill(pid, signal.SIGKILL)
            assert wait_gone(pid)
            reader.wait(timeout=30)
        finally:
            reader.kill()
            reader.wait()
        force_unmount(mnt)
    fetched_before = gets(served)
    assert 8 <= fetched_before < len(present(served, PARENT))
    served.faults.latency = 0.0
    served.counters.reset()
    # --no-hedge: blocks are counted below; a hedge (a call slow on a loaded machine,
    # asked again) would count twice.
    options = ["--cache-dir", str(cache), "--no-hedge"]
    with mounted(served.url, [PARENT], tmp_path / "m2", *options) as mnt2:
        assert head(mnt2 / f"{PARENT}.img") == source.read_bytes()
        report = stats_of(mnt2)
    assert report["disk_hits"] >= 8
    assert gets(served) == len(present(served, PARENT)) - report["disk_hits"]
    assert max(served.counters.block_gets.values()) == 1


def test_allocated_bytes_stay_within_the_cache_dir_size(served, source, tmp_path) -> None:
    cache = tmp_path / "cache"
    with mounted(
        served.url,
        [PARENT],
        tmp_path / "m1",
        "--cache-dir",
        str(cache),
        "--cache-dir-size",
        "8M",
        "--cache-size",
        "1M",
    ) as mnt:
        assert head(mnt / f"{PARENT}.img") == source.read_bytes()
        report = stats_of(mnt)
        assert allocated(cache) <= 8 * MIB + 64 * 1024, allocated(cache)
        assert report["disk_cache"]["evicted"] > 0
        assert report["disk_cache"]["limit_bytes"] == 8 * MIB
        assert head(mnt / f"{PARENT}.img") == source.read_bytes()
    assert allocated(cache) <= 8 * MIB + 64 * 1024, allocated(cache)


def test_the_cache_is_private_whatever_the_umask(served, source, tmp_path) -> None:
    cache = tmp_path / "new" / "cache"
    old = os.umask(0)
    try:
        with mounted(served.url, [PARENT], tmp_path / "m1", "--cache-dir", str(cache)) as mnt:
            assert head(mnt / f"{PARENT}.img", 8 * MIB) == source.read_bytes()[: 8 * MIB]
            paths = [cache, *cache.rglob("*")]
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in paths}
    finally:
        os.umask(old)
    assert {INDEX_NAME, DATA_DIR, data_file(cache).name, f"{INDEX_NAME}-wal"} <= set(modes)
    for p in paths:
        assert modes[p.name] == (0o700 if p.is_dir() else 0o600), (p, oct(modes[p.name]))


def test_a_child_mounted_alone_after_its_parent_costs_only_its_changed_blocks(
    served, source, tmp_path
) -> None:
    blocks = present(served, PARENT)
    parent = source.read_bytes()
    changes = {
        blocks[2]: os.urandom(BLOCK_SIZE),
        blocks[20]: os.urandom(BLOCK_SIZE),
        blocks[21]: bytes(BLOCK_SIZE),  # overwritten with zeros: a written block
        78: os.urandom(BLOCK_SIZE),
    }  # written only in the child
    served.store.add_snapshot(CHILD, changes, parent=PARENT)
    served.store.add_snapshot(OTHER, {0: os.urandom(BLOCK_SIZE)}, volume_size_gib=1)
    child = bytearray(parent)
    for index, data in changes.items():
        child[index * BLOCK_SIZE : (index + 1) * BLOCK_SIZE] = data
    cache = tmp_path / "cache"
    with mounted(served.url, [OTHER], tmp_path / "m0", "--cache-dir", str(cache)) as mnt:
        assert head(mnt / f"{OTHER}.img", BLOCK_SIZE) == bytes(
            served.store.get(OTHER).blocks[0].data()
        )
    with mounted(served.url, [PARENT], tmp_path / "m1", "--cache-dir", str(cache)) as mnt:
        assert head(mnt / f"{PARENT}.img") == parent
    served.counters.reset()
    with mounted(served.url, [CHILD], tmp_path / "m2", "--cache-dir", str(cache)) as mnt:
        assert head(mnt / f"{CHILD}.img") == bytes(child)
        report = stats_of(mnt)
    fetched = sorted(i for (_, i) in served.counters.block_gets)
    assert fetched == sorted(changes)
    assert all(s == CHILD for (s, _) in served.counters.block_gets)
    assert 78 not in blocks
    assert report["lineage_hits"] == len(set(blocks) - set(changes))
    # Relatedness: one call for each cached snapshot of the same size (OTHER answers
    # UNRELATED_SNAPSHOTS), then the changed-block listing of PARENT..CHILD itself.
    assert served.counters.errors["ValidationException"] == 1
    assert report["calls"]["ListChangedBlocks"] == served.counters.calls["ListChangedBlocks"]
    # The unrelated pair is remembered: the next session asks only about PARENT.
    served.counters.reset()
    with mounted(served.url, [CHILD], tmp_path / "m3", "--cache-dir", str(cache)) as mnt:
        assert head(mnt / f"{CHILD}.img") == bytes(child)
    assert served.counters.errors.get("ValidationException", 0) == 0
    assert gets(served) == 0


def test_two_mounts_share_one_cache_dir(served, source, tmp_path) -> None:
    """Documented: any number of processes may use one directory at once. Two mounts of
    the same snapshot and one of another read at the same time; then one mount of both
    reads everything from the cache."""
    served.store.add_image(OTHER, source, volume_size_gib=2)
    cache = tmp_path / "cache"
    results: dict[str, bytes] = {}
    # --no-hedge: PARENT's calls are counted below; a hedge (a call slow on a loaded
    # machine, asked again) is a third GET of a block both mounts fetched.
    options = ["--cache-dir", str(cache), "--no-hedge"]
    with (
        mounted(served.url, [PARENT], tmp_path / "a", *options, "--cache-size", "1M") as a,
        mounted(served.url, [PARENT], tmp_path / "b", *options, "--cache-size", "1M") as b,
        mounted(served.url, [OTHER], tmp_path / "c", *options) as c,
    ):
        readers = [
            threading.Thread(target=lambda p=p, k=k: results.__setitem__(k, head(p)))
            for k, p in (
                ("a", a / f"{PARENT}.img"),
                ("b", b / f"{PARENT}.img"),
                ("c", c / f"{OTHER}.img"),
            )
        ]
        for t in readers:
            t.start()
        for t in readers:
            t.join(timeout=120)
        assert results == {
            "a": source.read_bytes(),
            "b": source.read_bytes(),
            "c": source.read_bytes(),
        }
        # Each block of PARENT fetched by one of the two, or both: never wrong.
        assert gets(served, PARENT) <= 2 * len(present(served, PARENT))
    served.counters.reset()
    with mounted(served.url, [PARENT, OTHER], tmp_path / "d", "--cache-dir", str(cache)) as d:
        assert head(d / f"{PARENT}.img") == source.read_bytes()
        assert head(d / f"{OTHER}.img") == source.read_bytes()
    assert gets(served) == 0


# The cache sizes itself to the free space it sees, so a write fails for want of room
# (and the warning comes) only if the filler wins a race with a queued write.
@pytest.mark.expected_log(maybe=[r"filesystem is full"])
def test_a_full_disk_never_breaks_reads(served, source, tmp_path) -> None:
    disk = tmp_path / "small"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(disk)], check=True)
    try:
        cache = disk / "cache"
        with mounted(
            served.url, [PARENT], tmp_path / "m1", "--cache-dir", str(cache), "--cache-size", "1M"
        ) as mnt:
            # The first half only: the second half's blocks are fetched (and stored, or
            # not) after the disk is full.
            assert head(mnt / f"{PARENT}.img", SIZE // 2) == source.read_bytes()[: SIZE // 2]
            assert allocated(cache) <= 12 * MIB
            # Now fill the filesystem to the last byte behind the cache's back.
            with open(disk / "filler", "wb") as f:
                try:
                    while True:
                        f.write(bytes(MIB))
                        f.flush()
                except OSError:
                    pass
            assert head(mnt / f"{PARENT}.img") == source.read_bytes()
            report = stats_of(mnt)
        assert report["disk_cache"]["limit_bytes"] < 12 * MIB
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_stats_match_the_emulator_counters(served, source, tmp_path) -> None:
    served.faults.error_rate = 0.1  # retries, counted on both sides
    cache = tmp_path / "cache"
    # --no-hedge: a hedge is a second GET of one block, which the emulator counts as a
    # block sent and the mount as one block fetched (test_hedge.py counts those).
    options = ["--cache-dir", str(cache), "--no-hedge"]
    with mounted(served.url, [PARENT], tmp_path / "m1", *options) as mnt:
        assert head(mnt / f"{PARENT}.img") == source.read_bytes()
        report = settled(mnt)
        counters = served.counters.snapshot()
        text = ebsfs("stats", str(mnt)).stdout
    assert report["calls"] == {op: counters["calls"].get(op, 0) for op in report["calls"]}
    assert report["retries"] == counters["errors"]["InternalServerException"] > 0
    assert report["blocks_fetched"] == sum(counters["block_gets"].values())
    assert report["bytes_fetched"] == counters["bytes_sent"]
    assert report["throttles"] == counters["errors"].get("RequestThrottledException", 0)
    calls = counters["calls"]
    cost = (calls["GetSnapshotBlock"] * 0.003 + calls["ListSnapshotBlocks"] * 0.0006) / 1000
    assert report["estimated_cost_usd"] == pytest.approx(cost, abs=1e-6)
    assert report["disk_cache"]["stored"] == report["blocks_fetched"]
    assert report["memory_hits"] > 0
    assert f"GetSnapshotBlock {calls['GetSnapshotBlock']:,}" in text
    assert f"estimated cost  ${cost:.6f}" in text
    served.faults.error_rate = 0.0
    served.counters.reset()
    with mounted(served.url, [PARENT], tmp_path / "m2", "--cache-dir", str(cache)) as mnt:
        assert head(mnt / f"{PARENT}.img") == source.read_bytes()
        report = settled(mnt)
    assert report["calls"] == {op: served.counters.calls.get(op, 0) for op in report["calls"]}
    assert report["disk_hits"] == len(present(served, PARENT)) and report["blocks_fetched"] == 0


def settled(mnt: Path) -> dict:
    """The mount's stats once read-ahead has finished (two reads alike)."""
    last = stats_of(mnt)
    for _ in range(100):
        time.sleep(0.2)
        now = stats_of(mnt)
        if now == last:
            return now
        last = now
    raise AssertionError("the mount never went quiet")


def test_stats_of_something_else_is_one_line(tmp_path) -> None:
    result = ebsfs("stats", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.strip() == f"ebsfs: error: {tmp_path} is not a mount point"
