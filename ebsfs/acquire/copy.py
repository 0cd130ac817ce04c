"""The copy pipeline of `ebsfs get`: every block of one snapshot image, in order, from
where it is found (fetched, read back from an earlier run, or read from a base image)
to the target, and the whole image to the hashers.

Present blocks are fetched concurrently through the engine (its fetch limiter bounds
the calls in flight; every block is checked against its SHA-256 on arrival) and each
is written at its offset as it comes; never-written blocks are holes (zeroed on a
device, zeros in a stream). At most `window` blocks are held in memory at once,
whatever the volume size. The whole-image SHA-256 and MD5 need the bytes in order:
each block stays in memory until its turn, and the hashers (and a stream's writer)
take the image in order in threads of their own (inorder.py), so fetching runs ahead
while they work through long never-written runs (MD5 runs at about 0.7 GB/s). Blocks
are not read back from the output for hashing: a file or a device is written with
O_DIRECT where it allows (target.py), which keeps the image out of the page cache."""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import logging
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import trio

from ebsfs.acquire.inorder import Consumer, InOrder
from ebsfs.acquire.journal import Journal, JournalState
from ebsfs.acquire.manifest import BlockListWriter
from ebsfs.acquire.patience import Patience
from ebsfs.acquire.plan import CopyPlan
from ebsfs.acquire.progress import Progress
from ebsfs.acquire.sources import RELIED_ON_CACHE, Counts, Origin, from_disk_cache
from ebsfs.acquire.target import ZEROS, Target, failure
from ebsfs.constants import BLOCK_SIZE
from ebsfs.engine.cache import Loan
from ebsfs.engine.remote import in_worker
from ebsfs.errors import EbsfsError, OutputError, ReadFailed

log = logging.getLogger(__name__)

ZERO_STEP = 256 * 1024**2
"""Bytes of a hole hashed per call: progress moves and Ctrl-C is heard in between."""
LOOKAHEAD = 16384
"""Steps (blocks, 8 GiB of them) fetching may run ahead of the hashing: a step holds
no data until its block is obtained (the window bounds those), a few hundred bytes."""
STATE_EVERY = 2.0
"""Seconds between saves of the state (how far a device has been zeroed)."""


class Source(StrEnum):
    """Where a present block comes from."""

    FETCH = "fetch"
    """The service (GetSnapshotBlock, through the engine)."""
    RESUMED = "resumed"
    """The output itself: an earlier run wrote it (read back and checked)."""
    BASE = "base"
    """The base image: unchanged since the base's snapshot (checked)."""


@dataclass
class _Gap:
    """Blocks [first, stop) that the snapshot never wrote."""

    first: int
    stop: int


@dataclass
class _Slot:
    """One present block on its way through the window."""

    index: int
    source: Source
    digest: bytes | None = None
    origin: Origin = Origin.SERVICE
    """Where its bytes came from first (a resumed block's is its first run's)."""
    in_hand: trio.Event = field(default_factory=trio.Event)
    """Set once its data is in memory and verified (or it failed, or turned out never
    written): the hashers may take it, whether or not it is on the target yet."""
    data: bytes | memoryview | None = None
    present: bool = False
    """Holds data: False for a block that turned out never written."""
    shares: int = 2
    """Holders of its place in the window: the task obtaining it (until it is written)
    and the hashers (until they have taken it)."""
    loan: Loan = field(default_factory=Loan)
    """The cache's slab behind `data`: kept from reuse until the last holder lets go."""
    error: BaseException | None = None
    fetching: bool = False
    """Counted among the blocks being fetched (Copy._fetching)."""


