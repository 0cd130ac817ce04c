"""The direct path's connections as a managed resource (issue 27): kept-alive connections
any worker thread may take, a bounded number of connects in progress, and a connect
that does not complete within a short deadline tried again on a fresh socket.

Why: one connection per worker thread opened a connection for every thread that ever
ran a call (about 216 per GiB read), and a read-ahead window opening sent a burst of
SYNs at once. Against a small listen queue (5: any stdlib-based server) the kernel
drops the SYNs that overflow it and the client sends them again after 1 s, then 3 s:
a sequential reader waited a second behind the one block whose connection was stuck.
Here a reader needs no more connections than the calls it keeps in flight, at most
MAX_CONNECTING connects are in progress at a time, fewer while connects are lost (the
other threads wait for a slot or a connection given back), and a connect (TCP and TLS
handshake together) not done within a few times the connect times seen so far is
abandoned and tried again on a fresh socket.

Concurrency: every field is read and written under the pool's one lock, held only for
a few list and integer operations, never across a connect or an exchange."""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

from ebsfs.errors import ReadFailed
from ebsfs.service import http1

log = logging.getLogger(__name__)

MAX_CONNECTING = 16
"""Connects in progress at a time, per endpoint, at the most. The slots are halved when
a connect is abandoned (at most once per short deadline: one loss event) and grow back
by 1/slots per clean connect, as TCP's window does, never below MIN_CONNECTING. 512
GETs of 150 threads at once against a listen queue of 5 behind a slow accept loop
(emulator --backlog 5 --accept-delay 0.005 --latency 0.1) took 1.0-1.3 s so, 1.8-2.0 s
with 16 slots always, and 23 s with a connection per thread and no deadline; against a
server that keeps up, the same as with 16."""
MIN_CONNECTING = 2
SHORT_TRIES = 3
"""Connects tried with the short deadline before one with the full connect timeout."""
DEADLINE_FACTOR = 3.0
"""The short deadline: this many times the 90th percentile of the recent connects..."""
DEADLINE_FLOOR = 0.05
"""...and at least this many seconds (never more than the configured connect timeout)."""
SAMPLES = 64
"""Recent connect times kept."""
WAIT_STEP = 0.05
"""Seconds between looks at a call's Abandon while a thread waits for a connection."""

Connector = Callable[[float], http1.Connection]
"""Opens a connection within the seconds given (TCP connect and TLS handshake)."""


def given_up(what: str) -> ReadFailed:
    """What a call nobody waits for any more ends with: not retried."""
    return ReadFailed(f"{what}: given up, the read that asked for it is gone")


