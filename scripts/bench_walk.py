#!/usr/bin/env python3
"""Forensic walks through a fresh mount, with and without the metadata prefetch, against
dsnap's full download of the same snapshot (issue 25), side by side in one run.

Two disks, each a GPT disk with one ext4 partition, served by the emulator:
- `lazy`: 8 GiB holding about 1 GB (4,000 small files in 40 directories, 60 files of
  16 MiB); the walk is `fls -r` on the partition file, then `icat` of one large file.
- `many`: 4 GiB holding 40,000 small files in 1,600 directories beside about 1.2 GB of
  large files; the walks are `fls -r` on the partition file, a `find`-style walk
  (`find -printf` of every name, size and mtime) on a read-only loop mount of it, and
  `cat` of one file by its path on such a loop mount (what the mount's walk costs a
  user who wants one file).

Each timed run starts with the `ebsfs mount` command (the mount's start included) and
ends when the walk's last command exits. The mount asks the emulator's EC2 for the
image mtimes, as every mount on AWS does (`--without-ec2`: a custom EBS endpoint
alone, as the figures before 2026-12-08 were measured); the page cache is dropped first. Modes
alternate within each round (prefetch on, prefetch off, dsnap), so a noisy moment costs
every mode alike. Printed per cell: median and slowest seconds, blocks fetched, and the
ratios of medians. Needs root (mount, losetup).

    sudo .venv/bin/python scripts/bench_walk.py [--disks lazy,many] [--latencies 20,100]
"""

from __future__ import annotations

import argparse
import random
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
from scripts.bench_lazy import disk_files, find_inode, present_blocks  # noqa: E402
from scripts.bench_read import (  # noqa: E402
    compile_sources,
    drop_page_cache,
    dsnap,
    ebsfs,
    emulator_control,
    get_calls,
)

GIB = 1024**3
PART = f"{SNAP}-part1.img"
MOUNT_OPTIONS: list[str] = []


def many_files(seed: int = 12) -> dict[str, bytes]:
    """40,000 small files in 1,600 directories (25 each, three levels deep) and 75
    files of 16 MiB (about 1.2 GB)."""
    rng = random.Random(seed)
    files: dict[str, bytes] = {}
    for d in range(1600):
        top, mid = divmod(d, 40)
        for f in range(25):
            text = f"{d}/{f} " + "x" * rng.randrange(20, 3000) + "\n"
            files[f"usr/share/p{top:02}/d{mid:02}/f{f:02}.txt"] = text.encode()
    for n in range(75):
        files[f"var/lib/big/blob-{n:03}.bin"] = rng.randbytes(16 * 1024 * 1024)
    return files


def fls_walk(mnt: Path, inode: str | None) -> None:
    part = str(mnt / PART)
    subprocess.run(["fls", "-r", part], check=True, stdout=subprocess.DEVNULL)
    if inode is not None:
        subprocess.run(["icat", part, inode], check=True, stdout=subprocess.DEVNULL)


ONE_FILE = "usr/share/p39/d39/f24.txt"
"""The `cat` walk's file: the last directory's last file (a path of five levels)."""


