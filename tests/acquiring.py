"""Helpers for the acquisition tests: snapshots with computable bytes, their expected
digests, and a way to start an `ebsfs get` process and stop it part way."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from ebsfs.constants import BLOCK_SIZE, GIB
from ebsfs.emulator import EmulatorServer, SnapshotStore
from tests.fakes import pattern_block

ZEROS = bytes(8 * 1024**2)


def sparse_blocks(seed: int, volume_gib: int = 2, every: int = 13) -> dict[int, bytes]:
    """A dense run at the start (a partition table and a file system's head), one in
    the middle, and scattered blocks: most of the volume never written."""
    count = volume_gib * GIB // BLOCK_SIZE
    indexes = set(range(0, 40)) | set(range(count // 2, count // 2 + 60))
    indexes |= set(range(41, count, every * 7)) | {count - 1}
    return {i: pattern_block(seed, i) for i in sorted(indexes)}


def add(
    store: SnapshotStore,
    snapshot_id: str,
    blocks: Mapping[int, bytes],
    volume_gib: int = 2,
    parent: str | None = None,
) -> None:
    store.add_snapshot(snapshot_id, blocks, volume_size_gib=volume_gib, parent=parent)


def image_of(store: SnapshotStore, snapshot_id: str) -> dict[int, bytes]:
    snap = store.get(snapshot_id)
    return {i: bytes(b.data()) for i, b in snap.blocks.items()}


def digests(blocks: Mapping[int, bytes], volume_size: int) -> tuple[str, str]:
    """SHA-256 and MD5 of the whole image, zeros streamed (never built whole)."""
    sha, md5 = hashlib.sha256(), hashlib.md5()
    position = 0
    for index in sorted(blocks):
        offset = index * BLOCK_SIZE
        _zeros(sha, md5, offset - position)
        sha.update(blocks[index])
        md5.update(blocks[index])
        position = offset + BLOCK_SIZE
    _zeros(sha, md5, volume_size - position)
    return sha.hexdigest(), md5.hexdigest()


def _zeros(sha: hashlib._Hash, md5: hashlib._Hash, length: int) -> None:
    while length > 0:
        piece = min(length, len(ZEROS))
        sha.update(ZEROS[:piece])
        md5.update(ZEROS[:piece])
        length -= piece


def file_digest(path: Path | str, size: int | None = None) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        left = size
        while left is None or left > 0:
            chunk = f.read(8 * 1024**2 if left is None else min(8 * 1024**2, left))
            if not chunk:
                break
            sha.update(chunk)
            if left is not None:
                left -= len(chunk)
    return sha.hexdigest()


def gets(server: EmulatorServer, snapshot_id: str | None = None) -> int:
    """GetSnapshotBlock calls the emulator answered (of one snapshot, or all)."""
    total = 0
    for (snap, _), n in server.counters.block_gets.items():
        if snapshot_id is None or snap == snapshot_id:
            total += n
    return total


def start_get(*args: str) -> subprocess.Popen[str]:
    """`ebsfs get` in the background, hearing SIGINT as a terminal's Ctrl-C: a job a
    shell put in the background (`cmd &`, as a CI runner or nohup may start the tests)
    has SIGINT ignored, its children inherit that, and Python then leaves it ignored
    (the Ctrl-C test's get ran to its end). A handler, unlike SIG_IGN, is not
    inherited across exec: the child starts with SIGINT at its default."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "ebsfs", "get", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        signal.signal(signal.SIGINT, previous)


def stop_when(
    proc: subprocess.Popen[str], condition: Callable[[], bool], signal_no: int, timeout: float = 60
) -> None:
    """Send `signal_no` to `proc` once `condition()` holds; fail if it ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the get ended before it could be stopped: {proc.stderr!r}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the condition never held")
        time.sleep(0.01)
    proc.send_signal(signal_no)
