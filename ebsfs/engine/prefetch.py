"""Read-ahead: detect sequential readers and fetch blocks before they ask.

Modelled on mountpoint-s3's prefetcher: the window starts small, grows while the reads
stay sequential, up to a limit, and drops to nothing on a random read, so random
readers never pay for blocks they do not use. Small seeks (out-of-order kernel
read-ahead, a tool skipping a little) still count as sequential. A run must have read
past a whole block before anything is fetched ahead (a tool reading 64 KiB pieces of
one block is not a stream), and it never fetches more than twice what it has read so
far: the window follows the evidence in bytes, not the number of reads, so a tool's
many small reads do not open it as wide as a few large ones would.

The window counts blocks that hold data (or may: their part of the index is not listed
yet), never the absent ones, which cost no call: a sparse disk keeps as many calls in
flight as a dense one. Its limit is set by the caller from what the service needs
(remote.py: latency x the per-snapshot rate, within the cache budget), not a constant."""

from __future__ import annotations

import collections
import logging
from collections.abc import Awaitable, Callable

import trio

from ebsfs.constants import BLOCK_SIZE

log = logging.getLogger(__name__)

NextListed = Callable[[int], tuple[int | None, bool]]
"""index -> (first block >= index that may hold data within index's chunk, or None if
none does up to the chunk's end; whether the index knew). Unknown: (index, False)."""
SCAN_STEPS = 64
"""Index lookups per read at the most (each skips any run of absent blocks)."""
PAST_FILE_QUIET = 16
"""Blocks of data a run begun past the end of a file the reader started at must read
before anything is fetched ahead: the kernel's own read-ahead (4 MiB windows, up to
two ahead) reads that far past a file a tool read to its end (`icat`: 7 blocks more
were read ahead of the kernel's reads, docs/performance.md)."""
STREAM_BLOCKS = 64
"""Blocks of data a run must have read to count as a stream (32 MiB): shorter runs
may be one file being read, and the data after it another file's."""


