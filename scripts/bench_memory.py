#!/usr/bin/env python3
"""Peak memory of a mount under load: four readers at once (each `dd` of the whole
image from its own offset, page cache dropped) through a mount with a small cache, at
several latencies (a slower service keeps more calls, so more blocks, in flight).
Prints the mount process's peak RSS (VmHWM) per run. Needs root.

    sudo .venv/bin/python scripts/bench_memory.py [--cache-size 64M] [--latencies 20,200]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from ebsfs.emulator.diskimage import random_image  # noqa: E402
from scripts.bench_emulator import SNAP, bench_credentials, start_emulator  # noqa: E402
from scripts.bench_read import drop_page_cache, ebsfs, emulator_control  # noqa: E402

MIB = 1024 * 1024


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise SystemExit("no VmHWM")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--cache-size", default="64M")
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--latencies", default="20,200", help="ms per call")
    args = parser.parse_args()
    bench_credentials()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        image = tmp / "dense.img"
        random_image(image, args.size_mib * MIB, seed=5)
        proc, url = start_emulator(image)
        mnt = tmp / "mnt"
        mnt.mkdir()
        try:
            for latency_ms in (int(x) for x in args.latencies.split(",")):
                latency = latency_ms / 1000
                emulator_control(url, "faults", {"latency": latency, "jitter": latency / 2})
                ebsfs(
                    "mount", "--endpoint-url", url, "--cache-size", args.cache_size, SNAP, str(mnt)
                )
                try:
                    pid = int(os.getxattr(mnt, "user.ebsfs.pid"))
                    drop_page_cache()
                    step = args.size_mib // args.readers
                    readers = [
                        subprocess.Popen(
                            [
                                "dd",
                                f"if={mnt / (SNAP + '.img')}",
                                "of=/dev/null",
                                "bs=1M",
                                f"skip={n * step}",
                                f"count={args.size_mib - n * step}",
                                "status=none",
                            ]
                        )
                        for n in range(args.readers)
                    ]
                    for reader in readers:
                        if reader.wait() != 0:
                            raise SystemExit("a reader failed")
                    print(
                        f"latency {latency_ms} ms, --cache-size {args.cache_size}, "
                        f"{args.readers} readers: mount peak RSS {peak_rss_mib(pid):.0f} "
                        "MiB",
                        flush=True,
                    )
                finally:
                    ebsfs("umount", str(mnt))
        finally:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
