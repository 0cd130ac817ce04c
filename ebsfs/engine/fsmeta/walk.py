"""The contract between the engine's metadata prefetch and the filesystem walkers.

A walker is an async generator, `walk(read, size)`, over one filesystem of `size`
bytes. It yields *waves*: lists of byte extents `(offset, length)`, relative to the
filesystem's first byte, that hold metadata a tool walking the tree will read (group
descriptors, inode tables in use, directory blocks, extent-tree blocks, AG headers,
inode chunks, the MFT, index blocks). The runner fetches a whole wave in parallel into
the cache and only then resumes the generator, which may now `read` those extents
cheaply (they are cached) to find the next wave. So a walk costs one round trip per
level of the tree, not one per block.

Rules every walker keeps (the filesystem is written by an attacker):
- Bounded work: every loop has a cap (entries, depth, total extents yielded); a value
  that points outside [0, size) or loops back ends that branch. Caps are constants at
  the top of each module.
- Only metadata, never file contents.
- Damage is not an error of ours: raise `WalkStopped` with a short reason and the
  runner logs it and stops; anything else raised is a bug (logged with its traceback,
  still never failing a read).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

Read = Callable[[int, int], Awaitable[bytes]]
"""(offset, length) within the filesystem -> exactly those bytes (short only past the
end). Backed by the engine's cache: reading what a wave announced costs no call."""

Extent = tuple[int, int]
"""(offset, length) in bytes, relative to the filesystem's first byte."""

Wave = list[Extent]


FileRun = Callable[[int, int], None]
"""(offset, length) in bytes, relative to the filesystem's first byte: one contiguous
piece of a regular file's data, which a reader starting at `offset` reads through.
Told to the engine so that such a reader's read-ahead takes the whole piece at once
instead of growing toward it a round trip at a time (issue 25: `icat` of a 16 MiB
file waited five round trips)."""


class WalkStopped(Exception):
    """The walk cannot go on (damaged, hostile or unsupported metadata): why, in words."""


class Walker(Protocol):
    """One filesystem type."""

    name: str
    """"ext4", "xfs", "ntfs": what the log and `ebsfs stats` call it."""

    def probe(self, head: bytes) -> bool:
        """Whether `head` (the filesystem's first 64 KiB) is this filesystem."""
        ...

    def walk(self, read: Read, size: int) -> AsyncIterator[Wave]:
        """The metadata, wave by wave (see the module docstring)."""
        ...


class RunReporter(Walker, Protocol):
    """A walker that also tells where large files' data lies, from the extents it
    parses anyway (never by reading more): `file_run` is called for each piece long
    enough to span image blocks (FILE_RUN_MIN bytes or more)."""

    reports_file_runs: bool

    def walk(
        self, read: Read, size: int, file_run: FileRun | None = None
    ) -> AsyncIterator[Wave]: ...


FILE_RUN_MIN = 1024 * 1024
"""Pieces of file data shorter than this are not told: read-ahead's own ramp covers
them within a round trip or two."""


HEAD_SIZE = 65536
"""Bytes a probe is given: enough for every superblock / boot sector we know."""
