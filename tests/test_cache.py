"""BlockCache: slabs of two blocks, byte budget, one fetch per block, memory reused only
when every view of it was given back."""

from __future__ import annotations

import pytest
import trio

from ebsfs.constants import BLOCK_SIZE
from ebsfs.engine.cache import SLAB_SIZE, BlockCache, Loan, ReplyLoans
from ebsfs.service.api import Block
from tests.fakes import pattern_block


def fill(cache: BlockCache, snapshot_id: str, indexes: list[int]) -> None:
    """Fetch blocks, giving each view back at once (as read-ahead does)."""

    async def run() -> None:
        for i in indexes:

            async def fetch(room: memoryview | None, lent: Loan, i: int = i) -> Block:
                return Block(pattern_block(7, i), None)

            with Loan() as loan:
                await cache.get((snapshot_id, i), fetch, loan)

    trio.run(run)


def test_an_aligned_pair_is_one_view_without_copy() -> None:
    cache = BlockCache(8 * SLAB_SIZE)
    fill(cache, "s", [4, 5])
    span = cache.peek_span("s", 4, 5, None)
    assert span is not None and bytes(span) == pattern_block(7, 4) + pattern_block(7, 5)
    assert cache.peek_span("s", 5, 6, None) is None  # not one slab
    assert cache.peek_span("s", 6, 7, None) is None  # not cached


def test_half_filled_slab_serves_its_block_only() -> None:
    cache = BlockCache(8 * SLAB_SIZE)
    fill(cache, "s", [3])
    assert bytes(cache.peek(("s", 3), None) or b"") == pattern_block(7, 3)
    assert cache.peek(("s", 2), None) is None and ("s", 2) not in cache
    assert cache.peek_span("s", 2, 3, None) is None


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


def the_slab_of(cache: BlockCache, index: int) -> object:
    """The memory block `index` lives in (a view's underlying mapping)."""
    with Loan() as loan:
        view = cache.peek(("s", index), loan)
        assert view is not None
        return view.obj


def test_memory_of_evicted_slabs_is_reused() -> None:
    """Views given back: an evicted slab's mapping is a later slab's (one slab of room:
    each new slab is made before the one it evicts becomes spare)."""
    cache = BlockCache(SLAB_SIZE)
    fill(cache, "s", [0, 1])
    first = the_slab_of(cache, 0)
    fill(cache, "s", [2, 3])  # a fresh slab; block 0's becomes spare
    assert ("s", 0) not in cache and cache.recycled == 0
    fill(cache, "s", [4, 5])
    assert cache.recycled == 1 and the_slab_of(cache, 4) is first
    with Loan() as loan:
        assert bytes(cache.peek(("s", 4), loan) or b"") == pattern_block(7, 4)
    fill(cache, "s", [6, 7, 8, 9])
    assert cache.recycled == 3


@pytest.mark.parametrize("how", ["on a loan", "with no loan", "fetched on a loan"])
def test_a_viewed_slab_is_never_reused_nor_overwritten(how: str) -> None:
    """A view on a loan not given back yet, or handed out with no loan at all, keeps
    its memory out of reuse: evicted, it still shows its block while new blocks land
    in other memory; given back after its eviction, it is not recycled either."""
    cache = BlockCache(SLAB_SIZE)
    held = Loan()
    view: bytes | memoryview | None
    if how == "fetched on a loan":

        async def fetch(room: memoryview | None, lent: Loan) -> Block:
            return Block(pattern_block(7, 0), None)

        view = trio.run(cache.get, ("s", 0), fetch, held).data
    else:
        fill(cache, "s", [0, 1])
        view = cache.peek(("s", 0), held if how == "on a loan" else None)
    assert isinstance(view, memoryview)
    for first in (2, 4, 6, 8):  # each pair evicts the one before
        fill(cache, "s", [first, first + 1])
        assert the_slab_of(cache, first) is not view.obj
    assert ("s", 0) not in cache and bytes(view) == pattern_block(7, 0)
    assert cache.recycled == 2  # the slabs of 2 and 4, not block 0's
    held.give_back()
    for first in (10, 12):
        fill(cache, "s", [first, first + 1])
        assert the_slab_of(cache, first) is not view.obj
    assert bytes(view) == pattern_block(7, 0) and cache.recycled == 4


