"""The pieces of an image, in order, to consumers that each run in a thread of their
own: the whole-image SHA-256 and MD5 of `ebsfs get`, and the writer of a stream.

Why threads of their own rather than a worker call per batch: hashing releases the
GIL, and the MD5 (about 0.7 GB/s of one core, holes included) is the longest serial
job of a copy. Fed through a queue it runs whenever there is something to hash,
without waiting for the slower of the two hashers or for a trip through the trio loop
between batches, while the SHA-256 runs ahead of it on the other core."""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import trio

Consumer = Callable[[int, "bytes | memoryview | None", int], None]
"""Takes (offset, data, length): `data` is None for `length` bytes of zeros."""


@dataclass(eq=False)
class _Piece:
    offset: int
    data: bytes | memoryview | None
    length: int
    done: Callable[[], None]
    left: int
    """Consumers that have not taken it yet."""


class InOrder:
    """Feeds every consumer the same pieces in the order given, each consumer in its
    own thread. Use from one trio task: `feed`, then `drain`; `close` in any case.

    The first consumer failure is kept (`failure`), reported once through
    `on_failure` on the trio thread, and every consumer skips the pieces after it."""

    def __init__(self, consumers: list[Consumer],
                 on_failure: Callable[[BaseException], None]) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._on_failure = on_failure
        self._lock = threading.Lock()
        self._queues: list[queue.SimpleQueue[_Piece | None]] = [
            queue.SimpleQueue() for _ in consumers]
        self._unfinished = 0
        self._all_done = trio.Event()
        self._all_done.set()
        self.failure: BaseException | None = None
        self._threads = [
            threading.Thread(target=self._run, args=(consumer, q), daemon=True,
                             name=f"ebsfs-inorder-{n}")
            for n, (consumer, q) in enumerate(zip(consumers, self._queues, strict=True))]
        for thread in self._threads:
            thread.start()

    def feed(self, offset: int, data: bytes | memoryview | None, length: int,
             done: Callable[[], None]) -> None:
        """Trio thread: the next piece. `done()` runs on the trio thread once every
        consumer has taken it (then `data` is no longer used)."""
        piece = _Piece(offset, data, length, done, len(self._queues))
        if self._unfinished == 0:
            self._all_done = trio.Event()
        self._unfinished += 1
        for q in self._queues:
            q.put(piece)

    async def drain(self) -> None:
        """Until every piece fed so far is taken by every consumer; the first consumer
        failure, if any."""
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
            self._all_done.set()

    def _call_soon(self, fn: Callable[..., None], *args: object) -> None:
        with contextlib.suppress(trio.RunFinishedError):  # the loop is gone: nobody waits
            self._token.run_sync_soon(fn, *args)
