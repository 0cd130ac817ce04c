"""The emulator's EC2 DescribeSnapshots (issue 28): `ebsfs ls`, the mount's image
mtimes and `get`'s manifest work against the emulator alone, its snapshots described
as EC2 describes them (volume, size, start time, owner), filters and pages as EC2's,
EC2's own error shapes; and `python -m ebsfs.emulator.diskimage` has a real command
line (`--help` explains rather than writing a file named `--help`)."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import boto3
import botocore.config
import botocore.exceptions
import pytest

from ebsfs.emulator import EmulatorServer, Faults, SnapshotStore
from ebsfs.emulator import process as emulator_process
from ebsfs.emulator.__main__ import _snapshot_spec
from ebsfs.errors import MetadataUnavailable
from ebsfs.service.ec2 import Ec2Snapshots
from ebsfs.service.session import ConnectionOptions
from tests.fakes import pattern_block
from tests.mounting import ebsfs, mounted, needs_fuse, run_module
from tests.test_cli import assert_one_line_error

STARTED = 1_700_000_000.25
"""2023-11-14T22:13:20.250Z: EC2's timestamps carry milliseconds."""


@pytest.fixture
def served(emulator: EmulatorServer) -> EmulatorServer:
    """Two lineages: snap-0a1 and its child snap-0a2 of one volume, snap-0b1 alone (2 GiB)."""
    store = emulator.store
    store.add_snapshot("snap-0a1", {0: pattern_block(1, 0)}, start_time=STARTED)
    store.add_snapshot(
        "snap-0a2", {1: pattern_block(2, 1)}, parent="snap-0a1", start_time=STARTED + 3600
    )
    store.add_snapshot(
        "snap-0b1",
        {0: pattern_block(3, 0)},
        volume_size_gib=2,
        volume_id="vol-0123456789abcdef0",
        description="web-1 data, before",
        start_time=STARTED + 60,
    )
    return emulator


def ec2_client(url: str):
    return boto3.session.Session().client(
        "ec2",
        endpoint_url=url,
        region_name="us-east-1",
        config=botocore.config.Config(retries={"total_max_attempts": 1}),
    )


def code_of(err: pytest.ExceptionInfo[botocore.exceptions.ClientError]) -> tuple[str, int]:
    response = err.value.response
    return response["Error"]["Code"], response["ResponseMetadata"]["HTTPStatusCode"]


# ---- through boto3, as any EC2 client ------------------------------------------------


def test_describe_by_id_as_ec2_describes(served: EmulatorServer) -> None:
    found = ec2_client(served.url).describe_snapshots(SnapshotIds=["snap-0a2", "snap-0b1"])
    snaps = {s["SnapshotId"]: s for s in found["Snapshots"]}
    assert sorted(snaps) == ["snap-0a2", "snap-0b1"]
    child, other = snaps["snap-0a2"], snaps["snap-0b1"]
    assert child["VolumeId"] == "vol-0a1"  # the lineage's volume, derived from its root
    assert child["VolumeSize"] == 1 and other["VolumeSize"] == 2
    assert other["VolumeId"] == "vol-0123456789abcdef0"
    assert other["Description"] == "web-1 data, before" and child["Description"] == ""
    assert child["State"] == "completed" and child["Progress"] == "100%"
    assert child["OwnerId"] == "123456789012" and child["Encrypted"] is False
    assert child["StartTime"] == datetime.datetime(2023, 11, 14, 23, 13, 20, 250000, datetime.UTC)
    assert child.get("Tags", []) == []
    assert served.counters.calls["DescribeSnapshots"] == 1


def test_describe_snapshots_waits_the_latency_as_ebs_calls_do(served: EmulatorServer) -> None:
    """EC2 answers over the same network: a mount's mtime lookup is not free."""
    served.faults.latency, served.faults.jitter = 0.05, 0.01
    ec2_client(served.url).describe_snapshots(SnapshotIds=["snap-0b1"])
    assert served.counters.delayed_calls == 1
    assert 0.05 <= served.counters.delay_seconds <= 0.06


