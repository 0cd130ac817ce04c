"""The Python face: `ebsfs.open(snapshot_id)` -> a read-only, seekable binary file of
the snapshot's bytes, for forensic libraries (pytsk3, dissect, dfvfs) and for places
with no root or /dev/fuse. Same engine, caching, read-ahead, retries, time limits and
errors as the mount; pyfuse3 is never imported."""

from __future__ import annotations

import errno
import io
import math
import os
import threading
from collections.abc import Callable
from typing import Any

from ebsfs.constants import CONNECT_TIMEOUT, MAX_FETCHES, READ_TIMEOUT, REQUEST_TIMEOUT
from ebsfs.engine.cache import Loan
from ebsfs.engine.config import DEFAULT_CACHE_DIR_SIZE, DEFAULT_CACHE_SIZE, EngineConfig
from ebsfs.engine.diff import Diff
from ebsfs.engine.engine import EngineThread, connect
from ebsfs.engine.files import WindowReader
from ebsfs.engine.image import SnapshotImage
from ebsfs.engine.partitions import Partition
from ebsfs.errors import BadArgument, EbsfsError
from ebsfs.service.client import ConnectionOptions
from ebsfs.service.retry import RetryPolicy

MAX_READ = 32 * 1024**2
"""Bytes asked of the engine at once (64 blocks fetched together)."""


_TEXTS = ("region", "profile", "endpoint_url")
_SIZES = ("cache_size", "cache_dir_size", "prefetch_metadata_budget")
_SECONDS = ("read_timeout", "request_timeout")
_SWITCHES = ("readahead", "direct_get", "prefetch_metadata", "hedge")


def _check_keywords(values: dict[str, Any]) -> None:
    """Each keyword's value of the right kind, or BadArgument naming it: `cache_size=
    "banana"` would otherwise surface as a TypeError from deep inside the engine."""

    def bad(name: str, wanted: str) -> BadArgument:
        return BadArgument(f"{name} must be {wanted}, got {values[name]!r}")

    ids = values["snapshot_ids"]
    if isinstance(ids, str | bytes) or not all(isinstance(i, str) for i in ids):
        raise bad("snapshot_ids", "a list of snapshot ids (strings)")
    for name in _TEXTS:
        if not isinstance(values[name], str | None):
            raise bad(name, "a string or None")
    cache_dir = values["cache_dir"]
    if not isinstance(cache_dir, str | os.PathLike | None):
        raise bad("cache_dir", "a path or None")
    for name in (*_SIZES, "max_fetches"):
        value = values[name]
        if value is None and name == "prefetch_metadata_budget":
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(name, "a whole number" + (" of bytes" if name in _SIZES else ""))
        if value < (1 if name == "max_fetches" else 0):
            raise bad(name, ">= 1" if name == "max_fetches" else ">= 0")
    for name in _SECONDS:
        value = values[name]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad(name, "a number of seconds")
        if not 0 < value < math.inf:
            raise bad(name, "a number of seconds > 0")
    for name in _SWITCHES:
        if not isinstance(values[name], bool):
            raise bad(name, "True or False")


