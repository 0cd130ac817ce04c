"""One snapshot's lines for `ebsfs scan`, from filesystem metadata: for each partition
(or the bare volume) holding a filesystem ebsfs reads, one record per name of every
file, directory and symlink (forensics/fsread.py's trees), the SHA-256 of the regular
files asked for (their data read through the filesystem's library, so only their own
blocks are fetched), and a summary. No Dask here: tasks.py runs this on a worker, and
it runs just as well in one process (tests, scripts/bench_scan.py).

What cannot be read is a line, never the end of the sweep: a partition whose
filesystem is unknown or damaged is an error line and the others are still read; a
snapshot the service will not serve (not found, denied, retries exhausted) is one
error line, its summary says `complete: false`, and a rerun tries it again. Names and
messages are the attacker's: paths go out quoted as git quotes them (`path`) and as
their raw bytes in base64 (`path_b64`); messages are made printable."""

from __future__ import annotations

import datetime
import fnmatch
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ebsfs.engine.config import EngineConfig
from ebsfs.errors import EbsfsError, FilesystemUnreadable, ReadFailed
from ebsfs.fileobj import SnapshotFile, open_with
from ebsfs.forensics.fsread import (
    FILE,
    LIBRARY_ERRORS,
    Entry,
    PagedReader,
    PositionalReader,
    Tree,
    one_line,
    raise_read_failure,
    read_tree,
    tsk_open,
)
from ebsfs.forensics.lookup import hash_reads
from ebsfs.quoting import printable, quote, raw_b64

log = logging.getLogger(__name__)


@dataclass
class Selection:
    """Which regular files are hashed: none without `hash_data`; with it, those whose
    path matches one of `include` (all when there is none). A glob without a `/`
    matches a file's name wherever it is (`liblzma.so.5*`), one with a `/` the whole
    path (`/usr/lib/*/liblzma.so.5*`; `*` crosses `/`, as fnmatch's does)."""

    hash_data: bool = False
    include: list[str] = field(default_factory=list)

    def wants(self, path: str) -> bool:
        if not self.hash_data:
            return False
        if not self.include:
            return True
        name = path.rsplit("/", 1)[-1]
        return any(
            fnmatch.fnmatchcase(path if "/" in glob else name, glob) for glob in self.include
        )


@dataclass
class SnapshotLines:
    """What a scan of one snapshot gives: its lines (file, error and summary records,
    the summary last) and whether it is complete (a rerun skips it)."""

    snapshot_id: str
    lines: list[dict[str, Any]]
    complete: bool

    @property
    def summary(self) -> dict[str, Any]:
        summary: dict[str, Any] = self.lines[-1]["summary"]
        return summary


def ns_iso(ns: int | None) -> str | None:
    """ISO 8601 in UTC, to the nanosecond the filesystem keeps (as `history --json`)."""
    if ns is None:
        return None
    seconds, fraction = divmod(ns, 10**9)
    stamp = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return f"{stamp.strftime('%Y-%m-%dT%H:%M:%S')}.{fraction:09d}Z"


Hasher = Callable[[Entry], str]
"""The SHA-256 (hex) of one regular file's data, read through its filesystem's library."""


def scan_snapshot(
    config: EngineConfig,
    snapshot_id: str,
    selection: Selection,
    *,
    readahead: bool = False,
) -> SnapshotLines:
    """Every partition of one snapshot read into lines (see the module's docstring),
    through one engine built from `config` (its disk cache, when it names one, holds
    earlier snapshots of the volume: their unchanged blocks are not fetched again)."""
    started = time.monotonic()
    lines: list[dict[str, Any]] = []
    counts = {"files": 0, "bytes": 0, "hashed": 0, "errors": 0, "unreadable_entries": 0}
    stats: dict[str, Any] = {}
    complete = True
    try:
        snap = open_with(config, [snapshot_id], readahead=readahead)[0]
    except EbsfsError as err:
        lines.append(_error(snapshot_id, None, f"could not be read: {one_line(err)}"))
        counts["errors"] += 1
        complete = False
    else:
        try:
            for line in _snapshot_lines(snap, selection, counts):
                lines.append(line)
        except (EbsfsError, OSError) as err:  # the service, after its retries
            lines = [_error(snapshot_id, None, f"could not be read: {one_line(err)}")]
            counts.update(files=0, bytes=0, hashed=0, errors=1, unreadable_entries=0)
            complete = False
        finally:
            stats = snap.stats()
            snap.close()
    calls = stats.get("calls", {})
    lines.append(
        {
            "snapshot_id": snapshot_id,
            "summary": {
                **counts,
                "complete": complete,
                "blocks_fetched": stats.get("blocks_fetched", 0),
                "calls": sum(calls.values()),
                "block_calls": calls.get("GetSnapshotBlock", 0),
                "estimated_cost_usd": stats.get("estimated_cost_usd", 0.0),
                "seconds": round(time.monotonic() - started, 3),
            },
        }
    )
    return SnapshotLines(snapshot_id, lines, complete)


def _error(snapshot_id: str, partition: int | None, message: str) -> dict[str, Any]:
    return {"snapshot_id": snapshot_id, "partition": partition, "error": printable(message)}


