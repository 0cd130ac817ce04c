"""Hedged GetSnapshotBlock calls: a call outstanding well past the recent 95th
percentile of answers is asked again, and the first good answer wins ("The Tail at
Scale", Dean and Barroso, 2013).

Why: a sequential reader waits on the one block whose call is slow (a dropped SYN
retried after a second, a server's slow tail, a connection stuck behind a lost packet)
and everything behind it waits too; a second call usually answers at the usual pace.
Bounded: hedges add at most HEDGE_FRACTION to the calls over time (a token bucket filled
by every call that ends, HEDGE_BURST deep), MAX_HEDGES per call at the most, on at most
HEDGE_THREADS threads of their own (each call on another pooled connection).

How, without a cost per call on the trio thread: the worker thread of each call
registers it (a dict insert under a lock) and runs it; a watchdog thread looks at the
oldest calls every TICK and starts the hedge of one past its time in a hedge thread,
into a room of its own. Whichever ends first with a block wins: a hedge that wins fires
the first call's Abandon (its exchange is shut down), and the first call's own worker
thread, once out of its exchange, returns the hedge's block. So the bytes handed on are
verified, and the room the first call was receiving into is never written again after
they are (the thread that wrote it is the one returning). Only calls that can be
abandoned are hedged: the direct GET path (a boto3 call cannot be interrupted, and its
thread would return no sooner)."""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ebsfs.constants import BLOCK_SIZE
from ebsfs.service.api import Block
from ebsfs.service.http1 import Abandon, abandonable, current_abandon

log = logging.getLogger(__name__)

HEDGE_FRACTION = 0.015
"""Hedges per call at the most, over time: room under 2 % extra calls for retries."""
HEDGE_BURST = 8.0
"""Hedges that may go at once after a quiet spell (the bucket's size)."""
HEDGE_AFTER = 1.2
"""A call is hedged once outstanding this many times the recent 95th percentile. A
sequential reader waits on a slow call until its hedge answers, so the sooner the
better, while normal answers must stay clear of it (with the emulator's uniform
jitter of half the latency, the slowest normal answers take 1.03 times the 95th
percentile). Against a server
with 1 % of calls 10x slower, 1.2 gave 1.30x (200 ms, 60 % written, 5 rounds; slowest
run 1.37x) and 1.16x (100 ms) the throughput of 1.5, which had given 1.12-1.23x that
of 2; CPU, plain and TLS servers level (docs/performance.md). The budget
(HEDGE_FRACTION) bounds the extra calls either way."""
MIN_HEDGE_DELAY = 0.02
"""Seconds a call is given at the least: on a LAN or from a local cache answers take a
millisecond, and a pause of this machine's own (a GC, a busy CPU) looks like a slow
call; hedging those would only add calls to a busy moment."""
MIN_SAMPLES = 32
"""Answers timed before the delay follows their 95th percentile..."""
EARLY_SAMPLES = 4
"""...and before that, from this many answers on, a call is hedged once outstanding
EARLY_AFTER times their median, and at least EARLY_FLOOR seconds: a cautious delay
from few answers, never a guess from none. Why: a mount's first calls were never
hedged, and one slow call among them held the first read for a whole slow answer
(1.0-1.2 s at 100 ms a call with 1 % of calls 10x slower: 3 of 22 traced mounts,
docs/performance.md)."""
EARLY_AFTER = 3.0
EARLY_FLOOR = 0.5
"""Not less: a call to a local endpoint answers in a millisecond, and a pause of this
machine's own (a TLS handshake on a busy CPU, a GC) must not look like a slow call
before the percentile knows better. At 100 ms a call the slow tail's answers take
1-1.5 s, so the floor still saves most of one."""
MAX_HEDGES = 2
"""Calls made again per call at the most: a hedge that meets the slow tail itself (one
in a hundred of them, with 1 % of calls slow) held its reader 0.8-1.0 s in traces, so a
hedge outstanding past the delay is hedged once more, from the same budget."""
HEDGE_THREADS = 8
THROTTLE_PAUSE = 5.0
"""Seconds without hedging after the service last throttled: a call sleeping out
throttling is slow for our own back-off, and a second call would only add load."""
PER_TICK = 1
"""Hedges started per look at the most, the oldest call first. Why: calls that pass the
delay together were mostly held by one cause (this machine's CPU, the server's), and
answer a moment later; hedged, they spent the budget (two in five hedges lost, their
first call answering within 70 ms) until a call of the slow tail found none left
(docs/performance.md). One a look lets those answer, and a truly slow call is hedged a
look or two later."""
TICK = 0.02
"""Seconds between the watchdog's looks (a hedge starts up to this late). Not less: at
5 ms its wake-ups, each taking the GIL from the worker threads, cost a mount 3-4 % more
CPU per block over TLS (bench_ab, docs/performance.md)."""

GetInto = Callable[[memoryview | None], Block]
"""One GetSnapshotBlock call (retries included) into a room, or into bytes of its own."""


