"""A volume's history (issue 30): `ebsfs mount --volume` (every snapshot of a volume,
StartTime mtimes, `by-time/` links, neighbours sharing unchanged blocks) and `ebsfs
history` (one path through the snapshots, from metadata).

Unit tier: the by-time names, the FUSE face's directory and links (Operations called
directly). moto's EC2: the volume's snapshots, paged, in time order. Emulator tier
(root: loop devices, mkfs, mount): three snapshots of one GPT disk made with ordinary
tools, a file added, modified, deleted, a second file added later."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pyfuse3
import pytest
import trio

from ebsfs.cli import main as cli
from ebsfs.constants import BLOCK_SIZE
from ebsfs.emulator import EmulatorServer
from ebsfs.engine.timeline import Directory, Symlink, by_time, moment
from ebsfs.fuse.operations import ROOT_INODE, EbsOperations
from ebsfs.service.ec2 import Ec2Snapshots
from ebsfs.service.session import ConnectionOptions
from tests.mounting import ebsfs, mounted, needs_fuse
from tests.snapshot_pairs import MiB, copy_sparse, mkfs, mounted_rw
from tests.test_cli import assert_one_line_error
from tests.test_metadata import moto_ec2  # noqa: F401 (a fixture)

VOL = "vol-0a11ce"
S1, S2, S3 = "snap-0a11ce01", "snap-0a11ce02", "snap-0a11ce03"
T0 = 1_780_000_000.0
"""2026-05-28T20:26:40Z."""
TIMES = {S1: T0, S2: T0 + 86400, S3: T0 + 2 * 86400 + 0.5}
PART_OFFSET = 1 * MiB
PART_SIZE = {"ext4": 190 * MiB, "xfs": 320 * MiB, "ntfs": 190 * MiB}
"""mkfs.xfs makes nothing under 300 MB."""
V1 = b"listen 80\n"
V2 = b"listen 8080\nworkers 4\n"
LATE = b"written after the first snapshot\n"


# -- unit tier --------------------------------------------------------------------------


def test_by_time_names_links_in_time_order_and_splits_a_shared_second() -> None:
    found = by_time({"snap-0b": T0 + 10, "snap-0a": T0, "snap-0c": T0 + 10.4})
    assert moment(T0) == "2026-05-28T20:26:40Z"
    assert [(link.name, link.target) for link in found.entries] == [
        ("2026-05-28T20:26:40Z", "../snap-0a.img"),
        ("2026-05-28T20:26:50Z-snap-0b", "../snap-0b.img"),
        ("2026-05-28T20:26:50Z-snap-0c", "../snap-0c.img"),
    ]
    assert found.name == "by-time" and found.mtime == T0 + 10.4
    assert by_time({}).entries == []


class FakeNode:
    fixed = True

    def __init__(self, name: str, mtime: float) -> None:
        self.name, self.size, self.mtime = name, 10, mtime

    def xattrs(self) -> dict[str, str]:
        return {}

    async def open(self):  # pragma: no cover (not opened here)
        raise NotImplementedError


def test_operations_show_a_directory_of_symlinks() -> None:
    links = Directory("by-time", [Symlink("2026-05-28T20:26:40Z", "../snap-0a.img", T0)], T0)
    ops = EbsOperations([FakeNode("snap-0a.img", T0)], directories=[links])  # type: ignore[list-item]
    names = [name for name, _ in ops.entries()]
    assert names == [b"snap-0a.img", b"by-time"]
    directory = dict(ops.entries())[b"by-time"]
    assert stat.S_ISDIR(trio.run(ops.getattr, directory).st_mode)
    (link_name, link), *_ = ops.entries(directory)
    assert link_name == b"2026-05-28T20:26:40Z"
    attr = trio.run(ops.lookup, directory, link_name)
    assert stat.S_ISLNK(attr.st_mode) and attr.st_mtime_ns == int(T0 * 1e9)
    assert trio.run(ops.readlink, link, None) == b"../snap-0a.img"  # type: ignore[arg-type]
    assert trio.run(ops.lookup, directory, b"..").st_ino == ROOT_INODE
    cases: list[tuple[Any, tuple[Any, ...], int]] = [
        (ops.readlink, (dict(ops.entries())[b"snap-0a.img"], None), errno.EINVAL),
        (ops.lookup, (directory, b"nope"), errno.ENOENT),
        (ops.open, (directory, os.O_RDONLY, None), errno.EISDIR),
        (ops.lookup, (link, b"x"), errno.ENOTDIR),
    ]
    for call, args, code in cases:
        with pytest.raises(pyfuse3.FUSEError) as err:
            trio.run(call, *args)
        assert err.value.errno == code


# -- moto's EC2 -------------------------------------------------------------------------


def test_volume_snapshots_from_moto_are_completed_ours_and_in_time_order(
    moto_ec2: str,  # noqa: F811
) -> None:
    ec2 = boto3.client("ec2", endpoint_url=moto_ec2, region_name="us-east-1")
    volume = ec2.create_volume(Size=1, AvailabilityZone="us-east-1a")["VolumeId"]
    other = ec2.create_volume(Size=1, AvailabilityZone="us-east-1a")["VolumeId"]
    made = [ec2.create_snapshot(VolumeId=volume)["SnapshotId"] for _ in range(3)]
    ec2.create_snapshot(VolumeId=other)
    found = Ec2Snapshots(ConnectionOptions(region="us-east-1"), moto_ec2).volume_snapshots([volume])
    assert sorted(s.snapshot_id for s in found) == sorted(made)
    assert [s.start_time for s in found] == sorted(s.start_time for s in found)
    assert {s.volume_id for s in found} == {volume}


# -- emulator tier ----------------------------------------------------------------------


def _disk(path: Path, work: Path, fstype: str) -> None:
    size = PART_SIZE[fstype]
    with open(path, "wb") as f:
        f.truncate(PART_OFFSET + size + MiB)
    table = f"label: gpt\nstart={PART_OFFSET // 512}, size={size // 512}, type=linux\n"
    subprocess.run(
        ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(path)],
        input=table,
        text=True,
        check=True,
        capture_output=True,
    )
    mkfs(fstype, path, size, PART_OFFSET)
    with mounted_rw(fstype, path, work, PART_OFFSET, size) as mnt:
        (mnt / "etc").mkdir()
        (mnt / "etc/app.conf").write_bytes(V1)
        (mnt / "etc/hostname").write_bytes(b"web-1\n")
        for k in range(120):  # 120 MiB of data: the blocks a lookup must not fetch
            bulk = mnt / f"opt/bulk/{k // 20}/{k}.bin"
            bulk.parent.mkdir(parents=True, exist_ok=True)
            bulk.write_bytes(hashlib.sha256(b"%d" % k).digest() * (MiB // 32))


def make_volume(directory: Path, fstype: str) -> list[Path]:
    """Three snapshots of one disk: app.conf added (1), modified and late.txt added
    (2), app.conf deleted (3)."""
    work = directory / "mnt"
    size = PART_SIZE[fstype]
    images = [directory / f"{n}.img" for n in (1, 2, 3)]
    _disk(images[0], work, fstype)
    copy_sparse(images[0], images[1])
    with mounted_rw(fstype, images[1], work, PART_OFFSET, size) as mnt:
        (mnt / "etc/app.conf").write_bytes(V2)
        (mnt / "srv").mkdir()
        (mnt / "srv/late.txt").write_bytes(LATE)
    copy_sparse(images[1], images[2])
    with mounted_rw(fstype, images[2], work, PART_OFFSET, size) as mnt:
        (mnt / "etc/app.conf").unlink()
    return images


@pytest.fixture(scope="module", params=["ext4", "xfs", "ntfs"])
def volume_images(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[list[Path]]:
    directory = tmp_path_factory.mktemp(request.param)
    yield make_volume(directory, request.param)
    shutil.rmtree(directory, ignore_errors=True)


def load(emulator: EmulatorServer, images: list[Path]) -> None:
    store = emulator.store
    parent = None
    for snapshot_id, image in zip((S1, S2, S3), images, strict=True):
        store.add_image(snapshot_id, image, parent=parent, volume_id=VOL)
        store.get(snapshot_id).start_time = TIMES[snapshot_id]
        parent = snapshot_id
    store.add_snapshot("snap-0bbb", {0: b"\1" * BLOCK_SIZE}, start_time=T0 - 5)  # another volume


def history(capsys: pytest.CaptureFixture[str], url: str, *args: str) -> tuple[int, str, str]:
    code = cli.main(["history", "--endpoint-url", url, "--ec2-endpoint-url", url, *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def changes(text: str) -> list[str]:
    return [v["change"] for v in json.loads(text)["versions"]]


@needs_fuse
def test_history_of_a_file_added_modified_deleted_and_of_one_added_later(
    volume_images: list[Path], emulator: EmulatorServer, capsys: pytest.CaptureFixture[str]
) -> None:
    load(emulator, volume_images)
    written = len(emulator.store.get(S3).indexes)
    assert written > 240  # 120 MiB of files in 512 KiB blocks, and the metadata

    # --no-hedge: blocks are counted below; a hedge (a slow call asked again) counts twice.
    code, out, err = history(
        capsys, emulator.url, VOL, "/etc/app.conf", "--json", "--hash", "--no-hedge"
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["partition"] == 1 and result["type"] in ("ext4", "xfs", "ntfs")
    rows = result["versions"]
    assert [(r["snapshot_id"], r["change"]) for r in rows] == [
        (S1, "added"),
        (S2, "modified"),
        (S3, "deleted"),
    ]
    assert rows[0]["start_time"] == "2026-05-28T20:26:40.000000000Z"
    assert [r["size"] for r in rows] == [len(V1), len(V2), None]
    assert [r["sha256"] for r in rows] == [
        hashlib.sha256(V1).hexdigest(),
        hashlib.sha256(V2).hexdigest(),
        None,
    ]
    assert "size" in rows[1]["reasons"] and rows[0]["type"] == "file"
    gets = sum(emulator.counters.block_gets.values())
    assert gets < written / 10, f"{gets} calls for {written} blocks"  # metadata, the file
    assert max(emulator.counters.block_gets.values()) == 1  # each block once

    code, out, err = history(capsys, emulator.url, VOL, "srv/late.txt", "--json")
    assert (code, changes(out)) == (0, ["absent", "added", "unchanged"]), err
    assert json.loads(out)["path"] == "/srv/late.txt"

    code, out, err = history(capsys, emulator.url, VOL, "/srv/never/was.txt", "--json")
    assert (code, changes(out)) == (0, ["absent", "absent", "absent"])
    assert err == f"ebsfs: note: /srv/never/was.txt is in none of the 3 snapshots of {VOL}\n"

    code, out, _ = history(capsys, emulator.url, VOL, "/etc/app.conf")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"# /etc/app.conf in partition 1 ({result['type']})"
    assert lines[2].split()[:5] == [S1, "2026-05-28", "20:26:40", "added", "file"]
    assert lines[3].split()[3] == "modified" and lines[4].split()[3] == "deleted"


@needs_fuse
def test_a_snapshot_whose_filesystem_is_damaged_is_one_row_and_the_others_answer(
    volume_images: list[Path],
    emulator: EmulatorServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    damaged = tmp_path / "2-damaged.img"
    copy_sparse(volume_images[1], damaged)
    with open(damaged, "r+b") as f:  # the filesystem's head: superblock and more
        f.seek(PART_OFFSET)
        f.write(bytes(64 * 1024))
    load(emulator, [volume_images[0], damaged, volume_images[2]])
    code, out, err = history(capsys, emulator.url, VOL, "/etc/app.conf", "--json")
    rows = json.loads(out)["versions"]
    assert [r["change"] for r in rows] == ["added", "unreadable", "deleted"]
    assert rows[1]["note"] and rows[1]["size"] is None
    assert code == 1
    assert err == "ebsfs: error: 1 of 3 snapshots could not be read (their rows say why)\n"


@needs_fuse
def test_history_errors_are_one_line(emulator: EmulatorServer, volume_images: list[Path]) -> None:
    load(emulator, volume_images)
    url = ["--endpoint-url", emulator.url, "--ec2-endpoint-url", emulator.url]
    unknown = ebsfs("history", *url, "vol-0dead", "/etc/passwd")
    assert_one_line_error(unknown, "vol-0dead", "no completed snapshot")
    malformed = ebsfs("history", *url, "volume-1", "/etc/passwd")
    assert_one_line_error(malformed, "invalid volume id")
    climbing = ebsfs("history", *url, VOL, "/etc/../etc/passwd")
    assert_one_line_error(climbing, "'..'")


def same_bytes(mounted: Path, image: Path) -> bool:
    """The mounted image holds the image file's bytes, then zeros to the volume's
    whole GiB (read in pieces: the volume is 1 GiB)."""
    piece = 8 * MiB
    with open(mounted, "rb") as got, open(image, "rb") as want:
        assert os.fstat(got.fileno()).st_size == 1024 * MiB
        while True:
            data = got.read(piece)
            if not data:
                return True
            expected = want.read(piece)
            if data != expected + bytes(len(data) - len(expected)):
                return False


@needs_fuse
def test_mount_volume_shows_every_snapshot_and_by_time_links(
    volume_images: list[Path], emulator: EmulatorServer, tmp_path: Path
) -> None:
    load(emulator, volume_images)
    url = emulator.url
    # --no-hedge: the counts below are of blocks fetched once; a hedge (a second call
    # for a slow block) would count twice.
    options = ["--volume", VOL, "--ec2-endpoint-url", url, "--no-hedge"]
    with mounted(url, [], tmp_path / "mnt", *options) as mnt:
        names = sorted(os.listdir(mnt))
        assert names == sorted(
            [f"{s}.img" for s in (S1, S2, S3)]
            + [f"{s}-part1.img" for s in (S1, S2, S3)]
            + [f"{s}.changes" for s in (S2, S3)]
            + ["by-time"]
        )
        links = os.listdir(mnt / "by-time")
        assert links == ["2026-05-28T20:26:40Z", "2026-05-29T20:26:40Z", "2026-05-30T20:26:40Z"]
        assert [os.readlink(mnt / "by-time" / name) for name in links] == [
            f"../{s}.img" for s in (S1, S2, S3)
        ]
        for snapshot_id in (S1, S2, S3):
            image = mnt / f"{snapshot_id}.img"
            assert image.stat().st_mtime == pytest.approx(TIMES[snapshot_id], abs=1e-3)
        # Each read through its link: exact bytes. Each snapshot read after its
        # neighbour fetches only the blocks that changed since it, the rest through
        # the neighbour's cache entries (counted per snapshot: a metadata walk of the
        # one before may still be finishing while the next is read).
        for image, link in zip(volume_images, links, strict=True):
            assert same_bytes(mnt / "by-time" / link, image)
        gets = emulator.counters.block_gets
        store = emulator.store
        fetched = {s: {i for (t, i) in gets if t == s} for s in (S1, S2, S3)}
        assert fetched[S1] == set(store.get(S1).indexes)
        assert fetched[S2] == set(store.changed_indexes(S1, S2))
        assert fetched[S3] == set(store.changed_indexes(S2, S3))
        assert max(gets.values()) == 1


@needs_fuse
def test_mount_volume_refresh_shows_a_snapshot_taken_while_mounted(
    volume_images: list[Path], emulator: EmulatorServer, tmp_path: Path
) -> None:
    load(emulator, volume_images)
    url = emulator.url
    options = ["--volume", VOL, "--ec2-endpoint-url", url, "--refresh", "0.5"]
    with mounted(url, [], tmp_path / "mnt", *options) as mnt:
        assert len(os.listdir(mnt / "by-time")) == 3
        new_block = hashlib.sha256(b"later").digest() * (BLOCK_SIZE // 32)
        s4 = "snap-0a11ce04"
        emulator.store.add_snapshot(s4, {1000: new_block}, parent=S3, start_time=T0 + 3 * 86400)
        deadline = time.monotonic() + 20
        while f"{s4}.img" not in os.listdir(mnt) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert f"{s4}-part1.img" in os.listdir(mnt)
        links = os.listdir(mnt / "by-time")
        assert links[-1] == "2026-05-31T20:26:40Z" and len(links) == 4
        assert os.readlink(mnt / "by-time" / links[-1]) == f"../{s4}.img"
        assert (mnt / f"{s4}.img").stat().st_mtime == T0 + 3 * 86400
        with open(mnt / f"{s4}.img", "rb") as f:
            f.seek(1000 * BLOCK_SIZE)
            assert f.read(BLOCK_SIZE) == new_block
            f.seek(PART_OFFSET)
            with open(volume_images[2], "rb") as g:
                g.seek(PART_OFFSET)
                assert f.read(4 * MiB) == g.read(4 * MiB)
        # Planned with the snapshot before it: its unchanged blocks are the third's.
        assert {i for (s, i) in emulator.counters.block_gets if s == s4} == {1000}


@needs_fuse
def test_mount_volume_refresh_takes_a_deleted_snapshot_away_once_closed(
    volume_images: list[Path], emulator: EmulatorServer, tmp_path: Path
) -> None:
    load(emulator, volume_images)
    url = emulator.url
    options = ["--volume", VOL, "--ec2-endpoint-url", url, "--refresh", "0.3"]
    with mounted(url, [], tmp_path / "mnt", *options) as mnt:
        held = open(mnt / f"{S1}.img", "rb")  # noqa: SIM115 (closed below)
        try:
            emulator.store.delete(S1)
            time.sleep(1.5)  # several refreshes: open, so still there
            assert f"{S1}.img" in os.listdir(mnt)
            assert held.read(4096) == volume_images[0].read_bytes()[:4096]
        finally:
            held.close()
        deadline = time.monotonic() + 20
        while f"{S1}.img" in os.listdir(mnt) and time.monotonic() < deadline:
            time.sleep(0.2)
        names = set(os.listdir(mnt))
        assert not {n for n in names if n.startswith(S1)}
        assert f"{S2}.changes" not in names and f"{S3}.changes" in names
        assert not (mnt / f"{S1}.img").exists()
        assert os.listdir(mnt / "by-time") == ["2026-05-29T20:26:40Z", "2026-05-30T20:26:40Z"]
        # The second no longer shares through the deleted one: all of it reads.
        assert same_bytes(mnt / f"{S2}.img", volume_images[1])


@needs_fuse
def test_mount_volume_errors_are_one_line(emulator: EmulatorServer, tmp_path: Path) -> None:
    emulator.store.add_snapshot("snap-0a", {0: b"\1" * BLOCK_SIZE}, volume_id="vol-0a")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    url = ["--endpoint-url", emulator.url, "--ec2-endpoint-url", emulator.url]
    unknown = ebsfs("mount", *url, "--volume", "vol-0b", str(tmp_path / "mnt"))
    assert_one_line_error(unknown, "vol-0b", "no completed snapshot")
    nothing = ebsfs("mount", *url, str(tmp_path / "mnt"))
    assert_one_line_error(nothing, "nothing to mount")
    no_ec2 = ebsfs(
        "mount", "--endpoint-url", emulator.url, "--volume", "vol-0a", str(tmp_path / "mnt")
    )
    assert_one_line_error(no_ec2, "--ec2-endpoint-url")


def test_a_deleted_name_left_in_its_directory_is_not_found(tmp_path: Path) -> None:
    """ext4 keeps a deleted entry's name in its directory block (merged into the entry
    before it), and The Sleuth Kit lists it, unallocated: the lookup takes allocated
    names only, so a path deleted in a snapshot reads as absent there, not as the
    stale inode it named."""
    from ebsfs.forensics.lookup import lookup
    from tests.disks import build_ext4
    from tests.test_hostile_fsread import FileReader

    image = tmp_path / "fs.img"
    files = {f"etc/{name}.conf": name.encode() * 100 for name in ("a", "b", "c")}
    build_ext4(image, 16 * MiB, files, "del", "5e1f0e5e-0000-4000-8000-000000003001")
    subprocess.run(["debugfs", "-w", "-R", "rm /etc/b.conf", str(image)], check=True)
    listing = subprocess.run(["fls", "-r", str(image)], capture_output=True, text=True).stdout
    assert any(line.endswith("b.conf") and "*" in line for line in listing.splitlines())
    source = FileReader(image)
    try:
        assert lookup(source, ["etc", "b.conf"]).entry is None
        found = lookup(source, ["etc", "c.conf"], hash_data=True)
        assert found.entry is not None
        assert found.sha256 == hashlib.sha256(b"c" * 100).hexdigest()
    finally:
        source.close()
