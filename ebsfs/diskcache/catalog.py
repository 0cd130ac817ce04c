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

from ebsfs.diskcache.directory import INDEX_NAME, is_ours

log = logging.getLogger(__name__)

FORMAT = "2"
"""1: blocks keyed by (snapshot, index); 2: by (origin, snapshot, index) (keys.py)."""
BUSY_TIMEOUT = 5.0
"""Seconds to wait for another process's write transaction before giving up one store."""
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS origins (
    origin TEXT PRIMARY KEY, endpoint TEXT NOT NULL, region TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS snapshots (
    origin TEXT NOT NULL, snapshot TEXT NOT NULL, volume_size INTEGER NOT NULL,
    used REAL NOT NULL, PRIMARY KEY (origin, snapshot)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS blocks (
    origin TEXT NOT NULL, snapshot TEXT NOT NULL, idx INTEGER NOT NULL,
    checksum TEXT NOT NULL, used REAL NOT NULL,
    PRIMARY KEY (origin, snapshot, idx)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS blocks_by_use ON blocks (used);
CREATE TABLE IF NOT EXISTS unrelated (
    origin TEXT NOT NULL, first TEXT NOT NULL, second TEXT NOT NULL,
    PRIMARY KEY (origin, first, second)) WITHOUT ROWID;
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
    when there is no index yet (or it is not a file ebsfs made: then nothing is read
    or written through it). Closed before the mount forks."""
    db_path = os.path.join(path, INDEX_NAME)
    try:
        st = os.stat(db_path, follow_symlinks=False)
    except OSError:
        st = None
    if st is None or not is_ours(st):
        yield None
        return
    conn = sqlite3.connect(db_path, timeout=BUSY_TIMEOUT, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


def lineage_candidates(
    path: str,
    snapshot_id: str,
    volume_size: int,
    exclude: set[str],
    limit: int = 16,
    origin: str | None = None,
) -> list[str]:
    """Snapshots of the same volume size with blocks in the cache, most recently used
    first, except those known to be unrelated to `snapshot_id`: of `origin` (a key,
    keys.py), or of any origin when None (harmless: a base's blocks are loaded from the
    reader's own origin only, so one of another costs a list call and serves nothing).
    A damaged index just offers none (opening the cache will mend it)."""
    try:
        with _index(path) as conn:
            if conn is None:
                return []
            rows = conn.execute(
                "SELECT s.snapshot FROM snapshots s WHERE s.volume_size = :size "
                "AND s.snapshot != :second AND (:origin IS NULL OR s.origin = :origin) "
                "AND EXISTS (SELECT 1 FROM blocks b WHERE b.origin = s.origin AND "
                "b.snapshot = s.snapshot) AND NOT EXISTS (SELECT 1 FROM unrelated u "
                "WHERE u.origin = s.origin AND u.first = s.snapshot AND u.second = "
                ":second) ORDER BY s.used DESC LIMIT :limit",
                {
                    "size": volume_size,
                    "second": snapshot_id,
                    "origin": origin,
                    "limit": 2 * (limit + len(exclude)),
                },
            ).fetchall()
    except sqlite3.Error as err:
        log.info("cache index in %s not readable for lineage (%s): no reuse", path, err)
        return []
    found = dict.fromkeys(r[0] for r in rows if r[0] not in exclude)
    return list(found)[:limit]


def record_unrelated(path: str, first: str, second: str, origin: str | None = None) -> None:
    """Remember that two snapshots share no lineage at `origin` (at every origin that
    holds `first` when None): never asked again."""
    try:
        with _index(path) as conn:
            if conn is not None:
                conn.execute(
                    "INSERT OR IGNORE INTO unrelated SELECT origin, :first, :second FROM "
                    "snapshots WHERE snapshot = :first AND (:origin IS NULL OR origin = "
                    ":origin)",
                    {"first": first, "second": second, "origin": origin},
                )
    except sqlite3.Error as err:
        log.debug("could not record %s and %s as unrelated: %s", first, second, err)
