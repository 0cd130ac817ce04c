"""Byte-bounded LRU of snapshot blocks with one fetch per block in flight.

Blocks live in 1 MiB slabs of two adjacent blocks (an even index and the next), so a
1 MiB FUSE read of an aligned pair, what the kernel sends a sequential reader, is
answered with one view of one slab: no copy (docs/performance.md). The budget counts
blocks, not slabs: a slab holding one block costs one block.

Views handed out are accounted for, not guessed from reference counts: every method
that returns a view of a slab puts the slab on the caller's `Loan`, and an evicted
slab's memory is reused only when no loan holds it and no view went out without one."""

from __future__ import annotations

import mmap
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


class Loan:
    """The slabs one holder has views of. Until the loan is given back (`give_back`,
    or the end of its `with` block) no memory of them is reused, so the views stay
    exactly as they were. A view handed out with no loan keeps its slab's memory from
    reuse for good (freed once evicted and unviewed, never recycled): a forgotten loan
    costs page faults, never a wrong byte. Trio thread only, like the cache."""

    __slots__ = ("_slabs",)

    def __init__(self) -> None:
        self._slabs: list[_Slab] = []

    def add(self, slab: _Slab) -> None:
        slab.lent += 1
        self._slabs.append(slab)

    def share(self) -> Loan:
        """Another loan of the same slabs, for a holder that keeps the views longer
        (the disk cache's write queue)."""
        other = Loan()
        for slab in self._slabs:
            other.add(slab)
        return other

    def give_back(self) -> None:
        for slab in self._slabs:
            slab.lent -= 1
        self._slabs.clear()

    def __len__(self) -> int:
        return len(self._slabs)

    def __enter__(self) -> Loan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.give_back()


class ReplyLoans:
    """Loans for reads whose views are used after the reading coroutine returns:
    pyfuse3 sends a read's reply from the returned buffer as soon as the handler
    returns, before any other task runs. So the loans of the reads answered so far are
    given back when the next read takes one, and reused (no allocation per read)."""

    def __init__(self) -> None:
        self._answered: list[Loan] = []
        self._free: list[Loan] = []

    def take(self) -> Loan:
        if self._answered:
            for loan in self._answered:
                loan.give_back()
            self._free += self._answered
            self._answered.clear()
        return self._free.pop() if self._free else Loan()

    def answered(self, loan: Loan) -> None:
        """The read that took `loan` returned: its reply is sent before anything else."""
        self._answered.append(loan)


Fetch = Callable[[memoryview | None, Loan], Awaitable[Block]]
"""Fetches one block: into the given room (its data that same view) when given room,
or as bytes of its own. The room is on the given loan while the fetch runs; a fetch
that hands it to a holder that keeps it longer gives that holder `loan.share()`."""


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


class _Slab:
    """Room for SLAB_BLOCKS adjacent blocks: one mapping for all of them (so a whole
    slab is one view), or, when mappings are scarce, a bytearray per block made when
    that block is fetched. A part is reserved while it is fetched or filled, and only
    reserved parts count against the budget. A filled part is never written again, so
    views handed out stay valid. A retired slab had a fetch abandoned while writing
    into it and never goes back into the cache, nor is its memory reused; nor is the
    memory of a slab that loans still hold (`lent`) or that was viewed with no loan
    (`kept`)."""

    __slots__ = (
        "buf",
        "parts",
        "filled",
        "reserved",
        "checksums",
        "retired",
        "lent",
        "kept",
        "recycled",
    )

    def __init__(self, buf: mmap.mmap | None) -> None:
        self.buf = buf
        self.parts: list[bytearray | None] = [None] * SLAB_BLOCKS
        self.filled = [False] * SLAB_BLOCKS
        self.reserved = [False] * SLAB_BLOCKS
        self.checksums: list[str | None] = [None] * SLAB_BLOCKS
        self.retired = False
        self.lent = 0
        self.kept = False
        self.recycled = False

    def lend(self, part: int, loan: Loan | None) -> memoryview:
        """A view of one part, on `loan` (or kept out for good with none)."""
        if loan is None:
            self.kept = True
        else:
            loan.add(self)
        return self.view(part)

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


