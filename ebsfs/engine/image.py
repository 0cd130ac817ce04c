"""One snapshot as a byte-addressable image: read(offset, size) -> bytes. FUSE-free."""

from __future__ import annotations

import bisect
import functools
import itertools
import logging
import random
from collections.abc import Iterable
from typing import TYPE_CHECKING

import trio

from ebsfs.constants import BLOCK_SIZE, READ_TIMEOUT
from ebsfs.engine.cache import BlockCache, Loan
from ebsfs.engine.diff import Diff
from ebsfs.engine.index import BlockIndex, ChangeIndex
from ebsfs.engine.prefetch import Readahead, ReadPattern
from ebsfs.engine.remote import RemoteSnapshots
from ebsfs.engine.stats import Stats
from ebsfs.errors import EbsfsError, InvalidBlockToken, ReadFailed
from ebsfs.service.api import Block

if TYPE_CHECKING:
    from ebsfs.engine.disktier import DiskView

log = logging.getLogger(__name__)

ZERO_BLOCK = bytes(BLOCK_SIZE)
ZEROS = memoryview(bytes(2 * BLOCK_SIZE))
"""A read of blocks never written, up to a FUSE read's 1 MiB, is a view of this."""
NEVER_WRITTEN = Block(ZERO_BLOCK, None)
TOKEN_REFRESHES = 6
"""Listings after a refused block token before the read fails: bounded, so two
processes whose listings refuse each other's tokens cannot go on for ever."""
TOKEN_BACKOFF = 0.02
"""Seconds, doubled at each refusal of one fetch, within which a refused fetch waits
at random before listing again: when another process's listing renewed the tokens,
its own calls get to finish before ours renews them back (randomised back-off, as
Ethernet's, breaks the symmetry of two listers refusing each other)."""
RUN_SLACK = 65536
"""A read's first bytes in which a told run's start counts as the file's first read."""
RUN_MARGIN = 2
"""Blocks past a run's end read ahead with it: the kernel's 1 MiB FUSE read that holds
a file's last pages reaches into them, and would wait a round trip for them."""
MAX_METADATA_BLOCKS = 1 << 20
"""Metadata blocks remembered per image (note_metadata_block): 32-64 MiB of set at
the most, for a walk budget of 512 GiB; the budget bounds it far sooner."""
MAX_FILE_RUNS = 65536
"""Large files' runs remembered per image (note_file_run): about 6 MiB at the most,
the fixed overhead of the hint whatever the filesystem holds."""


TIMED_OUT_MEMO = 1.0
"""Seconds after a read of a block timed out during which another read of it waits
only TIMED_OUT_GRACE (the kernel's own second try comes within milliseconds)."""
TIMED_OUT_GRACE = 1.0


