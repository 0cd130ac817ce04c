"""Partitions as files in a real mount: `<id>-part<N>.img` for each GPT or MBR partition
(logical ones included), exactly the partition's bytes, loop mounted with no offset:
ext4, XFS (ro,norecovery,nouuid) and NTFS (ntfs-3g)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from ebsfs.constants import GIB
from ebsfs.emulator import EmulatorServer
from tests.disks import Disk, gpt_disk, loop_mount_file, mbr_disk, read_tree
from tests.mounting import mounted, needs_fuse

pytestmark = [needs_fuse, pytest.mark.mount]
GPT_SNAP, MBR_SNAP, ODD_SNAP, BAD_SNAP = "snap-0a0a1", "snap-0a0a2", "snap-0a0a3", "snap-0a0a4"


@pytest.fixture(scope="module")
def gpt(tmp_path_factory: pytest.TempPathFactory) -> Disk:
    return gpt_disk(tmp_path_factory.mktemp("partfiles") / "gpt.img")


@pytest.fixture(scope="module")
def mbr(tmp_path_factory: pytest.TempPathFactory) -> Disk:
    return mbr_disk(tmp_path_factory.mktemp("partfiles") / "mbr.img")


@pytest.fixture(scope="module")
def unaligned_mbr(tmp_path_factory: pytest.TempPathFactory) -> Disk:
    """Partition 1 starts at sector 63, as old tools put it: not 4 KiB aligned."""
    return mbr_disk(tmp_path_factory.mktemp("partfiles") / "odd.img", chs_aligned=True)


def sha256_range(path: Path, offset: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        while size:
            chunk = f.read(min(size, 1024 * 1024))
            assert chunk, "short read"
            digest.update(chunk)
            size -= len(chunk)
    return digest.hexdigest()


def check_partition_files(mnt: Path, snapshot_id: str, disk: Disk, tmp_path: Path) -> None:
    names = sorted(os.listdir(mnt))
    want = sorted(
        [f"{snapshot_id}.img"] + [f"{snapshot_id}-part{p.number}.img" for p in disk.partitions]
    )
    assert names == want
    for part in disk.partitions:
        path = mnt / f"{snapshot_id}-part{part.number}.img"
        assert path.stat().st_size == part.size
        assert sha256_range(path, 0, part.size) == sha256_range(disk.path, part.offset, part.size)
        assert os.getxattr(path, "user.ebsfs.offset") == str(part.offset).encode()
        with loop_mount_file(path, part.fstype, tmp_path / f"fs{part.number}") as fs:
            assert read_tree(fs) == part.files, f"partition {part.number} ({part.fstype})"


def test_gpt_partitions_ext4_xfs_ntfs_loop_mount_with_no_offset(
    emulator: EmulatorServer, gpt: Disk, tmp_path: Path
) -> None:
    assert [p.fstype for p in gpt.partitions] == ["ext4", "xfs", "ntfs"]
    emulator.store.add_image(GPT_SNAP, gpt.path)
    with mounted(emulator.url, [GPT_SNAP], tmp_path / "mnt") as mnt:
        assert (mnt / f"{GPT_SNAP}.img").stat().st_size == GIB
        check_partition_files(mnt, GPT_SNAP, gpt, tmp_path)


def test_mbr_primaries_and_a_logical_partition(
    emulator: EmulatorServer, mbr: Disk, tmp_path: Path
) -> None:
    assert [p.number for p in mbr.partitions] == [1, 2, 5]
    emulator.store.add_image(MBR_SNAP, mbr.path)
    with mounted(emulator.url, [MBR_SNAP], tmp_path / "mnt") as mnt:
        check_partition_files(mnt, MBR_SNAP, mbr, tmp_path)


def test_a_partition_not_aligned_to_4k(
    emulator: EmulatorServer, unaligned_mbr: Disk, tmp_path: Path
) -> None:
    assert unaligned_mbr.partition(1).offset == 63 * 512
    emulator.store.add_image(ODD_SNAP, unaligned_mbr.path)
    with mounted(emulator.url, [ODD_SNAP], tmp_path / "mnt") as mnt:
        check_partition_files(mnt, ODD_SNAP, unaligned_mbr, tmp_path)


@pytest.mark.expected_log(
    r"snap-0a0a4: partition table ignored, no partition files .*"
    r"past the end of the disk"
)
def test_a_table_pointing_past_the_disk_gives_no_partition_files(
    emulator: EmulatorServer, tmp_path: Path
) -> None:
    """An MBR entry ending past the volume: a warning, the whole image, no failure."""
    sector = bytearray(512)
    entry = (
        bytes([0x00, 0, 0, 0, 0x83, 0, 0, 0])
        + (2048).to_bytes(4, "little")
        + (4 * 1024 * 1024).to_bytes(4, "little")
    )  # 2 GiB from sector 2048, on a 1 GiB disk
    sector[446:462] = entry
    sector[510:512] = b"\x55\xaa"
    emulator.store.add_snapshot(
        BAD_SNAP, {0: bytes(sector) + bytes(524288 - 512)}, volume_size_gib=1
    )
    with mounted(emulator.url, [BAD_SNAP], tmp_path / "mnt") as mnt:
        assert os.listdir(mnt) == [f"{BAD_SNAP}.img"]
        with open(mnt / f"{BAD_SNAP}.img", "rb") as f:
            assert f.read(512) == bytes(sector)
