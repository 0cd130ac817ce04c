"""The disk cache (ebsfs/diskcache) as the engine uses it, on the trio thread: loads in
worker threads, stores queued and written in batches, the counters, and the lineage of
one snapshot's blocks there."""

from __future__ import annotations

import logging
import sqlite3
import time

import trio

from ebsfs.diskcache.store import BlockKey, DiskCache, Origin, Stored, ToStore
from ebsfs.engine.cache import Loan
from ebsfs.engine.index import ChangeIndex
from ebsfs.engine.stats import Stats
from ebsfs.errors import CacheIndexFailed, EbsfsError
from ebsfs.service.api import Block

log = logging.getLogger(__name__)

WARNINGS_SHOWN = 5
"""Damaged entries warned about one by one; the rest only count (and log at -v)."""


class _Held:
    """Which blocks of one snapshot the disk cache holds, as far as this process knows:
    a bit per block, 1 KiB per 8192 blocks touched (4 GiB of volume). Loads of blocks
    not in it skip the thread hop; a load still checks everything, so a bit set wrongly
    costs a lookup, never a wrong byte."""

    CHUNK = 8192

    def __init__(self, indexes: list[int]) -> None:
        self._chunks: dict[int, bytearray] = {}
        for index in indexes:
            self.add(index)

    def add(self, index: int) -> None:
        chunk, bit = divmod(index, self.CHUNK)
        bits = self._chunks.get(chunk)
        if bits is None:
            bits = self._chunks[chunk] = bytearray(self.CHUNK // 8)
        bits[bit >> 3] |= 1 << (bit & 7)

    def discard(self, index: int) -> None:
        chunk, bit = divmod(index, self.CHUNK)
        bits = self._chunks.get(chunk)
        if bits is not None:
            bits[bit >> 3] &= ~(1 << (bit & 7)) & 0xFF

    def __contains__(self, index: int) -> bool:
        chunk, bit = divmod(index, self.CHUNK)
        bits = self._chunks.get(chunk)
        return bits is not None and bool(bits[bit >> 3] & (1 << (bit & 7)))


class DiskTier:
    """The disk cache as the engine uses it, on the trio thread: loads in worker
    threads (a few at a time: hashing is CPU work), skipped for blocks it knows are not
    there; stores queued and written in batches by one background task (`run`), so
    a fetch never waits on the disk unless the queue is full; the counters; and turned
    off for the rest of the session, with one warning, if the cache fails.

    Memory: at most `queue` blocks wait in the queue and `queue` more are being
    written (their slabs stay on loan until written: 1 MiB each at worst, 32 MiB).
    Other processes' stores are noticed every `refresh` seconds."""

    def __init__(
        self,
        cache: DiskCache,
        stats: Stats,
        max_threads: int = 4,
        queue: int = 16,
        refresh: float = 2.0,
    ) -> None:
        self.cache = cache
        self.stats = stats
        self.limiter = trio.CapacityLimiter(max_threads)
        self.enabled = True
        self.refresh = refresh
        self._full_warned = False
        self._held: dict[str, _Held] = {}
        self._send, self._receive = trio.open_memory_channel[ToStore](queue)
        self._queued: dict[BlockKey, ToStore] = {}
        self._lent: dict[int, Loan] = {}
        """By id() of a ToStore queued or being written: the loan of its slab."""
        self._batch = queue
        self._writing = False
        stats.disk_cache = self.describe

    @classmethod
    def of_api(cls, api: object, path: str, max_bytes: int, stats: Stats) -> DiskTier | None:
        """The disk cache at `path` for the blocks `api` fetches, keyed by where it
        fetches them (its `endpoint_url` and `region`), so that a snapshot id served by
        two endpoints never mixes their bytes. None, with a warning, for an api that
        does not say where (its blocks could be any server's)."""
        origin = Origin.of(api)
        if origin is None:
            log.warning(
                "disk cache %s not used: the service client (%s) does not say which "
                "endpoint its blocks come from",
                path,
                type(api).__name__,
            )
            return None
        return cls(DiskCache(path, max_bytes, origin=origin), stats)

    def track(self, snapshot_ids: list[str]) -> None:
        """Learn which blocks of these snapshots are held (blocking: at build time)."""
        for snapshot_id in snapshot_ids:
            if snapshot_id not in self._held:
                try:
                    self._held[snapshot_id] = _Held(self.cache.held(snapshot_id))
                except sqlite3.Error as err:
                    log.debug("cache index not read for %s: %s", snapshot_id, err)

    def may_hold(self, snapshot_id: str, index: int) -> bool:
        """False only when the block is known not to be held (or queued)."""
        held = self._held.get(snapshot_id)
        return held is None or index in held or (snapshot_id, index) in self._queued

    def describe(self) -> dict[str, object]:
        return {
            "path": self.cache.path,
            "used_bytes": self.cache.used_bytes,
            "limit_bytes": self.cache.limit_bytes,
            "blocks": self.cache.blocks,
            "enabled": self.enabled,
        }

    def _failed(self, err: Exception) -> None:
        """Anything the disk cache raises turns it off, never fails a read."""
        if self.enabled:
            self.enabled = False
            expected = isinstance(err, CacheIndexFailed | OSError | sqlite3.Error)
            log.warning(
                "disk cache %s turned off for this session (%s: %s); blocks are fetched instead",
                self.cache.path,
                type(err).__name__,
                err,
                exc_info=None if expected else err,
            )

    # ---- loads -----------------------------------------------------------------------

    async def load(
        self, snapshot_id: str, index: int, room: memoryview | None, lineage: bool = False
    ) -> Block | None:
        """The verified block from disk, or None (a miss, or damage: then fetch)."""
        if not self.enabled:
            return None
        queued = self._queued.get((snapshot_id, index))
        if queued is not None:  # fetched, not written yet: the same verified bytes
            self._hit(lineage)
            return Block(queued.data, queued.checksum)
        held = self._held.get(snapshot_id)
        if held is not None and index not in held:
            return None
        try:
            found = await trio.to_thread.run_sync(
                self.cache.load,
                snapshot_id,
                index,
                room,
                limiter=self.limiter,
                abandon_on_cancel=True,
            )
        except Exception as err:
            self._failed(err)
            return None
        if found.checksum is None and held is not None:
            held.discard(index)
        if found.damaged:
            self._damaged(snapshot_id, index)
            return None
        if found.checksum is None or found.data is None:
            return None
        self._hit(lineage)
        return Block(found.data, found.checksum)

    def _hit(self, lineage: bool) -> None:
        self.stats.disk_hits += 1
        if lineage:
            self.stats.lineage_hits += 1

    def _damaged(self, snapshot_id: str, index: int) -> None:
        self.stats.disk_damaged += 1
        shown = self.stats.disk_damaged
        if shown <= WARNINGS_SHOWN:
            log.warning(
                "disk cache: block %d of %s failed its SHA-256 check (damaged "
                "cache file?): dropped, fetching it again%s",
                index,
                snapshot_id,
                "; further damaged blocks are only counted (ebsfs stats)"
                if shown == WARNINGS_SHOWN
                else "",
            )
        else:
            log.info("disk cache: block %d of %s damaged: dropped", index, snapshot_id)

    # ---- stores ----------------------------------------------------------------------

    async def store(
        self, snapshot_id: str, index: int, volume_size: int, block: Block, loan: Loan | None = None
    ) -> None:
        """Queue a verified block for the writer (waiting only while the queue is
        full); without a writer running, write it now. `loan` (of the memory cache's
        slab the data is a view of) is given back once the block is written."""
        if not self.enabled or block.checksum is None:
            if loan is not None:
                loan.give_back()
            return
        item = ToStore(snapshot_id, index, volume_size, block.data, block.checksum)
        if loan is not None:
            self._lent[id(item)] = loan
        if not self._writing:
            await self._write_batch([item])
            return
        key = (snapshot_id, index)
        self._queued[key] = item
        try:
            await self._send.send(item)
        except BaseException:
            self._queued.pop(key, None)
            self._give_back(item)
            raise

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write queued blocks in batches, and every few seconds learn what other
        processes stored and write down the uses of blocks read (LRU order)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._refresher)
            self._writing = True
            task_status.started()
            try:
                async for first in self._receive:
                    batch = [first]
                    while len(batch) < self._batch:
                        try:
                            batch.append(self._receive.receive_nowait())
                        except trio.WouldBlock:
                            break
                    with trio.CancelScope(shield=True):  # finish what was taken
                        await self._write_batch(batch)
            finally:
                self._writing = False

    async def _write_batch(self, batch: list[ToStore]) -> None:
        try:
            if self.enabled:
                result = await trio.to_thread.run_sync(self.cache.store_many, batch)
                self._count(result)
        except Exception as err:
            self._failed(err)
        finally:
            for item in batch:
                key = (item.snapshot_id, item.index)
                if self._queued.get(key) is item:
                    del self._queued[key]
                self._give_back(item)

    def _give_back(self, item: ToStore) -> None:
        loan = self._lent.pop(id(item), None)
        if loan is not None:
            loan.give_back()

    def _count(self, result: Stored) -> None:
        self.stats.disk_stored += len(result.stored)
        self.stats.disk_evicted += len(result.evicted) + result.evicted_elsewhere
        for snapshot_id, index in result.evicted:
            held = self._held.get(snapshot_id)
            if held is not None:
                held.discard(index)
        for snapshot_id, index in result.stored + result.present:
            held = self._held.get(snapshot_id)
            if held is not None:
                held.add(index)
        if result.full and not self._full_warned:
            self._full_warned = True
            log.warning(
                "disk cache %s: its filesystem is full; blocks that do not fit are "
                "not kept (reads go on)",
                self.cache.path,
            )

    async def _refresher(self) -> None:
        since = time.time()
        while True:
            await trio.sleep(self.refresh)
            if not self.enabled:
                continue
            now = time.time()
            try:
                found = await trio.to_thread.run_sync(self._refresh, since - 5.0)
            except Exception as err:
                self._failed(err)
                continue
            since = now
            for snapshot_id, index in found:
                self._held[snapshot_id].add(index)

    def _refresh(self, since: float) -> list[BlockKey]:
        self.cache.flush_touches()
        return self.cache.held_since(list(self._held), since)

    def close(self) -> None:
        """Write what is still queued, then close the cache (after the loop ended)."""
        batch = []
        while True:
            try:
                batch.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
        if batch and self.enabled:
            try:
                self._count(self.cache.store_many(batch))
            except Exception as err:
                self._failed(err)
        self._queued.clear()
        for loan in self._lent.values():
            loan.give_back()
        self._lent.clear()
        self.cache.close()


