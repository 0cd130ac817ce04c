"""The Python face, `ebsfs.open`, against the emulator over HTTP: exact bytes at random
offsets, file-object semantics, threads, errors, partitions, a forensic library reading
through it, and an unprivileged process that never imports pyfuse3."""

from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

import ebsfs
from ebsfs.constants import BLOCK_SIZE
from ebsfs.emulator import EmulatorServer
from ebsfs.emulator.diskimage import build_disk, demo_files, random_image
from ebsfs.errors import InvalidSnapshotId, SnapshotNotFound

SNAP, DISK = "snap-0f0b1", "snap-0d15c"
SIZE = 24 * 1024 * 1024


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fileobj") / "source.img"
    random_image(path, SIZE, seed=41, sparse_every=4)
    return path


@pytest.fixture(scope="module")
def ext4_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fileobj") / "disk.img"
    build_disk(path, 48 * 1024 * 1024, demo_files(blob_mib=2))
    return path


@pytest.fixture
def served(emulator: EmulatorServer, source: Path) -> EmulatorServer:
    emulator.store.add_image(SNAP, source)
    return emulator


def test_reads_match_the_image_at_random_offsets_and_sizes(served, source) -> None:
    data = source.read_bytes()
    volume = 1024**3  # the emulator rounds volumes up to whole GiB, as EBS does
    rng = random.Random(5)
    with ebsfs.open(SNAP, endpoint_url=served.url, cache_size=4 * 1024**2) as f:
        assert f.size == volume and f.seekable() and f.readable() and not f.writable()
        for _ in range(200):
            offset = rng.randrange(0, SIZE + 2 * BLOCK_SIZE)
            size = rng.choice([1, 511, 4096, 65536, BLOCK_SIZE + 3, 3 * BLOCK_SIZE])
            f.seek(offset)
            want = (data + bytes(8 * BLOCK_SIZE))[offset : offset + size]
            assert f.read(size) == want
            assert f.tell() == offset + size
        f.seek(-10, io.SEEK_END)
        assert f.read(100) == bytes(10) and f.read(1) == b""
        buffer = bytearray(5000)
        f.seek(BLOCK_SIZE - 100)
        assert f.readinto(buffer) == 5000
        assert bytes(buffer) == data[BLOCK_SIZE - 100 : BLOCK_SIZE + 4900]
        assert f.pread(4096, 12345) == data[12345 : 12345 + 4096]
        assert f.tell() == BLOCK_SIZE + 4900  # pread leaves the position alone
    assert f.closed
    with pytest.raises(ValueError):
        f.read(1)


