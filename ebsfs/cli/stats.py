"""`ebsfs stats`: what a mount has done, read from its mount point's extended attribute
user.ebsfs.stats (no AWS)."""

from __future__ import annotations

import argparse
import json
import os
from typing import TYPE_CHECKING

from ebsfs.errors import UserInputError

if TYPE_CHECKING:
    from ebsfs.cli.options import Commands


def add_parser(commands: Commands) -> None:
    stats = commands.add_parser(
        "stats",
        help="what a mount has done: calls, fetches, cache hits, estimated cost",
        description="Show what the mount at MOUNTPOINT has done since it started: calls "
        "per operation (retries included), retries and throttling, blocks and "
        "bytes fetched, memory and disk cache hits, blocks served through "
        "another snapshot's cached blocks (lineage), and the estimated cost of "
        "the calls (GetSnapshotBlock $0.003 per 1,000, list calls $0.0006 per "
        "1,000). Read from the extended attribute user.ebsfs.stats of the mount "
        "point.",
    )
    stats.set_defaults(run=cmd_stats)
    stats.add_argument("mountpoint", metavar="MOUNTPOINT")
    stats.add_argument(
        "--json",
        action="store_true",
        help="print the figures as one JSON object (bytes, counts and dollars)",
    )
    stats.add_argument("-v", "--verbose", action="count", default=0, help=argparse.SUPPRESS)
    stats.add_argument("--log-file", help=argparse.SUPPRESS)


def cmd_stats(args: argparse.Namespace) -> int:
    from ebsfs.engine.stats import format_report

    path = args.mountpoint
    if not os.path.ismount(path):
        raise UserInputError(f"{path} is not a mount point")
    try:
        report = json.loads(os.getxattr(path, "user.ebsfs.stats"))
    except OSError as err:
        raise UserInputError(
            f"{path} is not an ebsfs mount (no statistics: {err.strerror})"
        ) from err
    except ValueError as err:
        raise UserInputError(f"{path}: statistics unreadable: {err}") from err
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return 0
