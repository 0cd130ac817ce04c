"""`ebsfs diff`: the byte ranges (ListChangedBlocks) or, with --files, the files that
differ between two snapshots. Both build their engine from the options the way every
command does (options -> EngineConfig -> the engine)."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from ebsfs.cli.options import (
    cache_dir_arguments,
    connection_arguments,
    engine_config,
    parse_size,
    positive_float,
    prefetch_arguments,
)
from ebsfs.constants import DIFF_TIMEOUT
from ebsfs.errors import ReadFailed, UserInputError

if TYPE_CHECKING:
    from ebsfs.cli.options import Commands

T = TypeVar("T")


def timed_out(args: argparse.Namespace) -> ReadFailed:
    """The one-line error of a diff past --timeout."""
    return ReadFailed(
        f"diff of {args.first} and {args.second} gave up after --timeout "
        f"{args.timeout:g}s (the endpoint answered slowly, or there was much to list); a "
        "longer --timeout waits more"
    )


def within(seconds: float, work: Callable[[], T], late: Callable[[], Exception]) -> T:
    """`work()` in a daemon thread, waited for `seconds` at the most; past them `late()`
    is raised and the work is left behind, to end with the process. The readers walk a
    filesystem in synchronous library code (pytsk3, libfsxfs) that nothing can cancel:
    a thread is the one way to stop waiting for it, and its engine's thread is a daemon
    too, so nothing holds the exit."""
    results: list[T] = []
    failures: list[BaseException] = []

    def run() -> None:
        try:
            results.append(work())
        except BaseException as err:  # raised in the waiting thread instead
            failures.append(err)

    thread = threading.Thread(target=run, name="ebsfs-diff", daemon=True)
    thread.start()
    thread.join(seconds)
    if failures:
        raise failures[0]
    if not results:
        raise late()
    return results[0]


def add_parser(commands: Commands) -> None:
    diff = commands.add_parser(
        "diff",
        help="list the byte ranges (or, with --files, the files) that differ between two snapshots",
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
        "renamed, U what could not be read; names quoted as git quotes them)",
    )
    diff.set_defaults(run=cmd_diff)
    diff.add_argument("first", metavar="FIRST_SNAPSHOT", help="the earlier snapshot")
    diff.add_argument("second", metavar="SECOND_SNAPSHOT", help="the later snapshot")
    diff.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object: first, second, block_size, volume_size "
        "(bytes), changed_blocks (sorted indexes), ranges, counts; with "
        "--files: first, second, filesystems and files (path, change, "
        "partition, type, reasons, old_path, before/after metadata)",
    )
    diff.add_argument(
        "--files",
        action="store_true",
        help="list changed files per filesystem instead of byte ranges; a "
        "filesystem that cannot be read gets a one-line note and its "
        "changed byte ranges",
    )
    diff.add_argument(
        "-z",
        dest="nul",
        action="store_true",
        help="with --files, for programs: only the changed names, each field ended by "
        "NUL and names as their raw bytes (STATUS, PARTITION, [OLD], PATH, REASONS; "
        "quoted on a terminal); notes on stderr",
    )
    diff.add_argument(
        "--atime",
        action="store_true",
        help="with --files, also count access-time changes (files only read "
        "between the snapshots); ignored by default",
    )
    diff.add_argument(
        "--cache-size",
        type=parse_size,
        default="512M",
        metavar="SIZE",
        help="with --files, memory for cached blocks (default: 512M): "
        "metadata read in the first snapshot is served from it to the "
        "second",
    )
    diff.add_argument(
        "--timeout",
        type=positive_float,
        default=DIFF_TIMEOUT,
        metavar="SECONDS",
        help="give up after this many seconds in all (default: %(default)g), with a "
        "one-line error and exit status 1: each call to the service has its own "
        "limits, but an endpoint may answer slowly page after page for ever",
    )
    cache_dir_arguments(diff)
    prefetch_arguments(diff)
    connection_arguments(diff)


def cmd_diff(args: argparse.Namespace) -> int:
    from ebsfs.engine.config import check_snapshot_id

    check_snapshot_id(args.first)
    check_snapshot_id(args.second)
    if args.atime and not args.files:
        raise UserInputError("--atime needs --files")
    if args.nul and not args.files:
        raise UserInputError("-z needs --files")
    if args.nul and args.json:
        raise UserInputError("-z and --json cannot be used together")
    if args.files:
        return _diff_files(args)
    return _diff_blocks(args)


def _diff_blocks(args: argparse.Namespace) -> int:
    import trio

    from ebsfs.engine import engine
    from ebsfs.engine.diff import Diff
    from ebsfs.engine.plan import Plan
    from ebsfs.service.retry import RetryPolicy

    # Many pages against a 50 calls/s quota: throttling is waited out, within --timeout.
    config = engine_config(
        args, RetryPolicy(attempts=6, deadline=30.0, throttle_budget=args.timeout)
    )
    # No snapshot checked or opened: ListChangedBlocks is all a diff of blocks needs
    # (and all the permission it asks for).
    the_engine = engine.build(config, Plan(snapshots=[], bases={}))

    async def listing() -> Diff:
        with trio.move_on_after(args.timeout):
            return await the_engine.diff(args.first, args.second)
        raise timed_out(args)

    try:
        result = trio.run(listing)
    finally:
        the_engine.close()
    if args.json:
        result.write_json(sys.stdout)
    else:
        result.write_text(sys.stdout)
    return 0


def _diff_files(args: argparse.Namespace) -> int:
    from ebsfs.cli.progress import BarProgress
    from ebsfs.fileobj import open_with
    from ebsfs.forensics.filediff import FileDiff, diff_files
    from ebsfs.quoting import printable, quote, utf8_stream
    from ebsfs.service.retry import RetryPolicy

    if args.first == args.second:
        raise UserInputError("the two snapshots are the same")
    display = BarProgress() if sys.stderr.isatty() else None  # a status line, terminals only

    def compare() -> FileDiff:
        # Throttling is waited out within --timeout (each read within its time limit).
        config = engine_config(args, RetryPolicy(throttle_budget=args.timeout))
        files = open_with(config, [args.first, args.second], readahead=False)
        try:
            return diff_files(
                files[0], files[1], atime=args.atime, progress=display.status if display else None
            )
        finally:
            for f in files:
                f.close()

    def late() -> Exception:
        # The walk goes on in its thread until the process ends: not a word more from it.
        logging.disable(logging.CRITICAL)
        return timed_out(args)

    try:
        result = within(args.timeout, compare, late)
    finally:
        if display is not None:
            display.close()
    if args.json or args.nul:  # the text says it in its place; these are for programs
        ascii_only = not utf8_stream(sys.stderr)
        for fs in result.filesystems:
            if fs.note is not None:
                note = printable(fs.note, ascii_only)
                print(f"ebsfs: note: {fs.label}: files not listed: {note}", file=sys.stderr)
            for u in fs.unreadable:
                path = quote(u.path, ascii_only)
                print(f"ebsfs: note: {fs.label}: {path}: {u.describe(ascii_only)}", file=sys.stderr)
    if args.json:
        result.write_json(sys.stdout)
    elif args.nul:
        sys.stdout.flush()
        # Raw names are for programs: a terminal would act on their ESC sequences.
        result.write_z(sys.stdout.buffer, raw=not sys.stdout.isatty())
        sys.stdout.buffer.flush()
    else:
        result.write_text(sys.stdout, ascii_only=not utf8_stream(sys.stdout))
    return 0
