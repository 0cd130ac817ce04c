"""What an unfinished `ebsfs get` keeps beside its output, so that running the same
command again fetches only what is missing.

Two small files with the stem of the output (`disk.img.part.json`, `.part.sums`):
the state (which snapshot, when the copy started, how far a device was zeroed), and
the SHA-256 of every block written so far, 32 bytes at offset index * 32 of a sparse
file. A block's record is written (one pwrite) right after the block itself, so a
SIGKILL loses at most the blocks in flight; a record whose block did not reach the
disk (a power cut) is caught on resume, which re-reads every recorded block and
checks it against its record before trusting it. Random access keeps memory flat: no
list of blocks is ever held, whatever the volume."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from typing import Any

from ebsfs.acquire.manifest import write_json_atomic
from ebsfs.errors import OutputError

RECORD = 32
_EMPTY = bytes(RECORD)


class Journal:
    """The resume record of one output. Locked while a run uses it: a second `get`
    into the same output fails instead of interleaving writes."""

    def __init__(self, stem: str) -> None:
        self.state_path = stem + ".part.json"
        self.sums_path = stem + ".part.sums"
        self._fd: int | None = None

    def exists(self) -> bool:
        return os.path.exists(self.state_path)

    def load(self) -> dict[str, Any]:
        """The state of an unfinished run (OutputError if unreadable)."""
        try:
            with open(self.state_path, encoding="utf-8") as f:
                state = json.load(f)
        except (OSError, ValueError) as err:
            raise OutputError(f"cannot read {self.state_path} (the record of an unfinished "
                              f"copy): {getattr(err, 'strerror', None) or err}; remove it "
                              "to start over") from err
        if not isinstance(state, dict) or "snapshot_id" not in state:
            raise OutputError(f"{self.state_path} is not an ebsfs journal; remove it to "
                              "start over")
        return state

    def open(self, state: dict[str, Any], new: bool) -> None:
        """Lock the journal for this run (a new one starts empty) and save `state`."""
        try:
            self._fd = os.open(self.sums_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise OutputError(f"cannot create {self.sums_path}: {err.strerror}") from err
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise OutputError(f"another ebsfs get is writing this output ({self.sums_path} "
                              "is locked)") from None
        if new:
            os.ftruncate(self._fd, 0)
        self.save(state)

    def save(self, state: dict[str, Any]) -> None:
        try:
            write_json_atomic(self.state_path, state)
        except OSError as err:
            raise OutputError(f"cannot write {self.state_path}: {err.strerror}") from err

    def record(self, index: int, digest: bytes) -> None:
        """Block `index` is written and has this SHA-256 (call after writing it)."""
        assert self._fd is not None and len(digest) == RECORD
        os.pwrite(self._fd, digest, index * RECORD)

    def recorded(self, first: int, last: int) -> dict[int, bytes]:
        """Records of blocks [first, last] that were written, by index."""
        assert self._fd is not None
        raw = os.pread(self._fd, (last - first + 1) * RECORD, first * RECORD)
        found = {}
        for n in range(len(raw) // RECORD):
            digest = raw[n * RECORD : (n + 1) * RECORD]
            if digest != _EMPTY:
                found[first + n] = digest
        return found

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None

    def remove(self) -> None:
        self.close()
        for path in (self.state_path, self.sums_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
