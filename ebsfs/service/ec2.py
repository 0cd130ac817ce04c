"""Snapshot metadata from EC2 (DescribeSnapshots): the start time, volume, owner,
description, encryption and tags that `ebsfs get` records in its manifest, that a
mount shows as each image's mtime, and that `ebsfs ls` lists.

Reading a snapshot needs no EC2 permission, so none is assumed: where
ec2:DescribeSnapshots is refused or EC2 cannot be reached, `lookup` says why in one
line and the caller goes on without. Its session comes from session.py and its errors
are mapped by failures.py, as the EBS client's are; botocore's own retries fit these
few small calls (EC2 is not the EBS direct API)."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import botocore.config

from ebsfs.errors import (
    CredentialRefreshFailed,
    CredentialsMissing,
    EbsfsError,
    EndpointUnreachable,
    MetadataUnavailable,
    ServiceError,
    UserInputError,
)
from ebsfs.service.failures import boto_error, one_line
from ebsfs.service.session import AwsSession, ConnectionOptions, custom_endpoint_set

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_VOLUME_SNAPSHOTS = 1000
"""Most snapshots of the volumes one `mount --volume` or `history` takes."""
REFUSALS = ("UnauthorizedOperation", "AccessDenied", "AccessDeniedException")
"""EC2's error codes for a missing ec2:DescribeSnapshots permission."""


@dataclass(frozen=True)
class SnapshotInfo:
    snapshot_id: str
    volume_id: str
    volume_size_gib: int
    start_time: datetime.datetime
    state: str
    owner_id: str
    description: str
    encrypted: bool
    kms_key_id: str | None
    tags: dict[str, str]

    @classmethod
    def from_ec2(cls, item: dict[str, Any]) -> SnapshotInfo:
        start = item["StartTime"]
        if start.tzinfo is None:
            start = start.replace(tzinfo=datetime.UTC)
        return cls(
            snapshot_id=item["SnapshotId"],
            volume_id=item.get("VolumeId", ""),
            volume_size_gib=int(item.get("VolumeSize", 0)),
            start_time=start.astimezone(datetime.UTC),
            state=item.get("State", ""),
            owner_id=item.get("OwnerId", ""),
            description=item.get("Description", ""),
            encrypted=bool(item.get("Encrypted", False)),
            kms_key_id=item.get("KmsKeyId"),
            tags={t["Key"]: t.get("Value", "") for t in item.get("Tags", [])},
        )

    @property
    def start_iso(self) -> str:
        return self.start_time.strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def as_json(self) -> dict[str, Any]:
        """EC2's own field names, as the manifest and `ebsfs ls --json` give them."""
        return {
            "SnapshotId": self.snapshot_id,
            "VolumeId": self.volume_id,
            "VolumeSize": self.volume_size_gib,
            "StartTime": self.start_iso,
            "State": self.state,
            "OwnerId": self.owner_id,
            "Description": self.description,
            "Encrypted": self.encrypted,
            "KmsKeyId": self.kms_key_id,
            "Tags": self.tags,
        }


