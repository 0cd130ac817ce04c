"""`ebsfs get`: a verified, resumable copy of a snapshot with its custody manifest, a
thin face over the read engine.

Present blocks are fetched concurrently through the engine (its fetch limiter bounds
the calls in flight; every block is checked against its SHA-256 on arrival) and each
is written at its offset as it comes; never-written blocks are holes (zeroed on a
device, zeros in a stream). At most `window` blocks are held in memory at once,
whatever the volume size. The whole-image SHA-256 and MD5 need the bytes in order:
each block stays in memory until its turn, and the hashers (and a stream's writer)
take the image in order in threads of their own (inorder.py), so fetching runs ahead
while they work through long never-written runs (MD5 runs at about 0.7 GB/s). Blocks
are not read back from the output for hashing: a file or a device is written with
O_DIRECT where it allows (target.py), which keeps the image out of the page cache.

Resume: each written block is recorded in the journal (journal.py). Running the same
command again re-reads the recorded blocks from the output, checks each against its
record (a mismatch is fetched again), and fetches only the rest. An incremental copy
(`--base-image`) takes every block that ListChangedBlocks does not name from the base
image, checked against the base's manifest. Until the manifest is written the image
is not done: a regular file is OUTPUT.part until then."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import functools
import hashlib
import logging
import os
from collections.abc import AsyncGenerator, Callable, Iterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import trio

from ebsfs.constants import __version__
from ebsfs.acquire.inorder import Consumer, InOrder
from ebsfs.acquire.journal import Journal
from ebsfs.acquire.manifest import (
    BlockListWriter,
    Manifest,
    file_sha256,
    manifest_path,
    read_manifest,
    side_file_path,
    write_manifest,
)
from ebsfs.acquire.progress import Progress, QuietProgress
from ebsfs.acquire.target import (
    ZEROS,
    DeviceTarget,
    FileTarget,
    StreamTarget,
    Target,
    check_directory,
    failure,
    is_block_device,
)
from ebsfs.constants import BLOCK_SIZE
from ebsfs.engine import engine
from ebsfs.engine.cache import SLAB_SIZE
from ebsfs.engine.diff import ChangedRange
from ebsfs.engine.engine import Engine, EngineConfig, check_snapshot_id
from ebsfs.engine.image import SnapshotImage
from ebsfs.engine.remote import in_worker
from ebsfs.errors import (
    BaseImageMismatch,
    EbsfsError,
    ManifestError,
    OutputError,
    ReadFailed,
    UserInputError,
    first_leaf,
)

log = logging.getLogger(__name__)

ZERO_STEP = 256 * 1024**2
"""Bytes of a hole hashed per call: progress moves and Ctrl-C is heard in between."""
LOOKAHEAD = 16384
"""Steps (blocks, 8 GiB of them) fetching may run ahead of the hashing: a step holds
no data until its block is obtained (the window bounds those), a few hundred bytes."""
STATE_EVERY = 2.0
"""Seconds between saves of the state (how far a device has been zeroed)."""


@dataclass
class GetRequest:
    """What to copy where. `output` is a file path, a block device or "-" (standard
    output). The manifest goes to `manifest` (default: OUTPUT.manifest.json, or
    `<snapshot-id>.manifest.json` in the current directory for a device or a stream)."""

    snapshot_id: str
    output: str
    manifest: str | None = None
    base_image: str | None = None
    base_manifest: str | None = None
    md5: bool = False
    """Also the image's MD5 (the older forensic convention). Off unless asked: it
    takes one core per 0.7 GB/s of image, holes included, 2.4 times the SHA-256's CPU;
    on two cores it made copies 1.2-1.5 times slower (docs/performance.md)."""
    image_hash: bool = True
    """The whole image's SHA-256 (sha256sum's). Without it the manifest still pins
    every byte (each written block's SHA-256, zeros elsewhere) and `verify` checks
    them all; what is saved is hashing every never-written byte, about 0.6 s of one
    core per GiB of volume, which is most of a copy of a mostly empty volume."""
    metadata: Callable[[], tuple[dict[str, Any] | None, str | None]] | None = None
    """Asked once local checks passed: the snapshot's EC2 metadata for the manifest
    (metadata.py), and why there is none when there is none."""


@dataclass
class GetResult:
    manifest: Manifest
    manifest_path: str
    output: str
    already_done: bool = False


@dataclass
class Counts:
    fetched: int = 0
    from_base: int = 0
    resumed: int = 0
    """Blocks a previous run wrote, re-read and found right."""
    refetched: int = 0
    """Blocks a previous run recorded that did not read back right (fetched again)."""

    def as_json(self) -> dict[str, int]:
        return {"fetched_blocks": self.fetched, "base_blocks": self.from_base,
                "resumed_blocks": self.resumed, "refetched_blocks": self.refetched}


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ---- where things go ---------------------------------------------------------------


@dataclass
class Layout:
    """The files of one copy: the output, its manifest, the journal stem."""

    kind: str
    """"file", "device" or "stream"."""
    output: str
    manifest: str
    stem: str
    """Journal and spool files are `<stem>.part.*`."""

    @classmethod
    def of(cls, request: GetRequest) -> Layout:
        if request.output == "-":
            kind = "stream"
        elif is_block_device(request.output):
            kind = "device"
        else:
            kind = "file"
        if kind == "file":
            manifest = request.manifest or manifest_path(request.output)
            stem = request.output
        else:
            manifest = request.manifest or f"{request.snapshot_id}.manifest.json"
            stem = manifest[: -len(".manifest.json")] if manifest.endswith(
                ".manifest.json") else manifest
        return cls(kind, request.output, manifest, stem)


def _already_done(layout: Layout, snapshot_id: str) -> Manifest | None:
    """The manifest of a finished copy of this snapshot at this output, if there is one."""
    if not os.path.exists(layout.manifest):
        return None
    try:
        done = read_manifest(layout.manifest)
    except ManifestError:
        return None
    return done if done.snapshot_id == snapshot_id else None


def preflight(request: GetRequest, layout: Layout) -> tuple[Manifest | None, dict[str, Any] | None]:
    """Local checks before any call: (a finished copy already there, the state of an
    unfinished run to resume). One-line errors for anything that cannot work."""
    check_snapshot_id(request.snapshot_id)
    if request.md5 and not request.image_hash:
        raise UserInputError("--md5 and --no-image-hash do not go together: the MD5 is "
                             "a hash of the whole image")
    if layout.kind == "stream" and os.isatty(1):
        raise UserInputError("refusing to write a disk image to a terminal: redirect "
                             "standard output or give a file name")
    if layout.kind == "file":
        check_directory(layout.output, "output")
        if os.path.isdir(layout.output):
            raise OutputError(f"{layout.output} is a directory: give a file name for the image")
    check_directory(layout.manifest, "manifest")
    journal = Journal(layout.stem)
    if layout.kind != "stream" and journal.exists():
        state = journal.load()
        if state["snapshot_id"] != request.snapshot_id:
            raise UserInputError(
                f"{layout.output} belongs to an unfinished copy of {state['snapshot_id']} "
                f"({journal.state_path}), not {request.snapshot_id}: finish it with `ebsfs "
                f"get {state['snapshot_id']} {layout.output}`, or remove "
                f"{layout.stem}.part* to discard it")
        if state.get("output") != os.path.abspath(layout.output):
            raise UserInputError(f"{journal.state_path} is the record of a copy to "
                                 f"{state.get('output')}, not {layout.output}")
        return None, state
    done = _already_done(layout, request.snapshot_id)
    if layout.kind == "file":
        if os.path.exists(layout.output):
            if done is not None:
                return done, None
            raise OutputError(f"{layout.output} exists and is not a finished copy of "
                              f"{request.snapshot_id}: remove it or choose another name")
        if os.path.exists(layout.output + ".part"):
            raise OutputError(f"{layout.output}.part exists but no record of an unfinished "
                              "copy does: remove it or choose another name")
    if layout.kind == "device" and done is not None:
        return done, None
    if os.path.exists(layout.manifest):
        raise OutputError(f"manifest {layout.manifest} exists already: remove it or choose "
                          "another with --manifest")
    return None, None


# ---- the base of an incremental copy -----------------------------------------------


class BaseImage:
    """A verified copy of an earlier snapshot of the same volume, and its manifest."""

    def __init__(self, path: str, manifest_file: str | None) -> None:
        self.path = path
        self.manifest_path = manifest_file or manifest_path(path)
        try:
            self.manifest = read_manifest(self.manifest_path)
        except ManifestError as err:
            raise BaseImageMismatch(f"base image {path}: {err}") from err
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except OSError as err:
            raise BaseImageMismatch(f"cannot open base image {path}: {err.strerror}") from err
        size = os.lseek(self.fd, 0, os.SEEK_END)
        regular = not is_block_device(path)
        if size < self.manifest.volume_size or (regular and size != self.manifest.volume_size):
            os.close(self.fd)
            raise BaseImageMismatch(
                f"base image {path} holds {size} bytes, its manifest {self.manifest_path} "
                f"says {self.manifest.volume_size}: not the copy the manifest describes")
        self._digests: Iterator[tuple[int, bytes]] | None = None
        self._next: tuple[int, bytes] | None = None
        self._changes: Iterator[ChangedRange] | None = None
        self._change: ChangedRange | None = None

    @property
    def snapshot_id(self) -> str:
        return self.manifest.snapshot_id

    def check(self, snapshot_id: str, volume_size: int) -> None:
        if self.snapshot_id == snapshot_id:
            raise BaseImageMismatch(f"base image {self.path} is a copy of {snapshot_id} "
                                    "itself: nothing to fetch")
        if self.manifest.volume_size != volume_size:
            raise BaseImageMismatch(
                f"base image {self.path} is of a {self.manifest.volume_size}-byte volume, "
                f"{snapshot_id} of a {volume_size}-byte one: not the same volume")

    def start(self, changes: Iterator[ChangedRange]) -> None:
        """Begin walking the changed ranges and the base's block list (both ascending)."""
        self._changes = changes
        self._change = next(changes, None)
        self._digests = self.manifest.block_digests()
        self._next = next(self._digests, None)

    def unchanged_digest(self, index: int) -> bytes | None:
        """The base's SHA-256 of block `index` if ListChangedBlocks does not name it
        (so the base holds the same data), else None. Indexes must come ascending."""
        assert self._changes is not None and self._digests is not None
        while self._change is not None and self._change.last_block < index:
            self._change = next(self._changes, None)
        if self._change is not None and self._change.first_block <= index:
            return None
        while self._next is not None and self._next[0] < index:
            self._next = next(self._digests, None)
        if self._next is None or self._next[0] != index:
            raise BaseImageMismatch(
                f"the base manifest {self.manifest_path} lists no block {index}, which is "
                f"unchanged since {self.snapshot_id} and written: the manifest is not that "
                "snapshot's")
        return self._next[1]

    def read_verified(self, index: int, digest: bytes) -> bytes:
        offset = index * BLOCK_SIZE
        try:
            data = os.pread(self.fd, BLOCK_SIZE, offset)
        except OSError as err:
            raise BaseImageMismatch(f"cannot read base image {self.path}: "
                                    f"{err.strerror}") from err
        if len(data) != BLOCK_SIZE or hashlib.sha256(data).digest() != digest:
            raise BaseImageMismatch(
                f"base image {self.path} does not match its manifest at block {index} "
                f"(offset {offset}): check it with `ebsfs verify {self.path}`")
        return data

    def describe(self) -> dict[str, Any]:
        return {"snapshot_id": self.snapshot_id, "image": os.path.abspath(self.path),
                "manifest": os.path.abspath(self.manifest_path),
                "manifest_sha256": file_sha256(self.manifest_path),
                "image_sha256": self.manifest.sha256}

    def close(self) -> None:
        os.close(self.fd)


# ---- the copy ----------------------------------------------------------------------


FETCH, RESUMED, BASE = "fetch", "resumed", "base"


@dataclass
class _Gap:
    """Blocks [first, stop) that the snapshot never wrote."""

    first: int
    stop: int


@dataclass
class _Slot:
    """One present block on its way through the window."""

    index: int
    source: str
    digest: bytes | None = None
    in_hand: trio.Event = field(default_factory=trio.Event)
    """Set once its data is in memory and verified (or it failed, or turned out never
    written): the hashers may take it, whether or not it is on the target yet."""
    data: bytes | memoryview | None = None
    present: bool = False
    """Holds data: False for a block that turned out never written."""
    shares: int = 2
    """Holders of its place in the window: the task obtaining it (until it is written)
    and the hashers (until they have taken it)."""
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

    def __init__(self, image: SnapshotImage, target: Target, journal: Journal | None,
                 blocks: BlockListWriter, progress: Progress, window: int,
                 read_timeout: float, base: BaseImage | None = None,
                 state: dict[str, Any] | None = None, md5: bool = False,
                 image_hash: bool = True) -> None:
        self.image = image
        self.target = target
        self.journal = journal
        self.blocks = blocks
        self.progress = progress
        self.window = window
        self.read_timeout = read_timeout
        self.base = base
        self.state = state
        self.counts = Counts()
        self.sha256 = hashlib.sha256() if image_hash else None
        self.md5 = hashlib.md5() if md5 else None
        self.position = 0
        """Bytes of the image handed to the hashers so far (in order)."""
        self.hashed = 0
        """Bytes of the image hashed (and streamed) so far."""
        self.zeroed_through = int(state.get("zeroed_through", 0)) if state else 0
        self._saved_at = 0.0
        self._failure: EbsfsError | None = None
        self._nursery: trio.Nursery
        self._held = trio.Semaphore(window)
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
                await self._consume(receive)
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
            with trio.move_on_after(self.read_timeout) as scope:
                items = await index.chunk_items(chunk_no)
            if scope.cancelled_caught:
                raise ReadFailed(f"{self.image.snapshot_id}: listing blocks of chunk "
                                 f"{chunk_no} took over {self.read_timeout:.0f}s")
            if not items:
                continue
            present = [i for i, _ in items]
            sources = await trio.to_thread.run_sync(self._sources, present,
                                                    limiter=self._disk)
            for i in present:
                if i > position:
                    yield _Gap(position, i)
                source, digest = sources.get(i, (FETCH, None))
                yield _Slot(i, source, digest)
                position = i + 1
        if position < index.volume_blocks:
            yield _Gap(position, index.volume_blocks)

    def _sources(self, present: list[int]) -> dict[int, tuple[str, bytes]]:
        """Where each block of one chunk comes from, when not from the service: written
        by a previous run (the journal's record), or unchanged in the base image."""
        found: dict[int, tuple[str, bytes]] = {}
        recorded = (self.journal.recorded(present[0], present[-1])
                    if self.journal is not None else {})
        for i in present:
            digest = recorded.get(i)
            if digest is not None:
                found[i] = (RESUMED, digest)
            elif self.base is not None:
                base_digest = self.base.unchanged_digest(i)
                if base_digest is not None:
                    found[i] = (BASE, base_digest)
        return found

    async def _produce(self, nursery: trio.Nursery,
                       send: trio.MemorySendChannel[_Gap | _Slot]) -> None:
        async with send, aclosing(self._steps()) as steps:
            async for step in steps:
                if isinstance(step, _Slot):
                    await self._held.acquire()
                    if step.source == FETCH:
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
        slot.fetching = slot.source == FETCH
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
            self._held.release()

    async def _obtain_block(self, slot: _Slot) -> None:
        offset = slot.index * BLOCK_SIZE
        if slot.source == RESUMED:
            assert slot.digest is not None
            data = await trio.to_thread.run_sync(self._read_back, offset, slot.digest,
                                                 limiter=self._disk)
            if data is not None:
                slot.data, slot.present = data, True
                self.counts.resumed += 1
                return
            log.info("%s: block %d on disk does not match its record: fetching it again",
                     self.target.name, slot.index)
            self.counts.refetched += 1
            slot.source = FETCH
        if slot.source == BASE:
            assert self.base is not None and slot.digest is not None
            base, digest = self.base, slot.digest
            slot.data = await trio.to_thread.run_sync(base.read_verified, slot.index, digest,
                                                      limiter=self._disk)
            self.counts.from_base += 1
        else:
            with trio.move_on_after(self.read_timeout) as scope:
                block = await self.image.block(slot.index)
            self._fetched(slot)
            if scope.cancelled_caught:
                raise ReadFailed(f"{self.image.snapshot_id}: block {slot.index} took over "
                                 f"{self.read_timeout:.0f}s")
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
                await in_worker(self._disk, functools.partial(
                    self._write, slot.index, slot.data, slot.digest),
                    abandon_on_cancel=False)

    def _read_back(self, offset: int, digest: bytes) -> bytes | None:
        data = self.target.read(offset, BLOCK_SIZE)
        ok = len(data) == BLOCK_SIZE and hashlib.sha256(data).digest() == digest
        return data if ok else None

    def _write(self, index: int, data: bytes | memoryview | None, digest: bytes | None
               ) -> None:
        assert data is not None and digest is not None
        self.target.write(index * BLOCK_SIZE, data)
        if self.journal is not None:
            try:
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
                self.blocks.add(step.index, step.digest)
                data, step.data = step.data, None
                self.position = offset + BLOCK_SIZE
                self._in_order.feed(offset, data, BLOCK_SIZE,
                                    functools.partial(self._block_hashed, step))
        await self._in_order.drain()

    async def _next_step(self, receive: trio.MemoryReceiveChannel[_Gap | _Slot]
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

    def _block_hashed(self, slot: _Slot) -> None:
        self._let_go(slot)
        self._report(BLOCK_SIZE)

    def _report(self, length: int) -> None:
        self.hashed += length
        self.progress.update(self.hashed, self.counts.fetched + self.counts.from_base)

    def _consumers(self) -> list[Consumer]:
        consumers: list[Consumer] = [functools.partial(_update, h)
                                     for h in (self.sha256, self.md5) if h is not None]
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
            self._failure = err if isinstance(err, EbsfsError) else OutputError(
                f"{self.target.name}: {err}")
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
                    await in_worker(self._disk, functools.partial(
                        self.target.zero, begin, end - begin), abandon_on_cancel=False)
            await self._zeros_ahead.acquire()
            self._in_order.feed(offset, None, end - offset,
                                functools.partial(self._zeros_hashed, end - offset))
            self.position = end
            self.zeroed_through = max(self.zeroed_through, end)
            await self._save_state()

    def _zeros_hashed(self, length: int) -> None:
        self._zeros_ahead.release()
        self._report(length)

    async def _save_state(self, force: bool = False) -> None:
        """Remember how far a device is zeroed (a resumed run skips that part)."""
        if self.state is None or self.journal is None or not self.target.zeroing_costs:
            return
        now = trio.current_time()
        if not force and now - self._saved_at < STATE_EVERY:
            return
        self._saved_at = now
        if self.state.get("zeroed_through") == self.zeroed_through:
            return
        self.state["zeroed_through"] = self.zeroed_through
        await trio.to_thread.run_sync(self.journal.save, dict(self.state),
                                      limiter=self._disk)


def _update(hasher: Any, offset: int, data: bytes | memoryview | None, length: int
            ) -> None:
    if data is not None:
        hasher.update(data)
        return
    view = memoryview(ZEROS)
    while length > 0:
        piece = min(length, len(ZEROS))
        hasher.update(view[:piece])
        length -= piece


# ---- the command -------------------------------------------------------------------


def window_for(config: EngineConfig) -> int:
    """Blocks a copy holds at once: enough to keep every fetch busy twice over, and up
    to the cache size's worth (in 1 MiB units, the cache's own) beyond that."""
    return max(2 * config.max_fetches, config.cache_size // SLAB_SIZE)


def get(config: EngineConfig, request: GetRequest, progress: Progress | None = None,
        api: Any = None) -> GetResult:
    """Copy a snapshot as `request` says, resuming an unfinished run of the same copy.
    Raises typed EbsfsErrors; nothing downloaded is lost on any of them."""
    progress = progress or QuietProgress()
    layout = Layout.of(request)
    done, state = preflight(request, layout)
    if done is not None:
        return GetResult(done, layout.manifest, layout.output, already_done=True)
    base = BaseImage(request.base_image, request.base_manifest) if request.base_image else None
    snapshot, note = request.metadata() if request.metadata else (None, None)
    window = window_for(config)
    # Blocks are written and hashed once, never read again: the cache need only hold
    # the window (more would only fault in fresh memory, docs/performance.md).
    config = dataclasses.replace(config, cache_size=min(config.cache_size,
                                                        window * BLOCK_SIZE))
    try:
        the_engine = engine.connect(config, [request.snapshot_id], share_lineage=False,
                                    api=api)
        image = the_engine.images[request.snapshot_id]
        if base is not None:
            base.check(request.snapshot_id, image.size)
        copied = _run(the_engine, image, layout, request, state, base, progress,
                      window, snapshot, note)
        return copied
    finally:
        if base is not None:
            base.close()


def _run(the_engine: Engine, image: SnapshotImage, layout: Layout, request: GetRequest,
         state: dict[str, Any] | None, base: BaseImage | None, progress: Progress,
         window: int, snapshot: dict[str, Any] | None, note: str | None) -> GetResult:
    target: Target
    if layout.kind == "stream":
        target = StreamTarget()
    elif layout.kind == "device":
        target = DeviceTarget(layout.output, image.size)
    else:
        target = FileTarget(layout.output, image.size)
    journal = None
    try:
        if target.resumable:
            journal = Journal(layout.stem)
            new = state is None
            if state is None:
                state = {"snapshot_id": request.snapshot_id, "output": os.path.abspath(
                    layout.output), "volume_size": image.size, "started": utc_now(),
                    "ebsfs_version": __version__, "runs": 0}
            state["runs"] = int(state.get("runs", 0)) + 1
            journal.open(state, new)
        started = state["started"] if state else utc_now()
        try:
            blocks = BlockListWriter(f"{layout.stem}.part.blocks", request.snapshot_id)
        except OSError as err:
            raise failure("cannot create", f"{layout.stem}.part.blocks", err) from err
        copy = Copy(image, target, journal, blocks, progress, window,
                    the_engine.config.read_timeout, base, state, md5=request.md5,
                    image_hash=request.image_hash)
        try:
            trio.run(_copy_with_base, the_engine, copy, base)
            target.finish()
            manifest = _manifest(the_engine, image, layout, copy, started, base, state,
                                 snapshot, note)
            write_manifest(layout.manifest, manifest)
        except BaseException:
            blocks.discard()
            raise
        if isinstance(target, FileTarget):
            target.publish()
        if journal is not None:
            journal.remove()
        manifest.path = layout.manifest
        return GetResult(manifest, layout.manifest, layout.output)
    except OSError as err:
        raise failure("cannot write", getattr(err, "filename", None) or target.name,
                      err) from err
    finally:
        progress.close()
        target.close()
        if journal is not None:
            journal.close()


async def _copy_with_base(the_engine: Engine, copy: Copy, base: BaseImage | None) -> None:
    try:
        if base is not None:
            diff = await the_engine.diff(base.snapshot_id, copy.image.snapshot_id)
            base.start(diff.ranges())
        await copy.run()
    except BaseExceptionGroup as group:  # the first real failure, typed, for the CLI
        leaf = first_leaf(group)
        if isinstance(leaf, EbsfsError | OSError):
            raise leaf from None
        raise


def _manifest(the_engine: Engine, image: SnapshotImage, layout: Layout, copy: Copy,
              started: str, base: BaseImage | None, state: dict[str, Any] | None,
              snapshot: dict[str, Any] | None, note: str | None) -> Manifest:
    section = copy.blocks.finish(side_file_path(layout.manifest))
    counts = copy.counts.as_json()
    counts["runs"] = int(state.get("runs", 1)) if state else 1
    return Manifest(
        snapshot_id=image.snapshot_id, volume_size=image.size, block_size=BLOCK_SIZE,
        written_blocks=copy.blocks.count,
        sha256=copy.sha256.hexdigest() if copy.sha256 else None,
        md5=copy.md5.hexdigest() if copy.md5 else None, started=started, finished=utc_now(),
        ebsfs_version=__version__, region=getattr(the_engine.api, "region", None),
        endpoint=getattr(the_engine.api, "endpoint_url", None),
        output=("-" if layout.kind == "stream" else os.path.abspath(layout.output)),
        blocks=section, snapshot=snapshot, snapshot_note=note,
        base=base.describe() if base is not None else None, counts=counts,
    )