def open(  # noqa: A001 (the name users expect, as io.open and gzip.open)
    snapshot_id: str,
    *,
    region: str | None = None,
    profile: str | None = None,
    endpoint_url: str | None = None,
    cache_size: int = DEFAULT_CACHE_SIZE,
    max_fetches: int = MAX_FETCHES,
    read_timeout: float = READ_TIMEOUT,
    request_timeout: float = REQUEST_TIMEOUT,
    readahead: bool = True,
    cache_dir: str | None = None,
    cache_dir_size: int = DEFAULT_CACHE_DIR_SIZE,
    direct_get: bool = True,
    prefetch_metadata: bool = True,
    prefetch_metadata_budget: int | None = None,
    hedge: bool = True,
) -> SnapshotFile:
    """Open a snapshot as a read-only binary file of exactly its volume size.

    The keyword arguments mean what the `ebsfs mount` options of the same names mean:
    `region`, `profile` and `endpoint_url` pick the service (default: the AWS chain,
    AWS_REGION, AWS_PROFILE, AWS_ENDPOINT_URL); `cache_size` is bytes of blocks kept in
    memory; `max_fetches` the GetSnapshotBlock calls in flight at most; `read_timeout`
    the seconds one read may take; `request_timeout` the seconds one call may wait;
    `cache_dir` a directory where blocks are kept on disk across sessions (off when
    None; shared safely with mounts and other files using it) and `cache_dir_size` the
    bytes it may take at the most. `readahead=False` never fetches blocks ahead of
    sequential reads (for readers of scattered metadata, such as forensic libraries
    walking a filesystem). `direct_get=False` sends every GetSnapshotBlock through
    boto3 instead of ebsfs's faster direct HTTP path (as `--no-direct-get` does; the
    direct path also steps aside by itself when a proxy applies to the endpoint).
    `prefetch_metadata` (on by default): once a read touches the start of a filesystem
    ext4, XFS or NTFS (its superblock or boot sector, which every library reads first),
    its metadata (inode tables, directories, extent trees, MFT, index blocks; never
    file contents) is fetched ahead in the background, in parallel, so a walk of the
    tree does not wait a service call per block; `prefetch_metadata_budget` caps the
    bytes it may fetch (default: half of `cache_size`, or a quarter of `cache_dir_size`
    with a `cache_dir`). It never delays or fails a read. `hedge=False` never asks for a
    block twice (as `--no-hedge`; by default a call far slower than recent ones is asked
    again and the first answer used, at most 1.5 % more calls).

    Raises an ebsfs.errors.EbsfsError (InvalidSnapshotId, SnapshotNotFound,
    AccessDenied, CredentialsMissing, UserInputError, ...) if the snapshot cannot be
    opened. Reads that fail raise OSError with errno EIO, as the mount answers.
    Close it (or use `with`) to stop its background thread."""
    # open_snapshots with one snapshot: the keywords become an EngineConfig in one place.
    return open_snapshots(
        [snapshot_id],
        region=region,
        profile=profile,
        endpoint_url=endpoint_url,
        cache_size=cache_size,
        max_fetches=max_fetches,
        read_timeout=read_timeout,
        request_timeout=request_timeout,
        readahead=readahead,
        cache_dir=cache_dir,
        cache_dir_size=cache_dir_size,
        direct_get=direct_get,
        prefetch_metadata=prefetch_metadata,
        prefetch_metadata_budget=prefetch_metadata_budget,
        hedge=hedge,
    )[0]


def open_snapshots(
    snapshot_ids: list[str],
    *,
    region: str | None = None,
    profile: str | None = None,
    endpoint_url: str | None = None,
    cache_size: int = DEFAULT_CACHE_SIZE,
    max_fetches: int = MAX_FETCHES,
    read_timeout: float = READ_TIMEOUT,
    request_timeout: float = REQUEST_TIMEOUT,
    readahead: bool = True,
    cache_dir: str | None = None,
    cache_dir_size: int = DEFAULT_CACHE_DIR_SIZE,
    direct_get: bool = True,
    prefetch_metadata: bool = True,
    prefetch_metadata_budget: int | None = None,
    hedge: bool = True,
) -> list[SnapshotFile]:
    """Open several snapshots on one engine, one file each in the order given: a block
    unchanged between two snapshots of one volume is fetched once for both (the later
    snapshot reads it through the earlier one's cache entry). Same keywords as `open`;
    the engine stops when the last of the files is closed. A keyword with a value it
    cannot take raises ValueError (BadArgument) naming it."""
    _check_keywords(locals())
    if cache_dir is not None:
        cache_dir = os.fspath(cache_dir)
    connection = keyword_connection(
        region=region,
        profile=profile,
        endpoint_url=endpoint_url,
        read_timeout=read_timeout,
        request_timeout=request_timeout,
        direct_get=direct_get,
    )
    config = EngineConfig(
        connection=connection,
        cache_size=cache_size,
        max_fetches=max_fetches,
        read_timeout=read_timeout,
        cache_dir=cache_dir,
        cache_dir_size=cache_dir_size,
        prefetch_metadata=prefetch_metadata,
        prefetch_metadata_budget=prefetch_metadata_budget,
        hedge=hedge,
    )
    # With a cache directory, earlier snapshots of the volume cached there serve them too.
    return open_with(config, snapshot_ids, readahead=readahead)


