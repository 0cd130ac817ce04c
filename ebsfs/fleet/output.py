"""`ebsfs scan --out FILE.jsonl`: each snapshot's lines appended together as they
finish, and what a rerun may skip.

Atomic append: a snapshot's lines are one buffer written by one thread, under a lock,
with O_APPEND, then fsync'd: a reader never sees two snapshots' lines interleaved,
and a crash leaves at most the tail of one snapshot's block unfinished. A block ends
with its summary line, so on opening, anything after the last summary line (a torn
tail) is cut off: the file then holds only whole snapshots. Why not a part file per
snapshot renamed into a directory: one file is what users asked for (grep, jq, a
spreadsheet), and the cut makes it as safe.

Resume: a snapshot whose summary says complete is skipped, at no call; one whose
summary says it could not be read is scanned again (its earlier error block stays;
the last block of a snapshot is the one that counts)."""

from __future__ import annotations

import json
import os
import threading
from typing import Any

from ebsfs.errors import OutputError


class ScanOutput:
    """The --out file, opened for appending after its complete blocks."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.done: set[str] = set()
        """Snapshots complete in the file already."""
        self._lock = threading.Lock()
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise OutputError(f"cannot open --out {path}: {err.strerror}") from err
        try:
            self._recover()
        except BaseException:
            os.close(self._fd)
            raise

    def _recover(self) -> None:
        """Find the complete snapshots, and cut a torn tail off."""
        end = 0
        offset = 0
        with os.fdopen(os.dup(self._fd), "rb") as f:
            f.seek(0)
            for raw in f:
                offset += len(raw)
                if not raw.endswith(b"\n"):
                    break
                try:
                    line = json.loads(raw)
                except ValueError:
                    continue  # a torn line inside a block: the block's summary tells
                if not isinstance(line, dict) or not isinstance(line.get("summary"), dict):
                    continue
                end = offset
                snapshot = line.get("snapshot_id")
                if line["summary"].get("complete") is True and isinstance(snapshot, str):
                    self.done.add(snapshot)
                elif isinstance(snapshot, str):
                    self.done.discard(snapshot)
        if os.fstat(self._fd).st_size != end:
            os.ftruncate(self._fd, end)

    def append(self, lines: list[dict[str, Any]]) -> None:
        """One snapshot's lines (its summary last), in one write."""
        data = "".join(json.dumps(line, ensure_ascii=True) + "\n" for line in lines).encode()
        with self._lock:
            view = memoryview(data)
            try:
                while view:  # a regular file takes it whole but for a full disk
                    written = os.write(self._fd, view)
                    view = view[written:]
                os.fsync(self._fd)
            except OSError as err:
                raise OutputError(f"cannot write --out {self.path}: {err.strerror}") from err

    def close(self) -> None:
        os.close(self._fd)
