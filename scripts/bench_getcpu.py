#!/usr/bin/env python3
"""CPU per GetSnapshotBlock of source trees side by side, without a mount: one process
per tree and run, THREADS threads calling the client's get_snapshot_block into buffers
of their own against one emulator, CPU time from getrusage. Runs alternate their order
round by round.

Why: the mount's CPU per block (bench_ab.py) mixes FUSE, the cache, read-ahead and the
GET path, and its rounds spread by 10-20 %; this isolates the GET path, where a few
microseconds more Python per receive cost a fifth more CPU under 32 threads taking
turns at the GIL (issue 26's regression, docs/performance.md). No root needed.

    .venv/bin/python scripts/bench_getcpu.py /tmp/before . [--tls] [--threads 32]
        [--seconds 6] [--rounds 3] [--latency 0]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SNAP = "snap-0be0c0"


def measure(url: str, threads: int, seconds: float) -> None:
    """In the tree on PYTHONPATH: fetch blocks for `seconds`, print one line."""
    try:
        from ebsfs.service.client import BotoEbsApi
        from ebsfs.service.session import ConnectionOptions
    except ImportError:  # a tree from before the house move (027038e, issue 27's base)
        from ebsfs.client import BotoEbsApi, ConnectionOptions  # type: ignore[no-redef]

    api = BotoEbsApi(ConnectionOptions(endpoint_url=url, region="us-east-1"))
    blocks = api.list_snapshot_blocks(SNAP).blocks[:2000]
    counts = [0] * threads
    stop = time.monotonic() + seconds

    def work(n: int) -> None:
        room = memoryview(bytearray(524288))
        i = n
        while time.monotonic() < stop:
            index, token = blocks[i % len(blocks)]
            api.get_snapshot_block(SNAP, index, token, room)
            counts[n] += 1
            i += threads

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    after, took = resource.getrusage(resource.RUSAGE_SELF), time.monotonic() - started
    done = sum(counts)
    user = after.ru_utime - before.ru_utime
    cpu = user + after.ru_stime - before.ru_stime
    print(
        f"  {os.environ.get('PYTHONPATH', ''):28} {done:6d} blocks {done / 2 / took:6.0f} MiB/s"
        f"  cpu/block {cpu / done * 1000:.3f} ms (user {user / done * 1000:.3f})",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="+", type=Path, help="source trees holding ebsfs/")
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=6.0, help="per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tls", action="store_true", help="serve HTTPS (throwaway certificate)")
    parser.add_argument("--latency", type=float, default=0.0, help="ms added to every call")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # the child: URL to fetch from
    args = parser.parse_args()
    if args.measure:
        measure(args.measure, args.threads, args.seconds)
        return
    sys.path.insert(0, str(ROOT))
    from ebsfs.emulator.diskimage import random_image
    from ebsfs.emulator.selfsigned import make_certificate
    from scripts.bench_ab import source_trees
    from scripts.bench_emulator import bench_credentials, start_emulator

    trees = source_trees(parser, args.trees)
    bench_credentials()
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "disk.img"
        random_image(image, 1100 * 2**20, seed=3)  # 2,200 blocks, all written
        extra = ["--latency", str(args.latency / 1000)] if args.latency else []
        if args.tls:
            cert, key = make_certificate(Path(tmp))
            extra += ["--tls-cert", str(cert), "--tls-key", str(key)]
            os.environ["AWS_CA_BUNDLE"] = str(cert)
        proc, url = start_emulator(image, *extra)
        try:
            wire = "TLS" if args.tls else "plain"
            print(f"{args.threads} threads, {args.seconds:g} s a run, {wire}")
            for number in range(args.rounds):
                print(f"round {number + 1}:")
                for tree in trees if number % 2 == 0 else trees[::-1]:
                    child = [sys.executable, __file__, str(tree), "--measure", url]
                    child += ["--threads", str(args.threads), "--seconds", str(args.seconds)]
                    env = dict(os.environ, PYTHONPATH=str(tree))
                    subprocess.run(child, env=env, check=True, cwd="/")
        finally:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
