"""The options every face gives the engine (`EngineConfig`), the limits derived from
them, and the snapshot-id check: what a command line parses into, importable without
the engine's trio machinery (the CLI checks options before it loads anything heavy)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ebsfs.constants import BLOCK_SIZE, MAX_FETCHES, READ_TIMEOUT
from ebsfs.diskcache import store
from ebsfs.errors import InvalidSnapshotId, UserInputError
from ebsfs.service.session import ConnectionOptions

SNAPSHOT_ID = re.compile(r"snap-[0-9a-f]{1,59}")
"""Matched whole (fullmatch): with re.match, `$` also matches before a final newline."""
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
    hedge: bool = True
    """Ask again for a block whose call is far slower than recent ones (engine/hedge.py;
    the direct GET path only)."""
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
    if not SNAPSHOT_ID.fullmatch(snapshot_id):
        raise InvalidSnapshotId(
            f"invalid snapshot id {snapshot_id!r}: expected 'snap-' followed by hex digits"
        )
    return snapshot_id
