"""Concurrency that stops growing when more calls only add latency (issue 27): against a
server of fixed capacity, whose answers queue behind each other once it is busy, a
sequential reader's calls in flight stay near what the server can use instead of
climbing to the fetch limit, and the blocks per second stay what the server gives.
And the guard's own rules, driven by a clock of the test's."""

from __future__ import annotations

import threading
import time

import pytest
import trio

from ebsfs.emulator import Faults, SnapshotStore
from ebsfs.engine import congestion
from ebsfs.engine.congestion import CongestionGuard
from ebsfs.engine.remote import RemoteSnapshots
from ebsfs.service.api import Block
from tests.fakes import StoreApi, pattern_block

BLOCKS = 600


class Queueing(StoreApi):
    """A server that answers `capacity` calls a second at the most: each call waits
    for its turn (a single queue), then `base` seconds."""

    def __init__(self, store: SnapshotStore, capacity: float, base: float) -> None:
        super().__init__(store)
        self.capacity = capacity
        self.base = base
        self._lock = threading.Lock()
        self._free_at = 0.0

    def get_snapshot_block(
        self, snapshot_id: str, index: int, token: str, into: memoryview | None = None
    ) -> Block:
        with self._lock:
            now = time.monotonic()
            turn = max(now, self._free_at)
            self._free_at = turn + 1 / self.capacity
        time.sleep(max(self.base, turn + 1 / self.capacity - now))
        return super().get_snapshot_block(snapshot_id, index, token, into)


def keep_depth_in_flight(guarded: bool) -> tuple[int, float]:
    """Keep as many calls out as remote.depth() asks (what read-ahead does for a
    sequential reader, minus its ramp) for BLOCKS calls: the most out at once over the
    second half (the first calls go out at the assumed 100 ms latency, before any was
    measured), and calls answered per second."""
    store = SnapshotStore(Faults(seed=1))
    store.add_snapshot("snap-01", {0: pattern_block(1, 0)}, 1)
    api = Queueing(store, capacity=200, base=0.02)
    token = api.list_snapshot_blocks("snap-01").blocks[0][1]
    remote = RemoteSnapshots(api, max_fetches=256)
    if not guarded:
        remote.congestion.latency_for_depth = lambda quick: quick  # type: ignore[method-assign]
    took = 0.0

    async def run() -> None:
        nonlocal took
        out = 0
        wake = trio.Event()

        async def one() -> None:
            nonlocal out, wake
            await remote.get_snapshot_block("snap-01", 0, token)
            out -= 1
            wake.set()

        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            for number in range(BLOCKS):
                while out >= remote.depth():
                    wake = trio.Event()
                    await wake.wait()
                out += 1
                if number >= BLOCKS // 2:
                    most[0] = max(most[0], out)
                nursery.start_soon(one)
        took = trio.current_time() - started

    most = [0]
    trio.run(run)
    return most[0], BLOCKS / took


def test_calls_in_flight_stop_growing_on_a_server_whose_latency_rises_with_load() -> None:
    """200 calls/s, 20 ms when idle: 4 calls out fill it. Sized by the latency of its
    (queued) answers, the depth climbs (a sequential reader's read-ahead reached 140
    calls at once after 1,000 blocks, each waiting 0.7 s in the server's queue); the
    guard keeps it near INFLATION x the idle latency's window, at the same blocks per
    second."""
    most_unguarded, rate_unguarded = keep_depth_in_flight(guarded=False)
    most, rate = keep_depth_in_flight(guarded=True)
    print(f"\nunguarded: {most_unguarded} at once, {rate_unguarded:.0f}/s")
    print(f"guarded: {most} at once, {rate:.0f}/s")
    assert most_unguarded > 100  # what the loop did before
    assert most <= 90  # 1,000/s x 1.5 x 20 ms x 2.5 = 75, and answers' jitter
    assert rate >= 0.8 * rate_unguarded  # the server's capacity either way


def test_the_floor_is_measured_again_by_a_probe_and_follows_a_slower_service() -> None:
    guard = CongestionGuard()
    now = 0.0
    for _ in range(10):
        now += 0.1
        guard.answered(now - 0.02, 0.02, 0.02, now)
    assert guard.floor == 0.02 and guard.latency_for_depth(0.1) == pytest.approx(0.05)
    # The service itself becomes slower (every answer 0.1 s, however few are out).
    now += congestion.FLOOR_LIFETIME
    guard.answered(now - 0.1, 0.1, 0.1, now)
    assert guard.probing() and guard.probes == 1
    for _ in range(8):  # calls started during the probe, with few out: still 0.1 s
        now += 0.05
        guard.answered(now - 0.1, 0.1, 0.1, now)
    assert not guard.probing() and guard.floor == 0.1
    assert guard.latency_for_depth(0.1) == 0.1


def test_a_probe_of_a_queue_we_built_keeps_the_floor() -> None:
    guard = CongestionGuard()
    guard.answered(0.0, 0.02, 0.02, 0.02)
    now = congestion.FLOOR_LIFETIME + 1
    guard.answered(now - 0.5, 0.5, 0.5, now)  # answers queued behind our own calls
    assert guard.probing()
    for _ in range(6):  # with 4 calls out the server answers at its idle pace again
        now += 0.05
        guard.answered(now - 0.021, 0.021, 0.4, now)
    assert not guard.probing() and guard.floor == 0.021
