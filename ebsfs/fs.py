"""The FUSE layer: pyfuse3.Operations over SnapshotImages. Inodes and attributes in,
FUSEError out; everything that thinks lives in image.py and below."""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import stat
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import IO, Any, TypeVar

import pyfuse3
import trio

from ebsfs import BLOCK_SIZE
from ebsfs.errors import EbsfsError
from ebsfs.image import SnapshotImage
from ebsfs.prefetch import ReadPattern

log = logging.getLogger(__name__)

Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])

ROOT_INODE = pyfuse3.ROOT_INODE
ATTR_TIMEOUT = 3600.0
"""Attributes never change while mounted: let the kernel keep them."""


def answered(handler: Handler) -> Handler:
    """The net under a handler: pyfuse3 ends `pyfuse3.main()`, and with it the mount,
    on any exception other than FUSEError. Typed errors are the normal path (EIO, one
    log line); anything else is a bug or a library surprise: logged with its traceback
    the first time it is seen, then in one line, and answered EIO. The mount lives on."""

    @functools.wraps(handler)
    async def guarded(self: EbsOperations, *args: Any) -> Any:
        try:
            return await handler(self, *args)
        except pyfuse3.FUSEError:
            raise
        except EbsfsError as err:
            log.error("%s failed: %s", handler.__name__, err)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception as err:
            self.unexpected(handler.__name__, err)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return guarded  # type: ignore[return-value]


@dataclass
class _File:
    inode: int
    name: bytes
    image: SnapshotImage
    report: bool = False
    """The `<id>.changes` text file (changed ranges against the base) instead of the image."""


