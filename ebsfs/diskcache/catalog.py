"""The disk cache's SQLite index (its catalog): the schema, connections, and the
lineage records read before a mount (which cached snapshots may share blocks with the
one being opened, and which pairs are known to share none). The rules that keep the
index and the data files consistent are store.py's."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from collections.abc import Iterator

from ebsfs.diskcache.directory import INDEX_NAME

log = logging.getLogger(__name__)

FORMAT = "1"
BUSY_TIMEOUT = 5.0
"""Seconds to wait for another process's write transaction before giving up one store."""
SCHEMA = """
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


def connect(db_path: str, writer: bool = True) -> sqlite3.Connection:
    conn = sqlite3.connect(
        db_path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
    )
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


def lineage_candidates(
    path: str, snapshot_id: str, volume_size: int, exclude: set[str], limit: int = 16
) -> list[str]:
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
