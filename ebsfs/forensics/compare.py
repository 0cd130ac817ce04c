"""Two trees of one filesystem compared (the heart of `diff --files`): matched by inode
number, an inode in both with the same identity is one object, compared field by field;
its names tell renames; the same name on a new inode is a replacement.

What a tree could not read (`Tree.unreadable`) hides nothing else, and is not taken
for a change either: a name at or under an unreadable directory or entry, of either
snapshot, is neither added nor deleted (it may only be unseen), nor is a name missing
from a directory one of whose names could not be read; the faces list the unreadable
parts instead."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ebsfs.forensics.fsread import DIRECTORY, Entry, Tree

ADDED, DELETED, MODIFIED = "added", "deleted", "modified"
STATUS = {ADDED: "A", DELETED: "D", MODIFIED: "M"}


@dataclass
class FileChange:
    """One line of the listing: what happened to one name."""

    change: str
    path: str
    kind: str
    reasons: list[str] = field(default_factory=list)
    """For modified: what differs (renamed, replaced, content, size, mode, owner,
    mtime, ctime, crtime, atime)."""
    old_path: str | None = None
    before: Entry | None = None
    after: Entry | None = None


SameBytes = Callable[[list[tuple[int, int]]], bool]
"""Whether the two snapshots hold the same bytes at these (offset, length) of the
filesystem."""


def compare_trees(
    first: Tree,
    second: Tree,
    changed_pieces: Callable[[int, int], list[tuple[int, int]]],
    same_bytes: SameBytes,
    atime: bool = False,
) -> list[FileChange]:
    """The names added, deleted and modified from `first` to `second`, sorted by path.
    `changed_pieces(offset, length)` gives the parts of a byte range of the filesystem
    inside changed blocks."""
    changes: list[FileChange] = []
    gone: dict[str, FileChange] = {}
    came: dict[str, FileChange] = {}
    unknown = {u.inode for u in (*first.unreadable, *second.unreadable) if u.inode is not None}
    unseen_first, unseen_second = under(first, unknown), under(second, unknown)
    # Directories holding a name that could not be read: any missing name in them may
    # be that one.
    partial_first = {u.directory for u in first.unreadable if u.directory is not None}
    partial_second = {u.directory for u in second.unreadable if u.directory is not None}
    for inode, old in first.entries.items():
        new = second.entries.get(inode)
        if new is None and (
            inode in unseen_first or any(p in partial_second for p, _ in old.links)
        ):
            continue  # maybe there still, where the second could not be read
        if new is None or new.identity() != old.identity():
            for link in old.links:
                path = first.path(link)
                gone[path] = FileChange(DELETED, path, old.kind, before=old)
            continue
        reasons = _reasons(old, new, changed_pieces, same_bytes, atime)
        old_links, new_links = set(old.links), set(new.links)
        lost = sorted(old_links - new_links)
        found = sorted(new_links - old_links)
        kept = sorted(old_links & new_links)
        for before, after in zip(lost, found, strict=False):
            changes.append(
                FileChange(
                    MODIFIED,
                    second.path(after),
                    new.kind,
                    ["renamed", *reasons],
                    first.path(before),
                    old,
                    new,
                )
            )
        for link in lost[len(found) :]:
            path = first.path(link)
            gone[path] = FileChange(DELETED, path, old.kind, before=old)
        for link in found[len(lost) :]:
            path = second.path(link)
            came[path] = FileChange(ADDED, path, new.kind, after=new)
        if reasons and (kept or not old.links):
            path = second.path(kept[0]) if kept else "/"
            changes.append(FileChange(MODIFIED, path, new.kind, reasons, None, old, new))
    for inode, new in second.entries.items():
        earlier = first.entries.get(inode)
        if earlier is not None and earlier.identity() == new.identity():
            continue
        if earlier is None and (
            inode in unseen_second or any(p in partial_first for p, _ in new.links)
        ):
            continue  # maybe there already, where the first could not be read
        for link in new.links:
            path = second.path(link)
            came[path] = FileChange(ADDED, path, new.kind, after=new)
    for path in sorted(gone.keys() & came.keys()):
        # The same name on a new inode (an editor's save, `mv new old`): modified.
        was, now = gone.pop(path).before, came.pop(path).after
        assert was is not None and now is not None
        reasons = ["replaced", *_metadata_reasons(was, now, atime)]
        if was.size != now.size or was.inline != now.inline or was.kind != now.kind:
            reasons.append("content")
        changes.append(FileChange(MODIFIED, path, now.kind, reasons, None, was, now))
    changes.extend(gone.values())
    changes.extend(came.values())
    changes.sort(key=lambda c: (c.path, c.change))
    return changes


def _metadata_reasons(old: Entry, new: Entry, atime: bool) -> list[str]:
    reasons = []
    if old.mode != new.mode:
        reasons.append("mode")
    if (old.uid, old.gid) != (new.uid, new.gid):
        reasons.append("owner")
    for name in ("mtime", "ctime", "crtime"):
        if getattr(old, name) != getattr(new, name):
            reasons.append(name)
    if atime and old.atime != new.atime:
        reasons.append("atime")
    return reasons


def _reasons(
    old: Entry,
    new: Entry,
    changed_pieces: Callable[[int, int], list[tuple[int, int]]],
    same_bytes: SameBytes,
    atime: bool,
) -> list[str]:
    """What differs about one object; [] if nothing a user would call a change."""
    reasons = []
    if old.kind != DIRECTORY:
        if old.size != new.size:
            reasons.append("size")
        if old.size != new.size or old.extents != new.extents or old.inline != new.inline:
            reasons.insert(0, "content")
        else:
            pieces = [p for offset, length in new.extents for p in changed_pieces(offset, length)]
            if pieces and not same_bytes(pieces):
                reasons.insert(0, "content")
    elif old.size != new.size:
        reasons.append("size")
    return reasons + _metadata_reasons(old, new, atime)


def under(tree: Tree, unknown: set[int]) -> set[int]:
    """The inodes of `tree` at or under one of `unknown` (by each entry's first name),
    in time linear in the entries: each inode's answer is found once."""
    if not unknown:
        return set()
    state: dict[int, bool] = {}
    for start in tree.entries:
        chain: list[int] = []
        on_chain: set[int] = set()
        inode = start
        while inode not in state:
            entry = tree.entries.get(inode)
            if inode in unknown:
                state[inode] = True
            elif inode == tree.root or entry is None or not entry.links or inode in on_chain:
                state[inode] = False
            else:
                chain.append(inode)
                on_chain.add(inode)
                inode = entry.links[0][0]
        verdict = state[inode]
        for seen in chain:
            state[seen] = verdict
    return {inode for inode, hidden in state.items() if hidden}