def test_filters_owners_and_wildcards(served: EmulatorServer) -> None:
    ec2 = ec2_client(served.url)

    def ids(**kwargs: object) -> list[str]:
        return sorted(s["SnapshotId"] for s in ec2.describe_snapshots(**kwargs)["Snapshots"])

    def only(name: str, *values: str) -> list[str]:
        return ids(Filters=[{"Name": name, "Values": list(values)}])

    everything = ["snap-0a1", "snap-0a2", "snap-0b1"]
    assert ids() == everything
    assert ids(OwnerIds=["self"]) == ids(OwnerIds=["123456789012"]) == everything
    assert ids(OwnerIds=["amazon"]) == ids(OwnerIds=["210987654321"]) == []
    assert only("volume-id", "vol-0a1") == ["snap-0a1", "snap-0a2"]
    assert only("volume-id", "vol-0a1", "vol-0123456789abcdef0") == everything
    assert only("status", "completed") == everything
    assert only("status", "pending", "error") == []
    assert only("owner-id", "123456789012") == everything
    assert only("description", "web-1*") == ["snap-0b1"]
    assert only("snapshot-id", "snap-0a?") == ["snap-0a1", "snap-0a2"]
    assert only("volume-size", "2") == ["snap-0b1"]
    assert only("encrypted", "false") == everything
    assert only("tag:case", "42") == []
    both = [
        {"Name": "status", "Values": ["completed"]},
        {"Name": "volume-id", "Values": ["vol-0a1"]},
    ]
    assert ids(OwnerIds=["self"], Filters=both) == ["snap-0a1", "snap-0a2"]
    assert ids(SnapshotIds=["snap-0a1"], Filters=both) == ["snap-0a1"]
    with pytest.raises(botocore.exceptions.ClientError) as err:
        only("colour", "blue")
    assert code_of(err) == ("InvalidParameterValue", 400)
    assert "colour" in str(err.value)
    with pytest.raises(botocore.exceptions.ClientError) as err:
        ids(OwnerIds=["someone"])
    assert code_of(err) == ("InvalidUserID.Malformed", 400)


def test_descriptions_xml_cannot_carry(served: EmulatorServer, tmp_path: Path) -> None:
    """An image named with an undecodable byte and an escape sequence: described, the
    characters XML cannot hold replaced, the rest kept."""
    name = os.fsdecode(b"web\xff\x1b[31m.img")
    (tmp_path / name).write_bytes(pattern_block(6, 0))
    served.store.add_image("snap-0e1", tmp_path / name)
    found = ec2_client(served.url).describe_snapshots(SnapshotIds=["snap-0e1"])
    assert found["Snapshots"][0]["Description"] == "web\ufffd\ufffd[31m.img"


def test_pages_with_max_results_and_next_token(served: EmulatorServer) -> None:
    for n in range(12):
        served.store.add_snapshot(f"snap-0c{n:02x}", {}, start_time=STARTED + n)
    ec2 = ec2_client(served.url)
    pages = list(
        ec2.get_paginator("describe_snapshots").paginate(
            OwnerIds=["self"], PaginationConfig={"PageSize": 5}
        )
    )
    assert [len(p["Snapshots"]) for p in pages] == [5, 5, 5]
    listed = [s["SnapshotId"] for p in pages for s in p["Snapshots"]]
    assert sorted(listed) == sorted(served.store.snapshot_ids())
    assert "NextToken" not in pages[-1]
    first = ec2.describe_snapshots(MaxResults=5)
    for bad in (
        {"MaxResults": 4},
        {"MaxResults": 1001},
        {"MaxResults": 5, "SnapshotIds": ["snap-0a1"]},
        {"NextToken": "bogus"},
        # A token of another query (another filter) is not this query's.
        {"NextToken": first["NextToken"], "Filters": [{"Name": "status", "Values": ["x"]}]},
    ):
        with pytest.raises(botocore.exceptions.ClientError) as err:
            ec2.describe_snapshots(**bad)
        assert code_of(err)[1] == 400, bad
        assert code_of(err)[0] in (
            "InvalidParameterValue",
            "InvalidParameterCombination",
            "InvalidPaginationToken",
        )


def test_unknown_and_malformed_snapshot_ids(served: EmulatorServer) -> None:
    ec2 = ec2_client(served.url)
    with pytest.raises(botocore.exceptions.ClientError) as err:
        ec2.describe_snapshots(SnapshotIds=["snap-0a1", "snap-0ffff"])
    assert code_of(err) == ("InvalidSnapshot.NotFound", 400)
    assert err.value.response["Error"]["Message"] == "The snapshot 'snap-0ffff' does not exist."
    for malformed in ("snap-zz", "vol-0a1", ""):
        with pytest.raises(botocore.exceptions.ClientError) as err:
            ec2.describe_snapshots(SnapshotIds=[malformed])
        assert code_of(err) == ("InvalidParameterValue", 400), malformed
        assert f"Value ({malformed}) for parameter snapshotId is invalid" in str(err.value)


