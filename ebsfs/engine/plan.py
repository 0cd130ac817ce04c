"""Before any engine exists: check the snapshots (they exist, we may read them, their
sizes) and find which share a lineage, failing fast with errors a user can act on.
No trio here: the mount runs this while it loads the rest (cli/mount.py).

The checks' answers are kept for the engine, so that starting costs no call twice:
each snapshot's first ListSnapshotBlocks page (it becomes the block index's first
page: the first read, of block 0, then lists nothing) and the botocore session (the
engine's client is made from it in about 4 ms instead of 100). On request (`ebsfs
mount`, which runs the checks while it loads the rest) block 0 and the first
partition's usual head are fetched beside the check (HEAD_BLOCKS): the mount reads
block 0 first (the partition table, or a bare filesystem's head), the metadata
prefetch the partition's head next, and the calls then cost its start nothing where
each would cost a round trip after. Not by default: `ebsfs get` checks its target
after the checks and must fail without having fetched anything."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ebsfs.diskcache import catalog, directory
from ebsfs.diskcache.keys import Origin
from ebsfs.engine.config import EngineConfig, check_snapshot_id
from ebsfs.engine.stats import Stats
from ebsfs.errors import (
    AccessDenied,
    EbsfsError,
    ServiceError,
    SnapshotNotFound,
    UnrelatedSnapshots,
    UserInputError,
)
from ebsfs.service.api import MAX_RESULTS, Block, BlockPage, EbsApi
from ebsfs.service.client import BotoEbsApi
from ebsfs.service.retry import RetryPolicy
from ebsfs.service.session import AwsSession, ConnectionOptions

log = logging.getLogger(__name__)

CHECK_RETRY = RetryPolicy(attempts=3, base_delay=0.2, max_delay=1.0, deadline=15.0)
"""Checks before serving fail fast: a user is waiting at the prompt."""
CHECK_THREADS = 8
"""Snapshots checked at once (a mount of many waits one call, not one per snapshot)."""
FIRST_PAGES_KEPT = 16
"""Snapshots whose first page is listed in full (MAX_RESULTS entries, about 2.5 MB
of tokens each) and kept for the engine, with their HEAD_BLOCKS (1 MiB); the others
are checked with a short page."""
HEAD_BLOCKS = (0, 2)
"""Blocks a mount fetches beside its checks, when written: the partition table
(block 0) and the head of the first partition, which every partitioning tool of the
last fifteen years starts at 1 MiB (sector 2048): its superblock or boot sector is
what a tool, and the metadata prefetch, read first (one round trip saved, issue 25)."""


@dataclass
class Checked:
    """One snapshot, checked: its size, and its first ListSnapshotBlocks page (from
    block 0) when kept for the block index."""

    snapshot_id: str
    size: int
    first_page: BlockPage | None
    first_blocks: dict[int, Block] = field(default_factory=dict)
    """HEAD_BLOCKS, verified, that the page lists and whose fetch worked."""


def check_snapshots(api: EbsApi, snapshot_ids: list[str]) -> list[Checked]:
    """One list call per snapshot, several at once: it exists, we may read it, and its
    size in bytes. The first error in the order given is raised (the same one each
    time, whatever answered first)."""

    def check(position: int, snapshot_id: str) -> Checked:
        keep = position < FIRST_PAGES_KEPT
        page = api.list_snapshot_blocks(snapshot_id, max_results=MAX_RESULTS if keep else 100)
        return Checked(snapshot_id, page.volume_size, page if keep else None)

    return _each(check, snapshot_ids)


def fetch_first_blocks(api: EbsApi, checked: list[Checked]) -> None:
    """The HEAD_BLOCKS of each snapshot that its kept page lists as written, all at
    once, into `first_blocks`. A failure is left to the engine's own read of it (it
    retries and reports)."""
    wanted = []
    for one in checked:
        page = one.first_page
        if page is None:
            continue
        listed = dict(page.blocks)
        wanted += [(one, i, listed[i]) for i in HEAD_BLOCKS if i in listed]

    def fetch(_: int, item: tuple[Checked, int, str]) -> None:
        one, index, token = item
        try:
            one.first_blocks[index] = api.get_snapshot_block(one.snapshot_id, index, token)
        except EbsfsError as err:
            log.debug("%s: block %d not fetched beside the checks: %s", one.snapshot_id, index, err)

    _each(fetch, wanted)


T = TypeVar("T")
R = TypeVar("R")


def _each(work: Callable[[int, T], R], items: list[T]) -> list[R]:
    """`work(position, item)` for every item, up to CHECK_THREADS at once, results in
    order; the first error in that order is raised."""
    if len(items) == 1:
        return [work(0, items[0])]
    workers = max(1, min(CHECK_THREADS, len(items)))
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="check") as pool:
        futures = [pool.submit(work, n, item) for n, item in enumerate(items)]
        return [future.result() for future in futures]


def find_bases(api: EbsApi, snapshots: list[tuple[str, int]]) -> dict[str, str]:
    """For each snapshot, the nearest one before it in the list that is of the same
    volume (one ListChangedBlocks call per pair tried): a volume's snapshots in time
    order then share blocks with their neighbour, whose changes are the fewest, and
    a block unchanged since the oldest is still served through it (image.py follows
    the chain). Unrelated pairs, or no ebs:ListChangedBlocks permission, just mean
    no sharing."""
    bases: dict[str, str] = {}
    for k, (second, size) in enumerate(snapshots):
        for first, first_size in reversed(snapshots[:k]):
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
    permission just means no reuse. Only snapshots cached from this api's endpoint and
    region are candidates: another endpoint's snapshot ids are not sent to this one (and
    an endpoint calling a pair unrelated speaks only for itself)."""
    origin = Origin.of(api)
    if origin is None:
        return {}
    mounted = {snapshot_id for snapshot_id, _ in snapshots}
    bases: dict[str, list[str]] = {}
    for second, size in snapshots:
        candidates = catalog.lineage_candidates(cache_dir, second, size, mounted, origin=origin.key)
        for first in candidates:
            try:
                api.list_changed_blocks(first, second, max_results=100)
            except UnrelatedSnapshots:
                catalog.record_unrelated(cache_dir, first, second, origin=origin.key)
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


