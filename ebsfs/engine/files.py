"""What a mount shows, as FUSE-free file nodes: a name, a size, extended attributes and
`open()` -> something with `read(offset, size)`. ebsfs/fuse/operations.py only maps
them to inodes.

- `<snapshot-id>.img`: the whole disk image.
- `<snapshot-id>-part<N>.img`: partition N of it (GPT or MBR, numbered as Linux numbers
  them), exactly the partition's bytes, so `mount -o loop,ro FILE` needs no offset.
- `<snapshot-id>.changes`: changed byte ranges against the snapshot it shares blocks
  with (listed when opened, so its size is only known then)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import IO, Protocol

import trio

from ebsfs.constants import BLOCK_SIZE, DIFF_TIMEOUT
from ebsfs.engine.cache import Loan
from ebsfs.engine.engine import Engine
from ebsfs.engine.image import SnapshotImage
from ebsfs.engine.metaprefetch import MetadataPrefetch
from ebsfs.engine.partitions import Partition
from ebsfs.engine.prefetch import ReadPattern
from ebsfs.errors import ReadFailed

log = logging.getLogger(__name__)


class OpenFile(Protocol):
    """One open handle of a node."""

    async def read(
        self, offset: int, size: int, scratch: bytearray | None = None, loan: Loan | None = None
    ) -> bytes | memoryview:
        """The bytes; a view of `scratch` (when given) may be returned, valid until the
        next read that is given the same scratch (image.py); views of the memory
        cache's slabs are on `loan` (cache.py)."""
        ...

    def close(self) -> None: ...


class Node(Protocol):
    name: str
    size: int
    """Bytes; 0 when only known once opened (`fixed` is then False)."""
    fixed: bool
    """Content and size never change: the kernel may cache pages and trust st_size."""
    mtime: float | None
    """Seconds since the epoch to show as mtime (the snapshot's StartTime), or None
    for the mount time."""

    def xattrs(self) -> dict[str, str]: ...

    def allocated(self) -> int:
        """Bytes the file holds for `du` and st_blocks: of an image or partition, those
        in blocks the snapshot wrote (never less than the truth: see
        BlockIndex.listed_bytes)."""
        ...

    async def open(self) -> OpenFile: ...


class ImageNode:
    """The whole snapshot as a disk image."""

    fixed = True

    def __init__(
        self,
        image: SnapshotImage,
        mtime: float | None = None,
        metadata: MetadataPrefetch | None = None,
    ) -> None:
        self.image = image
        self.name = f"{image.snapshot_id}.img"
        self.size = image.size
        self.mtime = mtime
        self.metadata = metadata

    def xattrs(self) -> dict[str, str]:
        attrs = {
            "user.ebsfs.snapshot_id": self.image.snapshot_id,
            "user.ebsfs.volume_size": str(self.image.size),
        }
        if self.image.base is not None:
            attrs["user.ebsfs.base_snapshot"] = self.image.base[0].snapshot_id
        return attrs

    def allocated(self) -> int:
        return self.image.index.listed_bytes(0, self.size, BLOCK_SIZE)

    async def open(self) -> OpenFile:
        return WindowReader(self.image, 0, self.image.size, metadata=self.metadata)


class PartitionNode:
    """One partition of a snapshot: a window of its image."""

    fixed = True

    def __init__(
        self,
        image: SnapshotImage,
        partition: Partition,
        mtime: float | None = None,
        metadata: MetadataPrefetch | None = None,
    ) -> None:
        self.image = image
        self.partition = partition
        self.name = f"{image.snapshot_id}-part{partition.number}.img"
        self.size = partition.size
        self.mtime = mtime
        self.metadata = metadata

    def xattrs(self) -> dict[str, str]:
        p = self.partition
        return {
            "user.ebsfs.snapshot_id": self.image.snapshot_id,
            "user.ebsfs.partition": str(p.number),
            "user.ebsfs.offset": str(p.offset),
            "user.ebsfs.partition_type": p.type,
            "user.ebsfs.scheme": p.scheme,
        }

    def allocated(self) -> int:
        p = self.partition
        return self.image.index.listed_bytes(p.offset, p.offset + p.size, BLOCK_SIZE)

    async def open(self) -> OpenFile:
        p = self.partition
        return WindowReader(self.image, p.offset, p.size, metadata=self.metadata)


class WindowReader:
    """Reads of bytes [start, start+length) of an image, offsets relative to start, with
    the read-pattern state of one handle (read-ahead follows each handle, unless
    `readahead` is False: readers of scattered metadata would pay for blocks never
    read). Reads are shown to the metadata prefetch, when given: a read of a
    filesystem's head starts its walk (engine/metaprefetch.py)."""

    def __init__(
        self,
        image: SnapshotImage,
        start: int,
        length: int,
        readahead: bool = True,
        metadata: MetadataPrefetch | None = None,
    ) -> None:
        self.image = image
        self.start = start
        self.length = length
        self.stream: ReadPattern | None = image.open_stream() if readahead else None
        self.metadata = metadata

    async def read(
        self, offset: int, size: int, scratch: bytearray | None = None, loan: Loan | None = None
    ) -> bytes | memoryview:
        if offset >= self.length or size <= 0:
            return b""
        size = min(size, self.length - offset)
        if self.metadata is not None:
            self.metadata.saw(self.image, self.start, self.length, self.start + offset, size)
        return await self.image.read(self.start + offset, size, self.stream, scratch, loan)

    def close(self) -> None:
        pass


