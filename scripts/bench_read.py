#!/usr/bin/env python3
"""Sequential read throughput of a snapshot, as a matrix of latencies and disks, every
measure compared side by side in one run against the emulator.

For each disk (dense: every block written; sparse: 60 % of the blocks written at
random) and each latency (20, 100, 200 ms per call, plus up to half that again of
jitter), --rounds rounds of:

1. `dd bs=1M` of the whole image through a fresh ebsfs mount, cold (default cache:
   where users are), with the mount process's CPU time per block fetched;
2. a boto3 thread pool of 64 calling GetSnapshotBlock on every listed block and
   verifying each body's SHA-256 as ebsfs does (a straightforward Python client);
3. dsnap (PyPI), the Python peer that downloads whole snapshots (sparse file out).

Then, once, warm re-reads through the mount (page cache dropped, ebsfs cache warm)
alternating with reads of a trivial pyfuse3 filesystem returning zeros (the FUSE
ceiling here). Figures are medians; ratios are medians of each round's own ratio of
times (the same bytes read).

The emulator runs as its own process with the real quotas (1,000 GetSnapshotBlock/s per
snapshot); its latency is changed between cells through its control endpoint. With
--profile (repeatable) the whole matrix runs against each server profile of issue 27:
"emulator" (today's, the default), "tls-nagle-close" (HTTPS, Nagle's algorithm on,
keep-alive connections closed every 100 answers), "queue5-tail" (a listen queue of 5,
1 % of calls 10x slower), and "slow-accept" (HTTPS, Nagle's algorithm on, an accept loop
taking 20 connections a second); the wire options (--nagle, --close-after, --slow-tail,
...) add to every profile. Each mount's GET calls per block fetched (above 1: retries or
hedges), connections opened and the most GETs served at once (the mount's calls in
flight as the server saw them) are counted by the emulator. Needs root.

    sudo .venv/bin/python scripts/bench_read.py [--latencies 20,100,200] [--rounds 3]
        [--profile emulator --profile tls-nagle-close --profile queue5-tail
         --profile slow-accept]
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import hashlib
import json
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import botocore.config

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

MB = 1e6
MIB = 1024 * 1024


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def dd(path: Path, mib: int) -> float:
    """Seconds to read `mib` MiB with dd bs=1M."""
    started = time.monotonic()
    subprocess.run(
        ["dd", f"if={path}", "of=/dev/null", "bs=1M", f"count={mib}", "status=none"], check=True
    )
    return time.monotonic() - started


def cold_dd(path: Path, mib: int) -> float:
    drop_page_cache()
    return dd(path, mib)


def process_cpu(pid: int) -> float:
    """User + system seconds of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def emulator_control(url: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"{url}/_emulator/{path}", data=data, method="POST" if data is not None else "GET"
    )
    # Over --tls the emulator's throwaway certificate is trusted as every client here
    # trusts it: through AWS_CA_BUNDLE (urllib does not read that variable itself).
    bundle = os.environ.get("AWS_CA_BUNDLE")
    context = ssl.create_default_context(cafile=bundle) if bundle else None
    with urllib.request.urlopen(request, context=context) as answer:
        return json.load(answer)


def get_calls(url: str) -> int:
    return int(emulator_control(url, "stats")["calls"].get("GetSnapshotBlock", 0))


def mount_costs(url: str, own_requests: int) -> tuple[int, float, int, int]:
    """Since the emulator's counters were last reset: GET calls, those calls per block
    served (hedged or retried blocks make it more than 1), connections opened by
    others than this script (its `own_requests` since the reset, this one included,
    opened one each), and the most GETs the server held at once (the mount's calls in
    flight as the server saw them: issue 27 bounds connections by twice that)."""
    stats = emulator_control(url, "stats")
    calls = int(stats["calls"].get("GetSnapshotBlock", 0))
    connections = int(stats.get("connections", 0)) - own_requests
    peak = int(stats.get("gets_peak", 0))
    return calls, calls / max(len(stats["block_gets"]), 1), connections, peak


