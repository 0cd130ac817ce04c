"""Command line: options in, one-line errors and exit codes out. Nothing below this
module prints to the user or exits."""

from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import os
import re
import sys
from collections.abc import Callable
from typing import NoReturn

import trio

from ebsfs import __version__, engine
from ebsfs.client import BotoEbsApi, ConnectionOptions
from ebsfs.engine import (
    DEFAULT_CACHE_DIR_SIZE,
    DEFAULT_CACHE_SIZE,
    Engine,
    EngineConfig,
    check_snapshot_id,
)
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
from ebsfs.retry import RetryPolicy
from ebsfs.stats import format_report

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


def _connection_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("AWS connection (default: the standard AWS chain)")
    group.add_argument("--region", help="AWS region of the snapshots (default: AWS_REGION, "
                       "AWS_DEFAULT_REGION or the profile's region)")
    group.add_argument("--profile", help="named profile from ~/.aws/config (default: "
                       "AWS_PROFILE or the default chain)")
    group.add_argument("--endpoint-url", help="EBS endpoint to use instead of AWS's, e.g. the "
                       "local emulator (default: AWS_ENDPOINT_URL_EBS or AWS_ENDPOINT_URL)")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging: -v for progress, -vv for every call")
    parser.add_argument("--log-file", help="append log messages to this file (default: "
                        "stderr in the foreground, syslog in the background)")


def cache_dir_arguments(parser: argparse.ArgumentParser) -> None:
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
    mount.add_argument("--cache-size", type=parse_size, default="512M", metavar="SIZE",
                       help="memory for cached blocks, e.g. 256M, 2G (default: 512M; "
                            "counted in 1 MiB slabs of two blocks, so at least 1M to cache "
                            "anything); read-ahead uses at most a quarter of it")
    mount.add_argument("--max-fetches", type=_positive_int, default=64, metavar="N",
                       help="GetSnapshotBlock calls in flight at once (default: 64)")
    mount.add_argument("--read-timeout", type=_positive_float, default=60.0, metavar="SECONDS",
                       help="longest a read may take before it fails with EIO (default: 60)")
    mount.add_argument("--request-timeout", type=_positive_float, default=20.0,
                       metavar="SECONDS",
                       help="longest wait for the service to answer one call (connect or "
                            "body) before it is retried (default: 20)")
    mount.add_argument("--allow-other", action="store_true",
                       help="let other users read the mount (non-root users need "
                            "user_allow_other in /etc/fuse.conf)")
    mount.add_argument("--fuse-debug", action="store_true", help="log every FUSE request")
    cache_dir_arguments(mount)
    _connection_arguments(mount)

    diff = commands.add_parser(
        "diff", help="list the byte ranges that differ between two snapshots",
        description="List what changed between two snapshots of the same volume, from "
                    "ListChangedBlocks (needs ebs:ListChangedBlocks): changed byte ranges, "
                    "adjacent blocks merged, and a summary. Reads no block data.",
    )
    diff.add_argument("first", metavar="FIRST_SNAPSHOT", help="the earlier snapshot")
    diff.add_argument("second", metavar="SECOND_SNAPSHOT", help="the later snapshot")
    diff.add_argument("--json", action="store_true",
                      help="print one JSON object: first, second, block_size, volume_size "
                           "(bytes), changed_blocks (sorted indexes), ranges, counts")
    _connection_arguments(diff)

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


def _connection(args: argparse.Namespace, retry: RetryPolicy, max_connections: int = 64
                ) -> ConnectionOptions:
    timeout = getattr(args, "request_timeout", 20.0)
    return ConnectionOptions(
        region=args.region, profile=args.profile, endpoint_url=args.endpoint_url,
        max_connections=max_connections, retry=retry,
        connect_timeout=min(5.0, timeout), read_timeout=timeout,
    )


def engine_config(args: argparse.Namespace, retry: RetryPolicy | None = None
                  ) -> EngineConfig:
    """The engine's settings from the options every reading command shares."""
    return EngineConfig(
        connection=_connection(args, retry or RetryPolicy()),
        cache_size=getattr(args, "cache_size", DEFAULT_CACHE_SIZE),
        max_fetches=getattr(args, "max_fetches", 64),
        read_timeout=getattr(args, "read_timeout", 60.0),
        cache_dir=getattr(args, "cache_dir", None),
        cache_dir_size=getattr(args, "cache_dir_size", DEFAULT_CACHE_DIR_SIZE),
    )


def cmd_mount(args: argparse.Namespace) -> int:
    from ebsfs import mount  # pyfuse3 is only needed here

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
    mount_config = mount.MountConfig(
        mountpoint=os.path.abspath(mountpoint), allow_other=args.allow_other,
        fuse_debug=args.fuse_debug,
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
    # Many pages against a 50 calls/s quota: retry throttling patiently.
    config = engine_config(args, RetryPolicy(attempts=6, deadline=30.0))
    api = BotoEbsApi(_connection(args, config.connection.retry, 4))
    result = trio.run(Engine(api, config, []).diff, args.first, args.second)
    if args.json:
        result.write_json(sys.stdout)
    else:
        result.write_text(sys.stdout)
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
    from ebsfs import mount

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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        setup_logging(args.verbose, args.log_file, background=False)
    except OSError as err:
        print(f"ebsfs: error: cannot open log file {args.log_file}: {err.strerror}",
              file=sys.stderr)
        return 1
    handlers = {"mount": cmd_mount, "umount": cmd_umount, "diff": cmd_diff,
                "stats": cmd_stats}
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
