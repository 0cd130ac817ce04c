"""The direct path's connections as a managed resource (issue 27): kept-alive connections
any worker thread may take, a bounded number of connects in progress, and a connect
that does not complete within a short deadline tried again on a fresh socket.

Why: one connection per worker thread opened a connection for every thread that ever
ran a call (about 216 per GiB read), and a read-ahead window opening sent a burst of
SYNs at once. Against a small listen queue (5: any stdlib-based server) the kernel
drops the SYNs that overflow it and the client sends them again after 1 s, then 3 s:
a sequential reader waited a second behind the one block whose connection was stuck.
Here a reader needs no more connections than the calls it keeps in flight, at most
MAX_CONNECTING connects are in progress at a time, fewer while connects are lost, and a
connect not done within a few times the connect times seen so far is abandoned and
tried again on a fresh socket.

The TCP connect and the TLS handshake have deadlines of their own. A TCP connect is
answered by the server's kernel, at once unless its SYN was dropped. A handshake waits
for the server's application: its accept loop takes the connects queued in its listen
queue one at a time, so a handshake's deadline grows with our connects that may be
queued ahead of it: every other attempt that overlaps it, those begun after it too,
since threads race to send their SYNs and the queue's order is not the order the
attempts began in.
Why: with one deadline for both, a burst of 16 connects to a server that accepts 20
connections a second abandoned the later ones as lost; each abandoned socket still took
its turn at the accept loop, and 48 of them a run held a 1 GiB read over TLS at 20 ms
at 181 MB/s instead of 290 (docs/performance.md). A handshake that hangs with nothing
ahead of it (a server that accepted but never answers) is still left within the short
deadline. Why count those begun after: counting only those under way when a handshake
began, 8 connects at once to a server accepting 20 a second, beside 3 busy threads in
the client's process (the server in it too, as in a test), abandoned 12 connects in
10 bursts; counting those begun after too, none.

Connects run on threads of their own, and every connection, new or given back, goes to
the call that has waited longest (calls start in block order: the block a reader needs
next is served first). Why: when each call opened its own connection, a call stuck at
the end of a slow server's accept queue (16 connects at 20 accepts a second: 0.8 s)
held the block a reader needed while the connections opened before it sat idle,
given back after 25 ms; a reader of 60 % of 2 GiB over TLS at 20 ms stalled 4 times a
run so (docs/performance.md).

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
"""Seconds between looks at a call's Abandon while a thread waits for a connect slot to
replace a connection the server closed."""

Connector = Callable[[float, Callable[[], float]], http1.Connection]
"""Opens a connection: the TCP connect within the seconds given, the TLS handshake
within the deadline the function gives (asked again each time it is reached)."""


def given_up(what: str) -> ReadFailed:
    """What a call nobody waits for any more ends with: not retried."""
    return ReadFailed(f"{what}: given up, the read that asked for it is gone")


class ConnectTimes:
    """The recent connect (or handshake) times, and the short deadline they give."""

    def __init__(self) -> None:
        self._times: collections.deque[float] = collections.deque(maxlen=SAMPLES)

    def add(self, seconds: float) -> None:
        """A connect (or a handshake) that completed with no segment lost."""
        self._times.append(seconds)

    def timed(self) -> bool:
        """Whether any completed yet."""
        return bool(self._times)

    def deadline(self, ceiling: float) -> float:
        """DEADLINE_FACTOR x the 90th percentile, within [DEADLINE_FLOOR, ceiling];
        `ceiling` itself before any connect completed (nothing to judge by)."""
        if not self._times:
            return ceiling
        ordered = sorted(self._times)
        p90 = ordered[min(len(ordered) - 1, (len(ordered) * 9) // 10)]
        return min(ceiling, max(DEADLINE_FLOOR, DEADLINE_FACTOR * p90))


class Waiter:
    """A call waiting for a connection: handed one, or the failure of a connect made for
    the calls waiting, by whichever thread has it."""

    __slots__ = ("handed", "conn", "error")

    def __init__(self) -> None:
        self.handed = threading.Event()
        self.conn: http1.Connection | None = None
        self.error: BaseException | None = None


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
        self._waiting: collections.deque[Waiter] = collections.deque()
        """Calls waiting for a connection, the longest waiting first."""
        self._connecting = 0
        self._trying = 0
        """Connect attempts under way (claimed connects not yet begun are not counted)."""
        self._attempts = 0
        """Connect attempts begun so far (a handshake's deadline counts those begun
        while it waits)."""
        self._waiters = 0
        """Threads waiting for a connect slot to replace a closed connection."""
        self._times = ConnectTimes()
        """TCP connects."""
        self._handshakes = ConnectTimes()
        """TLS handshakes, each divided by 1 + the connects ahead of it."""
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
        """An idle connection, or the first one given back or opened for the calls
        waiting, once every call that waited longer has one."""
        with self._lock:
            if self._idle:  # never while calls wait: give() hands to them first
                return self._idle.pop()
            waiter = Waiter()
            self._waiting.append(waiter)
            connects = self._claim_connects()
        self._start_connects(connects)
        if gone is None:
            waiter.handed.wait()
        else:
            with gone.hook(waiter.handed.set):
                waiter.handed.wait()
            with self._lock:
                if waiter.conn is None and waiter.error is None:  # woken by the Abandon
                    self._waiting.remove(waiter)
                    raise given_up(what)
        if waiter.error is not None:
            raise waiter.error
        assert waiter.conn is not None
        return waiter.conn

    def replace(self, what: str, gone: http1.Abandon | None) -> http1.Connection:
        """A new connection for one the server had closed while it sat idle (an idle
        one might be closed too: the request is resent once only)."""
        with self._lock:
            self._wait_for_slot(what, gone)
            self._connecting += 1
            self.reopened += 1
        try:
            return self._open()
        finally:
            # Its slot is free: calls that came to wait while it was taken (none claimed
            # a connect for them then) get theirs now, whether this connect failed or not.
            with self._lock:
                connects = self._claim_connects()
            self._start_connects(connects)

    def give(self, conn: http1.Connection) -> None:
        """A connection free for another exchange: to the call that has waited longest,
        or kept idle."""
        with self._lock:
            if self._waiting:
                waiter = self._waiting.popleft()
                waiter.conn = conn
                waiter.handed.set()
                return
            self._idle.append(conn)
            if self._waiters:
                self._ready.notify()

    def discard(self, conn: http1.Connection) -> None:
        conn.close()
        with self._lock:
            self.open_now -= 1

    def counters(self) -> dict[str, int | float]:
        """What `ebsfs stats` shows of the connections (handshake_deadline_ms once a
        TLS handshake was timed)."""
        with self._lock:
            counters: dict[str, int | float] = {
                "opened": self.opened,
                "reopened_stale": self.reopened,
                "connects_abandoned": self.abandoned,
                "open": self.open_now,
                "idle": len(self._idle),
                "peak_connecting": self.peak_connecting,
                "connect_slots": round(self._slots, 1),
                "connect_deadline_ms": round(self._times.deadline(self._timeout) * 1000, 1),
            }
            if self._handshakes.timed():
                deadline = self._handshakes.deadline(self._timeout)
                counters["handshake_deadline_ms"] = round(deadline * 1000, 1)
            return counters

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

    def _claim_connects(self) -> int:
        """Under the lock: connect slots taken for the calls waiting that no connect
        under way will serve (the connects are started once the lock is released)."""
        wanted = min(len(self._waiting), int(self._slots)) - self._connecting
        if wanted <= 0:
            return 0
        self._connecting += wanted
        self.peak_connecting = max(self.peak_connecting, self._connecting)
        return wanted

    def _start_connects(self, count: int) -> None:
        for started in range(count):
            thread = threading.Thread(
                target=self._connect_for_waiting, name="ebsfs-connect", daemon=True
            )
            try:
                thread.start()
            except RuntimeError as err:  # no thread to be had: calls fail, none hangs
                with self._lock:
                    self._connecting -= count - started
                    for _ in range(count - started):  # one for each connect not started
                        self._fail_longest_waiting(err)
                return

    def _fail_longest_waiting(self, err: BaseException) -> bool:
        """Under the lock: the call that has waited longest ends with `err`."""
        if not self._waiting:
            return False
        waiter = self._waiting.popleft()
        waiter.error = err
        waiter.handed.set()
        return True

    def _connect_for_waiting(self) -> None:
        """On a thread of its own: a new connection for the call that has waited longest
        by then; if the connect failed, that call fails with its error (its retries
        decide what next), and more connects start while calls still wait."""
        try:
            conn = self._open()
        except Exception as err:
            with self._lock:
                told = self._fail_longest_waiting(err)
                connects = self._claim_connects()
            if not told:
                log.debug("a connect nobody waits for any more failed: %s", err)
        else:
            self.give(conn)
            with self._lock:
                connects = self._claim_connects()
        self._start_connects(connects)

    def _open(self) -> http1.Connection:
        """A new connection (this thread holds a connect slot, freed here): up to
        SHORT_TRIES connects within the short deadlines, each on a fresh socket, then
        one within the full connect timeout."""
        try:
            for _ in range(SHORT_TRIES):
                with self._lock:
                    deadline = self._times.deadline(self._timeout)
                    short = self._handshakes.deadline(self._timeout)
                if deadline >= self._timeout and short >= self._timeout:
                    break
                try:
                    return self._attempt(deadline, short)
                except TimeoutError:
                    with self._lock:
                        self.abandoned += 1
                        now = time.monotonic()
                        if now - self._cut_at > deadline:
                            self._cut_at = now
                            floor = min(MIN_CONNECTING, self._max_connecting)
                            self._slots = max(floor, self._slots / 2)
                    log.debug(
                        "a connect took over %.0f ms (or its TLS handshake over %.0f ms x "
                        "the connects queued with it): abandoned, tried again",
                        deadline * 1e3,
                        short * 1e3,
                    )
            return self._attempt(self._timeout, self._timeout)
        finally:
            with self._lock:
                self._connecting -= 1
                if self._waiters:
                    self._ready.notify()

    def _attempt(self, seconds: float, short_handshake: float) -> http1.Connection:
        """One connect on a fresh socket: the TCP connect within `seconds`, the handshake
        within `short_handshake` x (1 + the other attempts that overlap it). Its times are
        kept (a handshake's divided by 1 + the attempts under way when it began: its
        place in the server's queue, as near as we can tell)."""
        with self._lock:
            ahead = self._trying
            begun = self._attempts
            self._trying += 1
            self._attempts += 1

        def handshake_deadline() -> float:
            # Our attempts reach the server's accept queue in an order their threads race
            # for, so any attempt that overlaps this one may be served first.
            with self._lock:
                overlapping = ahead + self._attempts - begun - 1
            return min(self._timeout, short_handshake * (1 + overlapping))

        try:
            conn = self._connect(seconds, handshake_deadline)
        finally:
            with self._lock:
                self._trying -= 1
        # A connect whose SYN was dropped and sent again took a second or more: timed,
        # it would raise the deadline until short tries no longer helped.
        clean = not conn.retransmitted()
        with self._lock:
            if clean:
                self._times.add(conn.connect_seconds)
                if conn.handshake_seconds is not None:
                    self._handshakes.add(conn.handshake_seconds / (1 + ahead))
                self._slots = min(self._max_connecting, self._slots + 1 / self._slots)
            self.opened += 1
            self.open_now += 1
        return conn