def thread_pool(url: str, workers: int = 64) -> tuple[float, int]:
    """Seconds to list and GET every block with a pool of boto3 threads, each body's
    SHA-256 checked against its x-amz-Checksum; bytes received."""
    config = botocore.config.Config(
        max_pool_connections=workers, retries={"mode": "standard", "max_attempts": 10}
    )
    ebs = boto3.session.Session().client(
        "ebs", endpoint_url=url, region_name="us-east-1", config=config
    )
    started = time.monotonic()
    blocks, token = [], None
    while True:
        kw: dict[str, str] = {"NextToken": token} if token else {}
        page = ebs.list_snapshot_blocks(SnapshotId=SNAP, MaxResults=10000, **kw)
        blocks += page["Blocks"]
        token = page.get("NextToken")
        if not token:
            break

    def get(block: dict) -> int:
        r = ebs.get_snapshot_block(
            SnapshotId=SNAP, BlockIndex=block["BlockIndex"], BlockToken=block["BlockToken"]
        )
        data = r["BlockData"].read()
        if base64.b64encode(hashlib.sha256(data).digest()).decode() != r["Checksum"]:
            raise SystemExit(f"block {block['BlockIndex']}: checksum mismatch")
        return len(data)

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        total = sum(pool.map(get, blocks))
    return time.monotonic() - started, total


def dsnap(
    url: str,
    out_dir: Path,
    snapshot_id: str = SNAP,
    before_removing: Callable[[Path], None] | None = None,
) -> float:
    """Seconds for dsnap to download the snapshot to a file in `out_dir` (removed,
    after `before_removing` if given)."""
    code = (
        "import boto3\n"
        "from dsnap.snapshot import LocalSnapshot\n"
        f"s = LocalSnapshot({str(out_dir)!r}, {snapshot_id!r}, "
        "boto3_session=boto3.session.Session(region_name='us-east-1'))\n"
        "s.fetch(force=True)\n"
    )
    env = {**os.environ, "AWS_ENDPOINT_URL": url}
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    seconds = time.monotonic() - started
    if before_removing is not None:
        before_removing(out_dir / f"{snapshot_id}.img")
    (out_dir / f"{snapshot_id}.img").unlink()
    return seconds


def ebsfs(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "ebsfs", *args], check=True)


def compile_sources(*trees: Path) -> None:
    """Byte-compile the ebsfs package that commands will import (each tree given, else
    the one `python -m ebsfs` finds), as pip does when it installs ebsfs. These
    machines set PYTHONDONTWRITEBYTECODE, so an editable checkout is compiled again
    by every command: about 70 modules, 100 ms of each mount's start that no user
    who installed ebsfs pays (cProfile of `ebsfs mount -f`, issue 25)."""
    if not trees:
        import ebsfs as package

        trees = (Path(package.__file__).resolve().parent.parent,)
    for tree in trees:
        subprocess.run(
            [sys.executable, "-m", "compileall", "-q", "-j", "0", str(tree / "ebsfs")],
            check=True,
            stdout=subprocess.DEVNULL,
        )


def wait_for_mount(path: Path) -> None:
    for _ in range(200):
        if os.path.ismount(path):
            return
        time.sleep(0.05)
    raise SystemExit(f"{path} was not mounted")


@dataclass
class Cell:
    """The runs of one (server profile, disk, latency) cell: seconds per measure, and
    per mount its CPU per block, GET calls per block and connections opened."""

    profile: str
    disk: str
    latency_ms: int
    seconds: dict[str, list[float]] = field(
        default_factory=lambda: {"ebsfs": [], "pool": [], "dsnap": []}
    )
    cpu_ms_per_block: list[float] = field(default_factory=list)
    calls_per_block: list[float] = field(default_factory=list)
    connections: list[int] = field(default_factory=list)
    peak_in_flight: list[int] = field(default_factory=list)

    def ratios(self, other: str) -> list[float]:
        return [
            theirs / ours
            for ours, theirs in zip(self.seconds["ebsfs"], self.seconds[other], strict=False)
        ]


