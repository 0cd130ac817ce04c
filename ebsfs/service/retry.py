"""The one retry policy: which failures are retried, how long to back off, when to stop."""

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


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter (AWS's recommendation), bounded both in
    attempts and in wall time so a kernel read never waits forever."""

    attempts: int = 8
    base_delay: float = 0.05
    max_delay: float = 5.0
    deadline: float = 120.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt` (1-based)."""
        return random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))

    def call(
        self, what: str, fn: Callable[[], T], sleep: Callable[[float], None] = time.sleep
    ) -> T:
        """Run `fn`, retrying transient failures and throttling; other errors pass through."""
        started = time.monotonic()
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except (TransientError, Throttled) as err:
                elapsed = time.monotonic() - started
                wait = self.delay(attempt)
                if attempt == self.attempts or elapsed + wait > self.deadline:
                    raise RetriesExhausted(
                        f"{what}: gave up after {attempt} attempts in {elapsed:.1f}s: {err}"
                    ) from err
                log.debug("%s: attempt %d failed (%s), retrying in %.2fs", what, attempt, err, wait)
                sleep(wait)
        raise AssertionError("unreachable")
