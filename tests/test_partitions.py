"""Partition tables written by sfdisk and mkfs, read back by find_partitions and compared
with what `sfdisk --json` says about the same file."""

from __future__ import annotations

import json
import logging
import re
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
import trio

from ebsfs.engine.partitions import Partition, find_partitions
from ebsfs.errors import PartitionTableError

MIB = 1024**2
SFDISK = ["sfdisk", "-q", "--no-reread", "--no-tell-kernel"]  # else it sleeps 250 ms a write
DISK = 64 * MIB
LINUX = "0fc63daf-8483-4772-8e79-3d69d8477de4"
ESP = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
MBR_LAYOUT = """label: dos
size=8MiB, type=83
size=8MiB, type=82
type=5
size=8MiB, type=83
type=83
"""
GPT_LAYOUT = f"""label: gpt
size=8MiB, type={ESP}, name="EFI system"
size=8MiB, type={LINUX}
size=16MiB, type={LINUX}, name="root"
type={LINUX}
"""


class FileReader:
    """The async read find_partitions wants, over a file, remembering each (offset, size)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.calls: list[tuple[int, int]] = []

    async def __call__(self, offset: int, size: int) -> bytes:
        self.calls.append((offset, size))
        with self.path.open("rb") as f:
            f.seek(offset)
            return f.read(size)


def scan(path: Path) -> list[Partition]:
    return trio.run(find_partitions, FileReader(path), path.stat().st_size)


def make_disk(tmp_path: Path, script: str | None = None, size: int = DISK) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(b"")
    subprocess.run(["truncate", "-s", str(size), str(path)], check=True)
    if script is not None:
        subprocess.run([*SFDISK, str(path)], input=script, text=True, check=True)
    return path


def sfdisk_view(path: Path) -> list[tuple[int, int, int, str, str]]:
    """(number, offset, size, type, name) of each data partition, as sfdisk sees them."""
    out = subprocess.run(
        ["sfdisk", "--json", str(path)], capture_output=True, text=True, check=True
    ).stdout
    table = json.loads(out)["partitiontable"]
    rows = []
    for p in table["partitions"]:
        number = int(re.search(r"(\d+)$", p["node"]).group(1))  # type: ignore[union-attr]
        if table["label"] == "dos":
            ptype = f"0x{int(p['type'], 16):02x}"
            if ptype in ("0x05", "0x0f", "0x85"):
                continue  # the extended container: not listed by find_partitions
        else:
            ptype = p["type"].lower()
        rows.append((number, p["start"] * 512, p["size"] * 512, ptype, p.get("name", "")))
    return rows


def view(parts: list[Partition]) -> list[tuple[int, int, int, str, str]]:
    return [(p.number, p.offset, p.size, p.type, p.name) for p in parts]


def patch(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def flip(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0xFF]))


@pytest.fixture
def gpt_disk(tmp_path: Path) -> Path:
    """Four GPT partitions, then slot 2 deleted: 1, 3 and 4 are left, 2 is a gap."""
    path = make_disk(tmp_path, GPT_LAYOUT)
    subprocess.run([*SFDISK, "--delete", str(path), "2"], check=True)
    return path


def test_gpt_matches_sfdisk_and_keeps_slot_gaps(gpt_disk: Path) -> None:
    reader = FileReader(gpt_disk)
    parts = trio.run(find_partitions, reader, DISK)
    assert view(parts) == sfdisk_view(gpt_disk)
    assert [p.number for p in parts] == [1, 3, 4]
    assert [p.name for p in parts] == ["EFI system", "root", ""]
    assert [p.type for p in parts] == [ESP, LINUX, LINUX]
    assert {p.scheme for p in parts} == {"gpt"}
    assert parts[0].offset == 1 * MIB and parts[0].size == 8 * MIB
    # the MBR and GPT header in one read, the 16 KiB entry array in another
    assert len(reader.calls) == 2 and sum(size for _, size in reader.calls) <= 1024 + 16384


def test_mbr_primaries_and_logicals(tmp_path: Path) -> None:
    path = make_disk(tmp_path, MBR_LAYOUT)
    reader = FileReader(path)
    parts = trio.run(find_partitions, reader, DISK)
    assert view(parts) == sfdisk_view(path)
    assert [(p.number, p.offset // 512, p.size // 512, p.type) for p in parts] == [
        (1, 2048, 16384, "0x83"),
        (2, 18432, 16384, "0x82"),
        (5, 36864, 16384, "0x83"),
        (6, 55296, 75776, "0x83"),
    ]
    assert {p.scheme for p in parts} == {"mbr"} and {p.name for p in parts} == {""}
    assert len(reader.calls) == 3  # the MBR, then one EBR per logical


def test_gpt_without_protective_mbr(gpt_disk: Path) -> None:
    expected = sfdisk_view(gpt_disk)
    patch(gpt_disk, 0, bytes(512))
    assert view(scan(gpt_disk)) == expected


def test_bare_ext4_is_not_partitioned(tmp_path: Path) -> None:
    path = make_disk(tmp_path)
    subprocess.run(["mkfs.ext4", "-F", "-q", str(path)], check=True)
    assert scan(path) == []


def test_zero_and_tiny_disks_are_not_partitioned(tmp_path: Path) -> None:
    assert scan(make_disk(tmp_path)) == []
    assert trio.run(find_partitions, FileReader(make_disk(tmp_path, size=100)), 100) == []


@pytest.mark.parametrize(
    "offset, marker",
    [
        (3, b"NTFS    "),
        (3, b"EXFAT   "),
        (0x36, b"FAT16   "),
        (0x52, b"FAT32   "),
        (446, b"\x12"),  # a status byte that is neither 0x00 nor 0x80
    ],
)
def test_boot_sectors_are_not_mbrs(tmp_path: Path, offset: int, marker: bytes) -> None:
    path = make_disk(tmp_path, size=8 * MIB)
    # boot code where the first entry would be, that reads as a plausible partition
    patch(path, 446, struct.pack("<B3xB3xII", 0, 0x07, 2048, 4096))
    patch(path, 510, b"\x55\xaa")
    assert [p.number for p in scan(path)] == [1]  # without the marker it would be an MBR
    patch(path, offset, marker)
    assert scan(path) == []


@pytest.mark.expected_log(r"using the backup GPT")
@pytest.mark.parametrize("where", ["header", "entry array"])
def test_damaged_primary_gpt_falls_back_to_backup(
    gpt_disk: Path, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    expected = sfdisk_view(gpt_disk)
    flip(gpt_disk, 512 + 40 if where == "header" else 1024 + 56)  # first usable LBA / a name
    with caplog.at_level(logging.WARNING, logger="ebsfs.engine.partitions"):
        parts = scan(gpt_disk)
    assert view(parts) == expected
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "using the backup GPT" in warnings[0].getMessage()
    assert warnings[0].name == "ebsfs.engine.partitions"


def test_both_gpt_headers_damaged(gpt_disk: Path) -> None:
    flip(gpt_disk, 512 + 40)
    flip(gpt_disk, DISK - 512 + 40)
    with pytest.raises(PartitionTableError, match=r"primary GPT: .*backup GPT: .*CRC"):
        scan(gpt_disk)


def test_mbr_partition_past_end_of_disk(tmp_path: Path) -> None:
    path = make_disk(tmp_path, "label: dos\nsize=8MiB, type=83\ntype=83\n")
    assert [p.number for p in scan(path)] == [1, 2]
    subprocess.run(["truncate", "-s", "32M", str(path)], check=True)  # a smaller snapshot
    with pytest.raises(
        PartitionTableError,
        match=r"partition 2 \(bytes 9437184-67108864\) "
        r"ends past the end of the disk \(33554432",
    ):
        scan(path)


def test_gpt_partition_overlap(tmp_path: Path) -> None:
    path = make_disk(
        tmp_path,
        f"label: gpt\nstart=2048, size=16384, type={ESP}\nstart=18432, size=32768, type={LINUX}\n",
    )
    assert [p.number for p in scan(path)] == [1, 2]
    # partition 1 made to end one sector into partition 2, in both GPTs, CRCs fixed up
    with path.open("r+b") as f:
        for header in (512, DISK - 512):
            f.seek(header)
            raw = bytearray(f.read(512))
            entries = struct.unpack_from("<Q", raw, 72)[0] * 512
            f.seek(entries)
            array = bytearray(f.read(128 * 128))
            assert struct.unpack_from("<QQ", array, 32) == (2048, 18431)
            struct.pack_into("<Q", array, 40, 18432)
            struct.pack_into("<I", raw, 88, zlib.crc32(array))
            struct.pack_into("<I", raw, 16, 0)
            struct.pack_into("<I", raw, 16, zlib.crc32(raw[:92]))
            f.seek(entries)
            f.write(array)
            f.seek(header)
            f.write(raw)
    with pytest.raises(PartitionTableError, match=r"partitions 1 .* and 2 .* overlap"):
        scan(path)


def test_ebr_loop(tmp_path: Path) -> None:
    path = make_disk(tmp_path, MBR_LAYOUT)
    with path.open("rb") as f:
        raw = f.read(512)
    ext_first = struct.unpack_from("<I", raw, 446 + 2 * 16 + 8)[0]  # entry 3: the extended
    with path.open("rb") as f:
        f.seek(ext_first * 512)
        first_ebr = f.read(512)
    second_ebr = ext_first + struct.unpack_from("<I", first_ebr, 446 + 16 + 8)[0]
    assert second_ebr * 512 == 55296 * 512 - 1 * MIB  # partition 6 starts 1 MiB after its EBR
    # the second EBR's link points back at the first one (0 = the extended partition's start)
    patch(path, second_ebr * 512 + 446 + 16, struct.pack("<B3xB3xII", 0, 0x05, 0, 2048))
    with pytest.raises(PartitionTableError, match=r"loops back to sector 34816"):
        scan(path)
