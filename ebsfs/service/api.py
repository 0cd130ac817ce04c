"""What ebsfs needs of the EBS direct APIs, apart from any SDK: the EbsApi interface
(the boto3 client, the test fakes and failure injectors all provide it), its page types,
the checksum check of a block body, and CallCounter (the counters a client bumps, which
the engine's Stats provides). No boto3 here."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol, TypeVar

from ebsfs.constants import BLOCK_SIZE
from ebsfs.errors import ChecksumMismatch

T = TypeVar("T")

MAX_RESULTS = 10000
"""Always sent: the service's default page size is undocumented."""


@dataclass(frozen=True)
class BlockPage:
    """One ListSnapshotBlocks page. `blocks` are (index, token), ascending."""

    blocks: list[tuple[int, str]]
    next_token: str | None
    expiry: float
    volume_size: int
    """Bytes."""
    block_size: int = BLOCK_SIZE


@dataclass(frozen=True)
class ChangedBlock:
    index: int
    first_token: str | None
    second_token: str | None


@dataclass(frozen=True)
class ChangedPage:
    """One ListChangedBlocks page."""

    changes: list[ChangedBlock]
    next_token: str | None
    expiry: float
    volume_size: int
    block_size: int = BLOCK_SIZE


class Block(NamedTuple):
    """A block's bytes as verified, with the checksum the service gave for them (kept
    for manifests and the disk cache; None for a block never written, read as zeros)."""

    data: bytes | memoryview
    checksum: str | None
    """Base64 SHA-256, as in x-amz-Checksum."""


class EbsApi(Protocol):
    """What ebsfs needs of the service. Errors are ebsfs.errors types, never an SDK's.
    Calls block; they are made from worker threads (remote.py)."""

    get_throttles: int
    """GetSnapshotBlock calls answered RequestThrottledException so far, retries
    included: the signal that shrinks the number of fetches in flight (list calls have
    their own, much lower, quota and do not count)."""

    def list_snapshot_blocks(
        self,
        snapshot_id: str,
        start_index: int = 0,
        next_token: str | None = None,
        max_results: int = MAX_RESULTS,
    ) -> BlockPage: ...

    def list_changed_blocks(
        self,
        first_id: str,
        second_id: str,
        start_index: int = 0,
        next_token: str | None = None,
        max_results: int = MAX_RESULTS,
    ) -> ChangedPage: ...

    def get_snapshot_block(
        self, snapshot_id: str, index: int, token: str, into: memoryview | None = None
    ) -> Block:
        """The verified block: its data written into `into` (and `into` returned as
        the data) when given, so a body lands in the cache without a copy on the trio
        thread."""
        ...


class CallCounter(Protocol):
    """What a client reports of the requests it sends (ebsfs.engine.stats.Stats is
    one): a protocol here so that the service layer needs nothing from the engine."""

    def counting(self, operation: str, attempt: Callable[[], T]) -> Callable[[], T]:
        """`attempt` (one request of `operation`, run by the retry policy as often as
        it takes), wrapped so that each run, each retry and each throttling answer is
        counted."""
        ...


class NotCounting:
    """A CallCounter that counts nothing (a client made without the engine's stats)."""

    def counting(self, operation: str, attempt: Callable[[], T]) -> Callable[[], T]:
        return attempt


def verify_block(data: bytes | memoryview, checksum: str, algorithm: str, data_length: int) -> None:
    """Raise ChecksumMismatch unless `data` is the whole block its headers describe."""
    if algorithm != "SHA256":
        raise ChecksumMismatch(f"unexpected checksum algorithm {algorithm!r}")
    if len(data) != data_length or len(data) != BLOCK_SIZE:
        raise ChecksumMismatch(f"body holds {len(data)} bytes, header says {data_length}")
    if base64.b64encode(hashlib.sha256(data).digest()).decode() != checksum:
        raise ChecksumMismatch("SHA-256 of the body does not match x-amz-Checksum")
