"""Byte-bounded LRU of snapshot blocks with one fetch per block in flight.

Blocks live in 1 MiB slabs of two adjacent blocks (an even index and the next), so a
1 MiB FUSE read of an aligned pair, what the kernel sends a sequential reader, is
answered with one view of one slab: no copy (docs/performance.md). The budget counts
blocks, not slabs: a slab holding one block costs one block."""

from __future__ import annotations

import mmap
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import cachetools

from ebsfs.constants import BLOCK_SIZE
from ebsfs.engine.pending import SingleFlight
from ebsfs.service.api import Block

BlockKey = tuple[str, int]
"""(snapshot id, block index)."""
SLAB_BLOCKS = 2
SLAB_SIZE = SLAB_BLOCKS * BLOCK_SIZE
SPARE_SLABS = 8
"""Evicted mappings kept for reuse: a full cache recycles memory the kernel has already
zero-filled and mapped instead of faulting in fresh pages (docs/performance.md)."""

Fetch = Callable[[memoryview | None], Awaitable[Block]]
"""Fetches one block: into the given room (its data that same view) when given room,
or as bytes of its own."""


def _new_mapping() -> mmap.mmap | None:
    """Room for one slab that nobody zeroes under the GIL: the kernel zero-fills an
    anonymous mapping's pages on first write, which is the worker thread receiving
    the body, outside the GIL, and only the half that is written ever takes memory.
    (bytearray(SLAB_SIZE) memsets 1 MiB of fresh pages on the trio thread: 23 % of the
    GIL's time in a cold read, docs/performance.md.)"""
    try:
        return mmap.mmap(-1, SLAB_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError:  # out of mappings after all: per-block bytearrays still work
        return None


def _mappings_allowed() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65530  # the kernel's default


def _unshared(buf: object) -> bool:
    """No view of `buf` is alive anywhere: only our one reference (and the call's)."""
    return sys.getrefcount(buf) <= 3


class _Slab:
    """Room for SLAB_BLOCKS adjacent blocks: one mapping for all of them (so a whole
    slab is one view), or, when mappings are scarce, a bytearray per block made when
    that block is fetched. A part is reserved while it is fetched or filled, and only
    reserved parts count against the budget. A filled part is never written again, so
    views handed out stay valid. A retired slab had a fetch abandoned while writing
    into it and never goes back into the cache, nor is its memory reused."""

    __slots__ = ("buf", "parts", "filled", "reserved", "checksums", "retired")

    def __init__(self, buf: mmap.mmap | None) -> None:
        self.buf = buf
        self.parts: list[bytearray | None] = [None] * SLAB_BLOCKS
        self.filled = [False] * SLAB_BLOCKS
        self.reserved = [False] * SLAB_BLOCKS
        self.checksums: list[str | None] = [None] * SLAB_BLOCKS
        self.retired = False

    def view(self, part: int) -> memoryview:
        if self.buf is not None:
            return memoryview(self.buf)[part * BLOCK_SIZE : (part + 1) * BLOCK_SIZE]
        room = self.parts[part]
        if room is None:
            room = self.parts[part] = bytearray(BLOCK_SIZE)
        return memoryview(room)

    @property
    def cost(self) -> int:
        return sum(self.reserved) * BLOCK_SIZE


class _SlabLru(cachetools.LRUCache[Any, _Slab]):
    """The LRU, telling the cache which slabs it evicts (to reuse their memory)."""

    def __init__(self, maxsize: int, evicted: Callable[[_Slab], None]) -> None:
        super().__init__(maxsize=maxsize, getsizeof=lambda slab: slab.cost)
        self._evicted = evicted

    def popitem(self) -> tuple[Any, _Slab]:
        key, slab = super().popitem()
        self._evicted(slab)
        return key, slab


class BlockCache:
    """Blocks by (snapshot id, index), in slabs, at most `max_bytes` of blocks.

    Concurrency rule: everything here runs on the trio thread; lookups and inserts
    happen between awaits, so they are atomic. Memory: the budget plus blocks being
    fetched that were evicted meanwhile (at most the fetch limiter's size), slabs still
    viewed by reads in flight, and SPARE_SLABS mappings kept for reuse."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        # Adjacent slab mappings merge into one, but evictions leave holes, so in the
        # worst case each slab is one of the process's limited mappings: a cache of
        # more slabs than a quarter of vm.max_map_count (16 GiB by default) uses
        # per-block bytearrays, leaving mappings for thread stacks and malloc.
        self._mapped = max_bytes // SLAB_SIZE <= _mappings_allowed() // 4
        self._lru = _SlabLru(max(max_bytes, 1), self._reuse)
        self._spare: list[mmap.mmap] = []
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
        if slab is None or slab.buf is None or not all(slab.filled):
            return None
        return memoryview(slab.buf)

    def checksum(self, key: BlockKey) -> str | None:
        """The service's checksum of a cached block, or None."""
        slab_key, part = self._slab_key(key)
        slab = self._lru.get(slab_key)
        return slab.checksums[part] if slab is not None and slab.filled[part] else None

    def _reuse(self, slab: _Slab) -> None:
        """Keep an evicted slab's mapping for the next slab, if no fetch may still
        write into it and no reader still views it."""
        buf = slab.buf
        if buf is None or slab.retired or any(r and not f for r, f in
                                              zip(slab.reserved, slab.filled, strict=True)):
            return
        slab.buf = None  # the slab object may live on in a reader; its memory may not
        if len(self._spare) < SPARE_SLABS and _unshared(buf):
            self._spare.append(buf)
        else:
            slab.buf = buf

    def _new_slab(self) -> _Slab:
        if not self._mapped:
            return _Slab(None)
        return _Slab(self._spare.pop() if self._spare else _new_mapping())

    def _account(self, slab_key: BlockKey, slab: _Slab) -> None:
        """(Re)insert a slab at its current cost, evicting others as needed; a slab
        with nothing reserved leaves the cache."""
        if self._lru.get(slab_key) is slab:
            del self._lru[slab_key]
        if slab.cost and not slab.retired:
            self._lru[slab_key] = slab

    async def _fetch_into_slab(self, key: BlockKey, fetch: Fetch) -> Block:
        """Fetch the block straight into its part of its slab (no copy on the trio
        thread) and mark it filled.

        A fetch that was cancelled may still be writing from its worker thread (reads
        that time out abandon it), so its slab is retired: out of the LRU for good, and
        no later fetch is ever given the same room (a fetch of the other half still in
        flight keeps its block, but does not bring the slab back). A fetch that failed
        has stopped writing; its slab stays."""
        if self.max_bytes < SLAB_SIZE:  # not even one slab: nothing is kept
            return await fetch(None)
        slab_key, part = self._slab_key(key)
        slab = self._lru.get(slab_key)
        if slab is None:
            slab = self._new_slab()
        slab.reserved[part] = True
        self._account(slab_key, slab)
        room = slab.view(part)
        try:
            block = await fetch(room)
        except Exception:
            slab.reserved[part] = False
            self._account(slab_key, slab)
            raise
        except BaseException:
            slab.retired = True
            if self._lru.get(slab_key) is slab:
                del self._lru[slab_key]
            raise
        if block.data is not room:
            if len(block.data) != BLOCK_SIZE:  # a block the service does not hold
                slab.reserved[part] = False
                self._account(slab_key, slab)
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
