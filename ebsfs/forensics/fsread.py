"""A filesystem's metadata as one record per file, directory and symlink, read through
forensic libraries over any positional reader (an ebsfs partition or snapshot file).

We parse no filesystem ourselves. pytsk3 (The Sleuth Kit, Apache-2.0) reads ext2/3/4,
NTFS, FAT, exFAT, HFS+ and more; its PyPI build reads no XFS, so XFS goes through
libfsxfs (`pyfsxfs`, LGPL-3.0-or-later), an optional extra (`pip install
'ebsfs[xfs]'`): ebsfs works without it and says what is missing.

Only metadata is read: directories, inodes (MFT records) and extent maps, never file
contents (data held inside the metadata itself, such as NTFS resident data or a fast
symlink's target, comes with it and is hashed)."""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from ebsfs.errors import EbsfsError, FilesystemUnreadable

log = logging.getLogger(__name__)

PAGE = 64 * 1024
PAGES_KEPT = 64
"""Pages of 64 KiB kept by each reader (4 MiB): libraries read metadata in pieces of
512 bytes to a few KiB, and each piece would otherwise be a trip into the engine."""
PROGRESS_EVERY = 1000
"""Entries between two progress reports."""

FILE, DIRECTORY, SYMLINK = "file", "dir", "symlink"


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
class Tree:
    """The entries of one filesystem by inode, and how to name them."""

    fstype: str
    block_size: int
    root: int
    entries: dict[int, Entry]

    def path(self, link: tuple[int, str]) -> str:
        """The absolute path of a name: its parents' names up to the root."""
        parent, name = link
        parts = [name]
        seen = {parent}
        while parent != self.root:
            entry = self.entries.get(parent)
            if entry is None or not entry.links:
                break
            parent, name = entry.links[0]
            if parent in seen:  # a loop in a damaged tree: stop, do not hang
                break
            seen.add(parent)
            parts.append(name)
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
            tree = _xfs_tree(reader, progress)
        else:
            tree = _tsk_tree(reader, progress)
    except FilesystemUnreadable:
        _raise_read_failure(reader)
        raise
    except (OSError, RuntimeError, ValueError) as err:
        _raise_read_failure(reader)
        # The libraries raise plain OSError/IOError on structures they cannot follow.
        raise FilesystemUnreadable(f"damaged or unreadable: {_one_line(err)}") from err
    _raise_read_failure(reader)  # a library may have skipped what it could not read
    return tree


def _raise_read_failure(reader: PagedReader) -> None:
    """A failed read of the snapshot is the engine's error, not damage."""
    if reader.failure is not None:
        cause = reader.failure.__cause__
        raise cause if isinstance(cause, EbsfsError) else reader.failure


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:300] or type(err).__name__


# -- The Sleuth Kit ---------------------------------------------------------------------


def _tsk_tree(reader: PagedReader, progress: Progress | None) -> Tree:
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
        fs = pytsk3.FS_Info(image)
    except OSError as err:
        if "Cannot determine file system type" in str(err):
            raise FilesystemUnreadable(
                "no filesystem ebsfs can read (The Sleuth Kit recognises none here)"
            ) from err
        raise FilesystemUnreadable(f"damaged or unreadable: {_one_line(err)}") from err
    fstype = _tsk_name(pytsk3, int(fs.info.ftype))
    walker = _TskWalker(pytsk3, fs, fstype, progress)
    walker.walk()
    return Tree(fstype, int(fs.info.block_size), walker.root, walker.entries)


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


