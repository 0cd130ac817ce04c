"""`ebsfs mount` and `ebsfs umount`: the FUSE face from the command line. pyfuse3 and
the engine are imported only when one of them runs."""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from ebsfs.cli.logs import setup_logging
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


log = logging.getLogger(__name__)


def add_parser(commands: Commands) -> None:
    mount = commands.add_parser(
        "mount",
        help="mount snapshots as MOUNTPOINT/<snapshot-id>.img",
        description="Mount each snapshot as MOUNTPOINT/<snapshot-id>.img, a read-only file "
        "of VolumeSize GiB. Returns once the mount is ready and keeps serving in "
        "the background (use -f to stay in front). Needs ebs:ListSnapshotBlocks "
        "and ebs:GetSnapshotBlock.",
        epilog="example: ebsfs mount snap-0123456789abcdef0 /mnt/snap && "
        "losetup -r -P --show -f /mnt/snap/snap-0123456789abcdef0.img",
    )
    mount.set_defaults(run=cmd_mount)
    mount.add_argument(
        "snapshot_ids",
        nargs="+",
        metavar="SNAPSHOT_ID",
        help="snapshot ids (snap-...), completed and in this account",
    )
    mount.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing empty directory")
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
        help="let other users read the mount (non-root users need "
        "user_allow_other in /etc/fuse.conf)",
    )
    mount.add_argument("--fuse-debug", action="store_true", help="log every FUSE request")
    cache_dir_arguments(mount)
    prefetch_arguments(mount)
    connection_arguments(mount)
    ec2_argument(
        mount, "the images' mtime is the snapshot's StartTime when ec2:DescribeSnapshots is allowed"
    )


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
    from ebsfs.engine.config import check_snapshot_id
    from ebsfs.engine.plan import plan
    from ebsfs.service import ec2

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
    # The checks and the EC2 lookup wait on the network while this thread loads trio,
    # pyfuse3 and the engine (about 150 ms of the mount's start: docs/performance.md).
    # Both threads are done before the fork below.
    with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="start") as pool:
        checking = pool.submit(plan, config, args.snapshot_ids, fetch_first_block=True)
        describing = pool.submit(
            ec2.lookup, config.connection, args.snapshot_ids, args.ec2_endpoint_url
        )
        from ebsfs.engine import engine
        from ebsfs.fuse import mount as fuse_mount

        checked = checking.result()
        described = describing.result()
    if described.note:
        log.info("image mtimes are the mount time: %s", described.note)
    mount_config = fuse_mount.MountConfig(
        mountpoint=os.path.abspath(mountpoint),
        allow_other=args.allow_other,
        fuse_debug=args.fuse_debug,
        start_times={s: info.start_time.timestamp() for s, info in described.found.items()},
    )
    count = len(checked.snapshots)
    if args.foreground:
        fuse_mount.serve(
            engine.build(config, checked),
            mount_config,
            on_ready=lambda: print(
                f"ebsfs: mounted {count} snapshot(s) at {mountpoint}; Ctrl-C to unmount",
                file=sys.stderr,
                flush=True,
            ),
        )
        return 0

    def in_background(ready: Callable[[], None]) -> None:
        setup_logging(args.verbose, args.log_file, background=True)
        fuse_mount.serve(engine.build(config, checked), mount_config, on_ready=ready)

    return fuse_mount.run_in_background(in_background)


def cmd_umount(args: argparse.Namespace) -> int:
    from ebsfs.fuse import mount as fuse_mount

    fuse_mount.unmount(args.mountpoint, lazy=args.lazy)
    return 0
