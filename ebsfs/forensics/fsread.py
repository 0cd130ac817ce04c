"""A filesystem's metadata as one record per file, directory and symlink, read through
forensic libraries over any positional reader (an ebsfs partition or snapshot file).

We parse no filesystem ourselves. pytsk3 (The Sleuth Kit, Apache-2.0) reads ext2/3/4,
NTFS, FAT, exFAT, HFS+ and more; its PyPI build reads no XFS, so XFS goes through
libfsxfs (`pyfsxfs`, LGPL-3.0-or-later), an optional extra (`pip install
'ebsfs[xfs]'`): ebsfs works without it and says what is missing.

Only metadata is read: directories, inodes (MFT records) and extent maps, never file
contents (data held inside the metadata itself, such as NTFS resident data or a fast
symlink's target, comes with it and is hashed, up to INLINE_MAX bytes).

The metadata is the attacker's: a directory or an entry the library cannot read is
noted (`Tree.unreadable`) and the walk goes on, so that one damaged directory cannot
hide the rest of the filesystem; only a failed read of the snapshot itself (the
engine's error) stops it. Time and memory follow the metadata's size: no file data is
read for a listing, and a path is built from at most MAX_PATH characters."""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ebsfs.errors import EbsfsError, FilesystemUnreadable
from ebsfs.quoting import printable

log = logging.getLogger(__name__)

PAGE = 64 * 1024
PAGES_KEPT = 64
"""Pages of 64 KiB kept by each reader (4 MiB): libraries read metadata in pieces of
512 bytes to a few KiB, and each piece would otherwise be a trip into the engine."""
PROGRESS_EVERY = 1000
"""Entries between two progress reports."""
MAX_PATH = 4096
"""Longest path built whole (Linux's PATH_MAX). A deeper name is given from the inode
number of an ancestor (`inode:N/rest/of/it`, never starting with `/` like a real path):
an attacker may nest directories 100,000 deep, and whole paths would cost the square
of that in time and memory."""
INLINE_MAX = 64 * 1024
"""Most bytes of data kept inside the metadata read for one entry (an ext4 inode or
an NTFS MFT record holds less): an entry that claims more is noted unreadable."""
LIBRARY_ERRORS = (OSError, RuntimeError, ValueError, UnicodeError, OverflowError)
"""What the libraries raise on structures they cannot follow."""

FILE, DIRECTORY, SYMLINK, OTHER = "file", "dir", "symlink", "other"


class PositionalReader(Protocol):
    """What the libraries read through: `pread(size, offset)` and `size` (an ebsfs
    SnapshotFile or PartitionFile)."""

    size: int

    def pread(self, size: int, offset: int) -> bytes: ...


@dataclass(slots=True)
class Entry:
    """One file, directory or symlink as its inode (MFT record) describes it. Times are
    nanoseconds since the epoch (None where the filesystem keeps none); extents are
    (byte offset in the filesystem, length) of its data, in file order."""

    inode: int
    kind: str
    size: int
    mode: int | None
    uid: int | None
    gid: int | None
    atime: int | None
    mtime: int | None
    ctime: int | None
    crtime: int | None
    generation: int | None
    """What tells a reused inode number apart where the filesystem keeps it (NTFS
    sequence number); the creation time serves elsewhere."""
    extents: tuple[tuple[int, int], ...]
    inline: bytes | None
    """SHA-256 of data kept inside the metadata (NTFS resident data, inline data, a
    symlink's target), None if there is none."""
    links: list[tuple[int, str]] = field(default_factory=list)
    """(parent directory inode, name) of each name the inode has."""

    def identity(self) -> tuple[object, ...]:
        """Equal for the same object in two snapshots, different when an inode number
        was freed and used again."""
        return (self.kind, self.generation, self.crtime)


@dataclass
class Unreadable:
    """A part of the tree that could not be read: a directory's listing (some or all of
    its entries missing) or one entry's metadata."""

    what: str
    """"directory" (its listing) or "entry"."""
    inode: int | None
    """The directory or the entry; None for a name in a directory that could not be
    read at all (then `link` is the directory's)."""
    link: tuple[int, str] | None
    """Its name (parent inode, name); None for the root directory."""
    reason: str
    directory: int | None = None
    """For a name that could not be read (`inode` None): the directory holding it,
    whose other snapshot's names it may be."""


