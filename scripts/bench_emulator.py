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
from ebsfs.emulator.diskimage import random_image  # noqa: E402

SNAP = "snap-0be0c0"


def bench_credentials() -> None:
    """Credentials and a region for the clients here, unless the environment has them:
    the emulator accepts any."""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


def start_emulator(image: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    url_file = Path(tempfile.mktemp())
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ebsfs.emulator",
            "--snapshot",
            f"{SNAP}={image}",
            "--url-file",
            str(url_file),
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(2400):  # 2 minutes: a large image's written blocks are indexed first
        if url_file.exists() and url_file.read_text().strip():
            return proc, url_file.read_text().strip()
        if proc.poll() is not None:
            raise SystemExit(f"emulator exited with status {proc.returncode}")
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("emulator did not start within 2 minutes")


def worker(port: int, paths: list[str], threads: int, seconds: float, out) -> None:
    totals = [0] * threads
    stop_at = time.monotonic() + seconds

    def client(n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port)
        rng = random.Random(n)
        headers = {"Authorization": "AWS4-HMAC-SHA256 Credential=BENCH/x"}
        while time.monotonic() < stop_at:
            conn.request("GET", rng.choice(paths), headers=headers)
            response = conn.getresponse()
            totals[n] += len(response.read())
        conn.close()

    pool = [threading.Thread(target=client, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    out.put(sum(totals))


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
            queue: multiprocessing.Queue[int] = multiprocessing.Queue()
            per = args.clients // args.processes
            started = time.monotonic()
            workers = [
                multiprocessing.Process(target=worker, args=(port, paths, per, args.seconds, queue))
                for _ in range(args.processes)
            ]
            for w in workers:
                w.start()
            total = sum(queue.get() for _ in workers)
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
    )


if __name__ == "__main__":
    main()
