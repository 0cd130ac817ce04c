"""EC2's model cut to DescribeSnapshots (ebsfs/service/models): the EC2 client uses it,
the EBS client does not, a user's AWS_DATA_PATH still wins, and every field ebsfs sends
or reads has the same shape in the cut as in the installed botocore."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import botocore.config
import botocore.loaders
import pytest

from ebsfs.service.ec2 import Ec2Snapshots
from ebsfs.service.session import EC2_API_VERSION, MODELS, AwsSession, ConnectionOptions

CUT = MODELS / "ec2" / EC2_API_VERSION / "service-2.json"
USED = {
    "DescribeSnapshotsRequest": [
        "SnapshotIds",
        "Filters",
        "OwnerIds",
        "RestorableByUserIds",
        "NextToken",
        "MaxResults",
    ],
    "DescribeSnapshotsResult": ["Snapshots", "NextToken"],
    "Snapshot": [
        "SnapshotId",
        "VolumeId",
        "VolumeSize",
        "StartTime",
        "State",
        "OwnerId",
        "Description",
        "Encrypted",
        "KmsKeyId",
        "Tags",
    ],
    "Tag": ["Key", "Value"],
    "Filter": ["Name", "Values"],
}
"""The members ebsfs sends (service/ec2.py's calls) and reads (SnapshotInfo.from_ec2)."""


@pytest.fixture(scope="module")
def full() -> dict[str, Any]:
    return botocore.loaders.create_loader().load_service_model("ec2", "service-2", EC2_API_VERSION)


def resolved(model: dict[str, Any], name: str, depth: int = 0) -> Any:
    """A shape with the shapes it names put in place (a few levels: enough for these)."""
    shape = {k: v for k, v in model["shapes"][name].items() if k != "documentation"}
    if depth > 4:
        return shape
    for key in ("member", "key", "value"):
        if key in shape:
            shape[key] = resolved(model, shape[key]["shape"], depth + 1)
    if "members" in shape:
        shape["members"] = {
            member: {
                **{k: v for k, v in ref.items() if k not in ("shape", "documentation")},
                "shape": resolved(model, ref["shape"], depth + 1),
            }
            for member, ref in shape["members"].items()
        }
    return shape


def test_the_fields_ebsfs_uses_have_the_installed_botocores_shapes(full: dict[str, Any]) -> None:
    cut = json.loads(CUT.read_text())
    assert list(cut["operations"]) == ["DescribeSnapshots"]
    operation = dict(full["operations"]["DescribeSnapshots"])
    del operation["documentation"]
    assert cut["operations"]["DescribeSnapshots"] == operation
    assert cut["metadata"] == full["metadata"]
    for shape, members in USED.items():
        for member in members:
            ours = resolved(cut, shape)["members"].get(member)
            theirs = resolved(full, shape)["members"][member]
            assert ours == theirs, (
                f"{shape}.{member} differs from botocore's: run scripts/trim_ec2_model.py"
            )


def test_the_script_writes_the_cut_with_every_shape_it_names(tmp_path: Path) -> None:
    written = tmp_path / "service-2.json"
    subprocess.run(
        [sys.executable, "scripts/trim_ec2_model.py", "--output", str(written)],
        cwd=MODELS.parents[2],
        check=True,
        capture_output=True,
    )
    cut = json.loads(written.read_text())
    assert "documentation" not in written.read_text()
    assert list(cut["operations"]) == ["DescribeSnapshots"]
    for name in cut["shapes"]:
        resolved(cut, name)  # a shape named but missing raises KeyError


def test_the_ec2_client_is_made_from_the_cut_and_the_ebs_client_is_not() -> None:
    session = AwsSession(ConnectionOptions(region="us-east-1"))
    ec2 = session.client("ec2", botocore.config.Config())
    ebs = session.client("ebs", botocore.config.Config())
    assert ec2.meta.service_model.operation_names == ["DescribeSnapshots"]
    assert ec2.meta.endpoint_url == "https://ec2.us-east-1.amazonaws.com"
    assert ec2.can_paginate("describe_snapshots")  # paginators: botocore's
    assert "GetSnapshotBlock" in ebs.meta.service_model.operation_names


def test_a_users_aws_data_path_still_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mine = tmp_path / "ec2" / EC2_API_VERSION
    mine.mkdir(parents=True)
    model = json.loads(CUT.read_text())
    model["operations"]["DescribeVolumes"] = {
        **model["operations"]["DescribeSnapshots"],
        "name": "DescribeVolumes",
    }
    (mine / "service-2.json").write_text(json.dumps(model))
    monkeypatch.setenv("AWS_DATA_PATH", str(tmp_path))
    client = AwsSession(ConnectionOptions(region="us-east-1")).client(
        "ec2", botocore.config.Config()
    )
    assert client.meta.service_model.operation_names == ["DescribeSnapshots", "DescribeVolumes"]


def test_describe_snapshots_through_the_cut(emulator) -> None:
    """The cut serialises the call and parses EC2's XML answer (the emulator's)."""
    emulator.store.add_snapshot("snap-0c7", {0: b"c" * 512 * 1024}, volume_size_gib=3)
    found = Ec2Snapshots(ConnectionOptions(region="us-east-1"), emulator.url).describe(["snap-0c7"])
    assert list(found) == ["snap-0c7"]
    assert found["snap-0c7"].volume_size_gib == 3
    assert found["snap-0c7"].start_time.tzinfo is not None


def test_sessions_share_one_loader_per_search_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The EC2 lookup's session parses no model the EBS client's session has parsed."""
    first = AwsSession(ConnectionOptions(region="us-east-1")).core.get_component("data_loader")
    again = AwsSession(ConnectionOptions(region="eu-west-1")).core.get_component("data_loader")
    assert first is again
    assert str(MODELS) in first.search_paths
    monkeypatch.setenv("AWS_DATA_PATH", str(tmp_path))
    other = AwsSession(ConnectionOptions(region="us-east-1")).core.get_component("data_loader")
    assert other is not first
    assert other.search_paths[:2] == [str(tmp_path), str(MODELS)]
