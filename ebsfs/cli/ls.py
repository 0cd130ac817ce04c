"""`ebsfs ls`: the completed snapshots EC2 DescribeSnapshots lists, as a table or JSON."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from ebsfs.cli.options import connection_arguments, connection_options, ec2_argument

if TYPE_CHECKING:
    from ebsfs.cli.options import Commands


def add_parser(commands: Commands) -> None:
    ls = commands.add_parser(
        "ls",
        help="list completed snapshots (EC2 DescribeSnapshots)",
        description="List completed snapshots: id, volume, size, start time, encrypted, "
        "description; oldest first. Needs ec2:DescribeSnapshots.",
    )
    ls.set_defaults(run=cmd_ls)
    ls.add_argument(
        "--volume",
        action="append",
        default=[],
        metavar="VOLUME_ID",
        help="only snapshots of this volume (repeatable)",
    )
    ls.add_argument(
        "--owner",
        action="append",
        default=[],
        metavar="OWNER",
        help="owner account id, or self or amazon (repeatable; default: self)",
    )
    ls.add_argument(
        "--json", action="store_true", help="print a JSON list of objects with EC2's field names"
    )
    connection_arguments(ls, ebs=False)
    ec2_argument(ls, "the endpoint asked")


def cmd_ls(args: argparse.Namespace) -> int:
    from ebsfs.quoting import quote, utf8_stream
    from ebsfs.service import ec2

    found = ec2.Ec2Snapshots(connection_options(args), args.ec2_endpoint_url).list(
        args.owner or ["self"], args.volume
    )
    if args.json:
        json.dump([s.as_json() for s in found], sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    # EC2's answer is others' text (other owners' descriptions, a hostile endpoint):
    # quoted as git quotes names, so no cell moves the cursor or forges a row.
    ascii_only = not utf8_stream(sys.stdout)
    rows = [("SNAPSHOT", "VOLUME", "SIZE", "START (UTC)", "ENCRYPTED", "DESCRIPTION")]
    rows += [
        (
            quote(s.snapshot_id, ascii_only),
            quote(s.volume_id, ascii_only),
            f"{s.volume_size_gib} GiB",
            s.start_time.strftime("%Y-%m-%d %H:%M:%S"),
            "yes" if s.encrypted else "no",
            quote(" ".join(s.description.split()), ascii_only),
        )
        for s in found
    ]
    widths = [max(len(row[n]) for row in rows) for n in range(5)]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
            + "  "
            + row[5]
        )
    return 0
