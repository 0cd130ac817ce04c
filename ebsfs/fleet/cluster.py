"""The Dask side of `ebsfs scan` as the client sees it: reaching a cluster (a local
one, a scheduler file or a tcp:// address), placing snapshots on workers, submitting
one task per snapshot and handing back each one's lines as it finishes.

Placement: the snapshots of one volume go to one worker, oldest first, each submitted
once the one before is done: the later snapshot's blocks unchanged since the earlier
one are then in that worker's disk cache (the engine's lineage records find them), so
a volume's chain costs about its first snapshot plus what changed. Volumes are dealt to
workers by their number of snapshots, largest first (so one long chain does not end
up behind others). A worker lost mid-sweep does not stall it: the restriction is
loose, the scheduler moves its tasks."""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ebsfs.errors import UserInputError
from ebsfs.fleet.ratelimit import SlidingWindow
from ebsfs.fleet.tasks import Job, Settings, scan_task

if TYPE_CHECKING:
    from distributed import Client

CONNECT_TIMEOUT = 10.0
"""Seconds to reach a scheduler before giving up with one line."""


class MissingExtra(UserInputError):
    """Dask is not installed."""


def require_dask() -> None:
    """MissingExtra, in one line, where dask or distributed cannot be imported."""
    try:
        import dask  # noqa: F401
        import distributed  # noqa: F401
    except ImportError as err:
        raise MissingExtra(
            f"ebsfs scan runs on Dask, which is not installed ({err.name or err}): "
            "pip install 'ebsfs[fleet]'"
        ) from None


def quiet_dask() -> None:
    """Dask's own INFO lines (clients, workers, nannies coming and going) kept off the
    user's terminal: distributed gives its loggers a stderr handler of their own at
    import. Warnings still show; `-vv` (DEBUG on ebsfs's side) shows everything."""
    level = logging.getLogger("ebsfs").getEffectiveLevel()
    for name in ("distributed", "dask"):
        logging.getLogger(name).setLevel(
            logging.DEBUG if level <= logging.DEBUG else logging.WARNING
        )


@contextlib.contextmanager
def cluster_client(workers: int | None, scheduler: str | None) -> Iterator[Client]:
    """A client of the cluster asked for: `scheduler` (a scheduler file or an
    address), else a local cluster of `workers` processes (default: one per CPU), which
    is stopped on the way out."""
    require_dask()
    from distributed import Client, LocalCluster

    quiet_dask()
    if scheduler is not None:
        try:
            if os.path.exists(scheduler):
                client = Client(scheduler_file=scheduler, timeout=CONNECT_TIMEOUT)
            elif "://" in scheduler:
                client = Client(scheduler, timeout=CONNECT_TIMEOUT)
            else:
                raise UserInputError(
                    f"--scheduler {scheduler}: neither a scheduler file nor an address "
                    "such as tcp://host:8786"
                )
        except (OSError, TimeoutError, ValueError) as err:
            raise UserInputError(
                f"--scheduler {scheduler}: cannot reach the Dask scheduler: "
                f"{' '.join(str(err).split())[:200]}"
            ) from None
        try:
            yield client
        finally:
            client.close()
        return
    count = workers or os.cpu_count() or 1
    cluster = LocalCluster(
        n_workers=count,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",  # a free port: 8787 may be another cluster's
        silence_logs=40,  # logging.ERROR: a worker's chatter is not the user's
    )
    try:
        client = Client(cluster)
        try:
            yield client
        finally:
            client.close()
    finally:
        cluster.close()


def place(
    jobs: list[Job], workers: list[str], lineage: bool = True, seed: int = 0
) -> dict[str, str]:
    """Which worker scans each snapshot. `lineage`: a volume's snapshots together
    (volumes dealt largest first to the least loaded worker); else at random (for
    scripts/bench_scan.py's comparison). A snapshot of no known volume is a volume of
    its own."""
    if not workers:
        raise UserInputError("the Dask cluster has no worker")
    if not lineage:
        rng = random.Random(seed)
        return {job.snapshot_id: rng.choice(workers) for job in jobs}
    volumes: dict[str, list[Job]] = {}
    for job in jobs:
        volumes.setdefault(job.volume_id or job.snapshot_id, []).append(job)
    load = dict.fromkeys(workers, 0)
    placed: dict[str, str] = {}
    for chain in sorted(volumes.values(), key=len, reverse=True):
        worker = min(workers, key=lambda w: (load[w], workers.index(w)))
        load[worker] += len(chain)
        for job in chain:
            placed[job.snapshot_id] = worker
    return placed