def find_walk(mnt: Path, fs_mnt: Path, walk: str = "find") -> None:
    """`find` of every name, size and mtime on a loop mount of the partition, or with
    walk "cat" only one file read by its path (what a walk started at mount costs a
    user who wants one file: the tree's metadata is fetched beside it)."""
    device = subprocess.run(
        ["losetup", "-r", "-f", "--show", str(mnt / PART)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    try:
        subprocess.run(["mount", "-o", "ro,noload", device, str(fs_mnt)], check=True)
        try:
            if walk == "cat":
                subprocess.run(
                    ["cat", str(fs_mnt / ONE_FILE)], check=True, stdout=subprocess.DEVNULL
                )
            else:
                subprocess.run(
                    ["find", str(fs_mnt), "-printf", "%p %s %T@\n"],
                    check=True,
                    stdout=subprocess.DEVNULL,
                )
        finally:
            subprocess.run(["umount", str(fs_mnt)], check=True)
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


def timed_walk(
    url: str, mnt: Path, prefetch: bool, walk: str, inode: str | None, ec2: bool = True
) -> tuple[float, int]:
    """Seconds from the mount command to the walk's end, and blocks fetched; `ec2`: the
    mount asks the emulator's EC2 for the image mtimes."""
    drop_page_cache()
    before = get_calls(url)
    options = [*MOUNT_OPTIONS] + ([] if prefetch else ["--no-prefetch-metadata"])
    if ec2:
        options += ["--ec2-endpoint-url", url]
    started = time.monotonic()
    ebsfs("mount", "--endpoint-url", url, *options, SNAP, str(mnt))
    try:
        if walk == "fls":
            fls_walk(mnt, inode)
        else:
            find_walk(mnt, mnt.parent / "fs", walk)
        seconds = time.monotonic() - started
    finally:
        ebsfs("umount", str(mnt))
    return seconds, get_calls(url) - before


def run_disk(name: str, args: argparse.Namespace, tmp: Path) -> list[str]:
    image = tmp / f"{name}.img"
    if name == "lazy":
        build_disk(image, 8 * GIB, disk_files())
        walks = ["fls"]
    else:
        build_disk(image, 4 * GIB, many_files())
        walks = args.walks.split(",")
    written = len(present_blocks(image))
    inode = find_inode(str(image), 2048) if name == "lazy" else None
    print(f"{name}: {image.stat().st_size // GIB} GiB disk, {written} blocks written", flush=True)
    proc, url = start_emulator(image)
    mnt, fs_mnt = tmp / "mnt", tmp / "fs"
    mnt.mkdir(exist_ok=True)
    fs_mnt.mkdir(exist_ok=True)
    rows = []
    try:
        for latency_ms in args.latencies:
            latency = latency_ms / 1000
            emulator_control(url, "faults", {"latency": latency, "jitter": latency / 2})
            dsnap_seconds: list[float] = []  # measured beside the first walk's rounds
            for walk in walks:
                seconds: dict[str, list[float]] = {"on": [], "off": []}
                fetched: dict[str, list[int]] = {"on": [], "off": []}
                for _ in range(args.rounds):
                    for mode in ("on", "off"):
                        s, n = timed_walk(url, mnt, mode == "on", walk, inode, not args.without_ec2)
                        seconds[mode].append(s)
                        fetched[mode].append(n)
                    if not args.skip_dsnap and walk == walks[0]:
                        out = tmp / "dsnap"
                        out.mkdir(exist_ok=True)
                        dsnap_seconds.append(dsnap(url, out))
                    print(
                        f"  {latency_ms} ms {walk}: prefetch on {seconds['on'][-1]:.2f} s "
                        f"({fetched['on'][-1]} blocks), off {seconds['off'][-1]:.2f} s "
                        f"({fetched['off'][-1]} blocks)"
                        + (f", dsnap {dsnap_seconds[-1]:.2f} s" if dsnap_seconds else ""),
                        flush=True,
                    )
                rows.append(row(name, written, latency_ms, walk, seconds, dsnap_seconds, fetched))
    finally:
        proc.terminate()
        proc.wait()
    return rows


def row(
    disk: str,
    written: int,
    latency_ms: int,
    walk: str,
    seconds: dict[str, list[float]],
    dsnap_seconds: list[float],
    fetched: dict[str, list[int]],
) -> str:
    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} ({max(values):.2f})" if values else "-"

    on, off = statistics.median(seconds["on"]), statistics.median(seconds["off"])
    full = statistics.median(dsnap_seconds) if dsnap_seconds else float("nan")
    share = statistics.median(fetched["on"]) / written
    return (
        f"| {disk} | {latency_ms} ms | {walk} | {cell(seconds['on'])} | {cell(seconds['off'])} | "
        f"{cell(dsnap_seconds)} | {full / on:.1f}x | {off / on:.1f}x | "
        f"{statistics.median(fetched['on']):.0f} ({share:.1%}) | "
        f"{statistics.median(fetched['off']):.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--disks", default="lazy,many")
    parser.add_argument("--latencies", default="20,100")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-dsnap", action="store_true")
    parser.add_argument(
        "--mount-option", action="append", default=[], help="passed to every ebsfs mount"
    )
    parser.add_argument(
        "--walks", default="fls,find,cat", help="the many disk's walks (cat: one file by path)"
    )
    parser.add_argument(
        "--without-ec2", action="store_true", help="mount with no EC2 endpoint (no mtime lookup)"
    )
    args = parser.parse_args()
    compile_sources()
    MOUNT_OPTIONS.extend(args.mount_option)
    args.latencies = [int(x) for x in args.latencies.split(",")]
    bench_credentials()
    rows: list[str] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        for disk in args.disks.split(","):
            rows += run_disk(disk, args, Path(tmp_name))
    print(
        "\nseconds: median (slowest) of the rounds, from `ebsfs mount` to the walk's end\n"
        "| disk | latency | walk | prefetch on | prefetch off | dsnap | dsnap/on | off/on | "
        "blocks fetched, on (of written) | blocks fetched, off |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
