#!/usr/bin/env python3
"""Before/after: cold reads through a fresh mount of two source trees, interleaved
round by round against one emulator, so that the machine's drift hits both alike.

Each round mounts the snapshot with tree A and tree B (the order alternates), reads
the whole image with `dd bs=1M` (page cache dropped first), and records the time, the
mount process's CPU time per block fetched (user and system) and its minor page
faults. Prints each run, the medians with the slowest run, and the per-round ratios
B/A (a ratio of two runs made seconds apart is steadier than a ratio of medians).

Make the "before" tree with `git worktree add /tmp/before <commit>`; the emulator and
these helpers come from this tree, only the mounts run the given trees' code. Needs
root.

    sudo .venv/bin/python scripts/bench_ab.py /tmp/before . [--latency 20] [--tls]
        [--rounds 8] [--mib 2048 --written 0.6] [--profile queue5-tail]
        [--nagle] [--close-after 100 [--close-silently]] [--slow-tail 0.01:10] ...
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from ebsfs.emulator.diskimage import random_image  # noqa: E402
from ebsfs.emulator.selfsigned import make_certificate  # noqa: E402
from scripts.bench_emulator import (  # noqa: E402
    PROFILES,
    SNAP,
    add_wire_options,
    bench_credentials,
    check_close_silently,
    start_emulator,
    wire_options,
)
from scripts.bench_read import MB, MIB, cold_dd, emulator_control, get_calls  # noqa: E402


@dataclass
class Runs:
    seconds: list[float] = field(default_factory=list)
    cpu_ms_per_block: list[float] = field(default_factory=list)


def process_counters(pid: int) -> tuple[int, float]:
    """(minor page faults, user + system seconds) of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[7]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ebsfs(tree: Path, *args: str) -> None:
    """An ebsfs command run from the source tree `tree`."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    subprocess.run([sys.executable, "-m", "ebsfs", *args], check=True, env=env, cwd="/")


def source_trees(parser: argparse.ArgumentParser, paths: list[Path]) -> list[Path]:
    """The trees given, resolved; a usage error for one that holds no ebsfs."""
    trees = [path.resolve() for path in paths]
    for tree in trees:
        if not (tree / "ebsfs" / "__main__.py").exists():
            parser.error(f"{tree} holds no ebsfs package")
    return trees


def one_run(tree: Path, url: str, mnt: Path, mib: int) -> tuple[float, float]:
    """Seconds for a cold read of the whole image through a fresh mount of `tree`, and
    the mount's CPU milliseconds per block fetched."""
    ebsfs(tree, "mount", "--endpoint-url", url, SNAP, str(mnt))
    try:
        pid = int(os.getxattr(mnt, "user.ebsfs.pid"))
        calls, (faults, cpu) = get_calls(url), process_counters(pid)
        seconds = cold_dd(mnt / f"{SNAP}.img", mib)
        fetched = max(get_calls(url) - calls, 1)
        faults_after, cpu_after = process_counters(pid)
    finally:
        ebsfs(tree, "umount", str(mnt))
    cpu_ms = (cpu_after - cpu) / fetched * 1000
    print(
        f"  {str(tree):<24} {mib * MIB / seconds / MB:6.0f} MB/s  cpu/block {cpu_ms:.2f} ms  "
        f"minor faults {faults_after - faults}  blocks {fetched}",
        flush=True,
    )
    return seconds, cpu_ms


def ratios(after: list[float], before: list[float]) -> str:
    each = [a / b for a, b in zip(after, before, strict=True)]
    return f"{', '.join(f'{x:.2f}' for x in each)} (median {statistics.median(each):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path, help="tree A (e.g. a git worktree)")
    parser.add_argument("after", type=Path, help="tree B")
    parser.add_argument("--latency", type=float, default=20, help="ms per call (+half jitter)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--mib", type=int, default=2048, help="disk size (MiB)")
    parser.add_argument("--written", type=float, default=0.6, help="share of blocks written")
    parser.add_argument("--tls", action="store_true", help="serve HTTPS (throwaway certificate)")
    parser.add_argument(
        "--profile",
        choices=PROFILES,
        default="emulator",
        help="the server: today's emulator (default), tls-nagle-close (HTTPS, Nagle on, "
        "connections closed every 100 answers), queue5-tail (a listen queue of 5, 1 %% "
        "of calls 10x slower) or slow-accept (HTTPS, Nagle on, 20 accepts a second); "
        "the options below add to it",
    )
    add_wire_options(parser)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    profile_tls, profile_options = PROFILES[args.profile]
    args.tls = args.tls or profile_tls
    wire = [*profile_options, *wire_options(args)]
    check_close_silently(parser, wire)
    trees = source_trees(parser, [args.before, args.after])
    bench_credentials()
    runs = {tree: Runs() for tree in trees}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        mnt = tmp / "mnt"
        mnt.mkdir()
        tls: list[str] = []
        if args.tls:
            cert, key = make_certificate(tmp)
            tls = ["--tls-cert", str(cert), "--tls-key", str(key)]
            os.environ["AWS_CA_BUNDLE"] = str(cert)
        image = tmp / "disk.img"
        random_image(image, args.mib * MIB, seed=5, written=args.written)
        proc, url = start_emulator(image, *tls, *wire)
        try:
            latency = args.latency / 1000
            emulator_control(url, "faults", {"latency": latency, "jitter": latency / 2})
            print("untimed first read (the emulator's mmap, fresh memory):", flush=True)
            one_run(trees[1], url, mnt, args.mib)
            for round_no in range(args.rounds):
                print(f"round {round_no + 1}:", flush=True)
                for tree in trees if round_no % 2 == 0 else trees[::-1]:
                    seconds, cpu_ms = one_run(tree, url, mnt, args.mib)
                    runs[tree].seconds.append(seconds)
                    runs[tree].cpu_ms_per_block.append(cpu_ms)
        finally:
            proc.terminate()
            proc.wait()
    size = args.mib * MIB
    server = f" (emulator {' '.join(wire)})" if wire else ""
    print(
        f"\n{args.mib} MiB, {args.written:.0%} written, {args.latency:g} ms"
        f"{' over HTTPS' if args.tls else ''}{server}, {args.rounds} rounds:"
    )
    for tree in trees:
        r = runs[tree]
        print(
            f"  {str(tree):<24} median {size / statistics.median(r.seconds) / MB:.0f} MB/s "
            f"(slowest {size / max(r.seconds) / MB:.0f}), "
            f"cpu/block median {statistics.median(r.cpu_ms_per_block):.2f} ms"
        )
    before, after = runs[trees[0]], runs[trees[1]]
    print(f"  throughput B/A per round: {ratios(before.seconds, after.seconds)}")
    print(f"  cpu/block B/A per round:  {ratios(after.cpu_ms_per_block, before.cpu_ms_per_block)}")


if __name__ == "__main__":
    main()
