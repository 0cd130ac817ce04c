"""A persistent, verified block cache on local disk, behind the memory cache: blocks
fetched are kept across sessions and served again only after their SHA-256 checks.
Any number of processes (mounts, `ebsfs.open`, other commands) may share one
directory at once (its layout: directory.py).

Why not a library such as python-diskcache (Apache-2.0, licence-compatible): it keeps
a value this big as a file of its own (32,768 files for 16 GiB), returns bytes (a copy,
where a hit here is read straight into the memory cache's slab with preadv), updates
SQLite on every read to keep its LRU, and knows nothing of checksums. Sparse files
with hole punching make the space used exactly the blocks held (st_blocks), and
SQLite (in the standard library) gives the index crash safety and multi-process
locking for free.

Rules that keep it correct whatever happens to the files:
- A block is named by where it came from (its origin: the endpoint and region, keys.py)
  as well as by snapshot and index: one cache serves only its own origin's blocks.
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
worker threads (ebsfs/engine/disktier.py)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator

from ebsfs.constants import BLOCK_SIZE
from ebsfs.diskcache.catalog import FORMAT, SCHEMA, connect
from ebsfs.diskcache.directory import INDEX_FILES, INDEX_NAME, is_ours, open_dir, private_file
from ebsfs.diskcache.keys import MISS, SNAPSHOT_ID, BlockKey, Loaded, Origin, Stored, ToStore
from ebsfs.diskcache.shards import ShardFiles
from ebsfs.errors import CacheDirError, CacheIndexFailed

__all__ = ["MISS", "BlockKey", "DiskCache", "Loaded", "Origin", "Stored", "ToStore"]

log = logging.getLogger(__name__)

DEFAULT_SIZE = 16 * 1024**3
MIN_SIZE = 1024**2
FREE_RESERVE = 1024**3
"""Free space the cache leaves on its filesystem (at most a tenth of it)."""
TOUCH_BATCH = 8192
"""Uses of blocks remembered at most before they are written to the index (LRU order)."""


def _checksum(data: bytes | bytearray | memoryview) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


class DiskCache:
    """The blocks of a cache directory, bounded by `max_bytes` of allocated space
    (index included) and by the free space of its filesystem, least recently used out
    first. Serves and stores the blocks of one origin (`origin`: where they are
    fetched from); evicts any origin's. Thread-safe; every method blocks (call from
    worker threads)."""

    def __init__(
        self,
        path: str,
        max_bytes: int = DEFAULT_SIZE,
        clock: Callable[[], float] = time.time,
        *,
        origin: Origin,
    ) -> None:
        self._dir = open_dir(path)
        self.path = self._dir.path
        self.origin = origin
        self._origin = origin.key
        self.max_bytes = max_bytes
        self._db_path = os.path.join(self.path, INDEX_NAME)
        self._clock = clock
        self._shards = ShardFiles(self._dir.data_fd)
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
            except (sqlite3.DatabaseError, CacheIndexFailed) as err:
                log.warning(
                    "cache index %s is damaged (%s): starting with an empty cache",
                    self._db_path,
                    err,
                )
                self._reset()
                self._open()
        except (sqlite3.Error, CacheIndexFailed, OSError) as err:
            self._close_all()
            raise CacheDirError(
                f"cache directory {self.path}: cannot open its index: "
                f"{getattr(err, 'strerror', None) or err}"
            ) from err
        except BaseException:
            self._close_all()
            raise

    # ---- opening ---------------------------------------------------------------------

    def _open(self) -> None:
        # Made (or checked) here as a regular file of ours, never through a link:
        # SQLite would follow one.
        os.close(private_file(INDEX_NAME, self._dir.fd))
        self._writer = connect(self._db_path)
        self._reader_conn = connect(self._db_path, writer=False)
        for name in INDEX_FILES[1:]:  # SQLite gives them the index's mode; be sure
            with contextlib.suppress(FileNotFoundError):
                os.close(private_file(name, self._dir.fd, create=False))
        check = self._writer.execute("PRAGMA quick_check").fetchone()
        if check is None or check[0] != "ok":
            raise CacheIndexFailed(f"integrity check: {check[0] if check else 'no answer'}")
        with self._transaction() as conn:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            found = conn.execute("SELECT value FROM meta WHERE key='format'").fetchone()
            if found is None:
                conn.execute("INSERT INTO meta VALUES ('format', ?)", (FORMAT,))
            elif found[0] != FORMAT:
                if str(found[0]).isdigit() and int(found[0]) > int(FORMAT):
                    raise CacheDirError(
                        f"cache directory {self.path} was made by a newer ebsfs (index "
                        f"format {found[0]}): use another directory"
                    )
                raise CacheIndexFailed(f"format {found[0]!r}, this ebsfs writes {FORMAT!r}")
            conn.execute(
                "INSERT OR IGNORE INTO origins VALUES (?, ?, ?)",
                (self._origin, self.origin.endpoint, self.origin.region),
            )
            self._reconcile(conn)

    def _reset(self) -> None:
        """Throw the cache away: a damaged index cannot say which data is good."""
        self._close_connections()
        for name in INDEX_FILES:
            with contextlib.suppress(FileNotFoundError):
                if is_ours(os.stat(name, dir_fd=self._dir.fd, follow_symlinks=False)):
                    os.unlink(name, dir_fd=self._dir.fd)
        self._shards.remove_all()

    def _reconcile(self, conn: sqlite3.Connection) -> None:
        """Inside a write transaction: count the rows, and punch away data that has no
        row (a process killed while storing), so the space used is the rows."""
        self.blocks = conn.execute("SELECT count(*) FROM blocks").fetchone()[0]
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('blocks', ?)", (str(self.blocks),))

        def held(origin: str, snapshot_id: str, first: int, count: int) -> set[int]:
            return {
                row[0]
                for row in conn.execute(
                    "SELECT idx FROM blocks WHERE origin = ? AND snapshot = ? AND idx >= ? "
                    "AND idx < ?",
                    (origin, snapshot_id, first, first + count),
                )
            }

        punched = self._shards.reconcile(held)
        if punched:
            log.info(
                "cache %s: %d partly written blocks with no index entry freed "
                "(a process was stopped while storing)",
                self.path,
                punched,
            )
        self._update_usage(conn)

    # ---- connections -----------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: this process's threads one at a time, other
        processes waiting up to catalog.BUSY_TIMEOUT."""
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

    def _update_usage(self, conn: sqlite3.Connection) -> None:
        self.blocks = int(conn.execute("SELECT value FROM meta WHERE key='blocks'").fetchone()[0])
        index_bytes = self._index_bytes()
        self.used_bytes = self.blocks * BLOCK_SIZE + index_bytes
        try:
            fs = os.fstatvfs(self._dir.fd)
        except OSError:
            self.limit_bytes = self.max_bytes
            return
        reserve = min(FREE_RESERVE, fs.f_blocks * fs.f_frsize // 10)
        room = self.used_bytes + fs.f_bavail * fs.f_frsize - reserve
        self.limit_bytes = max(0, min(self.max_bytes, room))

    def _index_bytes(self) -> int:
        total = 0
        for name in INDEX_FILES:
            with contextlib.suppress(OSError):
                st = os.stat(name, dir_fd=self._dir.fd, follow_symlinks=False)
                total += st.st_blocks * 512
        return total

    # ---- loads -----------------------------------------------------------------------

    def load(self, snapshot_id: str, index: int, room: memoryview | None) -> Loaded:
        """Block `index` of a snapshot read into `room` (or into memory of its own) and
        verified, or a miss, or damaged (dropped: fetch it again)."""
        if self._closed or not SNAPSHOT_ID.fullmatch(snapshot_id):
            return MISS
        with self._read_lock:
            try:
                row = self._reader_conn.execute(
                    "SELECT checksum FROM blocks WHERE origin = ? AND snapshot = ? AND idx = ?",
                    (self._origin, snapshot_id, index),
                ).fetchone()
            except sqlite3.OperationalError as err:
                log.debug("cache lookup of %s:%d failed: %s", snapshot_id, index, err)
                return MISS
            except sqlite3.DatabaseError as err:
                raise CacheIndexFailed(str(err)) from err
        if row is None:
            return MISS
        checksum: str = row[0]
        buffer = room if room is not None else memoryview(bytearray(BLOCK_SIZE))
        if self._read_verified(snapshot_id, index, buffer, checksum):
            self._touch(snapshot_id, index)
            return Loaded(checksum, data=buffer)
        return self._check_again(snapshot_id, index, buffer, checksum)

    def _read_verified(
        self, snapshot_id: str, index: int, buffer: memoryview, checksum: str
    ) -> bool:
        try:
            read = self._shards.read(self._origin, snapshot_id, index, buffer)
        except OSError as err:
            log.debug("cache read of %s:%d failed: %s", snapshot_id, index, err)
            return False
        return read == BLOCK_SIZE and _checksum(buffer) == checksum

    def _check_again(
        self, snapshot_id: str, index: int, buffer: memoryview, checksum: str
    ) -> Loaded:
        """Inside a write transaction, where nobody evicts: still the same entry and
        still bad is damage (dropped); gone or replaced was another process evicting."""
        try:
            with self._transaction() as conn:
                row = conn.execute(
                    "SELECT checksum FROM blocks WHERE origin = ? AND snapshot = ? AND idx = ?",
                    (self._origin, snapshot_id, index),
                ).fetchone()
                if row is None or row[0] != checksum:
                    return MISS
                if self._read_verified(snapshot_id, index, buffer, checksum):
                    return Loaded(checksum, data=buffer)
                self._drop(conn, [(self._origin, snapshot_id, index)])
                self._update_usage(conn)
        except sqlite3.OperationalError as err:  # busy past the timeout: fetch it
            log.debug("cache re-check of %s:%d failed: %s", snapshot_id, index, err)
            return MISS
        except sqlite3.DatabaseError as err:
            raise CacheIndexFailed(str(err)) from err
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
            conn.executemany(
                "UPDATE blocks SET used = ? WHERE origin = ? AND snapshot = ? AND idx = ?",
                [(t, self._origin, s, i) for (s, i), t in touched.items()],
            )
            latest: dict[str, float] = {}
            for (s, _), t in touched.items():
                latest[s] = max(t, latest.get(s, 0.0))
            conn.executemany(
                "UPDATE snapshots SET used = ? WHERE origin = ? AND snapshot = ?",
                [(t, self._origin, s) for s, t in latest.items()],
            )

    # ---- stores ----------------------------------------------------------------------

    def store(
        self,
        snapshot_id: str,
        index: int,
        volume_size: int,
        data: bytes | bytearray | memoryview,
        checksum: str,
    ) -> Stored:
        """Keep one verified block (see store_many)."""
        return self.store_many(
            [ToStore(snapshot_id, index, volume_size, memoryview(data), checksum)]
        )

    def store_many(self, items: list[ToStore]) -> Stored:
        """Keep verified blocks, evicting the least recently used to make room: one
        transaction for the lot (SQLite's cost per commit, and the write lock, shared)."""
        result = Stored()
        items = [
            item
            for item in items
            if len(item.data) == BLOCK_SIZE and SNAPSHOT_ID.fullmatch(item.snapshot_id)
        ]
        if self._closed or not items:
            return result
        try:
            with self._transaction() as conn:
                self._write_touches(conn)
                new = []
                for item in items:
                    if conn.execute(
                        "SELECT 1 FROM blocks WHERE origin = ? AND snapshot = ? AND idx = ?",
                        (self._origin, item.snapshot_id, item.index),
                    ).fetchone():
                        result.present.append((item.snapshot_id, item.index))  # by another
                    else:
                        new.append(item)
                items = new
                self._update_usage(conn)
                budget = (self.limit_bytes - self._index_bytes()) // BLOCK_SIZE
                excess = self.blocks + len(items) - budget
                if excess > 0:
                    victims = conn.execute(
                        "SELECT origin, snapshot, idx FROM blocks ORDER BY used LIMIT ?",
                        (excess,),
                    ).fetchall()
                    self._drop(conn, victims)
                    result.evicted = [(s, i) for o, s, i in victims if o == self._origin]
                    result.evicted_elsewhere = len(victims) - len(result.evicted)
                room = budget - (self.blocks - len(result.evicted) - result.evicted_elsewhere)
                items = items[: max(0, room)]
                now = self._clock()
                for item in items:
                    if not self._shards.write(
                        self._origin, item.snapshot_id, item.index, item.volume_size, item.data
                    ):
                        result.full = True
                        break
                    result.stored.append((item.snapshot_id, item.index))
                if result.stored:
                    conn.executemany(
                        "INSERT INTO blocks VALUES (?, ?, ?, ?, ?)",
                        [
                            (self._origin, item.snapshot_id, item.index, item.checksum, now)
                            for item in items[: len(result.stored)]
                        ],
                    )
                    conn.execute(
                        "UPDATE meta SET value = CAST(value AS INTEGER) + ? WHERE key = 'blocks'",
                        (len(result.stored),),
                    )
                    conn.executemany(
                        "INSERT INTO snapshots VALUES (?, ?, ?, ?) ON CONFLICT (origin, "
                        "snapshot) DO UPDATE SET used = excluded.used",
                        {(self._origin, item.snapshot_id, item.volume_size, now) for item in items},
                    )
                self._update_usage(conn)
        except sqlite3.OperationalError as err:
            # Busy past the timeout, or no room for the index itself: nothing kept.
            log.debug("cache store of %d blocks skipped: %s", len(items), err)
            return Stored(full="full" in str(err))
        except sqlite3.DatabaseError as err:
            raise CacheIndexFailed(str(err)) from err
        return result

    def held(self, snapshot_id: str) -> list[int]:
        """The indexes of a snapshot's blocks held now."""
        with self._read_lock:
            return [
                row[0]
                for row in self._reader_conn.execute(
                    "SELECT idx FROM blocks WHERE origin = ? AND snapshot = ?",
                    (self._origin, snapshot_id),
                )
            ]

    def held_since(self, snapshot_ids: list[str], since: float) -> list[BlockKey]:
        """Blocks of these snapshots stored or used since `since` (by any process)."""
        with self._read_lock:
            rows = self._reader_conn.execute(
                "SELECT snapshot, idx FROM blocks WHERE used >= ? AND origin = ?",
                (since, self._origin),
            ).fetchall()
        wanted = set(snapshot_ids)
        return [(s, i) for s, i in rows if s in wanted]

    def flush_touches(self) -> None:
        """Write the uses remembered so far (the LRU order) to the index."""
        with self._touch_lock:
            if not self._touched:
                return
        with contextlib.suppress(sqlite3.OperationalError), self._transaction() as conn:
            self._write_touches(conn)

    def _drop(self, conn: sqlite3.Connection, keys: list[tuple[str, str, int]]) -> int:
        """Inside a write transaction: forget blocks (origin, snapshot, index) and free
        their space."""
        for origin, snapshot_id, index in keys:
            conn.execute(
                "DELETE FROM blocks WHERE origin = ? AND snapshot = ? AND idx = ?",
                (origin, snapshot_id, index),
            )
            self._shards.punch(origin, snapshot_id, index)
        conn.execute(
            "UPDATE meta SET value = CAST(value AS INTEGER) - ? WHERE key = 'blocks'", (len(keys),)
        )
        return len(keys)

    # ---- the end ---------------------------------------------------------------------

    def close(self) -> None:
        """Write the uses not written yet (the LRU order) and close everything."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(sqlite3.Error), self._transaction() as conn:
            self._write_touches(conn)
        self._close_all()

    def _close_all(self) -> None:
        self._close_connections()
        self._shards.close()
        self._dir.close()

    def _close_connections(self) -> None:
        for name in ("_writer", "_reader_conn"):
            conn = getattr(self, name, None)
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
                setattr(self, name, None)
