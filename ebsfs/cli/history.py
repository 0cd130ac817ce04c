"""`ebsfs history`: one path through every snapshot of a volume, oldest first, from
filesystem metadata (forensics/history.py), as a table or JSON. The engine is built
the way every command builds it (options -> EngineConfig -> open_with)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import sys
from typing import TYPE_CHECKING, Any

from ebsfs.cli.diff import within
from ebsfs.cli.options import (
    cache_dir_arguments,
    connection_arguments,
    ec2_argument,
    engine_config,
    parse_size,
    positive_float,
)
from ebsfs.constants import DIFF_TIMEOUT
from ebsfs.errors import ReadFailed, UserInputError

if TYPE_CHECKING:
    from ebsfs.cli.options import Commands
    from ebsfs.forensics.history import History, Version


def add_parser(commands: Commands) -> None:
    history = commands.add_parser(
        "history",
        help="one path through every snapshot of a volume: absent, added, modified, "
        "unchanged or deleted",
        description="For each completed snapshot of VOLUME_ID (ours and those shared "
        "with us, EC2 DescribeSnapshots), oldest first: whether PATH is absent, "
        "added, modified, unchanged or deleted against the snapshot before it, with "
        "its type, size and mtime, from filesystem metadata only (ext2/3/4, NTFS, "
        "FAT, HFS+ through pytsk3; XFS with the extra ebsfs[xfs]): the directories "
        "on the path and its own record. modified: its type, inode, size, mtime, "
        "ctime, mode, owner or extents differ, or bytes of its extents in blocks "
        "ListChangedBlocks calls changed. A path in no snapshot: every row absent, a "
        "note on stderr, exit status 0. A snapshot that cannot be read: its row says "
        "why (the next is compared with the last one read), exit status 1 at the end. "
        "Needs ec2:DescribeSnapshots, ebs:ListSnapshotBlocks, ebs:GetSnapshotBlock, "
        "ebs:ListChangedBlocks.",
        epilog="example: ebsfs history vol-0123456789abcdef0 /etc/passwd --hash",
    )
    history.set_defaults(run=cmd_history)
    history.add_argument("volume", metavar="VOLUME_ID", help="the volume (vol-...)")
    history.add_argument("path", metavar="PATH", help="a path inside the filesystem")
    history.add_argument(
        "--partition",
        type=int,
        metavar="N",
        help="the partition holding the filesystem, numbered as Linux numbers them "
        "(default: the only partition, or the one holding a filesystem ebsfs reads)",
    )
    history.add_argument(
        "--hash",
        action="store_true",
        help="also the SHA-256 of a regular file's data in each snapshot (reads its "
        "blocks; those unchanged from the snapshot before are fetched once)",
    )
    history.add_argument(
        "--json",
        action="store_true",
        help='print {"path", "partition", "type", "versions": [{"snapshot_id", '
        '"start_time", "change", "type", "size", "mtime", "reasons", "note", '
        '"sha256" (with --hash)}]}',
    )
    history.add_argument(
        "--cache-size",
        type=parse_size,
        default="512M",
        metavar="SIZE",
        help="memory for cached blocks (default: 512M)",
    )
    history.add_argument(
        "--timeout",
        type=positive_float,
        default=DIFF_TIMEOUT,
        metavar="SECONDS",
        help="give up after this many seconds in all (default: %(default)g)",
    )
    history.add_argument(
        "--no-hedge",
        dest="hedge",
        action="store_false",
        help="never ask for a block twice (a slow call is asked again by default: "
        "see ebsfs mount --help)",
    )
    cache_dir_arguments(history)
    connection_arguments(history)
    ec2_argument(history, "the volume's snapshots")


def cmd_history(args: argparse.Namespace) -> int:
    from ebsfs.cli.progress import BarProgress
    from ebsfs.cli.volumes import volume_snapshots
    from ebsfs.fileobj import open_with
    from ebsfs.forensics import history
    from ebsfs.quoting import quote, utf8_stream
    from ebsfs.service.retry import RetryPolicy

    if args.partition is not None and args.partition < 1:
        raise UserInputError(f"--partition {args.partition}: partitions count from 1")
    # A lookup reads a handful of dependent blocks a snapshot: the metadata prefetch
    # would fetch the whole tree's metadata of each one instead.
    config = dataclasses.replace(
        engine_config(args, RetryPolicy(throttle_budget=args.timeout)), prefetch_metadata=False
    )
    found = volume_snapshots(config.connection, [args.volume], args.ec2_endpoint_url)
    display = BarProgress() if sys.stderr.isatty() else None

    def run() -> History:
        files = open_with(config, found.ids, readahead=False)
        try:
            return history.history(
                list(files),
                found.start_times,
                args.path,
                partition=args.partition,
                hash_data=args.hash,
                progress=display.status if display else None,
            )
        finally:
            for f in files:
                f.close()

    def late() -> Exception:
        logging.disable(logging.CRITICAL)
        return ReadFailed(
            f"history of {args.volume} gave up after --timeout {args.timeout:g}s; a "
            "longer --timeout waits more"
        )

    try:
        result = within(args.timeout, run, late)
    finally:
        if display is not None:
            display.close()
    ascii_only = not utf8_stream(sys.stderr)
    if result.never_present:
        print(
            f"ebsfs: note: {quote(args.path, ascii_only)} is in none of the "
            f"{len(result.versions)} snapshots of {args.volume}",
            file=sys.stderr,
        )
    if args.json:
        json.dump(as_json(result, args.hash), sys.stdout)
        sys.stdout.write("\n")
    else:
        write_table(result, args.hash, not utf8_stream(sys.stdout))
    if result.unreadable:
        print(
            f"ebsfs: error: {result.unreadable} of {len(result.versions)} snapshots "
            "could not be read (their rows say why)",
            file=sys.stderr,
        )
        return 1
    return 0


def _time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    stamp = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return stamp.strftime("%Y-%m-%d %H:%M:%S")


def _ns_iso(ns: int | None) -> str | None:
    """ISO 8601 in UTC, to the nanosecond the filesystem keeps."""
    if ns is None:
        return None
    seconds, fraction = divmod(ns, 10**9)
    stamp = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return f"{stamp.strftime('%Y-%m-%dT%H:%M:%S')}.{fraction:09d}Z"


def write_table(result: History, hashes: bool, ascii_only: bool) -> None:
    """One row a snapshot: id, start, change, type, size, mtime (and SHA-256), then
    what changed or why the row could not be read."""
    from ebsfs.quoting import printable, quote

    where = "the volume" if result.partition is None else f"partition {result.partition}"
    print(f"# {quote(result.path, ascii_only)} in {where} ({result.fstype or 'unknown'})")
    head = ["SNAPSHOT", "START (UTC)", "CHANGE", "TYPE", "SIZE", "MTIME (UTC)"]
    if hashes:
        head.append("SHA-256")
    rows = [head]
    notes = []
    for v in result.versions:
        e = v.entry
        row = [
            quote(v.snapshot_id, ascii_only),
            _time(v.start_time),
            v.change,
            e.kind if e else "-",
            str(e.size) if e else "-",
            _time(e.mtime / 1e9) if e and e.mtime is not None else "-",
        ]
        if hashes:
            row.append(v.sha256 or "-")
        rows.append(row)
        detail = ",".join(v.reasons)
        if v.note:
            detail = (detail + "; " if detail else "") + printable(v.note, ascii_only)
        notes.append(detail)
    widths = [max(len(r[n]) for r in rows) for n in range(len(head))]
    for r, detail in zip(rows, ["", *notes], strict=True):
        line = "  ".join(cell.ljust(width) for cell, width in zip(r, widths, strict=True))
        print((line + "  " + detail).rstrip())


def as_json(result: History, hashes: bool) -> dict[str, Any]:
    from ebsfs.quoting import printable, quote, raw_b64

    def version(v: Version) -> dict[str, Any]:
        e = v.entry
        item: dict[str, Any] = {
            "snapshot_id": v.snapshot_id,
            "start_time": None
            if v.start_time is None
            else _ns_iso(int(round(v.start_time * 1000)) * 10**6),
            "change": v.change,
            "type": e.kind if e else None,
            "size": e.size if e else None,
            "mtime": _ns_iso(e.mtime) if e else None,
            "reasons": v.reasons,
            "note": None if v.note is None else printable(v.note),
        }
        if hashes:
            item["sha256"] = v.sha256
        return item

    return {
        "path": quote(result.path),
        "path_b64": raw_b64(result.path),
        "partition": result.partition,
        "type": result.fstype,
        "versions": [version(v) for v in result.versions],
    }
