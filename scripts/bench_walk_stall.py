#!/usr/bin/env python3
"""How long the metadata prefetch holds back a tool's reads while it parses: the walkers
parse on the engine's loop, so a walk of a large inode table or MFT delays every read
that comes meanwhile, even one served from memory (issue 25).

The 40,000-file disk of bench_walk.py (`many`) is served by the emulator at 20 ms a
call and opened with `ebsfs.open`; its partition's head is read (the walk starts),
then a second thread reads 4 KiB of an already cached block in a loop until the walk
has ended, timing each read. Prints the walk's duration, how many reads were made and
the slowest, the 99th percentile and the median, with the prefetch on, and as the
baseline the same loop with it off. Run it with PYTHONPATH pointing at another tree to
compare two trees (copy this script there: it imports the tree it lies in).

    sudo .venv/bin/python scripts/bench_walk_stall.py
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import ebsfs  # noqa: E402
from ebsfs.emulator.diskimage import build_disk  # noqa: E402
from scripts.bench_emulator import SNAP, bench_credentials, start_emulator  # noqa: E402
from scripts.bench_read import emulator_control  # noqa: E402
from scripts.bench_walk import many_files  # noqa: E402

GIB = 1024**3


def timed_reads(part: ebsfs.fileobj.PartitionFile, until: threading.Event) -> list[float]:
    """Seconds each 4 KiB read of a cached block took, until `until` is set."""
    took = []
    while not until.is_set():
        started = time.monotonic()
        part.pread(4096, 0)
        took.append(time.monotonic() - started)
        time.sleep(0.001)
    return took


def one_run(url: str, prefetch: bool) -> None:
    with ebsfs.open(SNAP, endpoint_url=url, prefetch_metadata=prefetch) as image:
        part = image.partitions()[0]
        part.pread(4096, 0)  # the head: the walk starts
        done = threading.Event()
        took: list[float] = []
        reader = threading.Thread(target=lambda: took.extend(timed_reads(part, done)))
        started = time.monotonic()
        reader.start()
        deadline = started + (120 if prefetch else 5)
        while time.monotonic() < deadline:
            walks = image.stats()["metadata_prefetch"]
            if (
                prefetch
                and walks.get("walks_started", 0)
                and walks["walks_started"] == (walks["walks_finished"] + walks["walks_stopped"])
            ):
                break
            time.sleep(0.01)
        seconds = time.monotonic() - started
        done.set()
        reader.join()
    took.sort()
    print(
        f"prefetch {'on ' if prefetch else 'off'}: {seconds:.2f} s, {len(took)} reads of a "
        f"cached block: slowest {took[-1] * 1000:.1f} ms, "
        f"p99 {took[int(len(took) * 0.99)] * 1000:.1f} ms, "
        f"median {statistics.median(took) * 1000:.2f} ms",
        flush=True,
    )


def main() -> None:
    bench_credentials()
    print(f"ebsfs from {Path(ebsfs.__file__).parent}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "many.img"
        build_disk(image, 4 * GIB, many_files())
        proc, url = start_emulator(image)
        try:
            emulator_control(url, "faults", {"latency": 0.02, "jitter": 0.01})
            for prefetch in (True, False, True, False):
                one_run(url, prefetch)
        finally:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
