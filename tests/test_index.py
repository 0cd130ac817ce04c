"""BlockIndex: lazy chunked listing, proof rules for short pages, expiry, budget."""

from __future__ import annotations

import trio

from ebsfs.emulator import Faults, SnapshotStore
from ebsfs.engine.index import BlockIndex
from ebsfs.engine.remote import RemoteSnapshots
from tests.fakes import StoreApi, pattern_block

TIB_BLOCKS = 2 * 1024 * 1024


def make(blocks: list[int], volume_gib: int = 1, short_pages: float = 0.0, **kw):
    store = SnapshotStore(Faults(short_pages=short_pages, seed=3))
    shared = pattern_block(0, 0)  # content is irrelevant here; one buffer keeps memory low
    store.add_snapshot("snap-01", {i: shared for i in blocks}, volume_size_gib=volume_gib)
    api = StoreApi(store)
    index = BlockIndex(RemoteSnapshots(api), "snap-01", volume_gib * 2048, **kw)
    return store, api, index


def present(index: BlockIndex, indexes) -> list[int]:
    async def run() -> list[int]:
        return [i for i in indexes if await index.token(i) is not None]

    return trio.run(run)


def test_lookup_lists_only_the_chunk_needed_of_a_huge_volume() -> None:
    # 16 TiB volume: 33.5 million block indexes, blocks written near the start and end.
    last = 16 * TIB_BLOCKS - 1
    store, api, index = make([*range(20000), last - 1], volume_gib=16 * 1024)
    assert present(index, [0, 1, 5, 8000]) == [0, 1, 5, 8000]
    assert api.calls["ListSnapshotBlocks"] == 1
    # Straight to the end with StartingBlockIndex: no paging through the volume.
    assert present(index, [last - 1, last]) == [last - 1]
    assert api.calls["ListSnapshotBlocks"] == 2
    assert index._chunks.currsize < 20000


def test_sparse_listing_proves_many_chunks_at_once() -> None:
    store, api, index = make([10, 8192 * 3 + 1], volume_gib=64, chunk_blocks=8192)
    assert present(index, [10, 11]) == [10]
    calls = api.calls["ListSnapshotBlocks"]
    # The first page returned both blocks and no NextToken: chunks 0..end are proven.
    assert present(index, [8192 + 5, 8192 * 3 + 1, 8192 * 10]) == [8192 * 3 + 1]
    assert api.calls["ListSnapshotBlocks"] == calls == 1


def test_short_and_empty_pages_never_hide_a_block() -> None:
    blocks = sorted(
        {*range(0, 300), *range(5000, 5003), 9000, 20000, *range(100000, 524288, 9973), 524287}
    )
    store, api, index = make(blocks, volume_gib=256, short_pages=1.0)
    probe = sorted(
        {
            *blocks,
            *(b + 1 for b in blocks[:-1]),
            *(b - 1 for b in blocks[1:]),
            *range(0, 524288, 997),
        }
    )
    assert present(index, probe) == blocks
    assert api.calls["ListSnapshotBlocks"] > 20  # really paged through short pages


def test_page_that_ends_before_the_chunk_proves_only_up_to_its_last_block() -> None:
    # A chunk of 8192 with 10,000+ blocks: the first page (10,000 results) covers the
    # chunk; the next chunk must be listed on its own, not assumed empty.
    store, api, index = make(list(range(0, 2048 * 8)), volume_gib=8, chunk_blocks=8192)
    assert present(index, [0, 8191]) == [0, 8191]
    assert present(index, [8192, 12000, 16383]) == [8192, 12000, 16383]


def test_expired_chunk_is_listed_again() -> None:
    now = [1000.0]
    store, api, index = make([0, 1], clock=lambda: now[0])
    store.faults.token_lifetime = 100
    # Emulator expiry uses wall time; the index decides freshness by its own clock
    # against the ExpiryTime it was given, so move its clock past that.
    assert present(index, [0]) == [0]
    now[0] = 10**12
    assert present(index, [1]) == [1]
    assert api.calls["ListSnapshotBlocks"] == 2


def test_invalidate_forces_a_new_listing() -> None:
    store, api, index = make([0])
    present(index, [0])
    index.invalidate(0)
    present(index, [0])
    assert api.calls["ListSnapshotBlocks"] == 2


def test_memory_follows_the_entry_budget() -> None:
    store, api, index = make(
        list(range(8 * 2048)), volume_gib=8, chunk_blocks=1024, max_entries=2 * 1025
    )
    present(index, range(0, 8 * 2048, 512))
    assert index._chunks.currsize <= 2 * 1025
    assert len(index._chunks) <= 2


def test_concurrent_lookups_share_one_listing() -> None:
    store, api, index = make(list(range(100)))

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(index.token, i)

    trio.run(run)
    assert api.calls["ListSnapshotBlocks"] == 1


def first_page(api: StoreApi, max_results: int = 10000):
    """The page from block 0, as the checks before a mount get it (engine/plan.py)."""
    return api.list_snapshot_blocks("snap-01", max_results=max_results)


def test_a_page_got_earlier_is_the_first_page_and_costs_no_call() -> None:
    store, api, _ = make([0, 5, 2000])
    page = first_page(api)
    index = BlockIndex(RemoteSnapshots(api), "snap-01", 2048, first_page=page)
    calls = api.calls["ListSnapshotBlocks"]
    assert present(index, [0, 1, 5, 2047]) == [0, 5]
    assert api.calls["ListSnapshotBlocks"] == calls
    assert index.list_calls == 0
    # Used once: after its chunk is forgotten, the chunk is listed again.
    index.invalidate(0)
    assert present(index, [0, 5]) == [0, 5]
    assert api.calls["ListSnapshotBlocks"] == calls + 1


def test_a_short_page_got_earlier_is_continued_from_its_next_token() -> None:
    store, api, _ = make(list(range(0, 600)), volume_gib=1)
    page = first_page(api, max_results=100)
    assert page.next_token is not None
    index = BlockIndex(RemoteSnapshots(api), "snap-01", 2048, first_page=page)
    calls = api.calls["ListSnapshotBlocks"]
    assert present(index, [0, 99, 100, 599, 600]) == [0, 99, 100, 599]
    assert api.calls["ListSnapshotBlocks"] > calls  # the rest was listed after it


def test_an_expired_page_got_earlier_is_not_used() -> None:
    store, api, _ = make([0, 1])
    store.faults.token_lifetime = 100
    page = first_page(api)
    store.faults.token_lifetime = 10**6  # pages listed from now on live long
    now = [page.expiry + 1]  # past the first page's ExpiryTime, not the later ones'
    index = BlockIndex(RemoteSnapshots(api), "snap-01", 2048, first_page=page, clock=lambda: now[0])
    calls = api.calls["ListSnapshotBlocks"]
    assert present(index, [0, 1]) == [0, 1]
    assert api.calls["ListSnapshotBlocks"] == calls + 1


def test_a_page_got_earlier_serves_only_chunk_zero() -> None:
    store, api, _ = make([*range(100), 9000], volume_gib=8)
    page = first_page(api, max_results=100)  # blocks 0-99, then a NextToken
    index = BlockIndex(
        RemoteSnapshots(api), "snap-01", 8 * 2048, chunk_blocks=8192, first_page=page
    )
    assert present(index, [9000]) == [9000]  # chunk 1 listed from its own start
    calls = api.calls["ListSnapshotBlocks"]
    assert present(index, [0, 1, 100]) == [0, 1]  # chunk 0 still starts from the page got earlier
    assert api.calls["ListSnapshotBlocks"] == calls + 1  # ...and pages on from its NextToken
