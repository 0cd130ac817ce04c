"""What the NBD server exports: each snapshot by its id and each of its partitions as
`<id>-part<N>` (the windows the mount shows as files), and which of their bytes the
snapshot wrote, from the block index (NBD's `base:allocation`)."""

from __future__ import annotations

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
    export: Export, offset: int, length: int, timeout: float
) -> list[tuple[int, bool]]:
    """Runs of (bytes, written) from `offset` of the export, in order, covering
    [offset, offset+length) or less: at most up to the end of the index chunk that
    holds `offset` (one listing, at most 8192 blocks walked), as NBD lets a reply
    cover less than asked. The caller keeps the range inside the export. A block the
    snapshot never wrote reads as zeros; every other block is data (even if it holds
    zeros: only the index is asked, no block is read)."""
    index = export.image.index
    at = export.start + offset
    end = at + length
    first = at // BLOCK_SIZE
    chunk_no = index.chunk_of(first)
    chunk_end = min((chunk_no + 1) * index.chunk_blocks, index.volume_blocks) * BLOCK_SIZE
    end = min(end, chunk_end)
    with trio.move_on_after(timeout):
        items = await index.chunk_items(chunk_no)
        written = {i for i, _ in items}
        runs: list[tuple[int, bool]] = []
        while at < end:
            block = at // BLOCK_SIZE
            step = min((block + 1) * BLOCK_SIZE, end) - at
            state = block in written
            if runs and runs[-1][1] == state:
                runs[-1] = (runs[-1][0] + step, state)
            else:
                runs.append((step, state))
            at += step
        return runs
    raise ReadFailed(f"{export.name}: listing the blocks at {offset} took over {timeout:g}s")