@pytest.mark.parametrize("next_read", [False, True])
def test_a_reply_loan_is_given_back_when_the_next_read_starts(next_read: bool) -> None:
    """The FUSE face's loans: a read's views stay lent after it returns (pyfuse3
    replies from them then) until the next read takes a loan."""
    cache = BlockCache(SLAB_SIZE)
    fill(cache, "s", [0, 1])
    loans = ReplyLoans()
    loan = loans.take()
    view = cache.peek(("s", 0), loan)
    loans.answered(loan)
    if next_read:
        assert loans.take() is loan and len(loan) == 0  # given back, and reused
    fill(cache, "s", [2, 3])  # evicts block 0's slab
    fill(cache, "s", [4, 5])
    assert (the_slab_of(cache, 4) is view.obj if view is not None else False) == next_read
    assert cache.recycled == (1 if next_read else 0)


def test_a_cache_smaller_than_a_slab_still_answers() -> None:
    cache = BlockCache(BLOCK_SIZE)
    fill(cache, "s", [1])
    assert cache.current_bytes == 0 and ("s", 1) not in cache


@pytest.mark.parametrize("readers", [1, 10])
def test_one_fetch_per_block_whatever_the_readers(readers: int) -> None:
    cache = BlockCache(4 * SLAB_SIZE)
    calls = []

    async def fetch(room: memoryview | None, lent: Loan) -> Block:
        calls.append(1)
        await trio.sleep(0.01)
        return Block(pattern_block(7, 9), None)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(readers):
                nursery.start_soon(cache.get, ("s", 9), fetch, None)

    trio.run(run)
    assert len(calls) == 1


def test_a_slab_with_an_abandoned_fetch_never_comes_back() -> None:
    """Block 0's fetch is cancelled (its worker may still write into its room) while
    block 1's fetch, same slab, is in flight and then completes: block 0 must be
    fetched into new room, or a late write could change bytes already served."""
    cache = BlockCache(8 * SLAB_SIZE)
    rooms: dict[int, memoryview] = {}
    release_one = trio.Event()

    async def stalled(room: memoryview | None, lent: Loan) -> Block:
        assert room is not None
        rooms[0] = room
        await trio.sleep_forever()
        raise AssertionError

    async def slow_one(room: memoryview | None, lent: Loan) -> Block:
        await release_one.wait()
        return Block(pattern_block(7, 1), None)

    async def good_zero(room: memoryview | None, lent: Loan) -> Block:
        assert room is not None and room.obj is not rooms[0].obj
        return Block(pattern_block(7, 0), None)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cache.get, ("s", 1), slow_one, None)
            with trio.move_on_after(0.05):
                await cache.get(("s", 0), stalled, None)
            release_one.set()
        assert bytes((await cache.get(("s", 0), good_zero, None)).data) == pattern_block(7, 0)
        rooms[0][:] = b"X" * BLOCK_SIZE  # the abandoned worker writes late
        assert bytes(cache.peek(("s", 0), None) or b"") == pattern_block(7, 0)

    trio.run(run)


def test_slabs_are_mappings_unless_the_cache_could_exhaust_them(monkeypatch) -> None:
    import mmap

    async def fetch(room: memoryview | None, lent: Loan) -> Block:
        return Block(pattern_block(7, 0), None)

    for max_map_count, kind in ((65530, mmap.mmap), (64, bytearray)):
        monkeypatch.setattr("ebsfs.engine.cache._mappings_allowed", lambda n=max_map_count: n)
        cache = BlockCache(32 * SLAB_SIZE)
        view = trio.run(cache.get, ("s", 0), fetch, None).data
        assert isinstance(view, memoryview) and isinstance(view.obj, kind)
        assert bytes(view) == pattern_block(7, 0)


def test_the_service_checksum_is_kept_with_the_block() -> None:
    cache = BlockCache(8 * SLAB_SIZE)

    async def fetch(room: memoryview | None, lent: Loan) -> Block:
        return Block(pattern_block(7, 3), "c2hhMjU2")

    async def run() -> None:
        first = await cache.get(("s", 3), fetch, None)
        again = await cache.get(("s", 3), fetch, None)
        assert first.checksum == again.checksum == cache.checksum(("s", 3)) == "c2hhMjU2"
        assert cache.checksum(("s", 2)) is None

    trio.run(run)
