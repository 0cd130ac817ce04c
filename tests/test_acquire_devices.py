"""`ebsfs get` onto real devices and small file systems (root): a loop device (holes
zeroed, nothing past the image touched), a device too small, and a full disk that
resumes once there is room."""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ebsfs.constants import BLOCK_SIZE, GIB
from ebsfs.emulator import EmulatorServer
from tests.acquiring import add, digests, file_digest, gets, sparse_blocks
from tests.disks import loop_device
from tests.fakes import pattern_block
from tests.mounting import ebsfs
from tests.test_cli import assert_one_line_error

pytestmark = pytest.mark.mount  # root: losetup, mount

SNAP = "snap-0de0"
GARBAGE = b"\xaa" * BLOCK_SIZE


@contextlib.contextmanager
def tmpfs(target: Path, size: str) -> Iterator[Path]:
    target.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)],
        check=True,
        capture_output=True,
    )
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def test_get_onto_a_loop_device(emulator: EmulatorServer, tmp_path: Path) -> None:
    blocks = sparse_blocks(1, volume_gib=1)
    add(emulator.store, SNAP, blocks, volume_gib=1)
    backing = tmp_path / "disk.raw"
    holes = [i for i in (100, 1500, 2046) if i not in blocks]
    past = GIB + 4 * 1024**2
    with open(backing, "wb") as f:
        f.truncate(GIB + 8 * 1024**2)
        for i in holes:  # old data where the snapshot has nothing: must be zeroed
            f.seek(i * BLOCK_SIZE)
            f.write(GARBAGE)
        f.seek(past)  # past the image: must be left alone
        f.write(GARBAGE)
    manifest_file = tmp_path / "disk.manifest.json"
    with loop_device(backing, writable=True) as device:
        result = ebsfs(
            "get",
            "--endpoint-url",
            emulator.url,
            "--manifest",
            str(manifest_file),
            SNAP,
            device,
            timeout=180,
        )
        assert result.returncode == 0, result.stderr
        sha256 = digests(blocks, GIB)[0]
        assert file_digest(device, GIB) == sha256
        with open(device, "rb") as f:
            f.seek(past)
            assert f.read(BLOCK_SIZE) == GARBAGE
        m = json.loads(manifest_file.read_text())
        assert m["sha256"] == sha256 and m["output"] == device
        checked = ebsfs("verify", "--manifest", str(manifest_file), device, timeout=180)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        again = ebsfs(
            "get", "--endpoint-url", emulator.url, "--manifest", str(manifest_file), SNAP, device
        )
        assert again.returncode == 0 and "already a finished copy" in again.stderr
    assert not list(tmp_path.glob("*.part*"))


def test_device_smaller_than_the_volume(emulator: EmulatorServer, tmp_path: Path) -> None:
    add(emulator.store, SNAP, {0: pattern_block(1, 0)}, volume_gib=1)
    backing = tmp_path / "small.raw"
    with open(backing, "wb") as f:
        f.truncate(GIB // 2)
    with loop_device(backing, writable=True) as device:
        result = ebsfs(
            "get",
            "--endpoint-url",
            emulator.url,
            "--manifest",
            str(tmp_path / "m.json"),
            SNAP,
            device,
        )
    assert_one_line_error(result, device, "at least the volume's size")
    assert gets(emulator) == 0


def test_full_disk_fails_in_one_line_and_resumes_once_there_is_room(
    emulator: EmulatorServer, tmp_path: Path
) -> None:
    blocks = {i: pattern_block(2, i) for i in range(0, 240, 2)}  # 60 MiB of data
    add(emulator.store, SNAP, blocks, volume_gib=1)
    with tmpfs(tmp_path / "small", "24m") as small:
        out = small / "disk.img"
        # --no-hedge: the bound below is of blocks fetched again after the disk filled;
        # a hedge (a slow call asked again on a loaded machine) would add to it.
        options = ("--endpoint-url", emulator.url, "--no-hedge", "--max-fetches", "4")
        result = ebsfs("get", *options, SNAP, str(out))
        assert_one_line_error(result, "No space left on device", "resumes")
        kept = {p.name for p in small.iterdir()}
        assert {"disk.img.part", "disk.img.part.json", "disk.img.part.sums"} <= kept
        assert not out.exists()
        first_run = gets(emulator)
        assert 0 < first_run < len(blocks)
        subprocess.run(["mount", "-o", "remount,size=128m", str(small)], check=True)
        result = ebsfs("get", *options, SNAP, str(out))
        assert result.returncode == 0, result.stderr
        assert file_digest(out) == digests(blocks, GIB)[0]
        m = json.loads((small / "disk.img.manifest.json").read_text())
        assert m["counts"]["resumed_blocks"] > 0
        # What the first run wrote is not fetched again: only what was in flight (4
        # fetches) or waiting for the disk (8 writers) when it filled up.
        assert gets(emulator) <= len(blocks) + 4 + 8 + 4
