"""Reads of a snapshot image without FUSE or HTTP: bytes, zeros, caching, token refresh,
errors, and the prefetcher's decisions."""

from __future__ import annotations

import hashlib

import pytest
import trio

from ebsfs import BLOCK_SIZE
from ebsfs.cache import BlockCache
from ebsfs.emulator import Faults, SnapshotStore
from ebsfs.errors import InvalidBlockToken, TransientError
from ebsfs.image import ReadFailed, SnapshotImage
from ebsfs.index import BlockIndex
from ebsfs.prefetch import Readahead, ReadPattern
from ebsfs.remote import RemoteSnapshots
from tests.fakes import FailingApi, StoreApi, pattern_block

GIB = 1024**3
WRITTEN = [0, 1, 2, 7, 100, 2047]


def expected_image() -> bytearray:
    image = bytearray(GIB)
    for i in WRITTEN:
        image[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE] = pattern_block(1, i)
    return image


@pytest.fixture(scope="module")
def expected() -> bytearray:
    return expected_image()


def build(api=None, cache_bytes=64 * BLOCK_SIZE, readahead=None, timeout=30.0, store=None):  # type: ignore[no-untyped-def]
    if store is None:
        store = SnapshotStore(Faults(seed=1))
        store.add_snapshot("snap-01", {i: pattern_block(1, i) for i in WRITTEN}, volume_size_gib=1)
    api = api or StoreApi(store)
    remote = RemoteSnapshots(api, max_fetches=8)
    image = SnapshotImage("snap-01", GIB, BlockIndex(remote, "snap-01", 2048),
                          BlockCache(cache_bytes), remote, readahead, read_timeout=timeout)
    return store, api, image


@pytest.mark.parametrize("offset,size", [
    (0, 4096), (BLOCK_SIZE - 100, 300), (3 * BLOCK_SIZE, BLOCK_SIZE),
    (BLOCK_SIZE * 6 + 5, 3 * BLOCK_SIZE), (GIB - 10, 100), (GIB, 10), (123456, 0),
])
def test_read_returns_exact_bytes(expected, offset, size) -> None:
    _, _, image = build()
    data = trio.run(image.read, offset, size)
    assert data == bytes(expected[offset : offset + size])


def test_absent_blocks_are_zeros_and_cost_no_call() -> None:
    _, api, image = build()
    data = trio.run(image.read, 3 * BLOCK_SIZE, 4 * BLOCK_SIZE)
    assert data == bytes(4 * BLOCK_SIZE)
    assert api.calls["GetSnapshotBlock"] == 0


def test_blocks_are_cached_and_fetched_once_by_concurrent_readers() -> None:
    _, api, image = build()

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            for n in range(20):
                nursery.start_soon(image.read, n * 1000, 4096)
        await image.read(0, BLOCK_SIZE)

    trio.run(run)
    assert api.block_gets[("snap-01", 0)] == 1


def test_lru_is_bounded_in_bytes() -> None:
    _, api, image = build(cache_bytes=2 * BLOCK_SIZE)

    async def run() -> None:
        for i in WRITTEN:
            await image.read(i * BLOCK_SIZE, 10)

    trio.run(run)
    assert image.cache.current_bytes <= 2 * BLOCK_SIZE
    trio.run(image.read, 0, 10)
    assert api.block_gets[("snap-01", 0)] == 2  # evicted, fetched again


def test_refused_token_is_refreshed_and_the_read_goes_on(expected) -> None:
    store = SnapshotStore(Faults(seed=1))
    store.add_snapshot("snap-01", {i: pattern_block(1, i) for i in WRITTEN}, volume_size_gib=1)
    refused = []

    def plan(number: int, operation: str):  # type: ignore[no-untyped-def]
        if operation == "GetSnapshotBlock" and not refused:
            refused.append(number)
            return InvalidBlockToken("expired", "ValidationException", "INVALID_BLOCK_TOKEN")
        return None

    api = FailingApi(StoreApi(store), plan)
    _, _, image = build(api=api, store=store)
    assert trio.run(image.read, 0, 100) == bytes(expected[:100])
    assert api.inner.calls["ListSnapshotBlocks"] == 2


def test_remote_failure_is_read_failed_never_wrong_bytes() -> None:
    store = SnapshotStore(Faults(seed=1))
    store.add_snapshot("snap-01", {i: pattern_block(1, i) for i in WRITTEN}, volume_size_gib=1)

    def plan(number: int, operation: str):  # type: ignore[no-untyped-def]
        return TransientError("boom") if operation == "GetSnapshotBlock" else None

    _, _, image = build(api=FailingApi(StoreApi(store), plan), store=store)
    with pytest.raises(ReadFailed):
        trio.run(image.read, 0, 2 * BLOCK_SIZE)


