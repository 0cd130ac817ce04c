"""The FUSE layer: pyfuse3.Operations over the file nodes of files.py. Inodes and
attributes in, FUSEError out; everything that thinks lives in files.py and below."""

from __future__ import annotations

import errno
import functools
import itertools
import json
import logging
import os
import stat
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pyfuse3

from ebsfs.constants import BLOCK_SIZE
from ebsfs.engine.cache import ReplyLoans
from ebsfs.engine.files import ImageNode, Node, OpenFile
from ebsfs.engine.timeline import Directory, Symlink
from ebsfs.errors import EbsfsError

log = logging.getLogger(__name__)

Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])

ROOT_INODE = pyfuse3.ROOT_INODE
ATTR_TIMEOUT = 3600.0
"""Attributes never change while mounted: let the kernel keep them."""
FILE_MODE = 0o444
DIR_MODE = 0o555
WRITE_BITS = 0o222


@dataclass(frozen=True)
class Ownership:
    """Who owns what the mount shows and who may read it: with `allow_other` the kernel
    checks these (the mount has default_permissions), so they are the access control of
    a shared mount. None means the serving process's own uid or gid."""

    uid: int | None = None
    gid: int | None = None
    file_mode: int = FILE_MODE
    dir_mode: int = DIR_MODE

    def __post_init__(self) -> None:
        for mode in (self.file_mode, self.dir_mode):
            # A read-only mount never shows a write bit; no setuid, setgid or sticky.
            if mode & ~0o777 or mode & WRITE_BITS:
                raise ValueError(f"mode {mode:#o}: only read and execute bits")


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


