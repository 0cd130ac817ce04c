"""Inbox: calls posted from other threads run on the trio thread, each once, in the
order each thread posted them, and a burst costs one wake-up of the loop."""

from __future__ import annotations

import threading
import time
from typing import Any

import trio

from ebsfs.engine import inbox


def test_calls_from_many_threads_run_once_each_in_order_on_the_trio_thread() -> None:
    ran: list[tuple[int, int]] = []
    threads_seen: set[int] = set()

    def record(item: tuple[int, int]) -> None:
        threads_seen.add(threading.get_ident())
        ran.append(item)

    async def main() -> None:
        box = inbox.current()
        assert inbox.current() is box  # one per run

        def post_many(n: int) -> None:
            for i in range(500):
                box.post(record, (n, i))

        posters = [threading.Thread(target=post_many, args=(n,)) for n in range(8)]
        for poster in posters:
            poster.start()
        with trio.fail_after(10):
            while len(ran) < 8 * 500:
                await trio.sleep(0.01)
        for poster in posters:
            poster.join()

    trio.run(main)
    assert threads_seen == {threading.get_ident()}
    assert sorted(ran) == [(n, i) for n in range(8) for i in range(500)]
    for n in range(8):
        assert [i for m, i in ran if m == n] == list(range(500))


def test_a_burst_wakes_the_loop_once() -> None:
    ran: list[int] = []
    wakeups: list[Any] = []

    class CountingToken:
        def __init__(self, token: trio.lowlevel.TrioToken) -> None:
            self.token = token

        def run_sync_soon(self, fn: Any, *args: Any) -> None:
            wakeups.append(fn)
            self.token.run_sync_soon(fn, *args)

    async def main() -> None:
        box = inbox.Inbox(CountingToken(trio.lowlevel.current_trio_token()))  # type: ignore[arg-type]

        def post_all() -> None:
            for i in range(100):
                box.post(ran.append, i)

        poster = threading.Thread(target=post_all)
        poster.start()
        poster.join()  # all posted while the loop could not drain
        time.sleep(0.05)
        with trio.fail_after(5):
            while len(ran) < 100:
                await trio.sleep(0.01)
        box.post(ran.append, 100)  # after a drain, the next post schedules another
        with trio.fail_after(5):
            while len(ran) < 101:
                await trio.sleep(0.01)

    trio.run(main)
    assert ran == list(range(101))
    assert len(wakeups) == 2
