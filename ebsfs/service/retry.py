"""The one retry policy: which failures are retried, how long to back off, when to stop.

Shaped by the kind of failure: throttling (RequestThrottledException) is the service
asking us to wait, not something broken, so a caller gives it a budget of its own, in
seconds of waiting, that no count of attempts cuts short (`ebsfs get` an hour, a read
its read timeout);
everything else retried (5xx, dropped connections, bad bodies) is bounded by attempts
and wall time, so a kernel read never waits forever."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from ebsfs.errors import RetriesExhausted, Throttled, TransientError

log = logging.getLogger(__name__)
T = TypeVar("T")

THROTTLE_MAX_DELAY = 10.0
"""Longest single wait after a throttling answer: long enough to let a busy account
breathe, short enough that a copy resumes within seconds once it is quiet again."""
COPY_THROTTLE_WAIT = 3600.0
"""Seconds of throttling a copy waits out per call by default (`get --throttle-wait`):
a copy left running overnight must not fail because the account is busy."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter (AWS's recommendation), bounded both in
    attempts and in wall time so a kernel read never waits forever; throttling waited
    out within `throttle_budget` when one is given."""

    attempts: int = 8
    base_delay: float = 0.05
    max_delay: float = 5.0
    deadline: float = 120.0
    throttle_budget: float | None = None
    """Seconds one call may spend waiting out throttling, however many answers that
    takes: a copy's `--throttle-wait` (an hour), a mount's or `ebsfs.open`'s read
    timeout (a read that cannot wait longer gets EIO then). None: a throttling answer
    is one more failed attempt, within `attempts` and `deadline` (the checks before a
    mount or a copy, which fail fast)."""
    throttle_max_delay: float = THROTTLE_MAX_DELAY

    def delay(self, attempt: int, cap: float | None = None) -> float:
        """Seconds to wait before retry number `attempt` (1-based), at most `cap`
        (default: max_delay)."""
        top = self.max_delay if cap is None else cap
        return random.uniform(0, min(top, self.base_delay * 2**attempt))

    def call(
        self, what: str, fn: Callable[[], T], sleep: Callable[[float], None] = time.sleep
    ) -> T:
        """Run `fn`, retrying transient failures and throttling; other errors pass through."""
        started = time.monotonic()
        failures = 0
        """Failed attempts that count against `attempts` (all of them without a budget)."""
        throttled = 0
        waited = 0.0
        """Seconds slept after throttling answers (not counted against `deadline`)."""
        while True:
            try:
                return fn()
            except (TransientError, Throttled) as err:
                elapsed = time.monotonic() - started
                budget = self.throttle_budget
                if isinstance(err, Throttled) and budget is not None:
                    throttled += 1
                    if waited >= budget:
                        raise RetriesExhausted(
                            f"{what}: still throttled after waiting {waited:.0f}s "
                            f"({throttled} throttling answers; the budget is {budget:g}s): {err}"
                        ) from err
                    # The last wait is cut to what is left: the budget is all used.
                    wait = min(self.delay(throttled, self.throttle_max_delay), budget - waited)
                    waited += wait
                else:
                    failures += 1
                    wait = self.delay(failures)
                    if failures >= self.attempts or elapsed - waited + wait > self.deadline:
                        raise RetriesExhausted(
                            f"{what}: gave up after {failures + throttled} attempts in "
                            f"{elapsed:.1f}s: {err}"
                        ) from err
                log.debug(
                    "%s: attempt %d failed (%s), retrying in %.2fs",
                    what,
                    failures + throttled,
                    err,
                    wait,
                )
                sleep(wait)
