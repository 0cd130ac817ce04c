"""The disk cache without FUSE or HTTP: stores and verified loads, damage of every kind
caught and dropped, the size bound in allocated bytes, LRU order, private modes, a
killed store cleaned up, a damaged index, a full disk, and reads through engines that
come and go (sessions) with lineage between snapshots."""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import sqlite3
import stat
from pathlib import Path
from typing import Any

import pytest
import trio

from ebsfs.constants import BLOCK_SIZE, GIB
from ebsfs.diskcache.catalog import lineage_candidates
from ebsfs.diskcache.directory import DATA_DIR, INDEX_NAME, prepare
from ebsfs.diskcache.keys import data_name
from ebsfs.diskcache.shards import SHARD_BLOCKS
from ebsfs.diskcache.store import DiskCache, Origin
from ebsfs.emulator import Faults, SnapshotStore
from ebsfs.engine.config import EngineConfig
from ebsfs.engine.engine import Engine
from ebsfs.engine.plan import plan
from ebsfs.errors import CacheDirError
from tests.fakes import StoreApi, pattern_block

SNAP = "snap-0c1"
MIB = 1024**2
ORIGIN = Origin("http://ebs.test", "us-east-1")


def open_cache(path: str, *args: Any, **options: Any) -> DiskCache:
    """A disk cache of blocks from ORIGIN."""
    return DiskCache(path, *args, origin=ORIGIN, **options)


class PlacedApi(StoreApi):
    """StoreApi that says where its blocks come from, as the real client does."""

    endpoint_url = "http://ebs.test"
    region = "us-east-1"


