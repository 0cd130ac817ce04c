"""The only module that talks to boto3: the three EBS direct API reads, checksum
verification, timeouts, and the mapping of botocore errors to ebsfs's typed errors."""

from __future__ import annotations

import base64
import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import boto3
import botocore.config
import botocore.exceptions
import urllib3.exceptions

from ebsfs import BLOCK_SIZE, GIB
from ebsfs.errors import (
    ChecksumMismatch,
    CredentialsMissing,
    EndpointUnreachable,
    Throttled,
    TransientError,
    UserInputError,
    service_error,
)
from ebsfs.retry import RetryPolicy

log = logging.getLogger(__name__)

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


class EbsApi(Protocol):
    """What ebsfs needs of the service; the boto3 client, test fakes and failure
    injectors all provide it. Errors are ebsfs.errors types, never botocore's."""

    def list_snapshot_blocks(
        self, snapshot_id: str, start_index: int = 0, next_token: str | None = None,
        max_results: int = MAX_RESULTS,
    ) -> BlockPage: ...

    def list_changed_blocks(
        self, first_id: str, second_id: str, start_index: int = 0,
        next_token: str | None = None, max_results: int = MAX_RESULTS,
    ) -> ChangedPage: ...

    def get_snapshot_block(self, snapshot_id: str, index: int, token: str) -> bytes: ...


def verify_block(data: bytes, checksum: str, algorithm: str, data_length: int) -> None:
    """Raise ChecksumMismatch unless `data` is the whole block its headers describe."""
    if algorithm != "SHA256":
        raise ChecksumMismatch(f"unexpected checksum algorithm {algorithm!r}")
    if len(data) != data_length or len(data) != BLOCK_SIZE:
        raise ChecksumMismatch(f"body holds {len(data)} bytes, header says {data_length}")
    if base64.b64encode(hashlib.sha256(data).digest()).decode() != checksum:
        raise ChecksumMismatch("SHA-256 of the body does not match x-amz-Checksum")


@dataclass
class ConnectionOptions:
    """Where and as whom to connect; unset fields fall back to the AWS chain."""

    region: str | None = None
    profile: str | None = None
    endpoint_url: str | None = None
    max_connections: int = 64
    connect_timeout: float = 5.0
    read_timeout: float = 20.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)


