"""Readahead: prefetch tasks started from submit, bounded, never raising."""

from __future__ import annotations

import trio
import trio.testing

from ebsfs.engine.prefetch import Readahead


def test_work_submitted_before_run_starts_with_it_and_each_runs_once() -> None:
    readahead = Readahead()
    ran: list[int] = []

    async def work(n: int) -> None:
        ran.append(n)

    async def main() -> None:
        assert readahead.submit(lambda: work(1))
        async with trio.open_nursery() as nursery:
            await nursery.start(readahead.run)
            assert readahead.submit(lambda: work(2))
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert sorted(ran) == [1, 2]
    assert not readahead.submit(lambda: work(3))  # stopped: dropped, not kept forever
    assert (readahead.submitted, readahead.dropped) == (2, 1)


def test_pending_work_is_bounded_and_failures_do_not_escape() -> None:
    readahead = Readahead(max_queued=2)
    release = trio.Event()

    async def stuck() -> None:
        await release.wait()

    async def broken() -> None:
        raise OSError("the demand read reports this")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(readahead.run)
            assert readahead.submit(stuck) and readahead.submit(stuck)
            assert not readahead.submit(stuck)  # two pending: the third is dropped
            release.set()
            await trio.testing.wait_all_tasks_blocked()
            assert readahead.submit(broken)  # room again once they finished
            await trio.testing.wait_all_tasks_blocked()
            assert readahead.submit(stuck)  # the failure freed its place too
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert readahead.dropped == 1
