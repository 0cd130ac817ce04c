"""Async access to an EbsApi: each blocking call runs in a worker thread under a limiter,
so the trio loop (and with it every FUSE request) never waits on the network."""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import time
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

from ebsfs.constants import MAX_FETCHES
from ebsfs.engine import inbox
from ebsfs.engine.congestion import PROBE_DEPTH, CongestionGuard
from ebsfs.engine.hedge import Hedger
from ebsfs.service.api import MAX_RESULTS, Block, BlockPage, ChangedPage, EbsApi
from ebsfs.service.http1 import Abandon, abandonable

T = TypeVar("T")


class AdaptiveLimit:
    """Additive increase, multiplicative decrease of the calls in flight: halve them
    when the service throttles (at most once a second), add one back after every
    `recover_after` calls that went through without throttling."""

    def __init__(
        self, limiter: trio.CapacityLimiter, maximum: int, minimum: int = 2, recover_after: int = 16
    ) -> None:
        self.limiter = limiter
        self.maximum = maximum
        self.minimum = min(minimum, maximum)
        self.recover_after = recover_after
        self._clean = 0
        self._last_cut = -1.0

    def throttled(self) -> None:
        now = trio.current_time()
        self._clean = 0
        if now - self._last_cut < 1.0:
            return
        self._last_cut = now
        self.limiter.total_tokens = max(self.minimum, int(self.limiter.total_tokens) // 2)

    def succeeded(self) -> None:
        self._clean += 1
        if self._clean >= self.recover_after and self.limiter.total_tokens < self.maximum:
            self._clean = 0
            self.limiter.total_tokens = int(self.limiter.total_tokens) + 1


class Strays:
    """Worker threads still running for calls nobody waits for any more (trio thread
    only). A call given up gives its slot back at once while fewer than `limit` run:
    the direct GET path ends them within milliseconds (http1.Abandon), but a boto3
    call cannot be interrupted, and a server trickling its answers must not be able to
    pile up threads without end either."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0


async def in_worker(
    limiter: trio.CapacityLimiter,
    work: Callable[[], T],
    *,
    abandon_on_cancel: bool = True,
    strays: Strays | None = None,
) -> T:
    """`work()` in a worker thread under `limiter`: trio.to_thread.run_sync, minus what
    costs per call and is not needed here (naming the OS thread twice per call, context
    copies). Abandoned on cancellation by default: a read that timed out answers EIO
    now and tells the call it is abandoned (http1.Abandon: its exchange with the
    service and its retries end). Its place in the limiter is given back at once when
    `strays` has room (slow answers nobody waits for must not starve the calls somebody
    does), else when the thread ends. Otherwise a cancellation waits for the work (a
    write must not be left running)."""
    borrower = object()
    await limiter.acquire_on_behalf_of(borrower)
    results = inbox.current()
    task = trio.lowlevel.current_task()
    abandoned = False
    released = False
    gone = Abandon()

    def run() -> T:  # in the worker thread
        with abandonable(gone):
            return work()

    def done(result: outcome.Outcome[T]) -> None:  # on the trio thread
        if not released:
            limiter.release_on_behalf_of(borrower)
        elif strays is not None:
            strays.count -= 1
        if not abandoned:
            trio.lowlevel.reschedule(task, result)

    def deliver(result: outcome.Outcome[T]) -> None:  # in the worker thread
        with contextlib.suppress(trio.RunFinishedError):  # the loop is gone: nobody waits
            results.post(done, result)

    def abort(_: Any) -> trio.lowlevel.Abort:
        nonlocal abandoned, released
        if not abandon_on_cancel:
            return trio.lowlevel.Abort.FAILED  # `done` reschedules us with the result
        abandoned = True
        if strays is not None and strays.count < strays.limit:
            strays.count += 1
            released = True
            limiter.release_on_behalf_of(borrower)
        gone.fire()
        return trio.lowlevel.Abort.SUCCEEDED

    try:
        trio.lowlevel.start_thread_soon(run, deliver)
    except BaseException:
        limiter.release_on_behalf_of(borrower)
        raise
    value: T = await trio.lowlevel.wait_task_rescheduled(abort)  # the outcome, unwrapped
    return value


GET_RATE = 1000
"""GetSnapshotBlock calls per second the service allows one snapshot (a fixed quota)."""
ASSUMED_LATENCY = 0.1
"""Seconds per call before any was timed (what AWS's guidance plans for)."""
JITTER_ROOM = 1.5
"""Calls in flight per call the quickest answers would need: answers vary."""
MIN_DEPTH = 64
"""Calls in flight at the least while the service's own latency sizes the depth (the
congestion guard may hold it lower). Why: at 20 ms a call the product above is about 32
calls, 50 ms of reading here, while a call of a server's slow tail holds the reader
until its hedge answers (1.2 x the p95, a watchdog tick and a round trip: 70-80 ms), so
the window ran dry behind each one. 64 is what a plain client's pool of 64 threads has
out anyway; from about 43 ms a call the product is larger and decides alone. Against
a server with 1 % of calls 10x slower (60 % of 2 GiB, 20 ms), 1.11x the throughput
(docs/performance.md)."""


class LatencyEstimate:
    """How long GetSnapshotBlock calls take when nothing of ours delays them: a low
    percentile of the last calls. Not the mean: once this machine is the bottleneck
    (its CPU, the GIL), answers wait for us, the mean grows, and sizing the calls in
    flight by it would only queue more of them (bufferbloat; TCP BBR uses the
    minimum round trip for the same reason). Trio thread only."""

    def __init__(
        self, initial: float = ASSUMED_LATENCY, keep: int = 256, percentile: float = 0.1
    ) -> None:
        self._recent: collections.deque[float] = collections.deque(maxlen=keep)
        self._percentile = percentile
        self._since = 0
        self.seconds = initial

    def add(self, seconds: float) -> None:
        self._recent.append(seconds)
        self._since += 1
        if self._since >= 16 or len(self._recent) < 16:
            self._since = 0
            ordered = sorted(self._recent)
            self.seconds = ordered[int(len(ordered) * self._percentile)]


class RemoteSnapshots:
    """The EbsApi methods as coroutines. Block fetches and list calls have separate
    limiters so a burst of fetches never starves the index of list calls; the fetch
    limiter shrinks while the service throttles and grows back as it clears."""

    def __init__(
        self,
        api: EbsApi,
        max_fetches: int = MAX_FETCHES,
        max_lists: int = 4,
        hedger: Hedger | None = None,
    ) -> None:
        self.api = api
        self.hedger = hedger
        """Asks again for blocks whose calls are slow (None: never)."""
        self.fetch_limiter = trio.CapacityLimiter(max_fetches)
        self.list_limiter = trio.CapacityLimiter(max_lists)
        self.fetch_limit = AdaptiveLimit(self.fetch_limiter, max_fetches)
        self.latency = LatencyEstimate()
        self.congestion = CongestionGuard()
        self.strays = Strays(max_fetches + max_lists)
        """Calls given up whose threads still run, up to as many again as may run."""

    def depth(self) -> int:
        """GetSnapshotBlock calls worth having in flight for one sequential reader: the
        bandwidth-delay product of the service (its per-snapshot rate x the latency of
        its quick answers, with room for jitter, and MIN_DEPTH at the least), never more
        than the fetch limit allows at the moment (which throttling shrinks), nor more
        than a latency inflated by our own calls asks for (congestion.py)."""
        if self.congestion.probing():
            return min(PROBE_DEPTH, int(self.fetch_limiter.total_tokens))
        quick = self.latency.seconds
        latency = self.congestion.latency_for_depth(quick)
        wanted = math.ceil(GET_RATE * latency * JITTER_ROOM)
        if latency == quick:  # not held back by the congestion guard
            wanted = max(wanted, MIN_DEPTH)
        return max(2, min(wanted, int(self.fetch_limiter.total_tokens)))

    async def _run(self, limiter: trio.CapacityLimiter, fn: Any, *args: Any, **kw: Any) -> Any:
        return await in_worker(limiter, functools.partial(fn, *args, **kw), strays=self.strays)

    async def list_snapshot_blocks(
        self,
        snapshot_id: str,
        start_index: int = 0,
        next_token: str | None = None,
        max_results: int = MAX_RESULTS,
    ) -> BlockPage:
        return await self._run(
            self.list_limiter,
            self.api.list_snapshot_blocks,
            snapshot_id,
            start_index=start_index,
            next_token=next_token,
            max_results=max_results,
        )

    async def list_changed_blocks(
        self,
        first_id: str,
        second_id: str,
        start_index: int = 0,
        next_token: str | None = None,
        max_results: int = MAX_RESULTS,
    ) -> ChangedPage:
        return await self._run(
            self.list_limiter,
            self.api.list_changed_blocks,
            first_id,
            second_id,
            start_index=start_index,
            next_token=next_token,
            max_results=max_results,
        )

    async def get_snapshot_block(
        self, snapshot_id: str, index: int, token: str, into: memoryview | None = None
    ) -> Block:
        before = self.api.get_throttles
        block, seconds = await self._run(
            self.fetch_limiter, self._timed_get, snapshot_id, index, token, into
        )
        self.latency.add(seconds)
        now = trio.current_time()
        self.congestion.answered(now - seconds, seconds, self.latency.seconds, now)
        if self.api.get_throttles > before:
            self.fetch_limit.throttled()
        else:
            self.fetch_limit.succeeded()
        return block

    def _timed_get(
        self, snapshot_id: str, index: int, token: str, into: memoryview | None
    ) -> tuple[Block, float]:
        """In the worker thread: the call, timed from its start (waits for the limiter
        are ours, not the service's)."""
        started = time.monotonic()
        if self.hedger is None:
            block = self.api.get_snapshot_block(snapshot_id, index, token, into=into)
        else:
            api = self.api
            block = self.hedger.run(
                lambda room: api.get_snapshot_block(snapshot_id, index, token, into=room), into
            )
        return block, time.monotonic() - started