def test_a_buffered_sequential_read_is_exact(served, source) -> None:
    data = source.read_bytes()
    # hedge=False: blocks are counted below, and a hedge would count twice
    with ebsfs.open(SNAP, endpoint_url=served.url, hedge=False) as raw:
        reader = io.BufferedReader(raw, buffer_size=1024 * 1024)
        digest = hashlib.sha256()
        for _ in range(SIZE // (256 * 1024)):
            digest.update(reader.read(256 * 1024))
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    gets = served.counters.block_gets
    assert all(n == 1 for n in gets.values()) and len(gets) == len(served.store.get(SNAP).indexes)


def test_threads_read_at_once(served, source) -> None:
    data = source.read_bytes()

    def work(seed: int) -> bool:
        rng = random.Random(seed)
        for _ in range(40):
            offset, size = rng.randrange(0, SIZE - 70000), rng.choice([4096, 70000])
            if f.pread(size, offset) != data[offset : offset + size]:
                return False
        return True

    with (
        ebsfs.open(SNAP, endpoint_url=served.url, cache_size=2 * 1024**2) as f,
        concurrent.futures.ThreadPoolExecutor(8) as pool,
    ):
        assert all(pool.map(work, range(8)))


def test_closing_stops_the_engine_thread(served) -> None:
    """The very threads the file started are gone once close() returns (compared by
    identity: a thread of the same name leaked by an earlier test cannot pass for
    one of them). The emulator's request threads and trio's idle worker cache are not
    the file's."""
    import threading

    def foreign(thread: threading.Thread) -> bool:
        return "process_request_thread" in thread.name or thread.name.startswith("Trio")

    before = set(threading.enumerate())
    f = ebsfs.open(SNAP, endpoint_url=served.url)
    f.read(10)
    started = [t for t in threading.enumerate() if t not in before and not foreign(t)]
    assert "ebsfs-engine" in [t.name for t in started]
    f.close()
    assert [t.name for t in started if t.is_alive()] == []


def test_a_file_closed_in_the_engine_thread_stops_it(served) -> None:
    """A file collected by the engine's own thread (a reference cycle freed there) is
    closed there: that must stop the loop, not raise or wait for itself."""
    f = ebsfs.open(SNAP, endpoint_url=served.url)
    loop = f._loop

    async def close_here() -> None:
        loop.close()

    loop.call(close_here)
    loop._thread.join(timeout=10)
    assert not loop._thread.is_alive()
    f.close()


def test_region_and_endpoint_from_the_environment(
    served, source, monkeypatch, signed_regions
) -> None:
    """AWS_REGION and AWS_ENDPOINT_URL work as they do for the CLI (boto3 alone reads
    only AWS_DEFAULT_REGION): the emulator serves the bytes, and every request is
    signed for eu-west-1."""
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", served.url)
    offset, size = BLOCK_SIZE - 3, 2 * BLOCK_SIZE
    with ebsfs.open(SNAP) as f:
        assert f.pread(size, offset) == source.read_bytes()[offset : offset + size]
    assert served.counters.calls["GetSnapshotBlock"] >= 1
    assert set(signed_regions) == {"eu-west-1"}


@pytest.mark.expected_log()
def test_a_cache_dir_serves_the_next_file_with_no_block_calls(served, source, tmp_path) -> None:
    data = source.read_bytes()
    written = len(served.store.get(SNAP).indexes)
    with ebsfs.open(SNAP, endpoint_url=served.url, cache_dir=str(tmp_path / "c")) as f:
        assert f.read(SIZE) == data
        assert f.stats()["blocks_fetched"] == written
    served.counters.reset()
    with ebsfs.open(SNAP, endpoint_url=served.url, cache_dir=str(tmp_path / "c")) as f:
        assert f.read(SIZE) == data
        stats = f.stats()
    assert served.counters.calls["GetSnapshotBlock"] == 0
    assert stats["disk_hits"] == written and stats["calls"]["GetSnapshotBlock"] == 0


def test_errors_map_as_documented(served, source) -> None:
    with pytest.raises(InvalidSnapshotId):
        ebsfs.open("vol-0123", endpoint_url=served.url)
    with pytest.raises(SnapshotNotFound):
        ebsfs.open("snap-0fff", endpoint_url=served.url)
    with ebsfs.open(SNAP, endpoint_url=served.url, read_timeout=2) as f:
        served.faults.error_rate = 1.0
        with pytest.raises(OSError) as err:
            f.pread(10, 3 * BLOCK_SIZE)
        assert err.value.errno == errno.EIO and SNAP in str(err.value)
        served.faults.error_rate = 0.0
        assert f.pread(10, 3 * BLOCK_SIZE) == source.read_bytes()[3 * BLOCK_SIZE :][:10]


def test_partitions_of_a_gpt_disk_are_files(emulator: EmulatorServer, ext4_disk) -> None:
    emulator.store.add_image(DISK, ext4_disk)
    data = ext4_disk.read_bytes()
    with ebsfs.open(DISK, endpoint_url=emulator.url) as disk:
        parts = disk.partitions()
        assert [(p.partition.number, p.partition.offset, p.size) for p in parts] == [
            (1, 1024 * 1024, len(data) - 2 * 1024 * 1024)
        ]
        part = parts[0]
        assert part.name == f"{DISK}-part1.img"
        assert part.read(4096) == data[1024 * 1024 : 1024 * 1024 + 4096]
        part.seek(-4096, io.SEEK_END)
        end = 1024 * 1024 + part.size
        assert part.read(8192) == data[end - 4096 : end]  # never past the partition


def test_pytsk3_lists_the_files_of_an_ext4_snapshot(emulator: EmulatorServer, ext4_disk) -> None:
    """A forensic library reads the snapshot through the file object, no mount."""
    pytsk3 = pytest.importorskip("pytsk3")
    emulator.store.add_image(DISK, ext4_disk)
    files = demo_files(blob_mib=2)

    class SnapshotImg(pytsk3.Img_Info):  # type: ignore[name-defined]
        def __init__(self, f: ebsfs.fileobj.SnapshotFile) -> None:
            self._f = f
            super().__init__(url="", type=pytsk3.TSK_IMG_TYPE_EXTERNAL)

        def read(self, offset: int, size: int) -> bytes:
            return self._f.pread(size, offset)

        def get_size(self) -> int:
            return self._f.size

    with ebsfs.open(DISK, endpoint_url=emulator.url) as disk:
        fs = pytsk3.FS_Info(SnapshotImg(disk), offset=disk.partitions()[0].partition.offset)
        found: dict[str, bytes] = {}

        def walk(directory, prefix: str) -> None:
            for entry in directory:
                name = entry.info.name.name.decode()
                if name in (".", "..", "lost+found") or entry.info.meta is None:
                    continue
                path = f"{prefix}{name}"
                if entry.info.meta.type == pytsk3.TSK_FS_META_TYPE_DIR:
                    walk(entry.as_directory(), path + "/")
                elif entry.info.meta.type == pytsk3.TSK_FS_META_TYPE_REG:
                    found[path] = entry.read_random(0, entry.info.meta.size)

        walk(fs.open_dir("/"), "")
    assert found == files


UNPRIVILEGED = """
import hashlib, json, sys
import ebsfs
with ebsfs.open(sys.argv[1], endpoint_url=sys.argv[2]) as f:
    f.seek(int(sys.argv[3]))
    digest = hashlib.sha256(f.read(int(sys.argv[4]))).hexdigest()
uid = __import__("os").getuid()
print(json.dumps({"sha256": digest, "pyfuse3": "pyfuse3" in sys.modules, "uid": uid}))
"""


@pytest.mark.mount  # root, to switch to user 65534
def test_an_unprivileged_process_reads_without_pyfuse3(served, source, tmp_path) -> None:
    offset, size = 3 * BLOCK_SIZE - 7, 5 * BLOCK_SIZE
    want = hashlib.sha256(source.read_bytes()[offset : offset + size]).hexdigest()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ACCESS_KEY_ID="AKIDTEST",
        AWS_SECRET_ACCESS_KEY="secret",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_CONFIG_FILE="/dev/null",
        AWS_SHARED_CREDENTIALS_FILE="/dev/null",
        AWS_EC2_METADATA_DISABLED="true",
        HOME="/nonexistent",
        PYTHONPATH=str(Path(ebsfs.__file__).parent.parent),
    )
    unprivileged = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable]
    reach = subprocess.run(
        [*unprivileged, "-c", "import boto3, trio, ebsfs"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd="/",
    )
    if reach.returncode != 0:  # e.g. a checkout in a 0700 directory (mktemp -d)
        pytest.skip(
            f"user 65534 cannot read this checkout or its venv: "
            f"{reach.stderr.strip().splitlines()[-1:]}"
        )
    result = subprocess.run(
        [*unprivileged, "-c", UNPRIVILEGED, SNAP, served.url, str(offset), str(size)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd="/",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report == {"sha256": want, "pyfuse3": False, "uid": 65534}
