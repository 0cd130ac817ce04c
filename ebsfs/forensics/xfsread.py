"""XFS metadata as fsread.py's records, through libfsxfs (`pyfsxfs`, LGPL-3.0-or-later,
the optional extra `ebsfs[xfs]`).

Never a byte of file data: a regular file with no extents is sparse (XFS keeps no
regular file's data in its inode), so its size says what it holds; reading it, as
libfsxfs would, costs the file's size in memory (`truncate -s 4G` by any user). What
libfsxfs cannot follow (a data fork in a two-level B+tree, a name that is not UTF-8) is
one unreadable entry, and the walk goes on."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from ebsfs.errors import FilesystemUnreadable
from ebsfs.forensics.fsread import (
    DIRECTORY,
    FILE,
    LIBRARY_ERRORS,
    OTHER,
    SYMLINK,
    Collected,
    Entry,
    PagedReader,
    Progress,
    Tree,
    Unreadables,
    one_line,
)

SYMLINK_MAX = 1024
"""XFS_SYMLINK_MAXLEN: the kernel refuses a longer target, so a symlink claiming one is
damaged, and its target is not read."""
_KINDS = {0o100000: FILE, 0o040000: DIRECTORY, 0o120000: SYMLINK}


def open_volume(reader: PagedReader) -> Any:
    """libfsxfs's volume over `reader`; FilesystemUnreadable without the extra or on damage."""
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
        raise FilesystemUnreadable(f"damaged XFS: {one_line(err)}") from err
    return volume


def xfs_lookup(reader: PagedReader, parts: list[str]) -> tuple[Entry | None, Any]:
    """The entry at the path `parts` (see lookup.py) and libfsxfs's file entry (to
    read): each directory on it listed until the name is found."""
    current = open_volume(reader).get_root_directory()
    kind = DIRECTORY
    for name in parts:
        if kind != DIRECTORY:
            return None, None  # a symlink or a file on the way: not followed
        current = _child(current, name)
        if current is None:
            return None, None
        kind = _KINDS.get(int(current.file_mode) & 0o170000, OTHER)
    return _entry(current, kind), current


def _child(directory: Any, name: str) -> Any | None:
    """The entry named `name` in a directory, or None. Listed, not asked by name:
    libfsxfs's lookup by name raised for names that are there (libfsxfs 20260901)."""
    for k in range(int(directory.number_of_sub_file_entries)):
        child = directory.get_sub_file_entry(k)
        if child.name == name:
            return child
    return None


def xfs_tree(reader: PagedReader, progress: Progress | None) -> Tree:
    """Every file, directory and symlink of the XFS in `reader`; per directory and per
    entry, what libfsxfs cannot read is noted in `Tree.unreadable`."""
    root = open_volume(reader).get_root_directory()
    root_inode = int(root.inode_number)
    block_size = int.from_bytes(reader.pread(4, 4), "big")
    walker = _Walker(progress, Unreadables(reader))
    walker.entries[root_inode] = _entry(root, DIRECTORY)
    walker.walk(root)
    return Tree("xfs", block_size, root_inode, walker.entries, walker.unreadable.found)


class _Walker(Collected):
    """Depth-first over directories (a stack, not recursion: trees can be deep)."""

    def walk(self, root: Any) -> None:
        stack = [root]
        while stack:
            directory = stack.pop()
            parent = int(directory.inode_number)
            try:
                count = int(directory.number_of_sub_file_entries)
            except LIBRARY_ERRORS as err:
                self.unreadable.note("directory", parent, self.first_link(parent), err)
                continue
            for k in range(count):
                child = self._visit(directory, parent, k)
                if child is not None:
                    stack.append(child)

    def _visit(self, directory: Any, parent: int, k: int) -> Any | None:
        """Record the k-th entry of a directory; the entry to descend into if it is a
        new directory."""
        inode: int | None = None
        try:
            child = directory.get_sub_file_entry(k)
            inode = int(child.inode_number)
            name = child.name
            kind = _KINDS.get(int(child.file_mode) & 0o170000)
        except LIBRARY_ERRORS as err:  # no name to give it: the directory's, and which
            self.unreadable.note("entry", inode, self.first_link(parent), _Nth(k, err), parent)
            return None
        if kind is None:
            return None  # devices, sockets, FIFOs (never a hard link of what is recorded)
        new = self.record(inode, parent, name, lambda: _entry(child, kind))
        return child if new and kind == DIRECTORY else None


class _Nth(ValueError):
    """Which entry of a directory could not be read, and why."""

    def __init__(self, k: int, err: BaseException) -> None:
        super().__init__(f"its entry {k}: {one_line(err)}")


def _entry(e: Any, kind: str) -> Entry:
    """One inode's record. Raises what libfsxfs raises for an extent map it cannot
    follow: an entry without its extents would be a silent lie."""
    extents: list[tuple[int, int]] = []
    inline: bytes | None = None
    size = int(e.size)
    if kind != DIRECTORY:
        try:
            count = int(e.number_of_extents)
        except OSError:
            if kind == FILE:  # XFS keeps no file's data in its inode: damage
                raise
            count = 0  # a short symlink's target, kept in the inode
        for k in range(count):
            offset, length, flags = e.get_extent(k)
            if not flags & 1:  # sparse
                extents.append((int(offset), int(length)))
    if kind == SYMLINK:
        if size > SYMLINK_MAX:
            raise ValueError(f"a symlink target of {size} bytes (XFS allows {SYMLINK_MAX})")
        target = e.symbolic_link_target or ""
        inline = hashlib.sha256(b"link\0" + target.encode("utf-8", "surrogateescape")).digest()
    mode = int(e.file_mode)
    return Entry(
        inode=int(e.inode_number),
        kind=kind,
        size=size if kind != DIRECTORY else 0,
        mode=mode & 0o7777,
        uid=int(e.owner_identifier),
        gid=int(e.group_identifier),
        atime=_time(e.get_access_time_as_integer),
        mtime=_time(e.get_modification_time_as_integer),
        ctime=_time(e.get_inode_change_time_as_integer),
        crtime=_time(e.get_creation_time_as_integer),
        generation=None,
        extents=tuple(extents),
        inline=inline,
    )


def _time(getter: Callable[[], int | None]) -> int | None:
    try:
        value = getter()
    except OSError:  # no creation time in a v4 filesystem
        return None
    return int(value) if value else None