def keyword_connection(
    *,
    region: str | None,
    profile: str | None,
    endpoint_url: str | None,
    read_timeout: float,
    request_timeout: float,
    direct_get: bool,
    rate_limiter: Callable[[], None] | None = None,
) -> ConnectionOptions:
    """The connection settings of `open`'s keywords (and of `ebsfs scan`'s tasks, which
    add a rate limiter): connects wait at most CONNECT_TIMEOUT, and throttling is waited
    out as long as a read may wait (as the mount does)."""
    return ConnectionOptions(
        region=region,
        profile=profile,
        endpoint_url=endpoint_url,
        connect_timeout=min(CONNECT_TIMEOUT, request_timeout),
        read_timeout=request_timeout,
        direct_get=direct_get,
        retry=RetryPolicy(throttle_budget=read_timeout),
        rate_limiter=rate_limiter,
    )


def open_with(
    config: EngineConfig,
    snapshot_ids: list[str],
    *,
    share_lineage: bool = True,
    readahead: bool = True,
) -> list[SnapshotFile]:
    """`open_snapshots` from an EngineConfig (the CLI's options)."""
    engine = connect(config, snapshot_ids, share_lineage=share_lineage)
    share = _SharedLoop(EngineThread(engine), len(snapshot_ids))
    return [SnapshotFile(share, engine.images[s], readahead=readahead) for s in snapshot_ids]


class _SharedLoop:
    """The engine's loop thread and how many open files still use it: the last one
    closed stops it."""

    def __init__(self, loop: EngineThread, users: int) -> None:
        self.loop = loop
        self._users = users
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            last = self._users == 0
        if last:
            self.loop.close()


class _WindowFile(io.RawIOBase):
    """Bytes [start, start+length) of a snapshot image as a raw binary file.

    Thread safety: `pread` may be called from any number of threads at once; `read`,
    `readinto` and `seek` share one position under a lock, as a file object's do."""

    def __init__(
        self,
        loop: EngineThread,
        image: SnapshotImage,
        start: int,
        length: int,
        name: str,
        readahead: bool = True,
    ) -> None:
        super().__init__()
        self._loop = loop
        self._window = WindowReader(
            image, start, length, readahead=readahead, metadata=loop.engine.metadata
        )
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
                parts.append(self._loop.call(self._read_bytes, start, piece))
        except EbsfsError as err:
            raise OSError(errno.EIO, f"{self.name}: {err}") from err
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _read_bytes(self, offset: int, size: int) -> bytes:
        """A copy made on the engine's thread, where the cache's views are given back."""
        with Loan() as loan:
            return bytes(await self._window.read(offset, size, loan=loan))

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
    """A whole snapshot (see `open`). It owns the engine (with the other files of
    `open_snapshots`): closing it stops the engine's thread, and with it its partition
    files."""

    def __init__(self, share: _SharedLoop, image: SnapshotImage, readahead: bool = True) -> None:
        super().__init__(share.loop, image, 0, image.size, f"{image.snapshot_id}.img", readahead)
        self._share = share
        self._image = image
        self._readahead = readahead

    def partitions(self) -> list[PartitionFile]:
        """A file for each partition of the disk (GPT or MBR, numbered as Linux numbers
        them), sharing this file's engine and cache; [] for a disk with no partition
        table, or a damaged one (logged as a warning)."""
        self._check_open()
        found = self._loop.call(self._loop.engine.partitions, self._image.snapshot_id)
        return [PartitionFile(self._loop, self._image, p, self._readahead) for p in found]

    def changes_since(self, earlier: SnapshotFile) -> Diff:
        """The blocks that differ between `earlier` and this snapshot (ListChangedBlocks,
        no block data): both must come from one `open_snapshots`."""
        self._check_open()
        if earlier._loop is not self._loop:
            raise ValueError("changes_since needs two files of one open_snapshots call")
        return self._loop.call(self._loop.engine.diff, earlier.snapshot_id, self.snapshot_id)

    def stats(self) -> dict[str, Any]:
        """What the engine has done so far, as `ebsfs stats --json` shows it."""
        return self._loop.engine.stats.report()

    def close(self) -> None:
        if not self.closed:
            self._share.release()
        super().close()


class PartitionFile(_WindowFile):
    """One partition of a snapshot, exactly its bytes, as a file."""

    def __init__(
        self, loop: EngineThread, image: SnapshotImage, partition: Partition, readahead: bool = True
    ) -> None:
        super().__init__(
            loop,
            image,
            partition.offset,
            partition.size,
            f"{image.snapshot_id}-part{partition.number}.img",
            readahead,
        )
        self.partition = partition