@dataclass
class HedgeCounts:
    sent: int = 0
    """Second calls made."""
    won: int = 0
    """Of those, the ones whose answer was used."""


class _Call:
    """One call and its hedges (guarded by Hedger._lock). What only a hedge needs is
    made when the first one starts: most calls are never hedged, and every object made
    per call costs the worker threads GIL time (an Event and an Abandon of its own per
    call, a dataclass and a context manager around the call were a quarter of what
    hedging cost a mount in GIL time, `py-spy --gil`, docs/performance.md)."""

    __slots__ = (
        "get", "started", "gone", "hedge_gone", "hedges", "running", "hedged_at", "ended",
        "winner", "hedge_done",
    )  # fmt: skip

    def __init__(self, get: GetInto, started: float, gone: Abandon | None) -> None:
        self.get = get
        self.started = started
        self.gone = gone
        """The first call's Abandon (fired when the hedge wins, or by a read giving up)."""
        self.hedge_gone: Abandon | None = None
        """Fired when no hedge is needed any more (ends all of them); made, and hooked
        to `gone`, when the first hedge starts."""
        self.hedges = 0
        """Hedges started (MAX_HEDGES at the most)."""
        self.running = 0
        """Of those, the ones not yet ended."""
        self.hedged_at = 0.0
        """When the last hedge started: the next is due a delay after it."""
        self.ended = False
        """The first call's thread returned: a hedge ending later is dropped."""
        self.winner: Block | None = None
        self.hedge_done: threading.Event | None = None
        """Set once a hedge won or every hedge started has ended (made with hedge_gone)."""

    def start_hedge(self, now: float) -> None:
        """Under Hedger._lock: one more hedge under way (the first makes its state)."""
        if self.hedge_gone is None:
            self.hedge_gone = Abandon()
            self.hedge_done = threading.Event()
            if self.gone is not None:  # a read giving up ends the hedges too
                self.gone.add(self.hedge_gone.fire)
        assert self.hedge_done is not None
        self.hedges += 1
        self.running += 1
        self.hedged_at = now
        self.hedge_done.clear()  # the first call is out: nobody waits on it yet


