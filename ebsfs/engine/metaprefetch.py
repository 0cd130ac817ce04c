"""Metadata prefetch (issue 25): a filesystem's metadata fetched ahead of a tool's walk,
one parallel wave per level of its tree, so `fls -r` or `find` pays a round trip per
level instead of one per dependent block. The walker goes on as soon as the blocks it
reads next are in, not once its whole wave is: the next wave's calls go out while the
last one's slowest answers are still on their way.

When: at the first read that touches the first HEAD_SIZE bytes of a window holding a
filesystem (a partition, or the bare disk when it has no partition table), through any
face: every tool opens a filesystem by reading its superblock or boot sector there. A
read of a window's middle (a file read by a known offset) starts nothing. A face whose
users walk what they open may start every walk at once instead (`walk_all`): the
mount does, as it starts serving, so the first waves are in before the tool's first
read (issue 25: that read came about 150 ms after the mount returned).

How much: the blocks of a wave not already in memory, fetched through
`SnapshotImage.block` (cache, single flight, disk cache, lineage and stats all apply)
under a limiter of their own of half the fetch limiter, so a tool's own reads always
find room, and within a budget of blocks per engine. Never fails a read or the mount:
damage (WalkStopped), a failed read, a walker's bug or the budget stop that walk with
one log line. Each window is walked at most once per engine.

Concurrency rule: everything runs on the engine's trio loop; `saw` is synchronous
(called on every read of a window) and only starts tasks."""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import cast

import trio

from ebsfs.constants import BLOCK_SIZE
from ebsfs.engine.cache import Loan
from ebsfs.engine.fsmeta.walk import HEAD_SIZE, RunReporter, Walker, WalkStopped, Wave
from ebsfs.engine.fsmeta.walkers import WALKERS, find
from ebsfs.engine.image import SnapshotImage
from ebsfs.engine.partitions import Partition
from ebsfs.engine.stats import Stats, WalkCounters
from ebsfs.errors import EbsfsError

log = logging.getLogger(__name__)

MAX_WAVES = 4096
"""Waves of one walk at the most (walkers bound theirs; this bounds a walker's bug)."""
MAX_WAVE_EXTENTS = 1_000_000
"""Extents of one wave looked at, at the most."""
MAX_WAVE_BLOCKS = 1_000_000
"""Block indexes of one wave looked at (cached ones included), at the most: a 16 TiB
extent must not cost a minute of the loop."""
PLAN_SLICE = 8192
"""Block indexes looked at between two checkpoints of the loop."""
MAX_WALKER_READ = 64 * 1024**2
"""Bytes a walker may read at once (more is a damaged count, not metadata)."""

Window = tuple[str, int, int]
"""(snapshot id, first byte, length): one filesystem's place."""


