"""The read engine: the one place that builds index, cache, fetches, read-ahead and
lineage sharing from options. Every face (the FUSE mount, the CLI's commands, the
Python file object) is a thin user of it; none wires these parts itself. FUSE-free.

Two ways to drive it: inside a trio loop of your own (the mount: start `Engine.run` in
a nursery), or `EngineThread`, which owns a trio loop in a thread of its own and lets
any thread call in (the Python face)."""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from ebsfs.constants import BLOCK_SIZE, MAX_FETCHES, READ_TIMEOUT
from ebsfs.diskcache import catalog, directory, store
from ebsfs.diskcache.store import DiskCache
from ebsfs.engine.cache import BlockCache
from ebsfs.engine.diff import Diff, diff_snapshots
from ebsfs.engine.disktier import DiskTier, DiskView
from ebsfs.engine.image import SnapshotImage
from ebsfs.engine.index import BlockIndex, ChangeIndex
from ebsfs.engine.metaprefetch import MetadataPrefetch
from ebsfs.engine.partitions import Partition, find_partitions
from ebsfs.engine.prefetch import Readahead
from ebsfs.engine.remote import RemoteSnapshots
from ebsfs.engine.stats import Stats
from ebsfs.errors import (
    AccessDenied,
    EbsfsError,
    InvalidSnapshotId,
    PartitionTableError,
    ServiceError,
    SnapshotNotFound,
    UnrelatedSnapshots,
    UserInputError,
)
from ebsfs.service.api import EbsApi
from ebsfs.service.client import BotoEbsApi, ConnectionOptions
from ebsfs.service.retry import RetryPolicy

log = logging.getLogger(__name__)
T = TypeVar("T")

SNAPSHOT_ID = re.compile(r"^snap-[0-9a-f]{1,59}$")
CHECK_RETRY = RetryPolicy(attempts=3, base_delay=0.2, max_delay=1.0, deadline=15.0)
"""Checks before serving fail fast: a user is waiting at the prompt."""
DEFAULT_CACHE_SIZE = 512 * 1024**2
"""A ceiling, not a target: read-ahead keeps the service's bandwidth-delay product in
flight (remote.py), about 200 calls at 200 ms."""
DEFAULT_CACHE_DIR_SIZE = store.DEFAULT_SIZE


@dataclass
class EngineConfig:
    """How to reach the service and how much to hold: the options `mount`, `diff` and
    `ebsfs.open` share, with the same names and defaults."""

    connection: ConnectionOptions = field(default_factory=ConnectionOptions)
    cache_size: int = DEFAULT_CACHE_SIZE
    """Bytes of blocks kept in memory."""
    max_fetches: int = MAX_FETCHES
    """GetSnapshotBlock calls in flight at once, at the most (read-ahead keeps fewer
    when the latency needs fewer, and the cache budget may allow fewer)."""
    read_timeout: float = READ_TIMEOUT
    """Longest a read may take before it fails (EIO)."""
    cache_dir: str | None = None
    """Where blocks are kept on disk across sessions (None: nowhere)."""
    cache_dir_size: int = DEFAULT_CACHE_DIR_SIZE
    """Bytes the disk cache may take at the most (less if free space is short)."""
    prefetch_metadata: bool = True
    """Fetch a filesystem's metadata ahead, in parallel, once a tool opens it
    (engine/metaprefetch.py)."""
    prefetch_metadata_budget: int | None = None
    """Bytes the metadata prefetch may bring in, all filesystems together (None: half
    of `cache_size`, or a quarter of `cache_dir_size` with a `cache_dir`)."""

    def __post_init__(self) -> None:
        if self.cache_size < 0:
            raise UserInputError(f"cache size must be >= 0, got {self.cache_size}")
        if self.max_fetches < 1:
            raise UserInputError(f"max fetches must be >= 1, got {self.max_fetches}")
        if not self.read_timeout > 0:
            raise UserInputError(f"read timeout must be > 0, got {self.read_timeout}")
        if self.cache_dir_size < store.MIN_SIZE:
            raise UserInputError(f"cache dir size must be at least 1M, got {self.cache_dir_size}")
        if self.prefetch_metadata_budget is not None and self.prefetch_metadata_budget < 0:
            raise UserInputError(
                f"metadata prefetch budget must be >= 0, got {self.prefetch_metadata_budget}"
            )


