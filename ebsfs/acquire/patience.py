"""A copy's time limits that throttling does not use up: each block (and each page of
the block list) has `read_timeout` to arrive, but while the service is throttling, the
time spent waiting is added back to every limit running, up to the copy's throttle
budget. A copy left running overnight must not fail because the account is busy
(issue 28), and a block that stalls for any other reason still stops the copy at its
`read_timeout` (run it again to resume).

Why from the copy's side: the calls wait out throttling in worker threads
(service/retry.py), which cannot tell the task waiting for a block how long they
slept; the throttling answers counted by the engine's stats tell it for all of them.

Concurrency: everything here runs on the copy's trio loop; `limit` and `run` share the
set of running limits between awaits only."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import trio

from ebsfs.service.retry import THROTTLE_MAX_DELAY

TICK = 0.5
"""Seconds between two looks at the throttling count."""
RECENT = THROTTLE_MAX_DELAY + 2.0
"""Seconds after the last throttling answer during which the service still counts as
throttling: a throttled call sleeps up to THROTTLE_MAX_DELAY before it asks again."""


class Patience:
    """Per-block time limits, lengthened while the service throttles. `throttles()`
    is the count of throttling answers so far; `on_throttled(count)` is told whenever
    it grows (progress shows it)."""

    def __init__(
        self,
        timeout: float,
        budget: float,
        throttles: Callable[[], int],
        on_throttled: Callable[[int], None] | None = None,
        tick: float = TICK,
    ) -> None:
        self.timeout = timeout
        self.budget = budget
        self.throttles = throttles
        self.on_throttled = on_throttled
        self.tick = tick
        self._granted: dict[trio.CancelScope, float] = {}
        """The limits running, with the seconds added to each so far."""
        self._stopped = trio.Event()

    @contextmanager
    def limit(self) -> Iterator[trio.CancelScope]:
        """A scope that gives up after `timeout`, plus the throttled time granted
        while it runs (check its `cancelled_caught`)."""
        scope = trio.CancelScope(deadline=trio.current_time() + self.timeout)
        self._granted[scope] = 0.0
        try:
            with scope:
                yield scope
        finally:
            del self._granted[scope]

    def stop(self) -> None:
        """End `run` (the copy is done)."""
        self._stopped.set()

    async def run(self) -> None:
        """Watch the throttling count until `stop` (start it in the copy's nursery)."""
        seen = self.throttles()
        last = -math.inf
        while True:
            with trio.move_on_after(self.tick):
                await self._stopped.wait()
            if self._stopped.is_set():
                return
            count = self.throttles()
            now = trio.current_time()
            if count > seen:
                seen, last = count, now
                if self.on_throttled is not None:
                    self.on_throttled(count)
            if now - last <= RECENT:
                self.grant(self.tick)

    def grant(self, seconds: float) -> None:
        """Add `seconds` to every running limit that has budget left."""
        for scope, granted in self._granted.items():
            extra = min(seconds, self.budget - granted)
            if extra > 0:
                scope.deadline += extra
                self._granted[scope] = granted + extra
