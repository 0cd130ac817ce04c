#!/usr/bin/env python3
"""`ebsfs diff --files` between two snapshots of one volume, with the metadata prefetch
on and off, side by side in one run (issue 25: "diff --files uses the same machinery
and gets faster with it").

The volume is bench_walk.py's `many` disk (GPT, one ext4 partition, 40,000 small files
in 1,600 directories beside 1.2 GB of large files); the second snapshot is a copy of it
changed through a loop mount (200 small files modified, 50 deleted, 50 added). Both
are served by the emulator as one lineage (ListChangedBlocks works between them). Each
round runs the command with the prefetch on, then off; median and slowest seconds,
and the blocks fetched, per latency.

    sudo .venv/bin/python scripts/bench_difffiles.py [--latencies 20,100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from ebsfs.emulator.diskimage import build_disk  # noqa: E402
from scripts.bench_emulator import SNAP, bench_credentials, start_emulator  # noqa: E402
from scripts.bench_read import emulator_control, get_calls  # noqa: E402
from scripts.bench_walk import many_files  # noqa: E402

GIB = 1024**3
FIRST, SECOND = SNAP, "snap-0d2"  # start_emulator serves its image as SNAP


def make_second(first: Path, second: Path, offset: int, files: dict[str, bytes]) -> None:
    """The second snapshot: a copy of the first changed through the kernel's ext4 (a
    read-write loop mount of its partition), as a day of use would: 200 small files
    modified, 50 deleted, 50 added."""
    subprocess.run(["cp", "--sparse=always", str(first), str(second)], check=True)
    small = sorted(name for name in files if name.endswith(".txt"))
    device = subprocess.run(
        ["losetup", "-f", "--show", "-o", str(offset), str(second)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    try:
        with tempfile.TemporaryDirectory() as mnt_name:
            mnt = Path(mnt_name)
            subprocess.run(["mount", device, str(mnt)], check=True)
            try:
                for name in small[:200]:
                    with open(mnt / name, "ab") as f:
                        f.write(b"changed\n")
                for name in small[200:250]:
                    (mnt / name).unlink()
                (mnt / "usr/share/new").mkdir()
                for n in range(50):
                    (mnt / f"usr/share/new/n{n:02}.txt").write_bytes(b"new %d\n" % n)
            finally:
                subprocess.run(["umount", str(mnt)], check=True)
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


def timed_diff(url: str, prefetch: bool) -> tuple[float, int, str]:
    options = [] if prefetch else ["--no-prefetch-metadata"]
    before = get_calls(url)
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "ebsfs", "diff", "--files", "--endpoint-url", url]
        + options
        + [FIRST, SECOND],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return time.monotonic() - started, get_calls(url) - before, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latencies", default="20,100", help="ms per call")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    bench_credentials()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        files = many_files()
        first, second = tmp / "first.img", tmp / "second.img"
        offset = build_disk(first, 4 * GIB, files)
        make_second(first, second, offset, files)
        proc, url = start_emulator(first, "--snapshot", f"{SECOND}={second},parent={FIRST}")
        try:
            for latency_ms in (int(x) for x in args.latencies.split(",")):
                latency = latency_ms / 1000
                emulator_control(url, "faults", {"latency": latency, "jitter": latency / 2})
                seconds: dict[bool, list[float]] = {True: [], False: []}
                fetched: dict[bool, list[int]] = {True: [], False: []}
                outputs = set()
                for _ in range(args.rounds):
                    for prefetch in (True, False):
                        s, n, out = timed_diff(url, prefetch)
                        seconds[prefetch].append(s)
                        fetched[prefetch].append(n)
                        outputs.add(out)
                on, off = seconds[True], seconds[False]
                print(
                    f"{latency_ms:>4} ms  prefetch on {statistics.median(on):.2f} s "
                    f"(slowest {max(on):.2f}, {statistics.median(fetched[True]):.0f} blocks), "
                    f"off {statistics.median(off):.2f} s (slowest {max(off):.2f}, "
                    f"{statistics.median(fetched[False]):.0f} blocks), off/on "
                    f"{statistics.median(off) / statistics.median(on):.1f}x; "
                    f"{'same listing every run' if len(outputs) == 1 else 'LISTINGS DIFFER'} "
                    f"({len(next(iter(outputs)).splitlines())} lines)",
                    flush=True,
                )
        finally:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
