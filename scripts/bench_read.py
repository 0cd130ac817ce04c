#!/usr/bin/env python3
"""Sequential read throughput of a snapshot, four ways, side by side in one run
against the emulator.

1. `dd bs=1M` through an ebsfs mount, cold (a fresh mount: nothing cached);
2. a plain boto3 thread pool of 64 calling GetSnapshotBlock on every listed block
   (the ceiling of a straightforward Python client);
3. dsnap (PyPI), the Python peer that downloads whole snapshots;
4. a warm re-read through the mount (page cache dropped, ebsfs cache warm) against a
   trivial pyfuse3 filesystem that returns zeros (the FUSE ceiling here).

The machine's speed drifts, so the measures that are compared alternate: each of
--rounds rounds reads cold through a fresh mount, then with the pool, then with dsnap;
then warm ebsfs and zerofs reads alternate --repeat times, both mounted at once.
Figures are medians; ratios are medians of each round's own ratio.

The emulator runs as its own process with a per-call latency (default 20 ms + up to
10 ms jitter) and the real quotas (1,000 GetSnapshotBlock/s per snapshot). Needs root.

    sudo .venv/bin/python scripts/bench_read.py [--size-mib 1100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import botocore.config

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from ebsfs.emulator.diskimage import random_image  # noqa: E402
from ebsfs.emulator.selfsigned import make_certificate  # noqa: E402
from scripts.bench_emulator import SNAP, start_emulator  # noqa: E402

MB = 1e6


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def dd(path: Path, mib: int) -> float:
    """Seconds to read `mib` MiB with dd bs=1M."""
    started = time.monotonic()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M", f"count={mib}", "status=none"],
                   check=True)
    return time.monotonic() - started


def rate(path: Path, mib: int) -> float:
    """MB/s of one page-cache-cold dd read of the first `mib` MiB."""
    drop_page_cache()
    return mib * 1024 * 1024 / dd(path, mib) / MB


def thread_pool(url: str, workers: int = 64) -> tuple[float, int]:
    config = botocore.config.Config(max_pool_connections=workers,
                                    retries={"mode": "standard", "max_attempts": 10})
    ebs = boto3.session.Session().client("ebs", endpoint_url=url, region_name="us-east-1",
                                         config=config)
    started = time.monotonic()
    blocks, token = [], None
    while True:
        kw: dict[str, str] = {"NextToken": token} if token else {}
        page = ebs.list_snapshot_blocks(SnapshotId=SNAP, MaxResults=10000, **kw)
        blocks += page["Blocks"]
        token = page.get("NextToken")
        if not token:
            break

    def get(block: dict) -> int:
        r = ebs.get_snapshot_block(SnapshotId=SNAP, BlockIndex=block["BlockIndex"],
                                   BlockToken=block["BlockToken"])
        return len(r["BlockData"].read())

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        total = sum(pool.map(get, blocks))
    return time.monotonic() - started, total


def dsnap(url: str, out_dir: Path) -> float:
    code = (
        "import boto3, sys\n"
        "from dsnap.snapshot import LocalSnapshot\n"
        f"s = LocalSnapshot({str(out_dir)!r}, {SNAP!r}, "
        "boto3_session=boto3.session.Session(region_name='us-east-1'))\n"
        "s.fetch(force=True)\n"
    )
    env = {**os.environ, "AWS_ENDPOINT_URL": url}
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", code], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - started


def ebsfs(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "ebsfs", *args], check=True)


def wait_for_mount(path: Path) -> None:
    for _ in range(200):
        if os.path.ismount(path):
            return
        time.sleep(0.05)
    raise SystemExit(f"{path} was not mounted")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1100, help="present data (MiB)")
    parser.add_argument("--latency", type=float, default=0.02)
    parser.add_argument("--jitter", type=float, default=0.01)
    parser.add_argument("--max-fetches", default="64")
    parser.add_argument("--skip-dsnap", action="store_true")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of cold ebsfs, pool and dsnap (default 3)")
    parser.add_argument("--repeat", type=int, default=9,
                        help="alternating warm ebsfs and zerofs reads (default 9)")
    parser.add_argument("--tls", action="store_true",
                        help="serve HTTPS, as the real service does (a throwaway certificate)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    size = args.size_mib * 1024 * 1024
    runs: dict[str, list[float]] = {name: [] for name in (
        "ebsfs_cold", "boto3_pool64", "dsnap", "ebsfs_warm", "zerofs")}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        image = tmp / "data.img"
        random_image(image, size, seed=5)
        tls: list[str] = []
        if args.tls:
            cert, key = make_certificate(tmp)
            tls = ["--tls-cert", str(cert), "--tls-key", str(key)]
            os.environ["AWS_CA_BUNDLE"] = str(cert)  # every client here trusts it
        proc, url = start_emulator(image, "--latency", str(args.latency),
                                   "--jitter", str(args.jitter), *tls)
        mnt, zero_mnt = tmp / "mnt", tmp / "zero"
        mnt.mkdir()
        zero_mnt.mkdir()
        cache = f"{args.size_mib + 256}M"
        mount_args = ("mount", "--endpoint-url", url, "--cache-size", cache,
                      "--max-fetches", args.max_fetches, SNAP, str(mnt))
        try:
            # One untimed cold read first: the emulator serves from an mmap of the image
            # (a first pass reads it from disk), and on this VM memory the guest has not
            # used yet costs more to touch the first time; either would go to whichever
            # measure ran first.
            ebsfs(*mount_args)
            try:
                dd(mnt / f"{SNAP}.img", args.size_mib)
            finally:
                ebsfs("umount", str(mnt))
            for round_no in range(args.rounds):
                ebsfs(*mount_args)
                try:
                    runs["ebsfs_cold"].append(rate(mnt / f"{SNAP}.img", args.size_mib))
                    if round_no == args.rounds - 1:  # keep the last mount for warm reads
                        warm_and_zero(mnt, zero_mnt, size, args, runs)
                finally:
                    ebsfs("umount", str(mnt))
                seconds, total = thread_pool(url)
                assert total == size, (total, size)
                runs["boto3_pool64"].append(size / seconds / MB)
                if not args.skip_dsnap:
                    out = tmp / "dsnap"
                    out.mkdir(exist_ok=True)
                    runs["dsnap"].append(size / dsnap(url, out) / MB)
                    (out / f"{SNAP}.img").unlink()
        finally:
            proc.terminate()
            proc.wait()
    report(args, runs)


def warm_and_zero(mnt: Path, zero_mnt: Path, size: int, args: argparse.Namespace,
                  runs: dict[str, list[float]]) -> None:
    """Alternate warm ebsfs reads (after one read that warms the page-cache-independent
    ebsfs cache, already done by the cold read) with zerofs reads."""
    zero = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "zerofs.py"),
                             str(zero_mnt), str(size)])
    try:
        wait_for_mount(zero_mnt)
        for _ in range(args.repeat):
            runs["ebsfs_warm"].append(rate(mnt / f"{SNAP}.img", args.size_mib))
            runs["zerofs"].append(rate(zero_mnt / "zero.img", args.size_mib))
    finally:
        zero.terminate()
        zero.wait()


def report(args: argparse.Namespace, runs: dict[str, list[float]]) -> None:
    def ratios(a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(runs[a], runs[b], strict=True)]

    print(f"sequential read of {args.size_mib} MiB of present data"
          f"{' over HTTPS' if args.tls else ''}, latency "
          f"{args.latency * 1000:.0f} ms + up to {args.jitter * 1000:.0f} ms jitter "
          f"({args.rounds} cold rounds, {args.repeat} warm pairs):")
    figures: dict[str, object] = {}
    for name, values in runs.items():
        if values:
            figures[name] = values
            print(f"  {name:<14} {statistics.median(values):8.1f} MB/s   "
                  f"(runs: {', '.join(f'{v:.0f}' for v in values)})")
    pairs = [("cold ebsfs / boto3 pool of 64", "ebsfs_cold", "boto3_pool64"),
             ("cold ebsfs / dsnap", "ebsfs_cold", "dsnap"),
             ("warm ebsfs / zerofs", "ebsfs_warm", "zerofs")]
    for label, a, b in pairs:
        if runs[a] and runs[b]:
            each = ratios(a, b)
            figures[f"{a}/{b}"] = each
            print(f"  {label + ':':<31} {statistics.median(each):.2f}   "
                  f"(each: {', '.join(f'{r:.2f}' for r in each)})")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