class DiskView:
    """One snapshot's blocks in the disk cache, and its lineage there: blocks that
    ListChangedBlocks says did not change since an earlier snapshot in the cache are
    served from that snapshot's entries."""

    def __init__(
        self,
        tier: DiskTier,
        snapshot_id: str,
        volume_size: int,
        bases: list[tuple[str, ChangeIndex]] | None = None,
    ) -> None:
        self.tier = tier
        self.snapshot_id = snapshot_id
        self.volume_size = volume_size
        self.bases = bases or []
        self._from_disk = _Held([])
        tier.track([snapshot_id, *(base_id for base_id, _ in self.bases)])

    def served_from_disk(self, index: int) -> bool:
        """Whether the block's bytes, as last obtained, came from the disk cache (stored
        in an earlier session or by another process) rather than fetched: for records
        of custody (`ebsfs get`)."""
        return index in self._from_disk

    async def load(self, index: int, room: memoryview | None) -> Block | None:
        block = await self._load(index, room)
        if block is not None:
            self._from_disk.add(index)
        return block

    async def _load(self, index: int, room: memoryview | None) -> Block | None:
        block = await self.tier.load(self.snapshot_id, index, room)
        if block is not None or not self.tier.enabled:
            return block
        for base_id, changes in self.bases:
            if not self.tier.may_hold(base_id, index):
                continue  # no list call for a block the base does not have here
            try:
                if await changes.changed(index):
                    continue
            except EbsfsError as err:  # no reuse for this block: fetch it
                log.debug(
                    "%s: changes since %s not known for block %d: %s",
                    self.snapshot_id,
                    base_id,
                    index,
                    err,
                )
                continue
            block = await self.tier.load(base_id, index, room, lineage=True)
            if block is not None:
                return block
        return None

    async def store(self, index: int, block: Block, loan: Loan | None = None) -> None:
        """Keep a block just fetched (so it no longer counts as served from disk)."""
        self._from_disk.discard(index)
        await self.tier.store(self.snapshot_id, index, self.volume_size, block, loan)
