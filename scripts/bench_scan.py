#!/usr/bin/env python3
"""`ebsfs scan` (issue 31): a local Dask cluster against one process scanning the same
snapshots in turn, and lineage placement against random placement.

The snapshots: VOLUMES volumes of SNAPSHOTS/VOLUMES snapshots each, every one a GPT disk
with an ext4 partition (mkfs.ext4 -d, no root) holding a few hundred small files and
some large ones; each later snapshot of a volume changes a tenth of the small files
and adds one large file. Served by the emulator in this process at the given latency,
one lineage per volume. Every file is hashed (`--hash`), so the snapshots' data is
read, not only their metadata.

Per round, each way is timed from the first task submitted to the last line back
(cluster start-up excluded, and said): wall seconds, GetSnapshotBlock calls (counted
by the emulator) and calls per second; median and slowest over rounds. Then blocks
fetched with lineage placement (a volume's snapshots on one worker, oldest first,
its disk cache serving unchanged blocks) against random placement (each worker has a
disk cache of its own in both).

    .venv/bin/python scripts/bench_scan.py [--snapshots 8] [--latency 100] [--rounds 3]
    .venv/bin/python scripts/bench_scan.py --snapshots 2 --rounds 1 --latency 0   # smoke
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from ebsfs.emulator import EmulatorServer, Faults, SnapshotStore  # noqa: E402
from ebsfs.emulator.diskimage import build_disk  # noqa: E402
from ebsfs.fleet.records import Selection, scan_snapshot  # noqa: E402
from ebsfs.fleet.tasks import Job, Settings  # noqa: E402

MiB = 1024 * 1024
DISK_SIZE = 96 * MiB


def volume_files(volume: int, version: int) -> dict[str, bytes]:
    """A volume's files at one snapshot: 300 small files (a tenth rewritten per
    version) and 4 + version large ones (one added per version)."""
    files = {}
    for k in range(300):
        stamp = version if k % 10 == version % 10 and version else 0
        files[f"etc/d{k // 30}/f{k}.conf"] = b"v%d k%d s%d\n" % (volume, k, stamp) * 20
    for k in range(4 + version):
        seed = hashlib.sha256(b"%d-%d" % (volume, k)).digest()
        files[f"opt/big/{k}.bin"] = seed * (3 * MiB // 32)
    return files


def make_snapshots(directory: Path, count: int, volumes: int) -> list[Job]:
    jobs = []
    for n in range(count):
        volume, version = n % volumes, n // volumes
        path = directory / f"{n}.img"
        build_disk(path, DISK_SIZE, volume_files(volume, version), label=f"v{volume}")
        jobs.append(Job(f"snap-0be{n:04x}", f"vol-0be{volume:04x}", 1_780_000_000.0 + n))
    return jobs


def serve(store: SnapshotStore, directory: Path, jobs: list[Job]) -> None:
    parents: dict[str | None, str] = {}
    for n, job in enumerate(jobs):
        store.add_image(
            job.snapshot_id,
            directory / f"{n}.img",
            parent=parents.get(job.volume_id),
            volume_id=job.volume_id,
        )
        store.get(job.snapshot_id).start_time = job.start_time or 0.0
        parents[job.volume_id] = job.snapshot_id


def calls(emulator: EmulatorServer) -> int:
    return int(emulator.counters.calls.get("GetSnapshotBlock", 0))


def in_turn(settings: Settings, jobs: list[Job], cache: Path) -> tuple[float, int]:
    """One process, one snapshot after another, with one disk cache (so lineage
    saves as much as on the cluster): seconds, blocks fetched."""
    started = time.monotonic()
    fetched = 0
    for job in sorted(jobs, key=lambda j: (j.volume_id or "", j.start_time or 0.0)):
        config = settings.engine_config(str(cache))
        result = scan_snapshot(config, job.snapshot_id, settings.selection)
        assert result.complete, result.lines[-2:]
        fetched += result.summary["block_calls"]
    return time.monotonic() - started, fetched


def on_cluster(
    settings: Settings, jobs: list[Job], workers: int, lineage: bool
) -> tuple[float, int, float]:
    """A fresh local cluster (so no worker's disk cache holds a block yet): seconds
    of the sweep, blocks fetched, seconds to start the cluster."""
    from ebsfs.fleet.cluster import Sweep, cluster_client

    begun = time.monotonic()
    with cluster_client(workers, None) as client:
        up = time.monotonic() - begun
        started = time.monotonic()
        running = Sweep(client, settings, jobs, max_rate=None, lineage=lineage)
        results: list[list[dict[str, Any]]] = []
        while running.pending:
            results.extend(running.results(timeout=1.0))
        seconds = time.monotonic() - started
    fetched = 0
    for lines in results:
        summary = lines[-1]["summary"]
        assert summary["complete"], lines[-2:]
        fetched += summary["block_calls"]
    return seconds, fetched, up


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):7.2f} {max(values):7.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshots", type=int, default=8)
    parser.add_argument("--volumes", type=int, default=2)
    parser.add_argument("--latency", type=float, default=100.0, help="ms per call")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1"
    )
    volumes = max(1, min(args.volumes, args.snapshots))
    store = SnapshotStore(Faults(latency=args.latency / 1000, list_rate=0, get_rate=0))
    with tempfile.TemporaryDirectory() as tmp, EmulatorServer(store) as emulator:
        directory = Path(tmp)
        jobs = make_snapshots(directory, args.snapshots, volumes)
        serve(store, directory, jobs)
        settings = Settings(selection=Selection(hash_data=True), endpoint_url=emulator.url)
        print(
            f"{len(jobs)} snapshots of {volumes} volumes, {args.latency:g} ms a call, "
            f"every file hashed; {args.workers} workers; {args.rounds} rounds"
        )
        times: dict[str, list[float]] = {"in turn": [], "cluster": []}
        rates: dict[str, list[float]] = {"in turn": [], "cluster": []}
        fetched: dict[str, list[int]] = {"in turn": [], "lineage": [], "random": []}
        start_up: list[float] = []
        for round_no in range(args.rounds):
            before = calls(emulator)
            seconds, blocks = in_turn(settings, jobs, directory / f"cache-{round_no}")
            times["in turn"].append(seconds)
            rates["in turn"].append((calls(emulator) - before) / seconds)
            fetched["in turn"].append(blocks)
            before = calls(emulator)
            seconds, blocks, up = on_cluster(settings, jobs, args.workers, lineage=True)
            times["cluster"].append(seconds)
            rates["cluster"].append((calls(emulator) - before) / seconds)
            fetched["lineage"].append(blocks)
            start_up.append(up)
            _, blocks, _ = on_cluster(settings, jobs, args.workers, lineage=False)
            fetched["random"].append(blocks)
        print(f"{'':10} {'wall s (median, slowest)':>26} {'calls/s (median, slowest)':>28}")
        for way in ("in turn", "cluster"):
            print(
                f"{way:10} {spread(times[way]):>26} "
                f"{statistics.median(rates[way]):13.0f} {min(rates[way]):7.0f}"
            )
        speedup = statistics.median(times["in turn"]) / statistics.median(times["cluster"])
        print(
            f"cluster / in turn: {speedup:.2f}x faster (cluster start-up "
            f"{statistics.median(start_up):.1f} s, not counted)"
        )
        print(
            "blocks fetched (median): "
            + ", ".join(f"{way} {statistics.median(v):.0f}" for way, v in fetched.items())
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
