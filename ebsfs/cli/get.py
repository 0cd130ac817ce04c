"""`ebsfs get`: copy a snapshot to an image file, a block device or stdout, with its
manifest; the copy itself is ebsfs.acquire's, the progress and the summary are here."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

from ebsfs.cli.options import (
    cache_dir_arguments,
    connection_arguments,
    ec2_argument,
    engine_arguments,
    engine_config,
    positive_float,
)
from ebsfs.constants import READ_TIMEOUT
from ebsfs.errors import RetriesExhausted, Throttled, UserInputError, first_leaf
from ebsfs.quoting import printable
from ebsfs.service.retry import COPY_THROTTLE_WAIT

if TYPE_CHECKING:
    from ebsfs.acquire.get import GetResult
    from ebsfs.acquire.manifest import Manifest
    from ebsfs.cli.options import Commands


log = logging.getLogger(__name__)


class ExamplesFormatter(argparse.HelpFormatter):
    """argparse's help, except that lines indented by two spaces (examples, one
    command each) are kept as written: filled, three commands read as one pipeline."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(
            indent + line
            if line.startswith("  ")
            else super(ExamplesFormatter, self)._fill_text(line, width, indent)
            for line in text.split("\n")
        )


def add_parser(commands: Commands) -> None:
    get = commands.add_parser(
        "get",
        help="copy a snapshot to a raw image file, a block device or stdout",
        description="Copy a snapshot's whole volume (exactly VolumeSize bytes) to OUTPUT, "
        "every block checked against its SHA-256, and write "
        "OUTPUT.manifest.json: the image's SHA-256 (and MD5 with --md5), each "
        "block's SHA-256, times, versions and the snapshot's EC2 metadata. A "
        "file is written sparse (never-written blocks are holes) as OUTPUT.part "
        "until the manifest is written. Interrupted (Ctrl-C, a kill, a lost "
        "network)? Run the same command again: it checks what was written and "
        "fetches only the rest. Needs ebs:ListSnapshotBlocks and "
        "ebs:GetSnapshotBlock (ebs:ListChangedBlocks with --base-image).",
        epilog="examples:\n"
        "  ebsfs get snap-0123456789abcdef0 evidence.img && ebsfs verify evidence.img\n"
        "  ebsfs get snap-0123456789abcdef0 - | gzip > disk.img.gz\n"
        "  ebsfs get --base-image monday.img snap-0tuesday tuesday.img",
        formatter_class=ExamplesFormatter,
    )
    get.set_defaults(run=cmd_get)
    get.add_argument("snapshot_id", metavar="SNAPSHOT_ID", help="the snapshot (snap-...)")
    get.add_argument(
        "output",
        metavar="OUTPUT",
        help="a new file, a block device at least VolumeSize bytes large "
        "(never-written blocks are zeroed; nothing past the image is "
        "written; until the copy ends the image's last block holds its "
        "fingerprint, by which a resumed run refuses any other disk), or - "
        "for standard output (the image in order)",
    )
    get.add_argument(
        "--manifest",
        metavar="FILE",
        help="where to write the manifest (default: OUTPUT.manifest.json; for a "
        "device or -, in ebsfs's state directory, /var/lib/ebsfs/get/ for root, "
        "$XDG_STATE_HOME/ebsfs/get/ (~/.local/state/ebsfs/get/) for others, as "
        "SNAPSHOT_ID-DEVICE.manifest.json or SNAPSHOT_ID-stdout-TIME.manifest.json, "
        "named in the summary; a device's resume record goes beside it)",
    )
    get.add_argument(
        "--base-image",
        metavar="OLD_IMAGE",
        help="incremental copy: OLD_IMAGE is a finished copy (with its "
        "manifest) of an earlier snapshot of the same volume; blocks "
        "ListChangedBlocks does not name are copied from it, checked "
        "against its manifest, and only the changed ones are fetched",
    )
    get.add_argument(
        "--base-manifest",
        metavar="FILE",
        help="the manifest of --base-image (default: OLD_IMAGE.manifest.json)",
    )
    get.add_argument(
        "--md5",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also record the image's MD5, beside its SHA-256 (the older "
        "forensic convention; off by default: MD5 takes one core per "
        "0.7 GB/s of image, never-written blocks included, and on a "
        "two-core machine it made copies 1.2-1.5 times slower)",
    )
    get.add_argument(
        "--no-image-hash",
        dest="image_hash",
        action="store_false",
        help="no SHA-256 of the whole image: the manifest still records "
        "each written block's SHA-256 (zeros elsewhere), which pins "
        "every byte, and `verify` checks them all; saves hashing the "
        "never-written bytes (about 0.6 s of a core per GiB of "
        "volume), most of a copy of a mostly empty volume, at the "
        "cost of a digest to compare with sha256sum's",
    )
    get.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress and no summary (errors still go to stderr)",
    )
    get.add_argument(
        "--json",
        action="store_true",
        help="at the end, one JSON object on stdout instead of the summary line: "
        "snapshot_id, output, manifest, volume_size, written_blocks, counts (where "
        "the blocks came from), sha256, md5, started, finished, already_done, "
        "throttled (answers waited out); not with OUTPUT - (stdout is the image)",
    )
    engine_arguments(
        get,
        cache_help="memory for blocks on their way to OUTPUT, e.g. 256M "
        "(default: 512M); at most max(2 x --max-fetches, SIZE / 1 MiB) "
        "blocks are held at once, whatever the volume size",
        timeout_help="longest one block may take (retries included) before "
        f"the copy stops; run it again to resume (default: {READ_TIMEOUT:g})",
    )
    get.add_argument(
        "--throttle-wait",
        type=positive_float,
        default=COPY_THROTTLE_WAIT,
        metavar="SECONDS",
        help="how long one block may wait out throttling by the service "
        "(RequestThrottledException: the account or snapshot is busy), with "
        "backoff and jitter, before the copy stops (default: %(default)g, an hour; "
        "a mount's reads keep their --read-timeout instead). Time spent "
        "throttled does not count against --read-timeout",
    )
    cache_dir_arguments(get).add_argument(
        "--cache-dir-write-only",
        dest="cache_write_only",
        action="store_true",
        help="with --cache-dir: take no block from DIR, fetch every one from the "
        "service (also those an earlier run of this copy took from DIR), and still "
        "store them there; for acquisitions that must not rely on bytes an earlier "
        "session left on local disk. Without it, the manifest names the blocks that "
        "came from DIR",
    )
    connection_arguments(get)
    ec2_argument(get, "its metadata goes in the manifest when ec2:DescribeSnapshots is allowed")


