"""One path through a volume's snapshots (`ebsfs history`): for each snapshot, oldest
first, whether the path is absent, added, modified, unchanged or deleted against the
snapshot before it, from filesystem metadata only (lookup.py: the directories on the
path and the entry's own record), through one engine so that metadata unchanged from
one snapshot to the next is fetched once.

The rule for "modified": the entry differs from the last version read in its type,
its inode (a new file under the old name: "replaced"), size, mtime, ctime, mode,
owner, extents or data kept in the metadata; or, all of those equal, bytes of its
extents that lie in blocks ListChangedBlocks calls changed differ (a write in place
whose mtime and ctime were put back): the same rule as `diff --files`. With hashes,
different hashes too. A snapshot whose filesystem cannot be read is one row saying
so; the next row is compared with the last version read."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from ebsfs.errors import EbsfsError, FilesystemUnreadable, UserInputError
from ebsfs.forensics.filediff import COMPARE_PIECE, ChangedBlocks, Snapshot
from ebsfs.forensics.fsread import Entry, PositionalReader, one_line
from ebsfs.forensics.lookup import Found, lookup, split_path

log = logging.getLogger(__name__)

ABSENT, ADDED, MODIFIED, UNCHANGED, DELETED, UNREADABLE = (
    "absent",
    "added",
    "modified",
    "unchanged",
    "deleted",
    "unreadable",
)


@dataclass
class Version:
    """The path in one snapshot."""

    snapshot_id: str
    start_time: float | None
    change: str
    entry: Entry | None = None
    reasons: list[str] = field(default_factory=list)
    """What differs from the version before (for "modified")."""
    sha256: str | None = None
    note: str | None = None
    """Why the row is unreadable, or why a file was not hashed."""


@dataclass
class History:
    path: str
    partition: int | None
    """The partition read (None: the volume holds a bare filesystem)."""
    fstype: str | None
    versions: list[Version]

    @property
    def never_present(self) -> bool:
        return all(v.change in (ABSENT, UNREADABLE) for v in self.versions)

    @property
    def unreadable(self) -> int:
        return sum(1 for v in self.versions if v.change == UNREADABLE)


Progress = Callable[[str], None]


def history(
    snapshots: list[Snapshot],
    start_times: dict[str, float],
    path: str,
    *,
    partition: int | None = None,
    hash_data: bool = False,
    progress: Progress | None = None,
) -> History:
    """The versions of `path` in `snapshots` (one `open_snapshots`, oldest first), in
    `partition` (default: `choose_partition`). Raises UserInputError for a bad path
    or when no partition can be chosen; a snapshot that cannot be read is a row."""
    try:
        parts = split_path(path)
    except ValueError as err:
        raise UserInputError(f"path {path!r}: {err}") from None
    if partition is None:
        partition = choose_partition(snapshots[-1])
    result = History("/" + "/".join(parts), partition, None, [])
    last: tuple[Snapshot, PositionalReader, Version] | None = None
    for n, snap in enumerate(snapshots):
        if progress is not None:
            progress(f"{snap.snapshot_id} ({n + 1} of {len(snapshots)})")
        version = Version(snap.snapshot_id, start_times.get(snap.snapshot_id), UNREADABLE)
        result.versions.append(version)
        try:
            window = _window(snap, partition)
            found = lookup(window, parts, hash_data)
        except (FilesystemUnreadable, UserInputError) as err:
            version.note = str(err)
            continue
        except (EbsfsError, OSError) as err:  # the service, after its retries
            version.note = f"could not be read: {one_line(err)}"
            continue
        result.fstype = found.fstype
        before = last[2] if last is not None else None
        try:
            where = None if last is None else (last[0], last[1])
            version.change = _change(where, snap, window, found, version, before)
        except (EbsfsError, OSError) as err:
            version.change, version.note = UNREADABLE, f"could not be compared: {one_line(err)}"
            continue
        last = (snap, window, version)
    return result


def _change(
    last: tuple[Snapshot, PositionalReader] | None,
    snap: Snapshot,
    window: PositionalReader,
    found: Found,
    version: Version,
    before: Version | None = None,
) -> str:
    """Fill `version` from what the lookup found; its change against `before`."""
    version.entry, version.sha256, version.note = found.entry, found.sha256, found.note
    if before is None or before.entry is None:
        return ADDED if version.entry is not None else ABSENT
    if version.entry is None:
        return DELETED
    assert last is not None
    version.reasons = _differences(before.entry, version.entry)
    if not version.reasons and _data_changed(last[0], last[1], snap, window, version):
        version.reasons.append("content")
    if (
        version.sha256 is not None
        and before.sha256 is not None
        and version.sha256 != before.sha256
        and "content" not in version.reasons
    ):
        version.reasons.append("content")
    return MODIFIED if version.reasons else UNCHANGED


def choose_partition(newest: Snapshot) -> int | None:
    """Which partition to read when none is named: None for a disk with no partition
    table (a bare filesystem), the only partition, else the one partition of the newest
    snapshot holding a filesystem ebsfs reads; UserInputError when that is not one."""
    found = newest.partitions()
    if not found:
        return None
    if len(found) == 1:
        return int(found[0].partition.number)
    readable = []
    for part in found:
        try:
            lookup(part, [])
        except FilesystemUnreadable:
            continue
        readable.append(int(part.partition.number))
    numbers = ", ".join(str(int(p.partition.number)) for p in found)
    if len(readable) == 1:
        return readable[0]
    if not readable:
        raise UserInputError(
            f"none of the partitions ({numbers}) of {newest.snapshot_id} holds a "
            "filesystem ebsfs reads; give --partition N"
        )
    raise UserInputError(
        f"partitions {', '.join(map(str, readable))} of {newest.snapshot_id} hold "
        "filesystems: give --partition N"
    )


def _window(snap: Snapshot, partition: int | None) -> PositionalReader:
    if partition is None:
        if snap.partitions():
            raise FilesystemUnreadable("a partition table here: give --partition N")
        return snap
    for part in snap.partitions():
        if int(part.partition.number) == partition:
            return part
    raise FilesystemUnreadable(f"no partition {partition} in this snapshot")


def _differences(old: Entry, new: Entry) -> list[str]:
    """What differs between two versions of one path, by their metadata."""
    reasons = []
    if old.kind != new.kind:
        reasons.append("type")
    if old.inode != new.inode or old.identity() != new.identity():
        reasons.append("replaced")
    if old.size != new.size:
        reasons.append("size")
    if (old.extents, old.inline) != (new.extents, new.inline) and "size" not in reasons:
        reasons.append("content")
    for name in ("mtime", "ctime", "mode"):
        if getattr(old, name) != getattr(new, name):
            reasons.append(name)
    if (old.uid, old.gid) != (new.uid, new.gid):
        reasons.append("owner")
    return reasons


def _data_changed(
    earlier: Snapshot,
    old_window: PositionalReader,
    later: Snapshot,
    new_window: PositionalReader,
    version: Version,
) -> bool:
    """Whether bytes of the entry's extents (the same in both: its metadata did not
    change) differ, read only where ListChangedBlocks says a block changed."""
    entry = version.entry
    if entry is None or not entry.extents:
        return False
    offset = getattr(new_window, "partition", None)
    base = 0 if offset is None else int(offset.offset)
    changed = ChangedBlocks.of(later.changes_since(earlier))
    for start, length in entry.extents:
        for piece_start, piece_length in changed.pieces(base + start, length):
            at = piece_start - base
            for k in range(at, at + piece_length, COMPARE_PIECE):
                size = min(COMPARE_PIECE, at + piece_length - k)
                if old_window.pread(size, k) != new_window.pread(size, k):
                    return True
    return False
