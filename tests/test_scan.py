"""`ebsfs scan` (issue 31): fleet scanning on Dask.

Disks: three GPT snapshots of one volume, each an ext4 partition built with mkfs.ext4
-d (no root, no loop device: tests/disks.py's builder): a library and a config added
(1), the config changed and a file added (2), the config deleted (3). Served by the
emulator, which also answers EC2's DescribeSnapshots for them (--volume, --all).

Unit tier: placement, resume and the torn tail of --out, the file selection. Cluster
tier: a local cluster (two worker processes) and a separate `dask scheduler` with two
`dask worker` processes, against the emulator in this process."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from ebsfs.cli import main as cli
from ebsfs.emulator import EmulatorServer
from ebsfs.fleet.cluster import chains, place
from ebsfs.fleet.output import ScanOutput
from ebsfs.fleet.records import Selection
from ebsfs.fleet.tasks import Job
from tests.disks import _run, build_ext4, copy_range, gpt_disk
from tests.mounting import needs_fuse
from tests.test_cli import assert_one_line_error
from tests.test_metadata import moto_ec2  # noqa: F401 (a fixture)

MiB = 1024 * 1024
VOL = "vol-0f1ee7"
S1, S2, S3 = "snap-0f1ee701", "snap-0f1ee702", "snap-0f1ee703"
T0 = 1_780_000_000.0
PART_OFFSET, PART_SIZE, DISK_SIZE = 1 * MiB, 24 * MiB, 26 * MiB
LIB = bytes(range(256)) * (3 * 2048 + 7)  # 1.5 MiB + 1792 bytes: several blocks
V1, V2 = b"listen 80\n", b"listen 8080\nworkers 4\n"
BASE = {
    "etc/hostname": b"web-1\n",
    "usr/lib/x86_64-linux-gnu/liblzma.so.5.6.0": LIB,
    "opt/data/blob.bin": hashlib.sha256(b"blob").digest() * (MiB // 32),
    "srv/evil\n\x1b[31mred": b"a name that would drive a terminal\n",
    "srv/caf\udce9": b"a name that is not UTF-8\n",
}
EVIL = "/srv/evil\n\x1b[31mred"
VERSIONS = {
    S1: {**BASE, "etc/app.conf": V1},
    S2: {**BASE, "etc/app.conf": V2, "srv/late.txt": b"later\n"},
    S3: {**BASE, "srv/late.txt": b"later\n"},
}


def _disk(path: Path, files: dict[str, bytes], empty_partition: bool = False) -> None:
    """A GPT disk, partition 1 an ext4 holding `files`; with `empty_partition`, a
    second partition of zeros after it (as a swap or BIOS boot partition is to us)."""
    size = DISK_SIZE + (2 * MiB if empty_partition else 0)
    with open(path, "wb") as f:
        f.truncate(size)
    table = f"label: gpt\nstart={PART_OFFSET // 512}, size={PART_SIZE // 512}, type=linux\n"
    if empty_partition:
        table += f"start={(PART_OFFSET + PART_SIZE) // 512}, size={MiB // 512}, type=linux\n"
    _run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(path)], input=table)
    fs = path.with_suffix(".fs")
    # No ctime pass: its command file cannot name the hostile names below.
    uuid = "5ca90000-0000-4000-8000-000000000001"
    build_ext4(fs, PART_SIZE, files, "scan", uuid, reset_ctimes=False)
    copy_range(fs, 0, PART_SIZE, path, PART_OFFSET)
    fs.unlink()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    directory = tmp_path_factory.mktemp("scan")
    made = {}
    for snapshot_id, files in VERSIONS.items():
        made[snapshot_id] = directory / f"{snapshot_id}.img"
        _disk(made[snapshot_id], files)
    yield made
    shutil.rmtree(directory, ignore_errors=True)


def load(emulator: EmulatorServer, images: dict[str, Path], garbage: str | None = None) -> None:
    parent = None
    for n, (snapshot_id, image) in enumerate(images.items()):
        emulator.store.add_image(snapshot_id, image, parent=parent, volume_id=VOL)
        emulator.store.get(snapshot_id).start_time = T0 + n * 86400
        parent = snapshot_id
    if garbage is not None:
        emulator.store.add_image(garbage, _garbage(images[S1]), volume_id="vol-0bad")


def _garbage(image: Path) -> Path:
    """The first disk with its partition's first 64 KiB zeroed: a GPT partition
    holding nothing a filesystem library recognises."""
    damaged = image.with_name("garbage.img")
    shutil.copyfile(image, damaged)
    with open(damaged, "r+b") as f:
        f.seek(PART_OFFSET)
        f.write(b"\xa5" * 65536)
    return damaged


def expected_files(snapshot_id: str) -> dict[str, int]:
    return {"/" + name: len(data) for name, data in VERSIONS[snapshot_id].items()}


def scan(url: str, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`ebsfs scan` in a process of its own (Dask's cluster and its logging stay out
    of pytest's process)."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "ebsfs.cli.main",
            "scan",
            "--endpoint-url",
            url,
            "--ec2-endpoint-url",
            url,
            "--out",
            str(out),
            "--no-hedge",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=150,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )


def read_lines(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.read_text().splitlines()]


def files_of(lines: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Regular files by (snapshot, path as the filesystem has it: from path_b64)."""
    return {
        (x["snapshot_id"], base64.b64decode(x["path_b64"]).decode("utf-8", "surrogateescape")): x
        for x in lines
        if "path" in x and x.get("type") == "file"
    }


