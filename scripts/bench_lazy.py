#!/usr/bin/env python3
"""What a lazy reader pays: sleuthkit's `fls -r` then `icat` of one file, on a large
sparse ext4 disk, through a fresh ebsfs mount, against what the tools really touch.

1. Builds an 8 GiB GPT disk whose ext4 partition holds about 1 GB of files (a tree of
   small text files and some large binary ones), serves it from the emulator.
2. Traces the tools' reads on the raw image file (strace: every lseek/read/pread64 on
   it) and counts the blocks they touch that hold data (the only ones a reader must
   fetch).
3. Runs the same two commands on the image through a fresh mount and counts the
   GetSnapshotBlock calls the emulator served, and the time.
4. Times dsnap's full download of the same snapshot, the alternative to a lazy reader.

    sudo .venv/bin/python scripts/bench_lazy.py [--latency-ms 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import random
import re
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
from scripts.bench_read import (  # noqa: E402
    compile_sources,
    drop_page_cache,
    dsnap,
    ebsfs,
    emulator_control,
    get_calls,
)

BLOCK = 524288
GIB = 1024**3
TARGET = "srv/data/blob-017.bin"


def disk_files(seed: int = 11) -> dict[str, bytes]:
    """About 1 GB: 4,000 small text files in 40 directories, 60 binary files of 16 MiB."""
    rng = random.Random(seed)
    files: dict[str, bytes] = {}
    for d in range(40):
        for f in range(100):
            text = f"file {d}/{f}\n" + "".join(
                f"{rng.randrange(10**9)} line {n}\n" for n in range(rng.randrange(5, 200))
            )
            files[f"home/user{d:02}/notes/{f:03}.txt"] = text.encode()
    for n in range(60):
        files[f"srv/data/blob-{n:03}.bin"] = rng.randbytes(16 * 1024 * 1024)
    return files


def present_blocks(image: Path) -> set[int]:
    zeros = bytes(BLOCK)
    present = set()
    with open(image, "rb") as f:
        index = 0
        while data := f.read(BLOCK):
            if data != zeros[: len(data)]:
                present.add(index)
            index += 1
    return present


def traced_blocks(commands: list[list[str]], image: str, out: Path) -> set[int]:
    """Blocks of `image` the commands read (strace of lseek/read/pread64 on its fd)."""
    touched: set[int] = set()
    for n, command in enumerate(commands):
        trace = out / f"trace-{n}.txt"
        subprocess.run(
            [
                "strace",
                "-f",
                "-qq",
                "-s",
                "0",
                "-e",
                "trace=openat,open,lseek,read,pread64,close",
                "-o",
                str(trace),
                *command,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        fds: dict[tuple[str, int], int] = {}  # (pid, fd) -> file offset
        for line in trace.read_text().splitlines():
            pid, _, call = line.strip().partition(" ")
            call = call.lstrip()
            if (m := re.match(r'open(?:at)?\(.*"(.*)".*\)\s+= (\d+)', call)) and m[1] == image:
                fds[(pid, int(m[2]))] = 0
            elif m := re.match(r"lseek\((\d+), (-?\d+), SEEK_(\w+)\)\s+= (\d+)", call):
                if (pid, int(m[1])) in fds:
                    fds[(pid, int(m[1]))] = int(m[4])
            elif m := re.match(r"read\((\d+), .*\)\s+= (\d+)", call):
                key = (pid, int(m[1]))
                if key in fds and int(m[2]) > 0:
                    start, size = fds[key], int(m[2])
                    touched.update(range(start // BLOCK, (start + size - 1) // BLOCK + 1))
                    fds[key] = start + size
            elif m := re.match(r"pread64\((\d+), .*, (\d+), (\d+)\)\s+= (\d+)", call):
                if (pid, int(m[1])) in fds and int(m[4]) > 0:
                    start, size = int(m[3]), int(m[4])
                    touched.update(range(start // BLOCK, (start + size - 1) // BLOCK + 1))
            elif m := re.match(r"close\((\d+)\)", call):
                fds.pop((pid, int(m[1])), None)
    return touched


def tool_commands(image: str, sector: int, inode: str | None) -> list[list[str]]:
    commands = [["fls", "-r", "-o", str(sector), image]]
    if inode is not None:
        commands.append(["icat", "-o", str(sector), image, inode])
    return commands


def find_inode(image: str, sector: int) -> str:
    listing = subprocess.run(
        ["fls", "-r", "-p", "-o", str(sector), image], check=True, capture_output=True, text=True
    ).stdout
    for line in listing.splitlines():
        if line.endswith(f"\t{TARGET}"):
            return line.split()[-2].rstrip(":").split("-")[0]
    raise SystemExit(f"{TARGET} not in the fls listing")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=int, default=8)
    parser.add_argument("--latency-ms", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-dsnap", action="store_true")
    parser.add_argument("--mount-option", action="append", default=[])
    parser.add_argument(
        "--kernel-readahead-kb",
        type=int,
        help="set the mount's read_ahead_kb after mounting (experiments)",
    )
    args = parser.parse_args()
    compile_sources()
    bench_credentials()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        image = tmp / "disk.img"
        offset = build_disk(image, args.size_gib * GIB, disk_files())
        sector = offset // 512
        present = present_blocks(image)
        inode = find_inode(str(image), sector)
        touched = traced_blocks(tool_commands(str(image), sector, inode), str(image), tmp)
        needed = touched & present
        print(
            f"{args.size_gib} GiB disk, {len(present)} blocks written "
            f"({len(present) * BLOCK / 1e9:.2f} GB); fls -r + icat of {TARGET} (inode "
            f"{inode}) touch {len(touched)} blocks, {len(needed)} of them written",
            flush=True,
        )
        proc, url = start_emulator(image)
        mnt = tmp / "mnt"
        mnt.mkdir()
        fetched, seconds, dsnap_seconds = [], [], []
        try:
            latency = args.latency_ms / 1000
            emulator_control(url, "faults", {"latency": latency, "jitter": latency / 2})
            mounted = str(mnt / f"{SNAP}.img")
            for _ in range(args.rounds):
                ebsfs("mount", "--endpoint-url", url, *args.mount_option, SNAP, str(mnt))
                try:
                    if args.kernel_readahead_kb is not None:
                        device = os.stat(mnt).st_dev
                        Path(
                            f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb"
                        ).write_text(str(args.kernel_readahead_kb))
                    drop_page_cache()
                    before = get_calls(url)
                    started = time.monotonic()
                    for command in tool_commands(mounted, sector, inode):
                        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
                    seconds.append(time.monotonic() - started)
                    fetched.append(get_calls(url) - before)
                finally:
                    ebsfs("umount", str(mnt))
                if not args.skip_dsnap:
                    out = tmp / "dsnap"
                    out.mkdir(exist_ok=True)
                    dsnap_seconds.append(dsnap(url, out))
                print(
                    f"  round: fetched {fetched[-1]} blocks in {seconds[-1]:.2f} s"
                    + (f"; dsnap full download {dsnap_seconds[-1]:.2f} s" if dsnap_seconds else ""),
                    flush=True,
                )
        finally:
            proc.terminate()
            proc.wait()
    ratio = [f / len(needed) for f in fetched]
    print(
        f"\nlatency {args.latency_ms} ms (+ up to half again of jitter): fetched "
        f"{statistics.median(fetched):.0f} blocks (runs: {', '.join(map(str, fetched))}) "
        f"for {len(needed)} written blocks touched: {statistics.median(ratio):.2f}x; "
        f"{statistics.median(seconds):.2f} s"
        + (
            f" against dsnap's {statistics.median(dsnap_seconds):.2f} s full download"
            if dsnap_seconds
            else ""
        )
    )


if __name__ == "__main__":
    main()
