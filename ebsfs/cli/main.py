"""Command line: options in, one-line errors and exit codes out. Nothing below this
module prints to the user or exits."""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import logging
import logging.handlers
import os
import re
import sys
import time
from collections.abc import Callable
from typing import NoReturn

import trio

from ebsfs.constants import __version__
from ebsfs.acquire.manifest import Manifest
from ebsfs.acquire.progress import progress_for
from ebsfs.constants import MAX_CONNECTIONS, MAX_FETCHES, READ_TIMEOUT, REQUEST_TIMEOUT
from ebsfs.engine import engine
from ebsfs.engine.diff import human
from ebsfs.engine.engine import (
    DEFAULT_CACHE_DIR_SIZE,
    DEFAULT_CACHE_SIZE,
    Engine,
    EngineConfig,
    check_snapshot_id,
)
from ebsfs.engine.stats import format_report
from ebsfs.errors import (
    AccessDenied,
    CredentialsMissing,
    CredentialsRejected,
    EbsfsError,
    EndpointUnreachable,
    InvalidSnapshotId,
    RetriesExhausted,
    SnapshotNotFound,
    UnrelatedSnapshots,
    UserInputError,
    first_leaf,
)
from ebsfs.service import ec2 as metadata
from ebsfs.service.client import BotoEbsApi, ConnectionOptions
from ebsfs.service.retry import RetryPolicy

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)

log = logging.getLogger("ebsfs")


