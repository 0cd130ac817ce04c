"""The test disk builders (tests/disks.py), checked with the real tools: sfdisk reads
the intended tables, blkid finds the filesystems, and loop mounts read the files back."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.disks import (
    GPT_TYPES,
    MOUNT_OPTIONS,
    SECTOR,
    Disk,
    MiB,
    PartSpec,
    extract_partition,
    gpt_disk,
    loop_mount_file,
    loop_mount_partition,
    mbr_disk,
    partition_files,
    read_tree,
)
from tests.mounting import needs_fuse

KERNEL_FSTYPE = {"ext4": "ext4", "xfs": "xfs", "ntfs": "fuseblk"}


@pytest.fixture(scope="session")
def gpt(tmp_path_factory: pytest.TempPathFactory) -> Disk:
    """Needs /dev/fuse and root (NTFS is populated through ntfs-3g)."""
    return gpt_disk(tmp_path_factory.mktemp("gpt") / "gpt.img")


@pytest.fixture(scope="session")
def mbr(tmp_path_factory: pytest.TempPathFactory) -> Disk:
    return mbr_disk(tmp_path_factory.mktemp("mbr") / "mbr.img")


@pytest.fixture(scope="session")
def mbr_chs(tmp_path_factory: pytest.TempPathFactory) -> Disk:
    return mbr_disk(tmp_path_factory.mktemp("mbr-chs") / "mbr-chs.img", chs_aligned=True)


def sfdisk_json(image: Path) -> dict[str, Any]:
    out = subprocess.run(
        ["sfdisk", "--json", str(image)], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out)["partitiontable"]


def by_number(table: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """sfdisk's entries by partition number (its node is IMAGE + number)."""
    return {int(e["node"].removeprefix(table["device"])): e for e in table["partitions"]}


def loops_on(image: Path) -> str:
    return subprocess.run(
        ["losetup", "-j", str(image)], capture_output=True, text=True
    ).stdout.strip()