_Fetched = tuple[Block, _Slab | None]
"""A fetch's block and the slab its data is a view of (None: bytes of its own)."""


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
    on loan or viewed, and SPARE_SLABS mappings kept for reuse."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        # Adjacent slab mappings merge into one, but evictions leave holes, so in the
        # worst case each slab is one of the process's limited mappings: a cache of
        # more slabs than a quarter of vm.max_map_count (16 GiB by default) uses
        # per-block bytearrays, leaving mappings for thread stacks and malloc.
        self._mapped = max_bytes // SLAB_SIZE <= _mappings_allowed() // 4
        self._lru = _SlabLru(max(max_bytes, 1), self._reuse)
        self._spare: list[mmap.mmap] = []
        self._flights: SingleFlight[BlockKey, _Fetched] = SingleFlight()
        self.recycled = 0
        """Slabs made in an evicted slab's memory (a full cache faults in no new pages)."""

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

    def peek(self, key: BlockKey, loan: Loan | None) -> memoryview | None:
        """The cached block (a view on `loan`), or None; counts as a use for the LRU."""
        slab_key, part = self._slab_key(key)
        slab = self._lru.get(slab_key)
        if slab is None or not slab.filled[part]:
            return None
        return slab.lend(part, loan)

    def peek_span(
        self, snapshot_id: str, first: int, last: int, loan: Loan | None
    ) -> memoryview | None:
        """Blocks [first, last] as one view (on `loan`) when they are exactly one filled
        slab."""
        if first % SLAB_BLOCKS or last - first + 1 != SLAB_BLOCKS:
            return None
        slab = self._lru.get((snapshot_id, first // SLAB_BLOCKS))
        if slab is None or slab.buf is None or not all(slab.filled):
            return None
        if loan is None:
            slab.kept = True
        else:
            loan.add(slab)
        return memoryview(slab.buf)

    def checksum(self, key: BlockKey) -> str | None:
        """The service's checksum of a cached block, or None."""
        slab_key, part = self._slab_key(key)
        slab = self._lru.get(slab_key)
        return slab.checksums[part] if slab is not None and slab.filled[part] else None

    def _reuse(self, slab: _Slab) -> None:
        """Keep an evicted slab's mapping for the next slab when nothing can read or
        write it any more: no loan holds it (a fetch's room is on loan too), no view
        went out without one, and no abandoned fetch may still write into it."""
        buf = slab.buf
        if buf is None or slab.lent or slab.kept or slab.retired or len(self._spare) >= SPARE_SLABS:
            return
        slab.buf = None  # the slab object may live on in a given-back loan; its memory may not
        slab.recycled = True
        self._spare.append(buf)

    def _new_slab(self) -> _Slab:
        if not self._mapped:
            return _Slab(None)
        if self._spare:
            self.recycled += 1
            return _Slab(self._spare.pop())
        return _Slab(_new_mapping())

    def _account(self, slab_key: BlockKey, slab: _Slab) -> None:
        """(Re)insert a slab at its current cost, evicting others as needed; a slab
        with nothing reserved leaves the cache."""
        if self._lru.get(slab_key) is slab:
            del self._lru[slab_key]
        if slab.cost and not slab.retired:
            self._lru[slab_key] = slab

    async def _fetch_into_slab(self, key: BlockKey, fetch: Fetch) -> _Fetched:
        """Fetch the block straight into its part of its slab (no copy on the trio
        thread) and mark it filled. Returns the block and the slab whose memory its
        data is (None: bytes of its own, not cached).

        A fetch that was cancelled may still be writing from its worker thread (reads
        that time out abandon it), so its slab is retired: out of the LRU for good, and
        no later fetch is ever given the same room (a fetch of the other half still in
        flight keeps its block, but does not bring the slab back). A fetch that failed
        has stopped writing; its slab stays."""
        if self.max_bytes < SLAB_SIZE:  # not even one slab: nothing is kept
            return await fetch(None, Loan()), None
        slab_key, part = self._slab_key(key)
        slab = self._lru.get(slab_key)
        if slab is None:
            slab = self._new_slab()
        slab.reserved[part] = True
        self._account(slab_key, slab)
        with Loan() as fetching:  # the room is the fetch's while it runs
            room = slab.lend(part, fetching)
            try:
                block = await fetch(room, fetching)
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
                return block, None
            room[:] = block.data
        slab.filled[part] = True
        slab.checksums[part] = block.checksum
        if not slab.retired and slab_key not in self._lru:  # evicted while fetching
            self._lru[slab_key] = slab
        return Block(room, block.checksum), slab

    async def get(self, key: BlockKey, fetch: Fetch, loan: Loan | None) -> Block:
        """The cached block, or one fetch of it however many readers ask at once; a
        view of a slab is on `loan`."""
        slab_key, part = self._slab_key(key)
        while True:
            slab = self._lru.get(slab_key)
            if slab is not None and slab.filled[part]:
                return Block(slab.lend(part, loan), slab.checksums[part])
            block, slab = await self._flights.run(key, lambda: self._fetch_into_slab(key, fetch))
            if slab is None:
                return block
            # Whoever ran the fetch gets here with no await since; a reader that waited
            # for it may find the slab evicted and its memory recycled meanwhile.
            if not slab.recycled:
                return Block(slab.lend(part, loan), block.checksum)
