"""The cache directory: created private (0700, every file in it 0600, whatever the
umask) or checked before use, on a filesystem that can punch holes, which is how
evicted blocks give their space back.

A directory is used only when it is ebsfs's own: it holds ebsfs's CACHEDIR.TAG (written
when ebsfs made or adopted it; backup tools skip such directories), or it is empty, or
it is a cache of an earlier ebsfs (legacy.py). Inside it nothing is reached by path:
every file is opened through a descriptor of its directory with O_NOFOLLOW, and a
symbolic link, a file of another user or a file with a second hard link where ebsfs
keeps its own files refuses the directory. Files ebsfs did not make are never opened,
changed or deleted.

Layout (store.py keeps the blocks in it):

    CACHEDIR.TAG                      the marker (the Cache Directory Tagging Spec)
    index.sqlite (+ -wal, -shm)       the blocks held, (origin, snapshot, index) -> the
                                      SHA-256 the service gave and when last used; each
                                      snapshot's volume size; pairs found unrelated
    blocks/<snapshot>.<origin>.<n>    sparse data files: block i of the snapshot at that
                                      origin (keys.py) lies at byte (i mod 2**21) *
                                      512 KiB of file n = i // 2**21 (1 TiB a file)"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import stat
from dataclasses import dataclass

from ebsfs.diskcache import legacy
from ebsfs.diskcache.keys import DATA_NAME
from ebsfs.errors import CacheDirError

INDEX_NAME = "index.sqlite"
INDEX_FILES = (INDEX_NAME, f"{INDEX_NAME}-wal", f"{INDEX_NAME}-shm", f"{INDEX_NAME}-journal")
DATA_DIR = "blocks"
TAG_NAME = "CACHEDIR.TAG"
TAG = (
    b"Signature: 8a477f597d28d172789f06886806bc55\n"
    b"# This directory is an ebsfs disk cache (--cache-dir): ebsfs made it, and\n"
    b"# deletes in it only the files it made. See https://bford.info/cachedir/\n"
)
_TAG_HEAD = TAG[: TAG.index(b"cache (")]
_TAG_TEMP = re.compile(r"\.CACHEDIR\.TAG\.[0-9a-f]{16}")
NOFOLLOW = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
"""Flags of every open inside the directory: no symbolic link followed, no FIFO waited on."""


@dataclass
class CacheDir:
    """An open cache directory: its path (messages, SQLite) and descriptors of it and
    of its data directory, through which every other file in it is reached."""

    path: str
    fd: int
    data_fd: int

    def close(self) -> None:
        for fd in (self.data_fd, self.fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def prepare(path: str) -> str:
    """Create the cache directory or check an existing one (see open_dir). Returns its
    absolute path; raises CacheDirError naming the problem."""
    opened = open_dir(path)
    opened.close()
    return opened.path


def open_dir(path: str) -> CacheDir:
    """The cache directory, made (0700, tagged) or checked: ours, ebsfs's (tagged,
    empty or a legacy cache), nothing but ebsfs's regular files where ebsfs keeps
    them, on a filesystem that can punch holes. Raises CacheDirError."""
    path = os.path.abspath(os.path.expanduser(path))
    fds: list[int] = []
    try:
        if not os.path.lexists(path):
            _make_parents(path)
            with contextlib.suppress(FileExistsError):
                os.mkdir(path, 0o700)
        try:  # the directory named may be a symbolic link: the user's choice
            fds.append(os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        except NotADirectoryError:
            raise CacheDirError(f"cache directory {path} is not a directory") from None
        fd = fds[0]
        uid = os.fstat(fd).st_uid
        if uid != os.geteuid():
            raise CacheDirError(
                f"cache directory {path} belongs to uid {uid}, not to you: use a "
                "directory of your own"
            )
        _adopt(path, fd)
        os.fchmod(fd, 0o700)
        fds.append(_data_dir(path, fd))
        _check_files(path, fd, fds[1])
        _check_hole_punching(path, fd)
        return CacheDir(path, fd, fds[1])
    except BaseException as err:
        for fd in fds:
            os.close(fd)
        if isinstance(err, OSError):
            raise CacheDirError(f"cache directory {path}: {err.strerror or err}") from err
        raise


def _adopt(path: str, fd: int) -> None:
    """Check the directory is ebsfs's: tagged, or empty (tagged now), or a legacy
    cache (emptied of ebsfs's files, then tagged)."""
    entries = [name for name in os.listdir(fd) if not _TAG_TEMP.fullmatch(name)]
    if TAG_NAME in entries:
        _check_tag(path, fd)
        return
    if entries:
        if not legacy.is_legacy(fd, entries):
            raise CacheDirError(
                f"cache directory {path} is not empty and is not an ebsfs cache: give "
                "an empty or new directory"
            )
        os.fchmod(fd, 0o700)
        legacy.clear(path, fd)
    os.fchmod(fd, 0o700)  # before the tag: nobody else may add files any more
    _write_tag(path, fd)


def _check_tag(path: str, fd: int) -> None:
    try:
        tag_fd = os.open(TAG_NAME, os.O_RDONLY | NOFOLLOW, dir_fd=fd)
    except OSError:
        head = b""
    else:
        try:
            head = os.read(tag_fd, len(_TAG_HEAD)) if is_ours(os.fstat(tag_fd)) else b""
        finally:
            os.close(tag_fd)
    if head != _TAG_HEAD:
        raise CacheDirError(
            f"cache directory {path} is not an ebsfs cache (its {TAG_NAME} is another "
            "program's): give an empty or new directory"
        )


def _write_tag(path: str, fd: int) -> None:
    """The tag, whole or not at all (linked from a temporary file: another process may
    be adopting the same empty directory)."""
    temp = f".{TAG_NAME}.{secrets.token_hex(8)}"
    temp_fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o600, dir_fd=fd)
    try:
        try:
            os.fchmod(temp_fd, 0o600)
            os.write(temp_fd, TAG)
        finally:
            os.close(temp_fd)
        with contextlib.suppress(FileExistsError):
            os.link(temp, TAG_NAME, src_dir_fd=fd, dst_dir_fd=fd, follow_symlinks=False)
    finally:
        os.unlink(temp, dir_fd=fd)
    _check_tag(path, fd)