class Copy:
    """One run of a copy over an engine image into a target.

    Concurrency rule: everything runs on the engine's trio loop; blocking file work
    goes to worker threads (`_disk`, reads and writes at distinct offsets), and the
    in-order digests and stream writes to the threads of `_in_order`. A semaphore
    (`_held`) bounds the blocks in memory (taken before a block is obtained, given
    back once it is both written and hashed); the channel between producer and
    consumer bounds the steps ahead of the hashing."""

    def __init__(
        self,
        plan: CopyPlan,
        target: Target,
        journal: Journal | None,
        blocks: BlockListWriter,
        progress: Progress,
    ) -> None:
        self.plan = plan
        self.image = plan.image
        self.base = plan.base
        self.window = plan.window
        self.read_timeout = plan.read_timeout
        self.target = target
        self.journal = journal
        self.state = journal.state if journal is not None else None
        """The journal's state: how far a device is zeroed is saved in it."""
        self.blocks = blocks
        self.progress = progress
        told = getattr(progress, "throttled", None)  # a display from before it existed
        self.patience = Patience(plan.read_timeout, plan.throttle_budget, self._throttles, told)
        """The per-block time limits, lengthened while the service throttles."""
        self.counts = Counts()
        self.sha256 = hashlib.sha256() if plan.sha256 else None
        self.md5 = hashlib.md5() if plan.md5 else None
        self.position = 0
        """Bytes of the image handed to the hashers so far (in order)."""
        self.hashed = 0
        """Bytes of the image hashed (and streamed) so far."""
        self.zeroed_through = (self.state.zeroed_through or 0) if self.state else 0
        self._saved_at = 0.0
        self._failure: EbsfsError | None = None
        self._nursery: trio.Nursery
        self._held = trio.Semaphore(self.window)
        """Blocks in memory: taken before a block is obtained, given back once it is
        both written and hashed (and streamed): _let_go."""
        self._disk = trio.CapacityLimiter(8)
        self._zeros_ahead = trio.Semaphore(LOOKAHEAD)
        """Runs of zeros handed to the hashers and not yet hashed (they hold no data,
        but a volume may have millions of them)."""
        self._in_order: InOrder
        self._fetching = 0
        """Blocks being fetched: kept to what the service needs in flight (the
        engine's read-ahead depth), not the window, which bounds memory only."""
        self._fetch_done = trio.Event()

    async def run(self) -> None:
        self.progress.start(self.image.size, 0)
        # Steps hold no data until their block is obtained (the window bounds those),
        # so they may run far ahead of the hashing, past long never-written runs.
        send, receive = trio.open_memory_channel[_Gap | _Slot](max(self.window, LOOKAHEAD))
        self._in_order = InOrder(self._consumers(), self._consumer_failed)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._produce, nursery, send)
                nursery.start_soon(self.patience.run)
                await self._consume(receive)
                self.patience.stop()
        finally:
            self._in_order.close()
        if self._failure is not None:
            raise self._failure
        await self._save_state(force=True)

    # -- producing: one step per block (or run of never-written blocks), in order --

    async def _steps(self) -> AsyncGenerator[_Gap | _Slot, None]:
        index = self.image.index
        position = 0
        for chunk_no in range(index.chunk_count):
            with self.patience.limit() as scope:
                items = await index.chunk_items(chunk_no)
            if scope.cancelled_caught:
                raise ReadFailed(
                    f"{self.image.snapshot_id}: listing blocks of chunk "
                    f"{chunk_no} took over {self.read_timeout:.0f}s"
                )
            if not items:
                continue
            present = [i for i, _ in items]
            sources = await trio.to_thread.run_sync(self._sources, present, limiter=self._disk)
            for i in present:
                if i > position:
                    yield _Gap(position, i)
                source, digest, origin = sources.get(i, (Source.FETCH, None, Origin.SERVICE))
                yield _Slot(i, source, digest, origin)
                position = i + 1
        if position < index.volume_blocks:
            yield _Gap(position, index.volume_blocks)

    def _sources(self, present: list[int]) -> dict[int, tuple[Source, bytes, Origin]]:
        """Where each block of one chunk comes from, when not from the service: written
        by a previous run (the journal's record, with its source), or unchanged in the
        base image. A write-only run (`--cache-dir-write-only`) fetches again what a
        previous run took from the disk cache (or did not say where it took it)."""
        found: dict[int, tuple[Source, bytes, Origin]] = {}
        first = present[0]
        recorded, origins = (
            (self.journal.recorded(first, present[-1]), self.journal.origins(first, present[-1]))
            if self.journal is not None
            else ({}, b"")
        )
        for i in present:
            digest = recorded.get(i)
            origin = Origin.of_code(origins[i - first]) if digest is not None else Origin.SERVICE
            if digest is not None and self.plan.cache_write_only and origin in RELIED_ON_CACHE:
                log.info("block %d: taken from the disk cache by an earlier run: fetching it", i)
                digest = None
            if digest is not None:
                found[i] = (Source.RESUMED, digest, origin)
            elif self.base is not None:
                base_digest = self.base.unchanged_digest(i)
                if base_digest is not None:
                    found[i] = (Source.BASE, base_digest, Origin.BASE)
        return found

    async def _produce(
        self, nursery: trio.Nursery, send: trio.MemorySendChannel[_Gap | _Slot]
    ) -> None:
        async with send, aclosing(self._steps()) as steps:
            async for step in steps:
                if isinstance(step, _Slot):
                    await self._held.acquire()
                    if step.source is Source.FETCH:
                        await self._fetch_room()
                    nursery.start_soon(self._obtain, step)
                await send.send(step)

    def _fetched(self, slot: _Slot) -> None:
        """The slot's call is over (its block is fetched, or it failed): make room for
        the next fetch, before the block is written."""
        if slot.fetching:
            slot.fetching = False
            self._fetching -= 1
            self._fetch_done.set()

    async def _fetch_room(self) -> None:
        """Wait until fewer blocks are being fetched than the service needs in flight
        (remote.depth(): the bandwidth-delay product, as for a mount's read-ahead).
        More would only queue behind each other on this machine's CPU."""
        while self._fetching >= self.image.remote.depth():
            self._fetch_done = trio.Event()
            await self._fetch_done.wait()
        self._fetching += 1

    async def _obtain(self, slot: _Slot) -> None:
        slot.fetching = slot.source is Source.FETCH
        try:
            await self._obtain_block(slot)
        except EbsfsError as err:
            # The copy cannot finish: stop at once rather than fetch what cannot be
            # written (a full disk) or keep calling a service that fails.
            slot.error = err
            if self._failure is None:
                self._failure = err
                self._nursery.cancel_scope.cancel()
        finally:
            self._fetched(slot)
            slot.in_hand.set()
            self._let_go(slot)

    def _let_go(self, slot: _Slot) -> None:
        """One holder of the slot's place in the window is done with it."""
        slot.shares -= 1
        if slot.shares == 0:
            slot.loan.give_back()  # written and hashed: its slab may be recycled
            self._held.release()

    async def _obtain_block(self, slot: _Slot) -> None:
        offset = slot.index * BLOCK_SIZE
        if slot.source is Source.RESUMED:
            assert slot.digest is not None
            data = await trio.to_thread.run_sync(
                self._read_back, offset, slot.digest, limiter=self._disk
            )
            if data is not None:
                slot.data, slot.present = data, True
                self.counts.resumed += 1
                return
            log.info(
                "%s: block %d on disk does not match its record: fetching it again",
                self.target.name,
                slot.index,
            )
            self.counts.refetched += 1
            slot.source = Source.FETCH
        if slot.source is Source.BASE:
            assert self.base is not None and slot.digest is not None
            base, digest = self.base, slot.digest
            slot.data = await trio.to_thread.run_sync(
                base.read_verified, slot.index, digest, limiter=self._disk
            )
            self.counts.from_base += 1
        else:
            with self.patience.limit() as scope:
                block = await self.image.block(slot.index, slot.loan)
            self._fetched(slot)
            if scope.cancelled_caught:
                raise ReadFailed(
                    f"{self.image.snapshot_id}: block {slot.index} took over "
                    f"{self.read_timeout:.0f}s"
                )
            if from_disk_cache(self.image, slot.index):
                slot.origin = Origin.DISK_CACHE
                self.counts.from_disk_cache += 1
            else:
                slot.origin = Origin.SERVICE
                self.counts.fetched += 1
            if block.checksum is None:  # no longer listed: never written after all
                return
            slot.data, slot.digest = block.data, base64.b64decode(block.checksum)
        slot.present = True
        # Hashing need not wait for the disk: a write that waits on the device (tens
        # to hundreds of ms now and then with O_DIRECT) then holds only its own place
        # in the window, instead of stopping the hashers, and behind them the window.
        slot.in_hand.set()
        if not self.target.stream:
            # Shielded: a block in hand is written (and recorded) even when the copy is
            # being stopped (Ctrl-C, another block's failure), or a resumed run would
            # fetch it again. At most the window's blocks wait here.
            with trio.CancelScope(shield=True):
                await in_worker(
                    self._disk,
                    functools.partial(self._write, slot.index, slot.data, slot.digest, slot.origin),
                    abandon_on_cancel=False,
                )

    def _read_back(self, offset: int, digest: bytes) -> bytes | None:
        data = self.target.read(offset, BLOCK_SIZE)
        ok = len(data) == BLOCK_SIZE and hashlib.sha256(data).digest() == digest
        return data if ok else None

    def _write(
        self, index: int, data: bytes | memoryview | None, digest: bytes | None, origin: Origin
    ) -> None:
        assert data is not None and digest is not None
        self.target.write(index * BLOCK_SIZE, data)
        if self.journal is not None and index * BLOCK_SIZE != self.target.unrecorded:
            try:
                self.journal.record_origin(index, origin)
                self.journal.record(index, digest)
            except OSError as err:
                raise failure("cannot write", self.journal.sums_path, err) from err

    # -- consuming: hash (and stream) in order ---------------------------------------

    async def _consume(self, receive: trio.MemoryReceiveChannel[_Gap | _Slot]) -> None:
        async with receive:
            while (step := await self._next_step(receive)) is not None:
                if isinstance(step, _Gap):
                    await self._zeros(step.first * BLOCK_SIZE, step.stop * BLOCK_SIZE)
                    continue
                if not step.in_hand.is_set():
                    self._in_order.flush_if_idle()  # the hashers need not wait with us
                    await step.in_hand.wait()
                if step.error is not None:
                    raise step.error
                offset = step.index * BLOCK_SIZE
                if not step.present:  # turned out never written
                    self._let_go(step)
                    await self._zeros(offset, offset + BLOCK_SIZE)
                    continue
                assert self.position == offset and step.digest is not None
                self.blocks.add(step.index, step.digest, step.origin)
                data, step.data = step.data, None
                self.position = offset + BLOCK_SIZE
                self._in_order.feed(
                    offset, data, BLOCK_SIZE, functools.partial(self._block_hashed, step)
                )
        await self._in_order.drain()

    async def _next_step(
        self, receive: trio.MemoryReceiveChannel[_Gap | _Slot]
    ) -> _Gap | _Slot | None:
        """The next step, None at the end; what the hashers have been given so far is
        handed on before waiting for it."""
        try:
            return receive.receive_nowait()
        except trio.WouldBlock:
            self._in_order.flush_if_idle()
        except trio.EndOfChannel:
            return None
        try:
            return await receive.receive()
        except trio.EndOfChannel:
            return None

    def _throttles(self) -> int:
        """Throttling answers the engine's calls got so far (the checks' too)."""
        return self.image.stats.throttles

    def _block_hashed(self, slot: _Slot) -> None:
        self._let_go(slot)
        self._report(BLOCK_SIZE)

    def _report(self, length: int) -> None:
        self.hashed += length
        counts = self.counts
        self.progress.update(
            self.hashed, counts.fetched + counts.from_disk_cache + counts.from_base
        )

    def _consumers(self) -> list[Consumer]:
        consumers: list[Consumer] = [
            functools.partial(_update, h) for h in (self.sha256, self.md5) if h is not None
        ]
        if self.target.stream:
            consumers.append(self._stream)
        return consumers

    def _stream(self, offset: int, data: bytes | memoryview | None, length: int) -> None:
        if data is None:
            self.target.zero(offset, length)
        else:
            self.target.write(offset, data)

    def _consumer_failed(self, err: BaseException) -> None:
        if self._failure is None:
            self._failure = (
                err if isinstance(err, EbsfsError) else OutputError(f"{self.target.name}: {err}")
            )
        self._nursery.cancel_scope.cancel()

    async def _zeros(self, start: int, stop: int) -> None:
        """Bytes [start, stop) the snapshot never wrote: hashed as zeros, zeroed on
        the target, in steps."""
        assert self.position == start
        for offset in range(start, stop, ZERO_STEP):
            end = min(offset + ZERO_STEP, stop)
            if self.target.zeroing_costs:  # a device (a stream's zeros go in order)
                # A resumed run skips what an earlier one zeroed on the device.
                begin = max(offset, self.zeroed_through)
                if begin < end:
                    await in_worker(
                        self._disk,
                        functools.partial(self.target.zero, begin, end - begin),
                        abandon_on_cancel=False,
                    )
            await self._zeros_ahead.acquire()
            self._in_order.feed(
                offset, None, end - offset, functools.partial(self._zeros_hashed, end - offset)
            )
            self.position = end
            self.zeroed_through = max(self.zeroed_through, end)
            await self._save_state()

    def _zeros_hashed(self, length: int) -> None:
        self._zeros_ahead.release()
        self._report(length)

    async def _save_state(self, force: bool = False) -> None:
        """Remember how far a device is zeroed (a resumed run skips that part), once
        those zeros are on stable storage."""
        if self.state is None or self.journal is None or not self.target.zeroing_costs:
            return
        now = trio.current_time()
        if not force and now - self._saved_at < STATE_EVERY:
            return
        self._saved_at = now
        if self.state.zeroed_through == self.zeroed_through:
            return
        # A copy: the worker thread writes it while this loop goes on changing ours.
        state = dataclasses.replace(self.state, zeroed_through=self.zeroed_through)
        await trio.to_thread.run_sync(self._flush_and_save, state, limiter=self._disk)
        self.state.zeroed_through = state.zeroed_through

    def _flush_and_save(self, state: JournalState) -> None:
        """The zeros `state` claims reach stable storage before the journal says so
        (BLKZEROOUT and O_DIRECT writes may sit in the disk's write cache): after a
        power cut a resumed run must never skip zeroing what the disk lost."""
        assert self.journal is not None
        self.target.flush()
        self.journal.save(state)


def _update(hasher: Any, offset: int, data: bytes | memoryview | None, length: int) -> None:
    """The InOrder consumer of one hasher: `length` zeros when `data` is None."""
    if data is not None:
        hasher.update(data)
        return
    view = memoryview(ZEROS)
    while length > 0:
        piece = min(length, len(ZEROS))
        hasher.update(view[:piece])
        length -= piece
