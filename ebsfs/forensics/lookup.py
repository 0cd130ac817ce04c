"""One path of a filesystem, from its metadata: the readers of fsread.py and xfsread.py
asked for the entry at a path, reading only the directories on it and the entry's own
record (never a whole tree), for `ebsfs history`. A deleted name is no name: only
allocated entries are followed."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ebsfs.errors import FilesystemUnreadable
from ebsfs.forensics.fsread import (
    DIRECTORY,
    FILE,
    LIBRARY_ERRORS,
    MAX_PATH,
    OTHER,
    Entry,
    PagedReader,
    PositionalReader,
    TskWalker,
    Unreadables,
    one_line,
    raise_read_failure,
    tsk_open,
)


def split_path(path: str) -> list[str]:
    """A path inside a filesystem as its names ('/' and '' are the root). '..' is
    refused: a lookup never climbs, so a path means one thing in every snapshot."""
    if len(path) > MAX_PATH:
        raise ValueError(f"a path of over {MAX_PATH} characters")
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ValueError("'..' in the path: give it without")
    return parts


HASH_PIECE = 1024 * 1024
"""Bytes of a file read and hashed at once (`--hash`): memory stays this whatever the
file's size."""

Reader = Callable[[int, int], bytes]
"""read(offset, size) of a file's data, through its library."""


@dataclass
class Found:
    """What a lookup found: the filesystem's type, the entry (None: no such name) and,
    when asked and it is a regular file, the SHA-256 of its data (hex)."""

    fstype: str
    entry: Entry | None
    sha256: str | None = None
    note: str | None = None
    """Why a file asked to be hashed was not."""


def lookup(source: PositionalReader, parts: list[str], hash_data: bool = False) -> Found:
    """The entry at the path `parts` (`split_path`) of the filesystem in `source`, None
    where no allocated name leads to it. A symlink on the way is not followed (None).
    Kinds other than file, directory and symlink come as OTHER. With `hash_data`, a
    regular file's data is read through its library (its blocks only, and the
    metadata that maps them) and hashed. Raises FilesystemUnreadable (unknown,
    unsupported or damaged); a failed read of the snapshot raises the engine's error."""
    reader = PagedReader(source)
    try:
        if reader.pread(4, 0) == b"XFSB":
            from ebsfs.forensics.xfsread import xfs_lookup

            entry, handle = xfs_lookup(reader, parts)
            found = Found("xfs", entry)

            def read(offset: int, size: int) -> bytes:
                return bytes(handle.read_buffer_at_offset(size, offset))
        else:
            (pytsk3, fs), fstype = tsk_open(reader)
            walker = TskWalker(pytsk3, fs, fstype, None, Unreadables(reader))
            entry, handle = _tsk_find(walker, parts)
            found = Found(fstype, entry)

            def read(offset: int, size: int) -> bytes:
                return bytes(handle.read_random(offset, size))

        if hash_data and entry is not None and entry.kind == FILE:
            if entry.size > reader.size:
                found.note = (
                    f"not hashed: it claims {entry.size} bytes, more than its "
                    "filesystem holds (sparse, or damaged)"
                )
            else:
                found.sha256 = hash_reads(read, entry.size)
    except FilesystemUnreadable:
        raise_read_failure(reader)
        raise
    except LIBRARY_ERRORS as err:
        raise_read_failure(reader)
        raise FilesystemUnreadable(f"damaged or unreadable: {one_line(err)}") from err
    raise_read_failure(reader)
    return found


def hash_reads(read: Reader, size: int) -> str:
    """SHA-256 of a file's `size` bytes, HASH_PIECE at a time. A library that gives
    fewer bytes than the size promised is damage, not a shorter file."""
    digest = hashlib.sha256()
    for offset in range(0, size, HASH_PIECE):
        want = min(HASH_PIECE, size - offset)
        data = read(offset, want)
        if len(data) != want:
            raise ValueError(f"its data ends at {offset + len(data)} of {size} bytes")
        digest.update(data)
    return digest.hexdigest()


def _tsk_find(walker: TskWalker, parts: list[str]) -> tuple[Entry | None, Any]:
    """The entry at `parts` through The Sleuth Kit (and its file, to read): each
    directory on the path listed once, the first allocated name that matches exactly
    taken."""
    if not parts:
        root = walker.fs.open_meta(inode=walker.root)
        return walker._entry(root, DIRECTORY), root
    directory = walker.root
    for k, name in enumerate(parts):
        child = _tsk_child(walker, directory, name)
        if child is None:
            return None, None
        kind = walker.kinds.get(int(child.info.meta.type), OTHER)
        if k == len(parts) - 1:
            return walker._entry(child, kind), child
        if kind != DIRECTORY:
            return None, None
        directory = int(child.info.meta.addr)
    return None, None


def _tsk_child(walker: TskWalker, directory: int, name: str) -> Any | None:
    for child in walker.fs.open_dir(inode=directory):
        info = child.info.name
        if child.info.meta is None or not int(info.flags) & walker.allocated:
            continue
        if info.name.decode("utf-8", "surrogateescape") == name:
            return child
    return None