class SnapshotImage:
    """Reads of one snapshot: absent blocks are zeros, present ones come from the cache
    or one GetSnapshotBlock each; a read spanning blocks fetches them concurrently."""

    def __init__(
        self,
        snapshot_id: str,
        size: int,
        index: BlockIndex,
        cache: BlockCache,
        remote: RemoteSnapshots,
        readahead: Readahead | None = None,
        read_timeout: float = READ_TIMEOUT,
        max_window: int = 256,
        disk: DiskView | None = None,
        stats: Stats | None = None,
        first_blocks: dict[int, Block] | None = None,
    ) -> None:
        """`first_blocks`: blocks fetched beside the checks (engine/plan.py HEAD_BLOCKS):
        the first fetch of each is answered with it."""
        self.snapshot_id = snapshot_id
        self.size = size
        self.index = index
        self.cache = cache
        self.remote = remote
        self.readahead = readahead
        self.read_timeout = read_timeout
        self.max_window = max_window
        """Read-ahead of one reader never passes this many blocks (a cache budget)."""
        self.disk = disk
        """Blocks on local disk, looked at before the service is called."""
        self.stats = stats or Stats()
        self.base: tuple[SnapshotImage, ChangeIndex] | None = None
        self._timed_out: dict[int, float] = {}
        """Blocks whose read took the whole read_timeout, and until when (trio time) a
        read of them fails at once (TIMED_OUT_MEMO)."""
        self._prefetching: set[int] = set()
        """Blocks submitted for read-ahead and not done yet: submit each once."""
        self._first_blocks = dict(first_blocks or {})
        self._file_runs: dict[int, int] = {}
        """Image offset where a large file's contiguous data starts -> its length, as
        the metadata prefetch's walk found them (at most MAX_FILE_RUNS)."""
        self._run_starts: list[int] = []
        """The keys of _file_runs in order (sorted again when a run was added)."""
        self._metadata_blocks: set[int] = set()
        """Blocks the metadata prefetch's walk asked for (at most MAX_METADATA_BLOCKS):
        a read of them is a tool walking the filesystem (_read_ahead)."""

    def share_with(self, base: SnapshotImage, changes: ChangeIndex) -> None:
        """Serve blocks that `changes` says are unchanged from `base` (an earlier
        snapshot of the same volume) through base's cache entries: one fetch for both."""
        self.base = (base, changes)

    async def changes_from_base(self) -> Diff:
        """What differs from the base snapshot, chunk by chunk through the change index."""
        if self.base is None:
            raise ValueError(f"{self.snapshot_id} has no base snapshot")
        base, changes = self.base
        result = Diff(base.snapshot_id, self.snapshot_id, self.size, BLOCK_SIZE)
        for chunk_no in range(changes.chunk_count):
            # A whole 16 TiB volume may take minutes to list; each chunk may not hang.
            with trio.move_on_after(self.read_timeout) as scope:
                items = await changes.chunk_items(chunk_no)
            if scope.cancelled_caught:
                raise ReadFailed(
                    f"listing changes of {self.snapshot_id} from "
                    f"{base.snapshot_id}: chunk {chunk_no} took over "
                    f"{self.read_timeout:.0f}s"
                )
            for _, change in items:
                result.record(change)
        result.list_calls = changes.list_calls
        return result

    async def _owner(self, index: int) -> SnapshotImage:
        """The image whose cache entry and token serve block `index` of this one."""
        image = self
        while image.base is not None:
            base, changes = image.base
            if await changes.changed(index):
                break
            image = base
        return image

    def open_stream(self) -> ReadPattern:
        """Read-pattern state for one open file handle."""
        return ReadPattern(self.size, chunk_blocks=self.index.chunk_blocks)

    async def block(self, index: int, loan: Loan | None = None) -> Block:
        """Block `index` as verified, with its checksum (zeros and None if never
        written). A view of the cache's memory is on `loan` (cache.py)."""
        if self.base is None:
            return await self._own_block(index, loan)
        owner = await self._owner(index)
        if owner is not self and (owner.snapshot_id, index) in self.cache:
            self.stats.lineage_hits += 1
        return await owner._own_block(index, loan)

    def note_file_run(self, offset: int, length: int) -> None:
        """A file's data lies at [offset, offset+length) of the image (the metadata
        prefetch's walk says so): a reader that starts there gets the whole run
        read ahead at once, within read-ahead's window."""
        if len(self._file_runs) < MAX_FILE_RUNS and 0 <= offset < self.size and length > 0:
            self._file_runs[offset] = min(length, self.size - offset)
            self._run_starts = []

    def note_metadata_block(self, index: int) -> None:
        """Block `index` holds filesystem metadata (the metadata prefetch fetches it)."""
        if len(self._metadata_blocks) < MAX_METADATA_BLOCKS:
            self._metadata_blocks.add(index)

    def _walk_read(self, first: int, last: int) -> bool:
        """Whether blocks [first, last] are all metadata the walk asked for."""
        blocks = self._metadata_blocks
        return bool(blocks) and all(i in blocks for i in range(first, last + 1))

    def _run_at(self, offset: int, size: int) -> tuple[int, int] | None:
        """The first told run starting in the first RUN_SLACK bytes of the read
        [offset, offset+size), as (start, length): tools read in aligned chunks of
        their own (The Sleuth Kit 64 KiB), so a file's first read covers its start more
        often than it begins there; further in, it is the kernel's read-ahead past a
        metadata block (`fls` set 18 blocks of a file in flight that way)."""
        if not self._file_runs:
            return None
        if not self._run_starts:
            self._run_starts = sorted(self._file_runs)
        at = bisect.bisect_left(self._run_starts, offset)
        if at < len(self._run_starts) and self._run_starts[at] < offset + min(size, RUN_SLACK):
            start = self._run_starts[at]
            return start, self._file_runs[start]
        return None

    async def cache_first_blocks(self) -> None:
        """Move the blocks fetched beside the checks into the cache, where its byte
        bound holds them, instead of beside it until something reads them."""
        for index in list(self._first_blocks):
            try:
                with Loan() as loan:
                    await self._own_block(index, loan)
            except EbsfsError as err:  # the block is read again when asked for
                self._first_blocks.pop(index, None)
                log.debug("%s: block %d not cached at the start: %s", self.snapshot_id, index, err)

    async def held(self, index: int) -> bool:
        """Whether block `index` reads with no fetch: never written, or in memory under
        the image that serves it (the metadata prefetch counts only the others)."""
        owner = self if self.base is None else await self._owner(index)
        known, token = owner.index.peek(index)
        return (known and token is None) or (owner.snapshot_id, index) in self.cache

    async def _own_block(self, index: int, loan: Loan | None) -> Block:
        token = await self.index.token(index)
        if token is None:
            return NEVER_WRITTEN
        if (self.snapshot_id, index) in self.cache:
            self.stats.memory_hits += 1
        return await self.cache.get(
            (self.snapshot_id, index),
            lambda room, lent: self._fetch(index, token, room, lent),
            loan,
        )

    async def _fetch(self, index: int, token: str, room: memoryview | None, lent: Loan) -> Block:
        """The block from the disk cache if it holds it verified, else from the service
        (then kept on disk)."""
        block = self._first_blocks.pop(index, None)
        if block is not None:
            self.stats.blocks_fetched += 1  # the cache copies it into `room`
            if self.disk is not None:
                await self.disk.store(index, block, lent.share())
            return block
        if self.disk is not None:
            found = await self.disk.load(index, room)
            if found is not None:
                return found
        for attempt in range(TOKEN_REFRESHES):
            sent = self.index.now()
            try:
                block = await self.remote.get_snapshot_block(
                    self.snapshot_id, index, token, into=room
                )
            except InvalidBlockToken:
                log.info("%s: token of block %d refused, listing again", self.snapshot_id, index)
                await trio.sleep(random.uniform(0, TOKEN_BACKOFF * 2**attempt))
                self.index.invalidate(index, token, sent)
                fresh = await self.index.token(index)
                if fresh is None:
                    return NEVER_WRITTEN
                token = fresh
            else:
                self.stats.blocks_fetched += 1
                if self.disk is not None:
                    await self.disk.store(index, block, lent.share())
                return block
        raise ReadFailed(f"{self.snapshot_id}: block {index}: block token refused repeatedly")

    async def _prefetch(self, index: int) -> None:
        """Fetch ahead, within the same time limit as a read: a stalled prefetch would
        otherwise hold its place in `_prefetching` (and its task) forever."""
        try:
            with trio.move_on_after(self.read_timeout), Loan() as loan:
                await self.block(index, loan)
        finally:
            self._prefetching.discard(index)

    async def read(
        self,
        offset: int,
        size: int,
        stream: ReadPattern | None = None,
        scratch: bytearray | None = None,
        loan: Loan | None = None,
    ) -> bytes | memoryview:
        """Exactly the image's bytes in [offset, offset+size) clipped to its end, or
        ReadFailed. Never waits longer than read_timeout. Views of the cache's memory
        are on `loan` (cache.py): give it back once done with the bytes.

        Bytes from several blocks are joined into `scratch` when given (and large
        enough): a view of it is returned, valid only until the caller's next read
        (the FUSE face replies before any other read can run; a fresh 1 MiB for every
        such read costs page faults, docs/performance.md)."""
        if offset >= self.size or size <= 0:
            return b""
        end = min(offset + size, self.size)
        if stream is not None and self.readahead is not None:
            self._read_ahead(stream, offset, end - offset)
        first, last = offset // BLOCK_SIZE, (end - 1) // BLOCK_SIZE
        at_hand = self._blocks_at_hand(first, last, loan)
        if at_hand is not None:
            return _assemble(at_hand, offset, end, first, scratch)
        timeout = self._timeout_for(first, last) if self._timed_out else self.read_timeout
        try:
            with trio.fail_after(timeout):
                if first == last:
                    return _assemble([(await self.block(first, loan)).data], offset, end, first)
                return await self._read_span(offset, end, first, last, scratch, loan)
        except trio.TooSlowError:
            self._note_timed_out(first, last)
            raise ReadFailed(
                f"{self.snapshot_id}: read at {offset} took over {timeout:g}s"
                + ("" if timeout == self.read_timeout else " (it had just timed out)")
            ) from None
        except ReadFailed:
            raise
        except EbsfsError as err:
            raise ReadFailed(f"{self.snapshot_id}: read at {offset}: {err}") from err

    def _note_timed_out(self, first: int, last: int) -> None:
        now = trio.current_time()
        if len(self._timed_out) > 1024:  # bounded: drop what has expired
            self._timed_out = {b: t for b, t in self._timed_out.items() if t > now}
        for index in range(first, last + 1):
            self._timed_out[index] = now + TIMED_OUT_MEMO

    def _timeout_for(self, first: int, last: int) -> float:
        """read_timeout, or TIMED_OUT_GRACE for a read of a block whose read timed out
        moments ago: the kernel reads a page again when its read-ahead failed, and
        `--read-timeout 5` answered EIO after 10 s. Not at once: a service that has
        recovered meanwhile answers the next read (the quality bar: one failed read,
        and the next one works)."""
        now = trio.current_time()
        for index in range(first, last + 1):
            until = self._timed_out.get(index)
            if until is None:
                continue
            if now < until:
                return min(self.read_timeout, TIMED_OUT_GRACE)
            del self._timed_out[index]
        return self.read_timeout

    def _read_ahead(self, stream: ReadPattern, offset: int, size: int) -> None:
        """Submit the prefetches the read pattern asks for, and list the next chunk of
        the index once read-ahead is half way through the current one, so that its
        listing never stalls the reader."""
        assert self.readahead is not None
        limit = min(self.max_window, self.remote.depth())
        frontier = stream.frontier
        reader = (offset + size - 1) // BLOCK_SIZE
        walking = self._walk_read(offset // BLOCK_SIZE, reader)
        run = self._run_to_adopt(stream, offset, size, walking)
        if run is not None and sum(run) > offset + size:  # a file's first read: its run
            last = min((sum(run) - 1) // BLOCK_SIZE + RUN_MARGIN, self.index.volume_blocks - 1)
            stream.file_run = (run[0] // BLOCK_SIZE, last)
        elif stream.file_run is not None and not (
            stream.file_run[0] <= offset // BLOCK_SIZE and reader <= stream.file_run[1]
        ):
            if reader > stream.file_run[1] and stream.continues(offset):
                stream.restart()  # read on past the file's end: no evidence yet
            stream.file_run = None
        wanted: Iterable[int] = stream.observe(
            offset,
            size,
            limit,
            self.index.next_listed,
            walking=walking,
        )
        if stream.file_run is not None:
            first, last = reader + 1, stream.file_run[1]
            wanted = itertools.chain(
                range(first, min(last, first + limit - 1) + 1), (i for i in wanted if i <= last)
            )
        for ahead in wanted:
            if ahead in self._prefetching or (self.snapshot_id, ahead) in self.cache:
                continue
            if self.readahead.submit(functools.partial(self._prefetch, ahead)):
                self._prefetching.add(ahead)
        if stream.frontier == frontier:
            return
        chunk_blocks = self.index.chunk_blocks
        upcoming = stream.frontier + chunk_blocks // 2
        if stream.frontier and upcoming < self.index.volume_blocks:
            chunk_no = upcoming // chunk_blocks
            if not self.index.at_hand(chunk_no):
                self.readahead.submit(functools.partial(self.index.get, upcoming))

    def _run_to_adopt(
        self, stream: ReadPattern, offset: int, size: int, walking: bool
    ) -> tuple[int, int] | None:
        """The file run whose first read this is, if any (_run_at). A read of metadata
        blocks only that covers a run's start keeps it pending instead: a directory
        block and a file's first bytes can share a block, and `fls` reading that
        directory looked like the file's first read (14 blocks of a file read ahead
        for nothing on the lazy disk, docs/performance.md). The run is taken up once the reader goes
        on into it, past the metadata."""
        if not stream.continues(offset):
            run = self._run_at(offset, size)
            stream.pending_run = run if walking else None
            return None if walking else run
        pending = stream.pending_run
        if pending is None or walking:
            return None
        stream.pending_run = None
        return pending

    def _blocks_at_hand(
        self, first: int, last: int, loan: Loan | None
    ) -> list[bytes | memoryview] | None:
        """The blocks [first, last] if all are cached or known absent, with no await:
        the warm path skips tasks, nurseries and timers (docs/performance.md)."""
        if self.base is not None:
            return None
        slab = self.cache.peek_span(self.snapshot_id, first, last, loan)
        if slab is not None:
            self.stats.memory_hits += 2
            return [slab]
        blocks: list[bytes | memoryview] = []
        hits = 0
        for i in range(first, last + 1):
            known, token = self.index.peek(i)
            if not known:
                return None
            data = ZERO_BLOCK if token is None else self.cache.peek((self.snapshot_id, i), loan)
            if data is None:
                return None
            hits += token is not None
            blocks.append(data)
        self.stats.memory_hits += hits
        return blocks

    async def _read_span(
        self,
        offset: int,
        end: int,
        first: int,
        last: int,
        scratch: bytearray | None,
        loan: Loan | None,
    ) -> bytes | memoryview:
        blocks: dict[int, bytes | memoryview] = {}
        errors: list[EbsfsError] = []

        async def one(i: int) -> None:
            try:
                blocks[i] = (await self.block(i, loan)).data
            except EbsfsError as err:  # keep siblings running; report the first failure
                errors.append(err)

        async with trio.open_nursery() as nursery:
            for i in range(first, last + 1):
                nursery.start_soon(one, i)
        if errors:
            raise errors[0]
        if self.base is None:  # both halves of one slab: reply from it, no join
            slab = self.cache.peek_span(self.snapshot_id, first, last, loan)
            if slab is not None:
                return _assemble([slab], offset, end, first)
        return _assemble([blocks[i] for i in range(first, last + 1)], offset, end, first, scratch)


def _assemble(
    blocks: list[bytes | memoryview],
    offset: int,
    end: int,
    first: int,
    scratch: bytearray | None = None,
) -> bytes | memoryview:
    """Bytes [offset, end) from consecutive blocks starting at block `first` (or from
    one buffer holding them all). From one buffer, or blocks never written, a view: no
    copy (pyfuse3 replies from any buffer); from several, joined in `scratch` if given."""
    base = first * BLOCK_SIZE
    if len(blocks) == 1:
        if offset - base == 0 and end - base == len(blocks[0]):
            return blocks[0]
        return memoryview(blocks[0])[offset - base : end - base]
    if end - offset <= len(ZEROS) and all(data is ZERO_BLOCK for data in blocks):
        return ZEROS[: end - offset]
    parts = []
    for n, data in enumerate(blocks):
        start = base + n * BLOCK_SIZE
        parts.append(data[max(offset, start) - start : min(end, start + BLOCK_SIZE) - start])
    if scratch is None or len(scratch) < end - offset:
        return b"".join(parts)
    at = 0
    for part in parts:
        scratch[at : at + len(part)] = part
        at += len(part)
    return memoryview(scratch)[:at]
