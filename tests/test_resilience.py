"""Never a dead mount (real mounts): a failing credential refresh, a bug in the read
path and a CA bundle given only in a profile. Reads fail with EIO while something is
wrong, the mount stays, and exact bytes come back once it is fixed."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from ebsfs.constants import BLOCK_SIZE
from ebsfs.emulator import EmulatorServer
from ebsfs.emulator.diskimage import random_image
from tests.mounting import drop_page_cache, mounted, needs_fuse, serving_pid

pytestmark = [needs_fuse, pytest.mark.mount]
SNAP = "snap-0e1"


@pytest.fixture(scope="module")
def source_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("resilience") / "source.img"
    random_image(path, 16 * 1024 * 1024, seed=31, sparse_every=0)
    return path


@pytest.fixture(scope="module")
def source(source_file: Path) -> bytes:
    return source_file.read_bytes()


def read_at(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def assert_eio(path: Path, offset: int) -> None:
    with pytest.raises(OSError) as err:
        read_at(path, offset, 4096)
    assert err.value.errno == errno.EIO


@pytest.mark.expected_log(
    r"read of snap-0e1.img failed: .*AWS credentials could not be "
    r"refreshed .*token service unavailable.*credential_process"
)
def test_a_failing_credential_process_gives_eio_then_recovers(
    emulator: EmulatorServer, source, source_file, credential_helper, tmp_path
) -> None:
    emulator.store.add_image(SNAP, source_file)
    with mounted(
        emulator.url,
        [SNAP],
        tmp_path / "mnt",
        "--profile",
        credential_helper.profile,
        "--read-timeout",
        "10",
    ) as mnt:
        image = mnt / f"{SNAP}.img"
        pid = serving_pid(mnt)
        assert read_at(image, 0, 4096) == source[:4096]
        credential_helper.down = True
        drop_page_cache()
        for block in (10, 20):  # not cached: each read needs fresh credentials
            assert_eio(image, block * BLOCK_SIZE)
        assert os.path.ismount(mnt) and serving_pid(mnt) == pid
        credential_helper.down = False
        drop_page_cache()
        assert (
            read_at(image, 10 * BLOCK_SIZE, BLOCK_SIZE) == source[10 * BLOCK_SIZE : 11 * BLOCK_SIZE]
        )
        with open(image, "rb") as f:
            assert f.read(len(source)) == source
    log = (tmp_path / "mnt.log").read_text()
    assert "Traceback" not in log  # one line per failed read, no botocore tracebacks


@pytest.mark.expected_log(r"read failed \(EIO\): unexpected RuntimeError: planted bug")
def test_an_unexpected_exception_in_the_read_path_is_eio_and_the_mount_lives(
    emulator: EmulatorServer, source, source_file, tmp_path, monkeypatch
) -> None:
    flag = tmp_path / "bug"
    monkeypatch.setenv("EBSFS_TEST_BUG_FILE", str(flag))
    emulator.store.add_image(SNAP, source_file)
    with mounted(emulator.url, [SNAP], tmp_path / "mnt", launcher="tests.inject_bug") as mnt:
        image = mnt / f"{SNAP}.img"
        assert read_at(image, 0, 4096) == source[:4096]
        flag.touch()
        assert_eio(image, 8 * BLOCK_SIZE)
        assert_eio(image, 12 * BLOCK_SIZE)
        assert os.path.ismount(mnt)
        flag.unlink()
        start = 8 * BLOCK_SIZE
        assert read_at(image, start, 8192) == source[start : start + 8192]
        with open(image, "rb") as f:
            assert f.read(len(source)) == source
    log = (tmp_path / "mnt.log").read_text()
    assert log.count("Traceback") == 1  # the first time only; one line after that


@pytest.mark.parametrize("path", ["direct", "botocore"])
def test_a_ca_bundle_only_in_the_profile_reads_over_https(
    https_emulator: EmulatorServer,
    profile_ca_bundle,
    source,
    source_file,
    tmp_path,
    monkeypatch,
    path,
) -> None:
    if path == "botocore":  # a proxy setting sends GETs through botocore
        monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    https_emulator.store.add_image(SNAP, source_file)
    assert "AWS_CA_BUNDLE" not in os.environ
    # --no-hedge: blocks are counted below; a hedge (a call slow on a loaded machine,
    # asked again) would count twice.
    with (
        mounted(
            https_emulator.url,
            [SNAP],
            tmp_path / "mnt",
            "--profile",
            profile_ca_bundle,
            "--no-hedge",
        ) as mnt,
        open(mnt / f"{SNAP}.img", "rb") as f,
    ):
        assert f.read(len(source)) == source
    assert https_emulator.counters.calls["GetSnapshotBlock"] == len(source) // BLOCK_SIZE