def test_ec2_signatures_and_denied_keys(
    served: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checked as the EBS side checks them, answered in EC2's words."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(botocore.exceptions.ClientError) as err:
        ec2_client(served.url).describe_snapshots()
    assert code_of(err) == ("SignatureDoesNotMatch", 403)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDUNKNOWN")
    with pytest.raises(botocore.exceptions.ClientError) as err:
        ec2_client(served.url).describe_snapshots()
    assert code_of(err) == ("AuthFailure", 401)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    with pytest.raises(botocore.exceptions.ClientError) as err:
        ec2_client(served.url).describe_snapshots(DryRun=True)
    assert code_of(err) == ("DryRunOperation", 412)  # allowed, so it would have worked
    served.faults.deny_access_keys = ["AKIDTEST"]
    with pytest.raises(botocore.exceptions.ClientError) as err:
        ec2_client(served.url).describe_snapshots()
    assert code_of(err) == ("UnauthorizedOperation", 403)
    with pytest.raises(botocore.exceptions.ClientError) as err:
        ec2_client(served.url).describe_snapshots(DryRun=True)
    assert code_of(err) == ("UnauthorizedOperation", 403)  # as IAM answers a dry run


def test_a_body_changed_after_signing_is_refused(served: EmulatorServer) -> None:
    """The form body is part of what is signed: the same headers on another body fail."""
    ec2 = ec2_client(served.url)
    seen: dict[str, object] = {}

    def keep(request: object, **_: object) -> None:
        seen["request"] = request

    ec2.meta.events.register("before-send.ec2.DescribeSnapshots", keep)
    ec2.describe_snapshots(SnapshotIds=["snap-0a1"])
    request = seen["request"]
    headers = {k: v for k, v in request.headers.items()}  # type: ignore[attr-defined]
    sent = request.body  # type: ignore[attr-defined]
    body = (sent.encode() if isinstance(sent, str) else sent).replace(b"snap-0a1", b"snap-0b1")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(served.url + "/", body, headers))
    assert err.value.code == 403
    assert b"<Code>SignatureDoesNotMatch</Code>" in err.value.read()


