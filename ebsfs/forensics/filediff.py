"""Which files changed between two snapshots of one volume (`ebsfs diff --files`),
from filesystem metadata only, through one engine so that metadata unchanged between
the snapshots is fetched once.

For each filesystem (a bare one, or each partition), both trees are read (fsread.py)
and matched by inode number: an inode in both with the same identity (type, NTFS
sequence number, creation time) is one object, compared field by field; its names
(parent inode, name) tell renames. Content counts as changed when the size, the
extents or the data kept in the metadata differ; when only the extents' blocks are
among the changed ones (ListChangedBlocks), the bytes of those blocks are compared, so
a file that merely shares a 512 KiB block with a changed one is not listed, and a write
in place whose mtime was put back still is (its ctime betrays it too). Memory: the two
trees (one record per inode), not the volume.

Names are the attacker's: every writer quotes them (ebsfs/quoting.py), `-z` gives
their raw bytes between NULs, JSON gives them in base64 too."""

from __future__ import annotations

import bisect
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from ebsfs.engine.diff import Diff, TextSink, human
from ebsfs.errors import FilesystemUnreadable
from ebsfs.forensics.compare import ADDED, DELETED, MODIFIED, STATUS, FileChange, compare_trees
from ebsfs.forensics.fsread import Entry, PositionalReader, Tree, read_tree
from ebsfs.quoting import printable, quote, raw_b64, raw_bytes

__all__ = ["ChangedBlocks", "FileChange", "FileDiff", "compare_trees", "diff_files"]

log = logging.getLogger(__name__)

COMPARE_PIECE = 4 * 1024**2
"""Bytes compared at once when changed blocks must be read."""


class Snapshot(Protocol):
    """What is read: an ebsfs SnapshotFile (see `ebsfs.open_snapshots`)."""

    snapshot_id: str
    size: int

    def pread(self, size: int, offset: int) -> bytes: ...

    def partitions(self) -> list[Any]: ...

    def changes_since(self, earlier: Any) -> Diff: ...


