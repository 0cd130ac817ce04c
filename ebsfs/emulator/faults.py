"""Fault and load knobs of the emulator, plus the per-operation counters tests read."""

from __future__ import annotations

import collections
import dataclasses
import math
import random
import threading
import time
from typing import Any


@dataclasses.dataclass
class Faults:
    """What the emulator does besides answering correctly. Defaults are the real service:
    no injected faults, 7-day block tokens, 60-minute page tokens and the real quotas
    (1,000 GetSnapshotBlock per second per snapshot, 50 list calls per second)."""

    latency: float = 0.0
    """Seconds added to every call."""
    jitter: float = 0.0
    """Up to this many more seconds, uniformly random, added to every call."""
    slow_share: float = 0.0
    """Share of calls (drawn with the seeded dice) whose latency and jitter are
    multiplied by `slow_factor`: a heavy tail, as real services have."""
    slow_factor: float = 1.0
    error_rate: float = 0.0
    """Share of calls answered 500 InternalServerException."""
    corrupt_rate: float = 0.0
    """Share of block bodies with a flipped byte while the checksum header stays true."""
    truncate_rate: float = 0.0
    """Share of block bodies cut short: the connection closes half way through."""
    stall_rate: float = 0.0
    """Share of block bodies that stall `stall_seconds` after the headers."""
    stall_seconds: float = 30.0
    short_pages: float = 0.0
    """Share of list pages cut short or left empty while a NextToken is still returned."""
    token_lifetime: float = 7 * 24 * 3600.0
    """Seconds a block token stays valid (ExpiryTime)."""
    page_token_lifetime: float = 3600.0
    """Seconds a NextToken stays valid."""
    renew_tokens: bool = False
    """Renew a snapshot's block tokens on every new ListSnapshotBlocks listing (a call
    without NextToken), refusing the ones handed out before with INVALID_BLOCK_TOKEN:
    what AWS documents may happen when another process lists the same snapshot."""
    get_rate: float = 1000.0
    """GetSnapshotBlock calls per second per snapshot before RequestThrottledException
    (0 = unlimited)."""
    list_rate: float = 50.0
    """List calls per second for the account before RequestThrottledException (0 = unlimited)."""
    deny_access_keys: list[str] = dataclasses.field(default_factory=list)
    """Access key ids answered AccessDeniedException UNAUTHORIZED_ACCOUNT."""
    secret_keys: dict[str, str] = dataclasses.field(default_factory=dict)
    """Known credentials (access key id -> secret). When any are given, every request's
    SigV4 signature is checked like the real service does (InvalidSignatureException,
    UnrecognizedClientException); when none are, any signature passes."""
    seed: int | None = None

    def update(self, changes: dict[str, Any]) -> None:
        """Apply a partial update (from the control endpoint or a test). Numbers must
        be finite and not negative, as on the command line: JSON parsers take NaN and
        Infinity, and a NaN latency is silently none."""
        names = {f.name for f in dataclasses.fields(self)}
        for key, value in changes.items():
            if key not in names:
                raise ValueError(f"unknown fault knob {key!r}")
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if number and not 0 <= value < math.inf and key != "seed":
                raise ValueError(f"fault knob {key!r} must be finite and >= 0, got {value}")
        for key, value in changes.items():
            setattr(self, key, value)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Dice:
    """Thread-safe random draws for the knobs (seeded for reproducible runs)."""

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def chance(self, share: float) -> bool:
        if share <= 0:
            return False
        with self._lock:
            return self._rng.random() < share

    def uniform(self, low: float, high: float) -> float:
        with self._lock:
            return self._rng.uniform(low, high)

    def randint(self, low: int, high: int) -> int:
        with self._lock:
            return self._rng.randint(low, high)


class RateLimiter:
    """Token buckets keyed by scope (a snapshot id, or the account), refilled per second."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def allow(self, scope: str, rate: float) -> bool:
        if rate <= 0:
            return True
        now = time.monotonic()
        with self._lock:
            tokens, stamp = self._buckets.get(scope, (rate, now))
            tokens = min(rate, tokens + (now - stamp) * rate)
            if tokens < 1.0:
                self._buckets[scope] = (tokens, now)
                return False
            self._buckets[scope] = (tokens - 1.0, now)
            return True


class Counters:
    """Calls per operation, answers per error type, GetSnapshotBlock calls per block,
    connections accepted, the most GetSnapshotBlock calls served at once, and the
    delays decided."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.gets_now = 0
        """GetSnapshotBlock calls being served now (a reset leaves it: they end later)."""
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.calls: collections.Counter[str] = collections.Counter()
            self.errors: collections.Counter[str] = collections.Counter()
            self.block_gets: collections.Counter[tuple[str, int]] = collections.Counter()
            self.bytes_sent = 0
            self.connections = 0
            self.gets_peak = self.gets_now
            """The most GetSnapshotBlock calls this server held at once (from the
            request read to the answer sent): a client's calls in flight as the server
            sees them, never more than the client had (calls still in a listen queue
            are not counted), so a bound set on it holds for the client too."""
            self.closes: collections.Counter[str] = collections.Counter()
            self.delayed_calls = 0
            self.delay_seconds = 0.0
            self.slow_calls = 0
            self.slow_seconds = 0.0
            self.gets_per_second: collections.Counter[int] = collections.Counter()
            """GetSnapshotBlock calls received in each second of the clock (whole
            seconds since the epoch), refused ones included: what a quota meters."""

    def call(self, operation: str) -> None:
        with self._lock:
            self.calls[operation] += 1
            if operation == "GetSnapshotBlock":
                self.gets_per_second[int(time.time())] += 1

    def get_started(self) -> None:
        with self._lock:
            self.gets_now += 1
            self.gets_peak = max(self.gets_peak, self.gets_now)

    def get_ended(self) -> None:
        with self._lock:
            self.gets_now -= 1

    def error(self, code: str) -> None:
        with self._lock:
            self.errors[code] += 1

    def connection(self) -> None:
        """A connection accepted: how many a client opens is part of what it costs."""
        with self._lock:
            self.connections += 1

    def closed(self, how: str) -> None:
        """A connection the server profile closed: "said" (Connection: close on the
        Nth answer), "silent" (no header), "idle" (no request in time)."""
        with self._lock:
            self.closes[how] += 1

    def delayed(self, seconds: float, slow: bool) -> None:
        """A call's delay as the server decided it (latency, jitter, slow tail): tests
        check the decisions, not wall clocks a loaded machine stretches."""
        with self._lock:
            self.delayed_calls += 1
            self.delay_seconds += seconds
            if slow:
                self.slow_calls += 1
                self.slow_seconds += seconds

    def block(self, snapshot_id: str, index: int, size: int) -> None:
        with self._lock:
            self.block_gets[(snapshot_id, index)] += 1
            self.bytes_sent += size

    def snapshot(self) -> dict[str, Any]:
        """A JSON-friendly copy for the control endpoint."""
        with self._lock:
            return {
                "calls": dict(self.calls),
                "errors": dict(self.errors),
                "block_gets": {f"{s}:{i}": n for (s, i), n in self.block_gets.items()},
                "bytes_sent": self.bytes_sent,
                "connections": self.connections,
                "gets_peak": self.gets_peak,
                "gets_per_second": {str(k): n for k, n in self.gets_per_second.items()},
                "closes": dict(self.closes),
                "delays": {
                    "calls": self.delayed_calls,
                    "seconds": self.delay_seconds,
                    "slow_calls": self.slow_calls,
                    "slow_seconds": self.slow_seconds,
                },
            }