def gets(emulator: EmulatorServer) -> int:
    return emulator.counters.calls.get("GetSnapshotBlock", 0)


# -- unit tier ----------------------------------------------------------------------


def test_placement_keeps_a_volume_on_one_worker_in_time_order() -> None:
    jobs = [
        Job("snap-03", "vol-a", 3.0),
        Job("snap-01", "vol-a", 1.0),
        Job("snap-0b", "vol-b", 5.0),
        Job("snap-02", "vol-a", 2.0),
        Job("snap-0c", None, None),
    ]
    placed = place(jobs, ["tcp://w1", "tcp://w2"])
    assert len({placed[s] for s in ("snap-01", "snap-02", "snap-03")}) == 1
    assert placed["snap-0b"] != placed["snap-01"]  # dealt to the least loaded
    assert [[j.snapshot_id for j in c] for c in chains(jobs)] == [
        ["snap-01", "snap-02", "snap-03"],
        ["snap-0b"],
        ["snap-0c"],
    ]
    scattered = place([Job(f"snap-{k:02x}", "vol-a", k) for k in range(32)], ["a", "b"], False)
    assert set(scattered.values()) == {"a", "b"}


def test_selection_matches_names_anywhere_and_paths_whole() -> None:
    lib = "/usr/lib/x86_64-linux-gnu/liblzma.so.5.6.0"
    assert Selection(True, ["liblzma.so.5*"]).wants(lib)
    assert Selection(True, ["/usr/lib/*/liblzma*"]).wants(lib)
    assert not Selection(True, ["/lib/*/liblzma*"]).wants(lib)
    assert not Selection(False, ["liblzma.so.5*"]).wants(lib)
    assert Selection(True, []).wants("/etc/hostname")


def test_output_resumes_complete_snapshots_and_cuts_a_torn_tail(tmp_path: Path) -> None:
    out = tmp_path / "sweep.jsonl"
    first = ScanOutput(str(out))
    first.append(
        [{"snapshot_id": S1, "path": "/a"}, {"snapshot_id": S1, "summary": {"complete": True}}]
    )
    first.append(
        [{"snapshot_id": S2, "error": "x"}, {"snapshot_id": S2, "summary": {"complete": False}}]
    )
    first.close()
    whole = out.read_bytes()
    with open(out, "ab") as f:
        f.write(b'{"snapshot_id": "snap-0f1ee703", "path": "/b"}\n{"snapshot_id": "snap-0f1')
    again = ScanOutput(str(out))
    assert again.done == {S1}  # S2 could not be read: tried again
    assert out.read_bytes() == whole  # the torn block is gone
    again.append([{"snapshot_id": S2, "summary": {"complete": True}}])
    again.close()
    assert ScanOutput(str(out)).done == {S1, S2}


