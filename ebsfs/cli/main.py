"""Command line: options in, one-line errors and exit codes out. Nothing below the cli
package prints to the user or exits.

This module assembles the parser from the commands' modules (cli/mount.py, diff.py,
get.py, verify.py, ls.py, stats.py, mounts.py, completion.py: each its subparser and its
`cmd_*`), runs the one asked for and turns what it raises into a line and an exit code.
It also answers a shell's completion request (cli/completion.py) and mount.fuse3's call
`ebsfs SOURCE MOUNTPOINT -o OPTIONS` (cli/mounthelper.py). It stays light so that
`ebsfs --help` is quick: a command imports boto3, trio, pyfuse3 when it runs."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import logging
import os
import sys
from typing import NoReturn

from ebsfs import __version__
from ebsfs.cli import (
    background,
    completion,
    diff,
    get,
    history,
    ls,
    mount,
    mounthelper,
    mounts,
    nbd,
    scan,
    stats,
    verify,
)
from ebsfs.cli.logs import setup_logging
from ebsfs.cli.options import Parser
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
from ebsfs.quoting import printable, utf8_stream


def build_parser() -> argparse.ArgumentParser:
    """Every command's subparser; each sets `run`, the function that carries it out."""
    parser = Parser(
        prog="ebsfs",
        description="Amazon EBS snapshots as read-only raw disk images, read on demand "
        "through the EBS direct APIs.",
    )
    parser.add_argument("--version", action="version", version=f"ebsfs {__version__}")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=Parser
    )
    for add in (
        mount.add_parser,
        nbd.add_parser,
        diff.add_parser,
        history.add_parser,
        scan.add_parser,
        get.add_parser,
        verify.add_parser,
        ls.add_parser,
        stats.add_parser,
        mount.add_umount_parser,
        mounts.add_parser,
        completion.add_parser,
    ):
        add(commands)
    return parser


def describe(err: BaseException) -> str:
    """The one line a user sees for an error (made printable by `say`)."""
    if isinstance(err, RetriesExhausted) and isinstance(err.__cause__, EndpointUnreachable):
        return f"{err.__cause__} (is --endpoint-url right and the endpoint up?)"
    if isinstance(err, SnapshotNotFound):
        return (
            f"snapshot not found: {err} (check the id and --region; only completed "
            "snapshots in this account can be read)"
        )
    if isinstance(err, AccessDenied):
        return (
            f"access denied: {err} (needs ebs:ListSnapshotBlocks and "
            "ebs:GetSnapshotBlock, ebs:ListChangedBlocks for diff, and kms:Decrypt for "
            "encrypted snapshots)"
        )
    if isinstance(err, CredentialsRejected):
        return (
            f"AWS rejected the credentials: {err} (check the access key, secret and "
            "session token of the profile or environment in use, and the clock)"
        )
    if isinstance(err, UnrelatedSnapshots):
        return f"the snapshots are not of the same volume lineage: {err}"
    if isinstance(err, CredentialsMissing | UserInputError | InvalidSnapshotId):
        return str(err)
    return str(err) or type(err).__name__


def say(text: str) -> None:
    """An error line on stderr. Errors quote others' text (a server's message, a
    library's account of a snapshot's metadata): its controls are escaped and its
    lines joined, so it cannot drive the terminal or forge a line."""
    line = printable(" ".join(text.splitlines()), ascii_only=not utf8_stream(sys.stderr))
    print(line, file=sys.stderr)


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


def command_names(parser: argparse.ArgumentParser) -> set[str]:
    """The commands `parser` knows (mount, get, ...)."""
    return {
        name
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for name in action.choices
    }


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    if completion.asked():
        completion.complete(parser)  # exits when it has answered
    argv = sys.argv[1:] if argv is None else argv
    if mounthelper.is_helper_call(argv, command_names(parser)):
        return mounthelper.run(argv)  # which comes back here as `ebsfs mount ...`
    args = parser.parse_args(argv)
    try:
        setup_logging(args.verbose, args.log_file, background=False)
    except OSError as err:
        say(f"ebsfs: error: cannot open log file {args.log_file}: {err.strerror}")
        return 1
    try:
        code: int = args.run(args)
        return code
    except EbsfsError as err:
        say(f"ebsfs: error: {describe(err)}")
        return 1
    except BaseExceptionGroup as group:  # from trio, in the foreground
        leaf = first_leaf(group)
        if isinstance(leaf, KeyboardInterrupt):
            return 130
        text = describe(leaf) if isinstance(leaf, EbsfsError) else f"{type(leaf).__name__}: {leaf}"
        say(f"ebsfs: error: {text}")
        return 1
    except KeyboardInterrupt:
        print("ebsfs: interrupted", file=sys.stderr)
        return 130


def run() -> NoReturn:
    """The `ebsfs` command."""
    finish(main())


def finish(code: int) -> NoReturn:
    """End the process with `code`.

    A mount or NBD server that went to the background ends its parent at once, its
    output flushed, without Python's finalization: tearing down the modules a mount
    imports took 32-49 ms after the "mounted" line, which every script running
    `ebsfs mount ... && fls ...` waits for (issue 25). That parent has nothing left
    to finalize: no thread runs, its pool is joined, its logs go nowhere but stderr."""
    if background.parent_finished:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
