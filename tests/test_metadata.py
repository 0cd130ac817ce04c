"""Snapshot metadata from EC2 (DescribeSnapshots) against moto's EC2 mock beside the
EBS emulator: in the manifest of `ebsfs get`, as the mounted images' mtime, and in
`ebsfs ls`; what happens when EC2 says no (each failure in one line); and where the
EC2 endpoint comes from."""

from __future__ import annotations

import datetime
import http.server
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import boto3
import botocore.exceptions
import pytest

from ebsfs.emulator import EmulatorServer
from ebsfs.errors import MetadataUnavailable, UserInputError
from ebsfs.service.ec2 import Ec2Snapshots, lookup
from ebsfs.service.session import ConnectionOptions
from tests.acquiring import add, sparse_blocks
from tests.fakes import pattern_block
from tests.localhttp import serving, url_of
from tests.mounting import ebsfs, mounted, needs_fuse
from tests.test_cli import assert_one_line_error


@pytest.fixture
def moto_ec2(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """moto's EC2 as a server on a free port (its DescribeSnapshots is faithful),
    without the hundreds of AMI snapshots it otherwise preloads."""
    from moto.server import ThreadedMotoServer

    monkeypatch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset", method="POST"))
    try:
        yield url
    finally:
        server.stop()


def ec2_snapshot(
    url: str, size_gib: int, description: str, tags: dict[str, str], encrypted: bool = False
) -> dict:
    ec2 = boto3.client("ec2", endpoint_url=url, region_name="us-east-1")
    volume = ec2.create_volume(Size=size_gib, AvailabilityZone="us-east-1a", Encrypted=encrypted)
    spec = [{"ResourceType": "snapshot", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}]
    snap = ec2.create_snapshot(
        VolumeId=volume["VolumeId"],
        Description=description,
        **({"TagSpecifications": spec} if tags else {}),
    )
    return ec2.describe_snapshots(SnapshotIds=[snap["SnapshotId"]])["Snapshots"][0]


def test_get_records_the_snapshots_ec2_metadata(
    emulator: EmulatorServer, moto_ec2: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snap = ec2_snapshot(
        moto_ec2, 1, "web server, before the incident", {"case": "42"}, encrypted=True
    )
    add(emulator.store, snap["SnapshotId"], sparse_blocks(1, volume_gib=1), volume_gib=1)
    monkeypatch.setenv("AWS_ENDPOINT_URL_EBS", emulator.url)
    monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", moto_ec2)
    out = tmp_path / "disk.img"
    result = ebsfs("get", snap["SnapshotId"], str(out))
    assert result.returncode == 0, result.stderr
    assert "EC2" not in result.stderr
    m = json.loads((tmp_path / "disk.img.manifest.json").read_text())
    recorded = m["snapshot"]
    assert recorded["SnapshotId"] == snap["SnapshotId"]
    assert recorded["StartTime"] == snap["StartTime"].astimezone(datetime.UTC).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ"
    )
    assert recorded["VolumeId"] == snap["VolumeId"]
    assert recorded["OwnerId"] == snap["OwnerId"] == "123456789012"
    assert recorded["Description"] == "web server, before the incident"
    assert recorded["Encrypted"] is True and recorded["KmsKeyId"] == snap.get("KmsKeyId")
    assert recorded["Tags"] == {"case": "42"}
    assert m["snapshot_note"] is None


class _Refusing(http.server.BaseHTTPRequestHandler):
    """An EC2 endpoint that refuses every call, as IAM does without
    ec2:DescribeSnapshots."""

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        body = (
            b'<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error>'
            b"<Code>UnauthorizedOperation</Code><Message>You are not authorized to "
            b"perform this operation.</Message></Error></Errors><RequestID>1</RequestID>"
            b"</Response>"
        )
        self.send_response(403)
        self.send_header("Content-Type", "text/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def refusing_ec2() -> Iterator[str]:
    with serving(_Refusing) as server:
        yield url_of(server)


def test_get_without_describe_permission_says_so_once(
    emulator: EmulatorServer, refusing_ec2: str, tmp_path: Path
) -> None:
    add(emulator.store, "snap-0d1", {0: pattern_block(1, 0)}, volume_gib=1)
    out = tmp_path / "disk.img"
    result = ebsfs(
        "get",
        "--endpoint-url",
        emulator.url,
        "--ec2-endpoint-url",
        refusing_ec2,
        "snap-0d1",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if "EC2" in line]
    assert notes == [
        "ebsfs: info: manifest without EC2 metadata: EC2 refused "
        "DescribeSnapshots (UnauthorizedOperation): the credentials need "
        "ec2:DescribeSnapshots"
    ]
    m = json.loads((tmp_path / "disk.img.manifest.json").read_text())
    assert m["snapshot"] is None and "ec2:DescribeSnapshots" in m["snapshot_note"]
    assert ebsfs("verify", str(out)).returncode == 0


def test_ls_lists_completed_snapshots(moto_ec2: str, monkeypatch: pytest.MonkeyPatch) -> None:
    first = ec2_snapshot(moto_ec2, 8, "root  volume\nnightly", {"k": "v"})
    second = ec2_snapshot(moto_ec2, 16, "data", {}, encrypted=True)
    monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", moto_ec2)
    table = ebsfs("ls")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == [
        "SNAPSHOT",
        "VOLUME",
        "SIZE",
        "START",
        "(UTC)",
        "ENCRYPTED",
        "DESCRIPTION",
    ]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert sorted(rows) == sorted([first["SnapshotId"], second["SnapshotId"]])
    assert rows[first["SnapshotId"]].split()[1:4] == [first["VolumeId"], "8", "GiB"]
    assert rows[first["SnapshotId"]].split()[6:] == ["no", "root", "volume", "nightly"]
    assert rows[second["SnapshotId"]].split()[6:] == ["yes", "data"]
    listed = json.loads(ebsfs("ls", "--json", "--volume", second["VolumeId"]).stdout)
    assert [s["SnapshotId"] for s in listed] == [second["SnapshotId"]]
    assert listed[0]["VolumeSize"] == 16 and listed[0]["Encrypted"] is True
    assert listed[0]["StartTime"].endswith("Z")
    mine = json.loads(ebsfs("ls", "--json", "--owner", "self").stdout)
    assert len(mine) == 2


def test_ls_without_permission(refusing_ec2: str) -> None:
    result = ebsfs("ls", "--ec2-endpoint-url", refusing_ec2)
    assert_one_line_error(result, "ec2:DescribeSnapshots")


@needs_fuse
def test_mounted_image_mtime_is_the_snapshot_start_time(
    emulator: EmulatorServer, moto_ec2: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snap = ec2_snapshot(moto_ec2, 1, "mtime", {})
    add(emulator.store, snap["SnapshotId"], {0: pattern_block(2, 0)}, volume_gib=1)
    monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", moto_ec2)
    with mounted(emulator.url, [snap["SnapshotId"]], tmp_path / "mnt") as mnt:
        image = mnt / f"{snap['SnapshotId']}.img"
        assert image.stat().st_mtime == pytest.approx(snap["StartTime"].timestamp(), abs=1e-3)


def client_error(status: int, code: str, message: str) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "DescribeSnapshots",
    )


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (
            client_error(403, "UnauthorizedOperation", "You are not authorized."),
            "EC2 refused DescribeSnapshots (UnauthorizedOperation): the credentials need "
            "ec2:DescribeSnapshots",
        ),
        (
            client_error(400, "InvalidSnapshot.NotFound", "The snapshot 'snap-1' does not exist."),
            "EC2 does not know the snapshot (InvalidSnapshot.NotFound: The snapshot 'snap-1' "
            "does not exist.)",
        ),
        (
            client_error(503, "Unavailable", "try later"),
            "EC2 DescribeSnapshots failed: Unavailable 503: try later",
        ),
        (botocore.exceptions.NoCredentialsError(), "no AWS credentials found for EC2"),
        (
            botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:9"),
            "cannot reach the EC2 endpoint http://127.0.0.1:9",
        ),
        (
            botocore.exceptions.CredentialRetrievalError(provider="process", error_msg="exit 1"),
            "EC2 DescribeSnapshots failed: CredentialRetrievalError: Error when retrieving "
            "credentials from process: exit 1",
        ),
        (KeyError("Snapshots"), "EC2 DescribeSnapshots failed: KeyError: 'Snapshots'"),
    ],
)
def test_each_ec2_failure_is_one_line_about_the_metadata(error: Exception, message: str) -> None:
    """The botocore error mapping shared with the EBS client, worded for EC2."""
    ec2 = Ec2Snapshots(ConnectionOptions(), endpoint_url="http://127.0.0.1:9")

    def failing() -> None:
        raise error

    with pytest.raises(MetadataUnavailable) as err:
        ec2._call(failing)
    assert str(err.value) == message
    assert err.value.__cause__ is error


