"""What differs between two snapshots of one volume, from ListChangedBlocks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ebsfs import BLOCK_SIZE
from ebsfs.client import ChangedBlock, EbsApi
from ebsfs.errors import InvalidPageToken


@dataclass
class ChangedRange:
    """Adjacent changed blocks [first_block, last_block] as bytes [offset, offset+length)."""

    first_block: int
    last_block: int
    block_size: int = BLOCK_SIZE

    @property
    def offset(self) -> int:
        return self.first_block * self.block_size

    @property
    def length(self) -> int:
        return (self.last_block - self.first_block + 1) * self.block_size


@dataclass
class Diff:
    first: str
    second: str
    volume_size: int
    block_size: int
    changed_blocks: list[int] = field(default_factory=list)
    only_in_first: int = 0
    """Changed blocks the second snapshot does not hold (they read as zeros there)."""
    only_in_second: int = 0
    """Changed blocks the first snapshot did not hold."""
    list_calls: int = 0

    def record(self, change: ChangedBlock) -> None:
        """Add one ListChangedBlocks entry (in ascending order)."""
        self.changed_blocks.append(change.index)
        self.only_in_first += change.second_token is None
        self.only_in_second += change.first_token is None

    def ranges(self) -> list[ChangedRange]:
        merged: list[ChangedRange] = []
        for index in self.changed_blocks:
            if merged and merged[-1].last_block == index - 1:
                merged[-1].last_block = index
            else:
                merged.append(ChangedRange(index, index, self.block_size))
        return merged

    @property
    def changed_bytes(self) -> int:
        return len(self.changed_blocks) * self.block_size

    def as_json(self) -> dict[str, Any]:
        return {
            "first": self.first,
            "second": self.second,
            "block_size": self.block_size,
            "volume_size": self.volume_size,
            "changed_blocks": self.changed_blocks,
            "changed_bytes": self.changed_bytes,
            "only_in_first": self.only_in_first,
            "only_in_second": self.only_in_second,
            "ranges": [
                {"offset": r.offset, "length": r.length, "first_block": r.first_block,
                 "last_block": r.last_block}
                for r in self.ranges()
            ],
        }

    def as_text(self) -> str:
        lines = [
            f"{self.first} -> {self.second}: {len(self.changed_blocks)} blocks changed, "
            f"{human(self.changed_bytes)} of a {human(self.volume_size)} volume, "
            f"in {len(self.ranges())} ranges",
        ]
        if self.only_in_first or self.only_in_second:
            lines.append(f"  {self.only_in_second} blocks written only in {self.second}, "
                         f"{self.only_in_first} present only in {self.first}")
        if self.changed_blocks:
            lines.append(f"{'offset':>16} {'length':>14}  blocks")
        for r in self.ranges():
            blocks = (f"{r.first_block}" if r.first_block == r.last_block
                      else f"{r.first_block}-{r.last_block}")
            lines.append(f"{r.offset:>16} {r.length:>14}  {blocks}")
        return "\n".join(lines)


def human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def diff_snapshots(api: EbsApi, first: str, second: str) -> Diff:
    """Page ListChangedBlocks to the end (short and empty pages included)."""
    page = api.list_changed_blocks(first, second)
    result = Diff(first, second, page.volume_size, page.block_size)
    while True:
        result.list_calls += 1
        for change in page.changes:  # ascending, and a restart resumes past the last one
            result.record(change)
        if page.next_token is None:
            break
        try:
            page = api.list_changed_blocks(first, second, next_token=page.next_token)
        except InvalidPageToken:  # expired after 60 minutes: resume after what we have
            start = result.changed_blocks[-1] + 1 if result.changed_blocks else 0
            page = api.list_changed_blocks(first, second, start_index=start)
    return result