class Hedger:
    """Hedges the calls run through `run` (one per engine)."""

    def __init__(
        self,
        fraction: float = HEDGE_FRACTION,
        burst: float = HEDGE_BURST,
        after: float = HEDGE_AFTER,
        min_delay: float = MIN_HEDGE_DELAY,
        keep: int = 256,
        throttles: Callable[[], int] | None = None,
    ) -> None:
        """`throttles`: the count of throttling answers so far (EbsApi.get_throttles),
        read by the watchdog: no hedge within THROTTLE_PAUSE of one."""
        self._throttles = throttles
        self._throttles_seen = 0
        self._calm_from = 0.0
        self.fraction = fraction
        self.burst = burst
        self.after = after
        self.min_delay = min_delay
        self.counts = HedgeCounts()
        self._tokens = burst
        self._recent: collections.deque[float] = collections.deque(maxlen=keep)
        self._answers = 0
        """Calls answered by their first try (the delay is worked out again every 16)."""
        self._answers_seen = 0
        self._delay: float | None = None
        self._lock = threading.Lock()
        self._calls: dict[int, _Call] = {}
        """Outstanding calls, oldest first (dicts keep insertion order)."""
        self._numbers = itertools.count()
        self._pool: ThreadPoolExecutor | None = None
        self._watchdog: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        """Set when a call registers: the watchdog sleeps on it while none is out."""

    # ---- the worker threads ----------------------------------------------------------

    def run(self, get: GetInto, into: memoryview | None) -> Block:
        """`get(into)` in this (worker) thread, hedged if it is slow. Returns the first
        call's block or the hedge's (in a room of its own), whichever ended first."""
        call = _Call(get, time.monotonic(), current_abandon())
        number = next(self._numbers)
        with self._lock:
            self._calls[number] = call
        if not self._wake.is_set():
            self._wake.set()
        self._ensure_watchdog()
        try:
            block = get(into)
        except Exception:
            with self._lock:
                del self._calls[number]
                call.ended = True
                hedged = call.hedges > 0  # none starts once ended
            if not hedged:
                raise
            self._unhook(call)
            assert call.hedge_done is not None
            call.hedge_done.wait()  # it ends by its own deadlines, or at once if fired
            if call.winner is None:
                raise
            return call.winner
        with self._lock:
            del self._calls[number]
            call.ended = True
            if call.winner is not None:  # both answered: this one's block is used
                self.counts.won -= 1
                call.winner = None
            self._answers += 1
            self._tokens = min(self.burst, self._tokens + self.fraction)
        if call.hedges:
            self._unhook(call)
            assert call.hedge_gone is not None
            call.hedge_gone.fire()  # nobody needs the hedges any more
        self._recent.append(time.monotonic() - call.started)
        return block

    @staticmethod
    def _unhook(call: _Call) -> None:
        """The first call is out: its read giving up no longer concerns the hedges."""
        if call.gone is not None and call.hedge_gone is not None:
            call.gone.discard(call.hedge_gone.fire)

    def delay(self) -> float | None:
        """Seconds after which a call is hedged; None until enough answers were timed."""
        return self._delay

    # ---- the watchdog ----------------------------------------------------------------

    def _ensure_watchdog(self) -> None:
        if self._watchdog is not None:
            return
        with self._lock:
            if self._watchdog is not None:
                return
            self._pool = ThreadPoolExecutor(HEDGE_THREADS, thread_name_prefix="ebsfs-hedge")
            self._watchdog = threading.Thread(target=self._watch, name="ebsfs-hedger", daemon=True)
            self._watchdog.start()

    def close(self) -> None:
        """Stop the watchdog; hedges under way end by their own deadlines."""
        self._stop.set()
        self._wake.set()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _watch(self) -> None:
        while not self._stop.wait(TICK):
            if not self._calls:
                self._wake.clear()
                if not self._calls:  # a call registering now sets it again
                    self._wake.wait(1.0)
                continue
            answers = self._answers - self._answers_seen
            if answers >= 16 or (answers and len(self._recent) < MIN_SAMPLES):
                self._answers_seen = self._answers
                self._update_delay()
            delay = self._delay
            if delay is None:
                continue
            now = time.monotonic()
            if self._throttles is not None:
                throttles = self._throttles()
                if throttles != self._throttles_seen:
                    self._throttles_seen = throttles
                    self._calm_from = now + THROTTLE_PAUSE
            if now < self._calm_from:
                continue
            due: list[_Call] = []
            with self._lock:
                # Once a look: under the lock no answer adds a token, and with PER_TICK 1
                # none is spent before the loop ends.
                wait = delay * self._scarcity()
                for call in self._calls.values():
                    if now - call.started < wait:
                        break  # the rest started later
                    if call.hedges >= MAX_HEDGES or now - call.hedged_at < wait:
                        continue
                    if call.gone is not None and call.gone.fired:
                        continue
                    if self._tokens < 1.0:
                        break
                    self._tokens -= 1.0
                    call.start_hedge(now)
                    due.append(call)
                    if len(due) >= PER_TICK:
                        break
            for call in due:
                self._start_hedge(call)

    def _scarcity(self) -> float:
        """The delay's factor for the next hedge: 1 while half the bucket or more is
        left, up to 2 as it empties. Why: the budget (1.5 %) is below the share of
        calls past 1.2x the 95th percentile on a loaded machine, and an empty bucket
        left a call of the slow tail unhedged (a reader held 0.8-1.1 s,
        docs/performance.md); with few tokens left, they go to calls far later than
        usual, not to those the first answer would beat by a few milliseconds (two in
        five hedges were lost so)."""
        half = self.burst / 2
        return 1.0 + max(0.0, 1.0 - self._tokens / half) if half > 0 else 1.0

    def _update_delay(self) -> None:
        ordered = sorted(self._recent)
        count = len(ordered)
        if count < EARLY_SAMPLES:
            return
        if count < MIN_SAMPLES:
            self._delay = max(self.min_delay, EARLY_FLOOR, EARLY_AFTER * ordered[count // 2])
            return
        p95 = ordered[min(count - 1, int(count * 0.95))]
        self._delay = max(self.min_delay, self.after * p95)

    def _start_hedge(self, call: _Call) -> None:
        self.counts.sent += 1
        assert self._pool is not None
        assert call.hedge_done is not None and call.hedge_gone is not None
        try:
            self._pool.submit(self._hedge, call)
        except RuntimeError:  # shut down
            with self._lock:
                call.running -= 1
                if call.running == 0:
                    call.hedge_done.set()

    # ---- the hedge threads -----------------------------------------------------------

    def _hedge(self, call: _Call) -> None:
        assert call.hedge_done is not None and call.hedge_gone is not None
        try:
            with abandonable(call.hedge_gone):
                block = call.get(memoryview(bytearray(BLOCK_SIZE)))
        except Exception as err:
            log.debug("hedged call failed: %s", err)
            with self._lock:
                call.running -= 1
                if call.running == 0:
                    call.hedge_done.set()
            return
        with self._lock:
            call.running -= 1
            won = not call.ended and call.winner is None
            if won:
                call.winner = block
                self.counts.won += 1
            if won or call.running == 0:
                call.hedge_done.set()
        if won:
            call.hedge_gone.fire()  # another hedge still out is not needed
            if call.gone is not None:
                call.gone.fire()  # the first call's exchange ends; its thread returns `block`

    def report(self) -> dict[str, Any]:
        return {
            "enabled": True,
            "sent": self.counts.sent,
            "won": self.counts.won,
            "delay_seconds": self._delay,
        }
