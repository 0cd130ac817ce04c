"""What an engine has done so far, for `ebsfs stats` and `SnapshotFile.stats()`: calls
per operation (retries included), blocks fetched, cache hits, lineage reuse, metadata
prefetch (per filesystem walked), and the estimated cost of the calls.

Concurrency rule: requests are counted in the worker threads that send them, under a
lock held only for the increment; everything else is counted on the trio thread with
plain increments (no lock: one thread writes them). Readers on the trio thread read
ints, which is atomic, so a report never waits."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from ebsfs.constants import BLOCK_SIZE
from ebsfs.errors import Throttled

T = TypeVar("T")

OPERATIONS = ("ListSnapshotBlocks", "ListChangedBlocks", "GetSnapshotBlock")
PRICE_PER_1000 = {
    "GetSnapshotBlock": 0.003,
    "ListSnapshotBlocks": 0.0006,
    "ListChangedBlocks": 0.0006,
}
"""US dollars per 1,000 calls (the EBS direct API price list; regions differ slightly)."""


@dataclass
class WalkCounters:
    """One filesystem's metadata prefetch (engine/metaprefetch.py)."""

    filesystem: str
    """The walker's name: ext4, xfs, ntfs."""
    state: str = "running"
    """running, finished (the walker had no more), stopped (see `reason`)."""
    reason: str = ""
    waves: int = 0
    blocks: int = 0
    """Blocks this walk brought into memory (fetched or from the disk cache)."""


class Stats:
    """Counters of one engine (and of the checks made before it was built)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls = dict.fromkeys(OPERATIONS, 0)
        """Requests sent per operation, retries included: what the service counts."""
        self.retries = 0
        """Requests that repeated an earlier one that failed or was throttled."""
        self.throttles = 0
        """Answers of RequestThrottledException."""
        self.blocks_fetched = 0
        """Blocks received and verified (GetSnapshotBlock)."""
        self.memory_hits = 0
        """Block lookups answered from memory (a block read in pieces counts per piece)."""
        self.disk_hits = 0
        """Blocks read from the disk cache and verified."""
        self.lineage_hits = 0
        """Of the hits above, those answered by an earlier snapshot's cached block."""
        self.disk_stored = 0
        self.disk_evicted = 0
        self.disk_damaged = 0
        """Disk cache entries that failed their SHA-256 check (or could not be read):
        dropped and fetched again."""
        self.connections: Callable[[], dict[str, Any]] | None = None
        """The direct path's connection counters (service/connections.py), when it is used."""
        self.hedging: Callable[[], dict[str, Any]] | None = None
        """Calls asked again (engine/hedge.py), when hedging is on."""
        self.disk_cache: Callable[[], dict[str, Any]] | None = None
        """Where the disk cache is and how full, when there is one."""
        self.prefetch_budget: int | None = None
        """Blocks the metadata prefetch may bring in (None: it is off)."""
        self.prefetch_blocks = 0
        self.prefetch_waves = 0
        self.walks: dict[str, WalkCounters] = {}
        """Per filesystem walked (its file's name, e.g. snap-0a1-part1), at most one
        each: a window is walked once per engine."""

    # ---- worker threads --------------------------------------------------------------

    def counting(self, operation: str, attempt: Callable[[], T]) -> Callable[[], T]:
        """`attempt` (one request of a call, run by the retry policy as often as it
        takes), counting each run as a request, every run after the first as a retry,
        and each throttling answer."""
        runs = 0

        def counted() -> T:
            nonlocal runs
            with self._lock:
                self.calls[operation] = self.calls.get(operation, 0) + 1
                if runs:
                    self.retries += 1
            runs += 1
            try:
                return attempt()
            except Throttled:
                with self._lock:
                    self.throttles += 1
                raise

        return counted

    # ---- reports ---------------------------------------------------------------------

    @property
    def cost(self) -> float:
        """Estimated US dollars of the calls sent so far (every request counted,
        retries included: an upper bound)."""
        return sum(self.calls.get(op, 0) * price / 1000 for op, price in PRICE_PER_1000.items())

    def report(self) -> dict[str, Any]:
        """Everything as JSON-friendly values."""
        report: dict[str, Any] = {
            "calls": dict(self.calls),
            "retries": self.retries,
            "throttles": self.throttles,
            "blocks_fetched": self.blocks_fetched,
            "bytes_fetched": self.blocks_fetched * BLOCK_SIZE,
            "memory_hits": self.memory_hits,
            "disk_hits": self.disk_hits,
            "lineage_hits": self.lineage_hits,
            "estimated_cost_usd": round(self.cost, 6),
            "metadata_prefetch": self._prefetch_report(),
            "hedges": self.hedging() if self.hedging is not None else {"enabled": False},
            "connections": self.connections() if self.connections is not None else {},
        }
        if self.disk_cache is not None:
            report["disk_cache"] = {
                **self.disk_cache(),
                "stored": self.disk_stored,
                "evicted": self.disk_evicted,
                "damaged": self.disk_damaged,
            }
        return report

    def _prefetch_report(self) -> dict[str, Any]:
        if self.prefetch_budget is None:
            return {"enabled": False}
        states = [walk.state for walk in self.walks.values()]
        return {
            "enabled": True,
            "budget_blocks": self.prefetch_budget,
            "blocks": self.prefetch_blocks,
            "bytes": self.prefetch_blocks * BLOCK_SIZE,
            "waves": self.prefetch_waves,
            "walks_started": len(states),
            "walks_finished": states.count("finished"),
            "walks_stopped": states.count("stopped"),
            "filesystems": {name: asdict(walk) for name, walk in self.walks.items()},
        }


