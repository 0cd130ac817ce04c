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
from typing import IO, Protocol

import trio

from ebsfs.engine.cache import Loan
from ebsfs.engine.engine import Engine
from ebsfs.engine.image import SnapshotImage
from ebsfs.engine.metaprefetch import MetadataPrefetch
from ebsfs.engine.partitions import Partition
from ebsfs.engine.prefetch import ReadPattern

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
    """`<id>.changes`: the text of `ebsfs diff` against the base snapshot."""

    fixed = False
    size = 0

    def __init__(self, engine: Engine, image: SnapshotImage, mtime: float | None = None) -> None:
        self.engine = engine
        self.image = image
        self.name = f"{image.snapshot_id}.changes"
        self.mtime = mtime

    def xattrs(self) -> dict[str, str]:
        assert self.image.base is not None
        return {
            "user.ebsfs.snapshot_id": self.image.snapshot_id,
            "user.ebsfs.base_snapshot": self.image.base[0].snapshot_id,
        }

    async def open(self) -> OpenFile:
        diff = await self.engine.changes(self.image.snapshot_id)
        return ReportReader(await trio.to_thread.run_sync(diff.text_file))


class ReportReader:
    """The text of one open `.changes` file, in a temporary file past 1 MiB. Reads run
    in a worker thread (the file may be on disk), one at a time (they seek)."""

    def __init__(self, spool: IO[bytes]) -> None:
        self.spool = spool
        self._lock = trio.Lock()

    async def read(
        self, offset: int, size: int, scratch: bytearray | None = None, loan: Loan | None = None
    ) -> bytes:
        async with self._lock:
            return await trio.to_thread.run_sync(self._read, offset, size)

    def _read(self, offset: int, size: int) -> bytes:
        self.spool.seek(offset)
        return self.spool.read(size)

    def close(self) -> None:
        self.spool.close()


async def snapshot_nodes(engine: Engine, start_times: dict[str, float] | None = None) -> list[Node]:
    """Every file of a mount of the engine's snapshots, in directory order: each image,
    its partitions, and its `.changes` when it shares blocks with a base. A snapshot's
    files show its start time (from EC2, when known) as their mtime."""
    times = start_times or {}
    nodes: list[Node] = []
    for snapshot_id, image in engine.images.items():
        mtime = times.get(snapshot_id)
        nodes.append(ImageNode(image, mtime, engine.metadata))
        for partition in await engine.partitions(snapshot_id):
            nodes.append(PartitionNode(image, partition, mtime, engine.metadata))
    nodes += [
        ChangesNode(engine, image, times.get(image.snapshot_id))
        for image in engine.images.values()
        if image.base
    ]
    return nodes
