"""The cluster-wide limit on GetSnapshotBlock calls per second (`ebsfs scan
--max-rate`): one `SlidingWindow` for the whole sweep, living in a Dask actor, hands
out grants of calls; each scan task's `LocalLimiter` (the engine's rate_limiter hook,
called before every GetSnapshotBlock attempt) asks it for as many as its threads are
waiting for, and spends them at once.

Why an actor holding a sliding window, and not the alternatives Dask offers:
- a distributed Semaphore bounds calls in flight, not calls per second (100 ms calls
  at 100 in flight are 1,000/s; at 10 ms they are 10,000/s), and its lease per call is
  a scheduler round trip per block;
- a Variable has no atomic read-modify-write: two workers would take the same tokens;
- a token bucket lets a full bucket's burst through on top of the refill: 2x the rate
  over one second, which is what gets an account throttled.
A sliding window of WINDOW seconds never grants more than the limit within any
WINDOW: calls are sent within GRANT_LIFETIME of their grant (later ones are dropped
and asked for again), so any one second at the service's meter sees calls granted
within 1 + GRANT_LIFETIME seconds, and WINDOW leaves 0.15 s more for a granted call's
way to the service's meter (signing, a busy CPU, the network's jitter), which a
tighter window left to chance on a loaded machine. The price: a steady sweep runs at
limit / WINDOW (83 % of it). One actor call grants up to the waiting threads'
worth (at most MAX_GRANT), so a worker at 1,000 calls/s makes tens of actor calls a
second, not a thousand.

The actor lives on one worker: if that worker dies the sweep's tasks fail (their
lines say so) and a rerun resumes. Rate limits of separate sweeps do not add up:
run one sweep per account and region at a time, or give each a share."""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ebsfs.errors import ReadFailed

log = logging.getLogger(__name__)

WINDOW = 1.2
"""Seconds over which at most `limit` calls are granted."""
GRANT_LIFETIME = 0.05
"""Seconds a grant may wait before its calls are sent; what is left after is dropped."""
MAX_GRANT = 64
"""Calls granted at once at the most (a share of the limit, so one busy worker cannot
take a whole window while the others wait)."""
MIN_WAIT = 0.002


class SlidingWindow:
    """At most `limit` calls granted in any WINDOW seconds (the Dask actor: its methods
    run one at a time on its worker, so it needs no lock of its own; a lock is kept
    for use in one process all the same)."""

    def __init__(self, limit: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not limit > 0:
            raise ValueError(f"limit must be > 0, got {limit}")
        self.limit = int(limit) if limit >= 1 else 1
        self.window = WINDOW if limit >= 1 else WINDOW / limit
        self.clock = clock
        self._grants: collections.deque[tuple[float, int]] = collections.deque()
        self._granted = 0
        self._lock = threading.Lock()
        self.total = 0
        """Calls granted since the start (for tests and reports)."""

    def take(self, wanted: int) -> tuple[int, float]:
        """(calls granted now, 0) or, when the window is full, (0, seconds to wait
        before asking again)."""
        wanted = max(1, min(int(wanted), MAX_GRANT, max(1, self.limit // 4)))
        with self._lock:
            now = self.clock()
            while self._grants and self._grants[0][0] <= now - self.window:
                self._granted -= self._grants.popleft()[1]
            room = self.limit - self._granted
            if room <= 0:
                wait = self._grants[0][0] + self.window - now
                return 0, max(MIN_WAIT, wait)
            given = min(room, wanted)
            self._grants.append((now, given))
            self._granted += given
            self.total += given
            return given, 0.0

    def granted(self) -> int:
        return self.total


Take = Callable[[int], tuple[int, float]]
"""SlidingWindow.take, here or through an actor."""


class LocalLimiter:
    """The engine's rate_limiter in one process: `__call__` blocks the worker thread of
    a GetSnapshotBlock attempt until a grant covers it. One thread at a time asks the
    window, for all the threads waiting then; the others wait on the lock."""

    def __init__(self, take: Take, clock: Callable[[], float] = time.monotonic) -> None:
        self._take = take
        self._clock = clock
        self._lock = threading.Lock()
        self._left = 0
        self._until = 0.0
        self._waiting = 0
        self._count_lock = threading.Lock()
        self.asked = 0
        """Calls to the window (actor round trips)."""
        self.dropped = 0
        """Granted calls not sent in time (given up)."""

    def __call__(self) -> None:
        with self._count_lock:
            self._waiting += 1
        try:
            with self._lock:
                while True:
                    now = self._clock()
                    if self._left > 0 and now <= self._until:
                        self._left -= 1
                        return
                    if self._left > 0:
                        self.dropped += self._left
                        self._left = 0
                    with self._count_lock:
                        wanted = self._waiting
                    self.asked += 1
                    given, wait = self._take(wanted)
                    if given:
                        self._left, self._until = given, self._clock() + GRANT_LIFETIME
                    else:
                        time.sleep(wait)
        finally:
            with self._count_lock:
                self._waiting -= 1


def actor_take(actor: Any) -> Take:
    """SlidingWindow.take through a Dask actor handle. The handle binds to its worker
    on first use, which must happen in the task's own thread (the engine's worker
    threads are not Dask's): so it is used once here."""
    actor.granted().result()

    def take(wanted: int) -> tuple[int, float]:
        try:
            given, wait = actor.take(wanted).result()
        except Exception as err:  # the actor's worker lost, the sweep cancelled
            raise ReadFailed(
                f"the sweep's rate limit cannot be reached: {type(err).__name__}: {err}"
            ) from None
        return int(given), float(wait)

    return take