class _TskWalker:
    """Depth-first over directories (a stack, not recursion: trees can be deep)."""

    def __init__(self, pytsk3: Any, fs: Any, fstype: str, progress: Progress | None) -> None:
        self.tsk = pytsk3
        self.fs = fs
        self.fstype = fstype
        self.progress = progress
        self.block_size = int(fs.info.block_size)
        self.root = int(fs.info.root_inum)
        self.entries: dict[int, Entry] = {}
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
            for child in self.fs.open_dir(inode=directory):
                inode = self._visit(directory, child)
                if inode is not None:
                    stack.append(inode)

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
        known = self.entries.get(inode)
        if known is not None:
            known.links.append((parent, name))
            return None  # another name of an inode seen already (a hard link)
        entry = self._entry(child, kind)
        entry.links.append((parent, name))
        self.entries[inode] = entry
        if self.progress is not None and len(self.entries) % PROGRESS_EVERY == 0:
            self.progress(len(self.entries))
        return inode if kind == DIRECTORY else None

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


# -- XFS through libfsxfs ---------------------------------------------------------------


def _xfs_tree(reader: PagedReader, progress: Progress | None) -> Tree:
    try:
        import pyfsxfs
    except ImportError as err:
        raise FilesystemUnreadable(
            "XFS needs the optional extra: pip install 'ebsfs[xfs]' (libfsxfs-python, LGPL-3.0)"
        ) from err
    volume = pyfsxfs.volume()
    try:
        volume.open_file_object(reader)
    except OSError as err:
        raise FilesystemUnreadable(f"damaged XFS: {_one_line(err)}") from err
    root = volume.get_root_directory()
    root_inode = int(root.inode_number)
    block_size = int.from_bytes(reader.pread(4, 4), "big")
    entries = {root_inode: _xfs_entry(root, DIRECTORY)}
    stack = [root]
    while stack:
        directory = stack.pop()
        parent = int(directory.inode_number)
        for child in _xfs_children(directory):
            inode = int(child.inode_number)
            known = entries.get(inode)
            if known is not None:
                known.links.append((parent, child.name))
                continue
            kind = _XFS_KINDS.get(int(child.file_mode) & 0o170000)
            if kind is None:
                continue  # devices, sockets, FIFOs
            entry = _xfs_entry(child, kind)
            entry.links.append((parent, child.name))
            entries[inode] = entry
            if progress is not None and len(entries) % PROGRESS_EVERY == 0:
                progress(len(entries))
            if kind == DIRECTORY:
                stack.append(child)
    return Tree("xfs", block_size, root_inode, entries)


_XFS_KINDS = {0o100000: FILE, 0o040000: DIRECTORY, 0o120000: SYMLINK}


def _xfs_children(directory: Any) -> Iterator[Any]:
    for k in range(int(directory.number_of_sub_file_entries)):
        yield directory.get_sub_file_entry(k)


def _xfs_entry(e: Any, kind: str) -> Entry:
    extents: list[tuple[int, int]] = []
    inline: bytes | None = None
    if kind != DIRECTORY:
        try:
            count = int(e.number_of_extents)
        except OSError:  # data kept in the inode (local format): no extents
            count = 0
        for k in range(count):
            offset, length, flags = e.get_extent(k)
            if not flags & 1:  # sparse
                extents.append((int(offset), int(length)))
    if kind == SYMLINK:
        target = e.symbolic_link_target or ""
        inline = hashlib.sha256(b"link\0" + target.encode("utf-8", "surrogateescape")).digest()
    elif kind == FILE and not extents and int(e.size) > 0:
        inline = hashlib.sha256(e.read_buffer(int(e.size))).digest()
    mode = int(e.file_mode)
    return Entry(
        inode=int(e.inode_number),
        kind=kind,
        size=int(e.size) if kind != DIRECTORY else 0,
        mode=mode & 0o7777,
        uid=int(e.owner_identifier),
        gid=int(e.group_identifier),
        atime=_xfs_time(e.get_access_time_as_integer),
        mtime=_xfs_time(e.get_modification_time_as_integer),
        ctime=_xfs_time(e.get_inode_change_time_as_integer),
        crtime=_xfs_time(e.get_creation_time_as_integer),
        generation=None,
        extents=tuple(extents),
        inline=inline,
    )


def _xfs_time(getter: Callable[[], int | None]) -> int | None:
    try:
        value = getter()
    except OSError:  # no creation time in a v4 filesystem
        return None
    return int(value) if value else None
