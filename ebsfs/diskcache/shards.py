"""The data files of a cache directory (`blocks/`, layout in directory.py): block i of a
snapshot at one origin at byte (i mod SHARD_BLOCKS) * 512 KiB of its shard file
i // SHARD_BLOCKS. Each file is opened once, created at its full size and sparse, so
writes never extend it and a punched hole gives a block's space back. The index
(store.py) says which blocks are there; this module only moves bytes.

Every file is opened through the data directory's descriptor, never through a
symbolic link, and only when it is a regular file of ours with one link (directory.py):
a punched hole never reaches a file outside the cache. Files with other names are
never opened or deleted: ebsfs did not make them."""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Callable, Iterator

from ebsfs.constants import BLOCK_SIZE
from ebsfs.diskcache.directory import private_file, punch_hole
from ebsfs.diskcache.keys import DATA_NAME, data_name

SHARD_BLOCKS = 2**21
SHARD_BYTES = SHARD_BLOCKS * BLOCK_SIZE


class ShardFiles:
    """The open data files of one cache directory (all origins). Thread-safe."""

    def __init__(self, data_fd: int) -> None:
        self.data_fd = data_fd
        self._fds: dict[tuple[str, str, int], int] = {}
        self._lock = threading.Lock()

    def _fd(
        self, origin: str, snapshot_id: str, shard: int, volume_size: int | None = None
    ) -> int | None:
        """The data file of one shard, opened once; created (sparse, its full size, so
        writes never extend it) only when `volume_size` is given."""
        key = (origin, snapshot_id, shard)
        with self._lock:
            fd = self._fds.get(key)
            if fd is not None:
                return fd
            name = data_name(origin, snapshot_id, shard)
            try:
                fd = private_file(name, self.data_fd, create=volume_size is not None)
            except FileNotFoundError:
                return None
            if volume_size is not None:
                size = min(SHARD_BYTES, volume_size - shard * SHARD_BYTES)
                if os.fstat(fd).st_size < size:
                    # A full-size sparse file: no writes past its end, so no filesystem
                    # preallocates space beyond it (XFS does for growing files).
                    os.ftruncate(fd, size)
            self._fds[key] = fd
            return fd

    def read(self, origin: str, snapshot_id: str, index: int, buffer: memoryview) -> int:
        """Block `index` read into `buffer`: the bytes read (0 with no data file)."""
        shard, offset = divmod(index, SHARD_BLOCKS)
        fd = self._fd(origin, snapshot_id, shard)
        return 0 if fd is None else os.preadv(fd, [buffer], offset * BLOCK_SIZE)

    def write(
        self,
        origin: str,
        snapshot_id: str,
        index: int,
        volume_size: int,
        data: bytes | memoryview,
    ) -> bool:
        """The block's bytes in its data file; False when the filesystem is full."""
        shard, offset = divmod(index, SHARD_BLOCKS)
        fd = self._fd(origin, snapshot_id, shard, volume_size)
        assert fd is not None
        try:
            written = os.pwrite(fd, data, offset * BLOCK_SIZE)
            if written != BLOCK_SIZE:
                raise OSError(errno.ENOSPC, "short write")
        except OSError as err:
            with contextlib.suppress(OSError):
                punch_hole(fd, offset * BLOCK_SIZE, BLOCK_SIZE)
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            return False
        return True

    def punch(self, origin: str, snapshot_id: str, index: int) -> None:
        """Free the space of one block."""
        shard, offset = divmod(index, SHARD_BLOCKS)
        fd = self._fd(origin, snapshot_id, shard)
        if fd is not None:
            punch_hole(fd, offset * BLOCK_SIZE, BLOCK_SIZE)

    def reconcile(self, held: Callable[[str, str, int, int], set[int]]) -> int:
        """Punch away every allocated block that `held(origin, snapshot_id, first,
        count)` (the index: blocks [first, first+count) of a snapshot it has) does not
        name. Returns the blocks punched."""
        punched = 0
        for name in os.listdir(self.data_fd):
            match = DATA_NAME.fullmatch(name)
            if match is None:
                continue  # not ebsfs's: left alone
            snapshot_id, origin, shard = match[1], match[2], int(match[3])
            first = shard * SHARD_BLOCKS
            kept = {i - first for i in held(origin, snapshot_id, first, SHARD_BLOCKS)}
            fd = private_file(name, self.data_fd, create=False)
            try:
                for block in _allocated_blocks(fd):
                    if block not in kept:
                        punch_hole(fd, block * BLOCK_SIZE, BLOCK_SIZE)
                        punched += 1
            finally:
                os.close(fd)
        return punched

    def remove_all(self) -> None:
        """Close and delete every data file (the index that described them is gone);
        only files of ebsfs's names that are regular files of ours."""
        self.close()
        for name in os.listdir(self.data_fd):
            if DATA_NAME.fullmatch(name) is None:
                continue
            try:
                os.close(private_file(name, self.data_fd, create=False))
            except OSError:
                continue  # not ours to delete
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=self.data_fd)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def _allocated_blocks(fd: int) -> Iterator[int]:
    """Block numbers of the file with any allocated byte (SEEK_DATA / SEEK_HOLE)."""
    position = 0
    while True:
        try:
            start = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:
                return
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield from range(start // BLOCK_SIZE, -(-end // BLOCK_SIZE))
        position = end
