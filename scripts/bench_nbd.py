#!/usr/bin/env python3
"""NBD against FUSE for the tools that copy and compare disks: `qemu-img convert -O raw`
and `qemu-img compare` of a mostly empty snapshot, over `ebsfs nbd` (block status: the
holes are skipped) and through a fresh `ebsfs mount` (FUSE: every byte is read, zeros
included), side by side, round by round against one emulator at a given latency.

Each run starts a fresh server (cold cache) and drops the page cache. Prints each run,
then per measure the median and the slowest of each face and the per-round ratios
FUSE/NBD (the issue's goal: convert >= 1.5x, compare >= 10x sooner over NBD). Needs
root (the mount, dropping the page cache), qemu-utils.

    sudo .venv/bin/python scripts/bench_nbd.py [--size-mib 8192] [--written 0.125]
        [--latency-ms 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from ebsfs.emulator.diskimage import random_image  # noqa: E402
from scripts.bench_emulator import SNAP, bench_credentials, start_emulator  # noqa: E402
from scripts.bench_read import drop_page_cache, ebsfs, emulator_control, get_calls  # noqa: E402

MEASURES = ("convert", "compare")


def timed(command: list[str], ok: tuple[int, ...] = (0,)) -> float:
    drop_page_cache()
    started = time.monotonic()
    result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.monotonic() - started
    if result.returncode not in ok:
        raise SystemExit(f"{command[0]} failed ({result.returncode}): {result.stderr.strip()}")
    return seconds


def commands(source: str, image: Path, out: Path) -> dict[str, list[str]]:
    """Each measure's command reading `source` (an NBD URI or a file of the mount)."""
    return {
        "convert": ["qemu-img", "convert", "-O", "raw", source, str(out)],
        # The same bytes: exit 0. Reading the snapshot is what is measured.
        "compare": ["qemu-img", "compare", "-f", "raw", "-F", "raw", source, str(image)],
    }


def over_nbd(url: str, tmp: Path, image: Path, measure: str) -> float:
    sock = tmp / "nbd.sock"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ebsfs",
            "nbd",
            "-f",
            "--endpoint-url",
            url,
            SNAP,
            "--socket",
            str(sock),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(1200):
            if sock.exists() or server.poll() is not None:
                break
            time.sleep(0.05)
        if not sock.exists():
            raise SystemExit("ebsfs nbd did not listen")
        uri = f"nbd+unix:///{SNAP}?socket={sock}"
        return timed(commands(uri, image, tmp / "out.raw")[measure])
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
        (tmp / "out.raw").unlink(missing_ok=True)


def over_fuse(url: str, tmp: Path, image: Path, measure: str) -> float:
    mnt = tmp / "mnt"
    mnt.mkdir(exist_ok=True)
    ebsfs("mount", "--endpoint-url", url, "--log-file", str(tmp / "mount.log"), SNAP, str(mnt))
    try:
        return timed(commands(str(mnt / f"{SNAP}.img"), image, tmp / "out.raw")[measure])
    finally:
        ebsfs("umount", str(mnt))
        (tmp / "out.raw").unlink(missing_ok=True)


def report(name: str, nbd: list[float], fuse: list[float]) -> None:
    ratios = [f / n for n, f in zip(nbd, fuse, strict=True)]
    print(
        f"{name:<8} NBD  median {statistics.median(nbd):7.2f} s  slowest {max(nbd):7.2f} s\n"
        f"{'':<8} FUSE median {statistics.median(fuse):7.2f} s  slowest {max(fuse):7.2f} s\n"
        f"{'':<8} FUSE/NBD per round: {' '.join(f'{r:.1f}x' for r in ratios)}  "
        f"(median {statistics.median(ratios):.1f}x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=8192)
    parser.add_argument("--written", type=float, default=0.125, help="share of blocks written")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root (a FUSE mount, dropping the page cache)")
    bench_credentials()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        image = tmp / "source.img"
        random_image(image, args.size_mib * 1024 * 1024, written=args.written, seed=29)
        emulator, url = start_emulator(image)
        try:
            emulator_control(url, "faults", {"latency": args.latency_ms / 1000})
            print(
                f"{args.size_mib} MiB snapshot, {args.written:.1%} of blocks written, "
                f"{args.latency_ms:g} ms per call; fresh server and cold page cache per run"
            )
            results: dict[str, dict[str, list[float]]] = {
                m: {"nbd": [], "fuse": []} for m in MEASURES
            }
            faces: dict[str, Callable[[str, Path, Path, str], float]] = {
                "nbd": over_nbd,
                "fuse": over_fuse,
            }
            for round_no in range(args.rounds):
                order = ["nbd", "fuse"] if round_no % 2 == 0 else ["fuse", "nbd"]
                for measure in MEASURES:
                    for face in order:
                        calls = get_calls(url)
                        seconds = faces[face](url, tmp, image, measure)
                        results[measure][face].append(seconds)
                        print(
                            f"  round {round_no + 1} {measure:<8} {face:<4} {seconds:7.2f} s "
                            f"({get_calls(url) - calls} blocks fetched)",
                            flush=True,
                        )
            for measure in MEASURES:
                report(measure, results[measure]["nbd"], results[measure]["fuse"])
        finally:
            emulator.terminate()
            emulator.wait()


if __name__ == "__main__":
    main()