@dataclass
class Tree:
    """The entries of one filesystem by inode, how to name them, and what could not be
    read."""

    fstype: str
    block_size: int
    root: int
    entries: dict[int, Entry]
    unreadable: list[Unreadable] = field(default_factory=list)

    def path(self, link: tuple[int, str] | None) -> str:
        """The absolute path of a name: its parents' names up to the root, or, past
        MAX_PATH characters or a broken chain, `inode:N/...` from the last ancestor
        reached (bounded work per name, whatever the depth)."""
        if link is None:
            return "/"
        parent, name = link
        parts = [name]
        length = len(name) + 1
        while parent != self.root:
            entry = self.entries.get(parent)
            if entry is None or not entry.links:
                return f"inode:{parent}/" + "/".join(reversed(parts))
            up, name = entry.links[0]
            length += len(name) + 1  # at least 1 a step: a loop ends too
            if length > MAX_PATH:
                return f"inode:{parent}/" + "/".join(reversed(parts))
            parts.append(name)
            parent = up
        return "/" + "/".join(reversed(parts))


class PagedReader:
    """A file-like view (read, seek, tell, get_size) of a PositionalReader with an LRU
    of 64 KiB pages, for libraries that read in small pieces."""

    def __init__(self, source: PositionalReader) -> None:
        self._source = source
        self._pages: OrderedDict[int, bytes] = OrderedDict()
        self._position = 0
        self.size = source.size
        self.failure: OSError | None = None
        """The first read that failed: the library only sees an error code, and may
        carry on as if the structure were damaged."""

    def _read(self, size: int, offset: int) -> bytes:
        try:
            return self._source.pread(size, offset)
        except OSError as err:
            if self.failure is None:
                self.failure = err
            raise

    def pread(self, size: int, offset: int) -> bytes:
        size = max(0, min(size, self.size - offset))
        if size == 0:
            return b""
        first, last = offset // PAGE, (offset + size - 1) // PAGE
        if last - first >= PAGES_KEPT // 2:  # large: straight through, not cached
            return self._read(size, offset)
        data = b"".join(self._page(n) for n in range(first, last + 1))
        start = offset - first * PAGE
        return data[start : start + size]

    def _page(self, number: int) -> bytes:
        page = self._pages.get(number)
        if page is not None:
            self._pages.move_to_end(number)
            return page
        page = self._read(PAGE, number * PAGE)
        self._pages[number] = page
        if len(self._pages) > PAGES_KEPT:
            self._pages.popitem(last=False)
        return page

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = self.size - self._position
        data = self.pread(size, self._position)
        self._position += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._position, self.size)[whence]
        self._position = base + offset
        return self._position

    def tell(self) -> int:
        return self._position

    def get_size(self) -> int:
        return self.size


Progress = Callable[[int], None]
"""Called with the number of entries read so far, every PROGRESS_EVERY entries."""


def read_tree(source: PositionalReader, progress: Progress | None = None) -> Tree:
    """Every file, directory and symlink of the filesystem in `source`, from its
    metadata. Raises FilesystemUnreadable (unknown, unsupported or damaged)."""
    reader = PagedReader(source)
    try:
        if reader.pread(4, 0) == b"XFSB":
            from ebsfs.forensics.xfsread import xfs_tree

            tree = xfs_tree(reader, progress)
        else:
            tree = _tsk_tree(reader, progress)
    except FilesystemUnreadable:
        raise_read_failure(reader)
        raise
    except LIBRARY_ERRORS as err:
        raise_read_failure(reader)
        # The libraries raise plain OSError/IOError on structures they cannot follow.
        raise FilesystemUnreadable(f"damaged or unreadable: {one_line(err)}") from err
    raise_read_failure(reader)  # a library may have skipped what it could not read
    for u in tree.unreadable:
        if u.inode == tree.root and len(tree.entries) == 1:  # nothing but the root read
            raise FilesystemUnreadable(f"damaged or unreadable: the root directory: {u.reason}")
    return tree


def raise_read_failure(reader: PagedReader) -> None:
    """A failed read of the snapshot is the engine's error, not damage."""
    if reader.failure is not None:
        cause = reader.failure.__cause__
        raise cause if isinstance(cause, EbsfsError) else reader.failure


def one_line(err: BaseException) -> str:
    """A library's error as one short printable line: it may quote the snapshot's
    bytes (a name, a label), and goes to logs and terminals."""
    text = " ".join(str(err).split())
    return printable(text[:300]) or type(err).__name__


class Unreadables:
    """Notes what a walker could not read, after making sure the snapshot itself was
    read: a failed read is the engine's error and stops the walk."""

    def __init__(self, reader: PagedReader) -> None:
        self.reader = reader
        self.found: list[Unreadable] = []

    def note(
        self,
        what: str,
        inode: int | None,
        link: tuple[int, str] | None,
        err: BaseException,
        directory: int | None = None,
    ) -> None:
        raise_read_failure(self.reader)
        log.info("unreadable %s (inode %s): %s", what, inode, one_line(err))
        self.found.append(Unreadable(what, inode, link, one_line(err), directory))


