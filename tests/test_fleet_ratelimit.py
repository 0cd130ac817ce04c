"""The pieces under `ebsfs scan` that need no cluster: the sliding window and the local
limiter of the cluster-wide GetSnapshotBlock limit (fleet/ratelimit.py), the
emulator's token renewal knob, and the block index's answer to a refused token that
a newer listing has replaced already (no listing loop)."""

from __future__ import annotations

import threading
import time

import pytest
import trio

from ebsfs.constants import BLOCK_SIZE
from ebsfs.emulator import Faults, SnapshotStore
from ebsfs.engine.index import BlockIndex
from ebsfs.engine.remote import RemoteSnapshots
from ebsfs.fleet.ratelimit import GRANT_LIFETIME, WINDOW, LocalLimiter, SlidingWindow
from tests.fakes import StoreApi


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_window_never_grants_more_than_the_limit_within_a_window() -> None:
    clock = Clock()
    window = SlidingWindow(100, clock=clock)
    granted = []
    for _ in range(2000):  # asking every 5 ms for up to 64 at a time, for 10 s
        given, wait = window.take(64)
        assert (given == 0) == (wait > 0)
        granted.append((clock.now, given))
        clock.now += 0.005
    for start, _ in granted:
        inside = sum(n for t, n in granted if start <= t < start + WINDOW)
        assert inside <= 100
    total = sum(n for _, n in granted)
    assert 100 * 10 / WINDOW * 0.9 <= total <= 100 * (10 / WINDOW + 1)  # about limit/WINDOW


def test_a_full_window_says_how_long_to_wait() -> None:
    clock = Clock()
    window = SlidingWindow(8, clock=clock)
    assert window.take(100) == (2, 0.0)  # a share of the limit at once, at most
    for _ in range(3):
        window.take(2)
    clock.now += 0.3
    given, wait = window.take(1)
    assert given == 0 and wait == pytest.approx(WINDOW - 0.3)
    clock.now += wait
    assert window.take(1)[0] == 1


def test_a_bad_limit_is_refused() -> None:
    with pytest.raises(ValueError):
        SlidingWindow(0)


def test_threads_sharing_a_limiter_keep_to_the_limit_in_every_second() -> None:
    """Twelve threads calling as fast as they can, through two local limiters (two
    tasks) over one window: calls in any one second never exceed the limit."""
    window = SlidingWindow(60)
    limiters = [LocalLimiter(window.take), LocalLimiter(window.take)]
    stamps: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + 2.5

    def caller(limiter: LocalLimiter) -> None:
        while time.monotonic() < stop:
            limiter()
            with lock:
                stamps.append(time.monotonic())

    threads = [threading.Thread(target=caller, args=(limiters[k % 2],)) for k in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stamps.sort()
    for k, start in enumerate(stamps):
        inside = sum(1 for t in stamps[k:] if t < start + 1.0)
        assert inside <= 60, f"{inside} calls in the second from {start}"
    assert len(stamps) >= 60 * 2 * 0.8  # and the limit is used, not starved
    assert sum(x.asked for x in limiters) < len(stamps)  # grants cover several calls


def test_a_grant_not_spent_in_time_is_dropped() -> None:
    clock = Clock()
    window = SlidingWindow(100, clock=clock)
    limiter = LocalLimiter(window.take, clock=clock)
    limiter()  # asks for 1 (one waiter)
    limiter._left = 5  # as if granted 6
    clock.now += GRANT_LIFETIME * 2
    limiter()
    assert limiter.dropped == 5 and limiter.asked == 2


# -- token renewal ------------------------------------------------------------------


def renewing_store() -> SnapshotStore:
    store = SnapshotStore(Faults(renew_tokens=True, seed=1))
    store.add_snapshot("snap-01", {0: b"\1" * BLOCK_SIZE, 5: b"\2" * BLOCK_SIZE})
    return store


def test_the_emulator_renews_tokens_on_every_new_listing_only() -> None:
    store = renewing_store()
    first = store.list_snapshot_blocks("snap-01", max_results="100")
    old = first["Blocks"][0]["BlockToken"]
    assert store.get_snapshot_block("snap-01", "0", old)
    second = store.list_snapshot_blocks("snap-01", max_results="100")
    with pytest.raises(Exception, match="INVALID_BLOCK_TOKEN|invalid or expired"):
        store.get_snapshot_block("snap-01", "0", old)
    assert store.get_snapshot_block("snap-01", "0", second["Blocks"][0]["BlockToken"])
    plain = SnapshotStore(Faults(seed=1))
    plain.add_snapshot("snap-01", {0: b"\1" * BLOCK_SIZE})
    token = plain.list_snapshot_blocks("snap-01", max_results="100")["Blocks"][0]["BlockToken"]
    plain.list_snapshot_blocks("snap-01", max_results="100")
    assert plain.get_snapshot_block("snap-01", "0", token)  # off by default


def test_a_refused_token_of_an_older_listing_keeps_the_newer_one() -> None:
    """Two fetches sent with one listing's tokens are both refused; the first lists
    again, and the second's refusal must not throw that new listing away (each
    listing renews the tokens: they would refuse each other for ever)."""
    store = renewing_store()
    api = StoreApi(store)
    index = BlockIndex(RemoteSnapshots(api), "snap-01", 2048)

    async def run() -> None:
        old = await index.token(0)
        old5 = await index.token(5)
        sent = index.now()  # both calls sent now, with the first listing's tokens
        await trio.sleep(0.01)
        index.invalidate(0, old, sent)  # the first refusal: listed again
        fresh = await index.token(0)
        assert fresh is not None and fresh != old
        index.invalidate(5, old5, sent)  # the second refusal, of the same old listing
        assert await index.token(0) == fresh  # no new listing
        store.get_snapshot_block("snap-01", "0", fresh)
        # A call sent after that listing and refused all the same: something listed
        # since (another process): that listing is stale too, and is dropped.
        later = index.now() + 0.001
        index.invalidate(0, old, later)
        assert await index.token(0) != fresh

    trio.run(run)
    assert api.calls["ListSnapshotBlocks"] == 3