def parse_size(text: str) -> int:
    """'512M', '2G', '1.5GiB', '65536' -> bytes (binary units)."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (examples: 512M, 2G)")
    number, unit = float(match[1]), match[2].lower()
    return int(number * 1024 ** "_kmgt".index(unit or "_"))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def _connection_arguments(parser: argparse.ArgumentParser, ebs: bool = True) -> None:
    group = parser.add_argument_group("AWS connection (default: the standard AWS chain)")
    group.add_argument("--region", help="AWS region of the snapshots (default: AWS_REGION, "
                       "AWS_DEFAULT_REGION or the profile's region)")
    group.add_argument("--profile", help="named profile from ~/.aws/config (default: "
                       "AWS_PROFILE or the default chain)")
    if ebs:
        group.add_argument("--endpoint-url", help="EBS endpoint to use instead of AWS's, e.g. "
                           "the local emulator (default: AWS_ENDPOINT_URL_EBS or "
                           "AWS_ENDPOINT_URL)")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging: -v for progress, -vv for every call")
    parser.add_argument("--log-file", help="append log messages to this file (default: "
                        "stderr in the foreground, syslog in the background)")


def _engine_arguments(parser: argparse.ArgumentParser, cache_help: str, timeout_help: str
                      ) -> None:
    """How much to hold and how to fetch: the options every command that reads blocks
    shares (mount, get), with the same names and defaults as EngineConfig."""
    group = parser.add_argument_group("cache and fetching")
    group.add_argument("--cache-size", type=parse_size, default="512M", metavar="SIZE",
                       help=cache_help)
    group.add_argument("--max-fetches", type=_positive_int, default=MAX_FETCHES,
                       metavar="N",
                       help="GetSnapshotBlock calls in flight at once, at the most (default: "
                            f"{MAX_FETCHES}; read-ahead keeps as many in flight as the "
                            "measured latency needs, no more than half the cache holds, "
                            "fewer while the service throttles)")
    group.add_argument("--read-timeout", type=_positive_float, default=READ_TIMEOUT,
                       metavar="SECONDS", help=timeout_help)
    group.add_argument("--request-timeout", type=_positive_float, default=REQUEST_TIMEOUT,
                       metavar="SECONDS",
                       help="longest wait for the service to answer one call (connect or "
                            f"body) before it is retried (default: {REQUEST_TIMEOUT:g})")


def _ec2_argument(parser: argparse.ArgumentParser, why: str) -> None:
    parser.add_argument("--ec2-endpoint-url", metavar="URL",
                        help=f"EC2 endpoint for DescribeSnapshots ({why}; default: "
                             "AWS_ENDPOINT_URL_EC2, AWS_ENDPOINT_URL or AWS's; with a custom "
                             "EBS endpoint and none of these, EC2 is not asked)")


def _cache_dir_arguments(parser: argparse.ArgumentParser) -> None:
    """--cache-dir and --cache-dir-size, for every command that reads blocks."""
    group = parser.add_argument_group("disk cache (off unless --cache-dir is given)")
    group.add_argument("--cache-dir", metavar="DIR",
                       help="keep fetched blocks in DIR (created 0700) and read them from "
                            "there later, in this and later sessions, each checked against "
                            "its SHA-256 first; snapshot data is then on local disk. DIR may "
                            "be shared by several mounts at once")
    group.add_argument("--cache-dir-size", type=parse_size, default="16G", metavar="SIZE",
                       help="space DIR may take at the most, e.g. 4G, 500G (default: 16G; "
                            "less when free space is short: the cache leaves 1G or a tenth "
                            "of its filesystem free); least recently used blocks go first")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line naming the problem, not a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ebsfs",
        description="Amazon EBS snapshots as read-only raw disk images, read on demand "
                    "through the EBS direct APIs.",
    )
    parser.add_argument("--version", action="version", version=f"ebsfs {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=_Parser)

    mount = commands.add_parser(
        "mount", help="mount snapshots as MOUNTPOINT/<snapshot-id>.img",
        description="Mount each snapshot as MOUNTPOINT/<snapshot-id>.img, a read-only file "
                    "of VolumeSize GiB. Returns once the mount is ready and keeps serving in "
                    "the background (use -f to stay in front). Needs ebs:ListSnapshotBlocks "
                    "and ebs:GetSnapshotBlock.",
        epilog="example: ebsfs mount snap-0123456789abcdef0 /mnt/snap && "
               "losetup -r -P --show -f /mnt/snap/snap-0123456789abcdef0.img",
    )
    mount.add_argument("snapshot_ids", nargs="+", metavar="SNAPSHOT_ID",
                       help="snapshot ids (snap-...), completed and in this account")
    mount.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing empty directory")
    mount.add_argument("-f", "--foreground", action="store_true",
                       help="stay in the foreground; Ctrl-C unmounts")
    _engine_arguments(mount, cache_help="memory for cached blocks, e.g. 256M, 2G (default: "
                      "512M; at least 1M to cache anything); read-ahead uses at most a "
                      "quarter of it",
                      timeout_help="longest a read may take before it fails with EIO "
                      f"(default: {READ_TIMEOUT:g})")
    mount.add_argument("--allow-other", action="store_true",
                       help="let other users read the mount (non-root users need "
                            "user_allow_other in /etc/fuse.conf)")
    mount.add_argument("--fuse-debug", action="store_true", help="log every FUSE request")
    _cache_dir_arguments(mount)
    _connection_arguments(mount)
    _ec2_argument(mount, "the images' mtime is the snapshot's StartTime when "
                  "ec2:DescribeSnapshots is allowed")

    diff = commands.add_parser(
        "diff", help="list the byte ranges (or, with --files, the files) that differ "
                     "between two snapshots",
        description="List what changed between two snapshots of the same volume, from "
                    "ListChangedBlocks (needs ebs:ListChangedBlocks): changed byte ranges, "
                    "adjacent blocks merged, and a summary. Reads no block data. With "
                    "--files, the files, directories and symlinks added, deleted or "
                    "modified in each filesystem (ext2/3/4, NTFS, FAT, HFS+ through "
                    "pytsk3; XFS with the optional extra ebsfs[xfs]), reading only "
                    "filesystem metadata (also needs ebs:ListSnapshotBlocks and "
                    "ebs:GetSnapshotBlock); blocks unchanged between the two are fetched "
                    "once.",
        epilog="example: ebsfs diff --files snap-0aaa snap-0bbb   (lines as git diff "
               "--name-status: A added, D deleted, M modified with what changed, R old new "
               "renamed)",
    )
    diff.add_argument("first", metavar="FIRST_SNAPSHOT", help="the earlier snapshot")
    diff.add_argument("second", metavar="SECOND_SNAPSHOT", help="the later snapshot")
    diff.add_argument("--json", action="store_true",
                      help="print one JSON object: first, second, block_size, volume_size "
                           "(bytes), changed_blocks (sorted indexes), ranges, counts; with "
                           "--files: first, second, filesystems and files (path, change, "
                           "partition, type, reasons, old_path, before/after metadata)")
    diff.add_argument("--files", action="store_true",
                      help="list changed files per filesystem instead of byte ranges; a "
                           "filesystem that cannot be read gets a one-line note and its "
                           "changed byte ranges")
    diff.add_argument("--atime", action="store_true",
                      help="with --files, also count access-time changes (files only read "
                           "between the snapshots); ignored by default")
    diff.add_argument("--cache-size", type=parse_size, default="512M", metavar="SIZE",
                      help="with --files, memory for cached blocks (default: 512M): "
                           "metadata read in the first snapshot is served from it to the "
                           "second")
    _cache_dir_arguments(diff)
    _connection_arguments(diff)

    get = commands.add_parser(
        "get", help="copy a snapshot to a raw image file, a block device or stdout",
        description="Copy a snapshot's whole volume (exactly VolumeSize bytes) to OUTPUT, "
                    "every block checked against its SHA-256, and write "
                    "OUTPUT.manifest.json: the image's SHA-256 (and MD5 with --md5), each "
                    "block's SHA-256, times, versions and the snapshot's EC2 metadata. A "
                    "file is written sparse (never-written blocks are holes) as OUTPUT.part "
                    "until the manifest is written. Interrupted (Ctrl-C, a kill, a lost "
                    "network)? Run the same command again: it checks what was written and "
                    "fetches only the rest. Needs ebs:ListSnapshotBlocks and "
                    "ebs:GetSnapshotBlock (ebs:ListChangedBlocks with --base-image).",
        epilog="examples: ebsfs get snap-0123456789abcdef0 evidence.img && ebsfs verify "
               "evidence.img | ebsfs get snap-0123 - | gzip > disk.img.gz | "
               "ebsfs get --base-image monday.img snap-0tuesday tuesday.img",
    )
    get.add_argument("snapshot_id", metavar="SNAPSHOT_ID", help="the snapshot (snap-...)")
    get.add_argument("output", metavar="OUTPUT",
                     help="a new file, a block device at least VolumeSize bytes large "
                          "(never-written blocks are zeroed; nothing past the image is "
                          "written), or - for standard output (the image in order)")
    get.add_argument("--manifest", metavar="FILE",
                     help="where to write the manifest (default: OUTPUT.manifest.json; "
                          "for a device or -, SNAPSHOT_ID.manifest.json here)")
    get.add_argument("--base-image", metavar="OLD_IMAGE",
                     help="incremental copy: OLD_IMAGE is a finished copy (with its "
                          "manifest) of an earlier snapshot of the same volume; blocks "
                          "ListChangedBlocks does not name are copied from it, checked "
                          "against its manifest, and only the changed ones are fetched")
    get.add_argument("--base-manifest", metavar="FILE",
                     help="the manifest of --base-image (default: OLD_IMAGE.manifest.json)")
    get.add_argument("--md5", action=argparse.BooleanOptionalAction, default=False,
                     help="also record the image's MD5, beside its SHA-256 (the older "
                          "forensic convention; off by default: MD5 takes one core per "
                          "0.7 GB/s of image, never-written blocks included, and on a "
                          "two-core machine it made copies 1.2-1.5 times slower)")
    get.add_argument("--no-image-hash", dest="image_hash", action="store_false",
                     help="no SHA-256 of the whole image: the manifest still records "
                          "each written block's SHA-256 (zeros elsewhere), which pins "
                          "every byte, and `verify` checks them all; saves hashing the "
                          "never-written bytes (about 0.6 s of a core per GiB of "
                          "volume), most of a copy of a mostly empty volume, at the "
                          "cost of a digest to compare with sha256sum's"),
    get.add_argument("-q", "--quiet", action="store_true",
                     help="no progress and no summary (errors still go to stderr)")
    _engine_arguments(get, cache_help="memory for blocks on their way to OUTPUT, e.g. 256M "
                      "(default: 512M); at most max(2 x --max-fetches, SIZE / 1 MiB) "
                      "blocks are held at once, whatever the volume size",
                      timeout_help="longest one block may take (retries included) before "
                      f"the copy stops; run it again to resume (default: {READ_TIMEOUT:g})")
    _cache_dir_arguments(get)
    _connection_arguments(get)
    _ec2_argument(get, "its metadata goes in the manifest when ec2:DescribeSnapshots is "
                  "allowed")

    verify = commands.add_parser(
        "verify", help="check an image made by `ebsfs get` against its manifest",
        description="Re-read IMAGE (a file or a device) and check it against its manifest: "
                    "each written block's SHA-256, zeros everywhere else, and the whole "
                    "image's SHA-256 and MD5 where the manifest has them. Exit 0 when all "
                    "match; otherwise each bad block is named (index and byte offset) and "
                    "the exit status is 1. Reads only local files.",
    )
    verify.add_argument("image", metavar="IMAGE")
    verify.add_argument("--manifest", metavar="FILE",
                        help="the manifest (default: IMAGE.manifest.json)")
    verify.add_argument("-q", "--quiet", action="store_true", help="no progress")
    verify.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    verify.add_argument("--log-file", help="append log messages to this file")

    ls = commands.add_parser(
        "ls", help="list completed snapshots (EC2 DescribeSnapshots)",
        description="List completed snapshots: id, volume, size, start time, encrypted, "
                    "description; oldest first. Needs ec2:DescribeSnapshots.",
    )
    ls.add_argument("--volume", action="append", default=[], metavar="VOLUME_ID",
                    help="only snapshots of this volume (repeatable)")
    ls.add_argument("--owner", action="append", default=[], metavar="OWNER",
                    help="owner account id, or self or amazon (repeatable; default: self)")
    ls.add_argument("--json", action="store_true",
                    help="print a JSON list of objects with EC2's field names")
    _connection_arguments(ls, ebs=False)
    _ec2_argument(ls, "the endpoint asked")

    stats = commands.add_parser(
        "stats", help="what a mount has done: calls, fetches, cache hits, estimated cost",
        description="Show what the mount at MOUNTPOINT has done since it started: calls "
                    "per operation (retries included), retries and throttling, blocks and "
                    "bytes fetched, memory and disk cache hits, blocks served through "
                    "another snapshot's cached blocks (lineage), and the estimated cost of "
                    "the calls (GetSnapshotBlock $0.003 per 1,000, list calls $0.0006 per "
                    "1,000). Read from the extended attribute user.ebsfs.stats of the mount "
                    "point.",
    )
    stats.add_argument("mountpoint", metavar="MOUNTPOINT")
    stats.add_argument("--json", action="store_true", help="print the figures as one JSON "
                       "object (bytes, counts and dollars)")
    stats.add_argument("-v", "--verbose", action="count", default=0, help=argparse.SUPPRESS)
    stats.add_argument("--log-file", help=argparse.SUPPRESS)

    umount = commands.add_parser(
        "umount", help="unmount and wait for the mount process to exit",
        description="Unmount an ebsfs mount and wait for its process to exit.",
    )
    umount.add_argument("mountpoint", metavar="MOUNTPOINT")
    umount.add_argument("--lazy", action="store_true",
                        help="detach now even if files are open (fusermount3 -z)")
    umount.add_argument("-v", "--verbose", action="count", default=0, help=argparse.SUPPRESS)
    umount.add_argument("--log-file", help=argparse.SUPPRESS)
    return parser


def setup_logging(verbose: int, log_file: str | None, background: bool) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler: logging.Handler
    if log_file:
        handler = logging.FileHandler(log_file)
    elif background and os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler("/dev/log")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("ebsfs").setLevel(level)
    # botocore warns with a traceback on every failed credential refresh; ebsfs says
    # in one line what failed and what to fix. Its tracebacks are for -v.
    logging.getLogger("botocore.credentials").setLevel(
        logging.ERROR if verbose == 0 else logging.WARNING)
    # botocore at DEBUG logs request URLs, and with them block tokens: never raise it.


def _connection(args: argparse.Namespace, retry: RetryPolicy, max_connections: int = MAX_CONNECTIONS
                ) -> ConnectionOptions:
    timeout = getattr(args, "request_timeout", REQUEST_TIMEOUT)
    return ConnectionOptions(
        region=args.region, profile=args.profile,
        endpoint_url=getattr(args, "endpoint_url", None),
        max_connections=max_connections, retry=retry,
        connect_timeout=min(5.0, timeout), read_timeout=timeout,
    )


def engine_config(args: argparse.Namespace, retry: RetryPolicy | None = None
                  ) -> EngineConfig:
    """The engine's settings from the options every reading command shares."""
    return EngineConfig(
        connection=_connection(args, retry or RetryPolicy()),
        cache_size=getattr(args, "cache_size", DEFAULT_CACHE_SIZE),
        max_fetches=getattr(args, "max_fetches", MAX_FETCHES),
        read_timeout=getattr(args, "read_timeout", READ_TIMEOUT),
        cache_dir=getattr(args, "cache_dir", None),
        cache_dir_size=getattr(args, "cache_dir_size", DEFAULT_CACHE_DIR_SIZE),
    )