def metadata_budget(config: EngineConfig) -> int:
    """Blocks the metadata prefetch may bring in: as configured, or half the memory
    cache (read-ahead takes at most a quarter, so prefetched blocks are still there when
    the tool reads them; a quarter was too little for a 40,000-file ext4 tree, whose
    `find` then waited a call per block for the rest: docs/performance.md), or a quarter
    of the disk cache when there is one (memory then only passes blocks on)."""
    if config.prefetch_metadata_budget is not None:
        return config.prefetch_metadata_budget // BLOCK_SIZE
    if config.cache_dir is not None:
        return config.cache_dir_size // 4 // BLOCK_SIZE
    return config.cache_size // 2 // BLOCK_SIZE


def fetch_ceiling(config: EngineConfig) -> int:
    """Calls in flight at the most: --max-fetches, and no more than half the cache's
    blocks (every call in flight holds a block's room), but at least a few."""
    return min(config.max_fetches, max(8, config.cache_size // BLOCK_SIZE // 2))


def check_snapshot_id(snapshot_id: str) -> str:
    """The id as given, or InvalidSnapshotId: the service wants ^snap-[0-9a-f]+$."""
    if not SNAPSHOT_ID.match(snapshot_id):
        raise InvalidSnapshotId(
            f"invalid snapshot id {snapshot_id!r}: expected 'snap-' followed by hex digits"
        )
    return snapshot_id


def check_snapshots(api: EbsApi, snapshot_ids: list[str]) -> list[tuple[str, int]]:
    """One list call per snapshot: it exists, we may read it, and its size in bytes."""
    checked = []
    for snapshot_id in snapshot_ids:
        page = api.list_snapshot_blocks(snapshot_id, max_results=100)
        checked.append((snapshot_id, page.volume_size))
    return checked


def find_bases(api: EbsApi, snapshots: list[tuple[str, int]]) -> dict[str, str]:
    """For each snapshot, the first one before it in the list that is of the same
    volume (one ListChangedBlocks call per pair tried). Unrelated pairs, or no
    ebs:ListChangedBlocks permission, just mean no sharing."""
    bases: dict[str, str] = {}
    for k, (second, size) in enumerate(snapshots):
        for first, first_size in snapshots[:k]:
            if first_size != size:
                continue
            try:
                api.list_changed_blocks(first, second, max_results=100)
            except (UnrelatedSnapshots, AccessDenied) as err:
                log.info("%s and %s share no blocks: %s", first, second, err)
                continue
            bases[second] = first
            break
    return bases


def find_disk_bases(
    api: EbsApi, cache_dir: str, snapshots: list[tuple[str, int]]
) -> dict[str, list[str]]:
    """For each snapshot, the snapshots of the same volume with blocks in the disk
    cache (same size, then one ListChangedBlocks call per candidate), most recently used
    first. Unrelated pairs are remembered (never asked again); no ebs:ListChangedBlocks
    permission just means no reuse."""
    mounted = {snapshot_id for snapshot_id, _ in snapshots}
    bases: dict[str, list[str]] = {}
    for second, size in snapshots:
        for first in catalog.lineage_candidates(cache_dir, second, size, mounted):
            try:
                api.list_changed_blocks(first, second, max_results=100)
            except UnrelatedSnapshots:
                catalog.record_unrelated(cache_dir, first, second)
                continue
            except AccessDenied as err:
                log.info("no reuse of cached blocks of other snapshots: %s", err)
                return bases
            except (SnapshotNotFound, ServiceError) as err:
                log.info("cached blocks of %s not reused for %s: %s", first, second, err)
                continue
            except EbsfsError as err:
                log.warning(
                    "cached blocks of %s not reused for %s: could not compare them (%s)",
                    first,
                    second,
                    err,
                )
                continue
            log.info("%s reuses the cached blocks of %s that did not change", second, first)
            bases.setdefault(second, []).append(first)
    return bases


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
    ) -> None:
        self.api = api
        self.config = config
        self.stats = stats or Stats()
        self.remote = RemoteSnapshots(api, max_fetches=fetch_ceiling(config))
        self.cache = BlockCache(config.cache_size)
        self.disk: DiskTier | None = None
        if config.cache_dir is not None:
            self.disk = DiskTier(DiskCache(config.cache_dir, config.cache_dir_size), self.stats)
        self.readahead = Readahead()
        # Read-ahead may hold at most a quarter of the cache, so prefetched blocks are not
        # evicted by other prefetches before the reader gets to them.
        window = max(1, min(config.max_fetches, config.cache_size // 4 // BLOCK_SIZE))
        self.images: dict[str, SnapshotImage] = {}
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
                BlockIndex(self.remote, snapshot_id, blocks),
                self.cache,
                self.remote,
                self.readahead,
                read_timeout=config.read_timeout,
                max_window=window,
                disk=disk,
                stats=self.stats,
            )
        for second, first in (bases or {}).items():
            image = self.images[second]
            changes = ChangeIndex(self.remote, first, second, image.index.volume_blocks)
            image.share_with(self.images[first], changes)
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

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve read-ahead, the metadata prefetch (and the disk cache's writes) until
        cancelled."""
        async with trio.open_nursery() as nursery:
            if self.disk is not None:
                await nursery.start(self.disk.run)
            await nursery.start(self.readahead.run)
            if self.metadata is not None:
                await nursery.start(self.metadata.run)
            task_status.started()

    def close(self) -> None:
        """Write what the disk cache has not written yet and close it."""
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


@dataclass
class Plan:
    """Snapshots checked (id, size in bytes) and which share blocks with which, in
    memory (`bases`, mounted together) and in the disk cache (`disk_bases`)."""

    snapshots: list[tuple[str, int]]
    bases: dict[str, str]
    disk_bases: dict[str, list[str]] = field(default_factory=dict)
    stats: Stats = field(default_factory=Stats)
    """The checks' calls, counted with the engine's later ones."""


def plan(
    config: EngineConfig,
    snapshot_ids: list[str],
    *,
    share_lineage: bool = True,
    api: EbsApi | None = None,
) -> Plan:
    """Check the ids, the cache directory and the snapshots (one list call each,
    failing fast: a user waits) and find which share a lineage, with each other and
    with snapshots in the disk cache. Raises typed EbsfsErrors a user can act on."""
    for snapshot_id in snapshot_ids:
        check_snapshot_id(snapshot_id)
    if len(set(snapshot_ids)) != len(snapshot_ids):
        raise UserInputError("a snapshot id is given twice")
    cache_dir = directory.prepare(config.cache_dir) if config.cache_dir is not None else None
    stats = Stats()
    checker = api or BotoEbsApi(
        _with(config.connection, retry=CHECK_RETRY, max_connections=4), stats=stats
    )
    snapshots = check_snapshots(checker, snapshot_ids)
    bases = find_bases(checker, snapshots) if share_lineage and len(snapshots) > 1 else {}
    disk_bases = {}
    if cache_dir is not None and share_lineage:
        disk_bases = find_disk_bases(checker, cache_dir, snapshots)
    return Plan(snapshots, bases, disk_bases, stats)


def build(config: EngineConfig, checked: Plan, api: EbsApi | None = None) -> Engine:
    """The engine over a client sized for the fetches (made here, after any fork)."""
    if api is None:
        api = BotoEbsApi(
            _with(config.connection, max_connections=fetch_ceiling(config) + 8), stats=checked.stats
        )
    return Engine(api, config, checked.snapshots, checked.bases, checked.disk_bases, checked.stats)


def connect(
    config: EngineConfig,
    snapshot_ids: list[str],
    *,
    share_lineage: bool = True,
    api: EbsApi | None = None,
) -> Engine:
    """`plan`, then `build`: an engine ready to read the snapshots."""
    return build(config, plan(config, snapshot_ids, share_lineage=share_lineage, api=api), api)


def _with(options: ConnectionOptions, **changes: Any) -> ConnectionOptions:
    return ConnectionOptions(**{**options.__dict__, **changes})


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