def format_report(report: dict[str, Any]) -> str:
    """The report as the lines `ebsfs stats` prints."""
    calls = report.get("calls", {})
    lines = [
        "calls           " + ", ".join(f"{op} {calls.get(op, 0):,}" for op in OPERATIONS),
        f"retries         {report.get('retries', 0):,} (throttled {report.get('throttles', 0):,})",
        f"fetched         {report.get('blocks_fetched', 0):,} blocks, "
        f"{_size(report.get('bytes_fetched', 0))}",
        f"memory hits     {report.get('memory_hits', 0):,} block lookups",
    ]
    disk = report.get("disk_cache")
    if disk is None:
        lines.append("disk cache      off (--cache-dir)")
    else:
        lines.append(
            f"disk cache      {report.get('disk_hits', 0):,} hits, {disk['stored']:,} "
            f"stored, {disk['evicted']:,} evicted, {disk['damaged']:,} damaged; "
            f"{_size(disk['used_bytes'])} of {_size(disk['limit_bytes'])} in "
            f"{disk['path']}"
        )
    lines.append(
        f"lineage         {report.get('lineage_hits', 0):,} blocks served from "
        "another snapshot's cached blocks"
    )
    lines += _prefetch_lines(report.get("metadata_prefetch"))
    lines += _hedge_lines(report.get("hedges"))
    lines += _connection_lines(report.get("connections"))
    lines.append(
        f"estimated cost  {dollars(report.get('estimated_cost_usd', 0.0))} "
        "(GetSnapshotBlock $0.003 per 1,000, list calls $0.0006 per 1,000; "
        "retries included)"
    )
    return "\n".join(lines)


def _prefetch_lines(prefetch: dict[str, Any] | None) -> list[str]:
    if prefetch is None:  # a mount of an older ebsfs
        return []
    if not prefetch.get("enabled"):
        return ["metadata        prefetch off (--no-prefetch-metadata)"]
    lines = [
        f"metadata        {prefetch['blocks']:,} blocks prefetched "
        f"({_size(prefetch['bytes'])}) in {prefetch['waves']:,} waves, budget "
        f"{prefetch['budget_blocks']:,}; {prefetch['walks_started']:,} filesystems walked: "
        f"{prefetch['walks_finished']:,} finished, {prefetch['walks_stopped']:,} stopped"
    ]
    for name, walk in prefetch.get("filesystems", {}).items():
        why = f" ({walk['reason']})" if walk.get("reason") else ""
        lines.append(
            f"  {name}  {walk['filesystem']} {walk['state']}{why}, {walk['waves']:,} waves, "
            f"{walk['blocks']:,} blocks"
        )
    return lines


def _hedge_lines(hedges: dict[str, Any] | None) -> list[str]:
    if hedges is None:  # a mount of an older ebsfs
        return []
    if not hedges.get("enabled"):
        return ["hedged          off (--no-hedge, or GETs through boto3)"]
    delay = hedges.get("delay_seconds")
    after = "not yet: too few answers timed" if delay is None else f"after {delay * 1000:.0f} ms"
    return [
        f"hedged          {hedges['sent']:,} calls asked again ({after}), "
        f"{hedges['won']:,} answered by the second call first"
    ]


def _connection_lines(connections: dict[str, Any] | None) -> list[str]:
    if not connections:  # GETs through boto3, or a mount of an older ebsfs
        return []
    c = connections
    handshake = c.get("handshake_deadline_ms")  # once a TLS handshake was timed
    per_handshake = (
        f" (a TLS handshake past {handshake:.0f} ms for itself and each connect of ours"
        " that overlaps it)"
        if handshake is not None
        else ""
    )
    return [
        f"connections     {c['opened']:,} opened ({c['reopened_stale']:,} replacing ones the "
        f"server closed), {c['open']:,} open; {c['connects_abandoned']:,} connects "
        f"abandoned past {c['connect_deadline_ms']:.0f} ms{per_handshake} and tried again"
    ]


def dollars(amount: float) -> str:
    """Cents for large sums, millionths of a dollar for the small ones calls cost."""
    return f"${amount:.2f}" if amount >= 10 else f"${amount:.6f}"


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
