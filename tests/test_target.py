"""Where `get` writes: whole aligned blocks go to a file with O_DIRECT (the image stays
out of the page cache), anything O_DIRECT refuses takes the ordinary path, and the
bytes on disk are right either way."""

from __future__ import annotations

import errno
import mmap
import os
import subprocess
from pathlib import Path

import pytest

from ebsfs.acquire import target as target_module
from ebsfs.acquire.target import DirectWrites, FileTarget
from ebsfs.constants import BLOCK_SIZE
from tests.fakes import pattern_block


def aligned(data: bytes) -> memoryview:
    """`data` in page-aligned memory, as blocks arrive in the engine's cache slabs."""
    room = mmap.mmap(-1, len(data))
    room[:] = data
    return memoryview(room)


def resident_bytes(path: Path) -> int:
    """Bytes of the file in the page cache (util-linux fincore)."""
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out.split()[0])


def test_aligned_blocks_are_written_direct_and_stay_out_of_the_page_cache(tmp_path: Path) -> None:
    blocks = {i: pattern_block(31, i) for i in (0, 3, 4, 9)}
    out = tmp_path / "disk.img"
    target = FileTarget(str(out), 16 * BLOCK_SIZE)
    if target.direct.fd < 0:
        target.close()
        pytest.skip(f"{tmp_path} has no O_DIRECT")
    try:
        for i, data in blocks.items():
            target.write(i * BLOCK_SIZE, aligned(data))
        assert target.direct.write(15 * BLOCK_SIZE, aligned(blocks[0])) == BLOCK_SIZE
        target.finish()
        part = Path(target.part)
        assert resident_bytes(part) < BLOCK_SIZE  # not 2 MiB of copied pages
        for i, data in blocks.items():
            assert target.read(i * BLOCK_SIZE, BLOCK_SIZE) == data
        assert target.read(BLOCK_SIZE, BLOCK_SIZE) == bytes(BLOCK_SIZE)
    finally:
        target.close()


def test_unaligned_data_takes_the_buffered_path(tmp_path: Path) -> None:
    out = tmp_path / "disk.img"
    target = FileTarget(str(out), 8 * BLOCK_SIZE)
    try:
        block = pattern_block(32, 1)
        odd = memoryview(b"x" + block)[1:]  # one byte past an allocation: never aligned
        assert target.direct.write(BLOCK_SIZE, odd) == 0
        target.write(BLOCK_SIZE, odd)
        target.write(2 * BLOCK_SIZE, aligned(pattern_block(32, 2)))
        target.write(3 * BLOCK_SIZE + 5, b"tail")  # an unaligned offset
        target.finish()
        assert target.read(BLOCK_SIZE, BLOCK_SIZE) == block
        assert target.read(2 * BLOCK_SIZE, BLOCK_SIZE) == pattern_block(32, 2)
        assert target.read(3 * BLOCK_SIZE, 9) == b"\0" * 5 + b"tail"
    finally:
        target.close()


def test_a_file_system_without_o_direct_gets_buffered_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def no_direct(path: str, flags: int, *args: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(target_module.os, "open", no_direct)
    out = tmp_path / "disk.img"
    target = FileTarget(str(out), 4 * BLOCK_SIZE)
    try:
        assert target.direct.fd == -1
        target.write(0, aligned(pattern_block(33, 0)))
        target.finish()
        assert target.read(0, BLOCK_SIZE) == pattern_block(33, 0)
    finally:
        target.close()


def test_direct_write_errors_other_than_alignment_are_not_hidden(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes = DirectWrites(str(tmp_path / "x"), os.O_WRONLY | os.O_CREAT)
    if writes.fd < 0:
        pytest.skip(f"{tmp_path} has no O_DIRECT")

    def full(fd: int, data: object, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(target_module.os, "pwrite", full)
    try:
        with pytest.raises(OSError) as caught:
            writes.write(0, aligned(bytes(4096)))
        assert caught.value.errno == errno.ENOSPC
    finally:
        writes.close()
