"""What an unfinished `ebsfs get` keeps beside its output, so that running the same
command again fetches only what is missing.

Three small files with the stem of the output (`disk.img.part.json`, `.part.sums`,
`.part.origins`): the state (which snapshot, when the copy started, how far a device
was zeroed), the SHA-256 of every block written so far, 32 bytes at offset index * 32
of a sparse file, and where each block's bytes came from (sources.py), one byte at
offset index (a journal of a version before it has none: those blocks' source is
"unknown"). A block's record is written (its source, then its digest: a pwrite
each) right after the block itself, so a SIGKILL loses at most the blocks in flight;
a record whose block did not reach the disk (a power cut) is caught on resume, which
re-reads every recorded block and checks it against its record before trusting it.
Random access keeps memory flat: no list of blocks is ever held, whatever the volume."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import stat
from dataclasses import dataclass
from typing import Any

from ebsfs.acquire.identity import TargetIdentity
from ebsfs.acquire.manifest import PRIVATE, private_flags, write_json_atomic
from ebsfs.acquire.sources import Origin
from ebsfs.errors import OutputError

RECORD = 32
_EMPTY = bytes(RECORD)


@dataclass
class JournalState:
    """The state of an unfinished copy, `<stem>.part.json`. Its JSON is the one every
    version since the journal began has written (the same keys in the same order), so
    a copy left unfinished by one version resumes under another."""

    snapshot_id: str
    output: str
    """The output's absolute path: a journal found beside another path is not its."""
    volume_size: int
    started: str
    """When the first run started (UTC, ISO 8601): the manifest's `started`."""
    ebsfs_version: str
    """The version that started the copy."""
    runs: int = 0
    """Runs so far, this one included once it has opened the journal."""
    zeroed_through: int | None = None
    """Bytes of a device zeroed from its start (a resumed run skips them); absent for a
    file, whose holes cost nothing. Saved only once those zeros are flushed."""
    target: TargetIdentity | None = None
    """Which file or device the copy writes (identity.py); absent in the journals of
    versions before it, which ignore it."""
    disk_cache: dict[str, Any] | None = None
    """The disk cache (`--cache-dir`) of the latest run that had one (the manifest's
    `disk_cache` section but its count): then the block list names each block's
    source, even if the run that finishes has none. Absent in older journals."""

    @classmethod
    def from_json(cls, data: object) -> JournalState:
        """The state in `data` (a parsed JSON object); ValueError if it is not one."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        types: dict[str, type | tuple[type, ...]] = {
            "snapshot_id": str,
            "output": str,
            "volume_size": int,
            "started": str,
            "ebsfs_version": str,
            "runs": int,
            "zeroed_through": (int, type(None)),
        }
        values: dict[str, Any] = {}
        if data.get("target") is not None:
            values["target"] = TargetIdentity.from_json(data["target"])
        if data.get("disk_cache") is not None:
            values["disk_cache"] = _disk_cache(data["disk_cache"])
        for name, kind in types.items():
            if name not in data:
                continue
            value = data[name]
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ValueError(f"{name} is {value!r}")
            values[name] = value
        try:
            return cls(**values)
        except TypeError as err:  # a field without a default is missing
            raise ValueError(str(err)) from err

    def as_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.zeroed_through is None:
            del data["zeroed_through"]
        del data["target"], data["disk_cache"]
        if self.target is not None:
            data["target"] = self.target.as_json()
        if self.disk_cache is not None:
            data["disk_cache"] = self.disk_cache
        return data


def _disk_cache(value: object) -> dict[str, Any]:
    """A journal's `disk_cache`: only the fields ebsfs writes there, of their types
    (it goes into the manifest; the journal is a file others may have planted)."""
    kinds = {"directory": str, "endpoint": str, "region": str, "read": bool}
    if not isinstance(value, dict) or set(value) != set(kinds):
        raise ValueError(f"disk_cache is {value!r:.80}")
    for name, kind in kinds.items():
        if not isinstance(value[name], kind) or len(str(value[name])) > 4096:
            raise ValueError(f"disk_cache {name} is {value[name]!r:.80}")
    return dict(value)


class Journal:
    """The resume record of one output. Locked while a run uses it: a second `get`
    into the same output fails instead of interleaving writes."""

    def __init__(self, stem: str) -> None:
        self.state_path = stem + ".part.json"
        self.sums_path = stem + ".part.sums"
        self.origins_path = stem + ".part.origins"
        self._fd: int | None = None
        self._origins_fd: int | None = None
        self.state: JournalState | None = None
        """The state of the run that has it open (`open`)."""

    def exists(self) -> bool:
        return os.path.exists(self.state_path)

    def load(self) -> JournalState:
        """The state of an unfinished run (OutputError if unreadable)."""
        try:
            with open(self.state_path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as err:
            raise OutputError(
                f"cannot read {self.state_path} (the record of an unfinished "
                f"copy): {getattr(err, 'strerror', None) or err}; remove it "
                "to start over"
            ) from err
        try:
            return JournalState.from_json(data)
        except ValueError:
            raise OutputError(
                f"{self.state_path} is not an ebsfs journal; remove it to start over"
            ) from None

    def open(self, state: JournalState, new: bool) -> None:
        """Lock the journal for this run (a new one starts empty) and save `state`."""
        self.lock(new)
        self.state = state
        self.save(state)

    def lock(self, new: bool) -> None:
        """Lock the journal for this run (a new one starts empty); OutputError if
        another run holds it."""
        try:
            self._fd = os.open(self.sums_path, private_flags(os.O_RDWR), PRIVATE)
        except OSError as err:
            raise OutputError(f"cannot create {self.sums_path}: {err.strerror}") from err
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise OutputError(
                f"another ebsfs get is writing this output ({self.sums_path} is locked)"
            ) from None
        mode = stat.S_IMODE(os.fstat(self._fd).st_mode)
        if mode & 0o077:  # left by a version that made it 0644
            os.fchmod(self._fd, mode & 0o700)
        if new:
            os.ftruncate(self._fd, 0)
        try:
            self._origins_fd = os.open(self.origins_path, private_flags(os.O_RDWR), PRIVATE)
        except OSError as err:
            self.close()
            raise OutputError(f"cannot create {self.origins_path}: {err.strerror}") from err
        if new:
            os.ftruncate(self._origins_fd, 0)

    def save(self, state: JournalState) -> None:
        try:
            write_json_atomic(self.state_path, state.as_json())
        except OSError as err:
            raise OutputError(f"cannot write {self.state_path}: {err.strerror}") from err

    def record_origin(self, index: int, origin: Origin) -> None:
        """Block `index` came from `origin`: call before `record`, so that a digest is
        never on record beside an earlier run's source."""
        assert self._origins_fd is not None
        os.pwrite(self._origins_fd, origin.code, index)

    def record(self, index: int, digest: bytes) -> None:
        """Block `index` is written and has this SHA-256 (call after writing it)."""
        assert self._fd is not None and len(digest) == RECORD
        os.pwrite(self._fd, digest, index * RECORD)

    def origins(self, first: int, last: int) -> bytes:
        """The source codes of blocks [first, last] (Origin.of_code), one byte each
        (0 where none was recorded)."""
        assert self._origins_fd is not None
        raw = os.pread(self._origins_fd, last - first + 1, first)
        return raw.ljust(last - first + 1, b"\0")

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
        if self._origins_fd is not None:
            os.close(self._origins_fd)
            self._origins_fd = None
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None

    def remove(self) -> None:
        self.close()
        for path in (self.state_path, self.sums_path, self.origins_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
