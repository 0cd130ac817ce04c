"""What the NBD server exports: each snapshot by its id and each of its partitions as
`<id>-part<N>` (the windows the mount shows as files), and which of their bytes the
snapshot wrote, from the block index (NBD's `base:allocation`)."""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import trio

from ebsfs.constants import BLOCK_SIZE
from ebsfs.engine.engine import Engine
from ebsfs.engine.image import SnapshotImage
from ebsfs.errors import ReadFailed


@dataclass(frozen=True)
class Export:
    """Bytes [start, start+size) of a snapshot's image, under a name."""

    name: str
    image: SnapshotImage
    start: int
    size: int
    description: str


async def snapshot_exports(engine: Engine) -> dict[str, Export]:
    """Every export of the engine's snapshots, in the order the mount lists its files."""
    exports: dict[str, Export] = {}
    for snapshot_id, image in engine.images.items():
        exports[snapshot_id] = Export(
            snapshot_id, image, 0, image.size, f"snapshot {snapshot_id}, whole disk"
        )
        for p in await engine.partitions(snapshot_id):
            name = f"{snapshot_id}-part{p.number}"
            exports[name] = Export(
                name, image, p.offset, p.size, f"partition {p.number} of {snapshot_id}"
            )
    return exports


async def allocation(
    export: Export, offset: int, length: int, timeout: float, most: int | None = None
) -> list[tuple[int, bool]]:
    """Runs of (bytes, written) from `offset` of the export, in order, covering
    [offset, offset+length) or less: at most up to the end of the index chunk that
    holds `offset` (one listing), and at most `most` runs, as NBD lets a reply cover
    less than asked. The caller keeps the range inside the export. A block the
    snapshot never wrote reads as zeros; every other block is data (even if it holds
    zeros: only the index is asked, no block is read). Costs a bisection and a step
    per written block of the runs returned: qemu asks for one run at a time."""
    index = export.image.index
    at = export.start + offset
    end = at + length
    block = at // BLOCK_SIZE
    chunk_no = index.chunk_of(block)
    chunk_end = min((chunk_no + 1) * index.chunk_blocks, index.volume_blocks)
    end = min(end, chunk_end * BLOCK_SIZE)
    with trio.move_on_after(timeout):
        listed = await index.listed(chunk_no)
        runs: list[tuple[int, bool]] = []
        i = bisect.bisect_left(listed, block)
        while at < end and (most is None or len(runs) < most):
            if i < len(listed) and listed[i] == block:  # a written run: as far as it goes
                while i + 1 < len(listed) and listed[i + 1] == listed[i] + 1:
                    i += 1
                block, i, written = listed[i] + 1, i + 1, True
            else:  # a hole, up to the next written block
                block, written = (listed[i] if i < len(listed) else chunk_end), False
            step = min(block * BLOCK_SIZE, end) - at
            runs.append((step, written))
            at += step
        return runs
    raise ReadFailed(f"{export.name}: listing the blocks at {offset} took over {timeout:g}s")
