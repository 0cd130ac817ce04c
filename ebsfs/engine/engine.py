"""The read engine: the one place that builds index, cache, fetches, read-ahead and
lineage sharing from options. Every face (the FUSE mount, the CLI's commands, the
Python file object) is a thin user of it; none wires these parts itself. FUSE-free.

Two ways to drive it: inside a trio loop of your own (the mount: start `Engine.run` in
a nursery), or `EngineThread`, which owns a trio loop in a thread of its own and lets
any thread call in (the Python face)."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

from ebsfs.constants import BLOCK_SIZE
from ebsfs.engine.cache import BlockCache
from ebsfs.engine.config import EngineConfig, fetch_ceiling, metadata_budget
from ebsfs.engine.diff import Diff, diff_snapshots
from ebsfs.engine.disktier import DiskTier, DiskView
from ebsfs.engine.hedge import Hedger
from ebsfs.engine.image import SnapshotImage
from ebsfs.engine.index import BlockIndex, ChangeIndex
from ebsfs.engine.metaprefetch import MetadataPrefetch
from ebsfs.engine.partitions import Partition, find_partitions
from ebsfs.engine.plan import Plan, plan, with_options
from ebsfs.engine.prefetch import Readahead
from ebsfs.engine.remote import RemoteSnapshots
from ebsfs.engine.stats import Stats
from ebsfs.errors import EbsfsError, PartitionTableError
from ebsfs.service.api import Block, BlockPage, EbsApi
from ebsfs.service.client import BotoEbsApi

log = logging.getLogger(__name__)
T = TypeVar("T")


class Engine:
    """Snapshot images over one shared cache, fetch limiter and read-ahead runner, with
    unchanged blocks of later snapshots served through their base's cache entries, and
    a disk cache behind the memory one when asked for.

    Concurrency rule: everything but construction runs on one trio loop; `run` must be
    going in that loop for read-ahead to happen (reads work without it). `close` once
    done with it (the disk cache's last writes)."""

    def __init__(
        self,
        api: EbsApi,
        config: EngineConfig,
        snapshots: list[tuple[str, int]],
        bases: dict[str, str] | None = None,
        disk_bases: dict[str, list[str]] | None = None,
        stats: Stats | None = None,
        first_pages: dict[str, BlockPage] | None = None,
        first_blocks: dict[str, dict[int, Block]] | None = None,
    ) -> None:
        """`first_pages`, `first_blocks`: ListSnapshotBlocks pages from block 0 and
        the blocks that the checks got (plan.py), used instead of asking again."""
        self.api = api
        self.config = config
        self.stats = stats or Stats()
        # Only calls that can be ended from outside are hedged: the direct GET path's
        # (boto3's cannot, and a fake api has no path to say).
        hedger = None
        if config.hedge and getattr(api, "why_not_direct", "") is None:
            hedger = Hedger(throttles=lambda: api.get_throttles)
        self.remote = RemoteSnapshots(api, max_fetches=fetch_ceiling(config), hedger=hedger)
        if hedger is not None:
            self.stats.hedging = hedger.report
        connections = getattr(api, "connections", None)
        if callable(connections):
            self.stats.connections = connections
        self.cache = BlockCache(config.cache_size)
        self.disk: DiskTier | None = None
        if config.cache_dir is not None:
            self.disk = DiskTier.of_api(api, config.cache_dir, config.cache_dir_size, self.stats)
        self.readahead = Readahead()
        # Read-ahead may hold at most a quarter of the cache, so prefetched blocks are not
        # evicted by other prefetches before the reader gets to them.
        window = max(1, min(config.max_fetches, config.cache_size // 4 // BLOCK_SIZE))
        self._window = window
        self.images: dict[str, SnapshotImage] = {}
        self._add_images(snapshots, bases, disk_bases, first_pages, first_blocks)
        self._partitions: dict[str, list[Partition]] = {}
        self.metadata: MetadataPrefetch | None = None
        """The metadata prefetch, None when it is off; faces tell it of reads."""
        if config.prefetch_metadata:
            self.metadata = MetadataPrefetch(
                budget=metadata_budget(config),
                fetch_limiter=self.remote.fetch_limiter,
                read_timeout=config.read_timeout,
                partitions=self.partitions,
                known_partitions=self.known_partitions,
                stats=self.stats,
            )

    def _add_images(
        self,
        snapshots: list[tuple[str, int]],
        bases: dict[str, str] | None,
        disk_bases: dict[str, list[str]] | None,
        first_pages: dict[str, BlockPage] | None,
        first_blocks: dict[str, dict[int, Block]] | None,
    ) -> None:
        """An image for each snapshot, sharing with its base (an image of this engine)."""
        for snapshot_id, size in snapshots:
            blocks = -(-size // BLOCK_SIZE)
            disk = None
            if self.disk is not None:
                disk = DiskView(
                    self.disk,
                    snapshot_id,
                    size,
                    [
                        (first, ChangeIndex(self.remote, first, snapshot_id, blocks))
                        for first in (disk_bases or {}).get(snapshot_id, [])
                    ],
                )
            self.images[snapshot_id] = SnapshotImage(
                snapshot_id,
                size,
                BlockIndex(
                    self.remote,
                    snapshot_id,
                    blocks,
                    first_page=(first_pages or {}).get(snapshot_id),
                ),
                self.cache,
                self.remote,
                self.readahead,
                read_timeout=self.config.read_timeout,
                max_window=self._window,
                disk=disk,
                stats=self.stats,
                first_blocks=(first_blocks or {}).get(snapshot_id),
            )
        added = {snapshot_id for snapshot_id, _ in snapshots}
        for second, first in (bases or {}).items():
            if second not in added:
                continue
            image = self.images[second]
            changes = ChangeIndex(self.remote, first, second, image.index.volume_blocks)
            image.share_with(self.images[first], changes)

    def add(self, checked: Plan) -> list[str]:
        """Images for the snapshots of a later plan that this engine lacks (a mount's
        refresh: `plan(..., api=engine.api)` of them and the image each may share
        with); their ids, in the plan's order. On the engine's loop only."""
        new = [(s, size) for s, size in checked.snapshots if s not in self.images]
        self._add_images(
            new, checked.bases, checked.disk_bases, checked.first_pages, checked.first_blocks
        )
        return [s for s, _ in new]

    def remove(self, snapshot_id: str, keep_image: bool = False) -> list[str]:
        """A deleted snapshot: no image shares blocks through it any more (its blocks
        can no longer be fetched; those sharing fetch their own), and its image goes
        unless `keep_image` (still open). The ids that lost their base."""
        gone = self.images.get(snapshot_id)
        unshared = []
        for image in self.images.values():
            if gone is not None and image.base is not None and image.base[0] is gone:
                image.base = None
                unshared.append(image.snapshot_id)
        if not keep_image:
            self.images.pop(snapshot_id, None)
            self._partitions.pop(snapshot_id, None)
        return unshared

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve read-ahead, the metadata prefetch (and the disk cache's writes) until
        cancelled."""
        async with trio.open_nursery() as nursery:
            if self.disk is not None:
                await nursery.start(self.disk.run)
            for image in self.images.values():
                await image.cache_first_blocks()
            await nursery.start(self.readahead.run)
            if self.metadata is not None:
                await nursery.start(self.metadata.run)
            task_status.started()

    def prefetch_metadata_now(self) -> None:
        """Start the metadata prefetch of every filesystem of every image now, not at a
        tool's first read of it (the mount's choice: docs/usage.md). Nothing when the
        prefetch is off."""
        if self.metadata is not None:
            for image in self.images.values():
                self.metadata.walk_all(image)

    def close(self) -> None:
        """Write what the disk cache has not written yet and close it; stop hedging."""
        if self.remote.hedger is not None:
            self.remote.hedger.close()
        if self.disk is not None:
            self.disk.close()

    async def partitions(self, snapshot_id: str) -> list[Partition]:
        """The partitions of a snapshot's disk (GPT or MBR), found once. A table that
        is damaged or cannot be read gives none, with a warning: never a failure."""
        found = self._partitions.get(snapshot_id)
        if found is not None:
            return found
        image = self.images[snapshot_id]

        async def read(offset: int, size: int) -> bytes:
            return bytes(await image.read(offset, size))

        try:
            found = await find_partitions(read, image.size)
        except PartitionTableError as err:
            log.warning(
                "%s: partition table ignored, no partition files (the whole image "
                "is still there): %s",
                snapshot_id,
                err,
            )
            found = []
        except EbsfsError as err:
            log.warning(
                "%s: partition table could not be read, no partition files (the "
                "whole image is still there): %s",
                snapshot_id,
                err,
            )
            found = []
        self._partitions[snapshot_id] = found
        return found

    def known_partitions(self, snapshot_id: str) -> list[Partition] | None:
        """The partitions if they were looked for already, else None (no read)."""
        return self._partitions.get(snapshot_id)

    async def changes(self, snapshot_id: str) -> Diff:
        """What differs between a snapshot and its base (mounted with it)."""
        return await self.images[snapshot_id].changes_from_base()

    async def diff(self, first: str, second: str) -> Diff:
        """What differs between any two snapshots of one volume (ListChangedBlocks)."""
        return await diff_snapshots(self.remote, first, second)


def build(config: EngineConfig, checked: Plan, api: EbsApi | None = None) -> Engine:
    """The engine over a client sized for the fetches (made here, after any fork, from
    the checks' session when there is one)."""
    if api is None:
        options = with_options(config.connection, max_connections=fetch_ceiling(config) + 8)
        api = BotoEbsApi(options, stats=checked.stats, session=checked.session)
    return Engine(
        api,
        config,
        checked.snapshots,
        checked.bases,
        checked.disk_bases,
        checked.stats,
        checked.first_pages,
        checked.first_blocks,
    )


def connect(
    config: EngineConfig,
    snapshot_ids: list[str],
    *,
    share_lineage: bool = True,
    api: EbsApi | None = None,
) -> Engine:
    """`plan`, then `build`: an engine ready to read the snapshots."""
    return build(config, plan(config, snapshot_ids, share_lineage=share_lineage, api=api), api)


class EngineThread:
    """A trio loop in a thread of its own running an Engine, so that plain threads
    can read: `call(async_fn, *args)` runs it in the loop and returns its result (or
    raises its exception) in the calling thread. Many threads may call at once.
    `close()` stops the loop and its thread."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._started = threading.Event()
        self._failed: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._main, name="ebsfs-engine", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._failed is not None:
            raise self._failed

    def _main(self) -> None:
        async def serve() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            async with trio.open_nursery() as nursery:
                await nursery.start(self.engine.run)
                self._started.set()
                await self._stop.wait()
                nursery.cancel_scope.cancel()

        try:
            trio.run(serve)
        except BaseException as err:  # reported to the constructor or logged
            self._failed = err
            if self._started.is_set():
                log.error("the engine's loop ended: %s", err)
        finally:
            self.engine.close()
            self._started.set()

    @property
    def closed(self) -> bool:
        return self._closed

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run `await fn(*args)` in the engine's loop; from any thread but that one."""
        if self._closed or self._token is None:
            raise ValueError("I/O operation on a closed ebsfs file")
        try:
            return trio.from_thread.run(fn, *args, trio_token=self._token)
        except trio.RunFinishedError:
            raise ValueError("I/O operation on a closed ebsfs file") from None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._stop is not None and threading.current_thread() is self._thread:
            self._stop.set()  # closed in the loop itself (a file collected there)
        elif self._stop is not None and self._token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)
