"""Byte-bounded LRU of snapshot blocks with one fetch per block in flight.

Blocks live in 1 MiB slabs of two adjacent blocks (an even index and the next), so a
1 MiB FUSE read of an aligned pair, what the kernel sends a sequential reader, is
answered with one view of one slab: no copy (docs/performance.md)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import cachetools

from ebsfs import BLOCK_SIZE
from ebsfs.pending import SingleFlight

BlockKey = tuple[str, int]
"""(snapshot id, block index)."""
SLAB_BLOCKS = 2
SLAB_SIZE = SLAB_BLOCKS * BLOCK_SIZE


class _Slab:
    """Room for SLAB_BLOCKS adjacent blocks and which of them are filled. A filled
    part is never written again, so views handed out stay valid."""

    __slots__ = ("buf", "filled")

    def __init__(self) -> None:
        self.buf = bytearray(SLAB_SIZE)
        self.filled = [False] * SLAB_BLOCKS

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
        self._lru: cachetools.LRUCache[BlockKey, _Slab] = cachetools.LRUCache(
            maxsize=max(max_bytes, 1), getsizeof=lambda slab: SLAB_SIZE
        )
        self._flights: SingleFlight[BlockKey, bytes | memoryview] = SingleFlight()

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

    def _keep(self, key: BlockKey, data: bytes | memoryview) -> bytes | memoryview:
        if self.max_bytes < SLAB_SIZE or len(data) != BLOCK_SIZE:
            return data
        slab_key, part = self._slab_key(key)
        slab = self._lru.get(slab_key)
        if slab is None:
            slab = _Slab()
            self._lru[slab_key] = slab
        if not slab.filled[part]:
            slab.view(part)[:] = data
            slab.filled[part] = True
        return slab.view(part)

    async def get(self, key: BlockKey, fetch: Callable[[], Awaitable[bytes]]
                  ) -> bytes | memoryview:
        """The cached block, or `fetch()` once however many readers ask at once."""
        data = self.peek(key)
        if data is not None:
            return data

        async def fetch_and_keep() -> bytes | memoryview:
            return self._keep(key, await fetch())

        return await self._flights.run(key, fetch_and_keep)