class ChangedBlocks:
    """The changed blocks of the volume as sorted byte ranges, for intersections."""

    def __init__(self, ranges: Iterable[tuple[int, int]]) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for start, length in ranges:
            self._starts.append(start)
            self._ends.append(start + length)

    @classmethod
    def of(cls, diff: Diff) -> ChangedBlocks:
        return cls((r.offset, r.length) for r in diff.ranges())

    def pieces(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The parts of bytes [offset, offset+length) of the volume that lie in changed
        blocks, as (offset, length)."""
        end = offset + length
        k = bisect.bisect_right(self._ends, offset)
        found = []
        while k < len(self._starts) and self._starts[k] < end:
            start, stop = max(offset, self._starts[k]), min(end, self._ends[k])
            if start < stop:
                found.append((start, stop - start))
            k += 1
        return found

    def touches(self, offset: int, length: int) -> bool:
        return bool(self.pieces(offset, length))


@dataclass
class FilesystemChanges:
    """The changed files of one filesystem, or why they could not be listed."""

    partition: int | None
    offset: int
    size: int
    fstype: str | None = None
    changes: list[FileChange] = field(default_factory=list)
    note: str | None = None
    """Why files were not listed (unsupported or damaged filesystem, moved partition)."""
    entries: tuple[int, int] = (0, 0)
    """Files, directories and symlinks read in the first and in the second snapshot."""
    changed_bytes: int = 0
    """Bytes of changed blocks inside this filesystem."""
    unreadable: list[Unread] = field(default_factory=list)
    """What could not be read in it (the rest was compared)."""

    @property
    def label(self) -> str:
        return "the volume" if self.partition is None else f"partition {self.partition}"


@dataclass
class Unread:
    """A directory or an entry that could not be read, by its path."""

    snapshot: str
    """"first", "second" or "both"."""
    path: str
    what: str
    reason: str

    def describe(self, ascii_only: bool = False) -> str:
        where = "both snapshots" if self.snapshot == "both" else f"the {self.snapshot} snapshot"
        return f"{self.what} unreadable in {where}: {printable(self.reason, ascii_only)}"


@dataclass
class FileDiff:
    """What `diff --files` found: per filesystem, and the byte ranges behind it."""

    first: str
    second: str
    blocks: Diff
    filesystems: list[FilesystemChanges]
    outside_bytes: int = 0
    """Bytes of changed blocks in no filesystem read (partition table, gaps)."""

    def counts(self) -> dict[str, int]:
        found = {ADDED: 0, DELETED: 0, MODIFIED: 0}
        for fs in self.filesystems:
            for c in fs.changes:
                found[c.change] += 1
        return found

    def write_text(self, out: TextSink, ascii_only: bool = False) -> None:
        """Per filesystem, a `# ...` header and one `git diff --name-status` line per
        name (`A`, `D`, `M path reasons`, `R old new reasons`, `U path what could not
        be read`), names quoted as git quotes them; then the summary, and the changed
        byte ranges of any filesystem whose files could not be listed."""

        def q(name: str) -> str:
            return quote(name, ascii_only)

        for fs in self.filesystems:
            what = fs.fstype or "unknown"
            if fs.note is not None:
                note = printable(fs.note, ascii_only)
                out.write(f"# {fs.label} ({what}): files not listed: {note}\n")
                continue
            counts = _count(fs.changes)
            out.write(
                f"# {fs.label} ({what}): {counts[ADDED]} added, {counts[DELETED]} "
                f"deleted, {counts[MODIFIED]} modified{_unreadable(fs)}\n"
            )
            for c in fs.changes:
                reasons = ",".join(r for r in c.reasons if r != "renamed")
                if "renamed" in c.reasons:
                    line = f"R\t{q(c.old_path or '')}\t{q(c.path)}"
                else:
                    line = f"{STATUS[c.change]}\t{q(c.path)}"
                out.write(line + (f"\t{reasons}" if reasons else "") + "\n")
            for u in fs.unreadable:
                out.write(f"U\t{q(u.path)}\t{u.describe(ascii_only)}\n")
        counts = self.counts()
        total = sum(counts.values())
        listed = sum(1 for fs in self.filesystems if fs.note is None)
        unread = sum(len(fs.unreadable) for fs in self.filesystems)
        out.write(
            f"{self.first} -> {self.second}: {total} changed in {listed} "
            f"filesystem{'s' if listed != 1 else ''} ({counts[ADDED]} added, "
            f"{counts[DELETED]} deleted, {counts[MODIFIED]} modified"
            f"{f', {unread} unreadable' if unread else ''}); "
            f"{self.blocks.changed_count} blocks changed "
            f"({human(self.blocks.changed_bytes)})\n"
        )
        if self.outside_bytes:
            out.write(
                f"  {human(self.outside_bytes)} of changed blocks lie outside the "
                "filesystems read (partition table, unpartitioned space)\n"
            )
        for fs in self.filesystems:
            if fs.note is None:
                continue
            out.write(f"changed byte ranges of {fs.label} (offsets in the volume):\n")
            for offset, length in self._ranges_in(fs):
                out.write(f"{offset:>16} {length:>14}\n")

    def write_z(self, out: BinarySink, raw: bool = True) -> None:
        """Only the names, for programs (`-z`, as git's): each field ends with NUL
        and names are their raw bytes (quoted as in the text if not `raw`: for a
        terminal). A record is STATUS, PARTITION (empty for a bare filesystem), for R
        the old path, PATH, then REASONS (comma-separated, maybe empty); `U` records
        give what could not be read instead of reasons. Notes and the summary are not
        written (the faces say them on stderr)."""
        _raw = _raw_name if raw else _quoted_name
        for fs in self.filesystems:
            part = b"" if fs.partition is None else str(fs.partition).encode()
            for c in fs.changes:
                renamed = "renamed" in c.reasons
                fields = [b"R" if renamed else STATUS[c.change].encode(), part]
                if renamed:
                    fields.append(_raw(c.old_path or ""))
                reasons = ",".join(r for r in c.reasons if r != "renamed")
                fields += [_raw(c.path), reasons.encode()]
                out.write(b"".join(f + b"\0" for f in fields))
            for u in fs.unreadable:
                text = printable(u.describe(), ascii_only=True).encode()
                out.write(b"U\0" + part + b"\0" + _raw(u.path) + b"\0" + text + b"\0")

    def _ranges_in(self, fs: FilesystemChanges) -> list[tuple[int, int]]:
        return ChangedBlocks.of(self.blocks).pieces(fs.offset, fs.size)

    def write_json(self, out: TextSink) -> None:
        """One JSON object: first, second, files (path, change, partition, type,
        reasons, old_path, before/after metadata), filesystems (with notes, what
        could not be read and, for those not listed, their changed ranges),
        changed_blocks, changed_bytes. Paths are given as printed (quoted as git
        quotes them) and exactly, as `path_b64`/`old_path_b64`: a name is any bytes."""
        head = {
            "first": self.first,
            "second": self.second,
            "block_size": self.blocks.block_size,
            "volume_size": self.blocks.volume_size,
            "changed_blocks": self.blocks.changed_count,
            "changed_bytes": self.blocks.changed_bytes,
            "outside_bytes": self.outside_bytes,
            "counts": self.counts(),
        }
        out.write(json.dumps(head)[:-1] + ', "filesystems": [')
        for k, fs in enumerate(self.filesystems):
            item: dict[str, Any] = {
                "partition": fs.partition,
                "offset": fs.offset,
                "size": fs.size,
                "type": fs.fstype,
                "note": None if fs.note is None else printable(fs.note),
                "entries_first": fs.entries[0],
                "entries_second": fs.entries[1],
                "changed_bytes": fs.changed_bytes,
                "changes": len(fs.changes),
                "unreadable": [
                    {
                        "path": quote(u.path),
                        "path_b64": raw_b64(u.path),
                        "snapshot": u.snapshot,
                        "what": u.what,
                        "reason": printable(u.reason),
                    }
                    for u in fs.unreadable
                ],
            }
            if fs.note is not None:
                item["ranges"] = [{"offset": o, "length": n} for o, n in self._ranges_in(fs)]
            out.write((", " if k else "") + json.dumps(item))
        out.write('], "files": [')
        separator = ""
        for fs in self.filesystems:
            for c in fs.changes:
                out.write(separator + json.dumps(_change_json(c, fs.partition)))
                separator = ", "
        out.write("]}\n")


def _count(changes: list[FileChange]) -> dict[str, int]:
    found = {ADDED: 0, DELETED: 0, MODIFIED: 0}
    for c in changes:
        found[c.change] += 1
    return found


class BinarySink(Protocol):
    def write(self, data: bytes, /) -> object: ...


def _raw_name(path: str) -> bytes:
    """A path's raw bytes for `-z` (quoted in the one case a NUL would break it)."""
    data = raw_bytes(path)
    return data if b"\0" not in data else _quoted_name(path)


def _quoted_name(path: str) -> bytes:
    return quote(path, ascii_only=True).encode("ascii")


def _unreadable(fs: FilesystemChanges) -> str:
    return f", {len(fs.unreadable)} unreadable" if fs.unreadable else ""


def _change_json(c: FileChange, partition: int | None) -> dict[str, Any]:
    """Paths as printed (quoted when they need it) and, exactly, as base64 of their
    bytes."""
    return {
        "path": quote(c.path),
        "path_b64": raw_b64(c.path),
        "change": c.change,
        "partition": partition,
        "type": c.kind,
        "reasons": c.reasons,
        "old_path": None if c.old_path is None else quote(c.old_path),
        "old_path_b64": None if c.old_path is None else raw_b64(c.old_path),
        "before": _entry_json(c.before),
        "after": _entry_json(c.after),
    }


def _entry_json(e: Entry | None) -> dict[str, Any] | None:
    if e is None:
        return None
    return {
        "inode": e.inode,
        "size": e.size,
        "mode": None if e.mode is None else f"{e.mode:04o}",
        "uid": e.uid,
        "gid": e.gid,
        "mtime": _time(e.mtime),
        "ctime": _time(e.ctime),
        "atime": _time(e.atime),
        "crtime": _time(e.crtime),
    }


def _time(ns: int | None) -> str | None:
    """ISO 8601 in UTC, to the nanosecond the filesystem keeps."""
    if ns is None:
        return None
    seconds, fraction = divmod(ns, 10**9)
    stamp = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{fraction:09d}Z"


# -- the snapshots ----------------------------------------------------------------------


Progress = Callable[[str], None]
"""Called with a short line saying how far the reading is."""


def diff_files(
    first: Snapshot, second: Snapshot, *, atime: bool = False, progress: Progress | None = None
) -> FileDiff:
    """The files changed from `first` to `second` (two files of one
    `ebsfs.open_snapshots`, the earlier first), for each filesystem on the volume.
    A filesystem that cannot be read gets a note, not an exception; reads that fail
    after retries raise the engine's error."""
    blocks = second.changes_since(first)
    changed = ChangedBlocks.of(blocks)
    found: list[FilesystemChanges] = []
    parts_first = {p.partition.number: p for p in first.partitions()}
    parts_second = {p.partition.number: p for p in second.partitions()}
    covered = 0
    if not parts_first and not parts_second:
        fs = FilesystemChanges(None, 0, second.size)
        _compare(fs, first, second, changed, atime, progress)
        found.append(fs)
        covered = blocks.changed_bytes
    for number in sorted(parts_first.keys() | parts_second.keys()):
        a, b = parts_first.get(number), parts_second.get(number)
        where = b if b is not None else a
        assert where is not None
        fs = FilesystemChanges(number, where.partition.offset, where.partition.size)
        fs.changed_bytes = sum(n for _, n in changed.pieces(fs.offset, fs.size))
        covered += fs.changed_bytes
        if a is None or b is None:
            fs.note = f"only in the {'second' if a is None else 'first'} snapshot"
        elif (a.partition.offset, a.partition.size) != (b.partition.offset, b.partition.size):
            fs.note = "moved or resized between the snapshots"
        else:
            _compare(fs, a, b, changed, atime, progress)
        found.append(fs)
    return FileDiff(
        first.snapshot_id,
        second.snapshot_id,
        blocks,
        found,
        outside_bytes=max(0, blocks.changed_bytes - covered),
    )


def _compare(
    fs: FilesystemChanges,
    first: PositionalReader,
    second: PositionalReader,
    changed: ChangedBlocks,
    atime: bool,
    progress: Progress | None,
) -> None:
    """Fill `fs` from the filesystem at its place in both snapshots."""
    if fs.partition is None:
        fs.changed_bytes = sum(n for _, n in changed.pieces(0, fs.size))
    if fs.changed_bytes == 0:
        return  # not one block of it changed: neither can any file
    trees = []
    for which, source in (("first", first), ("second", second)):
        report = None
        if progress is not None:
            progress(f"{fs.label}: reading the {which} snapshot's metadata")

            def report(count: int, which: str = which) -> None:
                progress(f"{fs.label}: {count} entries read in the {which} snapshot")

        try:
            trees.append(read_tree(source, report))
        except FilesystemUnreadable as err:
            fs.note = f"{err} (in the {which} snapshot)"
            return
    old, new = trees
    fs.fstype = new.fstype
    fs.entries = (len(old.entries), len(new.entries))
    fs.unreadable = _unread(old, new)

    def pieces(offset: int, length: int) -> list[tuple[int, int]]:
        return [(o - fs.offset, n) for o, n in changed.pieces(fs.offset + offset, length)]

    def same_bytes(ranges: list[tuple[int, int]]) -> bool:
        for offset, length in ranges:
            for start in range(offset, offset + length, COMPARE_PIECE):
                size = min(COMPARE_PIECE, offset + length - start)
                if first.pread(size, start) != second.pread(size, start):
                    return False
        return True

    fs.changes = compare_trees(old, new, pieces, same_bytes, atime)
    log.info(
        "%s (%s): %d and %d entries, %d changes", fs.label, fs.fstype, *fs.entries, len(fs.changes)
    )


def _unread(first: Tree, second: Tree) -> list[Unread]:
    """What each tree could not read, by path; once when both could not."""
    found: dict[tuple[str, str], Unread] = {}
    for which, tree in (("first", first), ("second", second)):
        for u in tree.unreadable:
            what = u.what if u.inode is not None else "a name in the directory"
            path = tree.path(u.link)
            known = found.get((path, what))
            if known is not None:
                known.snapshot = "both" if known.snapshot != which else which
                continue
            found[(path, what)] = Unread(which, path, what, u.reason)
    return sorted(found.values(), key=lambda u: raw_bytes(u.path))
