"""Honest sizes: st_blocks (du, ls -s, stat) of an image or partition file is the bytes
of the blocks the snapshot wrote, from the block index; never less than the truth while
the index is not listed yet."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import trio

from ebsfs.constants import BLOCK_SIZE
from ebsfs.emulator import EmulatorServer
from ebsfs.emulator.diskimage import build_disk, demo_files
from ebsfs.emulator.faults import Faults
from ebsfs.emulator.store import SnapshotStore
from ebsfs.engine.index import BlockIndex
from ebsfs.engine.remote import RemoteSnapshots
from ebsfs.service.api import BlockPage
from tests.fakes import StoreApi
from tests.mounting import mounted, needs_fuse

B = BLOCK_SIZE
WRITTEN = [0, 1, 5, 9, 10, 11]


def index_over(first_page: BlockPage | None = None) -> BlockIndex:
    store = SnapshotStore(Faults(seed=1))
    store.add_snapshot("snap-01", {i: bytes([i + 1]) * B for i in WRITTEN}, volume_size_gib=1)
    api = StoreApi(store)
    remote = RemoteSnapshots(api, max_fetches=4)
    return BlockIndex(remote, "snap-01", 16, first_page=first_page, chunk_blocks=4)


def test_unlisted_chunks_count_in_full_and_listed_ones_exactly() -> None:
    index = index_over()
    assert index.listed_bytes(0, 16 * B, B) == 16 * B  # nothing listed: all of it
    assert index.listed_bytes(B // 2, 3 * B, B) == 3 * B - B // 2

    # Listing from block 4 proves chunks 1-3 (the listing ends); chunk 0 still counts full.
    trio.run(index.get, 5)
    assert index.listed_bytes(0, 16 * B, B) == (4 + 1 + 3) * B
    trio.run(index.get, 0)
    assert index.listed_bytes(0, 16 * B, B) == len(WRITTEN) * B
    assert index.listed_bytes(4 * B, 8 * B, B) == B
    # Windows that start and end mid-block count only their part of a written block.
    assert index.listed_bytes(B + 100, 5 * B + 50, B) == (B - 100) + 50
    assert index.listed_bytes(2 * B, 5 * B, B) == 0
    assert index.listed_bytes(3 * B, 3 * B, B) == 0


def test_the_checks_first_page_makes_the_count_known_at_once() -> None:
    store = SnapshotStore(Faults(seed=1))
    store.add_snapshot("snap-01", {i: bytes([i + 1]) * B for i in WRITTEN}, volume_size_gib=1)
    api = StoreApi(store)
    whole = api.list_snapshot_blocks("snap-01")
    assert whole.next_token is None
    index = BlockIndex(RemoteSnapshots(api, max_fetches=4), "snap-01", 16, whole, chunk_blocks=4)
    assert index.listed_bytes(0, 16 * B, B) == len(WRITTEN) * B
    # A first page that ends early proves only the chunks up to its last entry.
    short = dataclasses.replace(whole, blocks=whole.blocks[:4], next_token="more")  # 0 1 5 9
    index = BlockIndex(RemoteSnapshots(api, max_fetches=4), "snap-01", 16, short, chunk_blocks=4)
    assert index.listed_bytes(0, 8 * B, B) == 3 * B  # chunks 0 and 1: proven
    assert index.listed_bytes(8 * B, 16 * B, B) == 8 * B  # chunk 2 only in part: all
    assert api.calls["ListSnapshotBlocks"] == 1  # the page above, no more


@needs_fuse
def test_du_on_a_mounted_image_is_the_written_bytes(
    emulator: EmulatorServer, tmp_path: Path
) -> None:
    disk = tmp_path / "disk.img"
    build_disk(disk, 64 * 1024 * 1024, demo_files(blob_mib=3))
    snap = emulator.store.add_image("snap-0d0", disk)
    written = sorted(snap.blocks)
    dump = subprocess.run(["sfdisk", "--json", str(disk)], capture_output=True, text=True)
    part = json.loads(dump.stdout)["partitiontable"]["partitions"][0]
    start, end = part["start"] * 512, (part["start"] + part["size"]) * 512
    in_part = sum(
        min(end, (b + 1) * B) - max(start, b * B)
        for b in written
        if start < (b + 1) * B and b * B < end
    )
    with mounted(emulator.url, ["snap-0d0"], tmp_path / "mnt") as mnt:
        du = subprocess.run(
            ["du", "-B1", str(mnt / "snap-0d0.img"), str(mnt / "snap-0d0-part1.img")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        image_bytes, part_bytes = int(du[0]), int(du[2])
        assert abs(image_bytes - len(written) * B) < B
        assert abs(part_bytes - in_part) < B
        assert (mnt / "snap-0d0.img").stat().st_size == 1024**3  # the size stays the volume's
