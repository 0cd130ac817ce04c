"""Byte-bounded LRU of snapshot blocks with one fetch per block in flight.

Blocks live in 1 MiB slabs of two adjacent blocks (an even index and the next), so a
1 MiB FUSE read of an aligned pair, what the kernel sends a sequential reader, is
answered with one view of one slab: no copy (docs/performance.md)."""

from __future__ import annotations

import mmap
from collections.abc import Awaitable, Callable

import cachetools

from ebsfs import BLOCK_SIZE
from ebsfs.api import Block
from ebsfs.pending import SingleFlight

BlockKey = tuple[str, int]
"""(snapshot id, block index)."""
SLAB_BLOCKS = 2
SLAB_SIZE = SLAB_BLOCKS * BLOCK_SIZE

Fetch = Callable[[memoryview | None], Awaitable[Block]]
"""Fetches one block: into the given room (its data that same view) when given room,
or as bytes of its own."""


def _slab_memory(mapped: bool) -> mmap.mmap | bytearray:
    """Room for one slab that nobody zeroes under the GIL: the kernel zero-fills an
    anonymous mapping's pages on first write, which is the worker thread receiving
    the body, outside the GIL. (bytearray(SLAB_SIZE) memsets 1 MiB of fresh pages on
    the trio thread: 23 % of the GIL's time in a cold read, docs/performance.md.)"""
    if mapped:
        try:
            return mmap.mmap(-1, SLAB_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except OSError:  # out of mappings after all: ordinary memory still works
            pass
    return bytearray(SLAB_SIZE)


def _mappings_allowed() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65530  # the kernel's default


class _Slab:
    """Room for SLAB_BLOCKS adjacent blocks and which of them are filled. A filled
    part is never written again, so views handed out stay valid. A retired slab had a
    fetch abandoned while writing into it and never goes back into the cache."""

    __slots__ = ("buf", "filled", "checksums", "retired")

    def __init__(self, mapped: bool) -> None:
        self.buf = _slab_memory(mapped)
        self.filled = [False] * SLAB_BLOCKS
        self.checksums: list[str | None] = [None] * SLAB_BLOCKS
        self.retired = False

    def view(self, part: int) -> memoryview:
        return memoryview(self.buf)[part * BLOCK_SIZE : (part + 1) * BLOCK_SIZE]


class BlockCache:
    """Blocks by (snapshot id, index), in slabs, at most `max_bytes` of slabs
    (cachetools.LRUCache sized by slab; a slab with one block filled counts fully, so
    random readers get half the blocks per byte that sequential ones do).

    Concurrency rule: everything here runs on the trio thread; lookups and inserts
    happen between awaits, so they are atomic. Memory: the LRU's budget plus blocks
    being fetched (at most the fetch limiter's size) plus slabs still viewed by reads
    in flight."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        # Adjacent slab mappings merge into one, but evictions leave holes, so in the
        # worst case each slab is one of the process's limited mappings: a cache of
        # more slabs than a quarter of vm.max_map_count (16 GiB by default) uses
        # ordinary memory, leaving mappings for thread stacks and malloc.
        self._mapped_slabs = max_bytes // SLAB_SIZE <= _mappings_allowed() // 4
        self._lru: cachetools.LRUCache[BlockKey, _Slab] = cachetools.LRUCache(
            maxsize=max(max_bytes, 1), getsizeof=lambda slab: SLAB_SIZE
        )
        self._flights: SingleFlight[BlockKey, Block] = SingleFlight()

    @staticmethod
    def _slab_key(key: BlockKey) -> tuple[BlockKey, int]:
        snapshot_id, index = key
        return (snapshot_id, index // SLAB_BLOCKS), index % SLAB_BLOCKS

    def __contains__(self, key: BlockKey) -> bool:
        slab_key, part = self._slab_key(key)
        slab = self._lru.get(slab_key)
        return slab is not None and slab.filled[part]

    @property
    def current_bytes(self) -> int:
        return int(self._lru.currsize)

    def peek(self, key: BlockKey) -> memoryview | None:
        """The cached block (a view), or None; counts as a use for the LRU."""
        slab_key, part = self._slab_key(key)
        slab = self._lru.get(slab_key)
        if slab is None or not slab.filled[part]:
            return None
        return slab.view(part)

    def peek_span(self, snapshot_id: str, first: int, last: int) -> memoryview | None:
        """Blocks [first, last] as one view when they are exactly one filled slab."""
        if first % SLAB_BLOCKS or last - first + 1 != SLAB_BLOCKS:
            return None
        slab = self._lru.get((snapshot_id, first // SLAB_BLOCKS))
        if slab is None or not all(slab.filled):
            return None
        return memoryview(slab.buf)

    def checksum(self, key: BlockKey) -> str | None:
        """The service's checksum of a cached block, or None."""
        slab_key, part = self._slab_key(key)
        slab = self._lru.get(slab_key)
        return slab.checksums[part] if slab is not None and slab.filled[part] else None

    async def _fetch_into_slab(self, key: BlockKey, fetch: Fetch) -> Block:
        """Fetch the block straight into its half of its slab (no copy on the trio
        thread) and mark it filled.

        A fetch that was cancelled may still be writing from its worker thread (reads
        that time out abandon it), so its slab is retired: out of the LRU for good, and
        no later fetch is ever given the same room (a fetch of the other half still in
        flight keeps its block, but does not bring the slab back). A fetch that failed
        has stopped writing; its slab stays."""
        if self.max_bytes < SLAB_SIZE:
            return await fetch(None)
        slab_key, part = self._slab_key(key)
        slab = self._lru.get(slab_key)
        if slab is None:
            slab = _Slab(self._mapped_slabs)
            self._lru[slab_key] = slab
        room = slab.view(part)
        try:
            block = await fetch(room)
        except Exception:
            raise
        except BaseException:
            slab.retired = True
            if self._lru.get(slab_key) is slab:
                del self._lru[slab_key]
            raise
        if block.data is not room:
            if len(block.data) != BLOCK_SIZE:
                return block
            room[:] = block.data
        slab.filled[part] = True
        slab.checksums[part] = block.checksum
        if not slab.retired and slab_key not in self._lru:  # evicted while fetching
            self._lru[slab_key] = slab
        return Block(room, block.checksum)

    async def get(self, key: BlockKey, fetch: Fetch) -> Block:
        """The cached block, or one fetch of it however many readers ask at once."""
        slab_key, part = self._slab_key(key)
        slab = self._lru.get(slab_key)
        if slab is not None and slab.filled[part]:
            return Block(slab.view(part), slab.checksums[part])
        return await self._flights.run(key, lambda: self._fetch_into_slab(key, fetch))