def checksum(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def store_blocks(cache: DiskCache, snapshot_id: str, indexes: list[int], seed: int = 1) -> None:
    for i in indexes:
        data = pattern_block(seed, i)
        assert cache.store(snapshot_id, i, GIB, data, checksum(data)).stored


def load(cache: DiskCache, snapshot_id: str, index: int):
    room = memoryview(bytearray(BLOCK_SIZE))
    return cache.load(snapshot_id, index, room), room


def data_file(cache_dir: Path, snapshot_id: str = SNAP, shard: int = 0) -> Path:
    return cache_dir / DATA_DIR / data_name(ORIGIN.key, snapshot_id, shard)


def allocated(path: Path) -> int:
    """Bytes allocated to every file and directory under `path` (st_blocks)."""
    total = path.stat().st_blocks * 512
    for p in path.rglob("*"):
        total += p.lstat().st_blocks * 512
    return total


def test_a_stored_block_loads_verified_into_the_room(tmp_path) -> None:
    cache = open_cache(str(tmp_path / "c"))
    store_blocks(cache, SNAP, [0, 5, SHARD_BLOCKS + 3])
    for i in (0, 5, SHARD_BLOCKS + 3):
        found, room = load(cache, SNAP, i)
        assert found.checksum == checksum(pattern_block(1, i))
        assert found.data is room and bytes(room) == pattern_block(1, i)
    assert load(cache, SNAP, 6)[0].checksum is None
    assert not cache.store(SNAP, 5, GIB, pattern_block(1, 5), checksum(pattern_block(1, 5))).stored
    # Without a room (no memory cache) it reads into memory of its own.
    assert bytes(cache.load(SNAP, 5, None).data or b"") == pattern_block(1, 5)
    cache.close()
    again = open_cache(str(tmp_path / "c"))
    assert load(again, SNAP, 5)[0].checksum is not None
    assert again.blocks == 3


def test_flipped_bytes_are_caught_dropped_and_their_space_freed(tmp_path) -> None:
    cache = open_cache(str(tmp_path / "c"))
    store_blocks(cache, SNAP, [0, 1, 2])
    path = data_file(tmp_path / "c")
    with open(path, "r+b") as f:
        f.seek(BLOCK_SIZE + 1000)
        byte = f.read(1)
        f.seek(BLOCK_SIZE + 1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    found, _ = load(cache, SNAP, 1)
    assert found.damaged and found.checksum is None
    assert cache.blocks == 2
    assert load(cache, SNAP, 1)[0] == load(cache, SNAP, 99)[0]  # now a plain miss
    assert path.stat().st_blocks * 512 == 2 * BLOCK_SIZE  # its data punched away
    assert load(cache, SNAP, 0)[0].checksum and load(cache, SNAP, 2)[0].checksum


def test_a_truncated_data_file_or_a_wrong_checksum_is_never_served(tmp_path) -> None:
    cache = open_cache(str(tmp_path / "c"))
    store_blocks(cache, SNAP, [0, 1, 2, 3])
    os.truncate(data_file(tmp_path / "c"), 2 * BLOCK_SIZE + 100)
    assert load(cache, SNAP, 1)[0].checksum is not None
    assert load(cache, SNAP, 2)[0].damaged
    assert load(cache, SNAP, 3)[0].damaged
    # An index entry that names the wrong checksum (bytes flipped in the index).
    conn = sqlite3.connect(tmp_path / "c" / INDEX_NAME)
    conn.execute("UPDATE blocks SET checksum = ? WHERE idx = 0", (checksum(b"x"),))
    conn.commit()
    conn.close()
    assert load(cache, SNAP, 0)[0].damaged
    # A data file that is gone.
    store_blocks(cache, "snap-0c2", [7])
    os.unlink(data_file(tmp_path / "c", "snap-0c2"))
    fresh = open_cache(str(tmp_path / "c"))
    assert fresh.load("snap-0c2", 7, None).damaged


def test_space_allocated_stays_within_the_size_and_the_least_recently_used_go(tmp_path) -> None:
    clock = iter(range(1, 10**6))
    size = 16 * MIB
    cache = open_cache(str(tmp_path / "c"), size, clock=lambda: float(next(clock)))
    store_blocks(cache, SNAP, list(range(20)))
    assert cache.blocks == 20
    cache._touch(SNAP, 0)  # block 0, the oldest, is read again: now the most recent
    store_blocks(cache, SNAP, list(range(20, 40)))
    held = cache.blocks
    assert 24 < held < 32  # 16 MiB less the index: a few blocks short of 32
    assert allocated(tmp_path / "c") <= size + 64 * 1024
    assert load(cache, SNAP, 0)[0].checksum is not None
    assert load(cache, SNAP, 1)[0].checksum is None and load(cache, SNAP, 39)[0].checksum
    store_blocks(cache, SNAP, list(range(40, 80)))
    assert held - 2 <= cache.blocks <= held  # the index grows a little meanwhile
    assert allocated(tmp_path / "c") <= size + 64 * 1024
    cache.close()
    # A smaller size on the next session evicts down to it on the first store.
    small = open_cache(str(tmp_path / "c"), 4 * MIB)
    store_blocks(small, SNAP, [100])
    assert allocated(tmp_path / "c") <= 4 * MIB + 64 * 1024


def test_the_cache_leaves_free_space_on_its_filesystem(tmp_path, monkeypatch) -> None:
    real = os.fstatvfs

    class Tight:
        def __init__(self, fd: int) -> None:
            fs = real(fd)
            self.f_frsize = fs.f_frsize
            self.f_blocks = 100 * MIB // fs.f_frsize
            self.f_bavail = 4 * MIB // fs.f_frsize

    cache = open_cache(str(tmp_path / "c"), 16 * MIB)
    monkeypatch.setattr(os, "fstatvfs", Tight)
    for i in range(12):
        data = pattern_block(1, i)
        cache.store(SNAP, i, GIB, data, checksum(data))
    # 4 MiB free less a tenth of 100 MiB: the cache takes nothing beyond what it has.
    assert cache.limit_bytes < 16 * MIB
    assert cache.blocks * BLOCK_SIZE <= cache.limit_bytes


def test_a_full_disk_skips_the_store_and_breaks_nothing(tmp_path, monkeypatch) -> None:
    cache = open_cache(str(tmp_path / "c"))
    store_blocks(cache, SNAP, [0])

    def full(fd: int, data: object, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    data = pattern_block(1, 1)
    result = cache.store(SNAP, 1, GIB, data, checksum(data))
    assert not result.stored and result.full
    monkeypatch.undo()
    assert cache.blocks == 1 and load(cache, SNAP, 1)[0].checksum is None
    assert load(cache, SNAP, 0)[0].checksum is not None
    store_blocks(cache, SNAP, [1])


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o277])
def test_directory_and_files_are_private_whatever_the_umask(tmp_path, umask) -> None:
    old = os.umask(umask)
    try:
        cache = open_cache(str(tmp_path / "new" / "c"))
        store_blocks(cache, SNAP, [0])
        cache._touch(SNAP, 0)
        cache.close()
    finally:
        os.umask(old)
    root = tmp_path / "new" / "c"
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    paths = list(root.rglob("*"))
    assert any(p.name == INDEX_NAME for p in paths) and any(p.is_file() for p in paths)
    for p in paths:
        want = 0o700 if p.is_dir() else 0o600
        assert stat.S_IMODE(p.stat().st_mode) == want, p


def test_an_existing_directory_is_made_private(tmp_path) -> None:
    (tmp_path / "c").mkdir(mode=0o755)
    os.chmod(tmp_path / "c", 0o755)
    prepare(str(tmp_path / "c"))
    assert stat.S_IMODE((tmp_path / "c").stat().st_mode) == 0o700


def test_directories_that_cannot_be_a_cache_are_refused_in_one_line(tmp_path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(CacheDirError, match="is not a directory"):
        prepare(str(tmp_path / "file"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    with pytest.raises(CacheDirError, match="not empty and is not an ebsfs cache"):
        prepare(str(tmp_path / "home"))
    if os.geteuid() == 0:
        (tmp_path / "theirs").mkdir()
        os.chown(tmp_path / "theirs", 1234, 1234)
        with pytest.raises(CacheDirError, match="belongs to uid 1234"):
            prepare(str(tmp_path / "theirs"))


def test_data_written_by_a_store_that_was_killed_is_freed_on_open(tmp_path) -> None:
    cache = open_cache(str(tmp_path / "c"))
    store_blocks(cache, SNAP, [0, 2])
    cache.close()
    # What a process killed between writing data and committing its row leaves behind:
    # data (half of a block here) with no index entry.
    with open(data_file(tmp_path / "c"), "r+b") as f:
        f.seek(5 * BLOCK_SIZE)
        f.write(b"\xaa" * (BLOCK_SIZE // 2))
    (tmp_path / "c" / DATA_DIR / "stray").write_text("?")
    before = data_file(tmp_path / "c").stat().st_blocks * 512
    assert before >= 2 * BLOCK_SIZE + BLOCK_SIZE // 2
    again = open_cache(str(tmp_path / "c"))
    assert data_file(tmp_path / "c").stat().st_blocks * 512 == 2 * BLOCK_SIZE
    assert (tmp_path / "c" / DATA_DIR / "stray").read_text() == "?"  # not ebsfs's: kept
    assert again.blocks == 2 and load(again, SNAP, 2)[0].checksum is not None


@pytest.mark.expected_log(r"cache index .* is damaged")
def test_a_damaged_index_starts_an_empty_cache(tmp_path) -> None:
    cache = open_cache(str(tmp_path / "c"))
    store_blocks(cache, SNAP, [0, 1])
    cache.close()
    with open(tmp_path / "c" / INDEX_NAME, "r+b") as f:
        f.write(b"garbage" * 20)
    again = open_cache(str(tmp_path / "c"))
    assert again.blocks == 0 and load(again, SNAP, 0)[0].checksum is None
    assert (
        data_file(tmp_path / "c").stat().st_blocks == 0
        if data_file(tmp_path / "c").exists()
        else True
    )
    store_blocks(again, SNAP, [0])


def test_two_caches_on_one_directory_share_it(tmp_path) -> None:
    """Two processes' worth of connections: what one stores the other serves, what one
    evicts the other misses without calling it damage."""
    first = open_cache(str(tmp_path / "c"), 8 * MIB)
    second = open_cache(str(tmp_path / "c"), 8 * MIB)
    store_blocks(first, SNAP, [0, 1])
    assert load(second, SNAP, 1)[0].checksum is not None
    store_blocks(second, SNAP, list(range(2, 40)))  # evicts 0 and 1, among others
    found, _ = load(first, SNAP, 0)
    assert found.checksum is None and not found.damaged
    assert first.blocks + 0 >= 0 and allocated(tmp_path / "c") <= 8 * MIB + 64 * 1024


def test_lineage_candidates_are_snapshots_of_the_same_size_with_blocks(tmp_path) -> None:
    cache = open_cache(str(tmp_path / "c"))
    store_blocks(cache, "snap-0a", [0])
    data = pattern_block(1, 0)
    cache.store("snap-0b", 0, 2 * GIB, data, checksum(data))
    store_blocks(cache, "snap-0c", [1])
    cache.close()
    path = str(tmp_path / "c")
    assert lineage_candidates(path, "snap-0d", GIB, set()) == ["snap-0c", "snap-0a"]
    assert lineage_candidates(path, "snap-0d", GIB, {"snap-0c"}) == ["snap-0a"]
    assert lineage_candidates(str(tmp_path / "none"), "snap-0d", GIB, set()) == []


# ---- engines over a disk cache (sessions), no FUSE ------------------------------------


def lineage_store() -> SnapshotStore:
    store = SnapshotStore(Faults(seed=1))
    store.add_snapshot("snap-0a1", {i: pattern_block(1, i) for i in range(12)}, volume_size_gib=1)
    store.add_snapshot(
        "snap-0a2",
        {3: pattern_block(2, 3), 7: pattern_block(2, 7), 20: pattern_block(2, 20)},
        parent="snap-0a1",
    )
    store.add_snapshot("snap-0b1", {i: pattern_block(3, i) for i in range(4)}, volume_size_gib=1)
    return store


def session(
    store: SnapshotStore, cache_dir: Path, snapshot_id: str
) -> tuple[StoreApi, Engine, bytes]:
    """One engine's life: plan, build, read the first 24 blocks, close."""
    api = PlacedApi(store)
    config = EngineConfig(cache_dir=str(cache_dir), cache_size=8 * MIB)
    checked = plan(config, [snapshot_id], api=api)
    engine = Engine(api, config, checked.snapshots, checked.bases, checked.disk_bases)
    data = bytes(trio.run(engine.images[snapshot_id].read, 0, 24 * BLOCK_SIZE))
    engine.close()
    return api, engine, data


def expected_bytes(store: SnapshotStore, snapshot_id: str) -> bytes:
    blocks = store.get(snapshot_id).blocks
    return b"".join(
        bytes(blocks[i].data()) if i in blocks else bytes(BLOCK_SIZE) for i in range(24)
    )


def test_a_second_session_reads_everything_from_disk(tmp_path) -> None:
    store = lineage_store()
    api, engine, data = session(store, tmp_path / "c", "snap-0a1")
    assert data == expected_bytes(store, "snap-0a1")
    assert api.calls["GetSnapshotBlock"] == 12 and engine.stats.disk_stored == 12
    view = engine.images["snap-0a1"].disk
    assert view is not None and not any(view.served_from_disk(i) for i in range(24))
    api, engine, data = session(store, tmp_path / "c", "snap-0a1")
    assert data == expected_bytes(store, "snap-0a1")
    assert api.calls["GetSnapshotBlock"] == 0 and engine.stats.disk_hits == 12
    view = engine.images["snap-0a1"].disk
    assert view is not None  # what `ebsfs get` would record as read from the disk cache
    assert [i for i in range(24) if view.served_from_disk(i)] == list(range(12))


def test_a_later_snapshot_alone_costs_only_its_changed_blocks(tmp_path) -> None:
    store = lineage_store()
    session(store, tmp_path / "c", "snap-0b1")  # same size, another volume
    session(store, tmp_path / "c", "snap-0a1")
    api, engine, data = session(store, tmp_path / "c", "snap-0a2")
    assert data == expected_bytes(store, "snap-0a2")
    # Blocks 3, 7 and 20 changed; the other 10 come from snap-0a1's cached blocks.
    assert sorted(i for (_, i) in api.block_gets) == [3, 7, 20]
    assert engine.stats.lineage_hits == 10 and engine.stats.disk_hits == 10
    # One relatedness check per candidate of the same size: snap-0b1 is unrelated, and
    # remembered as such.
    assert lineage_candidates(str(tmp_path / "c"), "snap-0a2", GIB, set()) == ["snap-0a1"]


def test_snapshots_cached_from_another_endpoint_are_not_offered_as_bases(tmp_path) -> None:
    """Their ids are not sent to this endpoint (one ListChangedBlocks each), and nothing
    is shared: an endpoint only speaks for its own snapshots."""

    class ElsewhereApi(PlacedApi):
        endpoint_url = "http://other.test"

    store = lineage_store()
    session(store, tmp_path / "c", "snap-0a1")  # cached from http://ebs.test
    elsewhere = ElsewhereApi(store)
    config = EngineConfig(cache_dir=str(tmp_path / "c"), cache_size=8 * MIB)
    checked = plan(config, ["snap-0a2"], api=elsewhere)
    assert checked.disk_bases == {}
    assert elsewhere.calls["ListChangedBlocks"] == 0
    placed = PlacedApi(store)  # the endpoint that cached it: offered, and related
    checked = plan(config, ["snap-0a2"], api=placed)
    assert checked.disk_bases == {"snap-0a2": ["snap-0a1"]}
    assert placed.calls["ListChangedBlocks"] == 1


# ---- the engine's side: queued writes, what other processes stored -------------------


def test_queued_blocks_are_served_and_written_even_when_the_writer_is_stopped(tmp_path) -> None:
    from ebsfs.engine.disktier import DiskTier
    from ebsfs.engine.stats import Stats
    from ebsfs.service.api import Block

    tier = DiskTier(open_cache(str(tmp_path / "c")), Stats())
    tier.track([SNAP])

    async def main() -> None:
        tier._writing = True  # as if the writer ran, but it never gets to: all stay queued
        for i in range(3):
            data = pattern_block(1, i)
            await tier.store(SNAP, i, GIB, Block(data, checksum(data)))
        found = await tier.load(SNAP, 1, None)
        assert found is not None and bytes(found.data) == pattern_block(1, 1)

    trio.run(main)
    assert open_cache(str(tmp_path / "c")).blocks == 0
    tier.close()  # writes what was queued
    again = open_cache(str(tmp_path / "c"))
    assert again.blocks == 3 and load(again, SNAP, 2)[0].checksum is not None


def test_blocks_another_process_stores_are_noticed(tmp_path) -> None:
    from ebsfs.engine.disktier import DiskTier
    from ebsfs.engine.stats import Stats

    tier = DiskTier(open_cache(str(tmp_path / "c")), Stats(), refresh=0.05)
    tier.track([SNAP])
    other = open_cache(str(tmp_path / "c"))

    async def main() -> None:
        assert await tier.load(SNAP, 4, None) is None  # known absent: no lookup at all
        store_blocks(other, SNAP, [4])
        async with trio.open_nursery() as nursery:
            await nursery.start(tier.run)
            with trio.fail_after(5):
                while await tier.load(SNAP, 4, None) is None:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert tier.stats.disk_hits == 1
    tier.close()


def test_a_slab_queued_for_the_disk_stays_lent_until_written(tmp_path) -> None:
    """The write queue holds views of the memory cache's slabs: their loans come back
    only once the blocks are written, so no slab's memory is reused under the writer."""
    from ebsfs.engine.cache import SLAB_SIZE, BlockCache, Loan
    from ebsfs.engine.disktier import DiskTier
    from ebsfs.engine.stats import Stats
    from ebsfs.service.api import Block

    memory = BlockCache(4 * SLAB_SIZE)
    tier = DiskTier(open_cache(str(tmp_path / "c")), Stats())
    tier.track([SNAP])
    queued: list[Loan] = []

    async def fetch(room: memoryview | None, lent: Loan) -> Block:
        assert room is not None
        room[:] = pattern_block(1, 0)
        block = Block(room, checksum(pattern_block(1, 0)))
        queued.append(lent.share())
        await tier.store(SNAP, 0, GIB, block, queued[-1])
        return block

    async def main() -> None:
        tier._writing = True  # the writer has not run yet: the block stays queued
        await memory.get((SNAP, 0), fetch, None)
        assert len(queued[0]) == 1  # still lent to the queue
        async with trio.open_nursery() as nursery:
            await nursery.start(tier.run)
            with trio.fail_after(5):
                while len(queued[0]):
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

    trio.run(main)
    tier.close()
    assert open_cache(str(tmp_path / "c")).blocks == 1


def test_origins_share_the_size_bound_and_never_serve_each_other(tmp_path) -> None:
    """One snapshot id at two endpoints: two sets of blocks, one LRU, one size bound."""
    mine = open_cache(str(tmp_path / "c"), 4 * MIB)
    other = DiskCache(str(tmp_path / "c"), 4 * MIB, origin=Origin("http://other.test", "x"))
    store_blocks(mine, SNAP, [0, 1])
    found, _ = load(other, SNAP, 0)
    assert found.checksum is None and not found.damaged
    elsewhere = 0
    for i in range(2, 12):
        data = pattern_block(2, i)
        result = other.store(SNAP, i, GIB, data, checksum(data))
        assert result.stored
        elsewhere += result.evicted_elsewhere
    assert elsewhere == 2  # mine went first: the least recently used
    assert allocated(tmp_path / "c") <= 4 * MIB + 64 * 1024
    found, _ = load(mine, SNAP, 0)
    assert found.checksum is None and not found.damaged
    assert mine.held(SNAP) == [] and len(other.held(SNAP)) == other.blocks
