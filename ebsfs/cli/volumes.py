"""`--volume`: a volume's completed snapshots from EC2 (DescribeSnapshots, every page,
ours and those shared with us), for `mount --volume` and `history`. One-line errors
for a malformed id, a volume with no snapshot we may read, and EC2 that cannot say."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ebsfs.errors import UserInputError
from ebsfs.service.ec2 import Ec2Snapshots, SnapshotInfo
from ebsfs.service.session import ConnectionOptions, custom_endpoint_set

VOLUME_ID = re.compile(r"vol-[0-9a-f]{1,60}")


def check_volume_id(volume_id: str) -> str:
    if not VOLUME_ID.fullmatch(volume_id):
        raise UserInputError(
            f"invalid volume id {volume_id!r}: expected 'vol-' followed by hex digits"
        )
    return volume_id


@dataclass
class VolumeSnapshots:
    """The snapshots of some volumes, oldest first, with their EC2 metadata."""

    snapshots: list[SnapshotInfo]

    @property
    def ids(self) -> list[str]:
        return [s.snapshot_id for s in self.snapshots]

    @property
    def start_times(self) -> dict[str, float]:
        return {s.snapshot_id: s.start_time.timestamp() for s in self.snapshots}


def volume_snapshots(
    options: ConnectionOptions, volumes: list[str], ec2_endpoint_url: str | None
) -> VolumeSnapshots:
    """Every completed snapshot of `volumes` we may read, oldest first. Raises
    UserInputError for a volume with none (EC2 cannot tell an unknown volume from one
    without snapshots: both list nothing) and MetadataUnavailable when EC2 refuses or
    cannot be reached."""
    for volume in volumes:
        check_volume_id(volume)
    if len(set(volumes)) != len(volumes):
        raise UserInputError("a volume id is given twice")
    if custom_endpoint_set("EBS", options.endpoint_url) and not custom_endpoint_set(
        "EC2", ec2_endpoint_url
    ):
        raise UserInputError(
            "--volume asks EC2 for the volume's snapshots: with a custom EBS endpoint, "
            "give --ec2-endpoint-url (or AWS_ENDPOINT_URL_EC2) too"
        )
    found = Ec2Snapshots(options, ec2_endpoint_url).volume_snapshots(volumes)
    for volume in volumes:
        if not any(s.volume_id == volume for s in found):
            raise UserInputError(
                f"volume {volume}: no completed snapshot of it is ours or shared with "
                "us (an unknown volume lists none either; ebsfs ls --volume shows "
                "what EC2 lists)"
            )
    return VolumeSnapshots(found)
