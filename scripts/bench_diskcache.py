#!/usr/bin/env python3
"""Sequential reads through a mount with --cache-dir, side by side: cold without and
with the disk cache (what storing costs), warm from the disk cache (its files in the
page cache, and read from the device), and warm from memory.

Each round: a cold read through a mount without --cache-dir; a cold read with a fresh
--cache-dir (every block fetched and stored); then two fresh mounts on that directory
(nothing in memory): one read with the cache files in the page cache, one after
dropping the page cache (from the device); then a second read through the last mount
(from memory). Medians of --rounds rounds. Needs root (drop_caches).

    sudo .venv/bin/python scripts/bench_diskcache.py [--size-mib 512] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from ebsfs.emulator.diskimage import random_image  # noqa: E402
from scripts.bench_emulator import SNAP, start_emulator  # noqa: E402
from scripts.bench_read import MB, dd, drop_page_cache, ebsfs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=512, help="present data (MiB)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency", type=float, default=0.02)
    parser.add_argument("--jitter", type=float, default=0.01)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    for name, value in (
        ("AWS_ACCESS_KEY_ID", "bench"),
        ("AWS_SECRET_ACCESS_KEY", "bench"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        os.environ.setdefault(name, value)
    mib = args.size_mib
    names = ("cold", "cold_storing", "disk_page_cache", "disk_device", "memory")
    runs: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp_name:
        tmp = Path(tmp_name)
        image = tmp / "data.img"
        random_image(image, mib * 1024 * 1024, seed=5)
        proc, url = start_emulator(
            image, "--latency", str(args.latency), "--jitter", str(args.jitter)
        )
        mnt, cache = tmp / "mnt", tmp / "cache"
        mnt.mkdir()
        memory = f"{mib + 256}M"
        base = ("mount", "--endpoint-url", url, "--cache-size", memory, SNAP, str(mnt))
        disk = ("--cache-dir", str(cache), "--cache-dir-size", f"{mib + 256}M")
        target = mnt / f"{SNAP}.img"

        def timed(
            mount_args: tuple[str, ...], before: str = "drop", then_memory: bool = False
        ) -> tuple[float, float | None]:
            ebsfs(*mount_args)
            try:
                if before == "drop":
                    drop_page_cache()
                else:
                    subprocess.run(
                        ["cat", *map(str, (cache / "blocks").iterdir())],
                        stdout=subprocess.DEVNULL,
                        check=True,
                    )
                first = mib * 1024 * 1024 / dd(target, mib) / MB
                second = None
                if then_memory:
                    drop_page_cache()
                    second = mib * 1024 * 1024 / dd(target, mib) / MB
                return first, second
            finally:
                ebsfs("umount", str(mnt))

        try:
            timed(base)  # untimed: the emulator's mmap of the image read once from disk
            for _ in range(args.rounds):
                runs["cold"].append(timed(base)[0])
                shutil.rmtree(cache, ignore_errors=True)
                runs["cold_storing"].append(timed((*base[:-2], *disk, *base[-2:]))[0])
                with_disk = (*base[:-2], *disk, *base[-2:])
                runs["disk_page_cache"].append(timed(with_disk, before="warm")[0])
                device, from_memory = timed(with_disk, then_memory=True)
                runs["disk_device"].append(device)
                assert from_memory is not None
                runs["memory"].append(from_memory)
        finally:
            proc.terminate()
            proc.wait()
    print(
        f"sequential read of {mib} MiB of present data, latency {args.latency * 1000:.0f} ms "
        f"+ up to {args.jitter * 1000:.0f} ms jitter ({args.rounds} rounds):"
    )
    for name, values in runs.items():
        print(
            f"  {name:<16} {statistics.median(values):8.1f} MB/s   "
            f"(runs: {', '.join(f'{v:.0f}' for v in values)})"
        )
    for label, a, b in (
        ("cold storing / cold", "cold_storing", "cold"),
        ("disk (page cache) / memory", "disk_page_cache", "memory"),
        ("disk (device) / memory", "disk_device", "memory"),
    ):
        each = [x / y for x, y in zip(runs[a], runs[b], strict=True)]
        print(
            f"  {label + ':':<28} {statistics.median(each):.2f}   "
            f"(each: {', '.join(f'{r:.2f}' for r in each)})"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
