"""`ebsfs verify`: check an image made by `ebsfs get` against its manifest (local files
only, no AWS)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING

from ebsfs.cli.get import image_digests
from ebsfs.quoting import printable

if TYPE_CHECKING:
    from ebsfs.cli.options import Commands

MAX_LISTED = 1000
"""Bad blocks listed one by one in `verify --json` (all are counted)."""


def add_parser(commands: Commands) -> None:
    verify = commands.add_parser(
        "verify",
        help="check an image made by `ebsfs get` against its manifest",
        description="Re-read IMAGE (a file or a device) and check it against its manifest: "
        "each written block's SHA-256, zeros everywhere else, and the whole "
        "image's SHA-256 and MD5 where the manifest has them. Exit 0 when all "
        "match; otherwise each bad block is named (index and byte offset) and "
        "the exit status is 1. Reads only local files.",
    )
    verify.set_defaults(run=cmd_verify)
    verify.add_argument("image", metavar="IMAGE")
    verify.add_argument(
        "--manifest", metavar="FILE", help="the manifest (default: IMAGE.manifest.json)"
    )
    verify.add_argument("-q", "--quiet", action="store_true", help="no progress")
    verify.add_argument(
        "--json",
        action="store_true",
        help="one JSON object on stdout instead of the lines: image, manifest, "
        "snapshot_id, ok, written_blocks, bad_blocks, bad (index, offset, reason; "
        f"the first {MAX_LISTED}), sha256 and md5 as read, and as the manifest has them",
    )
    verify.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    verify.add_argument("--log-file", help="append log messages to this file")


def cmd_verify(args: argparse.Namespace) -> int:
    from ebsfs.acquire.verify import verify
    from ebsfs.cli.progress import plural, progress_for

    shown = printable(args.image)  # a name a shell glob may have found: no raw controls
    listed: list[dict[str, object]] = []

    def bad(index: int, offset: int, reason: str) -> None:
        if args.json:
            if len(listed) < MAX_LISTED:  # a wrong disk may have millions
                listed.append({"index": index, "offset": offset, "reason": reason})
            return
        print(f"{shown}: block {index} (offset {offset}): {reason}", flush=True)

    result = verify(
        args.image, args.manifest, bad, progress_for(os.path.basename(args.image), args.quiet)
    )
    m = result.manifest
    if args.json:
        report = {
            "image": args.image,
            "manifest": m.path or args.manifest,
            "snapshot_id": m.snapshot_id,
            "ok": result.ok,
            "written_blocks": m.written_blocks,
            "bad_blocks": result.bad_blocks,
            "bad": listed,
            "sha256": result.sha256,
            "md5": result.md5,
            "manifest_sha256": m.sha256,
            "manifest_md5": m.md5,
        }
        print(json.dumps(report, indent=2))
    if result.ok:
        if args.json:
            return 0
        print(
            f"{shown}: OK: {m.snapshot_id}, {plural(m.written_blocks, 'written block')}, "
            f"{image_digests(m)}"
        )
        return 0
    if result.bad_blocks:
        what = plural(result.bad_blocks, "bad block")
    else:
        what = "the image's digests differ from the manifest's (was the manifest changed?)"
    print(f"ebsfs: error: {shown} does not match its manifest: {what}", file=sys.stderr)
    return 1
