"""Snapshots, lineage, tokens and paging of the emulated EBS direct API (no HTTP here).

Blocks are kept as views into the source image (mmap), so a multi-GiB image costs no
copy. A child snapshot shares its parent's block objects where the data is unchanged;
"changed" between two snapshots of one lineage means "a different block object".
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import hmac
import itertools
import math
import mmap
import os
import re
import secrets
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from ebsfs.constants import BLOCK_SIZE, BLOCKS_PER_GIB, GIB
from ebsfs.emulator.faults import Dice, Faults

SNAPSHOT_ID_RE = re.compile(r"^snap-[0-9a-f]+$")
VOLUME_ID_RE = re.compile(r"^vol-[0-9a-f]+$")
OWNER_ID = "123456789012"
"""The account that owns every emulated snapshot (AWS's documentation example, as moto's)."""
ZERO_BLOCK = bytes(BLOCK_SIZE)
_versions = itertools.count(1)


class ApiError(Exception):
    """An error answer of the service: HTTP status, error type and Reason."""

    def __init__(self, status: int, code: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.reason = reason
        self.message = message


def _validation(reason: str, message: str) -> ApiError:
    return ApiError(400, "ValidationException", reason, message)


class StoredBlock:
    """One 512 KiB block: where its bytes live and their memoized SHA-256."""

    __slots__ = ("_buf", "_offset", "_checksum", "version")

    def __init__(self, buf: bytes | mmap.mmap | memoryview, offset: int = 0) -> None:
        self._buf = memoryview(buf)
        self._offset = offset
        self._checksum: str | None = None
        self.version = next(_versions)

    def data(self) -> memoryview:
        return self._buf[self._offset : self._offset + BLOCK_SIZE]

    def checksum(self) -> str:
        if self._checksum is None:
            self._checksum = base64.b64encode(hashlib.sha256(self.data()).digest()).decode()
        return self._checksum


class Snapshot:
    """A completed snapshot: its volume size, lineage and written blocks, and what EC2
    DescribeSnapshots says of it (volume id, description, start time)."""

    def __init__(
        self,
        snapshot_id: str,
        volume_size_gib: int,
        lineage: str,
        parent: str | None,
        blocks: dict[int, StoredBlock],
        volume_id: str | None = None,
        description: str = "",
        start_time: float | None = None,
    ) -> None:
        self.snapshot_id = snapshot_id
        self.volume_size_gib = volume_size_gib
        self.lineage = lineage
        self.parent = parent
        self.blocks = blocks
        self.indexes = sorted(blocks)
        self.volume_id = volume_id or "vol-" + lineage.removeprefix("snap-")
        """A lineage is one volume's snapshots: by default the volume is named after
        the lineage's first snapshot (snap-0a1 -> vol-0a1)."""
        self.description = description
        self.start_time = time.time() if start_time is None else start_time

    @property
    def block_count(self) -> int:
        return self.volume_size_gib * BLOCKS_PER_GIB


class Tokens:
    """Opaque, tamper-proof tokens (HMAC-sealed) that carry their own expiry."""

    def __init__(self) -> None:
        self._secret = secrets.token_bytes(16)

    def seal(self, *fields: object) -> str:
        raw = "|".join(str(f) for f in fields).encode()
        mac = hmac.new(self._secret, raw, hashlib.sha256).digest()[:12]
        return base64.b64encode(raw + mac).decode()

    def open(self, token: str) -> list[str] | None:
        try:
            blob = base64.b64decode(token, validate=True)
        except ValueError:
            return None
        raw, mac = blob[:-12], blob[-12:]
        good = hmac.new(self._secret, raw, hashlib.sha256).digest()[:12]
        if len(blob) <= 12 or not hmac.compare_digest(mac, good):
            return None
        return raw.decode().split("|")