def cmd_get(args: argparse.Namespace) -> int:
    from ebsfs.acquire import get as acquire
    from ebsfs.cli.progress import plural, progress_for, throttling
    from ebsfs.engine.diff import human
    from ebsfs.service import ec2
    from ebsfs.service.retry import RetryPolicy

    if args.json and args.output == "-":
        raise UserInputError("--json needs an OUTPUT other than -: standard output is the image")
    config = engine_config(args, RetryPolicy(throttle_budget=args.throttle_wait))
    config.prefetch_metadata = False  # a copy reads every block anyway
    quiet = args.quiet

    def describe_snapshot() -> tuple[dict[str, object] | None, str | None]:
        described = ec2.lookup(config.connection, [args.snapshot_id], args.ec2_endpoint_url)
        note = described.note
        if note:
            log.info("manifest without EC2 metadata: %s", note)
            # EC2 was asked and said no: one line, so that nobody expects it there.
            if described.asked and not quiet and args.verbose == 0:
                # The note quotes EC2's answer: no raw control characters.
                print(
                    f"ebsfs: info: manifest without EC2 metadata: {printable(note)}",
                    file=sys.stderr,
                )
        info = described.found.get(args.snapshot_id)
        return (info.as_json() if info else None), note

    request = acquire.GetRequest(
        args.snapshot_id,
        args.output,
        manifest=args.manifest,
        base_image=args.base_image,
        base_manifest=args.base_manifest,
        md5=args.md5,
        image_hash=args.image_hash,
        metadata=describe_snapshot,
        cache_write_only=args.cache_write_only,
    )
    label = args.snapshot_id if args.output == "-" else os.path.basename(args.output)
    try:
        result = acquire.get(config, request, progress_for(label, quiet))
    except RetriesExhausted as err:
        if not isinstance(err.__cause__, Throttled):
            raise
        raise RetriesExhausted(
            f"{err} (a longer --throttle-wait waits more; the same command resumes)"
        ) from err
    except BaseException as err:  # Ctrl-C, maybe inside trio's exception groups
        if not isinstance(first_leaf(err), KeyboardInterrupt):
            raise
        print("ebsfs: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    m = result.manifest
    if args.json:
        print(json.dumps(summary_json(result), indent=2))
        return 0
    if quiet:
        return 0
    if result.already_done:
        print(
            f"ebsfs: {printable(args.output)} is already a finished copy of {m.snapshot_id} "
            f"(manifest {result.manifest_path}); `ebsfs verify` checks it",
            file=sys.stderr,
        )
        return 0
    counts = m.counts
    got = f"{counts.get('fetched_blocks', 0)} fetched"
    if counts.get("disk_cache_blocks"):
        got += f", {counts['disk_cache_blocks']} from the disk cache"
    if counts.get("base_blocks"):
        got += f", {counts['base_blocks']} from the base image"
    if counts.get("resumed_blocks"):
        got += f", {counts['resumed_blocks']} from the earlier run"
    print(
        f"ebsfs: {m.snapshot_id} -> {printable(args.output)}: {human(m.volume_size)}, "
        f"{plural(m.written_blocks, 'written block')} ({got}); {image_digests(m)}; manifest "
        f"{result.manifest_path}"
        + (f"; {throttling(result.throttles)}" if result.throttles else ""),
        file=sys.stderr,
    )
    return 0


def summary_json(result: GetResult) -> dict[str, Any]:
    """What the summary line says, for programs (`get --json`)."""
    m = result.manifest
    return {
        "snapshot_id": m.snapshot_id,
        "output": result.output,
        "manifest": result.manifest_path,
        "volume_size": m.volume_size,
        "written_blocks": m.written_blocks,
        "counts": m.counts,
        "sha256": m.sha256,
        "md5": m.md5,
        "started": m.started,
        "finished": m.finished,
        "already_done": result.already_done,
        "throttled": result.throttles,
    }


def image_digests(m: Manifest) -> str:
    """The whole-image digests a manifest records, for a summary line."""
    if m.sha256 is None:
        return "no whole-image hash (--no-image-hash)"
    return f"sha256 {m.sha256}" + (f", md5 {m.md5}" if m.md5 else "")
