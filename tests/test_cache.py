"""BlockCache: slabs of two blocks, byte budget, one fetch per block."""

from __future__ import annotations

import pytest
import trio

from ebsfs.constants import BLOCK_SIZE
from ebsfs.engine.cache import SLAB_SIZE, BlockCache
from ebsfs.service.api import Block
from tests.fakes import pattern_block


def fill(cache: BlockCache, snapshot_id: str, indexes: list[int]) -> None:
    async def run() -> None:
        for i in indexes:
            async def fetch(room: memoryview | None, i: int = i) -> Block:
                return Block(pattern_block(7, i), None)
            await cache.get((snapshot_id, i), fetch)
    trio.run(run)


def test_an_aligned_pair_is_one_view_without_copy() -> None:
    cache = BlockCache(8 * SLAB_SIZE)
    fill(cache, "s", [4, 5])
    span = cache.peek_span("s", 4, 5)
    assert span is not None and bytes(span) == pattern_block(7, 4) + pattern_block(7, 5)
    assert cache.peek_span("s", 5, 6) is None  # not one slab
    assert cache.peek_span("s", 6, 7) is None  # not cached


def test_half_filled_slab_serves_its_block_only() -> None:
    cache = BlockCache(8 * SLAB_SIZE)
    fill(cache, "s", [3])
    assert bytes(cache.peek(("s", 3)) or b"") == pattern_block(7, 3)
    assert cache.peek(("s", 2)) is None and ("s", 2) not in cache
    assert cache.peek_span("s", 2, 3) is None


def test_budget_counts_blocks_not_slabs() -> None:
    """A slab holding one block costs one block: a stride-3 reader (every block in a
    slab of its own) gets as many blocks as the budget says."""
    cache = BlockCache(3 * SLAB_SIZE)  # six blocks
    fill(cache, "s", [0, 3, 6, 9, 12, 15])
    assert cache.current_bytes == 6 * BLOCK_SIZE
    assert all(("s", i) in cache for i in (0, 3, 6, 9, 12, 15))
    fill(cache, "s", [18])
    assert cache.current_bytes <= 3 * SLAB_SIZE
    assert ("s", 0) not in cache and ("s", 18) in cache


def test_views_handed_out_survive_eviction_and_reuse() -> None:
    """An evicted slab's memory is reused for new blocks only when nobody views it."""
    cache = BlockCache(SLAB_SIZE)
    fill(cache, "s", [0])
    view = cache.peek(("s", 0))
    fill(cache, "s", [10, 20, 30, 40, 50, 60])  # evicts and recycles slabs over and over
    assert ("s", 0) not in cache
    assert view is not None and bytes(view) == pattern_block(7, 0)
    assert bytes(cache.peek(("s", 60)) or b"") == pattern_block(7, 60)


def test_memory_of_evicted_slabs_is_reused() -> None:
    cache = BlockCache(SLAB_SIZE)
    fill(cache, "s", [0, 2])
    first = {id(slab.buf) for slab in cache._lru.values()}
    fill(cache, "s", [4, 6, 8])
    assert cache._spare or first & {id(slab.buf) for slab in cache._lru.values()}
    assert bytes(cache.peek(("s", 8)) or b"") == pattern_block(7, 8)


def test_a_cache_smaller_than_a_slab_still_answers() -> None:
    cache = BlockCache(BLOCK_SIZE)
    fill(cache, "s", [1])
    assert cache.current_bytes == 0 and ("s", 1) not in cache


@pytest.mark.parametrize("readers", [1, 10])
def test_one_fetch_per_block_whatever_the_readers(readers: int) -> None:
    cache = BlockCache(4 * SLAB_SIZE)
    calls = []

    async def fetch(room: memoryview | None) -> Block:
        calls.append(1)
        await trio.sleep(0.01)
        return Block(pattern_block(7, 9), None)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(readers):
                nursery.start_soon(cache.get, ("s", 9), fetch)

    trio.run(run)
    assert len(calls) == 1


def test_a_slab_with_an_abandoned_fetch_never_comes_back() -> None:
    """Block 0's fetch is cancelled (its worker may still write into its room) while
    block 1's fetch, same slab, is in flight and then completes: block 0 must be
    fetched into new room, or a late write could change bytes already served."""
    cache = BlockCache(8 * SLAB_SIZE)
    rooms: dict[int, memoryview] = {}
    release_one = trio.Event()

    async def stalled(room: memoryview | None) -> Block:
        assert room is not None
        rooms[0] = room
        await trio.sleep_forever()
        raise AssertionError

    async def slow_one(room: memoryview | None) -> Block:
        await release_one.wait()
        return Block(pattern_block(7, 1), None)

    async def good_zero(room: memoryview | None) -> Block:
        assert room is not None and room.obj is not rooms[0].obj
        return Block(pattern_block(7, 0), None)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cache.get, ("s", 1), slow_one)
            with trio.move_on_after(0.05):
                await cache.get(("s", 0), stalled)
            release_one.set()
        assert bytes((await cache.get(("s", 0), good_zero)).data) == pattern_block(7, 0)
        rooms[0][:] = b"X" * BLOCK_SIZE  # the abandoned worker writes late
        assert bytes(cache.peek(("s", 0)) or b"") == pattern_block(7, 0)

    trio.run(run)


def test_slabs_are_mappings_unless_the_cache_could_exhaust_them(monkeypatch) -> None:
    import mmap

    async def fetch(room: memoryview | None) -> Block:
        return Block(pattern_block(7, 0), None)

    for max_map_count, kind in ((65530, mmap.mmap), (64, bytearray)):
        monkeypatch.setattr("ebsfs.engine.cache._mappings_allowed", lambda n=max_map_count: n)
        cache = BlockCache(32 * SLAB_SIZE)
        view = trio.run(cache.get, ("s", 0), fetch).data
        assert isinstance(view, memoryview) and isinstance(view.obj, kind)
        assert bytes(view) == pattern_block(7, 0)


def test_the_service_checksum_is_kept_with_the_block() -> None:
    cache = BlockCache(8 * SLAB_SIZE)

    async def fetch(room: memoryview | None) -> Block:
        return Block(pattern_block(7, 3), "c2hhMjU2")

    async def run() -> None:
        first = await cache.get(("s", 3), fetch)
        again = await cache.get(("s", 3), fetch)
        assert first.checksum == again.checksum == cache.checksum(("s", 3)) == "c2hhMjU2"
        assert cache.checksum(("s", 2)) is None

    trio.run(run)
