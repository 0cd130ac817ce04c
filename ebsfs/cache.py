"""Byte-bounded LRU of snapshot blocks with one fetch per block in flight."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable

import cachetools

from ebsfs.pending import SingleFlight


class BlockCache:
    """Blocks by key, at most `max_bytes` of them (cachetools.LRUCache sized by len).

    Concurrency rule: everything here runs on the trio thread; lookups and inserts
    happen between awaits, so they are atomic. Memory: the LRU's budget plus blocks
    being fetched (at most the fetch limiter's size)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._lru: cachetools.LRUCache[Hashable, bytes] = cachetools.LRUCache(
            maxsize=max(max_bytes, 1), getsizeof=len
        )
        self._flights: SingleFlight[Hashable, bytes] = SingleFlight()
        self.hits = 0
        self.misses = 0

    def __contains__(self, key: Hashable) -> bool:
        return key in self._lru

    def is_pending(self, key: Hashable) -> bool:
        return key in self._flights

    @property
    def current_bytes(self) -> int:
        return int(self._lru.currsize)

    def peek(self, key: Hashable) -> bytes | None:
        return self._lru.get(key)

    async def get(self, key: Hashable, fetch: Callable[[], Awaitable[bytes]]) -> bytes:
        """The cached block, or `fetch()` once however many readers ask at once."""
        data = self._lru.get(key)
        if data is not None:
            self.hits += 1
            return data

        async def fetch_and_keep() -> bytes:
            self.misses += 1
            value = await fetch()
            if len(value) <= self.max_bytes:
                self._lru[key] = value
            return value

        return await self._flights.run(key, fetch_and_keep)