def run_cell(
    cell: Cell, url: str, mnt: Path, mib: int, size: int, args: argparse.Namespace, tmp: Path
) -> None:
    latency = cell.latency_ms / 1000
    emulator_control(url, "faults", {"latency": latency, "jitter": latency / 2})
    mount_args = ("mount", "--endpoint-url", url, *args.mount_option, SNAP, str(mnt))
    for _ in range(args.rounds):
        emulator_control(url, "reset", {})  # the mount's connections counted from here
        ebsfs(*mount_args)
        try:
            pid = int(os.getxattr(mnt, "user.ebsfs.pid"))
            calls, cpu = get_calls(url), process_cpu(pid)
            cell.seconds["ebsfs"].append(cold_dd(mnt / f"{SNAP}.img", mib))
            fetched, per_block, connections, peak = mount_costs(url, own_requests=2)
            fetched -= calls
            cell.cpu_ms_per_block.append((process_cpu(pid) - cpu) / max(fetched, 1) * 1000)
            cell.calls_per_block.append(per_block)
            cell.connections.append(connections)
            cell.peak_in_flight.append(peak)
        finally:
            ebsfs("umount", str(mnt))
        seconds, total = thread_pool(url)
        cell.seconds["pool"].append(seconds)
        if not args.skip_dsnap:
            out = tmp / "dsnap"
            out.mkdir(exist_ok=True)
            cell.seconds["dsnap"].append(dsnap(url, out))
        report_cell(cell, size)


def report_cell(cell: Cell, size: int) -> None:
    def rate(seconds: list[float]) -> str:
        return ", ".join(f"{size / s / MB:.0f}" for s in seconds)

    line = (
        f"  {cell.profile} {cell.disk:<6} {cell.latency_ms:>3} ms  "
        f"ebsfs {rate(cell.seconds['ebsfs'])} | pool {rate(cell.seconds['pool'])}"
    )
    if cell.seconds["dsnap"]:
        line += f" | dsnap {rate(cell.seconds['dsnap'])}"
    line += (
        f" MB/s | cpu/block {', '.join(f'{c:.2f}' for c in cell.cpu_ms_per_block)} ms"
        f" | calls/block {', '.join(f'{c:.3f}' for c in cell.calls_per_block)}"
        f" | connections {', '.join(str(c) for c in cell.connections)}"
        f" | peak in flight {', '.join(str(c) for c in cell.peak_in_flight)}"
    )
    print(line, flush=True)


