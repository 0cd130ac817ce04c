"""`ebsfs mounts`: the ebsfs mounts of this system (this mount namespace), each with its
snapshots and serving process, from /proc/self/mountinfo and the mounts' own extended
attributes (no AWS)."""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from ebsfs.quoting import printable, quote, utf8_stream

if TYPE_CHECKING:
    from ebsfs.cli.options import Commands

MOUNTINFO = "/proc/self/mountinfo"

FSTYPE = "fuse.ebsfs"
"""The type the kernel shows for an ebsfs mount (fuse with subtype=ebsfs)."""

ANSWER_TIMEOUT = 5.0
"""Seconds a mount has to answer before it is listed as not answering: a stuck mount
must not hold the listing of the others."""

_IMAGE = re.compile(r"^(snap-[0-9a-f]+)\.img$")


@dataclass
class Mount:
    """One line of `ebsfs mounts`."""

    mountpoint: str
    pid: int | None = None
    snapshots: list[str] = field(default_factory=list)
    error: str | None = None
    """Why pid and snapshots are unknown (a dead or stuck mount, another user's)."""


def add_parser(commands: Commands) -> None:
    mounts = commands.add_parser(
        "mounts",
        help="list the active ebsfs mounts, their snapshots and processes",
        description="List the ebsfs mounts of this system (type fuse.ebsfs in "
        "/proc/self/mountinfo): each mount point with its snapshots and the process "
        "serving it (read from the mount itself; no AWS). A mount whose process is "
        "gone or stuck is listed with the reason.",
    )
    mounts.set_defaults(run=cmd_mounts)
    mounts.add_argument(
        "--json",
        action="store_true",
        help="print a JSON array, one object per mount: mountpoint, pid, snapshots, error",
    )
    mounts.add_argument("-v", "--verbose", action="count", default=0, help=argparse.SUPPRESS)
    mounts.add_argument("--log-file", help=argparse.SUPPRESS)


def unescape(field: str) -> str:
    """A mountinfo path: the kernel writes space, tab, newline and backslash as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def mountpoints(mountinfo: str) -> list[str]:
    """The mount points of ebsfs mounts in a mountinfo text, in mount order."""
    found = []
    for line in mountinfo.splitlines():
        head, sep, tail = line.partition(" - ")
        fields = head.split()
        if sep and len(fields) >= 5 and tail.split()[:1] == [FSTYPE]:
            found.append(unescape(fields[4]))
    return found


def describe(mountpoint: str) -> Mount:
    """A mount's process (user.ebsfs.pid on its root) and snapshots (its images)."""
    try:
        pid = int(os.getxattr(mountpoint, "user.ebsfs.pid"))
        snapshots = []
        for name in sorted(os.listdir(mountpoint)):
            if _IMAGE.match(name):
                path = os.path.join(mountpoint, name)
                snapshots.append(os.getxattr(path, "user.ebsfs.snapshot_id").decode())
    except OSError as err:
        return Mount(mountpoint, error=err.strerror or str(err))
    except ValueError as err:
        return Mount(mountpoint, error=f"unreadable: {err}")
    return Mount(mountpoint, pid, snapshots)


def active(timeout: float = ANSWER_TIMEOUT) -> list[Mount]:
    """Every ebsfs mount, asked all at once, each on a thread of its own: a mount whose
    process is stopped answers nothing, and its caller would wait for ever. The threads
    are daemons: one left waiting keeps neither the others nor the command's exit."""
    with open(MOUNTINFO, errors="surrogateescape") as f:
        paths = mountpoints(f.read())
    answers: list[queue.Queue[Mount]] = [queue.Queue() for _ in paths]
    for path, answer in zip(paths, answers, strict=True):
        threading.Thread(
            target=lambda p=path, a=answer: a.put(describe(p)), daemon=True, name="mount-query"
        ).start()
    deadline = time.monotonic() + timeout
    found = []
    for path, answer in zip(paths, answers, strict=True):
        try:
            found.append(answer.get(timeout=max(0.0, deadline - time.monotonic())))
        except queue.Empty:
            found.append(Mount(path, error=f"not answering (no answer in {timeout:g} s)"))
    return found


def cmd_mounts(args: argparse.Namespace) -> int:
    found = active()
    if args.json:
        print(json.dumps([asdict(m) for m in found], indent=2))
        return 0
    if not found:
        print("ebsfs: no ebsfs mounts", file=sys.stderr)
        return 0
    ascii_only = not utf8_stream(sys.stdout)
    for m in found:
        where = quote(m.mountpoint, ascii_only=ascii_only)
        if m.error is not None:
            print(f"{where}  ({printable(m.error, ascii_only=ascii_only)})")
        else:
            snapshots = printable(" ".join(m.snapshots) or "(no snapshot)", ascii_only=ascii_only)
            print(f"{where}  pid {m.pid}  {snapshots}")
    return 0