@dataclass
class Plan:
    """Snapshots checked (id, size in bytes) and which share blocks with which, in
    memory (`bases`, mounted together) and in the disk cache (`disk_bases`), with what
    the checks found that the engine can use (`first_pages`, `session`)."""

    snapshots: list[tuple[str, int]]
    bases: dict[str, str]
    disk_bases: dict[str, list[str]] = field(default_factory=dict)
    stats: Stats = field(default_factory=Stats)
    """The checks' calls, counted with the engine's later ones."""
    first_pages: dict[str, BlockPage] = field(default_factory=dict)
    """Snapshot id -> its ListSnapshotBlocks page from block 0, as the check got it."""
    first_blocks: dict[str, dict[int, Block]] = field(default_factory=dict)
    """Snapshot id -> its HEAD_BLOCKS fetched and verified beside the check."""
    session: AwsSession | None = None
    """The checks' botocore session, for the engine's client (None: make one)."""


def plan(
    config: EngineConfig,
    snapshot_ids: list[str],
    *,
    share_lineage: bool = True,
    api: EbsApi | None = None,
    fetch_first_block: bool = False,
    calling: threading.Event | None = None,
) -> Plan:
    """Check the ids, the cache directory and the snapshots (one list call each,
    failing fast: a user waits) and find which share a lineage, with each other and
    with snapshots in the disk cache (and fetch each one's HEAD_BLOCKS when asked). Raises typed
    EbsfsErrors a user can act on. `calling` is set once the client is made and the
    first call is about to go (the mount loads the rest of ebsfs only then: two
    threads importing or building clients at once take turns on the GIL, and the
    first call went out ~200 ms later)."""
    for snapshot_id in snapshot_ids:
        check_snapshot_id(snapshot_id)
    if len(set(snapshot_ids)) != len(snapshot_ids):
        raise UserInputError("a snapshot id is given twice")
    cache_dir = directory.prepare(config.cache_dir) if config.cache_dir is not None else None
    stats = Stats()
    session = None
    if api is None:
        # Failing fast, but throttling is waited out as the command's own policy says
        # (an hour for a copy: a copy started at a busy moment must not die of it).
        retry = dataclasses.replace(
            CHECK_RETRY, throttle_budget=config.connection.retry.throttle_budget
        )
        options = with_options(config.connection, retry=retry, max_connections=CHECK_THREADS)
        api = boto = BotoEbsApi(options, stats=stats)
        session = boto.session
    if calling is not None:  # the client is ready: the calls wait on the network now
        calling.set()
    checked = check_snapshots(api, snapshot_ids)
    snapshots = [(c.snapshot_id, c.size) for c in checked]
    bases = find_bases(api, snapshots) if share_lineage and len(snapshots) > 1 else {}
    # Not of a snapshot served through its base (maybe unchanged), nor with a disk
    # cache, which may hold them: a call there is one the cache would have saved.
    if fetch_first_block and cache_dir is None:
        fetch_first_blocks(api, [c for c in checked if c.snapshot_id not in bases])
    disk_bases = {}
    if cache_dir is not None and share_lineage:
        disk_bases = find_disk_bases(api, cache_dir, snapshots)
    first_pages = {c.snapshot_id: c.first_page for c in checked if c.first_page is not None}
    first_blocks = {c.snapshot_id: c.first_blocks for c in checked if c.first_blocks}
    return Plan(snapshots, bases, disk_bases, stats, first_pages, first_blocks, session)


def with_options(options: ConnectionOptions, **changes: Any) -> ConnectionOptions:
    """`options` with some fields changed."""
    return ConnectionOptions(**{**options.__dict__, **changes})