def mount_entry(target: Path) -> tuple[str, set[str]]:
    """The kernel's fstype and options (per mount and per superblock) for the mount at
    `target`."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields, _, rest = line.partition(" - ")
            parts = fields.split()
            if parts[4] == str(target):
                fstype, _source, super_options = rest.split()
                return fstype, {*parts[5].split(","), *super_options.split(",")}
    raise AssertionError(f"{target} is not mounted")


def test_partition_files_are_distinct_and_span_blocks() -> None:
    a, b = partition_files("a"), partition_files("b")
    assert a == partition_files("a")
    assert all(a[name] != b[name] for name in a if a[name])
    assert len(a["data/big.bin"]) > 3 * 512 * 1024 and len(a["data/big.bin"]) % 4096
    assert any(name.count("/") >= 3 for name in a)
    assert a["docs/empty.txt"] == b""


@needs_fuse
@pytest.mark.mount
def test_gpt_table(gpt: Disk) -> None:
    table = sfdisk_json(gpt.path)
    assert table["label"] == "gpt"
    assert table["id"] == "5E1F0E5E-0000-4000-8000-0000000000D2"
    entries = by_number(table)
    assert sorted(entries) == [1, 2, 3]
    assert [p.fstype for p in gpt.partitions] == ["ext4", "xfs", "ntfs"]
    for part in gpt.partitions:
        entry = entries[part.number]
        assert entry["start"] * SECTOR == part.offset and entry["size"] * SECTOR == part.size
        assert entry["type"] == GPT_TYPES[part.fstype]
        assert entry["name"] == part.label and entry["uuid"] == part.partuuid
    assert gpt.partitions[-1].end <= gpt.size - 33 * SECTOR
    assert os.path.getsize(gpt.path) == gpt.size


@pytest.mark.parametrize("chs", [False, True])
def test_mbr_table(mbr: Disk, mbr_chs: Disk, chs: bool) -> None:
    disk = mbr_chs if chs else mbr
    table = sfdisk_json(disk.path)
    assert table["label"] == "dos" and table["id"] == "0x5e1f0e5e"
    entries = by_number(table)
    assert sorted(entries) == [1, 2, 3, 5]
    assert [p.number for p in disk.partitions] == [1, 2, 5]  # not the extended container
    extended = entries.pop(3)
    assert extended["type"] == "5"
    ext_start, ext_end = extended["start"] * SECTOR, (extended["start"] + extended["size"]) * SECTOR
    assert ext_end == disk.size
    for part in disk.partitions:
        entry = entries[part.number]
        assert entry["type"] == "83"
        assert entry["start"] * SECTOR == part.offset and entry["size"] * SECTOR == part.size
    assert disk.partition(1).offset == (63 * SECTOR if chs else MiB)
    logical = disk.partition(5)
    assert ext_start < logical.offset and logical.end <= ext_end
    with open(disk.path, "rb") as f:
        f.seek(ext_start + 510)
        assert f.read(2) == b"\x55\xaa"  # the EBR, at the extended partition's start


def check_blkid(disk: Disk) -> None:
    for part in disk.partitions:
        out = subprocess.run(
            ["blkid", "-p", "-o", "export", "-O", str(part.offset), str(disk.path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        found = dict(line.split("=", 1) for line in out.splitlines())
        assert found["TYPE"] == part.fstype
        assert found["LABEL"] == part.label and found["UUID"] == part.uuid


def test_mbr_blkid(mbr: Disk, mbr_chs: Disk) -> None:
    check_blkid(mbr)
    check_blkid(mbr_chs)


@needs_fuse
@pytest.mark.mount
def test_gpt_blkid(gpt: Disk) -> None:
    check_blkid(gpt)


@needs_fuse
@pytest.mark.mount
def test_builds_are_reproducible(gpt: Disk, mbr: Disk, tmp_path: Path) -> None:
    """Two builds give the same bytes (for XFS and NTFS only with libfaketime)."""
    again = mbr_disk(tmp_path / "mbr.img")
    assert again.path.read_bytes() == mbr.path.read_bytes()
    if shutil.which("faketime"):
        again = gpt_disk(tmp_path / "gpt.img")
        assert again.path.read_bytes() == gpt.path.read_bytes()


@needs_fuse
@pytest.mark.mount
@pytest.mark.parametrize(
    ("disk_name", "number"),
    [
        ("gpt", 1),
        ("gpt", 2),
        ("gpt", 3),
        ("mbr", 1),
        ("mbr", 2),
        ("mbr", 5),
        ("mbr_chs", 1),
    ],
)
def test_loop_mount_partition(
    request: pytest.FixtureRequest, disk_name: str, number: int, tmp_path: Path
) -> None:
    disk: Disk = request.getfixturevalue(disk_name)
    part = disk.partition(number)
    target = tmp_path / "mnt"
    with loop_mount_partition(disk.path, part, target):
        fstype, options = mount_entry(target)
        assert fstype == KERNEL_FSTYPE[part.fstype] and "ro" in options
        # ext4 does not list noload, nor XFS nouuid
        assert set(MOUNT_OPTIONS[part.fstype].split(",")) - {"nouuid", "noload"} <= options
        assert read_tree(target) == part.files
    assert not os.path.ismount(target)
    assert loops_on(disk.path) == ""


@needs_fuse
@pytest.mark.mount
@pytest.mark.parametrize(
    ("disk_name", "number"),
    [
        ("gpt", 1),
        ("gpt", 2),
        ("gpt", 3),
        ("mbr_chs", 1),
    ],
)
def test_loop_mount_file(
    request: pytest.FixtureRequest, disk_name: str, number: int, tmp_path: Path
) -> None:
    disk: Disk = request.getfixturevalue(disk_name)
    part = disk.partition(number)
    file = extract_partition(disk.path, part, tmp_path / "part.img")
    assert os.path.getsize(file) == part.size
    target = tmp_path / "mnt"
    with loop_mount_file(file, part.fstype, target):
        assert mount_entry(target)[0] == KERNEL_FSTYPE[part.fstype]
        assert read_tree(target) == part.files
    assert not os.path.ismount(target)
    assert loops_on(file) == ""


@needs_fuse
@pytest.mark.mount
@pytest.mark.parametrize("wrong", ["xfs", "ntfs"])
def test_failed_mount_leaves_nothing(mbr: Disk, wrong: str, tmp_path: Path) -> None:
    """Mounting an ext4 partition as something else fails, and detaches its loop device."""
    real = mbr.partition(2)
    part = PartSpec(real.number, real.offset, real.size, wrong, {})
    target = tmp_path / "mnt"
    with pytest.raises(RuntimeError), loop_mount_partition(mbr.path, part, target):
        pass
    assert not os.path.ismount(target)
    assert loops_on(mbr.path) == ""
