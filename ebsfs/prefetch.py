"""Read-ahead: detect sequential readers and fetch blocks before they ask.

Modelled on mountpoint-s3's prefetcher: the window starts small, doubles on every
sequential read up to a cap, and drops to nothing on a random read, so random readers
never pay for blocks they do not use. Small seeks (out-of-order kernel read-ahead)
still count as sequential."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from ebsfs import BLOCK_SIZE

log = logging.getLogger(__name__)


class ReadPattern:
    """Per open file: which blocks to fetch ahead after each read. Pure logic."""

    def __init__(
        self, volume_size: int, max_window: int = 64, initial_window: int = 2,
        tolerance: int = 2 * BLOCK_SIZE, block_size: int = BLOCK_SIZE,
    ) -> None:
        self.volume_blocks = -(-volume_size // block_size)
        self.max_window = max_window
        self.initial_window = initial_window
        self.tolerance = tolerance
        self.block_size = block_size
        self.window = 0
        self._expected: int | None = None
        self._issued_until = 0
        """Blocks below this were already returned for this run of sequential reads."""

    def observe(self, offset: int, size: int) -> range:
        """Record a read; return the block indexes worth fetching ahead of it that no
        earlier read of this sequential run returned already."""
        end = offset + size
        sequential = self._expected is not None and abs(offset - self._expected) <= self.tolerance
        if sequential:
            self.window = min(self.max_window, max(self.initial_window, self.window * 2))
            self._expected = max(end, self._expected or 0)
        else:
            self.window = 0
            self._expected = end
            self._issued_until = 0
        if self.window == 0 or size <= 0:
            return range(0)
        first = (end - 1) // self.block_size + 1
        stop = min(first + self.window, self.volume_blocks)
        start = max(first, self._issued_until)
        self._issued_until = max(self._issued_until, stop)
        return range(start, stop)


class Readahead:
    """Runs prefetches in the background, dropping requests when too many are queued.
    Errors are only logged: the reader's own read retries and reports them."""

    def __init__(self, max_queued: int = 4096) -> None:
        self._send, self._receive = trio.open_memory_channel[Callable[[], Awaitable[object]]](
            max_queued
        )
        self.submitted = 0
        self.dropped = 0

    def submit(self, work: Callable[[], Awaitable[object]]) -> bool:
        try:
            self._send.send_nowait(work)
            self.submitted += 1
            return True
        except (trio.WouldBlock, trio.ClosedResourceError):
            self.dropped += 1
            return False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started()
            async for work in self._receive:
                nursery.start_soon(self._guarded, work)

    @staticmethod
    async def _guarded(work: Callable[[], Awaitable[object]]) -> None:
        try:
            await work()
        except Exception as err:  # the demand read will see and report it
            log.debug("prefetch failed: %s", err)