class ReadPattern:
    """Per open file: which blocks to fetch ahead after each read. Pure logic."""

    def __init__(
        self,
        volume_size: int,
        initial_window: int = 2,
        tolerance: int = 2 * BLOCK_SIZE,
        block_size: int = BLOCK_SIZE,
        chunk_blocks: int = 8192,
    ) -> None:
        self.volume_blocks = -(-volume_size // block_size)
        self.initial_window = initial_window
        self.tolerance = tolerance
        self.block_size = block_size
        self.chunk_blocks = chunk_blocks
        self.window = 0
        self._expected: int | None = None
        self._run_start = 0
        self._frontier = 0
        """Next block index to consider for read-ahead in this run."""
        self._ahead: collections.deque[int] = collections.deque()
        """Blocks returned for read-ahead in this run that the reader has not passed."""
        self._run_data = 0
        """Blocks holding data (or maybe: not listed yet) that this run has read."""
        self._counted = -1
        """Blocks of the run up to this index are counted in _run_data."""
        self._rescan_at = 0
        """The next scan for blocks to fetch waits until the reader is past this block:
        half way through what lies ahead (a warm reader's 1 MiB reads then cost no
        index lookups: docs/performance.md)."""
        self._quiet = 0
        """Blocks of data this run reads before it fetches anything ahead."""
        self._quiet_next = 0
        """... the next run (restart: the reader went on past its file's end)."""
        self.file_run: tuple[int, int] | None = None
        """Blocks [first, last] of a file's run the reader started at (the metadata
        walk told where it lies: SnapshotImage.note_file_run): read-ahead stops at its
        end while the reader is in it, instead of overshooting past the file."""
        self.pending_run: tuple[int, int] | None = None
        """(offset, length) of a file's run whose start a walk read covered: taken up
        as file_run if the reader goes on into it (SnapshotImage._run_to_adopt)."""

    def continues(self, offset: int) -> bool:
        """Whether a read at `offset` would continue the current sequential run."""
        return self._expected is not None and abs(offset - self._expected) <= self.tolerance

    def restart(self) -> None:
        """Forget the run: the next read starts a new one, and read-ahead waits for new
        evidence (a reader past the end of the file it started at: what lies beyond is
        another file, and the kernel's own read-ahead is no evidence)."""
        self._expected = None
        self.file_run = None
        self.pending_run = None
        self._quiet_next = PAST_FILE_QUIET

    def observe(
        self,
        offset: int,
        size: int,
        limit: int,
        next_listed: NextListed,
        walking: bool = False,
    ) -> list[int]:
        """Record a read; return the blocks to fetch ahead of it that no earlier read of
        this sequential run returned: enough that `window` blocks holding data lie
        ahead of the reader, the window following the blocks of data the run has read
        (_window_for_run; reading through a hole is no evidence that the data after it
        will be read), up to `limit`, and never reaching further than four windows of
        block indexes (a hole is skipped, not crossed for unrelated data far away).
        Blocks of chunks not listed yet are returned too (fetching one lists its
        chunk), but the scan stops at the first of them.

        `walking`: the read is of metadata blocks the metadata prefetch asked for, a
        tool walking the filesystem (`fls -r` reads directory after directory, in
        order, a few KiB apart). It is recorded, but fetches nothing ahead until the
        run is a stream: the walk has asked for what such a tool reads next, and what
        lies past it is file contents the walk leaves out on purpose. A reader through
        the whole disk is a stream past STREAM_BLOCKS and reads ahead as before."""
        end = offset + size
        sequential = self._expected is not None and (
            abs(offset - self._expected) <= self.tolerance
            or self._over_holes(self._expected, offset, next_listed)
        )
        if sequential:
            self._expected = max(end, self._expected or 0)
        else:
            self.window = 0
            self._expected = end
            self._run_start = offset
            self._ahead.clear()
            self._run_data = 0
            self._counted = offset // self.block_size - 1
            self._rescan_at = 0
            self._quiet, self._quiet_next = self._quiet_next, 0
        reader = (self._expected - 1) // self.block_size
        if sequential and reader < self._rescan_at:
            return []
        if size > 0:
            self._count_data(reader, next_listed)
        if (
            size <= 0
            or not sequential
            or not self._run_data
            or (walking and self._run_data < STREAM_BLOCKS)
            or self._run_data <= self._quiet
            or self._expected - self._run_start <= self.block_size
        ):
            return []
        self.window = min(max(limit, 1), max(self.initial_window, self._window_for_run()))
        reach = min(self.volume_blocks, reader + 1 + 4 * self.window)
        while self._ahead and self._ahead[0] <= reader:
            self._ahead.popleft()
        frontier = max(self._frontier, reader + 1)
        wanted: list[int] = []
        for _ in range(SCAN_STEPS):
            if len(self._ahead) >= self.window or frontier >= reach:
                break
            found, known = next_listed(frontier)
            if found is not None and found >= reach:
                break
            if not known:
                wanted.append(frontier)
                self._ahead.append(frontier)
                frontier += 1
                break
            if found is None:  # nothing more in this chunk
                frontier = (frontier // self.chunk_blocks + 1) * self.chunk_blocks
                continue
            wanted.append(found)
            self._ahead.append(found)
            frontier = found + 1
        self._frontier = frontier
        if len(self._ahead) >= self.window:  # full: look again half way through it
            self._rescan_at = self._ahead[len(self._ahead) // 2]
        return wanted

    def _over_holes(self, expected: int, offset: int, next_listed: NextListed) -> bool:
        """Whether a read at `offset` continues a run that stopped at `expected`
        across blocks never written only: a client that knows the holes (NBD block
        status, qemu-img, nbdcopy) reads the data and skips them, and is as sequential
        as one that reads the zeros (qemu-img compare over NBD waited a round trip per
        block without this)."""
        if offset <= expected:
            return False
        gap = -(-expected // self.block_size)  # the first block the run has not touched
        target = offset // self.block_size
        found, known = next_listed(gap)
        if not known:
            return False
        if found is None:  # no data up to the end of that chunk
            return target < (gap // self.chunk_blocks + 1) * self.chunk_blocks
        return found >= target

    def _window_for_run(self) -> int:
        """Half the data read so far while the run may still be one file (whatever
        lies past its end is fetched for nothing), twice that once it is a stream."""
        if self._run_data < STREAM_BLOCKS:
            return self._run_data // 2
        return 2 * self._run_data

    def _count_data(self, reader: int, next_listed: NextListed) -> None:
        """Add the blocks holding data in (_counted, reader] to _run_data."""
        index = self._counted + 1
        for _ in range(16 * SCAN_STEPS):
            if index > reader:
                break
            found, known = next_listed(index)
            if not known:
                self._run_data += 1
                index += 1
            elif found is None:
                index = (index // self.chunk_blocks + 1) * self.chunk_blocks
            elif found > reader:
                index = reader + 1
            else:
                self._run_data += 1
                index = found + 1
        self._counted = min(index, reader + 1) - 1

    @property
    def frontier(self) -> int:
        """Where read-ahead of this run has got to (a block index)."""
        return self._frontier


class Readahead:
    """Runs prefetches in the background, dropping requests when too many are pending.
    Errors are only logged: the reader's own read retries and reports them.

    A prefetch starts as a task in `run`'s nursery straight from `submit` (work
    submitted before `run` starts waits for it): no channel hop, one task wake-up
    less per block (docs/performance.md)."""

    def __init__(self, max_queued: int = 4096) -> None:
        self.max_queued = max_queued
        """Prefetches pending at once (started or waiting for `run`) at the most."""
        self._nursery: trio.Nursery | None = None
        self._waiting: list[Callable[[], Awaitable[object]]] = []
        self._pending = 0
        self._stopped = False
        self.submitted = 0
        self.dropped = 0

    def submit(self, work: Callable[[], Awaitable[object]]) -> bool:
        if self._stopped or self._pending >= self.max_queued:
            self.dropped += 1
            return False
        self.submitted += 1
        self._pending += 1
        if self._nursery is None:
            self._waiting.append(work)
        else:
            self._nursery.start_soon(self._guarded, work)
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for work in self._waiting:
                    nursery.start_soon(self._guarded, work)
                self._waiting.clear()
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self._stopped = True

    async def _guarded(self, work: Callable[[], Awaitable[object]]) -> None:
        try:
            await work()
        except Exception as err:  # the demand read will see and report it
            log.debug("prefetch failed: %s", err)
        finally:
            self._pending -= 1