class MetadataPrefetch:
    """Walks of the filesystems of one engine's images, started by reads (`saw`) and run
    in `run`'s nursery (work asked for before `run` starts waits for it)."""

    def __init__(
        self,
        *,
        budget: int,
        fetch_limiter: trio.CapacityLimiter,
        read_timeout: float,
        partitions: Callable[[str], Awaitable[list[Partition]]],
        known_partitions: Callable[[str], list[Partition] | None],
        stats: Stats,
        walkers: Sequence[Walker] = WALKERS,
    ) -> None:
        self.budget = budget
        """Blocks all walks together may bring into memory."""
        self.walkers = walkers
        self.read_timeout = read_timeout
        self.stats = stats
        self._fetch_limiter = fetch_limiter
        self.limiter = trio.CapacityLimiter(self._share())
        self._partitions = partitions
        self._known = known_partitions
        self._spent = 0
        self._fetched: set[tuple[str, int]] = set()
        """Blocks charged to the budget (so at most `budget` entries)."""
        self._arriving: dict[tuple[str, int], trio.Event] = {}
        """Blocks of a wave whose fetch has not ended (at most `budget` entries): a
        walker's read of one waits for that fetch rather than making its own."""
        self._started: set[Window] = set()
        self._discovering: set[str] = set()
        self._exhausted = budget <= 0
        self._bug_logged: set[str] = set()
        self._nursery: trio.Nursery | None = None
        self._waiting: list[Callable[[], Awaitable[None]]] = []
        stats.prefetch_budget = budget

    def _share(self) -> int:
        """Half the fetch limiter as it is now (throttling shrinks it), at least one."""
        return max(1, int(self._fetch_limiter.total_tokens) // 2)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run walks until cancelled (the engine's loop ends)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for work in self._waiting:
                    nursery.start_soon(work)
                self._waiting.clear()
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self._exhausted = True  # nothing starts once the engine stops

    def _start(self, work: Callable[[], Awaitable[None]]) -> None:
        guarded = functools.partial(self._guarded, work)
        if self._nursery is None:
            self._waiting.append(guarded)
        else:
            self._nursery.start_soon(guarded)

    async def _guarded(self, work: Callable[[], Awaitable[None]]) -> None:
        """Nothing escapes into the engine's nursery: that would end the mount."""
        try:
            await work()
        except Exception:
            self._bug("metadata prefetch", "the runner")

    # ---- the read path ---------------------------------------------------------------

    def saw(self, image: SnapshotImage, start: int, length: int, offset: int, size: int) -> None:
        """A read of image bytes [offset, offset+size) through the window [start,
        start+length) of a file (the whole image, or a partition): start the walk of
        any filesystem whose head it touches and that was not walked yet."""
        if self._exhausted:
            return
        if start != 0 or length != image.size:
            self._maybe_walk(image, start, length, offset, size)
            return
        found = self._known(image.snapshot_id)
        if found is None:  # the table is not read yet: read it beside this read
            if offset < HEAD_SIZE and image.snapshot_id not in self._discovering:
                self._discovering.add(image.snapshot_id)
                self._start(functools.partial(self._discover, image, (offset, size)))
            return
        if not found:
            self._maybe_walk(image, 0, image.size, offset, size)
        for p in found:
            self._maybe_walk(image, p.offset, p.size, offset, size)

    def walk_all(self, image: SnapshotImage) -> None:
        """Start the walk of every filesystem on `image` now (each partition, or the
        bare disk when it has none), as a read of each one's head would; the partition
        table is read first if it was not yet."""
        if self._exhausted:
            return
        found = self._known(image.snapshot_id)
        if found is None:
            if image.snapshot_id not in self._discovering:
                self._discovering.add(image.snapshot_id)
                self._start(functools.partial(self._discover, image, then_all=True))
            return
        for start, length in [(p.offset, p.size) for p in found] or [(0, image.size)]:
            self._maybe_walk(image, start, length, start, 1)

    def _maybe_walk(
        self, image: SnapshotImage, start: int, length: int, offset: int, size: int
    ) -> None:
        if not (offset < start + min(HEAD_SIZE, length) and offset + size > start):
            return
        window = (image.snapshot_id, start, length)
        if window in self._started:
            return
        self._started.add(window)
        self._start(functools.partial(self._walk, image, start, length))

    async def _discover(
        self, image: SnapshotImage, read: tuple[int, int] | None = None, then_all: bool = False
    ) -> None:
        """Find the partitions, once the first sectors can be read, then start the
        walks the read `(offset, size)` of the whole image touches (or all of them): a
        failed read here must not leave the engine with no partitions for good (it
        keeps what it found)."""
        try:
            with Loan() as loan:
                await image.read(0, 4096, loan=loan)  # the tool's own read, joined
        except EbsfsError:
            self._discovering.discard(image.snapshot_id)  # the next read tries again
            return
        await self._partitions(image.snapshot_id)  # logs and gives [] on damage, never raises
        if read is not None:
            self.saw(image, 0, image.size, *read)
        if then_all:
            self.walk_all(image)

    def _label(self, image: SnapshotImage, start: int, length: int) -> str:
        for p in self._known(image.snapshot_id) or []:
            if (p.offset, p.size) == (start, length):
                return f"{image.snapshot_id}-part{p.number}"
        if (start, length) == (0, image.size):
            return image.snapshot_id
        return f"{image.snapshot_id}@{start}"

    # ---- one walk --------------------------------------------------------------------

    async def _walk(self, image: SnapshotImage, start: int, length: int) -> None:
        """Probe the window's head, then fetch the walker's waves until it ends or stops."""
        label = self._label(image, start, length)
        sid = image.snapshot_id

        async def read(offset: int, size: int) -> bytes:
            # Walkers parse on this (the engine's) thread between reads: a checkpoint at
            # every read lets the tools' reads in, so a walk never holds the loop longer
            # than parsing one read's bytes takes (a wave's reads are all cache hits,
            # which return without one).
            await trio.lowlevel.checkpoint()
            if offset < 0 or size < 0 or size > MAX_WALKER_READ:
                raise WalkStopped(f"read of {size} bytes at {offset} refused")
            if offset >= length or size == 0:
                return b""
            size = min(size, length - offset)
            first, last = (start + offset) // BLOCK_SIZE, (start + offset + size - 1) // BLOCK_SIZE
            for i in range(first, last + 1):
                arriving = self._arriving.get((sid, i))
                if arriving is not None:
                    await arriving.wait()
            with Loan() as loan:
                data = await image.read(start + offset, size, loan=loan)
                return bytes(data)

        try:
            walker = find(await read(0, HEAD_SIZE), self.walkers)
        except EbsfsError as err:
            log.info("%s: no metadata prefetch, its head could not be read: %s", label, err)
            return
        except Exception:
            self._bug(label, "probe")
            return
        if walker is None:
            log.debug("%s: no walker knows this filesystem", label)
            return
        counters = WalkCounters(walker.name)
        self.stats.walks[label] = counters
        log.info("%s: prefetching %s metadata (budget %d blocks)", label, walker.name, self.budget)

        def file_run(offset: int, size: int) -> None:
            if offset >= 0 and size > 0 and offset + size <= length:
                image.note_file_run(start + offset, size)

        walk: AsyncIterator[Wave] | None = None
        state, reason = "stopped", "engine closed"  # unless the walk ends first
        try:
            # The waves' fetches run here; the walk's state is told once they are done.
            async with trio.open_nursery() as fetching:
                try:
                    if getattr(walker, "reports_file_runs", False):
                        walk = cast(RunReporter, walker).walk(read, length, file_run)
                    else:
                        walk = walker.walk(read, length)
                    state, reason = await self._waves(
                        image, start, length, walk, counters, fetching
                    )
                except WalkStopped as err:
                    state, reason = "stopped", str(err) or "damaged metadata"
                except EbsfsError as err:
                    state, reason = "stopped", f"read failed: {err}"
                except Exception as err:
                    self._bug(label, walker.name)
                    state, reason = "stopped", f"walker failed: {err!r}"
                finally:
                    close = getattr(walk, "aclose", None)
                    if close is not None:
                        with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                            await close()
        finally:
            counters.state, counters.reason = state, reason
        log.info(
            "%s: %s metadata prefetch %s%s: %d waves, %d blocks",
            label,
            walker.name,
            counters.state,
            f" ({counters.reason})" if counters.reason else "",
            counters.waves,
            counters.blocks,
        )

    async def _waves(
        self,
        image: SnapshotImage,
        start: int,
        length: int,
        walk: AsyncIterator[Wave],
        counters: WalkCounters,
        fetching: trio.Nursery,
    ) -> tuple[str, str]:
        """The state and reason the walk ends with. Each wave's fetch starts in
        `fetching` and the walker goes on at once: its reads wait for the blocks they
        need (`_arriving`), not for the whole wave."""
        async for wave in walk:
            if counters.waves >= MAX_WAVES:
                return "stopped", f"more than {MAX_WAVES} waves"
            if self._exhausted:
                return "stopped", "budget spent"
            blocks, over = await self._plan(image, start, length, wave)
            counters.waves += 1
            self.stats.prefetch_waves += 1
            fetching.start_soon(self._fetch, image, blocks, counters)
            if over:
                self._spend_all()
                return "stopped", "budget spent"
        return "finished", ""

    async def _plan(
        self, image: SnapshotImage, start: int, length: int, wave: Wave
    ) -> tuple[list[int], bool]:
        """The image blocks of a wave not in memory nor prefetched already, charged to
        the budget; True when the budget ran out before the wave did. Lets other tasks
        (the tool's reads) run every PLAN_SLICE blocks looked at."""
        sid = image.snapshot_id
        new: list[int] = []
        seen: set[int] = set()
        examined = 0
        for offset, size in itertools.islice(wave, MAX_WAVE_EXTENTS):
            lo, hi = max(0, offset), min(length, offset + size)
            if lo >= hi:
                continue
            for i in range((start + lo) // BLOCK_SIZE, (start + hi - 1) // BLOCK_SIZE + 1):
                examined += 1
                if examined > MAX_WAVE_BLOCKS:
                    return new, False
                if examined % PLAN_SLICE == 0:
                    await trio.lowlevel.checkpoint()
                if i in seen:
                    continue
                seen.add(i)
                if (sid, i) in self._fetched or (sid, i) in image.cache:
                    continue
                known, token = image.index.peek(i)
                if known and token is None:
                    continue  # never written: zeros, no call
                if self._spent >= self.budget:
                    return new, True
                self._spent += 1
                self._fetched.add((sid, i))
                self._arriving[(sid, i)] = trio.Event()
                image.note_metadata_block(i)
                new.append(i)
        return new, False

    async def _fetch(self, image: SnapshotImage, blocks: list[int], counters: WalkCounters) -> None:
        """All of `blocks` at once, as many in flight as the limiter allows."""
        self.limiter.total_tokens = self._share()
        async with trio.open_nursery() as nursery:
            for i in blocks:
                nursery.start_soon(self._one, image, i, counters)

    async def _one(self, image: SnapshotImage, index: int, counters: WalkCounters) -> None:
        try:
            async with self.limiter:
                with trio.move_on_after(self.read_timeout), Loan() as loan:
                    if await image.held(index):
                        self._spent -= 1  # a tool or a lineage entry had it: no charge
                        return
                    await image.block(index, loan)
                    counters.blocks += 1
                    self.stats.prefetch_blocks += 1
        except EbsfsError as err:  # the tool's own read retries and reports it
            log.debug("%s: prefetch of block %d failed: %s", image.snapshot_id, index, err)
        finally:  # arrived, failed, timed out or cancelled: a walker's read goes on
            arriving = self._arriving.pop((image.snapshot_id, index), None)
            if arriving is not None:
                arriving.set()

    def _spend_all(self) -> None:
        if not self._exhausted:
            self._exhausted = True
            log.info(
                "metadata prefetch stops: its budget of %d blocks (%d MiB) is spent "
                "(--prefetch-metadata-budget)",
                self.budget,
                self.budget * BLOCK_SIZE // 1024**2,
            )

    def _bug(self, label: str, where: str) -> None:
        """A walker's bug: its traceback once per walker, a line after that."""
        if where in self._bug_logged:
            log.info("%s: metadata prefetch failed in %s again", label, where, exc_info=False)
            return
        self._bug_logged.add(where)
        log.warning("%s: metadata prefetch failed in %s (a bug)", label, where, exc_info=True)
