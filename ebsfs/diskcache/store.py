"""A persistent, verified block cache on local disk, behind the memory cache: blocks
fetched are kept across sessions and served again only after their SHA-256 checks.
Any number of processes (mounts, `ebsfs.open`, other commands) may share one
directory at once.

Layout of the directory (0700; every file in it 0600, whatever the umask):

    index.sqlite (+ -wal, -shm)  the blocks held, (snapshot, index) -> the SHA-256 the
                                 service gave and when last used; each snapshot's volume
                                 size (lineage candidates); pairs found unrelated
    blocks/<snapshot-id>.<n>     sparse data files: block i of the snapshot lies at byte
                                 (i mod 2**21) * 512 KiB of file n = i // 2**21 (1 TiB
                                 a file, within every filesystem's file size limit)

Why not a library such as python-diskcache (Apache-2.0, licence-compatible): it keeps
a value this big as a file of its own (32,768 files for 16 GiB), returns bytes (a copy,
where a hit here is read straight into the memory cache's slab with preadv), updates
SQLite on every read to keep its LRU, and knows nothing of checksums. Sparse files
with hole punching make the space used exactly the blocks held (st_blocks), and
SQLite (in the standard library) gives the index crash safety and multi-process
locking for free.

Rules that keep it correct whatever happens to the files:
- A block is served from disk only when the SHA-256 of the bytes read equals the
  checksum stored with it. A location only ever holds one block's bytes (snapshots
  never change), so damage anywhere, index included, can cost a fetch, never serve
  wrong bytes.
- Every change is one SQLite write transaction (BEGIN IMMEDIATE: one writer at a time,
  across processes): a store evicts what it must (rows deleted, holes punched),
  writes the data, inserts its row, commits. Outside a transaction the data allocated
  is exactly the rows; a process killed inside one leaves data with no row, which the
  next open punches away.
- Loads take no lock. A mismatch is checked again inside a write transaction (when no
  process can evict) before the entry is called damaged: another process may have
  evicted the block between our lookup and our read.

Blocking: the DiskCache methods do file and SQLite I/O; the engine calls them from
worker threads (DiskTier)."""

from __future__ import annotations

import base64
import contextlib
import ctypes
import errno
import hashlib
import logging
import os
import re
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import trio

from ebsfs.constants import BLOCK_SIZE
from ebsfs.engine.index import ChangeIndex
from ebsfs.engine.stats import Stats
from ebsfs.errors import CacheDirError, EbsfsError
from ebsfs.service.api import Block

log = logging.getLogger(__name__)

INDEX_NAME = "index.sqlite"
DATA_DIR = "blocks"
FORMAT = "1"
SHARD_BLOCKS = 2**21
SHARD_BYTES = SHARD_BLOCKS * BLOCK_SIZE
DEFAULT_SIZE = 16 * 1024**3
MIN_SIZE = 1024**2
FREE_RESERVE = 1024**3
"""Free space the cache leaves on its filesystem (at most a tenth of it)."""
BUSY_TIMEOUT = 5.0
"""Seconds to wait for another process's write transaction before giving up one store."""
TOUCH_BATCH = 8192
"""Uses of blocks remembered at most before they are written to the index (LRU order)."""
WARNINGS_SHOWN = 5
"""Damaged entries warned about one by one; the rest only count (and log at -v)."""
_DATA_NAME = re.compile(r"^(snap-[0-9a-f]{1,59})\.(\d+)$")
_SNAPSHOT_ID = re.compile(r"^snap-[0-9a-f]{1,59}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS snapshots (
    snapshot TEXT PRIMARY KEY, volume_size INTEGER NOT NULL, used REAL NOT NULL);