def test_read_timeout_bounds_a_stalled_fetch() -> None:
    store = SnapshotStore(Faults(seed=1))
    store.add_snapshot("snap-01", {0: pattern_block(1, 0)}, volume_size_gib=1)

    class Stalled(StoreApi):
        def get_snapshot_block(self, *a, **k):  # type: ignore[no-untyped-def]
            import time
            time.sleep(2)
            return super().get_snapshot_block(*a, **k)

    _, _, image = build(api=Stalled(store), store=store, timeout=0.3)
    with pytest.raises(ReadFailed, match="took over"):
        trio.run(image.read, 0, 10)


def test_an_abandoned_fetch_writing_late_never_changes_what_is_served() -> None:
    """A read that times out abandons its worker thread, which may still receive the
    body into the room it was given; no later fetch may be given that room."""
    import threading

    store = SnapshotStore(Faults(seed=1))
    store.add_snapshot("snap-01", {0: pattern_block(1, 0), 1: pattern_block(1, 1)},
                       volume_size_gib=1)
    late_write_done = threading.Event()

    class SlowThenGarbage(StoreApi):
        stall = True

        def get_snapshot_block(self, snapshot_id, index, token, into=None):  # type: ignore[no-untyped-def]
            if index == 0 and self.stall:
                self.stall = False
                import time
                time.sleep(0.6)  # the reader gave up at 0.2 s
                if into is not None:
                    into[:] = b"X" * len(into)
                late_write_done.set()
                raise TransientError("too late")
            return super().get_snapshot_block(snapshot_id, index, token, into)

    _, _, image = build(api=SlowThenGarbage(store), store=store, timeout=0.2)

    async def run() -> None:
        with pytest.raises(ReadFailed, match="took over"):
            await image.read(0, BLOCK_SIZE)
        first = await image.read(0, 2 * BLOCK_SIZE)  # fetched again, same slab pair
        assert bytes(first) == pattern_block(1, 0) + pattern_block(1, 1)
        await trio.to_thread.run_sync(late_write_done.wait)
        again = await image.read(0, 2 * BLOCK_SIZE)
        assert bytes(again) == pattern_block(1, 0) + pattern_block(1, 1)
        assert bytes(first) == pattern_block(1, 0) + pattern_block(1, 1)

    trio.run(run)


def test_readahead_fetches_ahead_of_a_sequential_reader(expected) -> None:
    store = SnapshotStore(Faults(seed=1))
    dense = {i: pattern_block(1, i) for i in range(64)}
    store.add_snapshot("snap-01", dense, volume_size_gib=1)
    readahead = Readahead()
    _, api, image = build(store=store, readahead=readahead)
    stream = image.open_stream()
    digest = hashlib.sha256()

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(readahead.run)
            for off in range(0, 16 * BLOCK_SIZE, 131072):
                digest.update(await image.read(off, 131072, stream))
            await trio.sleep(0.2)
            nursery.cancel_scope.cancel()

    trio.run(run)
    want = b"".join(pattern_block(1, i) for i in range(16))
    assert digest.digest() == hashlib.sha256(want).digest()
    assert readahead.submitted > 0
    fetched = {i for (_, i) in api.block_gets}
    assert max(fetched) > 15  # fetched beyond what was read
    assert all(n == 1 for n in api.block_gets.values())


