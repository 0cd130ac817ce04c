"""What the filesystem walkers' tests share (issue 25): the one runner of a walker over
a local image (a file, or bytes with damage laid over them) with no engine, the byte
ranges a forensic library reads through fsread, and both as sets of 512 KiB snapshot
blocks, so a walker is checked against an independent parser rather than against
itself."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ebsfs.constants import BLOCK_SIZE
from ebsfs.engine.fsmeta.walk import HEAD_SIZE, Extent, Walker, WalkStopped, Wave
from ebsfs.forensics import fsread

MARKER = b"FILEDATA"
"""What large test files are filled with: a snapshot block of nothing else is content."""


@dataclass
class WalkResult:
    """A walker's waves in order, every read it made, what it read that no earlier wave
    announced, and how it ended."""

    waves: list[list[Extent]] = field(default_factory=list)
    unannounced: list[Extent] = field(default_factory=list)
    reads: list[Extent] = field(default_factory=list)
    stopped: str | None = None
    seconds: float = 0.0

    @property
    def extents(self) -> list[Extent]:
        return [extent for wave in self.waves for extent in wave]

    @property
    def total(self) -> int:
        """Bytes yielded, overlaps counted once per wave."""
        return sum(length for _, length in self.extents)


class Image:
    """An image to walk or to hand a library (fsread's PositionalReader): a file or
    bytes, `size` bytes long (zeros past the bytes given, as a sparse file reads), with
    patches laid over what is read, so damage needs no copy of the image, and every
    range read noted, for what a library reads."""

    def __init__(self, source: Path | bytes, size: int | None = None) -> None:
        self._source = source
        given = source.stat().st_size if isinstance(source, Path) else len(source)
        self.size = given if size is None else size
        self.patches: list[tuple[int, bytes]] = []
        self.reads: list[Extent] = []

    def pread(self, size: int, offset: int) -> bytes:
        size = max(0, min(size, self.size - offset))
        self.reads.append((offset, size))
        if isinstance(self._source, Path):
            fd = os.open(self._source, os.O_RDONLY)
            try:
                data = bytearray(os.pread(fd, size, offset))
            finally:
                os.close(fd)
        else:
            data = bytearray(self._source[offset : offset + size])
        data.extend(bytes(size - len(data)))
        for at, patch in self.patches:
            lo, hi = max(at, offset), min(at + len(patch), offset + size)
            if lo < hi:
                data[lo - offset : hi - offset] = patch[lo - at : hi - at]
        return bytes(data)


def _covered(offset: int, length: int, known: list[Extent]) -> bool:
    return any(o <= offset and offset + length <= o + n for o, n in known)


def run_walker(
    walker: Walker,
    image: Path | fsread.PositionalReader,
    offset: int = 0,
    size: int | None = None,
    *,
    probe: bool = False,
) -> WalkResult:
    """Walk the filesystem at `offset` of `image` (a file read with os.pread, or an
    Image), with no engine, as the runner would: the head counts as fetched, each wave
    is announced before the walker resumes; with `probe`, the walker must first claim
    the head, as the runner asks before walking. Every read and every extent yielded
    must lie inside [0, size) (an AssertionError otherwise: a walker bug)."""
    if isinstance(image, Path):
        fd = os.open(image, os.O_RDONLY)
        try:
            whole = os.fstat(fd).st_size
            return _run(walker, lambda n, at: os.pread(fd, n, at), whole, offset, size, probe)
        finally:
            os.close(fd)
    return _run(walker, image.pread, image.size, offset, size, probe)


def _run(
    walker: Walker,
    pread: Callable[[int, int], bytes],
    whole: int,
    offset: int,
    size: int | None,
    probe: bool,
) -> WalkResult:
    size = whole - offset if size is None else size
    result = WalkResult()
    known: list[Extent] = [(0, min(HEAD_SIZE, size))]

    async def read(at: int, length: int) -> bytes:
        assert at >= 0 and length >= 0 and at + length <= size, (at, length, size)
        result.reads.append((at, length))
        if not _covered(at, length, known):
            result.unannounced.append((at, length))
        return pread(length, offset + at)

    async def drive() -> None:
        async for wave in walker.walk(read, size):
            for at, length in wave:
                assert at >= 0 and length > 0 and at + length <= size, (at, length, size)
            result.waves.append(wave)
            known.extend(wave)

    if probe:
        assert walker.probe(pread(min(HEAD_SIZE, size), offset)), f"not {walker.name}"
    start = time.monotonic()
    try:
        trio.run(drive)
    except WalkStopped as err:
        result.stopped = str(err) or "WalkStopped"
    finally:
        result.seconds = time.monotonic() - start
    return result


class RecordingReader:
    """A PositionalReader over a file (or a window of it) that remembers every range
    read, for fsread.read_tree."""

    def __init__(self, path: Path, offset: int = 0, size: int | None = None) -> None:
        self._path = path
        self._offset = offset
        self.size = os.path.getsize(path) - offset if size is None else size
        self.ranges: list[Extent] = []

    def pread(self, size: int, offset: int) -> bytes:
        size = max(0, min(size, self.size - offset))
        self.ranges.append((offset, size))
        with open(self._path, "rb") as f:
            return os.pread(f.fileno(), size, self._offset + offset)


def library_reads(path: Path, offset: int = 0, size: int | None = None) -> list[Extent]:
    """The byte ranges fsread's libraries (pytsk3, libfsxfs) read to list every file
    with its metadata and extents, as `diff --files` does."""
    reader = RecordingReader(path, offset, size)
    fsread.read_tree(reader)
    return reader.ranges


def blocks_of(extents: Iterable[Extent]) -> set[int]:
    """The 512 KiB snapshot blocks a set of byte ranges touches."""
    blocks: set[int] = set()
    for offset, length in extents:
        if length > 0:
            blocks.update(range(offset // BLOCK_SIZE, (offset + length - 1) // BLOCK_SIZE + 1))
    return blocks


def content_blocks(path: Path, offset: int = 0, size: int | None = None) -> set[int]:
    """Snapshot blocks holding nothing but MARKER: file content, never metadata."""
    size = os.path.getsize(path) - offset if size is None else size
    full = MARKER * (BLOCK_SIZE // len(MARKER))
    found = set()
    with open(path, "rb") as f:
        for block in range(size // BLOCK_SIZE):
            if os.pread(f.fileno(), BLOCK_SIZE, offset + block * BLOCK_SIZE) == full:
                found.add(block)
    return found


def marker_file(size: int) -> bytes:
    """A large file's content: MARKER repeated."""
    return (MARKER * (size // len(MARKER) + 1))[:size]


def scribble(image: bytes, extents: list[Extent], seed: int, pieces: int = 40) -> bytes:
    """A copy of `image` with random bytes written over random pieces (1 byte to 4 KiB)
    of the given metadata extents: damage an attacker or a bad disk could cause."""
    rng = random.Random(seed)
    data = bytearray(image)
    for _ in range(pieces):
        at, length = rng.choice(extents)
        start = at + rng.randrange(length)
        span = min(rng.choice((1, 4, 16, 256, 4096)), len(data) - start)
        data[start : start + span] = rng.randbytes(span)
    return bytes(data)


def told_runs(walker: Any, path: Path) -> tuple[list[Extent], list[Wave]]:
    """A walk of the filesystem in `path` with a file_run listener (walkers that
    report large files' runs, walk.py RunReporter): the runs told, and the waves."""
    told: list[Extent] = []
    waves: list[Wave] = []
    data = path.read_bytes()

    async def read(offset: int, length: int) -> bytes:
        return data[offset : offset + length]

    async def drive() -> None:
        async for wave in walker.walk(read, len(data), lambda o, n: told.append((o, n))):
            waves.append(wave)

    trio.run(drive)
    return told, waves