def test_ec2_endpoint_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_EBS", "http://127.0.0.1:7")  # EBS's own
    assert Ec2Snapshots(ConnectionOptions()).endpoint_url == "https://ec2.us-east-1.amazonaws.com"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:8")
    assert Ec2Snapshots(ConnectionOptions()).endpoint_url == "http://127.0.0.1:8"
    monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", "http://127.0.0.1:9")
    assert Ec2Snapshots(ConnectionOptions()).endpoint_url == "http://127.0.0.1:9"
    assert (
        Ec2Snapshots(ConnectionOptions(), "http://127.0.0.1:10").endpoint_url
        == "http://127.0.0.1:10"
    )


def test_ec2_configuration_mistakes_are_user_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserInputError, match="^AWS profile not found: nope$"):
        Ec2Snapshots(ConnectionOptions(profile="nope"))
    with pytest.raises(UserInputError, match="^invalid EC2 endpoint URL: "):
        Ec2Snapshots(ConnectionOptions(), "not a url")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    with pytest.raises(UserInputError, match="^no AWS region configured"):
        Ec2Snapshots(ConnectionOptions())
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    assert Ec2Snapshots(ConnectionOptions()).endpoint_url == "https://ec2.eu-west-1.amazonaws.com"


def test_lookup_asks_ec2_only_where_it_would_know_the_snapshots(
    refusing_ec2: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    custom_ebs = ConnectionOptions(endpoint_url="http://127.0.0.1:7")
    assert lookup(custom_ebs, ["snap-1"]).asked is False
    monkeypatch.setenv("AWS_ENDPOINT_URL_EBS", "http://127.0.0.1:7")
    assert lookup(ConnectionOptions(), ["snap-1"]).asked is False
    monkeypatch.setenv("AWS_ENDPOINT_URL", refusing_ec2)  # EC2 too, now
    answer = lookup(ConnectionOptions(), ["snap-1"])
    assert answer.asked is True and answer.found == {}
    assert answer.note is not None and "ec2:DescribeSnapshots" in answer.note
    assert lookup(custom_ebs, ["snap-1"], refusing_ec2).asked is True
