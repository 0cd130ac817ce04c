#!/usr/bin/env python3
"""How fast the emulator serves 512 KiB blocks to N concurrent clients on loopback.

Starts `ebsfs-emulator` as its own process (no latency, quotas off), lists the blocks
once with boto3, then has N keep-alive HTTP clients (spread over worker processes so
the client side is not the bottleneck) GET blocks for a fixed time. Prints MB/s.

    .venv/bin/python scripts/bench_emulator.py [--clients 64] [--seconds 10]
"""

from __future__ import annotations

import argparse
import http.client
import multiprocessing
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import boto3

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ebsfs.emulator import process as emulator_process  # noqa: E402
from ebsfs.emulator.__main__ import backlog, count, seconds, slow_tail  # noqa: E402
from ebsfs.emulator.diskimage import random_image  # noqa: E402

SNAP = "snap-0be0c0"
AUTHORIZATION = (
    "AWS4-HMAC-SHA256 Credential=BENCH/20260101/us-east-1/ebs/aws4_request, "
    "SignedHeaders=host, Signature=" + "0" * 64
)
"""Well formed, so the emulator (which checks no signature here) serves the block:
a malformed one is answered 403, and the clients would count error bodies."""

PROFILES: dict[str, tuple[bool, tuple[str, ...]]] = {
    "emulator": (False, ()),
    "tls-nagle-close": (True, ("--nagle", "--close-after", "100")),
    "queue5-tail": (False, ("--backlog", "5", "--slow-tail", "0.01:10")),
    "slow-accept": (True, ("--nagle", "--accept-delay", "0.05")),
}
"""The server profiles, (HTTPS?, emulator options): issue 27's three, today's emulator;
TLS with Nagle's algorithm on and keep-alive connections closed every 100 answers; a
listen queue of 5 (Python socketserver's default) with 1 % of calls ten times slower;
and a fourth: TLS and Nagle behind an accept loop that takes 20 connections a second
(a busy proxy, a single-threaded front end), where every connection opened costs the
reader 50 ms of the server's time."""


def add_wire_options(parser: argparse.ArgumentParser) -> None:
    """The emulator's wire and slow-tail options, for a bench script to pass on
    (checked here with the emulator's own option types)."""
    wire = parser.add_argument_group("the server (passed on to the emulator)")
    wire.add_argument("--nagle", action="store_true", help="the server leaves Nagle's algorithm on")
    wire.add_argument(
        "--accept-delay", type=seconds, default=0.0, help="seconds before each accept"
    )
    wire.add_argument("--backlog", type=backlog, help="the listen queue's length")
    wire.add_argument(
        "--close-after",
        type=count,
        default=0,
        metavar="N",
        help="close keep-alive connections after their Nth answer",
    )
    wire.add_argument(
        "--close-silently",
        action="store_true",
        help="with --close-after: no `Connection: close` on that answer",
    )
    wire.add_argument(
        "--idle-timeout",
        type=seconds,
        default=0.0,
        metavar="S",
        help="close connections idle for S seconds, silently",
    )
    wire.add_argument(
        "--slow-tail",
        type=slow_tail,
        metavar="FRACTION:FACTOR",
        help="that share of calls takes FACTOR times the latency (e.g. 0.01:10)",
    )


def wire_options(args: argparse.Namespace) -> list[str]:
    """The emulator options for the settings of add_wire_options (none by default)."""
    options = ["--nagle"] if args.nagle else []
    if args.accept_delay:
        options += ["--accept-delay", repr(args.accept_delay)]
    if args.backlog is not None:
        options += ["--backlog", str(args.backlog)]
    if args.close_after:
        options += ["--close-after", str(args.close_after)]
    if args.close_silently:
        options.append("--close-silently")
    if args.idle_timeout:
        options += ["--idle-timeout", repr(args.idle_timeout)]
    if args.slow_tail is not None:
        options += ["--slow-tail", "{!r}:{!r}".format(*args.slow_tail)]
    return options


def check_close_silently(parser: argparse.ArgumentParser, options: list[str]) -> None:
    """The emulator's own rule, told here: its error would go to /dev/null."""
    if "--close-silently" in options and "--close-after" not in options:
        parser.error("--close-silently needs --close-after")


def bench_credentials() -> None:
    """Credentials and a region for the clients here, unless the environment has them:
    the emulator accepts any."""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


def start_emulator(image: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    """The emulator serving `image` as SNAP, in a process of its own: it and its URL.
    Up to 2 minutes to listen (a large image's written blocks are indexed first)."""
    try:
        return emulator_process.start(["--snapshot", f"{SNAP}={image}", *extra], timeout=120)
    except emulator_process.EmulatorDidNotStart as err:
        raise SystemExit(str(err)) from None


def worker(port: int, paths: list[str], threads: int, duration: float, out) -> None:
    totals = [0] * threads
    refused = [0] * threads
    stop_at = time.monotonic() + duration

    def client(n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port)
        rng = random.Random(n)
        headers = {"Authorization": AUTHORIZATION}
        while time.monotonic() < stop_at:
            conn.request("GET", rng.choice(paths), headers=headers)
            response = conn.getresponse()
            body = response.read()
            if response.status == 200:
                totals[n] += len(body)
            else:  # counted apart: error bodies are no blocks served
                refused[n] += 1
        conn.close()

    pool = [threading.Thread(target=client, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    out.put((sum(totals), sum(refused)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--size-mib", type=int, default=256)
    args = parser.parse_args()
    bench_credentials()
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "bench.img"
        random_image(image, args.size_mib * 1024 * 1024, seed=3)
        proc, url = start_emulator(image, "--get-rate", "0", "--list-rate", "0")
        try:
            ebs = boto3.client("ebs", endpoint_url=url, region_name="us-east-1")
            blocks = ebs.list_snapshot_blocks(SnapshotId=SNAP, MaxResults=10000)["Blocks"]
            paths = [
                f"/snapshots/{SNAP}/blocks/{b['BlockIndex']}?blockToken="
                f"{urllib.parse.quote(b['BlockToken'], safe='')}"
                for b in blocks
            ]
            port = int(url.rsplit(":", 1)[1])
            queue: multiprocessing.Queue[tuple[int, int]] = multiprocessing.Queue()
            per = args.clients // args.processes
            started = time.monotonic()
            workers = [
                multiprocessing.Process(target=worker, args=(port, paths, per, args.seconds, queue))
                for _ in range(args.processes)
            ]
            for w in workers:
                w.start()
            results = [queue.get() for _ in workers]
            total = sum(served for served, _ in results)
            refused = sum(errors for _, errors in results)
            for w in workers:
                w.join()
            elapsed = time.monotonic() - started
        finally:
            proc.terminate()
            proc.wait()
    print(
        f"emulator: {args.clients} concurrent clients ({args.processes} processes), "
        f"{elapsed:.1f}s, {total / 2**20:.0f} MiB, {total / elapsed / 1e6:.0f} MB/s "
        f"({total / 524288 / elapsed:.0f} blocks/s)"
        + (f"; {refused} answers were errors, not blocks" if refused else "")
    )


if __name__ == "__main__":
    main()
