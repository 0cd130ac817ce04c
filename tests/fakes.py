"""Test doubles for EbsApi: one backed by the emulator's store without HTTP (same
paging, tokens and lineage as the endpoint), and a wrapper that injects failures."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

from ebsfs.emulator.store import ApiError, SnapshotStore
from ebsfs.service.api import (
    MAX_RESULTS,
    Block,
    BlockPage,
    ChangedBlock,
    ChangedPage,
    EbsApi,
    verify_block,
)
from ebsfs.service.failures import answer_error


class StoreApi:
    """EbsApi straight onto a SnapshotStore, with call counters."""

    def __init__(self, store: SnapshotStore) -> None:
        self.store = store
        self.calls: collections.Counter[str] = collections.Counter()
        self.get_throttles = 0
        self.block_gets: collections.Counter[tuple[str, int]] = collections.Counter()
        self._lock = threading.Lock()

    def _count(self, name: str) -> None:
        with self._lock:
            self.calls[name] += 1

    @staticmethod
    def _map(err: ApiError) -> Exception:
        """The emulator's error answer as the real client maps the same answer."""
        return answer_error(err.status, err.code, err.reason, err.message)

    def list_snapshot_blocks(
        self,
        snapshot_id: str,
        start_index: int = 0,
        next_token: str | None = None,
        max_results: int = MAX_RESULTS,
    ) -> BlockPage:
        self._count("ListSnapshotBlocks")
        try:
            r = self.store.list_snapshot_blocks(
                snapshot_id, next_token, str(max_results), str(start_index)
            )
        except ApiError as err:
            raise self._map(err) from err
        return BlockPage(
            [(b["BlockIndex"], b["BlockToken"]) for b in r["Blocks"]],
            r.get("NextToken"),
            r["ExpiryTime"],
            r["VolumeSize"] * 1024**3,
        )

    def list_changed_blocks(
        self,
        first_id: str,
        second_id: str,
        start_index: int = 0,
        next_token: str | None = None,
        max_results: int = MAX_RESULTS,
    ) -> ChangedPage:
        self._count("ListChangedBlocks")
        try:
            r = self.store.list_changed_blocks(
                second_id, first_id, next_token, str(max_results), str(start_index)
            )
        except ApiError as err:
            raise self._map(err) from err
        return ChangedPage(
            [
                ChangedBlock(c["BlockIndex"], c.get("FirstBlockToken"), c.get("SecondBlockToken"))
                for c in r["ChangedBlocks"]
            ],
            r.get("NextToken"),
            r["ExpiryTime"],
            r["VolumeSize"] * 1024**3,
        )

    def get_snapshot_block(
        self, snapshot_id: str, index: int, token: str, into: memoryview | None = None
    ) -> Block:
        self._count("GetSnapshotBlock")
        with self._lock:
            self.block_gets[(snapshot_id, index)] += 1
        try:
            block = self.store.get_snapshot_block(snapshot_id, str(index), token)
        except ApiError as err:
            raise self._map(err) from err
        data = bytes(block.data())
        verify_block(data, block.checksum(), "SHA256", len(data))
        if into is None:
            return Block(data, block.checksum())
        into[:] = data
        return Block(into, block.checksum())


class FailingApi:
    """Wraps an EbsApi; `plan(call_number, operation)` may return an exception to raise
    instead of making that call (mountpoint-s3's failure client)."""

    def __init__(self, inner: EbsApi, plan: Callable[[int, str], Exception | None]) -> None:
        self.inner = inner
        self.plan = plan
        self.count = 0
        self._lock = threading.Lock()

    @property
    def get_throttles(self) -> int:
        return self.inner.get_throttles

    @get_throttles.setter
    def get_throttles(self, value: int) -> None:
        self.inner.get_throttles = value

    def _maybe_fail(self, operation: str) -> None:
        with self._lock:
            self.count += 1
            number = self.count
        err = self.plan(number, operation)
        if err is not None:
            raise err

    def list_snapshot_blocks(self, *args, **kw):
        self._maybe_fail("ListSnapshotBlocks")
        return self.inner.list_snapshot_blocks(*args, **kw)

    def list_changed_blocks(self, *args, **kw):
        self._maybe_fail("ListChangedBlocks")
        return self.inner.list_changed_blocks(*args, **kw)

    def get_snapshot_block(self, *args, **kw):
        self._maybe_fail("GetSnapshotBlock")
        return self.inner.get_snapshot_block(*args, **kw)


def pattern_block(snapshot_seed: int, index: int) -> bytes:
    """Deterministic, distinct content for block `index` (expected bytes computable)."""
    head = f"{snapshot_seed}:{index}:".encode()
    return (head * (524288 // len(head) + 1))[:524288]