class ChangesNode:
    """`<id>.changes`: the text of `ebsfs diff` against the base snapshot.

    A hostile lineage may have millions of changed ranges, and the text of each listing
    is spooled (memory, then a temporary file): every handle open at one time shares
    one listing and one spool, so a thousand opens cost what one does. The listing is
    made by the first open; the opens that come while it runs wait for it and share
    its outcome (its failure too: a failing service is asked once, not once per open).
    The spool goes when the last handle closes; the next open lists again. A listing
    has DIFF_TIMEOUT, as `ebsfs diff` has by default: an endpoint paging slowly for
    ever fails the open (EIO), it does not hold it. Concurrency:
    `_report` and `_listing` change only on the trio thread, between awaits."""

    fixed = False
    size = 0
    """The length of the last listing (0 until the first open lists): its size is only
    known once listed, so the file is opened direct_io and read to its end whatever
    `stat` said, but `ls -l` after a read shows what the read got."""

    def __init__(self, engine: Engine, image: SnapshotImage, mtime: float | None = None) -> None:
        self.engine = engine
        self.image = image
        self.name = f"{image.snapshot_id}.changes"
        self.mtime = mtime
        self._report: SharedReport | None = None
        self._listing: Listing | None = None

    def xattrs(self) -> dict[str, str]:
        assert self.image.base is not None
        return {
            "user.ebsfs.snapshot_id": self.image.snapshot_id,
            "user.ebsfs.base_snapshot": self.image.base[0].snapshot_id,
        }

    def allocated(self) -> int:
        return self.size

    async def open(self) -> OpenFile:
        while self._report is None:  # again if it came and went while we waited
            listing = self._listing
            if listing is None:
                self._report = await self._list()
                break
            await listing.done.wait()
            if listing.error is not None:
                raise ReadFailed(listing.error)
        return ReportReader(self._report.share(), self._released)

    async def _list(self) -> SharedReport:
        listing = self._listing = Listing()
        try:
            with trio.move_on_after(DIFF_TIMEOUT):
                diff = await self.engine.changes(self.image.snapshot_id)
                report = SharedReport(await trio.to_thread.run_sync(diff.text_file))
                self.size = report.size
                return report
            raise ReadFailed(
                f"listing {self.name} took over {DIFF_TIMEOUT:g}s (the endpoint answered "
                "slowly, or there was much to list); `ebsfs diff --timeout` can wait longer"
            )
        except BaseException as err:
            listing.error = str(err) or type(err).__name__
            raise
        finally:
            self._listing = None
            listing.done.set()

    def _released(self, report: SharedReport) -> None:
        if report.users == 0 and self._report is report:
            self._report = None


class Listing:
    """A `.changes` listing under way: those who wait for it, and how it failed."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: str | None = None


class SharedReport:
    """One spooled text and the handles reading it. Reads take turns (they seek)."""

    def __init__(self, spool: IO[bytes]) -> None:
        self.spool = spool
        self.lock = trio.Lock()
        self.users = 0
        self.size = spool.seek(0, 2)

    def share(self) -> SharedReport:
        self.users += 1
        return self


class ReportReader:
    """One open handle of a `.changes` file: reads of the shared spool in a worker
    thread (the file may be on disk), one at a time over all handles (they seek)."""

    def __init__(
        self, report: SharedReport, released: Callable[[SharedReport], None] | None = None
    ) -> None:
        self.report = report
        self._released = released
        self._closed = False

    async def read(
        self, offset: int, size: int, scratch: bytearray | None = None, loan: Loan | None = None
    ) -> bytes:
        async with self.report.lock:
            return await trio.to_thread.run_sync(self._read, offset, size)

    def _read(self, offset: int, size: int) -> bytes:
        self.report.spool.seek(offset)
        return self.report.spool.read(size)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.report.users -= 1
        if self.report.users == 0:
            self.report.spool.close()
        if self._released is not None:
            self._released(self.report)


async def snapshot_nodes(
    engine: Engine, start_times: dict[str, float] | None = None, only: list[str] | None = None
) -> list[Node]:
    """Every file of a mount of the engine's snapshots (or of those `only` names), in
    directory order: each image, its partitions, and its `.changes` when it shares
    blocks with a base. A snapshot's files show its start time (from EC2, when known)
    as their mtime."""
    times = start_times or {}
    nodes: list[Node] = []
    images = engine.images if only is None else {s: engine.images[s] for s in only}
    for snapshot_id, image in images.items():
        mtime = times.get(snapshot_id)
        nodes.append(ImageNode(image, mtime, engine.metadata))
        for partition in await engine.partitions(snapshot_id):
            nodes.append(PartitionNode(image, partition, mtime, engine.metadata))
    nodes += [
        ChangesNode(engine, image, times.get(image.snapshot_id))
        for image in images.values()
        if image.base
    ]
    return nodes