class EbsOperations(pyfuse3.Operations):
    """A flat, read-only directory of `<snapshot-id>.img` files."""

    def __init__(self, images: list[SnapshotImage], mtime: float | None = None) -> None:
        super().__init__()
        names = [(f"{img.snapshot_id}.img", img, False) for img in images]
        names += [(f"{img.snapshot_id}.changes", img, True) for img in images if img.base]
        self._files = {
            ROOT_INODE + 1 + n: _File(ROOT_INODE + 1 + n, name.encode(), img, report)
            for n, (name, img, report) in enumerate(names)
        }
        self._by_name = {f.name: f for f in self._files.values()}
        self._mtime_ns = int((mtime or time.time()) * 1e9)
        self._handles: dict[int, tuple[_File, ReadPattern]] = {}
        self._reports: dict[int, _Report] = {}
        self._next_handle = itertools.count(1)
        self._uid, self._gid = os.getuid(), os.getgid()
        self._seen_bugs: set[tuple[str, str, str]] = set()

    def unexpected(self, handler: str, err: Exception) -> None:
        """Log an unexpected exception: its traceback once per kind and place."""
        frames = traceback.extract_tb(err.__traceback__)
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
        key = (handler, type(err).__name__, where)
        if key in self._seen_bugs:
            log.error("%s failed (EIO): unexpected %s: %s at %s (traceback logged before)",
                      handler, type(err).__name__, err, where)
            return
        if len(self._seen_bugs) < 1000:
            self._seen_bugs.add(key)
        log.error("%s failed (EIO): unexpected %s: %s; the mount goes on. Please report "
                  "this with the traceback:", handler, type(err).__name__, err, exc_info=err)

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        if inode == ROOT_INODE:
            attr.st_mode = stat.S_IFDIR | 0o555
            attr.st_nlink = 2
            attr.st_size = 0
        elif inode in self._files:
            attr.st_mode = stat.S_IFREG | 0o444
            attr.st_nlink = 1
            entry = self._files[inode]
            attr.st_size = 0 if entry.report else entry.image.size
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attr.st_ino = inode
        attr.st_uid, attr.st_gid = self._uid, self._gid
        attr.st_blksize = BLOCK_SIZE
        attr.st_blocks = -(-attr.st_size // 512)
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = self._mtime_ns
        attr.entry_timeout = attr.attr_timeout = ATTR_TIMEOUT
        return attr

    @answered
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None
                      ) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    @answered
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        if parent_inode != ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name in (b".", b".."):
            return self._attr(ROOT_INODE)
        entry = self._by_name.get(name)
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(entry.inode)

    @answered
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    def entries(self) -> list[tuple[bytes, int]]:
        """Directory entries (name, inode) in readdir order."""
        return [(f.name, f.inode) for f in self._files.values()]

    @answered
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        for name, inode in self.entries():
            if inode <= start_id:
                continue
            if not pyfuse3.readdir_reply(token, name, self._attr(inode), inode):
                break

    @answered
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext
                   ) -> pyfuse3.FileInfo:
        entry = self._files.get(inode)
        if entry is None:
            raise pyfuse3.FUSEError(errno.EISDIR if inode == ROOT_INODE else errno.ENOENT)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        if entry.report:
            try:
                diff = await entry.image.changes_from_base()
            except EbsfsError as err:
                log.error("listing changes of %s failed: %s", entry.name.decode(), err)
                raise pyfuse3.FUSEError(errno.EIO) from None
            report = _Report(await trio.to_thread.run_sync(diff.text_file))
            handle = next(self._next_handle)  # only once nothing can fail: no leak
            self._handles[handle] = (entry, entry.image.open_stream())
            self._reports[handle] = report
            # direct_io: the size is only known once listed, so reads ignore st_size.
            return pyfuse3.FileInfo(fh=handle, direct_io=True)
        handle = next(self._next_handle)
        self._handles[handle] = (entry, entry.image.open_stream())
        # keep_cache: the image never changes, so the kernel's page cache stays valid.
        return pyfuse3.FileInfo(fh=handle, keep_cache=True)

    @property
    def open_handles(self) -> int:
        return len(self._handles)

    @answered
    async def read(  # type: ignore[override]
        self, fh: int, off: int, size: int
    ) -> bytes | memoryview:
        # Any buffer works (pyfuse3 replies via the buffer protocol); a memoryview of a
        # cached block spares a copy. The stubs only say bytes.
        entry, stream = self._handles[fh]
        if entry.report:
            return await self._reports[fh].read(off, size)
        log.debug("read %r at %d, %d bytes", entry.name, off, size)
        try:
            return await entry.image.read(off, size, stream)
        except EbsfsError as err:
            log.error("read of %s failed: %s", entry.name.decode(), err)
            raise pyfuse3.FUSEError(errno.EIO) from None

    @answered
    async def release(self, fh: int) -> None:
        self._handles.pop(fh, None)
        report = self._reports.pop(fh, None)
        if report is not None:
            report.spool.close()

    @answered
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        total = sum(f.image.size for f in self._files.values() if not f.report)
        data.f_bsize = data.f_frsize = BLOCK_SIZE
        data.f_blocks = -(-total // BLOCK_SIZE)
        data.f_bfree = data.f_bavail = 0
        data.f_files = len(self._files) + 1
        data.f_ffree = data.f_favail = 0
        data.f_namemax = 255
        return data

    def xattrs(self, inode: int) -> dict[bytes, bytes]:
        """Extended attributes: the serving process on the root (for `ebsfs umount`),
        the snapshot id and volume size on each image."""
        if inode == ROOT_INODE:
            return {b"user.ebsfs.pid": str(os.getpid()).encode()}
        entry = self._files.get(inode)
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attrs = {
            b"user.ebsfs.snapshot_id": entry.image.snapshot_id.encode(),
            b"user.ebsfs.volume_size": str(entry.image.size).encode(),
        }
        if entry.image.base is not None:
            attrs[b"user.ebsfs.base_snapshot"] = entry.image.base[0].snapshot_id.encode()
        return attrs

    @answered
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        value = self.xattrs(inode).get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @answered
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return list(self.xattrs(inode))


class _Report:
    """The text of one open `.changes` file, in a temporary file past 1 MiB. Reads run
    in a worker thread (the file may be on disk), one at a time (they seek)."""

    def __init__(self, spool: IO[bytes]) -> None:
        self.spool = spool
        self._lock = trio.Lock()

    async def read(self, offset: int, size: int) -> bytes:
        async with self._lock:
            return await trio.to_thread.run_sync(self._read, offset, size)

    def _read(self, offset: int, size: int) -> bytes:
        self.spool.seek(offset)
        return self.spool.read(size)
