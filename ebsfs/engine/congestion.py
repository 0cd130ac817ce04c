"""When more calls in flight only add latency: the read-ahead depth is sized by the
latency of quick answers (remote.LatencyEstimate) times the service's per-snapshot
rate, which is right while the latency does not depend on us. A server whose answers
slow down as more calls arrive (its own queue, a proxy, an overloaded front end) turns
that into a loop: more calls, slower answers, a wider window, more calls, up to the
fetch limit, every block then waiting behind hundreds of others while the blocks per
second stay what the server can do.

The guard keeps the latency seen with few calls out (the floor) and lets the depth be
sized by at most INFLATION x the floor: once answers are slower than that, extra calls
are queueing, not flowing. The floor is measured again every FLOOR_LIFETIME by a
short probe with PROBE_DEPTH calls out (what TCP BBR does for its minimum round trip),
so a service that really became slower (a farther region, a slower path) is followed
within seconds, while a queue we built ourselves is not taken for it. Trio thread
only; pure bookkeeping, the caller says what time it is."""

from __future__ import annotations

INFLATION = 2.5
"""Quick answers this many times slower than the floor count as queueing. Not less: a
mount bound by its own CPU (TLS at 20 ms, 2 cores) sees its quick answers 1.2-1.6
times the floor from waiting for the GIL, and its throughput fell 6 % when the depth
was held to 1.5 times (docs/performance.md)."""
FLOOR_LIFETIME = 10.0
"""Seconds a floor is trusted before it is measured again."""
PROBE_DEPTH = 4
"""Calls out while the floor is measured."""
PROBE_SECONDS = 0.2
"""A probe lasts this long, or two floors if longer: the calls out before it end first."""
PROBE_SAMPLES = 4
"""Answers of calls started during a probe needed to set the floor from it."""


class CongestionGuard:
    def __init__(self) -> None:
        self.floor: float | None = None
        self._floor_since = 0.0
        self._probe_from: float | None = None
        self._probe_until = 0.0
        self._probe_answers: list[float] = []
        self.probes = 0
        """Probes made (for tests and stats)."""

    def answered(self, started: float, seconds: float, quick: float, now: float) -> None:
        """A call started at `started` took `seconds`; `quick` is the latency estimate
        of quick answers now (remote.LatencyEstimate.seconds)."""
        if self._probe_from is not None:
            if started >= self._probe_from:
                self._probe_answers.append(seconds)
            if now >= self._probe_until and len(self._probe_answers) >= PROBE_SAMPLES:
                self._set_floor(min(self._probe_answers), now)
                self._probe_from = None
            return
        if self.floor is None or quick <= self.floor:
            self._set_floor(quick, now)
        elif now - self._floor_since >= FLOOR_LIFETIME and quick > INFLATION * self.floor:
            self._probe_from = now
            self._probe_until = now + max(PROBE_SECONDS, 2 * self.floor)
            self._probe_answers = []
            self.probes += 1
        elif now - self._floor_since >= FLOOR_LIFETIME:
            self._floor_since = now  # still within the floor's range: trusted on

    def _set_floor(self, seconds: float, now: float) -> None:
        self.floor = seconds
        self._floor_since = now

    def probing(self) -> bool:
        return self._probe_from is not None

    def latency_for_depth(self, quick: float) -> float:
        """The latency the depth may be sized by: the quick answers', up to INFLATION
        times the floor."""
        if self.floor is None:
            return quick
        return min(quick, INFLATION * self.floor)
