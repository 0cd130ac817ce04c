"""Lazily listed block indexes: which blocks a snapshot holds (ListSnapshotBlocks) and
which differ between two snapshots (ListChangedBlocks).

The volume's index space is cut into chunks of `chunk_blocks` indexes. A chunk is
listed (ListSnapshotBlocks from its first index) the first time a read needs it, and
kept only while it is fresh and within the entry budget: memory follows what was read,
not the volume size, and a 16 TiB snapshot costs nothing until it is read.

Paging rule (see shared/ebs-direct-api.md): a page can be short or empty while a
NextToken remains, so a chain of pages started at index S proves only [S, last index
returned]; only the end of the chain (no NextToken) proves up to the end of the volume.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import cachetools

from ebsfs.engine.pending import SingleFlight
from ebsfs.engine.remote import RemoteSnapshots
from ebsfs.errors import InvalidPageToken, ServiceError
from ebsfs.service.api import BlockPage, ChangedBlock

log = logging.getLogger(__name__)

CHUNK_BLOCKS = 8192
"""4 GiB of volume: a dense chunk fits one 10,000-entry page."""
MAX_ENTRIES = 262144
"""Tokens kept at the most (about 60 MB): 128 GiB of dense volume."""
MAX_EXTRA_CHUNKS = 4096
"""Chunks past the one asked for that a single listing may fill in (sparse volumes)."""
MAX_IDLE_PAGES = 10000
"""Pages in a row bringing no new entry (empty pages, refused NextTokens) after which a
listing is given up as not advancing. The service does return runs of empty pages,
ListChangedBlocks above all; 10,000 of them is 200 s at its quota of 50 list calls a
second (if each scans as few as 10,000 indexes, they cover a 48 TiB gap). Not a bound on
pages that bring entries: those advance through a volume of known size."""


V = TypeVar("V")
Page = tuple[list[tuple[int, V]], str | None, float]
"""(entries as (block index, value) ascending, NextToken, expiry)."""
PageFetcher = Callable[[int, str | None], Awaitable[Page[V]]]
"""(StartingBlockIndex, NextToken) -> one page."""


async def pages(
    fetch_page: PageFetcher[V],
    start: int,
    name: str,
    first: Page[V] | None = None,
    max_idle: int | None = None,
) -> AsyncGenerator[Page[V], None]:
    """Pages from `start` on, to the end of the listing unless the caller stops early.
    A NextToken that expired (they live 60 minutes) restarts the listing just past the
    last index returned, so nothing is missed or repeated. The one paging loop of ebsfs:
    the block and change indexes and `ebsfs diff` all use it. `first`, when given, is
    the page from `start` got earlier: it is used instead of asking again.

    The service is not trusted to end its listing: entries at or below an index
    already listed (repeats, disorder) are dropped, and a listing that brings nothing
    new for `max_idle` pages in a row (MAX_IDLE_PAGES), or hands back the NextToken
    it was given with nothing new, fails with a ServiceError instead of paging forever."""
    limit = MAX_IDLE_PAGES if max_idle is None else max_idle
    position, next_token = start, None
    idle = 0
    while True:
        if idle > limit:
            raise ServiceError(
                f"{name}: {idle} pages in a row from the service listed nothing new: "
                "its listing does not advance"
            )
        try:
            if first is not None:
                (entries, page_token, expiry), first = first, None
            else:
                entries, page_token, expiry = await fetch_page(position, next_token)
        except InvalidPageToken:
            if next_token is None:
                raise
            log.debug("%s: page token refused, listing again from %d", name, position)
            next_token = None
            idle += 1
            continue
        entries = _advancing(entries, position)
        if not entries and page_token is not None and page_token == next_token:
            raise ServiceError(
                f"{name}: the service answered a page with nothing new and the NextToken "
                "it was given: its listing does not advance"
            )
        yield entries, page_token, expiry
        if entries:
            position = entries[-1][0] + 1
            idle = 0
        else:
            idle += 1
        if page_token is None:
            return
        next_token = page_token


def _advancing(entries: list[tuple[int, V]], position: int) -> list[tuple[int, V]]:
    """`entries` without any at an index below `position` or not above the one before
    (the service lists ascending; repeats and disorder from a broken or hostile one
    are dropped, so every entry kept moves the listing on)."""
    last = position - 1
    for index, _ in entries:
        if index <= last:
            break
        last = index
    else:
        return entries
    kept: list[tuple[int, V]] = []
    last = position - 1
    for entry in entries:
        if entry[0] > last:
            kept.append(entry)
            last = entry[0]
    return kept


def change_pages(
    remote: RemoteSnapshots, first_id: str, second_id: str
) -> PageFetcher[ChangedBlock]:
    """ListChangedBlocks as a PageFetcher."""

    async def fetch(start: int, next_token: str | None) -> Page[ChangedBlock]:
        page = await remote.list_changed_blocks(
            first_id, second_id, start_index=start, next_token=next_token
        )
        return [(c.index, c) for c in page.changes], page.next_token, page.expiry

    return fetch


@dataclass
class _Chunk(Generic[V]):
    tokens: dict[int, V]
    expiry: float
    listed_at: float
    _order: list[int] | None = None

    @property
    def order(self) -> list[int]:
        """The listed indexes, ascending (made when first needed: read-ahead)."""
        if self._order is None:
            self._order = sorted(self.tokens)
        return self._order

    def fresh(self, now: float) -> bool:
        return _fresh(self.expiry, self.listed_at, now)


def _fresh(expiry: float, listed_at: float, now: float) -> bool:
    """Tokens listed at `listed_at` and expiring at `expiry` still usable `now`: a
    little before expiry they are not (tokens live 7 days; tests use seconds)."""
    margin = min(60.0, 0.1 * (expiry - listed_at))
    return now < expiry - margin


class ChunkedIndex(Generic[V]):
    """Maps block index -> the value a listing gave for it (None: not listed).

    With `keeps_map` (the block index), which indexes each listed chunk holds is also
    kept as a bitmap (1 KiB a chunk, kept when the chunk's tokens are evicted: 4 MiB
    for a fully listed 16 TiB volume), so `listed_bytes` can tell how much of any
    range the snapshot wrote without listing again."""

    keeps_map = False

    def __init__(
        self,
        fetch_page: PageFetcher[V],
        name: str,
        volume_blocks: int,
        chunk_blocks: int = CHUNK_BLOCKS,
        max_entries: int = MAX_ENTRIES,
        clock: Callable[[], float] = time.time,
        first_page: Page[V] | None = None,
    ) -> None:
        """`first_page`: the listing's page from block 0, got earlier (the checks
        before a mount): the first listing of chunk 0 starts from it."""
        self._fetch_page = fetch_page
        self._first_page = first_page
        self.name = name
        self.volume_blocks = volume_blocks
        self.chunk_blocks = chunk_blocks
        self.chunk_count = -(-volume_blocks // chunk_blocks)
        self._clock = clock
        self._chunks: cachetools.LRUCache[int, _Chunk[V]] = cachetools.LRUCache(
            maxsize=max(max_entries, 2 * (chunk_blocks + 1)),
            getsizeof=lambda chunk: len(chunk.tokens) + 1,
        )
        self._loading: SingleFlight[int, _Chunk[V]] = SingleFlight()
        self.list_calls = 0
        self._maps: dict[int, int] = {}
        """Chunk -> bitmap of the indexes listed in it (bit i: chunk start + i)."""
        if first_page is not None and self.keeps_map:
            entries, token, _ = first_page
            done = self.volume_blocks - 1 if token is None else entries[-1][0] if entries else -1
            by_chunk: dict[int, list[int]] = {}
            for index, _ in entries:
                if 0 <= index <= done:
                    by_chunk.setdefault(index // chunk_blocks, []).append(index)
            for c in range(
                0, (done + 1) // chunk_blocks if token is not None else self.chunk_count
            ):
                self._map(c, by_chunk.get(c, ()))

    def _map(self, chunk_no: int, indexes: Iterable[int]) -> None:
        """Note which indexes the listing of a whole chunk returned."""
        if not self.keeps_map:
            return
        base = chunk_no * self.chunk_blocks
        bits = 0
        for index in indexes:
            bits |= 1 << (index - base)
        self._maps[chunk_no] = bits

    def listed_bytes(self, start: int, end: int, block_size: int) -> int:
        """Bytes of [start, end) in blocks the listings returned, counting every block
        of a chunk not listed yet as returned: never less than the truth, exact once
        the range's chunks were listed. No call."""
        if end <= start:
            return 0
        first, last = start // block_size, (end - 1) // block_size
        total = 0
        for c in range(self.chunk_of(first), self.chunk_of(last) + 1):
            base = c * self.chunk_blocks
            lo, hi = max(first, base), min(last, base + self.chunk_blocks - 1)
            bits = self._maps.get(c)
            if bits is None:
                total += hi - lo + 1
            else:
                total += ((bits >> (lo - base)) & ((1 << (hi - lo + 1)) - 1)).bit_count()
        total *= block_size
        if self._counted(first):
            total -= start - first * block_size
        if self._counted(last):
            total -= (last + 1) * block_size - end
        return total

    def _counted(self, index: int) -> bool:
        bits = self._maps.get(self.chunk_of(index))
        return bits is None or bool(bits >> (index - self.chunk_of(index) * self.chunk_blocks) & 1)

    def chunk_of(self, index: int) -> int:
        return index // self.chunk_blocks

    async def get(self, index: int) -> V | None:
        """The listed value for block `index`, or None if no listing returns it."""
        if not 0 <= index < self.volume_blocks:
            raise IndexError(f"block {index} is outside the volume")
        chunk = await self._chunk(self.chunk_of(index))
        return chunk.tokens.get(index)

    def peek(self, index: int) -> tuple[bool, V | None]:
        """(True, value) when the answer is at hand without a call, else (False, None)."""
        chunk = self._chunks.get(self.chunk_of(index))
        if chunk is None or not chunk.fresh(self._clock()):
            return False, None
        return True, chunk.tokens.get(index)

    def next_listed(self, index: int) -> tuple[int | None, bool]:
        """Without a call: (the first listed index >= `index` in its chunk, or None if
        there is none up to the chunk's end; True), or (index, False) when that chunk
        is not at hand. Lets read-ahead skip runs of absent blocks at no cost."""
        chunk = self._chunks.get(self.chunk_of(index))
        if chunk is None or not chunk.fresh(self._clock()):
            return index, False
        order = chunk.order
        at = bisect.bisect_left(order, index)
        return (order[at] if at < len(order) else None), True

    def at_hand(self, chunk_no: int) -> bool:
        """The chunk is listed and fresh, or being listed now."""
        chunk = self._chunks.get(chunk_no)
        return (chunk is not None and chunk.fresh(self._clock())) or chunk_no in self._loading

    async def listed(self, chunk_no: int) -> list[int]:
        """The indexes listed in one chunk, ascending (sorted once per listing: a caller
        may bisect it many times at no cost). Not to be changed."""
        return (await self._chunk(chunk_no)).order

    async def chunk_items(self, chunk_no: int) -> list[tuple[int, V]]:
        """Every (index, value) listed in one chunk, ascending."""
        chunk = await self._chunk(chunk_no)
        return sorted(chunk.tokens.items())

    def now(self) -> float:
        """The index's clock (listing times are on it)."""
        return self._clock()

    def invalidate(self, index: int, refused: V | None = None, sent: float | None = None) -> None:
        """Forget the chunk holding `index` (its token was refused): the next lookup
        lists it again. With `refused` and `sent` (when the refused call was sent, on
        `now()`'s clock): not if the chunk holds another token from a listing begun
        after that call was sent, i.e. one newer than whatever renewed the tokens under
        it. Concurrent refusals of one listing's tokens must not each list again (each
        listing renews the tokens, refusing the others' calls, in a loop where the
        service renews tokens on every listing); but a listing older than the refused
        call may be stale in the same way, and is dropped."""
        chunk_no = self.chunk_of(index)
        chunk = self._chunks.get(chunk_no)
        if (
            chunk is not None
            and refused is not None
            and chunk.tokens.get(index) != refused
            and (sent is None or chunk.listed_at >= sent)
        ):
            return
        self._chunks.pop(chunk_no, None)

    async def _chunk(self, chunk_no: int) -> _Chunk[V]:
        chunk = self._chunks.get(chunk_no)
        if chunk is not None:
            if chunk.fresh(self._clock()):
                return chunk
            log.debug("%s: tokens of chunk %d near expiry, listing again", self.name, chunk_no)
        return await self._loading.run(chunk_no, lambda: self._list_chunk(chunk_no))

    async def _list_chunk(self, chunk_no: int) -> _Chunk[V]:
        start = chunk_no * self.chunk_blocks
        chunk_last = min(start + self.chunk_blocks, self.volume_blocks) - 1
        found: dict[int, V] = {}
        expiry = float("inf")
        listed_at = self._clock()
        proven_to = start - 1
        first = None
        if start == 0 and self._first_page is not None:
            first, self._first_page = self._first_page, None
            if not _fresh(first[2], listed_at, self._clock()):
                first = None  # its tokens are (nearly) expired: list again
        given = first is not None  # that page was a call of its own, counted by its maker
        async with aclosing(pages(self._fetch_page, start, self.name, first)) as listing:
            async for entries, page_token, page_expiry in listing:
                if not given:
                    self.list_calls += 1
                given = False
                expiry = min(expiry, page_expiry)
                for index, value in entries:
                    found[index] = value
                if page_token is None:
                    proven_to = self.volume_blocks - 1
                    break
                if entries and entries[-1][0] >= chunk_last:
                    proven_to = entries[-1][0]
                    break
        return self._store(chunk_no, proven_to, found, expiry, listed_at)

    def _store(
        self,
        chunk_no: int,
        proven_to: int,
        found: dict[int, V],
        expiry: float,
        listed_at: float,
    ) -> _Chunk[V]:
        """Keep every chunk the listing proved completely, the asked-for one last
        (most recently used)."""
        if proven_to >= self.volume_blocks - 1:
            last = self.chunk_count - 1
        else:
            last = (proven_to + 1) // self.chunk_blocks - 1
        last = min(last, chunk_no + MAX_EXTRA_CHUNKS)
        by_chunk: dict[int, dict[int, V]] = {c: {} for c in range(chunk_no, last + 1)}
        for index, token in found.items():
            tokens = by_chunk.get(index // self.chunk_blocks)
            if tokens is not None:
                tokens[index] = token
        for c in range(last, chunk_no - 1, -1):
            self._map(c, by_chunk[c])
            if c != chunk_no:
                self._chunks[c] = _Chunk(by_chunk[c], expiry, listed_at)
        asked = _Chunk(by_chunk[chunk_no], expiry, listed_at)
        self._chunks[chunk_no] = asked
        return asked


class BlockIndex(ChunkedIndex[str]):
    """Block index -> token, or None for a block the snapshot never wrote."""

    keeps_map = True

    def __init__(
        self,
        remote: RemoteSnapshots,
        snapshot_id: str,
        volume_blocks: int,
        first_page: BlockPage | None = None,
        **kw: Any,
    ) -> None:
        async def fetch(start: int, next_token: str | None) -> Page[str]:
            page = await remote.list_snapshot_blocks(
                snapshot_id, start_index=start, next_token=next_token
            )
            return page.blocks, page.next_token, page.expiry

        first = (
            None
            if first_page is None
            else (first_page.blocks, first_page.next_token, first_page.expiry)
        )
        super().__init__(fetch, snapshot_id, volume_blocks, first_page=first, **kw)
        self.snapshot_id = snapshot_id

    async def token(self, index: int) -> str | None:
        return await self.get(index)


class ChangeIndex(ChunkedIndex[ChangedBlock]):
    """Block index -> how it changed between two snapshots of one lineage, or None
    where the two hold the same data."""

    def __init__(
        self, remote: RemoteSnapshots, first_id: str, second_id: str, volume_blocks: int, **kw: Any
    ) -> None:
        super().__init__(
            change_pages(remote, first_id, second_id),
            f"{first_id}..{second_id}",
            volume_blocks,
            **kw,
        )

    async def changed(self, index: int) -> bool:
        return await self.get(index) is not None