def test_index_is_listed_ahead_of_a_sequential_reader() -> None:
    """Read-ahead asks the index for blocks past the next chunk boundary, so each chunk
    is listed before the reader gets there: listing never stalls a sequential read."""
    store = SnapshotStore(Faults(seed=1))
    block = pattern_block(1, 0)
    store.add_snapshot("snap-01", dict.fromkeys(range(1024), block), volume_size_gib=1)
    events: list[tuple[str, int]] = []

    class SmallPages(StoreApi):
        def list_snapshot_blocks(self, snapshot_id, start_index=0, next_token=None,  # type: ignore[no-untyped-def]
                                 max_results=10000):
            # the smallest pages the service allows: two or more per chunk
            return super().list_snapshot_blocks(snapshot_id, start_index, next_token, 100)

    remote = RemoteSnapshots(SmallPages(store), max_fetches=8)
    list_blocks = remote.list_snapshot_blocks

    async def logged_list(snapshot_id, start_index=0, next_token=None, **kw):  # type: ignore[no-untyped-def]
        if next_token is None:
            events.append(("list", start_index))
        return await list_blocks(snapshot_id, start_index, next_token, **kw)

    remote.list_snapshot_blocks = logged_list  # type: ignore[method-assign]
    readahead = Readahead()
    image = SnapshotImage("snap-01", GIB, BlockIndex(remote, "snap-01", 2048, chunk_blocks=128),
                          BlockCache(128 * BLOCK_SIZE), remote, readahead, max_window=16)
    stream = image.open_stream()

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(readahead.run)
            for off in range(0, 1024 * BLOCK_SIZE, 262144):
                if off % BLOCK_SIZE == 0:
                    events.append(("read", off // BLOCK_SIZE))
                assert await image.read(off, 262144, stream) == block[:262144]
                await trio.sleep(0)  # FUSE requests arrive through a checkpoint each
            nursery.cancel_scope.cancel()

    trio.run(run)
    for boundary in range(128, 1024, 128):
        listed = events.index(("list", boundary))
        assert listed < events.index(("read", boundary)) - 8, (boundary, events)


# ---- ReadPattern ---------------------------------------------------------------------


def test_window_grows_geometrically_while_sequential() -> None:
    pattern = ReadPattern(GIB, max_window=16)
    windows = []
    offset = 0
    for _ in range(8):
        pattern.observe(offset, 131072)
        windows.append(pattern.window)
        offset += 131072
    assert windows == [0, 2, 4, 8, 16, 16, 16, 16]


def test_random_read_resets_the_window_and_prefetches_nothing() -> None:
    pattern = ReadPattern(GIB, max_window=16)
    for n in range(5):
        pattern.observe(n * 131072, 131072)
    assert pattern.window > 0
    assert list(pattern.observe(500 * BLOCK_SIZE, 4096)) == []
    assert pattern.window == 0


def test_small_out_of_order_reads_count_as_sequential() -> None:
    pattern = ReadPattern(GIB, max_window=16)
    pattern.observe(0, 131072)
    pattern.observe(262144, 131072)  # kernel read-ahead arriving out of order
    pattern.observe(131072, 131072)
    assert pattern.window == 4


def test_nothing_is_prefetched_past_the_end_of_the_volume() -> None:
    pattern = ReadPattern(4 * BLOCK_SIZE, max_window=16)
    ahead = []
    for off in range(0, 4 * BLOCK_SIZE, 131072):
        ahead += list(pattern.observe(off, 131072))
    assert ahead and max(ahead) == 3
    assert list(pattern.observe(4 * BLOCK_SIZE - 131072, 131072)) == []


def test_random_4k_reads_fetch_at_most_twice_the_blocks_they_touch() -> None:
    import random

    store = SnapshotStore(Faults(seed=1))
    store.add_snapshot("snap-01", {i: pattern_block(1, i) for i in range(2048)},
                       volume_size_gib=1)
    readahead = Readahead()
    _, api, image = build(store=store, readahead=readahead, cache_bytes=512 * BLOCK_SIZE)
    stream = image.open_stream()
    rng = random.Random(5)
    offsets = [rng.randrange(0, GIB - 4096) for _ in range(200)]

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(readahead.run)
            for off in offsets:
                await image.read(off, 4096, stream)
            await trio.sleep(0.2)
            nursery.cancel_scope.cancel()

    trio.run(run)
    touched = {off // BLOCK_SIZE for off in offsets}
    touched |= {(off + 4095) // BLOCK_SIZE for off in offsets}
    assert sum(api.block_gets.values()) <= 2 * len(touched)


def test_a_stalled_prefetch_gives_up_within_the_read_timeout() -> None:
    """Prefetches have the reads' time limit: one whose fetch stalls ends, and its
    block can be prefetched again (before, it stayed in `_prefetching` for ever)."""
    import threading

    release = threading.Event()
    store = SnapshotStore(Faults(seed=1))
    store.add_snapshot("snap-01", {i: pattern_block(1, i) for i in range(64)},
                       volume_size_gib=1)

    class StallsAhead(StoreApi):
        def get_snapshot_block(self, snapshot_id, index, token, into=None):  # type: ignore[no-untyped-def]
            if index >= 4:
                release.wait(30)
            return super().get_snapshot_block(snapshot_id, index, token, into)

    readahead = Readahead()
    _, _, image = build(api=StallsAhead(store), store=store, readahead=readahead, timeout=0.5)
    stream = image.open_stream()
    stuck: list[int] = []

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(readahead.run)
            for off in range(0, 4 * BLOCK_SIZE, BLOCK_SIZE):
                await image.read(off, BLOCK_SIZE, stream)
            await trio.sleep(0.1)
            assert image._prefetching  # prefetches of blocks 4.. are stalled
            await trio.sleep(1.0)
            stuck.extend(image._prefetching)
            nursery.cancel_scope.cancel()

    try:
        trio.run(run)
    finally:
        release.set()
    assert stuck == []