class EbsOperations(pyfuse3.Operations):
    """A read-only directory of the file nodes of files.py, and of directories of
    symbolic links (timeline.py: `by-time/`)."""

    def __init__(
        self,
        nodes: list[Node],
        mtime: float | None = None,
        stats: Callable[[], dict[str, Any]] | None = None,
        ownership: Ownership | None = None,
        directories: list[Directory] | None = None,
    ) -> None:
        super().__init__()
        owner = ownership or Ownership()
        self._stats = stats
        self._nodes = {ROOT_INODE + 1 + n: node for n, node in enumerate(nodes)}
        self._by_name = {node.name.encode(): inode for inode, node in self._nodes.items()}
        self._dirs: dict[int, Directory] = {}
        self._links: dict[int, Symlink] = {}
        self._children: dict[int, dict[bytes, int]] = {ROOT_INODE: self._by_name}
        self._inodes = itertools.count(ROOT_INODE + 1 + len(nodes))
        """Inode numbers are never used twice while mounted."""
        self.invalidate: Callable[[int, bytes], None] | None = None
        """Tells the kernel a name is gone (set once mounted): it keeps entries for
        ATTR_TIMEOUT otherwise."""
        for directory in directories or []:
            inode = next(self._inodes)
            self._dirs[inode] = directory
            self._by_name[directory.name.encode()] = inode
            self._children[inode] = {}
            self.set_links(directory)
        self._mtime_ns = int((mtime or time.time()) * 1e9)
        self._handles: dict[int, tuple[Node, OpenFile]] = {}
        self._next_handle = itertools.count(1)
        self._uid = os.getuid() if owner.uid is None else owner.uid
        self._gid = os.getgid() if owner.gid is None else owner.gid
        self._file_mode, self._dir_mode = owner.file_mode, owner.dir_mode
        self._seen_bugs: set[tuple[str, str, str]] = set()
        self._scratch = bytearray(2 * BLOCK_SIZE)
        """Where reads spanning blocks are joined. One suffices: pyfuse3 sends a read's
        reply as soon as its handler returns, before any other handler runs again."""
        self._loans = ReplyLoans()
        """The same holds for views of the cache: given back at the next read."""

    def add(self, nodes: list[Node]) -> None:
        """More files in the root (a mount's refresh), each under a new inode. On the
        FUSE loop only (between requests)."""
        for node in nodes:
            inode = next(self._inodes)
            self._nodes[inode] = node
            self._by_name[node.name.encode()] = inode

    def remove(self, names: list[str]) -> None:
        """Files of the root taken away (a deleted snapshot's); an open handle still
        reads (it holds its node). On the FUSE loop only."""
        for name in names:
            inode = self._by_name.get(name.encode())
            if inode is None or inode not in self._nodes:
                continue
            del self._by_name[name.encode()], self._nodes[inode]
            self._forget(ROOT_INODE, name.encode())

    def in_use(self, snapshot_id: str) -> bool:
        """Whether a file of this snapshot is open."""
        return any(
            getattr(getattr(node, "image", None), "snapshot_id", None) == snapshot_id
            for node, _ in self._handles.values()
        )

    def _forget(self, parent: int, name: bytes) -> None:
        if self.invalidate is not None:
            self.invalidate(parent, name)

    def set_links(self, directory: Directory) -> None:
        """The links of one of the directories: a name kept keeps its inode (its target
        never changes), a new name gets a new one, a name gone goes."""
        inode = next(i for i, d in self._dirs.items() if d.name == directory.name)
        self._dirs[inode] = directory
        children = self._children[inode]
        wanted = {link.name.encode(): link for link in directory.entries}
        for name in [n for n in children if n not in wanted]:
            del self._links[children.pop(name)]
            self._forget(inode, name)
        for name, link in wanted.items():
            if name not in children or self._links[children[name]].target != link.target:
                if name in children:
                    del self._links[children[name]]
                children[name] = next(self._inodes)
            self._links[children[name]] = link

    def unexpected(self, handler: str, err: Exception) -> None:
        """Log an unexpected exception: its traceback once per kind and place."""
        frames = traceback.extract_tb(err.__traceback__)
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
        key = (handler, type(err).__name__, where)
        if key in self._seen_bugs:
            log.error(
                "%s failed (EIO): unexpected %s: %s at %s (traceback logged before)",
                handler,
                type(err).__name__,
                err,
                where,
            )
            return
        if len(self._seen_bugs) < 1000:
            self._seen_bugs.add(key)
        log.error(
            "%s failed (EIO): unexpected %s: %s; the mount goes on. Please report "
            "this with the traceback:",
            handler,
            type(err).__name__,
            err,
            exc_info=err,
        )

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        shown: Node | Directory | Symlink | None = None
        if inode == ROOT_INODE or inode in self._dirs:
            attr.st_mode = stat.S_IFDIR | self._dir_mode
            attr.st_nlink = 2
            attr.st_size = 0
            shown = self._dirs.get(inode)
        elif inode in self._nodes:
            attr.st_mode = stat.S_IFREG | self._file_mode
            attr.st_nlink = 1
            shown = self._nodes[inode]
            attr.st_size = shown.size
        elif inode in self._links:
            attr.st_mode = stat.S_IFLNK | 0o777  # as every symlink: never checked
            attr.st_nlink = 1
            shown = self._links[inode]
            attr.st_size = len(shown.target.encode())
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attr.st_ino = inode
        attr.st_uid, attr.st_gid = self._uid, self._gid
        attr.st_blksize = BLOCK_SIZE
        # What the file holds, for du, ls -s and stat: the blocks the snapshot wrote.
        held = self._nodes[inode].allocated() if inode in self._nodes else attr.st_size
        attr.st_blocks = -(-held // 512)
        mtime = None if shown is None else shown.mtime
        mtime_ns = self._mtime_ns if mtime is None else int(mtime * 1e9)
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = mtime_ns
        attr.entry_timeout = attr.attr_timeout = ATTR_TIMEOUT
        return attr

    @answered
    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    @answered
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        children = self._children.get(parent_inode)
        if children is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name == b".":
            return self._attr(parent_inode)
        if name == b"..":
            return self._attr(ROOT_INODE)
        inode = children.get(name)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    @answered
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode not in self._children:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    def entries(self, directory: int = ROOT_INODE) -> list[tuple[bytes, int]]:
        """Directory entries (name, inode) in readdir order (inodes ascend)."""
        return sorted(self._children[directory].items(), key=lambda item: item[1])

    @answered
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        for name, inode in self.entries(fh):
            if inode <= start_id:
                continue
            if not pyfuse3.readdir_reply(token, name, self._attr(inode), inode):
                break

    @answered
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._nodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.EISDIR if inode in self._children else errno.ENOENT)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        try:
            opened = await node.open()
        except EbsfsError as err:
            log.error("opening %s failed: %s", node.name, err)
            raise pyfuse3.FUSEError(errno.EIO) from None
        handle = next(self._next_handle)  # only once nothing can fail: no leak
        self._handles[handle] = (node, opened)
        # keep_cache: a fixed file never changes, so the kernel's page cache stays valid;
        # direct_io: a file whose size is only known once opened ignores st_size.
        return pyfuse3.FileInfo(fh=handle, keep_cache=node.fixed, direct_io=not node.fixed)

    @answered
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        link = self._links.get(inode)
        if link is None:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return link.target.encode()

    @property
    def open_handles(self) -> int:
        return len(self._handles)

    @answered
    async def read(  # type: ignore[override]
        self, fh: int, off: int, size: int
    ) -> bytes | memoryview:
        # Any buffer works (pyfuse3 replies via the buffer protocol); a memoryview of a
        # cached block spares a copy. The stubs only say bytes.
        node, opened = self._handles[fh]
        loan = self._loans.take()
        try:
            return await opened.read(off, size, self._scratch, loan)
        except EbsfsError as err:
            log.error("read of %s failed: %s", node.name, err)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            self._loans.answered(loan)

    @answered
    async def release(self, fh: int) -> None:
        entry = self._handles.pop(fh, None)
        if entry is not None:
            entry[1].close()

    @answered
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        # Partitions and reports are views of the images: count each image once.
        total = sum(node.size for node in self._nodes.values() if isinstance(node, ImageNode))
        data.f_bsize = data.f_frsize = BLOCK_SIZE
        data.f_blocks = -(-total // BLOCK_SIZE)
        data.f_bfree = data.f_bavail = 0
        data.f_files = len(self._nodes) + len(self._dirs) + len(self._links) + 1
        data.f_ffree = data.f_favail = 0
        data.f_namemax = 255
        return data

    def xattrs(self, inode: int) -> dict[bytes, bytes]:
        """Extended attributes: the serving process (for `ebsfs umount`) and the
        engine's counters as JSON (for `ebsfs stats`) on the root, the snapshot id and
        volume size on each image."""
        if inode == ROOT_INODE:
            attrs = {b"user.ebsfs.pid": str(os.getpid()).encode()}
            if self._stats is not None:
                attrs[b"user.ebsfs.stats"] = json.dumps(self._stats()).encode()
            return attrs
        node = self._nodes.get(inode)
        if node is None:
            if inode in self._dirs or inode in self._links:
                return {}
            raise pyfuse3.FUSEError(errno.ENOENT)
        return {key.encode(): value.encode() for key, value in node.xattrs().items()}

    @answered
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        value = self.xattrs(inode).get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @answered
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return list(self.xattrs(inode))
