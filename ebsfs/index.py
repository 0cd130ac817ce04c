"""Block index of one snapshot: which blocks exist and their tokens, listed lazily.

The volume's index space is cut into chunks of `chunk_blocks` indexes. A chunk is
listed (ListSnapshotBlocks from its first index) the first time a read needs it, and
kept only while it is fresh and within the entry budget: memory follows what was read,
not the volume size, and a 16 TiB snapshot costs nothing until it is read.

Paging rule (see shared/ebs-direct-api.md): a page can be short or empty while a
NextToken remains, so a chain of pages started at index S proves only [S, last index
returned]; only the end of the chain (no NextToken) proves up to the end of the volume.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import cachetools

from ebsfs.errors import InvalidPageToken
from ebsfs.pending import SingleFlight
from ebsfs.remote import RemoteSnapshots

log = logging.getLogger(__name__)

CHUNK_BLOCKS = 8192
"""4 GiB of volume: a dense chunk fits one 10,000-entry page."""
MAX_ENTRIES = 262144
"""Tokens kept at the most (about 60 MB): 128 GiB of dense volume."""
MAX_EXTRA_CHUNKS = 4096
"""Chunks past the one asked for that a single listing may fill in (sparse volumes)."""


@dataclass
class _Chunk:
    tokens: dict[int, str]
    expiry: float
    listed_at: float

    def fresh(self, now: float) -> bool:
        # Refresh a little before expiry (tokens live 7 days; tests use seconds).
        margin = min(60.0, 0.1 * (self.expiry - self.listed_at))
        return now < self.expiry - margin


class BlockIndex:
    """Maps block index -> token (or None for a block never written)."""

    def __init__(
        self, remote: RemoteSnapshots, snapshot_id: str, volume_blocks: int,
        chunk_blocks: int = CHUNK_BLOCKS, max_entries: int = MAX_ENTRIES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.remote = remote
        self.snapshot_id = snapshot_id
        self.volume_blocks = volume_blocks
        self.chunk_blocks = chunk_blocks
        self.chunk_count = -(-volume_blocks // chunk_blocks)
        self._clock = clock
        self._chunks: cachetools.LRUCache[int, _Chunk] = cachetools.LRUCache(
            maxsize=max(max_entries, 2 * (chunk_blocks + 1)),
            getsizeof=lambda chunk: len(chunk.tokens) + 1,
        )
        self._loading: SingleFlight[int, _Chunk] = SingleFlight()
        self.list_calls = 0

    def chunk_of(self, index: int) -> int:
        return index // self.chunk_blocks

    async def token(self, index: int) -> str | None:
        """The token of block `index`, or None if the snapshot never wrote it."""
        if not 0 <= index < self.volume_blocks:
            raise IndexError(f"block {index} is outside the volume")
        chunk = await self._chunk(self.chunk_of(index))
        return chunk.tokens.get(index)

    def is_known(self, index: int) -> bool:
        chunk = self._chunks.get(self.chunk_of(index))
        return chunk is not None and chunk.fresh(self._clock())

    async def ensure(self, chunk_no: int) -> None:
        """List a chunk ahead of need (read-ahead of the index)."""
        if 0 <= chunk_no < self.chunk_count:
            await self._chunk(chunk_no)

    def invalidate(self, index: int) -> None:
        """Forget the chunk holding `index` (its token was refused): the next lookup
        lists it again."""
        self._chunks.pop(self.chunk_of(index), None)

    async def _chunk(self, chunk_no: int) -> _Chunk:
        chunk = self._chunks.get(chunk_no)
        if chunk is not None and chunk.fresh(self._clock()):
            return chunk
        return await self._loading.run(chunk_no, lambda: self._list_chunk(chunk_no))

    async def _list_chunk(self, chunk_no: int) -> _Chunk:
        start = chunk_no * self.chunk_blocks
        chunk_last = min(start + self.chunk_blocks, self.volume_blocks) - 1
        found: dict[int, str] = {}
        expiry = float("inf")
        listed_at = self._clock()
        position, next_token = start, None
        while True:
            try:
                page = await self.remote.list_snapshot_blocks(
                    self.snapshot_id, start_index=position, next_token=next_token
                )
            except InvalidPageToken:
                # NextTokens live 60 minutes; what was returned so far still stands.
                log.debug("%s: page token refused, listing again from %d", self.snapshot_id,
                          position)
                next_token = None
                continue
            self.list_calls += 1
            expiry = min(expiry, page.expiry)
            for index, token in page.blocks:
                found[index] = token
            if page.blocks:
                position = page.blocks[-1][0] + 1
            if page.next_token is None:
                proven_to = self.volume_blocks - 1
                break
            if page.blocks and page.blocks[-1][0] >= chunk_last:
                proven_to = page.blocks[-1][0]
                break
            next_token = page.next_token
        return self._store(chunk_no, proven_to, found, expiry, listed_at)

    def _store(
        self, chunk_no: int, proven_to: int, found: dict[int, str], expiry: float,
        listed_at: float,
    ) -> _Chunk:
        """Keep every chunk the listing proved completely, the asked-for one last
        (most recently used)."""
        if proven_to >= self.volume_blocks - 1:
            last = self.chunk_count - 1
        else:
            last = (proven_to + 1) // self.chunk_blocks - 1
        last = min(last, chunk_no + MAX_EXTRA_CHUNKS)
        by_chunk: dict[int, dict[int, str]] = {c: {} for c in range(chunk_no, last + 1)}
        for index, token in found.items():
            tokens = by_chunk.get(index // self.chunk_blocks)
            if tokens is not None:
                tokens[index] = token
        for c in range(last, chunk_no - 1, -1):
            if c != chunk_no:
                self._chunks[c] = _Chunk(by_chunk[c], expiry, listed_at)
        asked = _Chunk(by_chunk[chunk_no], expiry, listed_at)
        self._chunks[chunk_no] = asked
        return asked