def test_all_takes_every_completed_snapshot_the_account_owns_from_ec2(
    moto_ec2: str,  # noqa: F811
) -> None:
    """--all and --volume through moto's EC2 (its DescribeSnapshots is faithful): the
    jobs carry each snapshot's volume and start time, for placement."""
    import boto3

    from ebsfs.cli.scan import find_jobs

    ec2 = boto3.client("ec2", endpoint_url=moto_ec2, region_name="us-east-1")
    volumes = [ec2.create_volume(Size=1, AvailabilityZone="us-east-1a")["VolumeId"] for _ in "ab"]
    made = {ec2.create_snapshot(VolumeId=v)["SnapshotId"]: v for v in (*volumes, volumes[0])}
    parser = cli.build_parser()
    base = ["scan", "--out", "x.jsonl", "--ec2-endpoint-url", moto_ec2]
    jobs = find_jobs(parser.parse_args([*base, "--all"]))
    assert {j.snapshot_id: j.volume_id for j in jobs} == made
    assert [j.start_time for j in jobs] == sorted(j.start_time for j in jobs)  # type: ignore[type-var]
    only = find_jobs(parser.parse_args([*base, "--volume", volumes[1]]))
    assert [j.volume_id for j in only] == [volumes[1]]
    both = find_jobs(parser.parse_args([*base, "--volume", *volumes]))
    assert sorted(j.snapshot_id for j in both) == sorted(made)


def test_all_with_a_custom_ebs_endpoint_needs_an_ec2_one(tmp_path: Path) -> None:
    result = scan_bare(["--endpoint-url", "http://127.0.0.1:9", "--all"], tmp_path)
    assert_one_line_error(result, "--ec2-endpoint-url")


