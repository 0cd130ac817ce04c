"""Cache directories of ebsfs before issue 26 (index format 1, no CACHEDIR.TAG): their
blocks are keyed by snapshot id and index only, so which endpoint each came from is
not known, and none can be kept (serving them could give one server's bytes for
another's snapshot). Such a directory, recognised strictly (nothing in it but the
files that ebsfs made, each a regular file of ours with one link), is emptied and
becomes a cache of today's format; anything else is not adopted."""

from __future__ import annotations

import logging
import os
import re
import stat

log = logging.getLogger(__name__)

# The layout of format 1, frozen: it is history.
_INDEX_FILES = frozenset(
    {"index.sqlite", "index.sqlite-wal", "index.sqlite-shm", "index.sqlite-journal"}
)
_DATA_DIR = "blocks"
_DATA_NAME = re.compile(r"snap-[0-9a-f]{1,59}\.\d{1,9}")
_PROBE = re.compile(r"\.probe-\d+-\d+")
_SQLITE_HEADER = b"SQLite format 3\x00"
_NOFOLLOW = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _ours(dir_fd: int, name: str, kind: int = stat.S_IFREG) -> bool:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return False
    if stat.S_IFMT(st.st_mode) != kind or st.st_uid != os.geteuid():
        return False
    return kind != stat.S_IFREG or st.st_nlink == 1


def _data_files(fd: int) -> list[str] | None:
    """The names in the old data directory, or None when it is not only ebsfs's."""
    if not _ours(fd, _DATA_DIR, stat.S_IFDIR):
        return None
    data_fd = os.open(_DATA_DIR, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW, dir_fd=fd)
    try:
        names = os.listdir(data_fd)
        if all(_DATA_NAME.fullmatch(n) and _ours(data_fd, n) for n in names):
            return names
        return None
    finally:
        os.close(data_fd)


def is_legacy(fd: int, entries: list[str]) -> bool:
    """Whether the directory of `fd`, holding `entries`, is an ebsfs cache of format 1
    and nothing else: an SQLite index, the data directory, the files of both."""
    if "index.sqlite" not in entries:
        return False
    for name in entries:
        if name == _DATA_DIR:
            if _data_files(fd) is None:
                return False
        elif not ((name in _INDEX_FILES or _PROBE.fullmatch(name)) and _ours(fd, name)):
            return False
    index_fd = os.open("index.sqlite", os.O_RDONLY | _NOFOLLOW, dir_fd=fd)
    try:
        return os.read(index_fd, len(_SQLITE_HEADER)) == _SQLITE_HEADER
    finally:
        os.close(index_fd)


def clear(path: str, fd: int) -> None:
    """Delete the legacy cache's files (each checked again just before), leaving the
    directory empty; OSError when something else appeared in it meanwhile."""
    if _DATA_DIR in os.listdir(fd):
        names = _data_files(fd)
        if names is None:
            raise OSError(f"{_DATA_DIR} changed while it was being emptied")
        data_fd = os.open(_DATA_DIR, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW, dir_fd=fd)
        try:
            for name in names:
                if _ours(data_fd, name):
                    os.unlink(name, dir_fd=data_fd)
        finally:
            os.close(data_fd)
        os.rmdir(_DATA_DIR, dir_fd=fd)  # fails if anything is left: then not adopted
    for name in os.listdir(fd):
        if (name in _INDEX_FILES or _PROBE.fullmatch(name)) and _ours(fd, name):
            os.unlink(name, dir_fd=fd)
    log.warning(
        "cache directory %s was made by an earlier ebsfs, whose cached blocks do not "
        "say which endpoint they came from: emptied, starting afresh",
        path,
    )