def chains(jobs: list[Job]) -> list[list[Job]]:
    """The jobs grouped by volume, each group oldest first (unknown times last, in the
    order given)."""
    volumes: dict[str, list[Job]] = {}
    for job in jobs:
        volumes.setdefault(job.volume_id or job.snapshot_id, []).append(job)
    return [
        sorted(chain, key=lambda j: (j.start_time is None, j.start_time or 0.0))
        for chain in volumes.values()
    ]


class Sweep:
    """The tasks of one sweep: the first snapshot of every volume submitted at once,
    each next one of a volume when the one before is done (to the same worker, whose
    disk cache now holds it). Chained here rather than through task dependencies, so
    that no task's lines are held on a worker once the client has them: a sweep of
    thousands of snapshots keeps only those in flight in the cluster's memory."""

    def __init__(
        self,
        client: Client,
        settings: Settings,
        jobs: list[Job],
        max_rate: float | None,
        lineage: bool = True,
    ) -> None:
        self.client = client
        self.settings = settings
        self.window = None
        """The rate-limit actor (None: no limit)."""
        if max_rate is not None:
            self.window = client.submit(SlidingWindow, max_rate, actor=True, pure=False).result()
        workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
        self.placed = place(jobs, workers, lineage)
        self._chains = [
            collections.deque(c) for c in (chains(jobs) if lineage else [[j] for j in jobs])
        ]
        self.pending: dict[Any, tuple[str, int]] = {}
        for number in range(len(self._chains)):
            self._next(number)

    def _next(self, chain: int) -> None:
        if not self._chains[chain]:
            return
        job = self._chains[chain].popleft()
        future = self.client.submit(
            scan_task,
            self.settings,
            job,
            self.window,
            workers=[self.placed[job.snapshot_id]],
            allow_other_workers=True,
            pure=False,
            key=f"ebsfs-scan-{job.snapshot_id}-{random.getrandbits(32):08x}",
        )
        self.pending[future] = (job.snapshot_id, chain)

    def results(self, timeout: float) -> list[list[dict[str, Any]]]:
        """The lines of the snapshots done within `timeout` seconds (maybe none), their
        futures released and the next of their volumes submitted."""
        done, _ = finished(set(self.pending), timeout)
        out = []
        for future in done:
            snapshot_id, chain = self.pending.pop(future)
            out.append(outcome(future, snapshot_id))
            future.release()
            self._next(chain)
        return out

    def cancel(self) -> None:
        self.client.cancel(list(self.pending))


def outcome(future: Any, snapshot_id: str) -> list[dict[str, Any]]:
    """The task's lines, or an error block when the task itself failed (a worker lost,
    a bug): the sweep goes on, and a rerun tries the snapshot again."""
    from ebsfs.quoting import printable

    try:
        lines: list[dict[str, Any]] = future.result()
        return lines
    except Exception as err:  # noqa: BLE001 (any task failure is this snapshot's line)
        text = printable(" ".join(f"{type(err).__name__}: {err}".split())[:300])
        return [
            {"snapshot_id": snapshot_id, "partition": None, "error": f"task failed: {text}"},
            {"snapshot_id": snapshot_id, "summary": {"complete": False, "errors": 1}},
        ]


def finished(pending: set[Any], timeout: float) -> tuple[set[Any], set[Any]]:
    """(done, still pending) once one of `pending` is done or `timeout` has passed."""
    from distributed import wait

    try:
        done, left = wait(list(pending), timeout=timeout, return_when="FIRST_COMPLETED")
    except TimeoutError:
        return set(), pending
    return set(done), set(left)
