"""The Python face: `ebsfs.open(snapshot_id)` -> a read-only, seekable binary file of
the snapshot's bytes, for forensic libraries (pytsk3, dissect, dfvfs) and for places
with no root or /dev/fuse. Same engine, caching, read-ahead, retries, time limits and
errors as the mount; pyfuse3 is never imported."""

from __future__ import annotations

import errno
import io
import threading
from typing import Any

from ebsfs.client import ConnectionOptions
from ebsfs.engine import (
    DEFAULT_CACHE_DIR_SIZE,
    DEFAULT_CACHE_SIZE,
    EngineConfig,
    EngineThread,
    connect,
)
from ebsfs.errors import EbsfsError
from ebsfs.files import WindowReader
from ebsfs.image import SnapshotImage
from ebsfs.partitions import Partition

MAX_READ = 32 * 1024**2
"""Bytes asked of the engine at once (64 blocks fetched together)."""


def open(  # noqa: A001 (the name users expect, as io.open and gzip.open)
    snapshot_id: str, *, region: str | None = None, profile: str | None = None,
    endpoint_url: str | None = None, cache_size: int = DEFAULT_CACHE_SIZE,
    max_fetches: int = 64, read_timeout: float = 60.0, request_timeout: float = 20.0,
    cache_dir: str | None = None, cache_dir_size: int = DEFAULT_CACHE_DIR_SIZE,
) -> SnapshotFile:
    """Open a snapshot as a read-only binary file of exactly its volume size.

    The keyword arguments mean what the `ebsfs mount` options of the same names mean:
    `region`, `profile` and `endpoint_url` pick the service (default: the AWS chain,
    AWS_REGION, AWS_PROFILE, AWS_ENDPOINT_URL); `cache_size` is bytes of blocks kept in
    memory; `max_fetches` the GetSnapshotBlock calls in flight at most; `read_timeout`
    the seconds one read may take; `request_timeout` the seconds one call may wait;
    `cache_dir` a directory where blocks are kept on disk across sessions (off when
    None; shared safely with mounts and other files using it) and `cache_dir_size` the
    bytes it may take at the most.

    Raises an ebsfs.errors.EbsfsError (InvalidSnapshotId, SnapshotNotFound,
    AccessDenied, CredentialsMissing, UserInputError, ...) if the snapshot cannot be
    opened. Reads that fail raise OSError with errno EIO, as the mount answers.
    Close it (or use `with`) to stop its background thread."""
    connection = ConnectionOptions(
        region=region, profile=profile, endpoint_url=endpoint_url,
        connect_timeout=min(5.0, request_timeout), read_timeout=request_timeout,
    )
    config = EngineConfig(connection=connection, cache_size=cache_size,
                          max_fetches=max_fetches, read_timeout=read_timeout,
                          cache_dir=cache_dir, cache_dir_size=cache_dir_size)
    engine = connect(config, [snapshot_id])
    return SnapshotFile(EngineThread(engine), engine.images[snapshot_id])


class _WindowFile(io.RawIOBase):
    """Bytes [start, start+length) of a snapshot image as a raw binary file.

    Thread safety: `pread` may be called from any number of threads at once; `read`,
    `readinto` and `seek` share one position under a lock, as a file object's do."""

    def __init__(self, loop: EngineThread, image: SnapshotImage, start: int, length: int,
                 name: str) -> None:
        super().__init__()
        self._loop = loop
        self._window = WindowReader(image, start, length)
        self._position = 0
        self._lock = threading.Lock()
        self.name = name
        self.size = length
        self.snapshot_id = image.snapshot_id

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def pread(self, size: int, offset: int) -> bytes:
        """`size` bytes at `offset` (fewer only at the end), leaving the position alone."""
        self._check_open()
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        size = max(0, min(size, self.size - offset))
        parts = []
        try:
            # In pieces: one engine read fetches all its blocks at once.
            for start in range(offset, offset + size, MAX_READ):
                piece = min(MAX_READ, offset + size - start)
                parts.append(bytes(self._loop.call(self._window.read, start, piece)))
        except EbsfsError as err:
            raise OSError(errno.EIO, f"{self.name}: {err}") from err
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        with self._lock:
            data = self.pread(len(view), self._position)
            view[: len(data)] = data
            self._position += len(data)
        return len(data)

    def readall(self) -> bytes:
        """The rest of the file (all of it in memory: mind the size of disks)."""
        with self._lock:
            data = self.pread(max(0, self.size - self._position), self._position)
            self._position += len(data)
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._check_open()
        with self._lock:
            base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self.size}
            if whence not in base:
                raise ValueError(f"invalid whence {whence}")
            position = base[whence] + offset
            if position < 0:
                raise OSError(errno.EINVAL, f"negative seek position {position}")
            self._position = position
            return position

    def tell(self) -> int:
        self._check_open()
        return self._position

    def _check_open(self) -> None:
        if self.closed or self._loop.closed:
            raise ValueError("I/O operation on a closed ebsfs file")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} size={self.size}>"


class SnapshotFile(_WindowFile):
    """A whole snapshot (see `open`). It owns the engine: closing it stops the engine's
    thread, and with it its partition files."""

    def __init__(self, loop: EngineThread, image: SnapshotImage) -> None:
        super().__init__(loop, image, 0, image.size, f"{image.snapshot_id}.img")
        self._image = image

    def partitions(self) -> list[PartitionFile]:
        """A file for each partition of the disk (GPT or MBR, numbered as Linux numbers
        them), sharing this file's engine and cache; [] for a disk with no partition
        table, or a damaged one (logged as a warning)."""
        self._check_open()
        found = self._loop.call(self._loop.engine.partitions, self._image.snapshot_id)
        return [PartitionFile(self._loop, self._image, p) for p in found]

    def stats(self) -> dict[str, Any]:
        """What the engine has done so far, as `ebsfs stats --json` shows it."""
        return self._loop.engine.stats.report()

    def close(self) -> None:
        if not self.closed:
            self._loop.close()
        super().close()


class PartitionFile(_WindowFile):
    """One partition of a snapshot, exactly its bytes, as a file."""

    def __init__(self, loop: EngineThread, image: SnapshotImage, partition: Partition) -> None:
        super().__init__(loop, image, partition.offset, partition.size,
                         f"{image.snapshot_id}-part{partition.number}.img")
        self.partition = partition