def warm_and_zero(
    url: str, mnt: Path, zero_mnt: Path, mib: int, repeat: int
) -> dict[str, list[float]]:
    """Warm ebsfs reads (a cache holding the whole image, warmed by one read)
    alternating with reads of zerofs, all mounted at once: MB/s each. zerofs once as
    the FUSE ceiling (replies from one hot 1 MiB buffer), once replying from as much
    distinct memory as ebsfs's cache holds (what copying from RAM rather than from the
    CPU's cache costs)."""
    size = mib * MIB
    runs: dict[str, list[float]] = {"ebsfs_warm": [], "zerofs": [], "zerofs_distinct": []}
    emulator_control(url, "faults", {"latency": 0.02, "jitter": 0.01})
    ebsfs("mount", "--endpoint-url", url, "--cache-size", f"{mib + 256}M", SNAP, str(mnt))
    distinct_mnt = zero_mnt.with_name("zero-distinct")
    distinct_mnt.mkdir(exist_ok=True)
    zeros = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "zerofs.py"), str(where), str(size), *extra]
        )
        for where, extra in ((zero_mnt, []), (distinct_mnt, ["--distinct"]))
    ]
    try:
        cold_dd(mnt / f"{SNAP}.img", mib)  # fills the ebsfs cache
        wait_for_mount(zero_mnt)
        wait_for_mount(distinct_mnt)
        cold_dd(distinct_mnt / "zero.img", mib)  # its memory touched once, as ebsfs's
        for _ in range(repeat):
            runs["ebsfs_warm"].append(size / cold_dd(mnt / f"{SNAP}.img", mib) / MB)
            runs["zerofs"].append(size / cold_dd(zero_mnt / "zero.img", mib) / MB)
            runs["zerofs_distinct"].append(size / cold_dd(distinct_mnt / "zero.img", mib) / MB)
    finally:
        for zero in zeros:
            zero.terminate()
            zero.wait()
        ebsfs("umount", str(mnt))
    return runs


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summary(
    cells: list[Cell], warm: dict[str, list[float]], sizes: dict[str, int], args: argparse.Namespace
) -> dict[str, object]:
    print(
        f"\nsequential cold read, whole image, medians of {args.rounds} rounds "
        f"(MB/s of image; ratios of times, each round's own; spread: the mount's slowest "
        f"run / its fastest; calls/block, connections and connections / the GETs the server "
        f"held at once: the mount's, the highest run):"
    )
    # --skip-dsnap: no dsnap columns (not columns of "nan").
    dsnap_columns = ("dsnap", "ebsfs/dsnap") if not args.skip_dsnap else ()
    columns = [
        *("server", "disk", "latency", "ebsfs", "ebsfs slowest", "spread", "pool of 64"),
        *dsnap_columns[:1],
        "ebsfs/pool",
        *dsnap_columns[1:],
        *("CPU ms/block", "calls/block", "connections", "connections / peak in flight"),
    ]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    rows: list[dict[str, object]] = []
    figures: dict[str, object] = {"cells": rows}
    for c in cells:
        size = sizes[c.disk]
        pool_ratio = c.ratios("pool")
        dsnap_ratio = c.ratios("dsnap")
        mounts = c.seconds["ebsfs"]
        peaks = c.peak_in_flight
        dsnap_cells = (
            (
                f"{size / median(c.seconds['dsnap']) / MB:.0f}",
                f"{median(dsnap_ratio):.2f} ({', '.join(f'{r:.2f}' for r in dsnap_ratio)})",
            )
            if dsnap_columns
            else ()
        )
        cells_shown = [
            c.profile,
            c.disk,
            f"{c.latency_ms} ms",
            f"{size / median(mounts) / MB:.0f}",
            f"{size / max(mounts) / MB:.0f}",
            f"{max(mounts) / min(mounts):.2f}",
            f"{size / median(c.seconds['pool']) / MB:.0f}",
            *dsnap_cells[:1],
            f"{median(pool_ratio):.2f} ({', '.join(f'{r:.2f}' for r in pool_ratio)})",
            *dsnap_cells[1:],
            f"{median(c.cpu_ms_per_block):.2f}",
            f"{max(c.calls_per_block):.3f}",
            f"{max(c.connections)}",
            f"{max(n / max(p, 1) for n, p in zip(c.connections, peaks, strict=True)):.2f}",
        ]
        print("| " + " | ".join(cells_shown) + " |")
        rows.append(
            {
                "profile": c.profile,
                "disk": c.disk,
                "latency_ms": c.latency_ms,
                "bytes": size,
                "seconds": c.seconds,
                "cpu_ms_per_block": c.cpu_ms_per_block,
                "calls_per_block": c.calls_per_block,
                "connections": c.connections,
                "peak_in_flight": c.peak_in_flight,
            }
        )
    if warm["ebsfs_warm"]:
        for ceiling in ("zerofs", "zerofs_distinct"):
            each = [w / z for w, z in zip(warm["ebsfs_warm"], warm[ceiling], strict=True)]
            print(
                f"warm re-read (dense, {args.warm_repeat} alternating reads each): ebsfs "
                f"{median(warm['ebsfs_warm']):.0f} MB/s, {ceiling} "
                f"{median(warm[ceiling]):.0f} MB/s, warm/{ceiling} {median(each):.2f} "
                f"({', '.join(f'{r:.2f}' for r in each)})"
            )
        figures["warm"] = warm
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense-mib", type=int, default=1024, help="dense disk size (MiB)")
    parser.add_argument("--sparse-mib", type=int, default=2048, help="sparse disk size (MiB)")
    parser.add_argument(
        "--written",
        type=float,
        default=0.6,
        help="share of the sparse disk's blocks written (default 0.6)",
    )
    parser.add_argument("--latencies", default="20,100,200", help="ms per call, comma-separated")
    parser.add_argument("--disks", default="dense,sparse")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--warm-repeat",
        type=int,
        default=9,
        help="alternating warm ebsfs and zerofs reads (0: none)",
    )
    parser.add_argument("--skip-dsnap", action="store_true")
    parser.add_argument(
        "--mount-option",
        action="append",
        default=[],
        help="extra option for `ebsfs mount` (repeatable, e.g. --mount-option=--max-fetches=64)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="serve HTTPS, as the real service does (a throwaway certificate)",
    )
    parser.add_argument(
        "--profile",
        action="append",
        choices=PROFILES,
        help="a server profile to run the matrix against (repeatable): emulator "
        "(today's, the default), tls-nagle-close (HTTPS, Nagle on, connections closed "
        "every 100 answers), queue5-tail (a listen queue of 5, 1 %% of calls 10x slower), "
        "slow-accept (HTTPS, Nagle on, 20 accepts a second)",
    )
    add_wire_options(parser)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    profiles = list(dict.fromkeys(args.profile or ["emulator"]))
    wire = wire_options(args)
    for name in profiles:
        check_close_silently(parser, [*PROFILES[name][1], *wire])
    bench_credentials()
    latencies = [int(x) for x in args.latencies.split(",")]
    disks = {"dense": (args.dense_mib, 1.0), "sparse": (args.sparse_mib, args.written)}
    chosen = args.disks.split(",")
    cells: list[Cell] = []
    warm: dict[str, list[float]] = {"ebsfs_warm": [], "zerofs": [], "zerofs_distinct": []}
    sizes: dict[str, int] = {}
    server = f", every emulator with {' '.join(wire)}" if wire else ""
    print(
        f"cold reads through a fresh mount (ebsfs mount {' '.join(args.mount_option)}), "
        f"{args.rounds} rounds per cell{' over HTTPS' if args.tls else ''}{server}:",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        mnt, zero_mnt = tmp / "mnt", tmp / "zero"
        mnt.mkdir()
        zero_mnt.mkdir()
        tls: list[str] = []
        if args.tls or any(PROFILES[name][0] for name in profiles):
            cert, key = make_certificate(tmp)
            tls = ["--tls-cert", str(cert), "--tls-key", str(key)]
            os.environ["AWS_CA_BUNDLE"] = str(cert)  # every client here trusts it
        for disk in chosen:
            mib, written = disks[disk]
            sizes[disk] = mib * MIB
            random_image(tmp / f"{disk}.img", mib * MIB, seed=5, written=written)
        for name, disk in ((name, disk) for name in profiles for disk in chosen):
            mib = disks[disk][0]
            image = tmp / f"{disk}.img"
            profile_tls, profile_options = PROFILES[name]
            served_tls = tls if args.tls or profile_tls else []
            proc, url = start_emulator(image, *served_tls, *profile_options, *wire)
            try:
                # One untimed cold read first: the emulator serves from an mmap of the
                # image (a first pass reads it from disk), and memory the VM has not
                # used yet costs more to touch the first time.
                emulator_control(url, "faults", {"latency": 0.02, "jitter": 0.01})
                ebsfs("mount", "--endpoint-url", url, SNAP, str(mnt))
                try:
                    cold_dd(mnt / f"{SNAP}.img", mib)
                finally:
                    ebsfs("umount", str(mnt))
                for latency in latencies:
                    cell = Cell(name, disk, latency)
                    run_cell(cell, url, mnt, mib, mib * MIB, args, tmp)
                    cells.append(cell)
                if disk == "dense" and args.warm_repeat and name == profiles[0]:
                    warm = warm_and_zero(url, mnt, zero_mnt, mib, args.warm_repeat)
            finally:
                proc.terminate()
                proc.wait()
    figures = summary(cells, warm, sizes, args)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
