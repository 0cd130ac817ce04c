#!/usr/bin/env python3
"""What answering never-written blocks costs a FUSE process: a cold `dd bs=1M` of a
mostly empty snapshot through a fresh ebsfs mount, and of a trivial pyfuse3
filesystem returning zeros (scripts/zerofs.py), with each process's user and system
CPU time per 512 KiB of image read.

Why: bench_read.py's CPU per block divides all of the mount's CPU by the blocks it
fetched, so on a sparse disk it includes the holes answered beside them. This shows
how much of that is ebsfs and how much is the kernel's FUSE and page-cache work that
any FUSE filesystem pays. Needs root.

    sudo .venv/bin/python scripts/bench_holes.py [--size-mib 2048] [--written 0.02] [--rounds 3]
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
from scripts.bench_emulator import SNAP, start_emulator  # noqa: E402
from scripts.bench_read import (  # noqa: E402
    cold_dd,
    ebsfs,
    emulator_control,
    get_calls,
    wait_for_mount,
)

HALF_MIB = 512 * 1024


def user_system(pid: int) -> tuple[float, float]:
    """User and system seconds of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def measured(name: str, pid: int, image: Path, mib: int) -> str:
    before = user_system(pid)
    seconds = cold_dd(image, mib)
    after = user_system(pid)
    user, system = after[0] - before[0], after[1] - before[1]
    per = (user + system) / (mib * 1024 * 1024 / HALF_MIB) * 1000
    return (
        f"  {name:<7} {seconds:5.2f} s  user {user:.2f} s  system {system:.2f} s  "
        f"= {per:.3f} ms per 512 KiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=2048)
    parser.add_argument(
        "--written", type=float, default=0.02, help="share of blocks written (default 0.02)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for key, value in (
        ("AWS_ACCESS_KEY_ID", "bench"),
        ("AWS_SECRET_ACCESS_KEY", "bench"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        os.environ.setdefault(key, value)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        image = tmp / "holes.img"
        random_image(image, args.size_mib * 1024 * 1024, written=args.written, seed=3)
        emulator, url = start_emulator(image)
        mnt, zero_mnt = tmp / "mnt", tmp / "zero"
        mnt.mkdir()
        zero_mnt.mkdir()
        zerofs = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "scripts" / "zerofs.py"),
                str(zero_mnt),
                str(args.size_mib * 1024 * 1024),
            ]
        )
        try:
            emulator_control(url, "faults", {"latency": 0.02, "jitter": 0.01})
            wait_for_mount(zero_mnt)
            print(
                f"cold dd of {args.size_mib} MiB, {args.written:.0%} of blocks written, "
                f"20 ms per call (+ up to 10 ms):"
            )
            for _ in range(args.rounds):
                ebsfs("mount", "--endpoint-url", url, SNAP, str(mnt))
                try:
                    pid = int(os.getxattr(mnt, "user.ebsfs.pid"))
                    calls = get_calls(url)
                    line = measured("ebsfs", pid, mnt / f"{SNAP}.img", args.size_mib)
                    print(f"{line} ({get_calls(url) - calls} blocks fetched)", flush=True)
                finally:
                    ebsfs("umount", str(mnt))
                print(
                    measured("zerofs", zerofs.pid, zero_mnt / "zero.img", args.size_mib), flush=True
                )
        finally:
            zerofs.terminate()
            zerofs.wait()
            emulator.terminate()
            emulator.wait()


if __name__ == "__main__":
    main()