CREATE TABLE IF NOT EXISTS blocks (
    snapshot TEXT NOT NULL, idx INTEGER NOT NULL, checksum TEXT NOT NULL,
    used REAL NOT NULL, PRIMARY KEY (snapshot, idx)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS blocks_by_use ON blocks (used);
CREATE TABLE IF NOT EXISTS unrelated (
    first TEXT NOT NULL, second TEXT NOT NULL, PRIMARY KEY (first, second)) WITHOUT ROWID;
"""


class _IndexFailed(Exception):
    """SQLite failed in a way retrying will not mend (a damaged or unwritable index)."""


# ---- the directory -------------------------------------------------------------------


def prepare(path: str) -> str:
    """Create the cache directory (0700) or check an existing one: ours, private, an
    ebsfs cache or empty, on a filesystem that can punch holes. Returns its absolute
    path; raises CacheDirError naming the problem."""
    path = os.path.abspath(os.path.expanduser(path))
    try:
        if not os.path.exists(path):
            os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.stat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise CacheDirError(f"cache directory {path} is not a directory")
        if st.st_uid != os.geteuid():
            raise CacheDirError(f"cache directory {path} belongs to uid {st.st_uid}, not to "
                                "you: use a directory of your own")
        entries = set(os.listdir(path))
        if entries and INDEX_NAME not in entries and DATA_DIR not in entries:
            raise CacheDirError(f"cache directory {path} is not empty and is not an ebsfs "
                                "cache: give an empty or new directory")
        os.chmod(path, 0o700)
        _private_dir(os.path.join(path, DATA_DIR))
        _check_hole_punching(path)
    except OSError as err:
        raise CacheDirError(f"cache directory {path}: {err.strerror or err}") from err
    return path


def _private_dir(path: str) -> None:
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    os.chmod(path, 0o700)


def _private_file(path: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)  # whatever the umask took away or an earlier mode was
    return fd


def _check_hole_punching(path: str) -> None:
    probe = os.path.join(path, f".probe-{os.getpid()}-{threading.get_ident()}")
    fd = _private_file(probe)
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


def _checksum(data: bytes | bytearray | memoryview) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def _connect(db_path: str, writer: bool = True) -> sqlite3.Connection:
    conn = sqlite3.connect(db_path, timeout=BUSY_TIMEOUT, isolation_level=None,
                           check_same_thread=False)
    if not writer:
        return conn
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")  # the checksums catch what a power cut loses
    conn.execute(f"PRAGMA journal_size_limit={4 * 1024**2}")
    return conn


@contextlib.contextmanager
def _index(path: str) -> Iterator[sqlite3.Connection | None]:
    """A short-lived connection to the index for the checks before mounting, or None
    when there is no index yet. Closed before the mount forks."""
    db_path = os.path.join(path, INDEX_NAME)
    if not os.path.exists(db_path):
        yield None
        return
    conn = sqlite3.connect(db_path, timeout=BUSY_TIMEOUT, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


def lineage_candidates(path: str, snapshot_id: str, volume_size: int,
                       exclude: set[str], limit: int = 16) -> list[str]:
    """Snapshots of the same volume size with blocks in the cache, most recently used
    first, except those known to be unrelated to `snapshot_id`. A damaged index just
    offers none (opening the cache will mend it)."""
    try:
        with _index(path) as conn:
            if conn is None:
                return []
            rows = conn.execute(
                "SELECT s.snapshot FROM snapshots s WHERE s.volume_size = ? "
                "AND s.snapshot != ? AND EXISTS (SELECT 1 FROM blocks b WHERE "
                "b.snapshot = s.snapshot) AND NOT EXISTS (SELECT 1 FROM unrelated u "
                "WHERE u.first = s.snapshot AND u.second = ?) ORDER BY s.used DESC LIMIT ?",
                (volume_size, snapshot_id, snapshot_id, limit + len(exclude)),
            ).fetchall()
    except sqlite3.Error as err:
        log.info("cache index in %s not readable for lineage (%s): no reuse", path, err)
        return []
    return [r[0] for r in rows if r[0] not in exclude][:limit]


def record_unrelated(path: str, first: str, second: str) -> None:
    """Remember that two snapshots share no lineage: never asked again."""
    try:
        with _index(path) as conn:
            if conn is not None:
                conn.execute("INSERT OR IGNORE INTO unrelated VALUES (?, ?)", (first, second))
    except sqlite3.Error as err:
        log.debug("could not record %s and %s as unrelated: %s", first, second, err)


# ---- the cache -----------------------------------------------------------------------


@dataclass(frozen=True)
class Loaded:
    """What a load found: the checksum of a verified hit, or why there was none."""

    checksum: str | None = None
    damaged: bool = False
    data: memoryview | None = None


MISS = Loaded()


BlockKey = tuple[str, int]
"""(snapshot id, block index)."""


@dataclass(frozen=True)
class ToStore:
    """A verified block waiting to be written."""

    snapshot_id: str
    index: int
    volume_size: int
    data: bytes | memoryview
    checksum: str


@dataclass
class Stored:
    """What a batch of stores did."""

    stored: list[BlockKey] = field(default_factory=list)
    present: list[BlockKey] = field(default_factory=list)
    """Stored already (by another process)."""
    evicted: list[BlockKey] = field(default_factory=list)
    full: bool = False
    """The filesystem had no room for some (ENOSPC): they were not kept."""


class DiskCache:
    """The blocks of a cache directory, bounded by `max_bytes` of allocated space
    (index included) and by the free space of its filesystem, least recently used out
    first. Thread-safe; every method blocks (call from worker threads)."""

    def __init__(self, path: str, max_bytes: int = DEFAULT_SIZE,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = prepare(path)
        self.max_bytes = max_bytes
        self._db_path = os.path.join(self.path, INDEX_NAME)
        self._data_dir = os.path.join(self.path, DATA_DIR)
        self._clock = clock
        self._fds: dict[tuple[str, int], int] = {}
        self._fd_lock = threading.Lock()
        self._touched: dict[tuple[str, int], float] = {}
        self._touch_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self.used_bytes = 0
        """Allocated by blocks and index, as of the last change this process made."""
        self.limit_bytes = max_bytes
        """What the cache may hold now: max_bytes, or less when free space is short."""
        self.blocks = 0
        self._closed = False
        try:
            try:
                self._open()
            except sqlite3.OperationalError:
                raise  # busy or unwritable: not damage, and maybe another process's
            except (sqlite3.DatabaseError, _IndexFailed) as err:
                log.warning("cache index %s is damaged (%s): starting with an empty cache",
                            self._db_path, err)
                self._reset()
                self._open()
        except (sqlite3.Error, _IndexFailed, OSError) as err:
            self._close_connections()
            raise CacheDirError(f"cache directory {self.path}: cannot open its index: "
                                f"{getattr(err, 'strerror', None) or err}") from err

    # ---- opening ---------------------------------------------------------------------

    def _open(self) -> None:
        os.close(_private_file(self._db_path))
        self._writer = _connect(self._db_path)
        self._reader_conn = _connect(self._db_path, writer=False)
        for suffix in ("-wal", "-shm"):  # SQLite gives them the index's mode; be sure
            with contextlib.suppress(FileNotFoundError):
                os.chmod(self._db_path + suffix, 0o600)
        check = self._writer.execute("PRAGMA quick_check").fetchone()
        if check is None or check[0] != "ok":
            raise _IndexFailed(f"integrity check: {check[0] if check else 'no answer'}")
        with self._transaction() as conn:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            found = conn.execute("SELECT value FROM meta WHERE key='format'").fetchone()
            if found is None:
                conn.execute("INSERT INTO meta VALUES ('format', ?)", (FORMAT,))
            elif found[0] != FORMAT:
                raise _IndexFailed(f"format {found[0]!r}, this ebsfs writes {FORMAT!r}")
            self._reconcile(conn)

    def _reset(self) -> None:
        """Throw the cache away: a damaged index cannot say which data is good."""
        self._close_connections()
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._db_path + suffix)
        with self._fd_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
        for name in os.listdir(self._data_dir):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self._data_dir, name))

    def _reconcile(self, conn: sqlite3.Connection) -> None:
        """Inside a write transaction: count the rows, and punch away data that has no
        row (a process killed while storing), so the space used is the rows."""
        self.blocks = conn.execute("SELECT count(*) FROM blocks").fetchone()[0]
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('blocks', ?)", (str(self.blocks),))
        punched = 0
        for name in os.listdir(self._data_dir):
            match = _DATA_NAME.match(name)
            file_path = os.path.join(self._data_dir, name)
            if match is None:
                os.unlink(file_path)
                continue
            snapshot_id, shard = match[1], int(match[2])
            first = shard * SHARD_BLOCKS
            held = {row[0] - first for row in conn.execute(
                "SELECT idx FROM blocks WHERE snapshot = ? AND idx >= ? AND idx < ?",
                (snapshot_id, first, first + SHARD_BLOCKS))}
            fd = os.open(file_path, os.O_RDWR | os.O_CLOEXEC)
            try:
                os.fchmod(fd, 0o600)
                for block in _allocated_blocks(fd):
                    if block not in held:
                        punch_hole(fd, block * BLOCK_SIZE, BLOCK_SIZE)
                        punched += 1
            finally:
                os.close(fd)
        if punched:
            log.info("cache %s: %d partly written blocks with no index entry freed "
                     "(a process was stopped while storing)", self.path, punched)
        self._update_usage(conn)

    # ---- connections and files -------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: this process's threads one at a time, other
        processes waiting up to BUSY_TIMEOUT."""
        with self._write_lock:
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _fd(self, snapshot_id: str, shard: int, volume_size: int | None = None) -> int | None:
        """The data file of one shard, opened once; created (sparse, its full size, so
        writes never extend it) only when `volume_size` is given."""
        key = (snapshot_id, shard)
        with self._fd_lock:
            fd = self._fds.get(key)
            if fd is not None:
                return fd
            file_path = os.path.join(self._data_dir, f"{snapshot_id}.{shard}")
            if volume_size is None:
                try:
                    fd = os.open(file_path, os.O_RDWR | os.O_CLOEXEC)
                except FileNotFoundError:
                    return None
            else:
                fd = _private_file(file_path)
                size = min(SHARD_BYTES, volume_size - shard * SHARD_BYTES)
                if os.fstat(fd).st_size < size:
                    # A full-size sparse file: no writes past its end, so no filesystem
                    # preallocates space beyond it (XFS does for growing files).
                    os.ftruncate(fd, size)
            self._fds[key] = fd
            return fd

    def _update_usage(self, conn: sqlite3.Connection) -> None:
        self.blocks = int(conn.execute("SELECT value FROM meta WHERE key='blocks'").fetchone()[0])
        index_bytes = self._index_bytes()
        self.used_bytes = self.blocks * BLOCK_SIZE + index_bytes
        try:
            fs = os.statvfs(self.path)
        except OSError:
            self.limit_bytes = self.max_bytes
            return
        reserve = min(FREE_RESERVE, fs.f_blocks * fs.f_frsize // 10)
        room = self.used_bytes + fs.f_bavail * fs.f_frsize - reserve
        self.limit_bytes = max(0, min(self.max_bytes, room))

    def _index_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                total += os.stat(self._db_path + suffix).st_blocks * 512
        return total

    # ---- loads -----------------------------------------------------------------------

    def load(self, snapshot_id: str, index: int, room: memoryview | None) -> Loaded:
        """Block `index` of a snapshot read into `room` (or into memory of its own) and
        verified, or a miss, or damaged (dropped: fetch it again)."""
        if self._closed:
            return MISS
        with self._read_lock:
            try:
                row = self._reader_conn.execute(
                    "SELECT checksum FROM blocks WHERE snapshot = ? AND idx = ?",
                    (snapshot_id, index)).fetchone()
            except sqlite3.OperationalError as err:
                log.debug("cache lookup of %s:%d failed: %s", snapshot_id, index, err)
                return MISS
            except sqlite3.DatabaseError as err:
                raise _IndexFailed(str(err)) from err
        if row is None:
            return MISS
        checksum: str = row[0]
        buffer = room if room is not None else memoryview(bytearray(BLOCK_SIZE))
        if self._read_verified(snapshot_id, index, buffer, checksum):
            self._touch(snapshot_id, index)
            return Loaded(checksum, data=buffer)
        return self._check_again(snapshot_id, index, buffer, checksum)

    def _read_verified(self, snapshot_id: str, index: int, buffer: memoryview,
                       checksum: str) -> bool:
        shard, offset = divmod(index, SHARD_BLOCKS)
        try:
            fd = self._fd(snapshot_id, shard)
            if fd is None:
                return False
            read = os.preadv(fd, [buffer], offset * BLOCK_SIZE)
        except OSError as err:
            log.debug("cache read of %s:%d failed: %s", snapshot_id, index, err)
            return False
        return read == BLOCK_SIZE and _checksum(buffer) == checksum

    def _check_again(self, snapshot_id: str, index: int, buffer: memoryview,
                     checksum: str) -> Loaded:
        """Inside a write transaction, where nobody evicts: still the same entry and
        still bad is damage (dropped); gone or replaced was another process evicting."""
        try:
            with self._transaction() as conn:
                row = conn.execute("SELECT checksum FROM blocks WHERE snapshot = ? AND idx = ?",
                                   (snapshot_id, index)).fetchone()
                if row is None or row[0] != checksum:
                    return MISS
                if self._read_verified(snapshot_id, index, buffer, checksum):
                    return Loaded(checksum, data=buffer)
                self._drop(conn, [(snapshot_id, index)])
                self._update_usage(conn)
        except sqlite3.OperationalError as err:  # busy past the timeout: fetch it
            log.debug("cache re-check of %s:%d failed: %s", snapshot_id, index, err)
            return MISS
        except sqlite3.DatabaseError as err:
            raise _IndexFailed(str(err)) from err
        return Loaded(damaged=True)

    def _touch(self, snapshot_id: str, index: int) -> None:
        with self._touch_lock:
            self._touched[(snapshot_id, index)] = self._clock()
            full = len(self._touched) >= TOUCH_BATCH
        if full:  # the engine flushes them every few seconds; this is for other users
            self.flush_touches()

    def _write_touches(self, conn: sqlite3.Connection) -> None:
        with self._touch_lock:
            touched, self._touched = self._touched, {}
        if touched:
            conn.executemany("UPDATE blocks SET used = ? WHERE snapshot = ? AND idx = ?",
                             [(t, s, i) for (s, i), t in touched.items()])
            latest: dict[str, float] = {}
            for (s, _), t in touched.items():
                latest[s] = max(t, latest.get(s, 0.0))
            conn.executemany("UPDATE snapshots SET used = ? WHERE snapshot = ?",
                             [(t, s) for s, t in latest.items()])

    # ---- stores ----------------------------------------------------------------------

    def store(self, snapshot_id: str, index: int, volume_size: int,
              data: bytes | bytearray | memoryview, checksum: str) -> Stored:
        """Keep one verified block (see store_many)."""
        return self.store_many([ToStore(snapshot_id, index, volume_size, memoryview(data),
                                        checksum)])

    def store_many(self, items: list[ToStore]) -> Stored:
        """Keep verified blocks, evicting the least recently used to make room: one
        transaction for the lot (SQLite's cost per commit, and the write lock, shared)."""
        result = Stored()
        items = [item for item in items if len(item.data) == BLOCK_SIZE
                 and _SNAPSHOT_ID.match(item.snapshot_id)]
        if self._closed or not items:
            return result
        try:
            with self._transaction() as conn:
                self._write_touches(conn)
                new = []
                for item in items:
                    if conn.execute("SELECT 1 FROM blocks WHERE snapshot = ? AND idx = ?",
                                    (item.snapshot_id, item.index)).fetchone():
                        result.present.append((item.snapshot_id, item.index))  # by another
                    else:
                        new.append(item)
                items = new
                self._update_usage(conn)
                budget = (self.limit_bytes - self._index_bytes()) // BLOCK_SIZE
                excess = self.blocks + len(items) - budget
                if excess > 0:
                    victims = conn.execute(
                        "SELECT snapshot, idx FROM blocks ORDER BY used LIMIT ?",
                        (excess,)).fetchall()
                    self._drop(conn, victims)
                    result.evicted = [(s, i) for s, i in victims]
                room = budget - (self.blocks - len(result.evicted))
                items = items[: max(0, room)]
                now = self._clock()
                for item in items:
                    if not self._write(item):
                        result.full = True
                        break
                    result.stored.append((item.snapshot_id, item.index))
                if result.stored:
                    conn.executemany(
                        "INSERT INTO blocks VALUES (?, ?, ?, ?)",
                        [(item.snapshot_id, item.index, item.checksum, now)
                         for item in items[: len(result.stored)]])
                    conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + ? "
                                 "WHERE key = 'blocks'", (len(result.stored),))
                    conn.executemany(
                        "INSERT INTO snapshots VALUES (?, ?, ?) ON CONFLICT (snapshot) "
                        "DO UPDATE SET used = excluded.used",
                        {(item.snapshot_id, item.volume_size, now) for item in items})
                self._update_usage(conn)
        except sqlite3.OperationalError as err:
            # Busy past the timeout, or no room for the index itself: nothing kept.
            log.debug("cache store of %d blocks skipped: %s", len(items), err)
            return Stored(full="full" in str(err))
        except sqlite3.DatabaseError as err:
            raise _IndexFailed(str(err)) from err
        return result

    def _write(self, item: ToStore) -> bool:
        """The block's bytes in its data file; False when the filesystem is full."""
        shard, offset = divmod(item.index, SHARD_BLOCKS)
        fd = self._fd(item.snapshot_id, shard, item.volume_size)
        assert fd is not None
        try:
            written = os.pwrite(fd, item.data, offset * BLOCK_SIZE)
            if written != BLOCK_SIZE:
                raise OSError(errno.ENOSPC, "short write")
        except OSError as err:
            with contextlib.suppress(OSError):
                punch_hole(fd, offset * BLOCK_SIZE, BLOCK_SIZE)
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            return False
        return True

    def held(self, snapshot_id: str) -> list[int]:
        """The indexes of a snapshot's blocks held now."""
        with self._read_lock:
            return [row[0] for row in self._reader_conn.execute(
                "SELECT idx FROM blocks WHERE snapshot = ?", (snapshot_id,))]

    def held_since(self, snapshot_ids: list[str], since: float) -> list[BlockKey]:
        """Blocks of these snapshots stored or used since `since` (by any process)."""
        with self._read_lock:
            rows = self._reader_conn.execute(
                "SELECT snapshot, idx FROM blocks WHERE used >= ?", (since,)).fetchall()
        wanted = set(snapshot_ids)
        return [(s, i) for s, i in rows if s in wanted]

    def flush_touches(self) -> None:
        """Write the uses remembered so far (the LRU order) to the index."""
        with self._touch_lock:
            if not self._touched:
                return
        with contextlib.suppress(sqlite3.OperationalError), self._transaction() as conn:
            self._write_touches(conn)

    def _drop(self, conn: sqlite3.Connection, keys: list[tuple[str, int]]) -> int:
        """Inside a write transaction: forget blocks and free their space."""
        for snapshot_id, index in keys:
            conn.execute("DELETE FROM blocks WHERE snapshot = ? AND idx = ?",
                         (snapshot_id, index))
            shard, offset = divmod(index, SHARD_BLOCKS)
            fd = self._fd(snapshot_id, shard)
            if fd is not None:
                punch_hole(fd, offset * BLOCK_SIZE, BLOCK_SIZE)
        conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) - ? WHERE key = 'blocks'",
                     (len(keys),))
        return len(keys)

    # ---- the end ---------------------------------------------------------------------

    def close(self) -> None:
        """Write the uses not written yet (the LRU order) and close everything."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(sqlite3.Error), self._transaction() as conn:
            self._write_touches(conn)
        self._close_connections()
        with self._fd_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def _close_connections(self) -> None:
        for name in ("_writer", "_reader_conn"):
            conn = getattr(self, name, None)
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
                setattr(self, name, None)


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


# ---- the engine's side ---------------------------------------------------------------


class _Held:
    """Which blocks of one snapshot the disk cache holds, as far as this process knows:
    a bit per block, 1 KiB per 8192 blocks touched (4 GiB of volume). Loads of blocks
    not in it skip the thread hop; a load still checks everything, so a bit set wrongly
    costs a lookup, never a wrong byte."""

    CHUNK = 8192

    def __init__(self, indexes: list[int]) -> None:
        self._chunks: dict[int, bytearray] = {}
        for index in indexes:
            self.add(index)

    def add(self, index: int) -> None:
        chunk, bit = divmod(index, self.CHUNK)
        bits = self._chunks.get(chunk)
        if bits is None:
            bits = self._chunks[chunk] = bytearray(self.CHUNK // 8)
        bits[bit >> 3] |= 1 << (bit & 7)

    def discard(self, index: int) -> None:
        chunk, bit = divmod(index, self.CHUNK)
        bits = self._chunks.get(chunk)
        if bits is not None:
            bits[bit >> 3] &= ~(1 << (bit & 7)) & 0xFF

    def __contains__(self, index: int) -> bool:
        chunk, bit = divmod(index, self.CHUNK)
        bits = self._chunks.get(chunk)
        return bits is not None and bool(bits[bit >> 3] & (1 << (bit & 7)))


class DiskTier:
    """The disk cache as the engine uses it, on the trio thread: loads in worker
    threads (a few at a time: hashing is CPU work), skipped for blocks it knows are not
    there; stores queued and written in batches by one background task (`run`), so
    a fetch never waits on the disk unless the queue is full; the counters; and turned
    off for the rest of the session, with one warning, if the cache fails.

    Memory: at most `queue` blocks wait in the queue and `queue` more are being
    written (their slabs stay alive until written: 1 MiB each at worst, 32 MiB).
    Other processes' stores are noticed every `refresh` seconds."""

    def __init__(self, cache: DiskCache, stats: Stats, max_threads: int = 4,
                 queue: int = 16, refresh: float = 2.0) -> None:
        self.cache = cache
        self.stats = stats
        self.limiter = trio.CapacityLimiter(max_threads)
        self.enabled = True
        self.refresh = refresh
        self._full_warned = False
        self._held: dict[str, _Held] = {}
        self._send, self._receive = trio.open_memory_channel[ToStore](queue)
        self._queued: dict[BlockKey, ToStore] = {}
        self._batch = queue
        self._writing = False
        stats.disk_cache = self.describe

    def track(self, snapshot_ids: list[str]) -> None:
        """Learn which blocks of these snapshots are held (blocking: at build time)."""
        for snapshot_id in snapshot_ids:
            if snapshot_id not in self._held:
                try:
                    self._held[snapshot_id] = _Held(self.cache.held(snapshot_id))
                except sqlite3.Error as err:
                    log.debug("cache index not read for %s: %s", snapshot_id, err)

    def may_hold(self, snapshot_id: str, index: int) -> bool:
        """False only when the block is known not to be held (or queued)."""
        held = self._held.get(snapshot_id)
        return held is None or index in held or (snapshot_id, index) in self._queued

    def describe(self) -> dict[str, object]:
        return {"path": self.cache.path, "used_bytes": self.cache.used_bytes,
                "limit_bytes": self.cache.limit_bytes, "blocks": self.cache.blocks,
                "enabled": self.enabled}

    def _failed(self, err: Exception) -> None:
        """Anything the disk cache raises turns it off, never fails a read."""
        if self.enabled:
            self.enabled = False
            expected = isinstance(err, _IndexFailed | OSError | sqlite3.Error)
            log.warning("disk cache %s turned off for this session (%s: %s); blocks are "
                        "fetched instead", self.cache.path, type(err).__name__, err,
                        exc_info=None if expected else err)

    # ---- loads -----------------------------------------------------------------------

    async def load(self, snapshot_id: str, index: int, room: memoryview | None,
                   lineage: bool = False) -> Block | None:
        """The verified block from disk, or None (a miss, or damage: then fetch)."""
        if not self.enabled:
            return None
        queued = self._queued.get((snapshot_id, index))
        if queued is not None:  # fetched, not written yet: the same verified bytes
            self._hit(lineage)
            return Block(queued.data, queued.checksum)
        held = self._held.get(snapshot_id)
        if held is not None and index not in held:
            return None
        try:
            found = await trio.to_thread.run_sync(
                self.cache.load, snapshot_id, index, room, limiter=self.limiter,
                abandon_on_cancel=True)
        except Exception as err:
            self._failed(err)
            return None
        if found.checksum is None and held is not None:
            held.discard(index)
        if found.damaged:
            self._damaged(snapshot_id, index)
            return None
        if found.checksum is None or found.data is None:
            return None
        self._hit(lineage)
        return Block(found.data, found.checksum)

    def _hit(self, lineage: bool) -> None:
        self.stats.disk_hits += 1
        if lineage:
            self.stats.lineage_hits += 1

    def _damaged(self, snapshot_id: str, index: int) -> None:
        self.stats.disk_damaged += 1
        shown = self.stats.disk_damaged
        if shown <= WARNINGS_SHOWN:
            log.warning("disk cache: block %d of %s failed its SHA-256 check (damaged "
                        "cache file?): dropped, fetching it again%s", index, snapshot_id,
                        "; further damaged blocks are only counted (ebsfs stats)"
                        if shown == WARNINGS_SHOWN else "")
        else:
            log.info("disk cache: block %d of %s damaged: dropped", index, snapshot_id)

    # ---- stores ----------------------------------------------------------------------

    async def store(self, snapshot_id: str, index: int, volume_size: int, block: Block) -> None:
        """Queue a verified block for the writer (waiting only while the queue is
        full); without a writer running, write it now."""
        if not self.enabled or block.checksum is None:
            return
        item = ToStore(snapshot_id, index, volume_size, block.data, block.checksum)
        if not self._writing:
            await self._write_batch([item])
            return
        key = (snapshot_id, index)
        self._queued[key] = item
        try:
            await self._send.send(item)
        except BaseException:
            self._queued.pop(key, None)
            raise

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Write queued blocks in batches, and every few seconds learn what other
        processes stored and write down the uses of blocks read (LRU order)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._refresher)
            self._writing = True
            task_status.started()
            try:
                async for first in self._receive:
                    batch = [first]
                    while len(batch) < self._batch:
                        try:
                            batch.append(self._receive.receive_nowait())
                        except trio.WouldBlock:
                            break
                    with trio.CancelScope(shield=True):  # finish what was taken
                        await self._write_batch(batch)
            finally:
                self._writing = False

    async def _write_batch(self, batch: list[ToStore]) -> None:
        try:
            if self.enabled:
                result = await trio.to_thread.run_sync(self.cache.store_many, batch)
                self._count(result)
        except Exception as err:
            self._failed(err)
        finally:
            for item in batch:
                key = (item.snapshot_id, item.index)
                if self._queued.get(key) is item:
                    del self._queued[key]

    def _count(self, result: Stored) -> None:
        self.stats.disk_stored += len(result.stored)
        self.stats.disk_evicted += len(result.evicted)
        for snapshot_id, index in result.evicted:
            held = self._held.get(snapshot_id)
            if held is not None:
                held.discard(index)
        for snapshot_id, index in result.stored + result.present:
            held = self._held.get(snapshot_id)
            if held is not None:
                held.add(index)
        if result.full and not self._full_warned:
            self._full_warned = True
            log.warning("disk cache %s: its filesystem is full; blocks that do not fit are "
                        "not kept (reads go on)", self.cache.path)

    async def _refresher(self) -> None:
        since = time.time()
        while True:
            await trio.sleep(self.refresh)
            if not self.enabled:
                continue
            now = time.time()
            try:
                found = await trio.to_thread.run_sync(self._refresh, since - 5.0)
            except Exception as err:
                self._failed(err)
                continue
            since = now
            for snapshot_id, index in found:
                self._held[snapshot_id].add(index)

    def _refresh(self, since: float) -> list[BlockKey]:
        self.cache.flush_touches()
        return self.cache.held_since(list(self._held), since)

    def close(self) -> None:
        """Write what is still queued, then close the cache (after the loop ended)."""
        batch = []
        while True:
            try:
                batch.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
        if batch and self.enabled:
            try:
                self._count(self.cache.store_many(batch))
            except Exception as err:
                self._failed(err)
        self._queued.clear()
        self.cache.close()


