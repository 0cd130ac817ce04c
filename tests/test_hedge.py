"""Hedged GetSnapshotBlock calls (engine/hedge.py, issue 27): a call far slower than the
recent ones is asked again, the first answer wins, the loser is abandoned, the block is
delivered once with verified bytes, and the extra calls are bounded and counted. The
unit tests drive the Hedger with calls that block until abandoned; the last reads a
snapshot through the real client against an emulator whose answers sometimes stall."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import ebsfs
from ebsfs.constants import BLOCK_SIZE
from ebsfs.emulator import EmulatorServer
from ebsfs.emulator.diskimage import random_image
from ebsfs.engine import hedge
from ebsfs.engine.hedge import EARLY_SAMPLES, MAX_HEDGES, MIN_SAMPLES, GetInto, Hedger
from ebsfs.engine.stats import format_report
from ebsfs.errors import ReadFailed, TransientError
from ebsfs.service.api import Block
from ebsfs.service.http1 import Abandon, abandonable, current_abandon

RIGHT = bytes(range(256)) * (BLOCK_SIZE // 256)


def answer(room: memoryview | None) -> Block:
    """A quick, correct answer, received into the room given (as the direct path does)."""
    if room is None:
        return Block(RIGHT, "c")
    room[:] = RIGHT
    return Block(room, "c")


def stall_until_abandoned(room: memoryview | None, log: list[str]) -> Block:
    """The first call of a slow block: writes part of a body, then hangs until its
    exchange is ended from outside (what http1's Abandon hook does to a socket)."""
    gone = current_abandon()
    assert gone is not None
    if room is not None:
        room[:4] = b"PART"
    ended = threading.Event()
    with gone.hook(ended.set):
        log.append("first call ended" if ended.wait(10) else "first call timed out")
    raise ReadFailed("given up, the read that asked for it is gone")


def stalling_first(count: int, calls: list[str], log: list[str]) -> GetInto:
    """A block's calls, in the order made: the first `count` stall until abandoned
    (their ends logged in `log`), the rest answer at once; each call noted in `calls`."""

    def get(room: memoryview | None) -> Block:
        calls.append("call")
        if len(calls) <= count:
            return stall_until_abandoned(room, log)
        return answer(room)

    return get


def run(hedger: Hedger, get: Callable[[memoryview | None], Block], room: memoryview | None):
    """As a worker thread of remote.in_worker runs it: under an Abandon of its own."""
    with abandonable(Abandon()):
        return hedger.run(get, room)


def primed(fraction: float = 0.015, burst: float = 8.0) -> Hedger:
    """A hedger that has timed enough quick answers to hedge (delay: its minimum)."""
    hedger = Hedger(fraction=fraction, burst=burst)
    for _ in range(MIN_SAMPLES + 16):
        run(hedger, answer, None)
    hedger._update_delay()  # what the watchdog does every 16 answers
    assert hedger.delay() == hedger.min_delay
    return hedger


def test_a_stalled_call_is_hedged_and_the_hedge_block_delivered_once() -> None:
    hedger = primed()
    calls: list[str] = []
    log: list[str] = []
    room = memoryview(bytearray(BLOCK_SIZE))
    block = run(hedger, stalling_first(1, calls, log), room)
    assert log == ["first call ended"]  # the loser left its exchange before we returned
    assert bytes(block.data) == RIGHT and block.data is not room  # the hedge's own room
    assert len(calls) == 2
    assert (hedger.counts.sent, hedger.counts.won) == (1, 1)
    hedger.close()


def test_no_hedge_before_enough_answers_were_timed() -> None:
    hedger = Hedger()
    assert hedger.delay() is None
    released = threading.Event()
    calls: list[str] = []

    def slow(room: memoryview | None) -> Block:
        calls.append("call")
        released.wait(0.3)  # well past any delay a primed hedger would use
        return answer(room)

    run(hedger, slow, None)
    assert calls == ["call"] and hedger.counts.sent == 0
    hedger.close()


def test_before_the_percentile_a_few_answers_give_a_cautious_delay(monkeypatch) -> None:
    """A mount's first calls: from EARLY_SAMPLES answers on, a call outstanding
    EARLY_AFTER times their median (and EARLY_FLOOR at least) is hedged, so one slow
    call among them does not hold the first read for a whole slow answer."""
    monkeypatch.setattr(hedge, "EARLY_FLOOR", 0.05)
    hedger = Hedger()
    for _ in range(EARLY_SAMPLES - 1):
        run(hedger, answer, None)
    hedger._update_delay()
    assert hedger.delay() is None  # too few answers: no guess
    run(hedger, answer, None)
    hedger._update_delay()
    assert hedger.delay() == 0.05  # quick answers: the floor
    calls: list[str] = []
    log: list[str] = []
    block = run(hedger, stalling_first(1, calls, log), memoryview(bytearray(BLOCK_SIZE)))
    assert bytes(block.data) == RIGHT and log == ["first call ended"]
    assert (hedger.counts.sent, hedger.counts.won) == (1, 1)
    hedger.close()


def test_the_early_delay_follows_the_median_of_the_answers_so_far() -> None:
    hedger = Hedger()
    for seconds in (0.3, 0.2, 0.4, 0.25, 5.0):  # one slow answer does not move it
        hedger._recent.append(seconds)
    hedger._update_delay()
    assert hedger.delay() == pytest.approx(hedge.EARLY_AFTER * 0.3)


def test_the_delay_grows_as_the_budget_runs_low() -> None:
    """With half the bucket or more left a call is hedged at the delay; below that, up
    to twice it, so the last tokens go to calls far later than usual."""
    hedger = Hedger(burst=8.0)
    factors = []
    for tokens in (8.0, 4.0, 2.0, 1.0, 0.0):
        hedger._tokens = tokens
        factors.append(hedger._scarcity())
    assert factors == [1.0, 1.0, 1.5, 1.75, 2.0]


def test_a_hedge_that_is_slow_too_is_hedged_once_more_and_no_further() -> None:
    """One hedge in a hundred meets the slow tail itself: the call is asked a third
    time, never a fourth, and the one answer that wins is delivered."""
    hedger = primed()
    calls: list[str] = []
    log: list[str] = []
    room = memoryview(bytearray(BLOCK_SIZE))
    # The first call and the first hedge stall.
    block = run(hedger, stalling_first(MAX_HEDGES, calls, log), room)
    assert bytes(block.data) == RIGHT and block.data is not room
    assert len(calls) == 1 + MAX_HEDGES
    assert (hedger.counts.sent, hedger.counts.won) == (MAX_HEDGES, 1)
    # Both losers leave their exchanges: the first call before run returns, the first
    # hedge (in a hedge thread of its own) a moment later.
    deadline = time.monotonic() + 5
    while log.count("first call ended") < MAX_HEDGES and time.monotonic() < deadline:
        time.sleep(0.01)
    assert log == ["first call ended"] * MAX_HEDGES
    hedger.close()


def test_no_call_is_asked_more_than_max_hedges_times_again() -> None:
    hedger = primed()
    calls: list[str] = []

    def slow(room: memoryview | None) -> Block:
        calls.append("call")
        threading.Event().wait(0.4)  # twenty times the delay, every call
        return answer(room)

    block = run(hedger, slow, memoryview(bytearray(BLOCK_SIZE)))
    assert bytes(block.data) == RIGHT
    assert len(calls) == 1 + MAX_HEDGES and hedger.counts.sent == MAX_HEDGES
    hedger.close()


def test_a_first_call_that_answers_first_is_used_and_the_hedge_dropped() -> None:
    hedger = primed()
    calls: list[str] = []
    hedge_started = threading.Event()
    hedge_ended = threading.Event()

    def get(room: memoryview | None) -> Block:
        calls.append("call")
        if len(calls) == 1:  # slow enough to be hedged, then answers first
            assert hedge_started.wait(5)
            return answer(room)
        hedge_started.set()
        gone = current_abandon()
        assert gone is not None
        with gone.hook(hedge_ended.set):
            hedge_ended.wait(10)
        raise ReadFailed("abandoned")

    room = memoryview(bytearray(BLOCK_SIZE))
    block = run(hedger, get, room)
    assert block.data is room and bytes(room) == RIGHT
    assert hedge_ended.wait(5), "the hedge nobody needed was not abandoned"
    assert (hedger.counts.sent, hedger.counts.won) == (1, 0)
    hedger.close()


def test_when_both_fail_the_first_call_s_error_is_raised() -> None:
    hedger = primed()
    calls: list[str] = []
    hedge_failed = threading.Event()

    def get(room: memoryview | None) -> Block:
        calls.append("call")
        if len(calls) == 1:
            hedge_failed.wait(5)
            raise TransientError("first")
        hedge_failed.set()
        raise TransientError("second")

    with pytest.raises(TransientError, match="first"):
        run(hedger, get, memoryview(bytearray(BLOCK_SIZE)))
    assert hedger.counts.sent == 1 and hedger.counts.won == 0
    hedger.close()


def test_hedges_stay_within_their_budget() -> None:
    """Every call slow: hedges are at most the bucket's burst plus its fraction of the
    calls, not one per call."""
    hedger = primed(fraction=0.015, burst=2.0)
    calls: list[str] = []

    def slow(room: memoryview | None) -> Block:
        calls.append("call")
        threading.Event().wait(0.06)  # three times the delay, and answers
        return answer(room)

    for _ in range(40):
        run(hedger, slow, memoryview(bytearray(BLOCK_SIZE)))
    assert 1 <= hedger.counts.sent <= 2 + 1  # the burst; 40 x 1.5 % refilled < 1
    assert len(calls) == 40 + hedger.counts.sent
    hedger.close()


def test_a_read_giving_up_ends_the_hedge_too() -> None:
    """in_worker fires the call's Abandon when the read that wanted it gave up: the
    hedge under way must end with it, not run on to its own deadline."""
    hedger = primed()
    gone = Abandon()
    hedge_ended = threading.Event()
    calls: list[str] = []

    def get(room: memoryview | None) -> Block:
        calls.append("call")
        mine = current_abandon()
        assert mine is not None
        ended = threading.Event()
        if len(calls) == 2:
            threading.Timer(0.05, gone.fire).start()  # the read gives up meanwhile
        with mine.hook(ended.set):
            ended.wait(10)
        if len(calls) == 2 or mine is not gone:
            hedge_ended.set()
        raise ReadFailed("abandoned")

    with abandonable(gone), pytest.raises(ReadFailed):
        hedger.run(get, memoryview(bytearray(BLOCK_SIZE)))
    assert hedge_ended.wait(5)
    hedger.close()


@pytest.fixture
def stalling(emulator: EmulatorServer, tmp_path: Path) -> tuple[EmulatorServer, bytes]:
    image = tmp_path / "disk.img"
    random_image(image, 96 * BLOCK_SIZE, seed=7)
    emulator.store.add_image("snap-0bead5", image)
    # After 40 quick answers, a tenth of the bodies stall for 4 s after their headers.
    emulator.faults.stall_seconds = 4.0
    return emulator, image.read_bytes()


def test_a_snapshot_read_through_stalls_is_exact_and_its_hedges_counted(stalling) -> None:
    emulator, data = stalling
    with ebsfs.open("snap-0bead5", endpoint_url=emulator.url, readahead=False) as f:
        got = bytearray()
        for index in range(96):
            if index == MIN_SAMPLES + 8:
                emulator.faults.stall_rate = 0.1
            got += f.read(BLOCK_SIZE)
        report = f.stats()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    hedges = report["hedges"]
    assert hedges["enabled"] and hedges["won"] >= 1, hedges
    assert emulator.counters.errors["Stalled"] >= 1
    calls = report["calls"]["GetSnapshotBlock"]
    assert report["blocks_fetched"] == 96
    assert calls <= 96 + hedges["sent"] + report["retries"]
    assert "calls asked again" in format_report(report)
    connections = report["connections"]  # the direct path's pool, in ebsfs stats too
    assert connections["opened"] >= 1 and "connections " in format_report(report)


def test_no_hedge_turns_it_off(stalling) -> None:
    emulator, _ = stalling
    with ebsfs.open("snap-0bead5", endpoint_url=emulator.url, readahead=False, hedge=False) as f:
        f.read(4 * BLOCK_SIZE)
        assert f.stats()["hedges"] == {"enabled": False}


def test_no_hedge_while_the_service_throttles() -> None:
    """A call sleeping out throttling is slow for our own back-off: a second call would
    only add load to a service asking for less (THROTTLE_PAUSE after the last one)."""
    throttled = [0]
    hedger = Hedger(throttles=lambda: throttled[0])
    for _ in range(MIN_SAMPLES + 16):
        run(hedger, answer, None)
    hedger._update_delay()
    calls: list[str] = []

    def backing_off(room: memoryview | None) -> Block:
        calls.append("call")
        throttled[0] += 1  # the client was told to slow down, and waits
        threading.Event().wait(0.2)  # ten times the hedging delay
        return answer(room)

    run(hedger, backing_off, memoryview(bytearray(BLOCK_SIZE)))
    assert calls == ["call"] and hedger.counts.sent == 0
    hedger.close()
