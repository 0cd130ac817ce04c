"""Fault injection against real mounts: never a wrong byte, never a hang, bounded memory."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import trio

from ebsfs.constants import BLOCK_SIZE
from ebsfs.emulator import EmulatorServer
from ebsfs.emulator.diskimage import random_image
from ebsfs.engine.remote import AdaptiveLimit
from tests.mounting import drop_page_cache, mounted, needs_fuse, serving_pid

SNAP = "snap-0f1"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("faults") / "source.img"
    random_image(path, 48 * 1024 * 1024, seed=21, sparse_every=5)
    return path


def test_adaptive_limit_halves_on_throttling_and_recovers() -> None:
    async def run() -> list[int]:
        limiter = trio.CapacityLimiter(64)
        limit = AdaptiveLimit(limiter, 64, recover_after=2)
        seen = []
        limit.throttled()
        seen.append(int(limiter.total_tokens))
        limit.throttled()  # within a second: one cut per burst
        seen.append(int(limiter.total_tokens))
        for _ in range(10):
            limit.succeeded()
        seen.append(int(limiter.total_tokens))
        return seen

    assert trio.run(run) == [32, 32, 37]


def read_all(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while size:
            chunk = f.read(min(size, 1024 * 1024))  # an EIO would raise here
            assert chunk, "short read"
            digest.update(chunk)
            size -= len(chunk)
    return digest.hexdigest()


@needs_fuse
@pytest.mark.mount
def test_full_reads_are_exact_under_combined_faults(
    emulator: EmulatorServer, source, tmp_path
) -> None:
    """5% errors, 3% corrupt bodies, throttling, tokens living 3 seconds, short pages:
    three full reads (a 4 MiB cache, so each pass fetches again) match the source."""
    emulator.store.add_image(SNAP, source)
    faults = emulator.faults
    faults.error_rate, faults.corrupt_rate = 0.05, 0.03
    faults.get_rate, faults.list_rate = 25, 20
    faults.token_lifetime, faults.short_pages = 3, 0.5
    faults.latency, faults.jitter = 0.005, 0.01
    expected = hashlib.sha256(source.read_bytes()).hexdigest()
    size = source.stat().st_size
    lists_in_first_pass = 0
    with mounted(emulator.url, [SNAP], tmp_path / "mnt", "--cache-size", "4M") as mnt:
        started = time.monotonic()
        for n in range(3):
            assert read_all(mnt / f"{SNAP}.img", size) == expected
            drop_page_cache()
            if n == 0:
                lists_in_first_pass = emulator.counters.calls["ListSnapshotBlocks"]
        seconds = time.monotonic() - started
    errors = emulator.counters.errors
    assert errors["InternalServerException"] > 0 and errors["Corrupted"] > 0, errors
    assert errors["RequestThrottledException"] > 0, errors
    # The tokens listed first expired during the run: the index listed again, ahead of
    # expiry (its margin) or after a refused token (ValidationException), by timing.
    assert seconds > faults.token_lifetime
    relisted = emulator.counters.calls["ListSnapshotBlocks"] > lists_in_first_pass
    assert relisted or errors["ValidationException"] > 0, (errors, emulator.counters.calls)


@needs_fuse
@pytest.mark.mount
def test_bodies_cut_short_are_fetched_again(emulator: EmulatorServer, source, tmp_path) -> None:
    emulator.store.add_image(SNAP, source)
    emulator.faults.truncate_rate = 0.2
    with mounted(emulator.url, [SNAP], tmp_path / "mnt") as mnt:
        expected = hashlib.sha256(source.read_bytes()).hexdigest()
        assert read_all(mnt / f"{SNAP}.img", source.stat().st_size) == expected
    assert emulator.counters.errors["Truncated"] > 0


@needs_fuse
@pytest.mark.mount
@pytest.mark.expected_log(r"read of snap-0f1.img failed: snap-0f1: read at 524288")
def test_persistent_failure_is_eio_within_the_read_timeout(
    emulator: EmulatorServer, source, tmp_path
) -> None:
    emulator.store.add_image(SNAP, source)
    with mounted(emulator.url, [SNAP], tmp_path / "mnt", "--read-timeout", "3") as mnt:
        emulator.faults.error_rate = 1.0
        started = time.monotonic()
        with open(mnt / f"{SNAP}.img", "rb") as f, pytest.raises(OSError) as err:
            f.seek(BLOCK_SIZE)
            f.read(4096)
        assert err.value.errno == 5  # EIO
        assert time.monotonic() - started < 15
        emulator.faults.error_rate = 0.0
        with open(mnt / f"{SNAP}.img", "rb") as f:  # the mount is still fine
            f.seek(BLOCK_SIZE)
            assert f.read(4096) == source.read_bytes()[BLOCK_SIZE : BLOCK_SIZE + 4096]


def _reader(path: str, offsets: list[int], size: int) -> list[str]:
    out = []
    with open(path, "rb") as f:
        for off in offsets:
            f.seek(off)
            out.append(hashlib.sha256(f.read(size)).hexdigest())
    return out


@needs_fuse
@pytest.mark.mount
def test_concurrent_readers_small_cache_exact_bytes_and_bounded_memory(
    emulator: EmulatorServer, source, tmp_path
) -> None:
    emulator.store.add_image(SNAP, source)
    emulator.faults.latency = 0.002
    data = source.read_bytes()
    cache_mib = 8
    with mounted(emulator.url, [SNAP], tmp_path / "mnt", "--cache-size", f"{cache_mib}M") as mnt:
        path = str(mnt / f"{SNAP}.img")
        pid = serving_pid(mnt)
        jobs = []
        rng = random.Random(3)
        for n in range(8):
            if n % 2:
                offsets = [rng.randrange(0, len(data) - 65536) for _ in range(150)]
                size = rng.choice([4096, 65536])
            else:
                offsets = list(range(n * BLOCK_SIZE, len(data) - 1024 * 1024, 1024 * 1024))
                size = 1024 * 1024
            jobs.append((offsets, size))
        with (
            concurrent.futures.ProcessPoolExecutor(4) as procs,
            concurrent.futures.ThreadPoolExecutor(4) as threads,
        ):
            futures = [
                (procs if n < 4 else threads).submit(_reader, path, offsets, size)
                for n, (offsets, size) in enumerate(jobs)
            ]
            for (offsets, size), future in zip(jobs, futures, strict=True):
                want = [hashlib.sha256(data[o : o + size]).hexdigest() for o in offsets]
                assert future.result(timeout=240) == want
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f)
        peak_mib = int(status["VmHWM"].split()[0]) / 1024
        print(f"mount process peak RSS: {peak_mib:.0f} MiB with an {cache_mib} MiB cache")
    # The interpreter with boto3, trio and pyfuse3 loaded is about 60-80 MiB; allow the
    # cache, 64 in-flight blocks (32 MiB) and slack, but not the 48 MiB image.
    assert peak_mib < 80 + cache_mib + 32 + 30, f"peak RSS {peak_mib:.0f} MiB"


@needs_fuse
@pytest.mark.mount
def test_reader_killed_mid_read(emulator: EmulatorServer, source, tmp_path) -> None:
    emulator.store.add_image(SNAP, source)
    emulator.faults.latency = 0.05
    with mounted(emulator.url, [SNAP], tmp_path / "mnt") as mnt:
        image = mnt / f"{SNAP}.img"
        reader = subprocess.Popen(
            ["dd", f"if={image}", "of=/dev/null", "bs=1M"], stderr=subprocess.DEVNULL
        )
        time.sleep(0.5)
        reader.send_signal(signal.SIGKILL)
        reader.wait(timeout=30)
        drop_page_cache()
        emulator.faults.latency = 0.0
        with open(image, "rb") as f:
            f.seek(20 * BLOCK_SIZE)
            assert f.read(BLOCK_SIZE) == source.read_bytes()[20 * BLOCK_SIZE : 21 * BLOCK_SIZE]
        assert os.path.ismount(mnt)


@needs_fuse
@pytest.mark.mount
def test_logs_never_show_tokens_or_credentials(
    emulator: EmulatorServer, source, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sekritsekritsekrit")
    emulator.faults.secret_keys["AKIDTEST"] = "sekritsekritsekrit"
    emulator.store.add_image(SNAP, source)
    emulator.faults.error_rate, emulator.faults.truncate_rate = 0.2, 0.1
    emulator.faults.token_lifetime = 2
    log_file = tmp_path / "ebsfs.log"
    with mounted(
        emulator.url,
        [SNAP],
        tmp_path / "mnt",
        "-vv",
        "--log-file",
        str(log_file),
        "--cache-size",
        "2M",
    ) as mnt:
        read_all(mnt / f"{SNAP}.img", source.stat().st_size)
        time.sleep(2.5)
        drop_page_cache()
        read_all(mnt / f"{SNAP}.img", 8 * BLOCK_SIZE)
    text = log_file.read_text()
    assert "retrying" in text and "listing again" in text  # the log did see the faults
    assert "blockToken" not in text and "sekrit" not in text
    assert "pageToken" not in text and "Signature=" not in text


@needs_fuse
@pytest.mark.mount
@pytest.mark.parametrize("allow_other", [False, True])
def test_other_users_see_the_mount_only_with_allow_other(
    emulator: EmulatorServer, tmp_path, allow_other
) -> None:
    emulator.store.add_snapshot(SNAP, {}, volume_size_gib=1)
    base = Path(tempfile.mkdtemp(prefix="ebsfs-other-"))  # pytest's tmp is private to root
    base.chmod(0o755)
    options = ["--allow-other"] if allow_other else []
    with mounted(emulator.url, [SNAP], base / "mnt", *options) as mnt:
        result = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "ls", str(mnt)],
            capture_output=True,
            text=True,
        )
        if allow_other:
            assert result.returncode == 0 and f"{SNAP}.img" in result.stdout, result.stderr
        else:
            assert result.returncode != 0 and "Permission denied" in result.stderr
    shutil.rmtree(base)


@needs_fuse
@pytest.mark.mount
def test_stalled_bodies_are_abandoned_and_fetched_again(
    emulator: EmulatorServer, source, tmp_path
) -> None:
    emulator.store.add_image(SNAP, source)
    emulator.faults.stall_rate, emulator.faults.stall_seconds = 0.2, 30
    with mounted(emulator.url, [SNAP], tmp_path / "mnt", "--request-timeout", "1") as mnt:
        started = time.monotonic()
        expected = hashlib.sha256(source.read_bytes()).hexdigest()
        assert read_all(mnt / f"{SNAP}.img", source.stat().st_size) == expected
        assert time.monotonic() - started < 25  # never waited out a 30 s stall
    assert emulator.counters.errors["Stalled"] > 0