class Collected:
    """What a reader's walk has found so far, the same for every library: the entries
    by inode, what could not be read, and progress."""

    def __init__(self, progress: Progress | None, unreadable: Unreadables) -> None:
        self.progress = progress
        self.unreadable = unreadable
        self.entries: dict[int, Entry] = {}

    def first_link(self, inode: int) -> tuple[int, str] | None:
        """Where an entry was first found (the path notes of what is unreadable use)."""
        links = self.entries[inode].links
        return links[0] if links else None

    def record(self, inode: int, parent: int, name: str, make: Callable[[], Entry]) -> bool:
        """One name of `inode`: a further name of an inode seen already is a link of
        it (a hard link); a new one becomes an entry (`make()`, whose library error
        makes it one unreadable entry). True when a new entry was recorded."""
        known = self.entries.get(inode)
        if known is not None:
            known.links.append((parent, name))
            return False
        try:
            entry = make()
        except LIBRARY_ERRORS as err:
            self.unreadable.note("entry", inode, (parent, name), err)
            return False
        entry.links.append((parent, name))
        self.entries[inode] = entry
        if self.progress is not None and len(self.entries) % PROGRESS_EVERY == 0:
            self.progress(len(self.entries))
        return True


# -- The Sleuth Kit ---------------------------------------------------------------------


def _tsk_tree(reader: PagedReader, progress: Progress | None) -> Tree:
    (pytsk3, fs), fstype = tsk_open(reader)
    walker = TskWalker(pytsk3, fs, fstype, progress, Unreadables(reader))
    walker.walk()
    return Tree(
        fstype, int(fs.info.block_size), walker.root, walker.entries, walker.unreadable.found
    )


def tsk_open(reader: PagedReader) -> tuple[tuple[Any, Any], str]:
    """(pytsk3, its FS_Info over `reader`) and the filesystem's type."""
    try:
        import pytsk3
    except ImportError as err:
        raise FilesystemUnreadable("reading files needs pytsk3 (pip install pytsk3)") from err

    class Image(pytsk3.Img_Info):
        def __init__(self) -> None:
            super().__init__(url="", type=pytsk3.TSK_IMG_TYPE_EXTERNAL)

        def read(self, offset: int, size: int) -> bytes:
            return reader.pread(size, offset)

        def get_size(self) -> int:
            return reader.size

    image = Image()
    try:
        fs = pytsk3.FS_Info(image, type=_known_type(pytsk3, reader))
    except OSError as err:
        if "Cannot determine file system type" in str(err):
            raise FilesystemUnreadable(
                "no filesystem ebsfs can read (The Sleuth Kit recognises none here)"
            ) from err
        raise FilesystemUnreadable(f"damaged or unreadable: {one_line(err)}") from err
    return (pytsk3, fs), _tsk_name(pytsk3, int(fs.info.ftype))


def _known_type(pytsk3: Any, reader: PagedReader) -> int:
    """The type to open as when the head says it (ext2/3/4, NTFS), else detection,
    which tries every type and may read the whole filesystem (every block fetched)."""
    head = reader.pread(2048, 0)
    if head[3:11] == b"NTFS    ":
        return int(pytsk3.TSK_FS_TYPE_NTFS_DETECT)
    if head[1080:1082] == b"\x53\xef":
        return int(pytsk3.TSK_FS_TYPE_EXT_DETECT)
    return int(pytsk3.TSK_FS_TYPE_DETECT)


def _tsk_name(pytsk3: Any, ftype: int) -> str:
    for name in (
        "EXT4",
        "EXT3",
        "EXT2",
        "NTFS",
        "FAT32",
        "FAT16",
        "FAT12",
        "EXFAT",
        "HFS",
        "ISO9660",
        "FFS1",
        "FFS1B",
        "FFS2",
        "YAFFS2",
        "APFS",
    ):
        if ftype == int(getattr(pytsk3, f"TSK_FS_TYPE_{name}", -1)):
            return name.lower()
    return f"type {ftype:#x}"