def _data_dir(path: str, fd: int) -> int:
    """The data directory, made or opened (never through a symbolic link), private."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(DATA_DIR, 0o700, dir_fd=fd)
    try:
        data_fd = os.open(DATA_DIR, os.O_RDONLY | os.O_DIRECTORY | NOFOLLOW, dir_fd=fd)
    except OSError as err:
        if err.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        data_fd = -1
    if data_fd < 0 or os.fstat(data_fd).st_uid != os.geteuid():
        if data_fd >= 0:
            os.close(data_fd)
        raise CacheDirError(
            f"cache directory {path}: {DATA_DIR} is not a directory ebsfs made (a "
            "symbolic link, a file or another user's): refusing to use the cache"
        )
    os.fchmod(data_fd, 0o700)
    return data_fd


def _check_files(path: str, fd: int, data_fd: int) -> None:
    """Where ebsfs keeps its files, only regular files of ours with one link each."""
    places = [(fd, name, name) for name in INDEX_FILES]
    places += [
        (data_fd, name, f"{DATA_DIR}/{name}")
        for name in os.listdir(data_fd)
        if DATA_NAME.fullmatch(name)
    ]
    for dir_fd, name, shown in places:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if not is_ours(st):
            raise CacheDirError(
                f"cache directory {path}: {shown} is not a file ebsfs made "
                f"({not_ours(st)}): refusing to use the cache"
            )


def is_ours(st: os.stat_result) -> bool:
    """A regular file of ours with no other name (a hard link would let a punched hole
    or a deletion reach a file outside the cache)."""
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_nlink == 1


def not_ours(st: os.stat_result) -> str:
    """Why is_ours said no, in a few words."""
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}"
    return f"{st.st_nlink} hard links"


def _make_parents(path: str) -> None:
    """The missing parents of `path`, as `mkdir -p` makes them: the umask's mode plus
    write and search for their owner (os.makedirs under a umask such as 0277 makes a
    parent its own creator cannot enter)."""
    missing = []
    parent = os.path.dirname(path)
    while parent and not os.path.exists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    for directory in reversed(missing):
        try:
            os.mkdir(directory)
        except FileExistsError:
            continue
        os.chmod(directory, stat.S_IMODE(os.stat(directory).st_mode) | 0o300)


def private_file(name: str, dir_fd: int, create: bool = True) -> int:
    """Open (or create, 0600 whatever the umask) one of ebsfs's files in the directory
    of `dir_fd`, read-write; OSError when it is not a regular file of ours with one link
    (a symbolic link fails to open: ELOOP)."""
    flags = os.O_RDWR | NOFOLLOW | (os.O_CREAT if create else 0)
    fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not is_ours(st):
            raise OSError(errno.EPERM, f"{name} is not a file ebsfs made ({not_ours(st)})")
        os.fchmod(fd, 0o600)  # whatever the umask took away or an earlier mode was
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_hole_punching(path: str, fd: int) -> None:
    probe = f".probe-{secrets.token_hex(8)}"
    probe_fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o600, dir_fd=fd)
    try:
        os.pwrite(probe_fd, b"\1" * 4096, 0)
        try:
            punch_hole(probe_fd, 0, 4096)
        except OSError as err:
            if err.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise CacheDirError(
                    f"cache directory {path}: its filesystem cannot punch holes in files "
                    "(needed to evict blocks); use one on ext4, XFS, btrfs or tmpfs"
                ) from err
            raise
    finally:
        os.close(probe_fd)
        os.unlink(probe, dir_fd=fd)


_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_FALLOC_FL_KEEP_SIZE = 1
_FALLOC_FL_PUNCH_HOLE = 2


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free the file's blocks in [offset, offset+length), keeping its size (fallocate(2);
    Python has no wrapper for it)."""
    if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
