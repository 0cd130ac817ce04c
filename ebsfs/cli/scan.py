"""`ebsfs scan`: many snapshots' file listings (and hashes of the files asked for) as
JSON lines, on a Dask cluster (a local one by default), resumable. The work is
ebsfs/fleet's; this face parses, finds the snapshots (EC2 for --volume and --all),
shows progress and turns the outcome into an exit status."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import TYPE_CHECKING, Any

from ebsfs.cli.options import (
    cache_dir_arguments,
    connection_arguments,
    ec2_argument,
    parse_size,
    positive_int,
)
from ebsfs.constants import BLOCK_SIZE
from ebsfs.errors import UserInputError

if TYPE_CHECKING:
    from ebsfs.cli.options import Commands
    from ebsfs.fleet.tasks import Job

log = logging.getLogger(__name__)

DEFAULT_MAX_RATE = 1000.0
"""GetSnapshotBlock calls per second per account and region: the service's default
quota (adjustable; ../shared/ebs-direct-api.md)."""
PLAIN_EVERY = 5.0
"""Seconds between progress lines when stderr is not a terminal."""


def rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < 1e9:
        raise argparse.ArgumentTypeError(f"must be > 0 calls per second, got {text}")
    return value


def add_parser(commands: Commands) -> None:
    scan = commands.add_parser(
        "scan",
        help="file listings (and hashes) of many snapshots as JSON lines, on Dask",
        description="For each snapshot and each partition holding a filesystem ebsfs "
        "reads: one JSON line per file, directory and symlink name ({snapshot_id, "
        "partition, path, path_b64, type, size, mtime, mode, uid, gid, sha256 with "
        "--hash}), from metadata only, an error line for what cannot be read, and a "
        "summary line per snapshot. Runs on a Dask cluster: a local one (--workers), "
        "or yours (--scheduler); a volume's snapshots on one worker, oldest first, so "
        "unchanged blocks are fetched once. --out is appended as snapshots finish; "
        "run it again to resume. Exit status 1 when a snapshot or a filesystem could "
        "not be read (its lines say why). Needs pip install 'ebsfs[fleet]'.",
        epilog="example: ebsfs scan --all --hash --include 'liblzma.so.5*' --out sweep.jsonl",
    )
    scan.set_defaults(run=cmd_scan)
    scan.add_argument("snapshots", nargs="*", metavar="SNAPSHOT_ID", help="snapshots to scan")
    which = scan.add_argument_group("which snapshots (one of)")
    which.add_argument(
        "--volume",
        action="extend",
        nargs="+",
        default=[],
        metavar="VOLUME_ID",
        help="every completed snapshot of these volumes (EC2)",
    )
    which.add_argument(
        "--all",
        action="store_true",
        help="every completed snapshot this account owns in the region (EC2)",
    )
    scan.add_argument("--out", required=True, metavar="FILE.jsonl", help="JSON lines, appended")
    scan.add_argument(
        "--hash",
        action="store_true",
        help="the SHA-256 of regular files (reads their blocks; those matching --include only)",
    )
    scan.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="GLOB",
        help="hash only files matching it: without '/', a file name anywhere "
        "('liblzma.so.5*'); with '/', the whole path ('/usr/lib/*/liblzma*'; * crosses /). "
        "Repeatable; needs --hash",
    )
    where = scan.add_argument_group("the Dask cluster (one of)")
    where.add_argument(
        "--workers",
        type=positive_int,
        metavar="N",
        help="start a local cluster of N worker processes (the default: one per CPU)",
    )
    where.add_argument(
        "--scheduler",
        metavar="FILE_OR_ADDRESS",
        help="use a running cluster: its scheduler file, or tcp://host:8786",
    )
    scan.add_argument(
        "--max-rate",
        type=rate,
        default=DEFAULT_MAX_RATE,
        metavar="N",
        help="GetSnapshotBlock calls per second for the whole cluster (default: %(default)g, "
        "the service's quota per account and region)",
    )
    scan.add_argument(
        "--cache-size",
        type=parse_size,
        default="256M",
        metavar="SIZE",
        help="memory for cached blocks per task (default: 256M)",
    )
    scan.add_argument(
        "--no-hedge",
        dest="hedge",
        action="store_false",
        help="never ask for a block twice (see ebsfs mount --help)",
    )
    cache_dir_arguments(scan)
    connection_arguments(scan)
    ec2_argument(scan, "--volume and --all")


def cmd_scan(args: argparse.Namespace) -> int:
    from ebsfs.engine.config import check_snapshot_id
    from ebsfs.fleet.cluster import require_dask
    from ebsfs.fleet.output import ScanOutput

    chosen = sum(bool(x) for x in (args.snapshots, args.volume, args.all))
    if chosen != 1:
        raise UserInputError("give SNAPSHOT_ID..., --volume VOLUME_ID... or --all (one of them)")
    if args.include and not args.hash:
        raise UserInputError("--include picks the files --hash hashes: give --hash too")
    if args.workers is not None and args.scheduler is not None:
        raise UserInputError("--workers starts a local cluster, --scheduler uses yours: not both")
    for snapshot_id in args.snapshots:
        check_snapshot_id(snapshot_id)
    if len(set(args.snapshots)) != len(args.snapshots):
        raise UserInputError("a snapshot id is given twice")
    require_dask()
    jobs = find_jobs(args)
    output = ScanOutput(args.out)
    try:
        todo = [job for job in jobs if job.snapshot_id not in output.done]
        skipped = len(jobs) - len(todo)
        if skipped:
            print(
                f"ebsfs: {skipped} of {len(jobs)} snapshots complete in {args.out} already",
                file=sys.stderr,
            )
        if not todo:
            return 0
        failed = sweep(args, todo, output)
    finally:
        output.close()
    if failed:
        print(
            f"ebsfs: error: {failed} of {len(todo)} snapshots could not be read whole "
            f"(their lines in {args.out} say why)",
            file=sys.stderr,
        )
        return 1
    return 0


def find_jobs(args: argparse.Namespace) -> list[Job]:
    """The snapshots to scan, with their volume and start time where EC2 tells them."""
    from ebsfs.cli.options import connection_options
    from ebsfs.fleet.tasks import Job

    options = connection_options(args)
    if args.snapshots:
        return described(args, options)
    if args.volume:
        from ebsfs.cli.volumes import volume_snapshots

        found = volume_snapshots(options, args.volume, args.ec2_endpoint_url).snapshots
    else:
        from ebsfs.service.ec2 import Ec2Snapshots
        from ebsfs.service.session import custom_endpoint_set

        if custom_endpoint_set("EBS", options.endpoint_url) and not custom_endpoint_set(
            "EC2", args.ec2_endpoint_url
        ):
            raise UserInputError(
                "--all asks EC2 for the account's snapshots: with a custom EBS endpoint, "
                "give --ec2-endpoint-url (or AWS_ENDPOINT_URL_EC2) too"
            )
        found = Ec2Snapshots(options, args.ec2_endpoint_url).list(["self"], [])
    return [Job(s.snapshot_id, s.volume_id, s.start_time.timestamp()) for s in found]


def described(args: argparse.Namespace, options: Any) -> list[Job]:
    """Jobs for the snapshots named, with their volume and start time from EC2 (one
    DescribeSnapshots call), so a volume's snapshots share a worker; an id EC2 does
    not know is bad input, said before any cluster starts. Without EC2 (a custom EBS
    endpoint and no EC2 one, or EC2 refused) each is a volume of its own, and an
    unknown one is an error line of the sweep."""
    from ebsfs.errors import MetadataUnavailable
    from ebsfs.fleet.tasks import Job
    from ebsfs.service.ec2 import Ec2Snapshots
    from ebsfs.service.session import custom_endpoint_set

    plain = [Job(s) for s in args.snapshots]
    if custom_endpoint_set("EBS", options.endpoint_url) and not custom_endpoint_set(
        "EC2", args.ec2_endpoint_url
    ):
        return plain
    try:
        found = Ec2Snapshots(options, args.ec2_endpoint_url).describe(list(args.snapshots))
    except MetadataUnavailable as err:
        if "does not know the snapshot" in str(err):
            raise UserInputError(f"snapshot not found: {err}") from None
        log.info("no volumes for placement (%s): each snapshot on its own", err)
        return plain
    return [
        Job(s, found[s].volume_id, found[s].start_time.timestamp()) if s in found else Job(s)
        for s in args.snapshots
    ]


def sweep(args: argparse.Namespace, jobs: list[Job], output: Any) -> int:
    """Run the tasks, append each snapshot's lines as it finishes; the number of
    snapshots that could not be read whole."""
    from ebsfs.fleet.cluster import Sweep, cluster_client
    from ebsfs.fleet.records import Selection
    from ebsfs.fleet.tasks import Settings

    settings = Settings(
        selection=Selection(args.hash, list(args.include)),
        region=args.region,
        profile=args.profile,
        endpoint_url=args.endpoint_url,
        direct_get=args.direct_get,
        hedge=args.hedge,
        cache_size=args.cache_size,
        cache_dir=args.cache_dir,
        cache_dir_size=args.cache_dir_size,
    )
    tally = Tally(len(jobs))
    with cluster_client(args.workers, args.scheduler) as client:
        running = Sweep(client, settings, jobs, args.max_rate)
        try:
            while running.pending:
                for lines in running.results(timeout=1.0):
                    output.append(lines)
                    tally.add(lines[-1]["summary"])
                tally.show()
        except BaseException:
            running.cancel()
            raise
        finally:
            tally.close()
    return tally.failed


class Tally:
    """Totals for the progress display: a status line on a terminal, else a plain line
    every PLAIN_EVERY seconds (and one at the end)."""

    def __init__(self, total: int) -> None:
        from ebsfs.cli.progress import BarProgress

        self.total = total
        self.done = self.failed = self.files = self.blocks = self.calls = 0
        self.cost = 0.0
        self.started = self.shown = time.monotonic()
        self.bar = BarProgress("scan") if sys.stderr.isatty() else None

    def add(self, summary: dict[str, Any]) -> None:
        self.done += 1
        self.failed += (not summary.get("complete")) or summary.get("errors", 0) > 0
        self.files += summary.get("files", 0)
        self.blocks += summary.get("blocks_fetched", 0)
        self.calls += summary.get("calls", 0)
        self.cost += summary.get("estimated_cost_usd", 0.0)

    def text(self) -> str:
        seconds = max(time.monotonic() - self.started, 1e-6)
        mbps = self.blocks * BLOCK_SIZE / seconds / 1e6
        return (
            f"{self.done} of {self.total} snapshots, {self.files} files, {mbps:.1f} MB/s, "
            f"{self.calls} calls, ${self.cost:.4f}"
        )

    def show(self) -> None:
        if self.bar is not None:
            self.bar.status(self.text())
        elif time.monotonic() - self.shown >= PLAIN_EVERY:
            self.shown = time.monotonic()
            print(f"ebsfs: scan: {self.text()}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.shown > self.started or self.done:
            print(f"ebsfs: scan: {self.text()}", file=sys.stderr, flush=True)
