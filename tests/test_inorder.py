"""InOrder: every consumer takes every piece in the order fed, each in its own thread;
`done` once per piece, after all consumers; the first failure reported once, the
pieces after it skipped, and nothing waits forever. Consecutive pieces are joined in
stages, never past a stage's size or across zeros, and a stage never waits while the
consumers are idle."""

from __future__ import annotations

import functools
import threading

import trio

from ebsfs.acquire.inorder import InOrder


class Recorder:
    def __init__(self, fail_at: int | None = None) -> None:
        self.seen: list[tuple[int, bytes | None, int]] = []
        self.threads: set[int] = set()
        self.fail_at = fail_at

    def __call__(self, offset: int, data: bytes | memoryview | None, length: int) -> None:
        self.threads.add(threading.get_ident())
        if offset == self.fail_at:
            raise OSError(5, "cannot write")
        self.seen.append((offset, None if data is None else bytes(data), length))


def feed_and_drain(
    consumers: list[Recorder],
    pieces: list[tuple[int, bytes | None, int]],
    done: list[int],
    failures: list[BaseException],
    stage_size: int = 0,
    stages: int = 1,
) -> BaseException | None:
    """Feed `pieces` (offset, data, length) through one InOrder (pieces joined in
    `stages` stages of `stage_size` bytes; 0: never), letting the trio loop run now and then, each
    piece's `done` appending its number to `done`; wait for all, close. The failure
    `drain` raised, if any."""
    raised: list[BaseException] = []

    async def main() -> None:
        in_order = InOrder(list(consumers), failures.append, stage_size=stage_size, stages=stages)
        try:
            for n, (offset, data, length) in enumerate(pieces):
                in_order.feed(offset, data, length, functools.partial(done.append, n))
                if n % 50 == 0:
                    await trio.sleep(0)
            try:
                await in_order.drain()
            except OSError as err:
                raised.append(err)
        finally:
            in_order.close()

    trio.run(main)
    return raised[0] if raised else None


def test_each_consumer_takes_every_piece_in_order_in_a_thread_of_its_own() -> None:
    first, second = Recorder(), Recorder()
    done: list[int] = []
    failures: list[BaseException] = []
    pieces = [(n * 10, None if n % 3 == 0 else bytes([n % 256]) * 10, 10) for n in range(200)]
    assert feed_and_drain([first, second], pieces, done, failures) is None
    assert first.seen == pieces and second.seen == pieces
    assert done == list(range(200))  # once each, in order, on the trio thread
    assert failures == []
    assert len(first.threads) == 1 and len(second.threads) == 1
    assert first.threads != second.threads != {threading.get_ident()}


def test_done_waits_for_the_slowest_consumer() -> None:
    release = threading.Event()
    taken: list[int] = []

    def slow(offset: int, data: bytes | memoryview | None, length: int) -> None:
        release.wait(10)
        taken.append(offset)

    done: list[int] = []

    async def main() -> None:
        in_order = InOrder([Recorder(), slow], lambda err: None, stage_size=0)
        try:
            in_order.feed(0, b"x", 1, lambda: done.append(0))
            await trio.sleep(0.2)
            assert done == []  # the fast consumer alone does not finish the piece
            release.set()
            await in_order.drain()
        finally:
            in_order.close()

    trio.run(main)
    assert done == [0] and taken == [0]


def test_first_failure_is_reported_once_and_later_pieces_are_skipped() -> None:
    failing, healthy = Recorder(fail_at=30), Recorder()
    failures: list[BaseException] = []
    done: list[int] = []
    raised = feed_and_drain(
        [failing, healthy], [(n * 10, b"ab", 2) for n in range(10)], done, failures
    )
    assert isinstance(raised, OSError) and "cannot write" in str(raised)
    assert len(failures) == 1 and isinstance(failures[0], OSError)
    assert [offset for offset, _, _ in failing.seen] == [0, 10, 20]
    # Every piece is still finished (nothing waits on a held block forever).
    assert done == list(range(10))
    assert len(healthy.seen) <= 10


