"""The pieces of an image, in order, to consumers that each run in a thread of their
own: the whole-image SHA-256 (and MD5) of `ebsfs get`, and the writer of a stream.

Why threads of their own rather than a worker call per batch: hashing releases the
GIL, and the MD5 when asked (about 0.7 GB/s of one core, holes included) is the
longest serial job of a copy. Fed through a queue it runs whenever there is something
to hash, without waiting for the slower of the two hashers or for a trip through the
trio loop between batches, while the SHA-256 runs ahead of it on the other core.

Why pieces are staged: a hasher gives up the GIL for each update and must take it
back before the next, against dozens of fetch threads. Per 512 KiB block that wait was
as long as the hashing itself (the MD5 thread ran 1.5 ms per block for 0.7 ms of CPU,
docs/performance.md), so the MD5 fell behind and finished alone after the last block
arrived. Consecutive pieces are therefore copied into a few staging buffers of
STAGE_SIZE bytes on the trio thread (a memcpy, about 0.1 ms per block) and each
consumer takes a whole stage in one call."""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from ebsfs.engine import inbox

Consumer = Callable[[int, "bytes | memoryview | None", int], None]
"""Takes (offset, data, length): `data` is None for `length` bytes of zeros."""

STAGE_SIZE = 8 * 1024**2
"""Bytes of consecutive pieces a consumer takes in one call, at most."""
STAGES = 8
"""Staging buffers (being filled or with the consumers), made as needed: 64 MiB at
most, a fixed overhead beside the window of blocks."""


@dataclass(eq=False)
class _Piece:
    offset: int
    data: bytes | memoryview | None
    length: int
    done: Callable[[], None]
    left: int
    """Consumers that have not taken it yet."""


class _Stage:
    """Consecutive pieces copied into one buffer, handed on as a single piece."""

    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)
        self.begin(0)

    def begin(self, offset: int) -> None:
        self.offset, self.used = offset, 0
        self.dones: list[Callable[[], None]] = []

    def fits(self, offset: int, length: int) -> bool:
        return offset == self.offset + self.used and self.used + length <= len(self.buf)

    def add(self, data: bytes | memoryview, length: int, done: Callable[[], None]) -> None:
        memoryview(self.buf)[self.used : self.used + length] = data  # sizes must agree
        self.used += length
        self.dones.append(done)


class InOrder:
    """Feeds every consumer the same pieces in the order given, each consumer in its
    own thread. Use from one trio task: `feed` (and `flush_if_idle` before waiting for
    the next piece), then `drain`; `close` in any case. Consecutive pieces with data
    may reach the consumers joined, as one piece of up to `stage_size` bytes (0: never
    joined), through at most `stages` staging buffers.

    The first consumer failure is kept (`failure`), reported once through
    `on_failure` on the trio thread, and every consumer skips the pieces after it."""

    def __init__(
        self,
        consumers: list[Consumer],
        on_failure: Callable[[BaseException], None],
        stage_size: int = STAGE_SIZE,
        stages: int = STAGES,
    ) -> None:
        self._stage_size = stage_size
        self._spare_stages = stages if stage_size > 0 else 0
        """Staging buffers not made yet (made when first needed)."""
        self._free: list[_Stage] = []
        self._stage: _Stage | None = None
        """Being filled: pieces copied in and not handed on yet."""
        self._inbox = inbox.current()
        self._on_failure = on_failure
        self._lock = threading.Lock()
        self._queues: list[queue.SimpleQueue[_Piece | None]] = [
            queue.SimpleQueue() for _ in consumers
        ]
        self._unfinished = 0
        self._all_done = trio.Event()
        self._all_done.set()
        self.failure: BaseException | None = None
        self._threads = [
            threading.Thread(
                target=self._run, args=(consumer, q), daemon=True, name=f"ebsfs-inorder-{n}"
            )
            for n, (consumer, q) in enumerate(zip(consumers, self._queues, strict=True))
        ]
        for thread in self._threads:
            thread.start()

    def feed(
        self, offset: int, data: bytes | memoryview | None, length: int, done: Callable[[], None]
    ) -> None:
        """Trio thread: the next piece. `done()` runs on the trio thread once every
        consumer has taken it (then `data` is no longer used). A piece with data is
        copied into the stage being filled while a staging buffer is free; a stage goes
        on once full, before a piece of zeros, with `flush_if_idle` or `drain`. With no
        consumers at all, `done()` runs at once."""
        if not self._queues:
            done()
            return
        stage = self._stage
        if stage is not None and (data is None or not stage.fits(offset, length)):
            self._flush()
            stage = None
        if data is not None and stage is None and length <= self._stage_size:
            stage = self._stage = self._take_stage(offset)
        if data is None or stage is None:
            self._hand_on(offset, data, length, done)
            return
        stage.add(data, length, done)
        if stage.used == len(stage.buf):
            self._flush()

    def flush_if_idle(self) -> None:
        """Trio thread, before waiting for the next piece: hand on what is staged if
        the consumers have nothing else to do (otherwise they get it once they have:
        a stage grows while they are busy)."""
        if self._unfinished == 0:
            self._flush()

    def _flush(self) -> None:
        stage, self._stage = self._stage, None
        if stage is None:
            return
        dones = stage.dones

        def staged_done() -> None:
            self._free.append(stage)
            for done in dones:
                done()

        self._hand_on(stage.offset, memoryview(stage.buf)[: stage.used], stage.used, staged_done)

    def _take_stage(self, offset: int) -> _Stage | None:
        """A free staging buffer, begun at `offset`; None when all are in use (the
        piece then goes on as it is)."""
        if self._free:
            stage = self._free.pop()
        elif self._spare_stages > 0:
            self._spare_stages -= 1
            stage = _Stage(self._stage_size)
        else:
            return None
        stage.begin(offset)
        return stage

    def _hand_on(
        self, offset: int, data: bytes | memoryview | None, length: int, done: Callable[[], None]
    ) -> None:
        piece = _Piece(offset, data, length, done, len(self._queues))
        if self._all_done.is_set():
            self._all_done = trio.Event()
        self._unfinished += 1
        for q in self._queues:
            q.put(piece)

    async def drain(self) -> None:
        """Until every piece fed so far is taken by every consumer; the first consumer
        failure, if any."""
        self._flush()
        await self._all_done.wait()
        if self.failure is not None:
            raise self.failure

    def close(self) -> None:
        """Ends the threads once they finish the piece in hand (pieces not yet taken
        are dropped). Safe to call more than once."""
        for q in self._queues:
            q.put(None)

    def _run(self, consume: Consumer, pieces: queue.SimpleQueue[_Piece | None]) -> None:
        while (piece := pieces.get()) is not None:
            if self.failure is None:
                try:
                    consume(piece.offset, piece.data, piece.length)
                except BaseException as err:  # noqa: BLE001 - handed to the trio thread
                    with self._lock:
                        first = self.failure is None
                        if first:
                            self.failure = err
                    if first:
                        self._call_soon(self._on_failure, err)
            with self._lock:
                piece.left -= 1
                last = piece.left == 0
            if last:
                self._call_soon(self._finished, piece)

    def _finished(self, piece: _Piece) -> None:  # trio thread
        piece.data = None
        piece.done()
        self._unfinished -= 1
        if self._unfinished == 0:
            self._flush()  # the consumers are idle: give them what is staged, if any
            if self._unfinished == 0:
                self._all_done.set()

    def _call_soon(self, fn: Callable[[Any], None], arg: Any) -> None:
        with contextlib.suppress(trio.RunFinishedError):  # the loop is gone: nobody waits
            self._inbox.post(fn, arg)
