"""Snapshot metadata from EC2 (DescribeSnapshots): the start time, volume, owner,
description, encryption and tags that `ebsfs get` records in its manifest, that a
mount shows as each image's mtime, and that `ebsfs ls` lists.

Reading a snapshot needs no EC2 permission, so none is assumed: where
ec2:DescribeSnapshots is refused or EC2 cannot be reached, `lookup` says why in one
line and the caller goes on without. The second boto3 user besides client.py (EC2
is not the EBS direct API): botocore's own retries fit these few small calls."""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
import botocore.session

from ebsfs.errors import EbsfsError, MetadataUnavailable, UserInputError
from ebsfs.service.client import ConnectionOptions

log = logging.getLogger(__name__)


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
            snapshot_id=item["SnapshotId"], volume_id=item.get("VolumeId", ""),
            volume_size_gib=int(item.get("VolumeSize", 0)),
            start_time=start.astimezone(datetime.UTC), state=item.get("State", ""),
            owner_id=item.get("OwnerId", ""), description=item.get("Description", ""),
            encrypted=bool(item.get("Encrypted", False)), kms_key_id=item.get("KmsKeyId"),
            tags={t["Key"]: t.get("Value", "") for t in item.get("Tags", [])},
        )

    @property
    def start_iso(self) -> str:
        return self.start_time.strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def as_json(self) -> dict[str, Any]:
        """EC2's own field names, as the manifest and `ebsfs ls --json` give them."""
        return {
            "SnapshotId": self.snapshot_id, "VolumeId": self.volume_id,
            "VolumeSize": self.volume_size_gib, "StartTime": self.start_iso,
            "State": self.state, "OwnerId": self.owner_id, "Description": self.description,
            "Encrypted": self.encrypted, "KmsKeyId": self.kms_key_id, "Tags": self.tags,
        }


def _configured(*names: str) -> bool:
    return any(os.environ.get(name) for name in names)


class Ec2Snapshots:
    """DescribeSnapshots through boto3 (EC2 endpoint: `endpoint_url`, else
    AWS_ENDPOINT_URL_EC2 or AWS_ENDPOINT_URL, else AWS's)."""

    def __init__(self, options: ConnectionOptions, endpoint_url: str | None = None) -> None:
        config = botocore.config.Config(
            retries={"mode": "standard", "total_max_attempts": 3},
            connect_timeout=min(5.0, options.connect_timeout), read_timeout=10.0,
            user_agent_extra="ebsfs",
        )
        try:
            core = botocore.session.Session(profile=options.profile)
            region = options.region or os.environ.get("AWS_REGION") or None
            session = boto3.session.Session(botocore_session=core, region_name=region)
            self._client = session.client("ec2", endpoint_url=endpoint_url, config=config)
        except botocore.exceptions.ProfileNotFound as err:
            raise UserInputError(f"AWS profile not found: {options.profile}") from err
        except botocore.exceptions.NoRegionError as err:
            raise UserInputError("no AWS region configured: pass --region or set "
                                 "AWS_REGION") from err
        except ValueError as err:
            raise UserInputError(f"invalid EC2 endpoint URL: {err}") from err
        self.endpoint_url: str = self._client.meta.endpoint_url

    def describe(self, snapshot_ids: list[str]) -> dict[str, SnapshotInfo]:
        items = self._call(lambda: self._client.describe_snapshots(
            SnapshotIds=snapshot_ids)["Snapshots"])
        return {item["SnapshotId"]: SnapshotInfo.from_ec2(item) for item in items}

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

    def _call(self, fn: Any) -> Any:
        try:
            return fn()
        except botocore.exceptions.ClientError as err:
            error = err.response.get("Error", {})
            code, message = error.get("Code", ""), error.get("Message") or ""
            if code in ("UnauthorizedOperation", "AccessDenied", "AccessDeniedException"):
                raise MetadataUnavailable(f"EC2 refused DescribeSnapshots ({code}): the "
                                          "credentials need ec2:DescribeSnapshots") from err
            if code.startswith("InvalidSnapshot"):
                raise MetadataUnavailable(f"EC2 does not know the snapshot ({code}: "
                                          f"{message})") from err
            raise MetadataUnavailable(f"EC2 DescribeSnapshots failed: {code or 'HTTP '} "
                                      f"{message}".rstrip()) from err
        except botocore.exceptions.NoCredentialsError as err:
            raise MetadataUnavailable("no AWS credentials found for EC2") from err
        except (botocore.exceptions.EndpointConnectionError,
                botocore.exceptions.ConnectTimeoutError) as err:
            raise MetadataUnavailable(f"cannot reach the EC2 endpoint "
                                      f"{self.endpoint_url}") from err
        except Exception as err:  # botocore's parsers raise plain exceptions too
            detail = " ".join(f"{type(err).__name__}: {err}".split())
            raise MetadataUnavailable(f"EC2 DescribeSnapshots failed: {detail[:200]}"
                                      ) from err


@dataclass
class Lookup:
    """What EC2 said about some snapshots: `found` by id, else `note` says why not;
    `asked` is False when no call was made."""

    found: dict[str, SnapshotInfo]
    note: str | None
    asked: bool


def lookup(options: ConnectionOptions, snapshot_ids: list[str],
           endpoint_url: str | None = None) -> Lookup:
    """The snapshots' EC2 metadata, or why there is none: never an error. A custom EBS
    endpoint (an emulator, a private service) with no EC2 endpoint set means AWS's EC2
    would not know those snapshots: no call is made."""
    ebs_custom = options.endpoint_url or _configured("AWS_ENDPOINT_URL_EBS", "AWS_ENDPOINT_URL")
    ec2_custom = endpoint_url or _configured("AWS_ENDPOINT_URL_EC2", "AWS_ENDPOINT_URL")
    if ebs_custom and not ec2_custom:
        return Lookup({}, "EC2 not asked: a custom EBS endpoint and no EC2 endpoint "
                      "(--ec2-endpoint-url or AWS_ENDPOINT_URL_EC2)", asked=False)
    try:
        found = Ec2Snapshots(options, endpoint_url).describe(snapshot_ids)
    except EbsfsError as err:
        return Lookup({}, str(err), asked=True)
    missing = [s for s in snapshot_ids if s not in found]
    return Lookup(found, f"EC2 did not describe {', '.join(missing)}" if missing else None,
                  asked=True)
