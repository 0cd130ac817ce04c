"""The cache directory: created private (0700, every file in it 0600, whatever the
umask) or checked before use (ours, private, an ebsfs cache or empty), on a filesystem
that can punch holes, which is how evicted blocks give their space back.

Layout (store.py keeps the blocks in it):

    index.sqlite (+ -wal, -shm)  the blocks held, (snapshot, index) -> the SHA-256 the
                                 service gave and when last used; each snapshot's volume
                                 size (lineage candidates); pairs found unrelated
    blocks/<snapshot-id>.<n>     sparse data files: block i of the snapshot lies at byte
                                 (i mod 2**21) * 512 KiB of file n = i // 2**21 (1 TiB
                                 a file, within every filesystem's file size limit)"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
import threading

from ebsfs.errors import CacheDirError

INDEX_NAME = "index.sqlite"
DATA_DIR = "blocks"


def prepare(path: str) -> str:
    """Create the cache directory (0700) or check an existing one: ours, private, an
    ebsfs cache or empty, on a filesystem that can punch holes. Returns its absolute
    path; raises CacheDirError naming the problem."""
    path = os.path.abspath(os.path.expanduser(path))
    try:
        if not os.path.exists(path):
            _make_parents(path)
            with contextlib.suppress(FileExistsError):
                os.mkdir(path, 0o700)
        st = os.stat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise CacheDirError(f"cache directory {path} is not a directory")
        if st.st_uid != os.geteuid():
            raise CacheDirError(
                f"cache directory {path} belongs to uid {st.st_uid}, not to "
                "you: use a directory of your own"
            )
        entries = set(os.listdir(path))
        if entries and INDEX_NAME not in entries and DATA_DIR not in entries:
            raise CacheDirError(
                f"cache directory {path} is not empty and is not an ebsfs "
                "cache: give an empty or new directory"
            )
        os.chmod(path, 0o700)
        private_dir(os.path.join(path, DATA_DIR))
        _check_hole_punching(path)
    except OSError as err:
        raise CacheDirError(f"cache directory {path}: {err.strerror or err}") from err
    return path


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


def private_dir(path: str) -> None:
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    os.chmod(path, 0o700)


def private_file(path: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)  # whatever the umask took away or an earlier mode was
    return fd


def _check_hole_punching(path: str) -> None:
    probe = os.path.join(path, f".probe-{os.getpid()}-{threading.get_ident()}")
    fd = private_file(probe)
    try:
        os.pwrite(fd, b"\1" * 4096, 0)
        try:
            punch_hole(fd, 0, 4096)
        except OSError as err:
            if err.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise CacheDirError(
                    f"cache directory {path}: its filesystem cannot punch holes in files "
                    "(needed to evict blocks); use one on ext4, XFS, btrfs or tmpfs"
                ) from err
            raise
    finally:
        os.close(fd)
        os.unlink(probe)


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
