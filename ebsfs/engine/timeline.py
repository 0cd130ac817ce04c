"""A volume's timeline as a mount shows it (`ebsfs mount --volume`), FUSE-free: the
`by-time/` directory, one symbolic link per snapshot named by its StartTime in UTC
(`2026-05-28T20:26:40Z -> ../snap-0123.img`), so `ls by-time/` lists the volume's
history in order and a path names a moment rather than an id.

`refresh` adds the snapshots taken since the mount (`mount --refresh`).

Names are made here from numbers only (a time and a checked snapshot id): nothing
the service says reaches a name or a link target as text."""

from __future__ import annotations

import datetime
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from ebsfs.engine.engine import Engine
from ebsfs.engine.files import Node, snapshot_nodes
from ebsfs.engine.plan import plan

log = logging.getLogger(__name__)

BY_TIME = "by-time"


@dataclass(frozen=True)
class Symlink:
    """A symbolic link of the mount: its name, where it points (relative) and the
    mtime to show."""

    name: str
    target: str
    mtime: float | None = None


@dataclass
class Directory:
    """A directory of the mount holding symbolic links only."""

    name: str
    entries: list[Symlink] = field(default_factory=list)
    mtime: float | None = None


def moment(start_time: float) -> str:
    """A StartTime as a link name: ISO 8601 in UTC to the second, `Z` for UTC (no
    colon-free variant: Linux names may hold colons)."""
    stamp = datetime.datetime.fromtimestamp(start_time, datetime.UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%SZ")


def by_time(start_times: dict[str, float]) -> Directory:
    """`by-time/`: a link to `../<snapshot-id>.img` for each snapshot whose start time
    is known, oldest first (ties by id). Snapshots started within one second share a
    moment: each of them then gets `<moment>-<snapshot-id>`, so no name hides another
    and none depends on the order EC2 answered in."""
    ordered = sorted(start_times.items(), key=lambda item: (item[1], item[0]))
    groups: dict[str, list[str]] = defaultdict(list)
    for snapshot_id, start in ordered:
        groups[moment(start)].append(snapshot_id)
    links = []
    for snapshot_id, start in ordered:
        name = moment(start)
        if len(groups[name]) > 1:
            name = f"{name}-{snapshot_id}"
        links.append(Symlink(name, f"../{snapshot_id}.img", start))
    newest = ordered[-1][1] if ordered else None
    return Directory(BY_TIME, links, newest)


VolumeSource = Callable[[], list[tuple[str, float]]]
"""Asks EC2 again: the volumes' snapshots as (snapshot id, StartTime), in the order
the mount plans them (each volume's oldest first). Blocking: run in a thread."""


@dataclass
class Refreshed:
    """What a refresh found: the new snapshots' files, the names of files to take
    away (a deleted snapshot's, and the `.changes` of those that shared with it), and
    `by-time/` as it now is."""

    nodes: list[Node]
    removed: list[str]
    links: Directory


async def refresh(
    engine: Engine,
    source: VolumeSource,
    start_times: dict[str, float],
    of_volumes: set[str],
    in_use: Callable[[str], bool],
) -> Refreshed | None:
    """Snapshots the volumes gained since the mount (or the last refresh) added to the
    engine, each planned with the mounted one before it so that it shares the blocks
    they have in common, and those deleted taken away once `in_use` says none of
    their files is open (none shares blocks through them from now on); None when
    nothing changed. `start_times` and `of_volumes` (the mounted snapshots that came
    from the volumes) are brought up to date. Raises the typed errors of EC2 and of
    the checks (the caller logs them and tries again at the next refresh)."""
    listed = await trio.to_thread.run_sync(source)
    ids = [snapshot_id for snapshot_id, _ in listed]
    new = [s for s in ids if s not in engine.images]
    deleted = sorted(of_volumes - set(ids))
    if not new and not deleted:
        return None
    removed: list[str] = []
    for snapshot_id in deleted:
        busy = in_use(snapshot_id)
        names = _names(engine, snapshot_id)
        for lost_base in engine.remove(snapshot_id, keep_image=busy):
            removed.append(f"{lost_base}.changes")
        if not busy:
            removed += names
            of_volumes.discard(snapshot_id)
            start_times.pop(snapshot_id, None)
    added: list[str] = []
    if new:
        before = [s for s in ids[: ids.index(new[0])] if s in engine.images]
        wanted = before[-1:] + new
        checked = await trio.to_thread.run_sync(lambda: plan(engine.config, wanted, api=engine.api))
        added = engine.add(checked)
        of_volumes.update(added)
        start_times.update({s: t for s, t in listed if s in added})
    nodes = await snapshot_nodes(engine, start_times, only=added)
    mounted = {s: t for s, t in start_times.items() if s in engine.images}
    log.info("refresh: %d new, %d deleted snapshot(s)", len(added), len(deleted))
    return Refreshed(nodes, removed, by_time(mounted))


def _names(engine: Engine, snapshot_id: str) -> list[str]:
    """The files a snapshot has (its partitions as they were found)."""
    parts = engine.known_partitions(snapshot_id) or []
    names = [f"{snapshot_id}.img", f"{snapshot_id}.changes"]
    return names + [f"{snapshot_id}-part{p.number}.img" for p in parts]