class TskWalker(Collected):
    """Depth-first over directories (a stack, not recursion: trees can be deep)."""

    def __init__(
        self,
        pytsk3: Any,
        fs: Any,
        fstype: str,
        progress: Progress | None,
        unreadable: Unreadables,
    ) -> None:
        super().__init__(progress, unreadable)
        self.tsk = pytsk3
        self.fs = fs
        self.fstype = fstype
        self.block_size = int(fs.info.block_size)
        self.root = int(fs.info.root_inum)
        self.kinds = {
            int(pytsk3.TSK_FS_META_TYPE_REG): FILE,
            int(pytsk3.TSK_FS_META_TYPE_DIR): DIRECTORY,
            int(pytsk3.TSK_FS_META_TYPE_LNK): SYMLINK,
        }
        self.nonresident = int(pytsk3.TSK_FS_ATTR_NONRES)
        self.sparse = int(pytsk3.TSK_FS_ATTR_RUN_FLAG_SPARSE) | int(
            pytsk3.TSK_FS_ATTR_RUN_FLAG_FILLER
        )
        self.allocated = int(pytsk3.TSK_FS_NAME_FLAG_ALLOC)
        self.data_types = {
            int(pytsk3.TSK_FS_ATTR_TYPE_DEFAULT),
            int(pytsk3.TSK_FS_ATTR_TYPE_NTFS_DATA),
        }

    def walk(self) -> None:
        root = self.fs.open_meta(inode=self.root)
        self.entries[self.root] = self._entry(root, DIRECTORY)
        stack = [self.root]
        while stack:
            directory = stack.pop()
            try:
                for child in self.fs.open_dir(inode=directory):
                    try:
                        inode = self._visit(directory, child)
                    except LIBRARY_ERRORS as err:  # not even its name: the rest goes on
                        link = self.first_link(directory)
                        self.unreadable.note("entry", None, link, err, directory)
                        continue
                    if inode is not None:
                        stack.append(inode)
            except LIBRARY_ERRORS as err:  # what it listed before is kept
                self.unreadable.note("directory", directory, self.first_link(directory), err)

    def _visit(self, parent: int, child: Any) -> int | None:
        """Record one directory entry; the inode to descend into if it is a new
        directory."""
        name_info = child.info.name
        meta = child.info.meta
        if meta is None or not int(name_info.flags) & self.allocated:
            return None  # a deleted name: not part of the live tree
        name = name_info.name.decode("utf-8", "surrogateescape")
        if name in (".", ".."):
            return None
        kind = self.kinds.get(int(meta.type))
        if kind is None:
            return None  # TSK's virtual $OrphanFiles, devices, sockets, FIFOs
        inode = int(meta.addr)
        if self.fstype == "ntfs" and parent == self.root and name.startswith("$") and inode < 24:
            return None  # NTFS's own metadata files ($MFT, $LogFile, $Extend, ...)
        new = self.record(inode, parent, name, lambda: self._entry(child, kind))
        return inode if new and kind == DIRECTORY else None

    def _entry(self, f: Any, kind: str) -> Entry:
        meta = f.info.meta
        extents: list[tuple[int, int]] = []
        inline = hashlib.sha256()
        has_inline = False
        if kind != DIRECTORY:
            for attr in f:
                info = attr.info
                if int(info.type) not in self.data_types:
                    continue
                stream = (info.name or b"") + b"\0"
                if int(info.flags) & self.nonresident:
                    for run in attr:
                        if int(run.flags) & self.sparse:
                            continue
                        extents.append(
                            (int(run.addr) * self.block_size, int(run.len) * self.block_size)
                        )
                elif int(info.size) > INLINE_MAX:
                    raise ValueError(f"{int(info.size)} bytes said to be kept in the metadata")
                elif int(info.size) > 0:
                    inline.update(stream + f.read_random(0, int(info.size), info.type, info.id))
                    has_inline = True
        if kind == SYMLINK and meta.link:
            inline.update(
                b"link\0" + bytes(meta.link, "utf-8", "surrogateescape")
                if isinstance(meta.link, str)
                else meta.link
            )
            has_inline = True
        ntfs = self.fstype == "ntfs"
        return Entry(
            inode=int(meta.addr),
            kind=kind,
            size=int(meta.size),
            mode=None if ntfs else int(meta.mode),
            uid=None if ntfs else int(meta.uid),
            gid=None if ntfs else int(meta.gid),
            atime=_ns(meta.atime, meta.atime_nano),
            mtime=_ns(meta.mtime, meta.mtime_nano),
            ctime=_ns(meta.ctime, meta.ctime_nano),
            crtime=_ns(meta.crtime, meta.crtime_nano),
            generation=int(meta.seq) if ntfs else None,
            extents=tuple(extents),
            inline=inline.digest() if has_inline else None,
        )


def _ns(seconds: int, nanoseconds: int) -> int | None:
    return None if not seconds and not nanoseconds else int(seconds) * 10**9 + int(nanoseconds)
