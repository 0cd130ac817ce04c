"""What runs on a Dask worker: one snapshot's scan (records.py) under the sweep's rate
limit, with the worker's disk cache, from settings that cross the wire as plain
values (no client, session or engine is pickled: each task builds its own engine
through the one entry point every face uses, fileobj.open_with)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from ebsfs.constants import READ_TIMEOUT, REQUEST_TIMEOUT
from ebsfs.engine.config import DEFAULT_CACHE_DIR_SIZE, EngineConfig
from ebsfs.fileobj import keyword_connection
from ebsfs.fleet.ratelimit import LocalLimiter, actor_take
from ebsfs.fleet.records import Selection, scan_snapshot

log = logging.getLogger(__name__)

SCAN_CACHE_SIZE = 256 * 1024**2
"""Memory for blocks per task: metadata walks want far less than a mount's read-ahead,
and a machine runs several tasks."""


@dataclass(frozen=True)
class Job:
    """One snapshot to scan, and what placement needs to know of it."""

    snapshot_id: str
    volume_id: str | None = None
    start_time: float | None = None


@dataclass(frozen=True)
class Settings:
    """The options of one sweep, the same for every task."""

    selection: Selection = field(default_factory=Selection)
    region: str | None = None
    profile: str | None = None
    endpoint_url: str | None = None
    direct_get: bool = True
    hedge: bool = True
    cache_size: int = SCAN_CACHE_SIZE
    cache_dir: str | None = None
    """A disk cache shared by the tasks of a machine (None: one per worker, in its
    Dask scratch directory)."""
    cache_dir_size: int = DEFAULT_CACHE_DIR_SIZE
    read_timeout: float = READ_TIMEOUT
    request_timeout: float = REQUEST_TIMEOUT

    def engine_config(self, cache_dir: str | None, limiter: Any = None) -> EngineConfig:
        connection = keyword_connection(
            region=self.region,
            profile=self.profile,
            endpoint_url=self.endpoint_url,
            read_timeout=self.read_timeout,
            request_timeout=self.request_timeout,
            direct_get=self.direct_get,
            rate_limiter=limiter,
        )
        return EngineConfig(
            connection=connection,
            cache_size=self.cache_size,
            read_timeout=self.read_timeout,
            cache_dir=cache_dir,
            cache_dir_size=self.cache_dir_size,
            hedge=self.hedge,
        )


def worker_cache_dir() -> str | None:
    """The running worker's own disk cache directory (in its scratch space), or None
    outside a worker."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return None
    path = os.path.join(worker.local_directory, "ebsfs-cache")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def scan_task(settings: Settings, job: Job, window: Any = None) -> list[Any]:
    """One snapshot's lines (records.scan_snapshot), on a worker. `window` is the
    sweep's rate-limit actor (None: no limit)."""
    limiter = LocalLimiter(actor_take(window)) if window is not None else None
    cache_dir = settings.cache_dir or worker_cache_dir()
    config = settings.engine_config(cache_dir, limiter)
    result = scan_snapshot(config, job.snapshot_id, settings.selection)
    if limiter is not None and limiter.dropped:
        log.info("%s: %d granted calls not sent in time", job.snapshot_id, limiter.dropped)
    return result.lines
