"""What differs between two snapshots of one volume, from ListChangedBlocks.

Memory stays the same whatever the volume (a 16 TiB volume has 33 million blocks):
changed blocks are merged into ranges as they arrive, closed ranges go to a temporary
file (in memory up to 1 MiB, then on disk), and output is written from that file."""

from __future__ import annotations

import io
import json
import struct
import tempfile
from collections.abc import Iterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import IO, Protocol

from ebsfs.constants import BLOCK_SIZE
from ebsfs.engine.index import Page, pages
from ebsfs.engine.remote import RemoteSnapshots
from ebsfs.service.api import ChangedBlock

_RANGE = struct.Struct("<QQ")
SPOOL_IN_MEMORY = 1024 * 1024
"""Bytes of closed ranges (16 each) kept in memory before they go to a temporary file."""


class TextSink(Protocol):
    def write(self, text: str, /) -> object: ...


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


class Diff:
    """Changed blocks recorded in ascending order; counts, ranges, text and JSON."""

    def __init__(self, first: str, second: str, volume_size: int, block_size: int) -> None:
        self.first = first
        self.second = second
        self.volume_size = volume_size
        self.block_size = block_size
        self.changed_count = 0
        self.range_count = 0
        self.only_in_first = 0
        """Changed blocks the second snapshot does not hold (they read as zeros there)."""
        self.only_in_second = 0
        """Changed blocks the first snapshot did not hold."""
        self.list_calls = 0
        self.last_index: int | None = None
        self._open: list[int] | None = None
        """The range still growing: [first_block, last_block]."""
        # Lives as long as the Diff: closed when the Diff is collected.
        self._closed = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)  # noqa: SIM115

    def record(self, change: ChangedBlock) -> None:
        """Add one ListChangedBlocks entry. Entries come in ascending order; one at or
        below the last recorded index (a repeat) is ignored."""
        index = change.index
        if self.last_index is not None and index <= self.last_index:
            return
        self.last_index = index
        self.changed_count += 1
        self.only_in_first += change.second_token is None
        self.only_in_second += change.first_token is None
        if self._open is not None and self._open[1] == index - 1:
            self._open[1] = index
            return
        if self._open is not None:
            self._closed.write(_RANGE.pack(*self._open))
        self._open = [index, index]
        self.range_count += 1

    def ranges(self) -> Iterator[ChangedRange]:
        """The merged ranges in ascending order, read back from the spool."""
        self._closed.seek(0)
        try:
            while chunk := self._closed.read(_RANGE.size * 4096):
                for first, last in _RANGE.iter_unpack(chunk):
                    yield ChangedRange(first, last, self.block_size)
        finally:
            self._closed.seek(0, 2)  # recording may go on after a partial iteration
        if self._open is not None:
            yield ChangedRange(self._open[0], self._open[1], self.block_size)

    @property
    def changed_bytes(self) -> int:
        return self.changed_count * self.block_size

    def write_json(self, out: TextSink) -> None:
        """One JSON object, written piece by piece (never built whole in memory)."""
        head = {
            "first": self.first,
            "second": self.second,
            "block_size": self.block_size,
            "volume_size": self.volume_size,
            "changed_bytes": self.changed_bytes,
            "only_in_first": self.only_in_first,
            "only_in_second": self.only_in_second,
        }
        out.write(json.dumps(head)[:-1] + ', "changed_blocks": [')
        separator = ""
        for r in self.ranges():
            for start in range(r.first_block, r.last_block + 1, 4096):
                stop = min(start + 4096, r.last_block + 1)
                out.write(separator + ", ".join(map(str, range(start, stop))))
                separator = ", "
        out.write('], "ranges": [')
        separator = ""
        for r in self.ranges():
            out.write(
                f'{separator}{{"offset": {r.offset}, "length": {r.length}, '
                f'"first_block": {r.first_block}, "last_block": {r.last_block}}}'
            )
            separator = ", "
        out.write("]}\n")

    def write_text(self, out: TextSink) -> None:
        """A summary line, then one line per range."""
        out.write(
            f"{self.first} -> {self.second}: {self.changed_count} blocks changed, "
            f"{human(self.changed_bytes)} of a {human(self.volume_size)} volume, "
            f"in {self.range_count} ranges\n"
        )
        if self.only_in_first or self.only_in_second:
            out.write(
                f"  {self.only_in_second} blocks written only in {self.second}, "
                f"{self.only_in_first} present only in {self.first}\n"
            )
        if self.changed_count:
            out.write(f"{'offset':>16} {'length':>14}  blocks\n")
        for r in self.ranges():
            blocks = (
                f"{r.first_block}"
                if r.first_block == r.last_block
                else f"{r.first_block}-{r.last_block}"
            )
            out.write(f"{r.offset:>16} {r.length:>14}  {blocks}\n")

    def text_file(self) -> IO[bytes]:
        """`write_text` into a temporary file (in memory up to 1 MiB), positioned at 0:
        what the mount serves as `<id>.changes`. Seconds of work for millions of
        ranges: call it from a worker thread."""
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)  # noqa: SIM115 (returned)
        text = io.TextIOWrapper(spool, encoding="utf-8")
        self.write_text(text)
        text.flush()
        text.detach()
        spool.seek(0)
        return spool


def human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


async def diff_snapshots(remote: RemoteSnapshots, first: str, second: str) -> Diff:
    """ListChangedBlocks to the end (short and empty pages included), through the one
    paging loop of index.py."""
    sizes: list[tuple[int, int]] = []
    """(volume size, block size) of each page: the Diff needs them before any entry."""

    async def fetch_noting_size(start: int, next_token: str | None) -> Page[ChangedBlock]:
        page = await remote.list_changed_blocks(
            first, second, start_index=start, next_token=next_token
        )
        sizes.append((page.volume_size, page.block_size))
        return [(c.index, c) for c in page.changes], page.next_token, page.expiry

    result: Diff | None = None
    async with aclosing(pages(fetch_noting_size, 0, f"{first}..{second}")) as listing:
        async for entries, _, _ in listing:
            if result is None:
                result = Diff(first, second, *sizes[0])
            result.list_calls += 1
            for _, change in entries:  # ascending; a restart resumes past the last one
                result.record(change)
    assert result is not None  # pages yields at least one page or raises
    return result