class DiskView:
    """One snapshot's blocks in the disk cache, and its lineage there: blocks that
    ListChangedBlocks says did not change since an earlier snapshot in the cache are
    served from that snapshot's entries."""

    def __init__(self, tier: DiskTier, snapshot_id: str, volume_size: int,
                 bases: list[tuple[str, ChangeIndex]] | None = None) -> None:
        self.tier = tier
        self.snapshot_id = snapshot_id
        self.volume_size = volume_size
        self.bases = bases or []
        tier.track([snapshot_id, *(base_id for base_id, _ in self.bases)])

    async def load(self, index: int, room: memoryview | None) -> Block | None:
        block = await self.tier.load(self.snapshot_id, index, room)
        if block is not None or not self.tier.enabled:
            return block
        for base_id, changes in self.bases:
            if not self.tier.may_hold(base_id, index):
                continue  # no list call for a block the base does not have here
            try:
                if await changes.changed(index):
                    continue
            except EbsfsError as err:  # no reuse for this block: fetch it
                log.debug("%s: changes since %s not known for block %d: %s",
                          self.snapshot_id, base_id, index, err)
                continue
            block = await self.tier.load(base_id, index, room, lineage=True)
            if block is not None:
                return block
        return None

    async def store(self, index: int, block: Block) -> None:
        await self.tier.store(self.snapshot_id, index, self.volume_size, block)