def scan_bare(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ENDPOINT_URL")}
    return subprocess.run(
        [sys.executable, "-m", "ebsfs.cli.main", "scan", "--out", str(tmp_path / "o.jsonl"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )


# -- bad input ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,words",
    [
        (["snap-XYZ"], ["invalid snapshot id"]),
        (["snap-0dead"], ["snapshot not found", "snap-0dead"]),
        ([S1, "--max-rate", "0"], ["--max-rate"]),
        ([S1, "--max-rate", "lots"], ["--max-rate"]),
        ([S1, "--include", "*.so"], ["--hash"]),
        ([], ["one of them"]),
        ([S1, "--scheduler", "tcp://127.0.0.1:9"], ["cannot reach the Dask scheduler"]),
        ([S1, "--scheduler", "/nonexistent/scheduler.json"], ["neither a scheduler file"]),
    ],
)
def test_bad_input_is_one_line(
    tmp_path: Path, emulator: EmulatorServer, args: list[str], words: list[str]
) -> None:
    emulator.store.add_snapshot(S1, {0: b"\1" * 524288}, volume_id=VOL)
    result = scan(emulator.url, tmp_path / "out.jsonl", *args)
    assert_one_line_error(result, *words)


def test_without_dask_one_line_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed fails
    code = cli.main(["scan", S1, "--out", str(tmp_path / "out.jsonl")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert "pip install 'ebsfs[fleet]'" in err and "Traceback" not in err
    assert not (tmp_path / "out.jsonl").exists()


# -- cluster tier -------------------------------------------------------------------


def check_listing(lines: list[dict[str, Any]]) -> None:
    """Every regular file of the three snapshots with its exact size; the SHA-256 of
    the included library (and only of it)."""
    found = files_of(lines)
    for snapshot_id in (S1, S2, S3):
        mine = {p: x["size"] for (s, p), x in found.items() if s == snapshot_id}
        assert mine == expected_files(snapshot_id)
        lib = found[(snapshot_id, "/usr/lib/x86_64-linux-gnu/liblzma.so.5.6.0")]
        assert lib["sha256"] == hashlib.sha256(LIB).hexdigest()
        # mkfs.ext4 -d keeps the staging files' owner: the user running the tests
        assert lib["partition"] == 1 and lib["uid"] == os.getuid() and lib["mtime"].endswith("Z")
        assert "sha256" not in found[(snapshot_id, "/etc/hostname")]
        evil = found[(snapshot_id, EVIL)]["path"]  # quoted as git quotes it: no raw controls
        assert evil == '"/srv/evil\\n\\033[31mred"'
        assert found[(snapshot_id, "/srv/caf\udce9")]["path"] == '"/srv/caf\\351"'
    summaries = {x["snapshot_id"]: x["summary"] for x in lines if "summary" in x}
    assert set(summaries) == {S1, S2, S3}
    assert all(s["complete"] and s["errors"] == 0 for s in summaries.values())
    assert summaries[S1]["files"] == len(VERSIONS[S1])


def test_local_cluster_scan_lists_every_file_then_a_rerun_skips_everything(
    images: dict[str, Path], emulator: EmulatorServer, tmp_path: Path
) -> None:
    load(emulator, images)
    out = tmp_path / "sweep.jsonl"
    result = scan(
        emulator.url,
        out,
        "--volume",
        VOL,
        "--hash",
        "--include",
        "liblzma.so.5*",
        "--workers",
        "2",
    )
    assert result.returncode == 0, result.stderr
    assert "distributed" not in result.stderr and "Traceback" not in result.stderr
    text = out.read_text()
    assert "\x1b" not in text and text.isascii()
    lines = read_lines(out)
    check_listing(lines)
    fetched = {x["snapshot_id"]: x["summary"]["block_calls"] for x in lines if "summary" in x}
    assert sum(fetched.values()) == gets(emulator) > 0  # the summaries count what it saw
    # One worker, oldest first: the later snapshots' unchanged blocks come from its disk
    # cache (lineage), so they fetch fewer blocks than the first.
    assert fetched[S2] < fetched[S1] and fetched[S3] < fetched[S1], fetched
    # Not hashed: 1 MiB of blob.bin, about 2 blocks per snapshot, never fetched.
    written = len(emulator.store.get(S1).indexes)
    assert gets(emulator) < 3 * written

    emulator.counters.reset()
    again = scan(emulator.url, out, "--volume", VOL, "--hash", "--workers", "2")
    assert again.returncode == 0, again.stderr
    assert "3 of 3 snapshots complete" in again.stderr
    assert gets(emulator) == 0 and emulator.counters.calls.get("ListSnapshotBlocks", 0) == 0
    assert read_lines(out) == lines


def test_a_garbage_partition_is_reported_and_the_others_complete(
    images: dict[str, Path], emulator: EmulatorServer, tmp_path: Path
) -> None:
    bad = "snap-0bad0001"
    load(emulator, images, garbage=bad)
    out = tmp_path / "sweep.jsonl"
    result = scan(emulator.url, out, S1, bad, S3, "--workers", "2")
    assert result.returncode == 1
    assert "1 of 3 snapshots could not be read whole" in result.stderr
    lines = read_lines(out)
    errors = [x for x in lines if x["snapshot_id"] == bad and "error" in x]
    assert len(errors) == 1 and errors[0]["partition"] == 1
    summary = next(x["summary"] for x in lines if x["snapshot_id"] == bad and "summary" in x)
    assert summary["complete"] and summary["errors"] == 1 and summary["files"] == 0
    found = files_of(lines)
    assert {p for s, p in found if s == S3} == set(expected_files(S3))


def test_an_empty_partition_beside_a_filesystem_is_a_note_not_an_error(
    images: dict[str, Path], emulator: EmulatorServer, tmp_path: Path
) -> None:
    two = tmp_path / "two.img"
    _disk(two, VERSIONS[S1], empty_partition=True)
    emulator.store.add_image("snap-0e0e01", two, volume_id="vol-0e0e")
    out = tmp_path / "sweep.jsonl"
    result = scan(emulator.url, out, "snap-0e0e01", "--workers", "1")
    assert result.returncode == 0, result.stderr
    lines = read_lines(out)
    assert [(x["partition"], "recognises none" in x["note"]) for x in lines if "note" in x] == [
        (2, True)
    ]
    assert not [x for x in lines if "error" in x] and lines[-1]["summary"]["errors"] == 0
    assert len(files_of(lines)) == len(VERSIONS[S1])


@pytest.fixture
def dask_cluster(tmp_path: Path) -> Iterator[Path]:
    """A `dask scheduler` and two `dask worker` processes; all killed at the end,
    whatever happened."""
    dask = Path(sys.executable).with_name("dask")
    scheduler_file = tmp_path / "scheduler.json"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    procs = []
    try:
        procs.append(
            subprocess.Popen(
                [
                    str(dask),
                    "scheduler",
                    "--scheduler-file",
                    str(scheduler_file),
                    "--port",
                    "0",
                    "--no-dashboard",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        )
        deadline = time.monotonic() + 30
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert scheduler_file.exists(), "the scheduler did not start"
        for _ in range(2):
            procs.append(
                subprocess.Popen(
                    [
                        str(dask),
                        "worker",
                        "--scheduler-file",
                        str(scheduler_file),
                        "--nthreads",
                        "1",
                        "--no-dashboard",
                        "--local-directory",
                        str(tmp_path / "workers"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    env=env,
                    start_new_session=True,
                )
            )
        _wait_for_workers(scheduler_file, 2)
        yield scheduler_file
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _wait_for_workers(scheduler_file: Path, count: int) -> None:
    from distributed import Client

    with Client(scheduler_file=str(scheduler_file), timeout=30) as client:
        client.wait_for_workers(count, timeout=60)


def test_a_separate_scheduler_and_two_workers_give_the_same_lines(
    images: dict[str, Path], emulator: EmulatorServer, tmp_path: Path, dask_cluster: Path
) -> None:
    load(emulator, images)
    out = tmp_path / "sweep.jsonl"
    args = ("--volume", VOL, "--hash", "--include", "liblzma.so.5*")
    result = scan(emulator.url, out, *args, "--scheduler", str(dask_cluster))
    assert result.returncode == 0, result.stderr
    lines = read_lines(out)
    check_listing(lines)
    assert list((tmp_path / "workers").rglob("ebsfs-cache"))  # its workers did the work
    local = tmp_path / "local.jsonl"
    assert scan(emulator.url, local, *args, "--workers", "2").returncode == 0

    def comparable(rows: list[dict[str, Any]]) -> list[str]:
        return sorted(json.dumps(x, sort_keys=True) for x in rows if "summary" not in x)

    assert comparable(lines) == comparable(read_lines(local))


def test_the_cluster_wide_rate_limit_holds_at_the_service_with_four_workers(
    images: dict[str, Path], emulator: EmulatorServer, tmp_path: Path
) -> None:
    """Eight snapshots of eight volumes on four workers, every file hashed: about 80
    GetSnapshotBlock calls, which four workers would send within a second or two;
    with --max-rate 20 no second of the emulator's clock sees more than 20."""
    ids = [f"snap-0ade{k:04x}" for k in range(8)]
    for k, snapshot_id in enumerate(ids):
        emulator.store.add_image(snapshot_id, images[S2], volume_id=f"vol-0ade{k:04x}")
    emulator.faults.latency = 0.01
    out = tmp_path / "sweep.jsonl"
    result = scan(emulator.url, out, *ids, "--hash", "--workers", "4", "--max-rate", "20")
    assert result.returncode == 0, result.stderr
    per_second = emulator.counters.gets_per_second
    assert sum(per_second.values()) == gets(emulator) >= 8 * 8
    assert max(per_second.values()) <= 20, sorted(per_second.items())
    assert len(per_second) >= gets(emulator) // 20  # spread out, not refused
    assert {
        x["snapshot_id"] for x in read_lines(out) if x.get("summary", {}).get("complete")
    } == set(ids)


def test_a_scan_completes_while_tokens_are_renewed_by_every_listing(
    images: dict[str, Path], emulator: EmulatorServer, tmp_path: Path
) -> None:
    """The emulator renews a snapshot's tokens on every new listing. Two sweeps of the
    same snapshots run at once on two workers each (each sweep's worker lists a
    snapshot the other's is reading), and a third party lists every snapshot every
    50 ms, as someone's mount would: tokens are refused, listed again, and both sweeps
    complete with the right lines."""
    import boto3

    load(emulator, images)
    emulator.faults.renew_tokens = True
    emulator.faults.latency = 0.005
    ebs = boto3.client("ebs", endpoint_url=emulator.url, region_name="us-east-1")
    stop = threading.Event()

    def lister() -> None:
        while not stop.is_set():
            for snapshot_id in (S1, S2, S3):
                ebs.list_snapshot_blocks(SnapshotId=snapshot_id, MaxResults=100)
            stop.wait(0.05)

    churn = threading.Thread(target=lister)
    churn.start()
    try:
        args = ("--volume", VOL, "--hash", "--include", "liblzma.so.5*", "--workers", "2")
        with ThreadPoolExecutor(2) as pool:
            runs = list(
                pool.map(lambda n: scan(emulator.url, tmp_path / f"{n}.jsonl", *args), [1, 2])
            )
    finally:
        stop.set()
        churn.join()
    for run in runs:
        assert run.returncode == 0, run.stderr
    for n in (1, 2):
        check_listing(read_lines(tmp_path / f"{n}.jsonl"))
    assert emulator.counters.errors.get("ValidationException", 0) > 0  # tokens were refused


def test_a_snapshot_whose_tokens_never_hold_is_an_error_line_not_a_loop(
    images: dict[str, Path], emulator: EmulatorServer, tmp_path: Path
) -> None:
    """Tokens renewed faster than a call can use them (a listing every few ms): the
    engine lists again a bounded number of times, then the snapshot is an error line
    and the sweep ends."""
    import boto3

    load(emulator, images)
    emulator.faults.renew_tokens = True
    emulator.faults.latency = 0.02  # every GET is slower than the next listing
    ebs = boto3.client("ebs", endpoint_url=emulator.url, region_name="us-east-1")
    stop = threading.Event()

    def lister() -> None:
        while not stop.is_set():
            ebs.list_snapshot_blocks(SnapshotId=S1, MaxResults=100)

    churn = threading.Thread(target=lister)
    churn.start()
    try:
        started = time.monotonic()
        result = scan(emulator.url, tmp_path / "out.jsonl", S1, "--workers", "1")
    finally:
        stop.set()
        churn.join()
    # Alone it takes 5-6 s (root or not); once, late in a whole unprivileged run, 72 s:
    # the bound tells a bounded give-up from a loop, not a speed.
    assert result.returncode == 1 and time.monotonic() - started < 120
    lines = read_lines(tmp_path / "out.jsonl")
    assert "refused" in lines[0]["error"] and lines[-1]["summary"]["complete"] is False


@needs_fuse
@pytest.mark.mount
def test_ext4_xfs_and_ntfs_partitions_are_each_listed_and_hashed(
    emulator: EmulatorServer, tmp_path: Path
) -> None:
    """tests/disks.py's GPT disk (NTFS is filled through ntfs-3g: root): every file of
    each partition with its size and SHA-256."""
    disk = gpt_disk(tmp_path / "gpt.img")
    emulator.store.add_image("snap-0f5a11", disk.path, volume_id="vol-0f5a11")
    out = tmp_path / "sweep.jsonl"
    result = scan(emulator.url, out, "snap-0f5a11", "--hash", "--workers", "1")
    assert result.returncode == 0, result.stderr
    lines = [x for x in read_lines(out) if x.get("type") == "file"]
    for part in disk.partitions:
        mine = {x["path"]: x for x in lines if x["partition"] == part.number}
        assert {p: x["size"] for p, x in mine.items()} == {
            "/" + name: len(data) for name, data in part.files.items()
        }, part.fstype
        for name, data in part.files.items():
            assert mine["/" + name]["sha256"] == hashlib.sha256(data).hexdigest()


def test_progress_off_a_terminal_is_a_line_every_few_seconds_and_one_at_the_end(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a terminal (a log, cron, a CI job): no bar; a plain line once PLAIN_EVERY
    seconds have passed since the last one, none in between, and the totals at the end."""
    from ebsfs.cli import scan as face

    now = [1000.0]
    monkeypatch.setattr(face.time, "monotonic", lambda: now[0])
    tally = face.Tally(3)
    summary = {"complete": True, "files": 10, "blocks_fetched": 4, "calls": 5}
    tally.add({**summary, "estimated_cost_usd": 0.5})
    now[0] += face.PLAIN_EVERY / 2
    tally.show()
    assert capsys.readouterr().err == ""
    now[0] += face.PLAIN_EVERY / 2
    tally.show()
    tally.show()  # at once again: nothing more
    assert capsys.readouterr().err.splitlines() == [
        "ebsfs: scan: 1 of 3 snapshots, 10 files, 0.4 MB/s, 5 calls, $0.5000"
    ]
    tally.add({"complete": False, "files": 2})
    tally.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["ebsfs: scan: 2 of 3 snapshots, 12 files, 0.4 MB/s, 5 calls, $0.5000"]
    assert tally.failed == 1
