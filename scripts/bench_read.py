#!/usr/bin/env python3
"""Sequential read throughput of a snapshot, four ways, in one run against the emulator.

1. `dd bs=1M` through an ebsfs mount, cold (nothing cached);
2. a plain boto3 thread pool of 64 calling GetSnapshotBlock on every listed block
   (the ceiling of a straightforward Python client);
3. dsnap (PyPI), the Python peer that downloads whole snapshots;
4. a warm re-read through the mount (page cache dropped, ebsfs cache warm) against a
   trivial pyfuse3 filesystem that returns zeros (the FUSE ceiling here); both the
   median of --repeat reads.

The emulator runs as its own process with a per-call latency (default 20 ms + up to
10 ms jitter) and the real quotas (1,000 GetSnapshotBlock/s per snapshot). Needs root.

    sudo .venv/bin/python scripts/bench_read.py [--size-mib 1100] [--latency 0.02]
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


def median_rate(path: Path, mib: int, repeat: int) -> float:
    """MB/s of the median of `repeat` page-cache-cold reads: warm reads through FUSE
    vary by 2x from run to run with the kernel's memory state."""
    rates = []
    for _ in range(repeat):
        drop_page_cache()
        rates.append(mib * 1024 * 1024 / dd(path, mib) / MB)
    return statistics.median(rates)


def thread_pool(url: str, workers: int = 64) -> tuple[float, int]:
    config = botocore.config.Config(max_pool_connections=workers,
                                    retries={"mode": "standard", "max_attempts": 10})
    ebs = boto3.session.Session().client("ebs", endpoint_url=url, region_name="us-east-1",
                                         config=config)
    started = time.monotonic()
    blocks, token = [], None
    while True:
        kw = {"NextToken": token} if token else {}
        page = ebs.list_snapshot_blocks(SnapshotId=SNAP, MaxResults=10000, **kw)
        blocks += page["Blocks"]
        token = page.get("NextToken")
        if not token:
            break

    def get(block: dict) -> int:  # type: ignore[type-arg]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1100, help="present data (MiB)")
    parser.add_argument("--latency", type=float, default=0.02)
    parser.add_argument("--jitter", type=float, default=0.01)
    parser.add_argument("--max-fetches", default="64")
    parser.add_argument("--skip-dsnap", action="store_true")
    parser.add_argument("--repeat", type=int, default=5,
                        help="warm and zerofs reads to take the median of")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    size = args.size_mib * 1024 * 1024
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        image = tmp / "data.img"
        random_image(image, size, seed=5)
        proc, url = start_emulator(image, "--latency", str(args.latency),
                                   "--jitter", str(args.jitter))
        mnt = tmp / "mnt"
        mnt.mkdir()
        try:
            cache = f"{args.size_mib + 256}M"
            ebsfs("mount", "--endpoint-url", url, "--cache-size", cache,
                  "--max-fetches", args.max_fetches, SNAP, str(mnt))
            try:
                drop_page_cache()
                seconds = dd(mnt / f"{SNAP}.img", args.size_mib)
                results["ebsfs_cold"] = size / seconds / MB
                results["ebsfs_warm"] = median_rate(mnt / f"{SNAP}.img", args.size_mib,
                                                    args.repeat)
            finally:
                ebsfs("umount", str(mnt))
            seconds, total = thread_pool(url)
            assert total == size, (total, size)
            results["boto3_pool64"] = size / seconds / MB
            if not args.skip_dsnap:
                out = tmp / "dsnap"
                out.mkdir()
                seconds = dsnap(url, out)
                results["dsnap"] = size / seconds / MB
                (out / f"{SNAP}.img").unlink()
        finally:
            proc.terminate()
            proc.wait()
        zero = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "zerofs.py"), str(mnt),
                                 str(size)])
        try:
            for _ in range(100):
                if os.path.ismount(mnt):
                    break
                time.sleep(0.05)
            results["zerofs"] = median_rate(mnt / "zero.img", args.size_mib, args.repeat)
        finally:
            zero.terminate()
            zero.wait()
    print(f"sequential read of {args.size_mib} MiB of present data, latency "
          f"{args.latency * 1000:.0f} ms + up to {args.jitter * 1000:.0f} ms jitter:")
    for name, value in results.items():
        print(f"  {name:<14} {value:8.1f} MB/s")
    print(f"  cold ebsfs / boto3 pool of 64: {results['ebsfs_cold'] / results['boto3_pool64']:.2f}")
    if "dsnap" in results:
        print(f"  cold ebsfs / dsnap:            {results['ebsfs_cold'] / results['dsnap']:.2f}")
    print(f"  warm ebsfs / zerofs:           {results['ebsfs_warm'] / results['zerofs']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