class Ec2Snapshots:
    """DescribeSnapshots through boto3 (EC2 endpoint: `endpoint_url`, else
    AWS_ENDPOINT_URL_EC2 or AWS_ENDPOINT_URL, else AWS's)."""

    def __init__(self, options: ConnectionOptions, endpoint_url: str | None = None) -> None:
        config = botocore.config.Config(
            retries={"mode": "standard", "total_max_attempts": 3},
            connect_timeout=min(5.0, options.connect_timeout),
            read_timeout=10.0,
            user_agent_extra="ebsfs",
        )
        self._client = AwsSession(options).client(
            "ec2", config, endpoint_url, endpoint_name="EC2 endpoint URL"
        )
        self.endpoint_url: str = self._client.meta.endpoint_url

    def describe(self, snapshot_ids: list[str]) -> dict[str, SnapshotInfo]:
        items = self._call(
            lambda: self._client.describe_snapshots(SnapshotIds=snapshot_ids)["Snapshots"]
        )
        return {item["SnapshotId"]: SnapshotInfo.from_ec2(item) for item in items}

    def volume_snapshots(
        self, volumes: list[str], limit: int = MAX_VOLUME_SNAPSHOTS
    ) -> list[SnapshotInfo]:
        """Completed snapshots of those volumes that we may read: our own and those
        shared with us (public ones cannot be read through the EBS direct APIs), in
        StartTime order, all pages. Two listings, merged by snapshot id; an answer
        naming another volume is dropped (the endpoint's text is not trusted), and
        past `limit` snapshots UserInputError is raised (memory and the checks
        before a mount grow with them)."""
        filters = [
            {"Name": "status", "Values": ["completed"]},
            {"Name": "volume-id", "Values": volumes},
        ]

        def pages(**who: list[str]) -> Iterator[dict[str, Any]]:
            paginator = self._client.get_paginator("describe_snapshots")
            for page in paginator.paginate(Filters=filters, **who):
                yield from page.get("Snapshots", [])

        def both() -> dict[str, SnapshotInfo]:
            found: dict[str, SnapshotInfo] = {}
            for who in ({"OwnerIds": ["self"]}, {"RestorableByUserIds": ["self"]}):
                for item in pages(**who):
                    info = SnapshotInfo.from_ec2(item)
                    if info.volume_id in volumes:
                        found[info.snapshot_id] = info
                    if len(found) > limit:
                        raise UserInputError(
                            f"over {limit} completed snapshots of {', '.join(volumes)}: "
                            "name the snapshots to mount instead"
                        )
            return found

        found = self._call(both)
        return sorted(found.values(), key=lambda s: (s.start_time, s.snapshot_id))

    def list(self, owners: list[str], volumes: list[str]) -> list[SnapshotInfo]:
        """Completed snapshots of those owners (and volumes), oldest first."""
        filters = [{"Name": "status", "Values": ["completed"]}]
        if volumes:
            filters.append({"Name": "volume-id", "Values": volumes})

        def pages() -> Iterator[dict[str, Any]]:
            paginator = self._client.get_paginator("describe_snapshots")
            for page in paginator.paginate(OwnerIds=owners, Filters=filters):
                yield from page.get("Snapshots", [])

        found = self._call(lambda: [SnapshotInfo.from_ec2(item) for item in pages()])
        return sorted(found, key=lambda s: (s.start_time, s.snapshot_id))

    def _call(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except UserInputError:
            raise
        except Exception as err:  # botocore's parsers raise plain exceptions too
            raise self._unavailable(boto_error(err), err) from err

    def _unavailable(self, error: EbsfsError, cause: Exception) -> MetadataUnavailable:
        """The typed error of a failed EC2 call, said in terms of the metadata missed."""
        if isinstance(error, ServiceError) and error.code in REFUSALS:
            return MetadataUnavailable(
                f"EC2 refused DescribeSnapshots ({error.code}): the "
                "credentials need ec2:DescribeSnapshots"
            )
        if isinstance(error, ServiceError) and error.code.startswith("InvalidSnapshot"):
            return MetadataUnavailable(f"EC2 does not know the snapshot ({error})")
        if isinstance(error, CredentialsMissing):
            return MetadataUnavailable("no AWS credentials found for EC2")
        if isinstance(error, EndpointUnreachable):
            return MetadataUnavailable(f"cannot reach the EC2 endpoint {self.endpoint_url}")
        # A failed refresh's own hint speaks of reads; the cause says it for EC2.
        detail = one_line(cause) if isinstance(error, CredentialRefreshFailed) else str(error)
        return MetadataUnavailable(f"EC2 DescribeSnapshots failed: {detail[:200]}")


@dataclass
class Lookup:
    """What EC2 said about some snapshots: `found` by id, else `note` says why not;
    `asked` is False when no call was made."""

    found: dict[str, SnapshotInfo]
    note: str | None
    asked: bool


def lookup(
    options: ConnectionOptions, snapshot_ids: list[str], endpoint_url: str | None = None
) -> Lookup:
    """The snapshots' EC2 metadata, or why there is none: never an error. A custom EBS
    endpoint (an emulator, a private service) with no EC2 endpoint set means AWS's EC2
    would not know those snapshots: no call is made."""
    if not snapshot_ids:  # DescribeSnapshots of no id would list every snapshot
        return Lookup({}, None, asked=False)
    if custom_endpoint_set("EBS", options.endpoint_url) and not custom_endpoint_set(
        "EC2", endpoint_url
    ):
        return Lookup(
            {},
            "EC2 not asked: a custom EBS endpoint and no EC2 endpoint "
            "(--ec2-endpoint-url or AWS_ENDPOINT_URL_EC2)",
            asked=False,
        )
    try:
        found = Ec2Snapshots(options, endpoint_url).describe(snapshot_ids)
    except EbsfsError as err:
        return Lookup({}, str(err), asked=True)
    missing = [s for s in snapshot_ids if s not in found]
    return Lookup(
        found, f"EC2 did not describe {', '.join(missing)}" if missing else None, asked=True
    )