def test_close_ends_the_threads() -> None:
    """The very threads InOrder started (one per consumer, compared by identity, not by
    a count that a thread ending elsewhere could balance) end after close()."""
    started: list[threading.Thread] = []

    async def main() -> None:
        before = set(threading.enumerate())
        in_order = InOrder([Recorder(), Recorder(), Recorder()], lambda err: None)
        started.extend(t for t in threading.enumerate() if t not in before)
        in_order.feed(0, None, 5, lambda: None)
        await in_order.drain()
        in_order.close()
        in_order.close()  # twice is harmless

    trio.run(main)
    assert len(started) == 3
    for thread in started:
        thread.join(timeout=5)
    assert [t.name for t in started if t.is_alive()] == []


def test_consecutive_pieces_are_joined_in_stages_never_across_zeros_or_gaps() -> None:
    first, second = Recorder(), Recorder()
    done: list[int] = []
    pieces: list[tuple[int, bytes | None, int]] = []
    offset = 0
    for n in range(60):
        if n % 13 == 12:  # zeros now and then
            pieces.append((offset, None, 25))
            offset += 25
            continue
        if n % 17 == 16:  # and a gap (pieces need not be adjacent)
            offset += 5
        pieces.append((offset, bytes([n]) * 10, 10))
        offset += 10
    # As many stages as pieces: none has to go on unjoined for want of a free stage.
    assert feed_and_drain([first, second], pieces, done, [], stage_size=35, stages=60) is None
    assert done == list(range(60))  # once each, in order, after the consumers took it
    assert first.seen == second.seen
    assert len(first.seen) < len(pieces) / 2  # joined
    assert all(length <= 35 for _, data, length in first.seen if data is not None)
    # The same bytes at the same offsets, zeros apart.
    expected = {
        offset + i: byte
        for offset, data, _ in pieces
        if data is not None
        for i, byte in enumerate(data)
    }
    seen = {
        offset + i: byte
        for offset, data, _ in first.seen
        if data is not None
        for i, byte in enumerate(data)
    }
    assert seen == expected
    assert [p for p in first.seen if p[1] is None] == [p for p in pieces if p[1] is None]


def test_a_stage_waits_only_while_the_consumers_are_busy() -> None:
    release = threading.Event()
    seen: list[tuple[int, int]] = []

    def slow(offset: int, data: bytes | memoryview | None, length: int) -> None:
        release.wait(10)
        seen.append((offset, length))

    done: list[int] = []

    async def main() -> None:
        in_order = InOrder([slow], lambda err: None, stage_size=100)
        try:
            in_order.feed(0, b"a" * 10, 10, lambda: done.append(0))
            in_order.flush_if_idle()  # idle: handed on at once, not held for more
            in_order.feed(10, b"b" * 10, 10, lambda: done.append(1))
            in_order.feed(20, b"c" * 10, 10, lambda: done.append(2))
            in_order.flush_if_idle()  # busy with the first: the stage grows
            await trio.sleep(0.1)
            release.set()
            with trio.fail_after(5):  # no drain: finishing the first hands the rest on
                while len(done) < 3:
                    await trio.sleep(0.01)
            await in_order.drain()
        finally:
            in_order.close()

    trio.run(main)
    assert seen == [(0, 10), (10, 20)]
    assert done == [0, 1, 2]


def test_no_consumers_means_each_piece_is_done_at_once() -> None:
    """`get --no-image-hash` to a file: nothing takes the pieces, and nothing waits."""
    pieces: list[tuple[int, bytes | None, int]] = [(0, b"ab", 2), (2, None, 4), (6, b"c", 1)]
    done: list[int] = []
    failures: list[BaseException] = []
    assert feed_and_drain([], pieces, done, failures, stage_size=8, stages=2) is None
    assert done == [0, 1, 2] and failures == []