def _snapshot_lines(
    snap: SnapshotFile, selection: Selection, counts: dict[str, int]
) -> Iterator[dict[str, Any]]:
    """The lines of each partition (or of the bare volume); a filesystem that cannot
    be read is an error line. The engine's own failures propagate."""
    windows: list[tuple[int | None, PositionalReader]] = [
        (int(p.partition.number), p) for p in snap.partitions()
    ]
    if not windows:
        windows = [(None, snap)]
    unrecognised: list[tuple[int | None, str]] = []
    read = 0
    for number, window in windows:
        try:
            tree = read_tree(window)
            hasher = _hasher(window) if selection.hash_data else None
        except FilesystemUnreadable as err:
            if number is None and _has_table(snap):
                # engine.partitions found none, yet the disk has a table: its read
                # failed (logged), and the bare disk is no filesystem. Not complete.
                raise ReadFailed(f"its partition table could not be read ({err})") from err
            if "recognises none" in str(err):
                unrecognised.append((number, str(err)))
                continue
            counts["errors"] += 1
            yield _error(snap.snapshot_id, number, str(err))
            continue
        read += 1
        yield from _tree_lines(snap.snapshot_id, number, tree, selection, hasher, counts)
    for number, text in unrecognised:
        if read:  # a swap or BIOS boot partition beside readable ones: a note, not news
            yield {"snapshot_id": snap.snapshot_id, "partition": number, "note": text}
        else:
            counts["errors"] += 1
            yield _error(snap.snapshot_id, number, text)


def _has_table(snap: SnapshotFile) -> bool:
    """Whether the disk's first sectors hold a partition table's signature (MBR, or a
    protective MBR and GPT header)."""
    head = snap.pread(1024, 0)
    return head[510:512] == b"\x55\xaa" and (head[512:520] == b"EFI PART" or any(head[446:510]))


def _tree_lines(
    snapshot_id: str,
    partition: int | None,
    tree: Tree,
    selection: Selection,
    hasher: Hasher | None,
    counts: dict[str, int],
) -> Iterator[dict[str, Any]]:
    """One line per name of every entry but the root, in inode order (names of one
    inode together), then one per part of the tree that could not be read."""
    for inode in sorted(tree.entries):
        entry = tree.entries[inode]
        for link in entry.links:
            path = tree.path(link)
            line: dict[str, Any] = {
                "snapshot_id": snapshot_id,
                "partition": partition,
                "path": quote(path),
                "path_b64": raw_b64(path),
                "type": entry.kind,
                "size": entry.size,
                "mtime": ns_iso(entry.mtime),
                "mode": entry.mode,
                "uid": entry.uid,
                "gid": entry.gid,
            }
            if entry.kind == FILE:
                counts["files"] += 1
                counts["bytes"] += entry.size
                if hasher is not None and selection.wants(path):
                    line.update(_hashed(hasher, entry))
                    counts["hashed"] += "sha256" in line
            yield line
    for u in tree.unreadable:
        counts["unreadable_entries"] += 1
        where = tree.path(u.link) if u.link is not None else None
        yield {
            "snapshot_id": snapshot_id,
            "partition": partition,
            "path": None if where is None else quote(where),
            "path_b64": None if where is None else raw_b64(where),
            "error": f"unreadable {u.what}: {printable(u.reason)}",
        }


def _hashed(hasher: Hasher, entry: Entry) -> dict[str, Any]:
    """{"sha256": ...}, or {"sha256": None, "note": why not}: one file whose data the
    library cannot follow is a note on its line (the engine's failures propagate)."""
    try:
        return {"sha256": hasher(entry)}
    except FilesystemUnreadable as err:
        return {"sha256": None, "note": printable(str(err))}
    except LIBRARY_ERRORS as err:
        if isinstance(err, OSError) and isinstance(err.__cause__, EbsfsError):
            raise err.__cause__ from None
        return {"sha256": None, "note": f"not hashed: {one_line(err)}"}


def _hasher(window: PositionalReader) -> Hasher:
    """Reads a regular file's data by inode through the library that walked the tree
    (one filesystem handle for all of them): only the file's own blocks, and the
    metadata that maps them, are fetched."""
    reader = PagedReader(window)
    if reader.pread(4, 0) == b"XFSB":
        from ebsfs.forensics.xfsread import open_volume

        volume = open_volume(reader)

        def opened(entry: Entry) -> Callable[[int, int], bytes]:
            handle = volume.get_file_entry_by_inode(entry.inode)
            return lambda offset, size: bytes(handle.read_buffer_at_offset(size, offset))
    else:
        (_, fs), _ = tsk_open(reader)

        def opened(entry: Entry) -> Callable[[int, int], bytes]:
            handle = fs.open_meta(inode=entry.inode)
            return lambda offset, size: bytes(handle.read_random(offset, size))

    def digest(entry: Entry) -> str:
        if entry.size > reader.size:
            raise FilesystemUnreadable(
                f"not hashed: it claims {entry.size} bytes, more than its filesystem "
                "holds (sparse, or damaged)"
            )
        try:
            return hash_reads(opened(entry), entry.size)
        finally:
            raise_read_failure(reader)  # a failed read is the engine's error, not damage

    return digest
