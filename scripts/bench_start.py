#!/usr/bin/env python3
"""How long `ebsfs mount` takes to return (the mount ready, in the background), from the
command's start, at several latencies: the part of every forensic walk that comes
before the tool's first read (issue 25).

A small GPT disk with an ext4 partition is served by the emulator; each round runs the
mount command of each tree given (alternating, so drift hits them alike), then
unmounts. Prints the median and slowest per latency and tree. Needs root.

Each mount also asks the emulator's EC2 for the image mtimes (DescribeSnapshots, at the
same latency), as every mount on AWS does; `--without-ec2` leaves EC2 out, as a custom
EBS endpoint alone does.

    sudo .venv/bin/python scripts/bench_start.py [--latencies 20,100,200] [--rounds 5]
        [--trees /tmp/before,.] [--without-ec2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from ebsfs.emulator.diskimage import build_disk  # noqa: E402
from scripts.bench_ab import ebsfs, source_trees  # noqa: E402
from scripts.bench_emulator import SNAP, bench_credentials, start_emulator  # noqa: E402
from scripts.bench_read import compile_sources, emulator_control  # noqa: E402

MIB = 1024 * 1024


def timed_mount(tree: Path, url: str, mnt: Path, ec2: bool = True) -> float:
    ec2_options = ["--ec2-endpoint-url", url] if ec2 else []
    started = time.monotonic()
    ebsfs(tree, "mount", "--endpoint-url", url, *ec2_options, SNAP, str(mnt))
    seconds = time.monotonic() - started
    ebsfs(tree, "umount", str(mnt))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latencies", default="20,100,200", help="ms per call")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--trees", default=str(ROOT), help="source trees, comma-separated")
    parser.add_argument(
        "--without-ec2", action="store_true", help="mount with no EC2 endpoint (no mtime lookup)"
    )
    args = parser.parse_args()
    trees = source_trees(parser, [Path(t) for t in args.trees.split(",")])
    compile_sources(*trees)
    bench_credentials()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        image, mnt = tmp / "disk.img", tmp / "mnt"
        mnt.mkdir()
        files = {f"d{d}/f{f}.txt": b"%d/%d\n" % (d, f) for d in range(10) for f in range(10)}
        build_disk(image, 1024 * MIB, files)
        proc, url = start_emulator(image)
        try:
            timed_mount(trees[-1], url, mnt)  # untimed: the first run loads files from disk
            for latency_ms in (int(x) for x in args.latencies.split(",")):
                emulator_control(url, "faults", {"latency": latency_ms / 1000, "jitter": 0})
                seconds: dict[Path, list[float]] = {tree: [] for tree in trees}
                for round_no in range(args.rounds):
                    for tree in trees if round_no % 2 == 0 else trees[::-1]:
                        seconds[tree].append(timed_mount(tree, url, mnt, not args.without_ec2))
                for tree in trees:
                    s = seconds[tree]
                    print(
                        f"{latency_ms:>4} ms  {str(tree):<24} mount returns after "
                        f"{statistics.median(s):.3f} s median, {max(s):.3f} s slowest "
                        f"({', '.join(f'{x:.2f}' for x in s)})",
                        flush=True,
                    )
        finally:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