def cmd_mount(args: argparse.Namespace) -> int:
    from ebsfs.fuse import mount  # pyfuse3 is only needed here

    mountpoint = args.mountpoint
    for snapshot_id in args.snapshot_ids:
        check_snapshot_id(snapshot_id)
    if not os.path.exists(mountpoint):
        raise UserInputError(f"mount point {mountpoint} does not exist")
    if not os.path.isdir(mountpoint):
        raise UserInputError(f"mount point {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise UserInputError(f"{mountpoint} is already a mount point")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise UserInputError("/dev/fuse is missing or not accessible (is fuse3 installed?)")
    config = engine_config(args)
    checked = engine.plan(config, args.snapshot_ids)
    described = metadata.lookup(config.connection, args.snapshot_ids, args.ec2_endpoint_url)
    if described.note:
        log.info("image mtimes are the mount time: %s", described.note)
    mount_config = mount.MountConfig(
        mountpoint=os.path.abspath(mountpoint), allow_other=args.allow_other,
        fuse_debug=args.fuse_debug,
        start_times={s: info.start_time.timestamp() for s, info in described.found.items()},
    )
    count = len(checked.snapshots)
    if args.foreground:
        mount.serve(engine.build(config, checked), mount_config, on_ready=lambda: print(
            f"ebsfs: mounted {count} snapshot(s) at {mountpoint}; Ctrl-C to unmount",
            file=sys.stderr, flush=True))
        return 0

    def in_background(ready: Callable[[], None]) -> None:
        setup_logging(args.verbose, args.log_file, background=True)
        mount.serve(engine.build(config, checked), mount_config, on_ready=ready)

    return mount.run_in_background(in_background)


def cmd_diff(args: argparse.Namespace) -> int:
    check_snapshot_id(args.first)
    check_snapshot_id(args.second)
    if args.atime and not args.files:
        raise UserInputError("--atime needs --files")
    if args.files:
        return _diff_files(args)
    # Many pages against a 50 calls/s quota: retry throttling patiently.
    config = engine_config(args, RetryPolicy(attempts=6, deadline=30.0))
    api = BotoEbsApi(_connection(args, config.connection.retry, 4))
    result = trio.run(Engine(api, config, []).diff, args.first, args.second)
    if args.json:
        result.write_json(sys.stdout)
    else:
        result.write_text(sys.stdout)
    return 0


def _diff_files(args: argparse.Namespace) -> int:
    from ebsfs.fileobj import open_with
    from ebsfs.forensics.filediff import diff_files

    if args.first == args.second:
        raise UserInputError("the two snapshots are the same")
    files = open_with(engine_config(args), [args.first, args.second], readahead=False)
    progress = _Progress() if sys.stderr.isatty() else None
    try:
        result = diff_files(files[0], files[1], atime=args.atime, progress=progress)
    finally:
        if progress is not None:
            progress.done()
        for f in files:
            f.close()
    if args.json:  # the text says it in its place; JSON on stdout is for programs
        for fs in result.filesystems:
            if fs.note is not None:
                print(f"ebsfs: note: {fs.label}: files not listed: {fs.note}",
                      file=sys.stderr)
        result.write_json(sys.stdout)
    else:
        result.write_text(sys.stdout)
    return 0


class _Progress:
    """One line on the terminal, rewritten in place at most five times a second."""

    def __init__(self) -> None:
        self._last = 0.0
        self._shown = False

    def __call__(self, text: str) -> None:
        now = time.monotonic()
        if now - self._last < 0.2:
            return
        self._last = now
        sys.stderr.write(f"\r\033[Kebsfs: {text}")
        sys.stderr.flush()
        self._shown = True

    def done(self) -> None:
        if self._shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def cmd_get(args: argparse.Namespace) -> int:
    from ebsfs.acquire import get as acquire

    config = engine_config(args)
    quiet = args.quiet

    def describe_snapshot() -> tuple[dict[str, object] | None, str | None]:
        described = metadata.lookup(config.connection, [args.snapshot_id],
                                    args.ec2_endpoint_url)
        note = described.note
        if note:
            log.info("manifest without EC2 metadata: %s", note)
            # EC2 was asked and said no: one line, so that nobody expects it there.
            if described.asked and not quiet and args.verbose == 0:
                print(f"ebsfs: info: manifest without EC2 metadata: {note}", file=sys.stderr)
        info = described.found.get(args.snapshot_id)
        return (info.as_json() if info else None), note

    request = acquire.GetRequest(
        args.snapshot_id, args.output, manifest=args.manifest, base_image=args.base_image,
        base_manifest=args.base_manifest, md5=args.md5, image_hash=args.image_hash,
        metadata=describe_snapshot,
    )
    label = args.snapshot_id if args.output == "-" else os.path.basename(args.output)
    try:
        result = acquire.get(config, request, progress_for(label, quiet))
    except BaseException as err:  # Ctrl-C, maybe inside trio's exception groups
        if not isinstance(first_leaf(err), KeyboardInterrupt):
            raise
        print("ebsfs: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    m = result.manifest
    if quiet:
        return 0
    if result.already_done:
        print(f"ebsfs: {args.output} is already a finished copy of {m.snapshot_id} "
              f"(manifest {result.manifest_path}); `ebsfs verify` checks it", file=sys.stderr)
        return 0
    counts = m.counts
    got = f"{counts.get('fetched_blocks', 0)} fetched"
    if counts.get("base_blocks"):
        got += f", {counts['base_blocks']} from the base image"
    if counts.get("resumed_blocks"):
        got += f", {counts['resumed_blocks']} from the earlier run"
    print(f"ebsfs: {m.snapshot_id} -> {args.output}: {human(m.volume_size)}, "
          f"{m.written_blocks} written blocks ({got}); {image_digests(m)}; manifest "
          f"{result.manifest_path}", file=sys.stderr)
    return 0


def image_digests(m: Manifest) -> str:
    """The whole-image digests a manifest records, for a summary line."""
    if m.sha256 is None:
        return "no whole-image hash (--no-image-hash)"
    return f"sha256 {m.sha256}" + (f", md5 {m.md5}" if m.md5 else "")


def cmd_verify(args: argparse.Namespace) -> int:
    from ebsfs.acquire.verify import verify

    def bad(index: int, offset: int, reason: str) -> None:
        print(f"{args.image}: block {index} (offset {offset}): {reason}", flush=True)

    result = verify(args.image, args.manifest, bad,
                    progress_for(os.path.basename(args.image), args.quiet))
    m = result.manifest
    if result.ok:
        print(f"{args.image}: OK: {m.snapshot_id}, {m.written_blocks} written blocks, "
              f"{image_digests(m)}")
        return 0
    if result.bad_blocks:
        what = f"{result.bad_blocks} bad block{'s' if result.bad_blocks != 1 else ''}"
    else:
        what = "the image's digests differ from the manifest's (was the manifest changed?)"
    print(f"ebsfs: error: {args.image} does not match its manifest: {what}", file=sys.stderr)
    return 1


def cmd_ls(args: argparse.Namespace) -> int:
    found = metadata.Ec2Snapshots(_connection(args, RetryPolicy()), args.ec2_endpoint_url
                                  ).list(args.owner or ["self"], args.volume)
    if args.json:
        json.dump([s.as_json() for s in found], sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    rows = [("SNAPSHOT", "VOLUME", "SIZE", "START (UTC)", "ENCRYPTED", "DESCRIPTION")]
    rows += [(s.snapshot_id, s.volume_id, f"{s.volume_size_gib} GiB",
              s.start_time.strftime("%Y-%m-%d %H:%M:%S"), "yes" if s.encrypted else "no",
              " ".join(s.description.split())) for s in found]
    widths = [max(len(row[n]) for row in rows) for n in range(5)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
              + "  " + row[5])
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    path = args.mountpoint
    if not os.path.ismount(path):
        raise UserInputError(f"{path} is not a mount point")
    try:
        report = json.loads(os.getxattr(path, "user.ebsfs.stats"))
    except OSError as err:
        raise UserInputError(f"{path} is not an ebsfs mount (no statistics: "
                             f"{err.strerror})") from err
    except ValueError as err:
        raise UserInputError(f"{path}: statistics unreadable: {err}") from err
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    from ebsfs.fuse import mount  # pyfuse3 is only needed here

    mount.unmount(args.mountpoint, lazy=args.lazy)
    return 0


def describe(err: BaseException) -> str:
    """The one line a user sees for an error."""
    if isinstance(err, RetriesExhausted) and isinstance(err.__cause__, EndpointUnreachable):
        return f"{err.__cause__} (is --endpoint-url right and the endpoint up?)"
    if isinstance(err, SnapshotNotFound):
        return (f"snapshot not found: {err} (check the id and --region; only completed "
                "snapshots in this account can be read)")
    if isinstance(err, AccessDenied):
        return (f"access denied: {err} (needs ebs:ListSnapshotBlocks and "
                "ebs:GetSnapshotBlock, ebs:ListChangedBlocks for diff, and kms:Decrypt for "
                "encrypted snapshots)")
    if isinstance(err, CredentialsRejected):
        return (f"AWS rejected the credentials: {err} (check the access key, secret and "
                "session token of the profile or environment in use, and the clock)")
    if isinstance(err, UnrelatedSnapshots):
        return f"the snapshots are not of the same volume lineage: {err}"
    if isinstance(err, CredentialsMissing | UserInputError | InvalidSnapshotId):
        return str(err)
    return str(err) or type(err).__name__


YOUNG_COLLECTION_EVERY = 10_000
"""Container allocations between two young-generation collections (Python's default is
700). Reading blocks allocates many short-lived objects (trio tasks, outcomes) and
makes almost no cycles; at 700 a cold read through the mount collected about every
seven blocks (docs/performance.md)."""


def main(argv: list[str] | None = None) -> int:
    previous = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_EVERY, *previous[1:])
    # Python's last collection at exit walks every object boto3 made: 0.1 s at the end
    # of an `ebsfs get`. Frozen objects are left out of it; none of ours needs it.
    atexit.unregister(gc.freeze)  # once, however often main() runs in one process
    atexit.register(gc.freeze)
    try:
        return _main(argv)
    finally:
        gc.set_threshold(*previous)  # as it was, for callers in the same process


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        setup_logging(args.verbose, args.log_file, background=False)
    except OSError as err:
        print(f"ebsfs: error: cannot open log file {args.log_file}: {err.strerror}",
              file=sys.stderr)
        return 1
    handlers = {"mount": cmd_mount, "umount": cmd_umount, "diff": cmd_diff, "get": cmd_get,
                "verify": cmd_verify, "ls": cmd_ls, "stats": cmd_stats}
    try:
        return handlers[args.command](args)
    except EbsfsError as err:
        print(f"ebsfs: error: {describe(err)}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:  # from trio, in the foreground
        leaf = first_leaf(group)
        if isinstance(leaf, KeyboardInterrupt):
            return 130
        text = describe(leaf) if isinstance(leaf, EbsfsError) else f"{type(leaf).__name__}: {leaf}"
        print(f"ebsfs: error: {text}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ebsfs: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
