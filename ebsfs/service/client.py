"""The EbsApi of api.py over boto3: list calls through a boto3 client (sent over the
direct path's connections, listsend.py, where it may be used), GetSnapshotBlock through
the direct path (direct.py) where it may be used and through boto3 where not, each GET
and its body read retried together by the one RetryPolicy."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import botocore.config
import botocore.exceptions
import urllib3.exceptions

from ebsfs.constants import BLOCK_SIZE, GIB
from ebsfs.errors import ReadFailed, ServiceError, Throttled, TransientError
from ebsfs.service.api import (
    MAX_RESULTS,
    Block,
    BlockPage,
    CallCounter,
    ChangedBlock,
    ChangedPage,
    NotCounting,
    verify_block,
)
from ebsfs.service.direct import DirectBlockGetter, why_not_direct
from ebsfs.service.failures import boto_error, redact
from ebsfs.service.http1 import current_abandon
from ebsfs.service.listsend import ListSender
from ebsfs.service.session import AwsSession, ConnectionOptions

__all__ = ["BotoEbsApi", "ConnectionOptions"]

log = logging.getLogger(__name__)
T = TypeVar("T")

BOTO_ERRORS = (
    botocore.exceptions.BotoCoreError,
    botocore.exceptions.ClientError,
    urllib3.exceptions.HTTPError,
)
"""What a boto3 call raises when the call fails (anything else is a bug of ours)."""
UNPARSEABLE = (ValueError, TypeError, AttributeError, KeyError, RuntimeError, RecursionError)
"""What botocore's response parsers raise on an answer that is not what the service
sends (a timestamp of "abc" or 1e400, an object for a list, JSON nested a million
deep): a garbled answer, retried as a transient failure like one the GET path cannot
parse, never a traceback."""


class BotoEbsApi:
    """EbsApi over one boto3 client (thread-safe; shared by all worker threads).

    botocore's own retries are off: they cannot cover reading the body, and two layers
    of retries multiply. RetryPolicy is the one place that decides."""

    def __init__(
        self,
        options: ConnectionOptions,
        stats: CallCounter | None = None,
        session: AwsSession | None = None,
    ) -> None:
        """`session`: another client's, to share what it loaded and resolved (the
        service model, the credentials): a second client of one session takes about
        4 ms, of a new session about 100 (the mount's start, docs/performance.md)."""
        self._retry = options.retry
        self._rate_limiter = options.rate_limiter
        self.stats: CallCounter = stats if stats is not None else NotCounting()
        """Requests sent, retries and throttles counted (the engine's stats)."""
        self.get_throttles = 0
        """GetSnapshotBlock answers of RequestThrottledException so far (EbsApi)."""
        config = botocore.config.Config(
            retries={"mode": "standard", "total_max_attempts": 1},
            max_pool_connections=options.max_connections,
            connect_timeout=options.connect_timeout,
            read_timeout=options.read_timeout,
            user_agent_extra="ebsfs",
        )
        self.session = session = session or AwsSession(options)
        self._client = session.client("ebs", config, options.endpoint_url)
        self._credentials = session.credentials()
        self.region: str | None = self._client.meta.region_name
        self.endpoint_url: str = self._client.meta.endpoint_url
        """Where calls go, as resolved (recorded in `ebsfs get` manifests)."""
        self.why_not_direct = why_not_direct(options, self.endpoint_url)
        """Why GetSnapshotBlock goes through boto3, or None: it takes the direct path
        (and the list calls are sent over it)."""
        self._direct: DirectBlockGetter | None = None
        if self.why_not_direct is None:
            self._direct = DirectBlockGetter(
                self._credentials,
                self.endpoint_url,
                self._client.meta.region_name,
                options,
                session.ca_file(),
            )
            # Lists too: botocore signs and parses them, http1 sends them (its caps,
            # strict parsing and deadline), on the GETs' kept-alive connections.
            ListSender(self._direct).register(self._client.meta.events)
        self._path_told = False
        self._path_lock = threading.Lock()

    def connections(self) -> dict[str, int | float]:
        """The direct path's connection counters (connections.Pool.counters: opened,
        reopened_stale, connects_abandoned, open, idle, peak_connecting,
        connect_deadline_ms, handshake_deadline_ms) for the engine's stats; empty when
        GETs go through boto3 (urllib3's pool counts nothing of the kind)."""
        return self._direct.connections() if self._direct is not None else {}

    def _tell_path(self) -> None:
        """Log once, at the first GET (a client used only to list says nothing), why
        GETs go through boto3: a user tuning speed should know."""
        with self._path_lock:
            if self._path_told:
                return
            self._path_told = True
        if self.why_not_direct is not None:
            log.info(
                "GetSnapshotBlock goes through boto3, not the faster direct path: %s",
                self.why_not_direct,
            )

    def _retried_get(self, what: str, attempt: Callable[[], T]) -> T:
        """RetryPolicy around one GET attempt, counting throttling answers on the way."""

        def counted() -> T:
            gone = current_abandon()
            if gone is not None and gone.fired:  # nobody waits: no more attempts
                raise ReadFailed(f"{what}: given up, the read that asked for it is gone")
            if self._rate_limiter is not None:  # every attempt, retries and hedges too
                self._rate_limiter()
            try:
                return attempt()
            except Throttled:
                self.get_throttles += 1  # a lost update under a race only delays the back-off
                raise

        return self._retry.call(what, self.stats.counting("GetSnapshotBlock", counted))

    def _call(self, operation: str, **params: Any) -> dict[str, Any]:
        def attempt() -> dict[str, Any]:
            gone = current_abandon()
            if gone is not None and gone.fired:  # nobody waits: no more attempts
                raise ReadFailed(f"{operation}: given up, the read that asked for it is gone")
            # Resolve (and refresh) credentials first, so their failures are typed and
            # retried like the service's instead of escaping from botocore's signer.
            self._credentials.frozen()
            try:
                return getattr(self._client, operation)(**params)
            except BOTO_ERRORS as err:
                raise boto_error(err, params.get("NextToken")) from err
            except UNPARSEABLE as err:
                raise garbled(operation, err, params.get("NextToken")) from err

        name = "".join(part.capitalize() for part in operation.split("_"))
        return self._retry.call(operation, self.stats.counting(name, attempt))

    def list_snapshot_blocks(
        self,
        snapshot_id: str,
        start_index: int = 0,
        next_token: str | None = None,
        max_results: int = MAX_RESULTS,
    ) -> BlockPage:
        r = self._call(
            "list_snapshot_blocks",
            SnapshotId=snapshot_id,
            **_paging(start_index, next_token, max_results),
        )
        fields = _page_fields(r, "ListSnapshotBlocks")
        return BlockPage(
            blocks=[
                (_index(b, "BlockIndex", fields), _token(b, "BlockToken"))
                for b in _entries(r, "Blocks", max_results)
            ],
            **fields,
        )

    def list_changed_blocks(
        self,
        first_id: str,
        second_id: str,
        start_index: int = 0,
        next_token: str | None = None,
        max_results: int = MAX_RESULTS,
    ) -> ChangedPage:
        r = self._call(
            "list_changed_blocks",
            FirstSnapshotId=first_id,
            SecondSnapshotId=second_id,
            **_paging(start_index, next_token, max_results),
        )
        fields = _page_fields(r, "ListChangedBlocks")
        return ChangedPage(
            changes=[
                ChangedBlock(
                    _index(c, "BlockIndex", fields),
                    _token(c, "FirstBlockToken", optional=True),
                    _token(c, "SecondBlockToken", optional=True),
                )
                for c in _entries(r, "ChangedBlocks", max_results)
            ],
            **fields,
        )

    def get_snapshot_block(
        self, snapshot_id: str, index: int, token: str, into: memoryview | None = None
    ) -> Block:
        """The verified bytes of one block. The GET and the body read are retried
        together: botocore's retries end when the headers arrive."""
        if not self._path_told:
            self._tell_path()
        what = f"GetSnapshotBlock {snapshot_id}:{index}"
        direct = self._direct
        if direct is not None:
            return self._retried_get(what, lambda: direct.get(snapshot_id, index, token, into))
        return self._retried_get(what, lambda: self._boto_get(snapshot_id, index, token, into))

    def _boto_get(self, snapshot_id: str, index: int, token: str, into: memoryview | None) -> Block:
        """One attempt through boto3: the verified block, or a typed error."""
        self._credentials.frozen()
        try:
            r = self._client.get_snapshot_block(
                SnapshotId=snapshot_id, BlockIndex=index, BlockToken=token
            )
        except BOTO_ERRORS as err:
            raise boto_error(err, token) from err
        except UNPARSEABLE as err:
            raise garbled("GetSnapshotBlock", err, token) from err
        stream = r["BlockData"]
        try:
            # No more than a block and a byte: a body announcing a gigabyte is not
            # read whole into memory (the extra byte tells that it is too long).
            data = stream.read(BLOCK_SIZE + 1)
        except (botocore.exceptions.BotoCoreError, urllib3.exceptions.HTTPError, OSError) as err:
            raise TransientError(redact(f"reading block {index} failed: {err}", token)) from err
        finally:
            stream.close()
        if len(data) > BLOCK_SIZE:
            raise TransientError(f"GetSnapshotBlock {index}: a body longer than a block")
        checksum = r.get("Checksum", "")
        verify_block(data, checksum, r.get("ChecksumAlgorithm", ""), r.get("DataLength", -1))
        if into is None:
            return Block(data, checksum)
        into[:] = data
        return Block(into, checksum)


def garbled(operation: str, err: Exception, *secrets: str | None) -> TransientError:
    """An answer botocore could not parse, as a transient failure (message redacted)."""
    text = " ".join(f"{type(err).__name__}: {err}".split())[:200]
    return TransientError(redact(f"{operation}: an answer that does not parse ({text})", *secrets))


def _paging(start_index: int, next_token: str | None, max_results: int) -> dict[str, Any]:
    """Paging parameters: the service ignores StartingBlockIndex once a NextToken is given."""
    if next_token:
        return {"MaxResults": max_results, "NextToken": next_token}
    return {"MaxResults": max_results, "StartingBlockIndex": start_index}


MAX_VOLUME_GIB = 1024 * 1024
"""A VolumeSize above this (1 PiB; EBS volumes end at 64 TiB) is not believed."""
MAX_TOKEN = 4096
"""Characters of a block or page token accepted (the service's are about 200)."""


def _bad_page(what: str) -> ServiceError:
    """A list answer that cannot be right (a broken or hostile endpoint): not retried."""
    return ServiceError(f"the service's list answer cannot be right: {what}")


def _page_fields(r: dict[str, Any], operation: str) -> dict[str, Any]:
    """What every list page carries besides its entries, checked: these sizes decide
    how much ebsfs lists, allocates and serves."""
    volume = r.get("VolumeSize")
    if type(volume) is not int or not 0 < volume <= MAX_VOLUME_GIB:
        raise _bad_page(f"{operation}: VolumeSize {str(volume)[:40]!r}")
    block_size = r.get("BlockSize", BLOCK_SIZE)
    if block_size != BLOCK_SIZE:
        raise _bad_page(f"{operation}: BlockSize {str(block_size)[:40]!r}, not {BLOCK_SIZE}")
    next_token = r.get("NextToken") or None
    if next_token is not None and (not isinstance(next_token, str) or len(next_token) > MAX_TOKEN):
        raise _bad_page(f"{operation}: a NextToken that is not a short string")
    return {
        "next_token": next_token,
        "expiry": r["ExpiryTime"].timestamp() if "ExpiryTime" in r else float("inf"),
        "volume_size": volume * GIB,
        "block_size": block_size,
    }


def _entries(r: dict[str, Any], key: str, max_results: int) -> list[dict[str, Any]]:
    """A page's entries: a list of at most `max_results` objects."""
    entries = r.get(key, [])
    if not isinstance(entries, list) or len(entries) > max_results:
        raise _bad_page(f"{key}: not a list of at most {max_results} entries")
    if not all(isinstance(entry, dict) for entry in entries):
        raise _bad_page(f"{key}: an entry that is not an object")
    return entries


def _index(entry: dict[str, Any], key: str, fields: dict[str, Any]) -> int:
    """A block index inside the volume the page describes."""
    index = entry.get(key)
    if type(index) is not int or not 0 <= index < fields["volume_size"] // BLOCK_SIZE:
        raise _bad_page(f"{key} {str(index)[:40]!r} outside the volume")
    return index


def _token(entry: dict[str, Any], key: str, optional: bool = False) -> Any:
    """A block token: a short string (absent only where `optional`)."""
    token = entry.get(key)
    if token is None and optional:
        return None
    if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN:
        raise _bad_page(f"a {key} that is not a short string")
    return token
