"""`ebsfs nbd`: the snapshots as NBD exports, for qemu-img, qemu-nbd, nbdinfo, nbdcopy
and the kernel's nbd-client, holes included. The engine and trio are imported only
when it runs."""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from ebsfs.cli.background import run_in_background
from ebsfs.cli.get import ExamplesFormatter
from ebsfs.cli.logs import SYSLOG_SOCKET, background_log, default_log_file, setup_logging
from ebsfs.cli.options import (
    cache_dir_arguments,
    connection_arguments,
    engine_arguments,
    engine_config,
    positive_float,
    prefetch_arguments,
)
from ebsfs.constants import NBD_HANDSHAKE_TIMEOUT, READ_TIMEOUT
from ebsfs.errors import UserInputError
from ebsfs.quoting import printable

if TYPE_CHECKING:
    from ebsfs.cli.options import Commands
    from ebsfs.nbd.exports import Export
    from ebsfs.nbd.lifecycle import Listen

log = logging.getLogger(__name__)


def port_number(text: str) -> int:
    if text.isdigit() and 0 < int(text) < 65536:
        return int(text)
    raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1 to 65535)")


def add_parser(commands: Commands) -> None:
    nbd = commands.add_parser(
        "nbd",
        help="serve snapshots over NBD, holes included (qemu-img, nbdcopy, nbd-client)",
        description="Serve each snapshot as a read-only NBD export named by its id, and "
        "each of its partitions as <id>-partN, with block status: the blocks the "
        "snapshot never wrote are holes, so qemu-img convert, nbdcopy and "
        "`nbdinfo --map` skip them without reading. Returns once listening and keeps "
        "serving in the background (use -f to stay in front); SIGTERM or Ctrl-C "
        "stops it. NBD has no authentication: anyone who can reach the socket or "
        "the port reads the snapshots. A unix socket (its file's permissions guard "
        "it) is the safe choice; --port listens on 127.0.0.1 unless --bind says "
        "otherwise. Needs ebs:ListSnapshotBlocks and ebs:GetSnapshotBlock.",
        epilog="examples:\n"
        "  ebsfs nbd snap-0123456789abcdef0 --socket /tmp/snap.sock\n"
        "  nbdinfo --map 'nbd+unix:///snap-0123456789abcdef0?socket=/tmp/snap.sock'\n"
        "  qemu-img convert -O qcow2 \\\n"
        "    'nbd+unix:///snap-0123456789abcdef0?socket=/tmp/snap.sock' disk.qcow2\n"
        "  kill $(pgrep -f 'ebsfs nbd')   # or -f and Ctrl-C",
        formatter_class=ExamplesFormatter,
    )
    nbd.set_defaults(run=cmd_nbd)
    nbd.add_argument(
        "snapshot_ids",
        nargs="+",
        metavar="SNAPSHOT_ID",
        help="snapshot ids (snap-...), completed and in this account",
    )
    where = nbd.add_argument_group("where to listen (one of them)")
    listen = where.add_mutually_exclusive_group(required=True)
    listen.add_argument(
        "--socket",
        metavar="PATH",
        help="a unix socket to create (a stale socket there is replaced, anything else "
        "refused); removed when the server stops",
    )
    listen.add_argument(
        "--port", type=port_number, metavar="N", help="a TCP port (NBD's own is 10809)"
    )
    where.add_argument(
        "--bind",
        metavar="ADDR",
        default="127.0.0.1",
        help="the address to listen on with --port (default: 127.0.0.1, this machine "
        "only; NBD has no authentication, so 0.0.0.0 lets anyone who reaches it read)",
    )
    nbd.add_argument(
        "-f", "--foreground", action="store_true", help="stay in the foreground; Ctrl-C stops"
    )
    nbd.add_argument(
        "--handshake-timeout",
        type=positive_float,
        default=NBD_HANDSHAKE_TIMEOUT,
        metavar="SECONDS",
        help="how long a client may take from connecting to choosing an export before "
        f"it is disconnected (default: {NBD_HANDSHAKE_TIMEOUT:g})",
    )
    engine_arguments(
        nbd,
        cache_help="memory for cached blocks, e.g. 256M, 2G (default: "
        "512M; at least 1M to cache anything); read-ahead uses at most a "
        "quarter of it",
        timeout_help="longest a read may take before the client gets EIO "
        f"(default: {READ_TIMEOUT:g})",
    )
    cache_dir_arguments(nbd)
    prefetch_arguments(nbd)
    connection_arguments(nbd)


def _listen(args: argparse.Namespace) -> Listen:
    from ebsfs.nbd.lifecycle import Listen, check_socket_path

    if args.socket is not None:
        if args.bind != "127.0.0.1":
            raise UserInputError("--bind goes with --port, not with --socket")
        check_socket_path(args.socket)
        return Listen(socket_path=os.path.abspath(args.socket))
    return Listen(port=args.port, bind=args.bind)


def cmd_nbd(args: argparse.Namespace) -> int:
    from ebsfs.cli.progress import plural
    from ebsfs.engine.config import check_snapshot_id
    from ebsfs.engine.plan import plan
    from ebsfs.service.retry import RetryPolicy

    for snapshot_id in args.snapshot_ids:
        check_snapshot_id(snapshot_id)
    listen = _listen(args)
    config = engine_config(args, RetryPolicy(throttle_budget=args.read_timeout))
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="start") as pool:
        checking = pool.submit(plan, config, args.snapshot_ids, fetch_first_block=True)
        from ebsfs.engine import engine
        from ebsfs.nbd import lifecycle

        checked = checking.result()

    def serving(exports: dict[str, Export]) -> str:
        first = printable(next(iter(exports)))
        return (
            f"ebsfs: serving {plural(len(exports), 'NBD export')} on {listen.describe()}, "
            f"e.g. {listen.uri(first)}"
        )

    if args.foreground:

        def said(exports: dict[str, Export]) -> None:
            print(f"{serving(exports)}; Ctrl-C to stop", file=sys.stderr, flush=True)

        lifecycle.serve(engine.build(config, checked), listen, said, args.handshake_timeout)
        return 0

    name = listen.socket_path or f"/nbd/{listen.bind}:{listen.port}"
    log_file = _background_log(args.log_file, name)

    def in_background(ready: Callable[[], None]) -> None:
        setup_logging(args.verbose, log_file, background=True)

        def on_ready(exports: dict[str, Export]) -> None:
            ready()

        lifecycle.serve(engine.build(config, checked), listen, on_ready, args.handshake_timeout)

    code = run_in_background(in_background, what="NBD server")
    if code == 0:  # one line: where it listens and where its log goes
        snapshots = plural(len(checked.snapshots), "snapshot")
        print(
            f"ebsfs: serving {snapshots} over NBD on {listen.describe()}, e.g. "
            f"{listen.uri(checked.snapshots[0][0])}; log: {log_file or 'syslog'}",
            file=sys.stderr,
            flush=True,
        )
    return code


def _background_log(log_file: str | None, name: str) -> str | None:
    """Where the background server will log (None: syslog), checked now, in one line."""
    try:
        return background_log(log_file, name)
    except OSError as err:
        raise UserInputError(
            f"no syslog at {SYSLOG_SOCKET} and cannot create the log file "
            f"{default_log_file(name)}: {err.strerror or err}; give --log-file"
        ) from err