class SnapshotStore:
    """All snapshots of the emulator and the three read operations on them."""

    def __init__(
        self, faults: Faults | None = None, dice: Dice | None = None, owner_id: str = OWNER_ID
    ) -> None:
        self.owner_id = owner_id
        """The account of every snapshot, and of every caller (EC2's "self")."""
        self.faults = faults or Faults()
        self.dice = dice or Dice(self.faults.seed)
        self._snapshots: dict[str, Snapshot] = {}
        self._tokens = Tokens()
        self._lock = threading.Lock()
        self._changed_cache: dict[tuple[str, str], list[int]] = {}
        self._generations: dict[str, int] = {}
        """Per snapshot, how many times its block tokens were renewed (renew_tokens)."""
        self._mmaps: list[mmap.mmap] = []

    # ---- loading -------------------------------------------------------------------

    def add_snapshot(
        self,
        snapshot_id: str,
        blocks: Mapping[int, bytes | memoryview | StoredBlock],
        volume_size_gib: int | None = None,
        parent: str | None = None,
        volume_id: str | None = None,
        description: str = "",
        start_time: float | None = None,
    ) -> Snapshot:
        """Add a completed snapshot. A child starts from its parent's blocks and
        overrides those given; blocks equal to the parent's keep the parent's object
        (unchanged), all-zero blocks absent from the parent are not stored (a real
        uploader skips them). A child is of its parent's volume unless `volume_id`
        says otherwise; `start_time` (seconds since the epoch) defaults to now."""
        if not SNAPSHOT_ID_RE.match(snapshot_id) or len(snapshot_id) > 64:
            raise ValueError(f"snapshot id {snapshot_id!r} does not match ^snap-[0-9a-f]+$")
        if volume_id is not None and (not VOLUME_ID_RE.match(volume_id) or len(volume_id) > 64):
            raise ValueError(f"volume id {volume_id!r} does not match ^vol-[0-9a-f]+$")
        with self._lock:
            if snapshot_id in self._snapshots:
                raise ValueError(f"snapshot {snapshot_id} exists already")
            base = self._snapshots[parent] if parent else None
        if parent and base is None:
            raise ValueError(f"parent snapshot {parent} is not loaded")
        stored: dict[int, StoredBlock] = dict(base.blocks) if base else {}
        for index, data in blocks.items():
            old = stored.get(index)
            if isinstance(data, StoredBlock):
                stored[index] = data
                continue
            if len(data) != BLOCK_SIZE:
                raise ValueError(f"block {index} holds {len(data)} bytes, not {BLOCK_SIZE}")
            if old is not None and old.data() == data:
                continue
            if old is None and data == ZERO_BLOCK:
                continue
            stored[index] = StoredBlock(data)
        needed = (max(stored) // BLOCKS_PER_GIB + 1) if stored else 1
        size = volume_size_gib or (base.volume_size_gib if base else needed)
        if size < needed:
            raise ValueError(f"volume of {size} GiB cannot hold block {max(stored)}")
        snap = Snapshot(
            snapshot_id,
            size,
            base.lineage if base else snapshot_id,
            parent,
            stored,
            volume_id or (base.volume_id if base else None),
            description,
            start_time,
        )
        with self._lock:
            self._snapshots[snapshot_id] = snap
        return snap

    def add_image(
        self,
        snapshot_id: str,
        path: str | os.PathLike[str],
        volume_size_gib: int | None = None,
        parent: str | None = None,
        volume_id: str | None = None,
    ) -> Snapshot:
        """Add a snapshot of a raw image file, mapped read-only rather than copied. Its
        EC2 description is the image's file name: `ebsfs ls` then says what it serves."""
        name = os.path.basename(path)
        with open(path, "rb") as f:
            length = os.fstat(f.fileno()).st_size
            if length == 0:
                return self.add_snapshot(
                    snapshot_id, {}, volume_size_gib or 1, parent, volume_id, name
                )
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._mmaps.append(mapped)
        view = memoryview(mapped)
        blocks: dict[int, memoryview | bytes] = {}
        for index in range((length + BLOCK_SIZE - 1) // BLOCK_SIZE):
            chunk = view[index * BLOCK_SIZE : (index + 1) * BLOCK_SIZE]
            if len(chunk) < BLOCK_SIZE:
                blocks[index] = bytes(chunk) + bytes(BLOCK_SIZE - len(chunk))
            else:
                blocks[index] = chunk
        if parent is not None:
            # Blocks the child image leaves zero where the parent had data were overwritten.
            for index in self._require(parent).indexes:
                blocks.setdefault(index, ZERO_BLOCK)
        size = volume_size_gib or max(1, -(-length // GIB))
        return self.add_snapshot(snapshot_id, blocks, size, parent, volume_id, name)

    def snapshot_ids(self) -> list[str]:
        with self._lock:
            return list(self._snapshots)

    def snapshots(self) -> list[Snapshot]:
        """Every snapshot, in the order they were added."""
        with self._lock:
            return list(self._snapshots.values())

    def get(self, snapshot_id: str) -> Snapshot:
        return self._require(snapshot_id)

    def delete(self, snapshot_id: str) -> None:
        """Delete a snapshot, as DeleteSnapshot does: its children keep every block
        (each holds its whole block map), it is gone from every answer."""
        with self._lock:
            del self._snapshots[snapshot_id]
            self._changed_cache = {
                k: v for k, v in self._changed_cache.items() if snapshot_id not in k
            }

    # ---- the API -------------------------------------------------------------------

    def _require(self, snapshot_id: str) -> Snapshot:
        if not SNAPSHOT_ID_RE.match(snapshot_id) or len(snapshot_id) > 64:
            raise _validation("INVALID_SNAPSHOT_ID", f"Invalid snapshot ID: {snapshot_id}")
        with self._lock:
            snap = self._snapshots.get(snapshot_id)
        if snap is None:
            raise ApiError(
                404,
                "ResourceNotFoundException",
                "SNAPSHOT_NOT_FOUND",
                f"The snapshot '{snapshot_id}' does not exist.",
            )
        return snap

    @staticmethod
    def _max_results(value: str | None) -> int:
        if value is None:
            return 10000
        try:
            number = int(value)
        except ValueError:
            raise _validation("INVALID_PARAMETER_VALUE", "MaxResults must be an integer") from None
        if not 100 <= number <= 10000:
            raise _validation("INVALID_PARAMETER_VALUE", "MaxResults must be between 100 and 10000")
        return number

    @staticmethod
    def _start_index(value: str | None) -> int:
        try:
            number = int(value or 0)
        except ValueError:
            number = -1
        if number < 0:
            raise _validation("INVALID_PARAMETER_VALUE", "StartingBlockIndex must be >= 0")
        return number

    def _page_position(self, token: str | None, kind: str, key: str, start: int) -> int:
        if token is None:
            return start
        fields = self._tokens.open(token)
        if (
            fields is None
            or len(fields) != 4
            or fields[0] != kind
            or fields[1] != key
            or float(fields[3]) < time.time()
        ):
            raise _validation("INVALID_PAGE_TOKEN", "The pagination token is invalid or expired")
        return int(fields[2])

    def _page(
        self, candidates: list[int], position: int, limit: int, block_count: int
    ) -> tuple[list[int], int | None]:
        """One page of `candidates` (sorted indexes) from `position`: the indexes it
        returns and where the next page resumes (None at the end). A short page scans
        a random window of the index space and may return nothing, as the real
        service does."""
        first = bisect.bisect_left(candidates, position)
        if self.dice.chance(self.faults.short_pages):
            # The service scans a slice of the index space per page: a sparse slice
            # gives a short page, an unwritten one an empty page, NextToken all along.
            window_end = position + self.dice.randint(1, max(2, limit // 20))
            last = bisect.bisect_left(candidates, window_end, lo=first)
            picked = candidates[first : min(last, first + limit)]
            resume = picked[-1] + 1 if len(picked) == limit else window_end
            return picked, (resume if resume < block_count else None)
        picked = candidates[first : first + limit]
        if len(picked) == limit:
            return picked, picked[-1] + 1
        return picked, None

    def _expiry(self) -> float:
        """When block tokens listed now expire, in whole seconds (tokens carry whole
        seconds): rounded up, so a token never expires before the ExpiryTime its page
        reports (truncating made a 1 s token refused at once, now and then)."""
        return float(math.ceil(time.time() + self.faults.token_lifetime))

    def _block_token(self, snapshot_id: str, index: int, expiry: float) -> str:
        generation = self._generations.get(snapshot_id, 0)
        return self._tokens.seal("b", snapshot_id, index, int(expiry), generation)

    def _renew(self, snapshot_id: str) -> None:
        """A new listing of the snapshot: with renew_tokens, its earlier block tokens
        are refused from now on."""
        if self.faults.renew_tokens:
            with self._lock:
                self._generations[snapshot_id] = self._generations.get(snapshot_id, 0) + 1

    def list_snapshot_blocks(
        self,
        snapshot_id: str,
        next_token: str | None = None,
        max_results: str | None = None,
        starting_block_index: str | None = None,
    ) -> dict[str, Any]:
        snap = self._require(snapshot_id)
        limit = self._max_results(max_results)
        start = self._start_index(starting_block_index)
        position = self._page_position(next_token, "l", snapshot_id, start)
        if next_token is None:
            self._renew(snapshot_id)
        picked, resume = self._page(snap.indexes, position, limit, snap.block_count)
        expiry = self._expiry()
        body: dict[str, Any] = {
            "Blocks": [
                {"BlockIndex": i, "BlockToken": self._block_token(snapshot_id, i, expiry)}
                for i in picked
            ],
            "ExpiryTime": expiry,
            "VolumeSize": snap.volume_size_gib,
            "BlockSize": BLOCK_SIZE,
        }
        if resume is not None:
            body["NextToken"] = self._tokens.seal(
                "l", snapshot_id, resume, time.time() + self.faults.page_token_lifetime
            )
        return body

    def changed_indexes(self, first_id: str | None, second_id: str) -> list[int]:
        """Sorted indexes whose data differs between two snapshots of one lineage."""
        second = self._require(second_id)
        if first_id is None:
            return second.indexes
        first = self._require(first_id)
        if first.lineage != second.lineage:
            raise _validation(
                "UNRELATED_SNAPSHOTS",
                f"The snapshots {first_id} and {second_id} are not of the same volume lineage.",
            )
        key = (first_id, second_id)
        with self._lock:
            cached = self._changed_cache.get(key)
        if cached is None:
            every: Iterable[int] = set(first.blocks) | set(second.blocks)
            cached = sorted(i for i in every if first.blocks.get(i) is not second.blocks.get(i))
            with self._lock:
                self._changed_cache[key] = cached
        return cached

    def list_changed_blocks(
        self,
        second_id: str,
        first_id: str | None = None,
        next_token: str | None = None,
        max_results: str | None = None,
        starting_block_index: str | None = None,
    ) -> dict[str, Any]:
        changed = self.changed_indexes(first_id, second_id)
        second = self._require(second_id)
        first = self._require(first_id) if first_id else None
        limit = self._max_results(max_results)
        start = self._start_index(starting_block_index)
        key = f"{first_id or ''}>{second_id}"
        position = self._page_position(next_token, "c", key, start)
        picked, resume = self._page(changed, position, limit, second.block_count)
        expiry = self._expiry()
        entries = []
        for i in picked:
            entry: dict[str, Any] = {"BlockIndex": i}
            if first is not None and i in first.blocks:
                entry["FirstBlockToken"] = self._block_token(first.snapshot_id, i, expiry)
            if i in second.blocks:
                entry["SecondBlockToken"] = self._block_token(second_id, i, expiry)
            entries.append(entry)
        body: dict[str, Any] = {
            "ChangedBlocks": entries,
            "ExpiryTime": expiry,
            "VolumeSize": second.volume_size_gib,
            "BlockSize": BLOCK_SIZE,
        }
        if resume is not None:
            body["NextToken"] = self._tokens.seal(
                "c", key, resume, time.time() + self.faults.page_token_lifetime
            )
        return body

    def get_snapshot_block(
        self, snapshot_id: str, block_index: str, block_token: str | None
    ) -> StoredBlock:
        snap = self._require(snapshot_id)
        try:
            index = int(block_index)
        except ValueError:
            raise _validation("INVALID_BLOCK", f"Invalid block index {block_index}") from None
        if not 0 <= index < snap.block_count:
            raise _validation("INVALID_BLOCK", f"Block index {index} is outside the volume")
        fields = self._tokens.open(block_token or "")
        if (
            fields is None
            or len(fields) != 5
            or fields[0] != "b"
            or fields[1] != snapshot_id
            or int(fields[2]) != index
            or float(fields[3]) < time.time()
            or (
                self.faults.renew_tokens and int(fields[4]) != self._generations.get(snapshot_id, 0)
            )
        ):
            raise _validation("INVALID_BLOCK_TOKEN", "The block token is invalid or expired")
        block = snap.blocks.get(index)
        if block is None:
            raise _validation("INVALID_BLOCK", f"Block {index} was never written")
        return block