def test_other_posts_are_not_taken_for_ec2(served: EmulatorServer) -> None:
    """Only a form with an Action is EC2; another action is EC2's InvalidAction; a
    POST of something else is an unknown EBS path, as a GET of one is."""
    ec2 = ec2_client(served.url)
    with pytest.raises(botocore.exceptions.ClientError) as err:
        ec2.describe_volumes()
    assert code_of(err) == ("InvalidAction", 400)
    request = urllib.request.Request(served.url + "/snapshots", b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as http_err:
        urllib.request.urlopen(request)
    assert http_err.value.code == 404
    assert http_err.value.headers["x-amzn-ErrorType"] == "UnknownOperationException"
    with urllib.request.urlopen(served.url + "/_emulator/stats") as answer:
        stats = json.load(answer)
    assert stats["calls"] == {"Ec2OtherAction": 1}
    assert stats["errors"] == {"InvalidAction": 1, "UnknownOperationException": 1}


def test_store_records_volume_and_start_time() -> None:
    store = SnapshotStore(Faults())
    before = store.add_snapshot("snap-0d1", {})
    child = store.add_snapshot("snap-0d2", {}, parent="snap-0d1")
    other = store.add_snapshot("snap-0d3", {}, parent="snap-0d1", volume_id="vol-0e")
    assert before.volume_id == child.volume_id == "vol-0d1" and other.volume_id == "vol-0e"
    assert before.start_time <= child.start_time
    for bad in ("vol-xyz", "snap-0d9", "vol-"):
        with pytest.raises(ValueError, match="volume id"):
            store.add_snapshot("snap-0d4", {}, volume_id=bad)


def test_snapshot_spec_takes_a_volume(tmp_path: Path) -> None:
    spec = _snapshot_spec("snap-0a=disk.img,parent=snap-09,volume=vol-0abc")
    assert spec == {
        "snapshot_id": "snap-0a",
        "path": "disk.img",
        "parent": "snap-09",
        "volume_id": "vol-0abc",
    }
    image = tmp_path / "web-1.img"
    image.write_bytes(pattern_block(4, 0))
    store = SnapshotStore(Faults())
    snap = store.add_image(**_snapshot_spec(f"snap-0f={image},volume=vol-0f00"))
    assert snap.volume_id == "vol-0f00"
    assert snap.description == "web-1.img"  # the image it serves, as `ebsfs ls` shows


def test_emulator_command_refuses_a_bad_volume(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(pattern_block(4, 0))
    result = run_module(
        "ebsfs.emulator", "--snapshot", f"snap-0a={image},volume=volume-1", timeout=30
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("ebsfs-emulator: error: ")
    assert "volume-1" in result.stderr and "Traceback" not in result.stderr


# ---- through ebsfs -----------------------------------------------------------------


def test_ebsfs_ls_against_the_emulator(
    served: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's try-it block: AWS_ENDPOINT_URL alone points EBS and EC2 at it."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", served.url)
    table = ebsfs("ls")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["SNAPSHOT", "VOLUME", "SIZE"]
    rows = [line.split() for line in lines[1:]]
    assert [row[:4] for row in rows] == [  # oldest first
        ["snap-0a1", "vol-0a1", "1", "GiB"],
        ["snap-0b1", "vol-0123456789abcdef0", "2", "GiB"],
        ["snap-0a2", "vol-0a1", "1", "GiB"],
    ]
    assert rows[0][4:7] == ["2023-11-14", "22:13:20", "no"]
    assert rows[1][7:] == ["web-1", "data,", "before"]
    listed = json.loads(ebsfs("ls", "--json", "--volume", "vol-0a1").stdout)
    assert [s["SnapshotId"] for s in listed] == ["snap-0a1", "snap-0a2"]
    assert listed[0]["StartTime"] == "2023-11-14T22:13:20.250000Z"
    assert listed[0]["State"] == "completed" and listed[0]["OwnerId"] == "123456789012"
    assert json.loads(ebsfs("ls", "--json", "--volume", "vol-0ffff").stdout) == []


@pytest.fixture
def emulator_command(tmp_path: Path) -> Iterator[str]:
    """`ebsfs-emulator` as a user starts it: two images of one volume, a third of
    another; signatures checked. Yields its URL."""
    for name, seed in (("monday.img", 1), ("tuesday.img", 2), ("data.img", 3)):
        (tmp_path / name).write_bytes(pattern_block(seed, 0) * 2)
    arguments = [
        "--credentials",
        "AKIDTEST:secret",
        "--snapshot",
        f"snap-0a1={tmp_path}/monday.img",
    ]
    arguments += ["--snapshot", f"snap-0a2={tmp_path}/tuesday.img,parent=snap-0a1"]
    arguments += ["--snapshot", f"snap-0b1={tmp_path}/data.img,size=4,volume=vol-0b"]
    with emulator_process.running(arguments, stderr=tmp_path / "emulator.err") as url:
        yield url


def test_ebsfs_ls_against_the_emulator_command(
    emulator_command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", emulator_command)
    result = ebsfs("ls", "--json")
    assert result.returncode == 0, result.stderr
    listed = [
        (s["SnapshotId"], s["VolumeId"], s["VolumeSize"], s["Description"])
        for s in json.loads(result.stdout)
    ]
    assert listed == [
        ("snap-0a1", "vol-0a1", 1, "monday.img"),
        ("snap-0a2", "vol-0a1", 1, "tuesday.img"),
        ("snap-0b1", "vol-0b", 4, "data.img"),
    ]
    only = json.loads(ebsfs("ls", "--json", "--volume", "vol-0b").stdout)
    assert [s["SnapshotId"] for s in only] == ["snap-0b1"]


def test_ebsfs_ls_over_https(
    https_emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    https_emulator.store.add_snapshot("snap-0c1", {0: pattern_block(5, 0)})
    monkeypatch.setenv("AWS_ENDPOINT_URL", https_emulator.url)
    result = ebsfs("ls")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].split()[:4] == ["snap-0c1", "vol-0c1", "1", "GiB"]


def test_ebsfs_ls_denied_is_one_line(
    served: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    served.faults.deny_access_keys = ["AKIDTEST"]
    result = ebsfs("ls", "--ec2-endpoint-url", served.url)
    assert_one_line_error(result, "ec2:DescribeSnapshots")


def test_unknown_snapshot_through_ec2_is_one_line(served: EmulatorServer) -> None:
    ec2 = Ec2Snapshots(ConnectionOptions(), endpoint_url=served.url)
    with pytest.raises(MetadataUnavailable) as err:
        ec2.describe(["snap-0ffff"])
    assert str(err.value) == (
        "EC2 does not know the snapshot (InvalidSnapshot.NotFound: "
        "The snapshot 'snap-0ffff' does not exist.)"
    )
    with pytest.raises(MetadataUnavailable) as err:
        ec2.describe(["snap-zz"])
    assert str(err.value).startswith("EC2 DescribeSnapshots failed: InvalidParameterValue")


@pytest.fixture
def other_region(store: SnapshotStore) -> Iterator[EmulatorServer]:
    """A second emulator with none of the first one's snapshots: an EC2 endpoint of
    another region, say."""
    with EmulatorServer(SnapshotStore(store.faults)) as server:
        yield server


def test_get_records_the_emulators_metadata_or_says_why_not(
    served: EmulatorServer, other_region: EmulatorServer, tmp_path: Path
) -> None:
    out = tmp_path / "disk.img"
    env = {**os.environ, "AWS_ENDPOINT_URL": served.url}
    result = ebsfs("get", "--quiet", "snap-0b1", str(out), env=env)
    assert result.returncode == 0, result.stderr
    recorded = json.loads((tmp_path / "disk.img.manifest.json").read_text())["snapshot"]
    assert recorded["VolumeId"] == "vol-0123456789abcdef0"
    assert recorded["StartTime"] == "2023-11-14T22:14:20.250000Z"
    assert recorded["Description"] == "web-1 data, before"
    elsewhere = ebsfs(
        "get", "--ec2-endpoint-url", other_region.url, "snap-0a1", str(tmp_path / "a.img"), env=env
    )
    assert elsewhere.returncode == 0, elsewhere.stderr
    notes = [line for line in elsewhere.stderr.splitlines() if "EC2" in line]
    assert notes == [
        "ebsfs: info: manifest without EC2 metadata: EC2 does not know the snapshot "
        "(InvalidSnapshot.NotFound: The snapshot 'snap-0a1' does not exist.)"
    ]


@needs_fuse
@pytest.mark.parametrize("how", ["--ec2-endpoint-url", "AWS_ENDPOINT_URL"])
def test_mounted_image_mtime_is_the_emulators_start_time(
    served: EmulatorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Asked of the emulator named as EC2 endpoint, or through AWS_ENDPOINT_URL (the
    README's way: one variable for both services)."""
    if how == "AWS_ENDPOINT_URL":
        monkeypatch.setenv(how, served.url)
    options = [how, served.url] if how.startswith("--") else []
    with mounted(served.url, ["snap-0a2"], tmp_path / "mnt", *options) as mnt:
        image = mnt / "snap-0a2.img"
        assert image.stat().st_mtime == pytest.approx(STARTED + 3600, abs=1e-3)
    assert served.counters.calls["DescribeSnapshots"] == 1


# ---- python -m ebsfs.emulator.diskimage --------------------------------------------


def diskimage(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ebsfs.emulator.diskimage", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), **env},
    )


def test_diskimage_help_explains_and_writes_nothing(tmp_path: Path) -> None:
    result = diskimage(tmp_path, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and "SIZE_MIB" in result.stdout
    assert "ext4" in result.stdout and "GPT" in result.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ((), ["PATH"]),
        (("disk.img", "big"), ["SIZE_MIB", "big"]),
        (("disk.img", "4"), ["SIZE_MIB", "at least"]),
        (("disk.img", "64", "more"), ["unrecognized", "more"]),
        (("nowhere/disk.img", "16"), ["nowhere/disk.img"]),
    ],
)
def test_diskimage_bad_input_is_one_line(
    tmp_path: Path, args: tuple[str, ...], words: list[str]
) -> None:
    result = diskimage(tmp_path, *args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "error" in last
    for word in words:
        assert word in last, last
    assert list(tmp_path.iterdir()) == []


def test_diskimage_path_and_size_as_before(tmp_path: Path) -> None:
    result = diskimage(tmp_path, "disk.img", "16")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "disk.img").stat().st_size == 16 * 1024 * 1024
    assert result.stdout == "disk.img: 16 MiB GPT disk, ext4 partition at byte 1048576\n"


def test_diskimage_without_its_tools_is_one_line(tmp_path: Path) -> None:
    result = diskimage(tmp_path, "disk.img", "16", PATH=str(tmp_path))
    assert result.returncode == 1
    assert result.stderr == (
        "python -m ebsfs.emulator.diskimage: error: mkfs.ext4: No such file or directory\n"
    )
    assert list(tmp_path.iterdir()) == []