class BotoEbsApi:
    """EbsApi over one boto3 client (thread-safe; shared by all worker threads).

    botocore's own retries are off: they cannot cover reading the body, and two layers
    of retries multiply. RetryPolicy is the one place that decides."""

    def __init__(self, options: ConnectionOptions) -> None:
        self._retry = options.retry
        self.throttles = 0
        """RequestThrottledException answers so far (read by the fetch limiter)."""
        config = botocore.config.Config(
            retries={"mode": "standard", "total_max_attempts": 1},
            max_pool_connections=options.max_connections,
            connect_timeout=options.connect_timeout,
            read_timeout=options.read_timeout,
            user_agent_extra="ebsfs",
        )
        try:
            session = boto3.session.Session(
                profile_name=options.profile, region_name=options.region
            )
            self._client = session.client("ebs", endpoint_url=options.endpoint_url, config=config)
        except botocore.exceptions.ProfileNotFound as err:
            raise UserInputError(f"AWS profile not found: {options.profile}") from err
        except botocore.exceptions.NoRegionError as err:
            raise UserInputError(
                "no AWS region configured: pass --region or set AWS_REGION"
            ) from err
        except ValueError as err:  # a malformed endpoint URL
            raise UserInputError(f"invalid endpoint URL: {err}") from err

    def _call(self, operation: str, **params: Any) -> dict[str, Any]:
        def attempt() -> dict[str, Any]:
            try:
                return getattr(self._client, operation)(**params)  # type: ignore[no-any-return]
            except botocore.exceptions.ClientError as err:
                raise self._note(_map_client_error(err)) from err
            except botocore.exceptions.NoCredentialsError as err:
                raise CredentialsMissing(
                    "no AWS credentials found (environment, --profile, config files, "
                    "instance role)"
                ) from err
            except (
                botocore.exceptions.EndpointConnectionError,
                botocore.exceptions.ConnectTimeoutError,
            ) as err:
                raise EndpointUnreachable(f"cannot reach {err.kwargs.get('endpoint_url')}") from err
            except (botocore.exceptions.BotoCoreError, urllib3.exceptions.HTTPError) as err:
                raise TransientError(f"{type(err).__name__}: {err}") from err

        return self._retry.call(operation, attempt)

    def _note(self, err: Exception) -> Exception:
        if isinstance(err, Throttled):
            self.throttles += 1  # a lost update under a race only delays the back-off
        return err

    def list_snapshot_blocks(
        self, snapshot_id: str, start_index: int = 0, next_token: str | None = None,
        max_results: int = MAX_RESULTS,
    ) -> BlockPage:
        params: dict[str, Any] = {"SnapshotId": snapshot_id, "MaxResults": max_results}
        if next_token:
            params["NextToken"] = next_token
        else:
            params["StartingBlockIndex"] = start_index
        r = self._call("list_snapshot_blocks", **params)
        return BlockPage(
            blocks=[(b["BlockIndex"], b["BlockToken"]) for b in r.get("Blocks", [])],
            next_token=r.get("NextToken") or None,
            expiry=r["ExpiryTime"].timestamp() if "ExpiryTime" in r else float("inf"),
            volume_size=r["VolumeSize"] * GIB,
            block_size=r.get("BlockSize", BLOCK_SIZE),
        )

    def list_changed_blocks(
        self, first_id: str, second_id: str, start_index: int = 0,
        next_token: str | None = None, max_results: int = MAX_RESULTS,
    ) -> ChangedPage:
        params: dict[str, Any] = {
            "FirstSnapshotId": first_id, "SecondSnapshotId": second_id, "MaxResults": max_results,
        }
        if next_token:
            params["NextToken"] = next_token
        else:
            params["StartingBlockIndex"] = start_index
        r = self._call("list_changed_blocks", **params)
        return ChangedPage(
            changes=[
                ChangedBlock(c["BlockIndex"], c.get("FirstBlockToken"), c.get("SecondBlockToken"))
                for c in r.get("ChangedBlocks", [])
            ],
            next_token=r.get("NextToken") or None,
            expiry=r["ExpiryTime"].timestamp() if "ExpiryTime" in r else float("inf"),
            volume_size=r["VolumeSize"] * GIB,
            block_size=r.get("BlockSize", BLOCK_SIZE),
        )

    def get_snapshot_block(self, snapshot_id: str, index: int, token: str) -> bytes:
        """The verified bytes of one block. The GET and the body read are retried
        together: botocore's retries end when the headers arrive."""

        def attempt() -> bytes:
            try:
                r = self._client.get_snapshot_block(
                    SnapshotId=snapshot_id, BlockIndex=index, BlockToken=token
                )
            except botocore.exceptions.ClientError as err:
                raise self._note(_map_client_error(err)) from err
            except (botocore.exceptions.BotoCoreError, urllib3.exceptions.HTTPError) as err:
                raise TransientError(f"{type(err).__name__}: {err}") from err
            stream = r["BlockData"]
            try:
                data = stream.read()
            except (botocore.exceptions.BotoCoreError, urllib3.exceptions.HTTPError,
                    OSError) as err:
                raise TransientError(f"reading block {index} failed: {err}") from err
            finally:
                stream.close()
            verify_block(data, r.get("Checksum", ""), r.get("ChecksumAlgorithm", ""),
                         r.get("DataLength", -1))
            return data

        return self._retry.call(f"GetSnapshotBlock {snapshot_id}:{index}", attempt)


def _map_client_error(err: botocore.exceptions.ClientError) -> Exception:
    response = err.response
    code = response.get("Error", {}).get("Code", "")
    message = response.get("Error", {}).get("Message", "")
    reason = str(response.get("Reason", "") or "")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    if status >= 500 and code not in ("",):
        return TransientError(f"{code} (HTTP {status}): {message}")
    return service_error(code, reason, message)
