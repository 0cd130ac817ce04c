"""`ebsfs mount` and `ebsfs umount`: the FUSE face from the command line. pyfuse3 and
the engine are imported only when one of them runs."""

from __future__ import annotations

import argparse
import concurrent.futures
import grp
import logging
import os
import pwd
import re
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from ebsfs.cli.background import run_in_background
from ebsfs.cli.get import ExamplesFormatter
from ebsfs.cli.logs import SYSLOG_SOCKET, background_log, default_log_file, setup_logging
from ebsfs.cli.options import (
    cache_dir_arguments,
    connection_arguments,
    ec2_argument,
    engine_arguments,
    engine_config,
    prefetch_arguments,
)
from ebsfs.constants import READ_TIMEOUT
from ebsfs.errors import UserInputError

if TYPE_CHECKING:
    from ebsfs.cli.options import Commands
    from ebsfs.service.session import ConnectionOptions


log = logging.getLogger(__name__)


def add_parser(commands: Commands) -> None:
    mount = commands.add_parser(
        "mount",
        help="mount snapshots as MOUNTPOINT/<snapshot-id>.img",
        description="Mount each snapshot as MOUNTPOINT/<snapshot-id>.img, a read-only file "
        "of VolumeSize GiB. Returns once the mount is ready and keeps serving in "
        "the background (use -f to stay in front) and prints one line saying "
        "where its log goes: --log-file, else syslog, else (no syslog socket) "
        "/var/log/ebsfs/MOUNTPOINT.log for root, $XDG_STATE_HOME/ebsfs/ "
        "(~/.local/state/ebsfs/) for others, MOUNTPOINT's path with / as - "
        "(as systemd-escape --path). Needs ebs:ListSnapshotBlocks and "
        "ebs:GetSnapshotBlock.",
        epilog="example:\n"
        "  ebsfs mount snap-0123456789abcdef0 /mnt/snap\n"
        "  losetup -r -P --show -f /mnt/snap/snap-0123456789abcdef0.img\n"
        "-P asks the kernel for the partitions as /dev/loopNpM. Where it makes none "
        "(no partition support for loop devices, some containers), loop a "
        "partition file of the mount instead:\n"
        "  losetup -r --show -f /mnt/snap/snap-0123456789abcdef0-part1.img",
        formatter_class=ExamplesFormatter,
    )
    mount.set_defaults(run=cmd_mount)
    mount.add_argument(
        "snapshot_ids",
        nargs="*",
        metavar="SNAPSHOT_ID",
        help="snapshot ids (snap-...), completed and in this account (or none, with --volume)",
    )
    mount.add_argument(
        "mountpoint", metavar="MOUNTPOINT", help="an existing empty directory (see --nonempty)"
    )
    mount.add_argument(
        "--nonempty",
        action="store_true",
        help="mount even if MOUNTPOINT is not empty, as FUSE's -o nonempty did: its "
        "files are hidden, not lost, until the unmount (by default a non-empty "
        "MOUNTPOINT is refused)",
    )
    mount.add_argument(
        "-f", "--foreground", action="store_true", help="stay in the foreground; Ctrl-C unmounts"
    )
    engine_arguments(
        mount,
        cache_help="memory for cached blocks, e.g. 256M, 2G (default: "
        "512M; at least 1M to cache anything); read-ahead uses at most a "
        "quarter of it",
        timeout_help="longest a read may take before it fails with EIO "
        f"(default: {READ_TIMEOUT:g})",
    )
    mount.add_argument(
        "--allow-other",
        action="store_true",
        help="let other users read the mount, as --uid, --gid, --file-mode and "
        "--dir-mode allow (the kernel checks them; by default anyone may read); "
        "non-root users need user_allow_other in /etc/fuse.conf",
    )
    mount.add_argument(
        "--uid",
        type=user_id,
        metavar="USER",
        help="owner of every file and directory shown: a user name or a number "
        "(default: the user who mounts)",
    )
    mount.add_argument(
        "--gid",
        type=group_id,
        metavar="GROUP",
        help="group of every file and directory shown: a group name or a number "
        "(default: the group of the user who mounts)",
    )
    mount.add_argument(
        "--file-mode",
        type=read_only_mode,
        default=0o444,
        metavar="MODE",
        help="permission bits of every file, in octal, read and execute bits only: the "
        "mount is read-only (default: 0444, anyone who can reach the mount reads; "
        "0440 with --gid keeps the evidence to a group when --allow-other is given)",
    )
    mount.add_argument(
        "--dir-mode",
        type=read_only_mode,
        default=0o555,
        metavar="MODE",
        help="permission bits of the mount's directory, in octal, read and execute bits "
        "only (default: 0555; 0550 with --gid lets only the group list and open)",
    )
    mount.add_argument(
        "--volume",
        action="append",
        default=[],
        metavar="VOLUME_ID",
        help="mount every completed snapshot of this volume (ours and those shared "
        "with us, EC2 DescribeSnapshots; repeatable, may be combined with snapshot "
        "ids), with by-time/, a directory of links named by StartTime such as "
        "2026-05-28T20:26:40Z to each image; neighbouring snapshots share "
        "unchanged blocks. Needs ec2:DescribeSnapshots and ebs:ListChangedBlocks",
    )
    mount.add_argument(
        "--refresh",
        type=non_negative_float,
        default=REFRESH,
        metavar="SECONDS",
        help="with --volume, ask EC2 again this often and show the snapshots taken since "
        f"(default: {REFRESH:g}; 0: never)",
    )
    mount.add_argument("--fuse-debug", action="store_true", help="log every FUSE request")
    cache_dir_arguments(mount)
    prefetch_arguments(mount)
    connection_arguments(mount)
    ec2_argument(
        mount, "the images' mtime is the snapshot's StartTime when ec2:DescribeSnapshots is allowed"
    )