class ConnectTimes:
    """The recent connect times, and the short deadline they give."""

    def __init__(self) -> None:
        self._times: collections.deque[float] = collections.deque(maxlen=SAMPLES)

    def add(self, seconds: float) -> None:
        """A connect (TCP and TLS handshake) that completed with no segment lost."""
        self._times.append(seconds)

    def deadline(self, ceiling: float) -> float:
        """DEADLINE_FACTOR x the 90th percentile, within [DEADLINE_FLOOR, ceiling];
        `ceiling` itself before any connect completed (nothing to judge by)."""
        if not self._times:
            return ceiling
        ordered = sorted(self._times)
        p90 = ordered[min(len(ordered) - 1, (len(ordered) * 9) // 10)]
        return min(ceiling, max(DEADLINE_FLOOR, DEADLINE_FACTOR * p90))


class Pool:
    """The kept-alive connections to one endpoint (thread-safe): `take` one for an
    exchange, then `give` it back, or `discard` it when it failed or will close."""

    def __init__(
        self, connect: Connector, connect_timeout: float, max_connecting: int = MAX_CONNECTING
    ) -> None:
        self._connect = connect
        self._timeout = connect_timeout
        self._max_connecting = max_connecting
        self._slots = float(max_connecting)
        """Connects allowed in progress now (MAX_CONNECTING's rule)."""
        self._cut_at = -1e9
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._idle: list[http1.Connection] = []
        """Given back, the most recent last (taken first: the least likely closed)."""
        self._connecting = 0
        self._waiters = 0
        self._times = ConnectTimes()
        self.opened = 0
        """Connections opened, replacements included."""
        self.reopened = 0
        """Of those, replacements of a kept-alive connection the server had closed."""
        self.abandoned = 0
        """Connects abandoned at their short deadline (and tried again)."""
        self.open_now = 0
        """Connections open: idle or in use."""
        self.peak_connecting = 0
        """The most connects in progress at once so far."""

    def take(self, what: str, gone: http1.Abandon | None) -> http1.Connection:
        """An idle connection, or a new one once a connect slot is free."""
        with self._lock:
            if self._idle:
                return self._idle.pop()
            self._wait_for_slot(what, gone)
            if self._idle:  # given back while this thread waited
                return self._idle.pop()
            self._connecting += 1
            self.peak_connecting = max(self.peak_connecting, self._connecting)
        return self._open()

    def replace(self, what: str, gone: http1.Abandon | None) -> http1.Connection:
        """A new connection for one the server had closed while it sat idle (an idle
        one might be closed too: the request is resent once only)."""
        with self._lock:
            self._wait_for_slot(what, gone)
            self._connecting += 1
            self.reopened += 1
        return self._open()

    def give(self, conn: http1.Connection) -> None:
        with self._lock:
            self._idle.append(conn)
            if self._waiters:
                self._ready.notify()

    def discard(self, conn: http1.Connection) -> None:
        conn.close()
        with self._lock:
            self.open_now -= 1

    def counters(self) -> dict[str, int | float]:
        """What `ebsfs stats` shows of the connections."""
        with self._lock:
            return {
                "opened": self.opened,
                "reopened_stale": self.reopened,
                "connects_abandoned": self.abandoned,
                "open": self.open_now,
                "idle": len(self._idle),
                "peak_connecting": self.peak_connecting,
                "connect_slots": round(self._slots, 1),
                "connect_deadline_ms": round(self._times.deadline(self._timeout) * 1000, 1),
            }

    def _wait_for_slot(self, what: str, gone: http1.Abandon | None) -> None:
        """Under the lock: until a connect slot or an idle connection is free."""
        while self._connecting >= self._slots and not self._idle:
            if gone is not None and gone.fired:
                self._ready.notify()  # a wakeup this thread may have had goes on
                raise given_up(what)
            self._waiters += 1
            try:
                self._ready.wait(WAIT_STEP if gone is not None else 1.0)
            finally:
                self._waiters -= 1

    def _open(self) -> http1.Connection:
        """A new connection (this thread holds a connect slot, freed here): up to
        SHORT_TRIES connects within the short deadline, each on a fresh socket, then
        one within the full connect timeout."""
        try:
            for _ in range(SHORT_TRIES):
                with self._lock:
                    deadline = self._times.deadline(self._timeout)
                if deadline >= self._timeout:
                    break
                try:
                    return self._timed(deadline)
                except TimeoutError:
                    with self._lock:
                        self.abandoned += 1
                        now = time.monotonic()
                        if now - self._cut_at > deadline:
                            self._cut_at = now
                            floor = min(MIN_CONNECTING, self._max_connecting)
                            self._slots = max(floor, self._slots / 2)
                    log.debug("a connect took over %.0f ms: abandoned, tried again", deadline * 1e3)
            return self._timed(self._timeout)
        finally:
            with self._lock:
                self._connecting -= 1
                if self._waiters:
                    self._ready.notify()

    def _timed(self, seconds: float) -> http1.Connection:
        started = time.monotonic()
        conn = self._connect(seconds)
        took = time.monotonic() - started
        # A connect whose SYN was dropped and sent again took a second or more: timed,
        # it would raise the deadline until short tries no longer helped.
        clean = not conn.retransmitted()
        with self._lock:
            if clean:
                self._times.add(took)
                self._slots = min(self._max_connecting, self._slots + 1 / self._slots)
            self.opened += 1
            self.open_now += 1
        return conn
