"""Real mounts through the `ebsfs` command against the emulator: byte-exact images,
loop mounts, sleuthkit, fetch accounting, several snapshots, token refresh."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ebsfs.constants import BLOCK_SIZE, GIB
from ebsfs.emulator import EmulatorServer
from ebsfs.emulator.diskimage import build_disk, demo_files, random_image
from tests.disks import loop_device
from tests.mounting import (
    drop_page_cache,
    force_unmount,
    fs_mounted,
    mounted,
    needs_fuse,
    replay_log,
)

pytestmark = [needs_fuse, pytest.mark.mount]
DEMO = "snap-0d0d0d0d0d0d0d0d0"


@pytest.fixture(scope="session")
def demo_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("disk") / "demo.img"
    build_disk(path, 64 * 1024 * 1024, demo_files())
    return path


@pytest.fixture(scope="session")
def random_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("disk") / "random.img"
    random_image(path, 40 * 1024 * 1024, seed=11, sparse_every=3)
    return path


def sha256_file(path: Path, chunk: int = 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def expected_sha256(source: Path, volume_size: int) -> str:
    digest = hashlib.sha256()
    with open(source, "rb") as f:
        data = f.read()
    digest.update(data)
    remaining = volume_size - len(data)
    zeros = bytes(1024 * 1024)
    while remaining > 0:
        digest.update(zeros[: min(remaining, len(zeros))])
        remaining -= len(zeros)
    return digest.hexdigest()


def test_image_is_byte_identical_with_short_pages(
    emulator: EmulatorServer, random_disk, tmp_path
) -> None:
    emulator.store.add_image("snap-0a1", random_disk)
    emulator.faults.short_pages = 1.0
    # --no-hedge: blocks are counted below; a hedge (a call slow on a loaded machine,
    # asked again) would count twice.
    with mounted(emulator.url, ["snap-0a1"], tmp_path / "mnt", "--no-hedge") as mnt:
        image = mnt / "snap-0a1.img"
        st = image.stat()
        assert st.st_size == GIB and st.st_mode & 0o777 == 0o444
        assert sha256_file(image) == expected_sha256(random_disk, GIB)
    written = len(emulator.store.get("snap-0a1").indexes)
    gets = emulator.counters.block_gets
    # Absent blocks are never fetched; the sequential read fetched no block twice.
    assert set(index for (_, index) in gets) == set(emulator.store.get("snap-0a1").indexes)
    assert sum(gets.values()) == written
    assert emulator.counters.calls["ListSnapshotBlocks"] > 2  # paged through short pages


def test_https_endpoint_image_is_byte_identical(
    https_emulator: EmulatorServer, random_disk, tmp_path
) -> None:
    """Over TLS, as every real user reads: lists through boto3, blocks through the
    direct GET path, both trusting the endpoint through AWS_CA_BUNDLE."""
    https_emulator.store.add_image("snap-0a5", random_disk)
    # --no-hedge: blocks are counted below; a hedge (a call slow on a loaded machine,
    # asked again) would count twice.
    with mounted(https_emulator.url, ["snap-0a5"], tmp_path / "mnt", "--no-hedge") as mnt:
        assert sha256_file(mnt / "snap-0a5.img") == expected_sha256(random_disk, GIB)
    assert sum(https_emulator.counters.block_gets.values()) == len(
        https_emulator.store.get("snap-0a5").indexes
    )


def test_loop_mounted_ext4_matches_every_file(
    emulator: EmulatorServer, demo_disk, tmp_path
) -> None:
    emulator.store.add_image(DEMO, demo_disk)
    files = demo_files()
    with (
        mounted(emulator.url, [DEMO], tmp_path / "mnt") as mnt,
        loop_device(mnt / f"{DEMO}.img", 1024 * 1024) as device,
        fs_mounted(device, tmp_path / "fs") as fs,
    ):
        for name, data in files.items():
            assert (fs / name).read_bytes() == data, name
        found = {str(p.relative_to(fs)) for p in fs.rglob("*") if p.is_file()}
        assert found == set(files)
        with pytest.raises(OSError) as err:
            (fs / "new.txt").write_text("x")
        assert err.value.errno == errno.EROFS


def test_sleuthkit_reads_the_image_directly(emulator: EmulatorServer, demo_disk, tmp_path) -> None:
    emulator.store.add_image(DEMO, demo_disk)
    with mounted(emulator.url, [DEMO], tmp_path / "mnt") as mnt:
        image = str(mnt / f"{DEMO}.img")
        mmls = subprocess.run(["mmls", image], capture_output=True, text=True, check=True)
        assert "GUID Partition Table" in mmls.stdout
        assert "0000002048" in mmls.stdout and "demo" in mmls.stdout
        fls = subprocess.run(
            ["fls", "-r", "-p", "-o", "2048", image], capture_output=True, text=True, check=True
        )
        line = next(x for x in fls.stdout.splitlines() if x.endswith("var/log/auth.log"))
        inode = line.split()[1].rstrip(":")
        icat = subprocess.run(["icat", "-o", "2048", image, inode], capture_output=True, check=True)
        assert icat.stdout == demo_files()["var/log/auth.log"]


def test_writes_through_the_mount_are_refused(emulator: EmulatorServer, tmp_path) -> None:
    emulator.store.add_snapshot("snap-0b1", {}, volume_size_gib=1)
    with mounted(emulator.url, ["snap-0b1"], tmp_path / "mnt") as mnt:
        for flags in (os.O_WRONLY, os.O_RDWR):
            with pytest.raises(OSError) as err:
                os.open(mnt / "snap-0b1.img", flags)
            assert err.value.errno in (errno.EROFS, errno.EACCES)
        with pytest.raises(OSError):
            (mnt / "other").write_text("x")
        assert os.listdir(mnt) == ["snap-0b1.img"]
        with pytest.raises(FileNotFoundError):
            (mnt / "snap-0b2.img").stat()


def test_two_snapshots_mounted_together(
    emulator: EmulatorServer, demo_disk, random_disk, tmp_path
) -> None:
    emulator.store.add_image(DEMO, demo_disk)
    emulator.store.add_image("snap-0a1", random_disk, volume_size_gib=2)
    with mounted(emulator.url, [DEMO, "snap-0a1"], tmp_path / "mnt") as mnt:
        assert sorted(os.listdir(mnt)) == sorted(
            [f"{DEMO}.img", f"{DEMO}-part1.img", "snap-0a1.img"]
        )
        assert (mnt / "snap-0a1.img").stat().st_size == 2 * GIB
        with open(mnt / f"{DEMO}.img", "rb") as f:
            assert f.read(64 * 1024 * 1024) == demo_disk.read_bytes()
        with open(mnt / "snap-0a1.img", "rb") as f:
            assert f.read(40 * 1024 * 1024) == random_disk.read_bytes()


def test_expired_tokens_are_refreshed(emulator: EmulatorServer, random_disk, tmp_path) -> None:
    emulator.store.add_image("snap-0a1", random_disk)
    emulator.faults.token_lifetime = 3
    source = random_disk.read_bytes()
    with mounted(emulator.url, ["snap-0a1"], tmp_path / "mnt", "--cache-size", "1M") as mnt:
        with open(mnt / "snap-0a1.img", "rb") as f:
            assert f.read(4 * BLOCK_SIZE) == source[: 4 * BLOCK_SIZE]
            lists = emulator.counters.calls["ListSnapshotBlocks"]
            time.sleep(3.5)
            f.seek(30 * BLOCK_SIZE)
            assert f.read(4 * BLOCK_SIZE) == source[30 * BLOCK_SIZE : 34 * BLOCK_SIZE]
        assert emulator.counters.calls["ListSnapshotBlocks"] > lists
    drop_page_cache()


def test_sequential_read_with_large_cache_fetches_each_block_once(
    emulator: EmulatorServer, random_disk, tmp_path
) -> None:
    emulator.store.add_image("snap-0a1", random_disk)
    # --no-hedge: blocks are counted below; a hedge (a call slow on a loaded machine,
    # asked again) would count twice.
    options = ["--cache-size", "256M", "--no-hedge"]
    with mounted(emulator.url, ["snap-0a1"], tmp_path / "mnt", *options) as mnt:
        image = mnt / "snap-0a1.img"
        first = sha256_file(image)
        drop_page_cache()
        assert sha256_file(image) == first  # served from the ebsfs cache
    assert max(emulator.counters.block_gets.values()) == 1


def test_random_4k_reads_fetch_at_most_twice_the_blocks_touched(
    emulator: EmulatorServer, tmp_path
) -> None:
    """Through the kernel (its read-ahead included): random readers do not pay for
    prefetches they never use."""
    import random

    block = bytes(range(256)) * (BLOCK_SIZE // 256)
    emulator.store.add_snapshot("snap-0a2", {i: block for i in range(4096)}, volume_size_gib=2)
    rng = random.Random(9)
    offsets = [rng.randrange(0, 2 * GIB - 4096) & ~4095 for _ in range(300)]
    with mounted(emulator.url, ["snap-0a2"], tmp_path / "mnt") as mnt:
        fd = os.open(mnt / "snap-0a2.img", os.O_RDONLY)
        try:
            for off in offsets:
                assert os.pread(fd, 4096, off) == block[off % BLOCK_SIZE : off % BLOCK_SIZE + 4096]
        finally:
            os.close(fd)
    touched = {off // BLOCK_SIZE for off in offsets}
    fetched = sum(emulator.counters.block_gets.values())
    assert fetched <= 2 * len(touched), (fetched, len(touched))


FINALIZE_PROBE = """\
import atexit, sys
marker = sys.argv.pop(1)
atexit.register(lambda: open(marker, "w").close())
print("written before the command", end="")  # a pipe: still in the buffer
from ebsfs.cli.main import run
run()
"""


@pytest.mark.parametrize("goes_to_background", [True, False])
def test_a_background_mounts_parent_ends_at_once_and_loses_no_output(
    emulator: EmulatorServer, tmp_path: Path, goes_to_background: bool
) -> None:
    """`ebsfs mount`'s parent ends with os._exit once its child serves (cli/main.run):
    no atexit handler of its runs, yet nothing it wrote is lost. A command that did
    not go to the background ends as any Python program does."""
    emulator.store.add_snapshot("snap-0e1", {0: b"e" * BLOCK_SIZE}, volume_size_gib=1)
    finalized = tmp_path / "finalized"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if not goes_to_background:
        (mnt / "in the way").write_text("x")  # refused: not empty
    log_file = tmp_path / "mount.log"
    argv = ["mount", "--endpoint-url", emulator.url, "--log-file", str(log_file)]
    try:
        done = subprocess.run(
            [sys.executable, "-c", FINALIZE_PROBE, str(finalized), *argv, "snap-0e1", str(mnt)],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert done.stdout == "written before the command"
        if goes_to_background:
            assert done.returncode == 0, done.stderr
            assert done.stderr.startswith("ebsfs: mounted 1 snapshot at "), done.stderr
            assert done.stderr.endswith(f"; log: {log_file}\n")
            assert not finalized.exists()
            with open(mnt / "snap-0e1.img", "rb") as image:
                assert image.read(4) == b"eeee"
        else:
            assert done.returncode == 1
            assert "is not empty" in done.stderr
            assert finalized.exists()
    finally:
        force_unmount(mnt)
        replay_log(log_file)