REFRESH = 300.0
"""Seconds between two asks of EC2 for a volume's new snapshots: DescribeSnapshots is
cheap, and a snapshot takes minutes to complete anyway."""


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: seconds, 0 or more")
    return value


def _numeric_id(text: str) -> int | None:
    """A uid or gid given as digits; 2**32-1 is the kernel's "no id" (-1), refused."""
    if re.fullmatch(r"[0-9]{1,10}", text) and int(text) < 2**32 - 1:
        return int(text)
    if text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid id (0 to {2**32 - 2})")
    return None


def user_id(text: str) -> int:
    """--uid: a number, or the name of a user this system knows."""
    number = _numeric_id(text)
    if number is not None:
        return number
    try:
        return pwd.getpwnam(text).pw_uid
    except (KeyError, ValueError):  # ValueError: a NUL in the name
        raise argparse.ArgumentTypeError(f"no user {text!r} (a user name or a number)") from None


def group_id(text: str) -> int:
    """--gid: a number, or the name of a group this system knows."""
    number = _numeric_id(text)
    if number is not None:
        return number
    try:
        return grp.getgrnam(text).gr_gid
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"no group {text!r} (a group name or a number)") from None


def read_only_mode(text: str) -> int:
    """--file-mode, --dir-mode: octal permission bits with no write bit (the mount is
    read-only: a write bit would only promise what EROFS refuses) and no setuid,
    setgid or sticky bit."""
    match = re.fullmatch(r"(?:0o?)?([0-7]{1,4})", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode (examples: 0444, 440)")
    mode = int(match[1], 8)
    if mode & ~0o777:
        raise argparse.ArgumentTypeError(f"mode {text!r}: no setuid, setgid or sticky bit")
    if mode & 0o222:
        raise argparse.ArgumentTypeError(
            f"mode {text!r} has write bits: the mount is read-only (e.g. 0444, 0440)"
        )
    return mode


def add_umount_parser(commands: Commands) -> None:
    umount = commands.add_parser(
        "umount",
        help="unmount and wait for the mount process to exit",
        description="Unmount an ebsfs mount and wait for its process to exit.",
    )
    umount.set_defaults(run=cmd_umount)
    umount.add_argument("mountpoint", metavar="MOUNTPOINT")
    umount.add_argument(
        "--lazy", action="store_true", help="detach now even if files are open (fusermount3 -z)"
    )
    umount.add_argument("-v", "--verbose", action="count", default=0, help=argparse.SUPPRESS)
    umount.add_argument("--log-file", help=argparse.SUPPRESS)


def cmd_mount(args: argparse.Namespace) -> int:
    # Only what the checks need is imported before they start: every millisecond of
    # import before the first call is a millisecond of the mount's start (issue 25).
    from ebsfs.engine.config import check_snapshot_id
    from ebsfs.engine.plan import Plan, plan
    from ebsfs.service import ec2
    from ebsfs.service.retry import RetryPolicy

    mountpoint = args.mountpoint
    if not args.snapshot_ids and not args.volume:
        raise UserInputError("nothing to mount: give snapshot ids or --volume VOLUME_ID")
    for snapshot_id in args.snapshot_ids:
        check_snapshot_id(snapshot_id)
    if not os.path.exists(mountpoint):
        raise UserInputError(f"mount point {mountpoint} does not exist")
    if not os.path.isdir(mountpoint):
        raise UserInputError(f"mount point {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise UserInputError(f"{mountpoint} is already a mount point")
    if not args.nonempty and _has_entries(mountpoint):
        raise UserInputError(
            f"mount point {mountpoint} is not empty: its files would be hidden while "
            "mounted; give --nonempty to mount over them anyway"
        )
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise UserInputError("/dev/fuse is missing or not accessible (is fuse3 installed?)")
    # Throttling is waited out as long as a read may wait, and no longer.
    config = engine_config(args, RetryPolicy(throttle_budget=args.read_timeout))
    snapshot_ids, volume_times = _with_volumes(args, config.connection)
    # The checks and the EC2 lookup wait on the network while this thread loads trio,
    # pyfuse3 and the engine (about 150 ms of the mount's start: docs/performance.md).
    # The checks' client is made first, alone: threads building clients or importing
    # at once take turns on the GIL, and the first call went out that much later.
    # Both threads are done before the fork below.
    calling = threading.Event()

    def check() -> Plan:
        try:
            return plan(config, snapshot_ids, fetch_first_block=True, calling=calling)
        finally:
            calling.set()

    with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="start") as pool:
        checking = pool.submit(check)
        calling.wait()
        named = [s for s in snapshot_ids if s not in volume_times]
        describing = pool.submit(ec2.lookup, config.connection, named, args.ec2_endpoint_url)
        from ebsfs.cli.progress import plural
        from ebsfs.engine import engine
        from ebsfs.fuse import mount as fuse_mount
        from ebsfs.fuse.operations import Ownership

        checked = checking.result()
        described = describing.result()
    if described.note:
        log.info("image mtimes are the mount time: %s", described.note)
    mount_config = fuse_mount.MountConfig(
        mountpoint=os.path.abspath(mountpoint),
        allow_other=args.allow_other,
        ownership=Ownership(args.uid, args.gid, args.file_mode, args.dir_mode),
        fuse_debug=args.fuse_debug,
        start_times={
            **{s: info.start_time.timestamp() for s, info in described.found.items()},
            **volume_times,
        },
        timeline=bool(args.volume),
        volume_source=_volume_source(args, config.connection) if args.volume else None,
        refresh=args.refresh,
        of_volumes=list(volume_times),
    )
    mounted = f"ebsfs: mounted {plural(len(checked.snapshots), 'snapshot')} at {mountpoint}"
    if args.foreground:
        fuse_mount.serve(
            engine.build(config, checked),
            mount_config,
            on_ready=lambda: print(f"{mounted}; Ctrl-C to unmount", file=sys.stderr, flush=True),
        )
        return 0

    # Only now: a mount refused by the checks above leaves no empty log behind.
    log_file = _background_log(args.log_file, mountpoint)

    def in_background(ready: Callable[[], None]) -> None:
        setup_logging(args.verbose, log_file, background=True)
        fuse_mount.serve(engine.build(config, checked), mount_config, on_ready=ready)

    code = run_in_background(in_background)
    if code == 0:  # one line: where it is and where its log goes
        print(f"{mounted}; log: {log_file or 'syslog'}", file=sys.stderr, flush=True)
    return code


def _with_volumes(
    args: argparse.Namespace, options: ConnectionOptions
) -> tuple[list[str], dict[str, float]]:
    """The snapshot ids to mount and the start times EC2 gave with --volume: the ids
    given that are of no volume named, in their order, then each volume's snapshots
    oldest first (so each shares its unchanged blocks with the one before it)."""
    if not args.volume:
        return list(args.snapshot_ids), {}
    from ebsfs.cli.volumes import volume_snapshots

    found = volume_snapshots(options, args.volume, args.ec2_endpoint_url)
    ordered = sorted(found.snapshots, key=lambda s: (s.volume_id, s.start_time, s.snapshot_id))
    of_volumes = [s.snapshot_id for s in ordered]
    named = [s for s in args.snapshot_ids if s not in of_volumes]
    log.info("%d snapshots of %s", len(of_volumes), ", ".join(args.volume))
    return named + of_volumes, found.start_times


def _volume_source(
    args: argparse.Namespace, options: ConnectionOptions
) -> Callable[[], list[tuple[str, float]]]:
    """What a refresh asks: the volumes' snapshots in the order a mount plans them."""
    volumes, endpoint = list(args.volume), args.ec2_endpoint_url

    def source() -> list[tuple[str, float]]:
        from ebsfs.cli.volumes import volume_snapshots

        found = volume_snapshots(options, volumes, endpoint).snapshots
        ordered = sorted(found, key=lambda s: (s.volume_id, s.start_time, s.snapshot_id))
        return [(s.snapshot_id, s.start_time.timestamp()) for s in ordered]

    return source


def _has_entries(directory: str) -> bool:
    """Whether `directory` holds anything (one that cannot be listed: left to FUSE)."""
    try:
        with os.scandir(directory) as entries:
            return next(entries, None) is not None
    except OSError:
        return False


def _background_log(log_file: str | None, mountpoint: str) -> str | None:
    """Where the background mount will log (None: syslog), checked now, in one line."""
    try:
        return background_log(log_file, mountpoint)
    except OSError as err:
        raise UserInputError(
            f"no syslog at {SYSLOG_SOCKET} and cannot create the log file "
            f"{default_log_file(mountpoint)}: {err.strerror or err}; give --log-file"
        ) from err


def cmd_umount(args: argparse.Namespace) -> int:
    from ebsfs.fuse import mount as fuse_mount

    fuse_mount.unmount(args.mountpoint, lazy=args.lazy)
    return 0
