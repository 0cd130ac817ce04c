"""The emulator behaves like the EBS direct API, checked with real boto3 calls over HTTP."""

from __future__ import annotations

import base64
import hashlib
import json
import time
import urllib.request
from pathlib import Path

import boto3
import botocore.config
import botocore.exceptions
import pytest

from ebsfs.constants import BLOCK_SIZE
from ebsfs.emulator import EmulatorServer, SnapshotStore
from ebsfs.emulator import process as emulator_process
from ebsfs.service.sigv4 import Credentials, GetSigner
from tests.fakes import pattern_block

SNAP = "snap-0aaa"


def list_all(ebs, snapshot_id: str, **kw) -> tuple[list[int], list[dict]]:
    """Follow NextToken to the end; return indexes and the raw pages."""
    pages, indexes, token = [], [], None
    while True:
        args = {"SnapshotId": snapshot_id, "MaxResults": 100, **kw}
        if token:
            args["NextToken"] = token
        page = ebs.list_snapshot_blocks(**args)
        pages.append(page)
        indexes += [b["BlockIndex"] for b in page["Blocks"]]
        token = page.get("NextToken")
        if not token:
            return indexes, pages


def reason(excinfo: pytest.ExceptionInfo[botocore.exceptions.ClientError]) -> tuple[str, str]:
    r = excinfo.value.response
    return r["Error"]["Code"], r.get("Reason", "")


@pytest.fixture
def sparse(store: SnapshotStore) -> list[int]:
    written = [*range(0, 600, 3), 1500, 2047]  # dense start, then long unwritten gaps
    store.add_snapshot(SNAP, {i: pattern_block(1, i) for i in written}, volume_size_gib=1)
    return written


def test_list_pages_in_ascending_order_with_metadata(ebs, sparse) -> None:
    indexes, pages = list_all(ebs, SNAP)
    assert indexes == sparse
    first = pages[0]
    assert first["VolumeSize"] == 1 and first["BlockSize"] == BLOCK_SIZE
    assert first["ExpiryTime"].timestamp() > time.time() + 6 * 24 * 3600
    assert all(len(p["Blocks"]) <= 100 for p in pages)


def test_starting_block_index_and_max_results(ebs, sparse) -> None:
    page = ebs.list_snapshot_blocks(SnapshotId=SNAP, MaxResults=100, StartingBlockIndex=1000)
    returned = [b["BlockIndex"] for b in page["Blocks"]]
    assert returned == [i for i in sparse if i >= 1000][:100]


def test_short_and_empty_pages_still_cover_everything(ebs, emulator, sparse) -> None:
    emulator.faults.short_pages = 1.0
    indexes, pages = list_all(ebs, SNAP)
    assert indexes == sparse
    assert any(not p["Blocks"] and p.get("NextToken") for p in pages), "no empty page seen"
    assert any(0 < len(p["Blocks"]) < 100 and p.get("NextToken") for p in pages)


def test_max_results_out_of_bounds_is_refused_by_the_service(emulator, sparse) -> None:
    for bad in ("99", "10001", "x"):
        url = f"{emulator.url}/snapshots/{SNAP}/blocks?maxResults={bad}"
        headers = GetSigner("ebs", "us-east-1").headers(
            Credentials("AKIDTEST", "secret"),
            emulator.url.split("//", 1)[1],
            f"/snapshots/{SNAP}/blocks",
            f"maxResults={bad}",
        )
        request = urllib.request.Request(url, headers=headers)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request)
        assert err.value.code == 400
        assert err.value.headers["x-amzn-ErrorType"] == "ValidationException"
        assert json.loads(err.value.read())["Reason"] == "INVALID_PARAMETER_VALUE"


def test_get_block_returns_bytes_with_true_checksum(ebs, sparse) -> None:
    page = ebs.list_snapshot_blocks(SnapshotId=SNAP, MaxResults=100)
    block = page["Blocks"][5]
    r = ebs.get_snapshot_block(
        SnapshotId=SNAP, BlockIndex=block["BlockIndex"], BlockToken=block["BlockToken"]
    )
    data = r["BlockData"].read()
    assert data == pattern_block(1, block["BlockIndex"])
    assert r["DataLength"] == BLOCK_SIZE and r["ChecksumAlgorithm"] == "SHA256"
    assert r["Checksum"] == base64.b64encode(hashlib.sha256(data).digest()).decode()


def test_block_token_checked_against_index_snapshot_and_tampering(ebs, store, sparse) -> None:
    store.add_snapshot("snap-0bbb", {0: pattern_block(2, 0)}, volume_size_gib=1)
    tokens = {
        b["BlockIndex"]: b["BlockToken"]
        for b in ebs.list_snapshot_blocks(SnapshotId=SNAP, MaxResults=100)["Blocks"]
    }
    cases = [
        (SNAP, 3, tokens[0]),  # token of another block
        ("snap-0bbb", 0, tokens[0]),  # token of another snapshot
        (SNAP, 0, "AAAA" + tokens[0][4:]),  # tampered
    ]
    for snapshot_id, index, token in cases:
        with pytest.raises(ebs.exceptions.ValidationException) as err:
            ebs.get_snapshot_block(SnapshotId=snapshot_id, BlockIndex=index, BlockToken=token)
        assert reason(err) == ("ValidationException", "INVALID_BLOCK_TOKEN")


def test_block_tokens_expire(ebs, emulator, sparse) -> None:
    emulator.faults.token_lifetime = 1
    page = ebs.list_snapshot_blocks(SnapshotId=SNAP, MaxResults=100)
    assert page["ExpiryTime"].timestamp() < time.time() + 2
    token = page["Blocks"][0]["BlockToken"]
    ebs.get_snapshot_block(SnapshotId=SNAP, BlockIndex=0, BlockToken=token)["BlockData"].read()
    time.sleep(2.1)
    with pytest.raises(ebs.exceptions.ValidationException) as err:
        ebs.get_snapshot_block(SnapshotId=SNAP, BlockIndex=0, BlockToken=token)
    assert reason(err) == ("ValidationException", "INVALID_BLOCK_TOKEN")


def test_page_tokens_expire_and_ignore_starting_index(ebs, emulator, sparse) -> None:
    page = ebs.list_snapshot_blocks(SnapshotId=SNAP, MaxResults=100)
    second = ebs.list_snapshot_blocks(
        SnapshotId=SNAP, MaxResults=100, NextToken=page["NextToken"], StartingBlockIndex=2000
    )
    assert second["Blocks"][0]["BlockIndex"] == sparse[100]
    emulator.faults.page_token_lifetime = 0.5
    page = ebs.list_snapshot_blocks(SnapshotId=SNAP, MaxResults=100)
    time.sleep(1.1)
    with pytest.raises(ebs.exceptions.ValidationException) as err:
        ebs.list_snapshot_blocks(SnapshotId=SNAP, MaxResults=100, NextToken=page["NextToken"])
    assert reason(err) == ("ValidationException", "INVALID_PAGE_TOKEN")


def test_unknown_and_malformed_snapshots(ebs, sparse) -> None:
    with pytest.raises(ebs.exceptions.ResourceNotFoundException) as err:
        ebs.list_snapshot_blocks(SnapshotId="snap-0fff", MaxResults=100)
    assert reason(err) == ("ResourceNotFoundException", "SNAPSHOT_NOT_FOUND")
    with pytest.raises(ebs.exceptions.ValidationException) as err:
        ebs.list_snapshot_blocks(SnapshotId="snap-XYZ", MaxResults=100)
    assert reason(err) == ("ValidationException", "INVALID_SNAPSHOT_ID")


def test_block_outside_volume_or_never_written(ebs, emulator, store, sparse) -> None:
    token = ebs.list_snapshot_blocks(SnapshotId=SNAP, MaxResults=100)["Blocks"][0]["BlockToken"]
    with pytest.raises(ebs.exceptions.ValidationException) as err:
        ebs.get_snapshot_block(SnapshotId=SNAP, BlockIndex=999999, BlockToken=token)
    assert reason(err) == ("ValidationException", "INVALID_BLOCK")


def test_lineage_child_shares_parent_blocks_and_lists_changes(ebs, store) -> None:
    store.add_snapshot(
        "snap-0a01", {i: pattern_block(1, i) for i in range(0, 400)}, volume_size_gib=1
    )
    changes = {i: pattern_block(9, i) for i in (5, 150, 399, 1000)}
    changes[7] = bytes(BLOCK_SIZE)  # zeroed in the child: still a change
    changes[20] = pattern_block(1, 20)  # rewritten with the same bytes: no change
    store.add_snapshot("snap-0a02", changes, parent="snap-0a01")
    child, _ = list_all(ebs, "snap-0a02")
    assert child == sorted(set(range(400)) | {1000})
    token: str | None = None
    entries = []
    while True:
        args = {"FirstSnapshotId": "snap-0a01", "SecondSnapshotId": "snap-0a02", "MaxResults": 100}
        if token:
            args["NextToken"] = token
        page = ebs.list_changed_blocks(**args)
        entries += page["ChangedBlocks"]
        token = page.get("NextToken")
        if not token:
            break
    assert [e["BlockIndex"] for e in entries] == [5, 7, 150, 399, 1000]
    by_index = {e["BlockIndex"]: e for e in entries}
    assert "FirstBlockToken" not in by_index[1000] and "SecondBlockToken" in by_index[1000]
    second = by_index[150]
    data = ebs.get_snapshot_block(
        SnapshotId="snap-0a02", BlockIndex=150, BlockToken=second["SecondBlockToken"]
    )["BlockData"].read()
    assert data == pattern_block(9, 150)
    first = ebs.get_snapshot_block(
        SnapshotId="snap-0a01", BlockIndex=150, BlockToken=second["FirstBlockToken"]
    )["BlockData"].read()
    assert first == pattern_block(1, 150)


def test_changed_blocks_with_short_pages(ebs, emulator, store) -> None:
    store.add_snapshot("snap-0a01", {i: pattern_block(1, i) for i in range(2048)})
    store.add_snapshot(
        "snap-0a02", {i: pattern_block(2, i) for i in range(0, 2048, 5)}, parent="snap-0a01"
    )
    emulator.faults.short_pages = 1.0
    found, token, empties = [], None, 0
    while True:
        args = {"FirstSnapshotId": "snap-0a01", "SecondSnapshotId": "snap-0a02", "MaxResults": 100}
        if token:
            args["NextToken"] = token
        page = ebs.list_changed_blocks(**args)
        empties += not page["ChangedBlocks"] and bool(page.get("NextToken"))
        found += [c["BlockIndex"] for c in page["ChangedBlocks"]]
        token = page.get("NextToken")
        if not token:
            break
    assert found == list(range(0, 2048, 5))
    assert empties > 0


def test_unrelated_snapshots_are_refused(ebs, store) -> None:
    store.add_snapshot("snap-0a01", {0: pattern_block(1, 0)})
    store.add_snapshot("snap-0b01", {0: pattern_block(2, 0)})
    with pytest.raises(ebs.exceptions.ValidationException) as err:
        ebs.list_changed_blocks(
            FirstSnapshotId="snap-0a01", SecondSnapshotId="snap-0b01", MaxResults=100
        )
    assert reason(err) == ("ValidationException", "UNRELATED_SNAPSHOTS")


def test_image_loader_skips_zero_blocks(tmp_path, store) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.write(pattern_block(1, 0))
        f.seek(3 * BLOCK_SIZE)
        f.write(b"tail")  # a partial last block, zero-padded
    snap = store.add_image("snap-0c01", image)
    assert snap.indexes == [0, 3] and snap.volume_size_gib == 1
    assert bytes(snap.blocks[3].data()) == b"tail" + bytes(BLOCK_SIZE - 4)


# ---- fault knobs --------------------------------------------------------------------


def no_retry_client(url: str):
    config = botocore.config.Config(
        retries={"mode": "standard", "total_max_attempts": 1}, read_timeout=5
    )
    return boto3.session.Session().client(
        "ebs", endpoint_url=url, region_name="us-east-1", config=config
    )


def test_latency_and_jitter(ebs, emulator, sparse) -> None:
    emulator.faults.latency, emulator.faults.jitter = 0.2, 0.1
    started = time.monotonic()
    ebs.list_snapshot_blocks(SnapshotId=SNAP, MaxResults=100)
    assert 0.2 <= time.monotonic() - started < 2.0


def test_error_rate_answers_internal_server_error(emulator, sparse) -> None:
    emulator.faults.error_rate = 1.0
    with pytest.raises(botocore.exceptions.ClientError) as err:
        no_retry_client(emulator.url).list_snapshot_blocks(SnapshotId=SNAP, MaxResults=100)
    assert err.value.response["Error"]["Code"] == "InternalServerException"
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500


def test_corrupt_body_keeps_true_checksum(ebs, emulator, sparse) -> None:
    token = ebs.list_snapshot_blocks(SnapshotId=SNAP, MaxResults=100)["Blocks"][0]["BlockToken"]
    emulator.faults.corrupt_rate = 1.0
    r = ebs.get_snapshot_block(SnapshotId=SNAP, BlockIndex=0, BlockToken=token)
    data = r["BlockData"].read()
    assert len(data) == BLOCK_SIZE and data != pattern_block(1, 0)
    good = base64.b64encode(hashlib.sha256(pattern_block(1, 0)).digest()).decode()
    assert r["Checksum"] == good


def test_truncated_body_fails_the_read(emulator, sparse) -> None:
    client = no_retry_client(emulator.url)
    token = client.list_snapshot_blocks(SnapshotId=SNAP, MaxResults=100)["Blocks"][0]["BlockToken"]
    emulator.faults.truncate_rate = 1.0
    r = client.get_snapshot_block(SnapshotId=SNAP, BlockIndex=0, BlockToken=token)
    with pytest.raises(Exception) as err:  # noqa: B017 - botocore or urllib3, by version
        r["BlockData"].read()
    assert "Incomplete" in type(err.value).__name__ or "Streaming" in type(err.value).__name__


def test_stalled_body_hits_the_client_read_timeout(emulator, sparse) -> None:
    config = botocore.config.Config(retries={"total_max_attempts": 1}, read_timeout=0.5)
    client = boto3.client("ebs", endpoint_url=emulator.url, region_name="us-east-1", config=config)
    token = client.list_snapshot_blocks(SnapshotId=SNAP, MaxResults=100)["Blocks"][0]["BlockToken"]
    emulator.faults.stall_rate, emulator.faults.stall_seconds = 1.0, 3.0
    started = time.monotonic()
    with pytest.raises(Exception):  # noqa: B017
        client.get_snapshot_block(SnapshotId=SNAP, BlockIndex=0, BlockToken=token)[
            "BlockData"
        ].read()
    assert time.monotonic() - started < 2.5


def test_throttling_past_the_rate(emulator, sparse) -> None:
    emulator.faults.list_rate = 5
    client = no_retry_client(emulator.url)
    codes = []
    for _ in range(15):
        try:
            client.list_snapshot_blocks(SnapshotId=SNAP, MaxResults=100)
            codes.append("ok")
        except botocore.exceptions.ClientError as err:
            codes.append(err.response["Error"]["Code"] + "/" + err.response.get("Reason", ""))
    assert codes[:4] == ["ok"] * 4
    assert "RequestThrottledException/ACCOUNT_THROTTLED" in codes


def test_denied_access_key(emulator, sparse, monkeypatch) -> None:
    emulator.faults.deny_access_keys = ["AKIDDENIED"]
    emulator.faults.secret_keys["AKIDDENIED"] = "secret"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDDENIED")
    client = no_retry_client(emulator.url)
    with pytest.raises(client.exceptions.AccessDeniedException) as err:
        client.list_snapshot_blocks(SnapshotId=SNAP, MaxResults=100)
    assert reason(err) == ("AccessDeniedException", "UNAUTHORIZED_ACCOUNT")


@pytest.mark.parametrize(
    "variable,value,code",
    [
        ("AWS_SECRET_ACCESS_KEY", "wrong", "InvalidSignatureException"),
        ("AWS_ACCESS_KEY_ID", "AKIDUNKNOWN", "UnrecognizedClientException"),
    ],
)
def test_signatures_are_checked_when_credentials_are_known(
    emulator, sparse, monkeypatch, variable, value, code
) -> None:
    monkeypatch.setenv(variable, value)
    client = no_retry_client(emulator.url)
    with pytest.raises(botocore.exceptions.ClientError) as err:
        client.list_snapshot_blocks(SnapshotId=SNAP, MaxResults=100)
    assert err.value.response["Error"]["Code"] == code
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_a_request_changed_after_signing_is_refused(emulator, sparse) -> None:
    """ebsfs.service.sigv4 checked by the emulator's botocore-based verifier: the signed GET
    passes authentication (and fails on its made-up token); the same headers on
    another block do not."""
    host = emulator.url.split("//", 1)[1]
    path = f"/snapshots/{SNAP}/blocks/0"
    headers = GetSigner("ebs", "us-east-1").headers(
        Credentials("AKIDTEST", "secret"), host, path, "blockToken=abc%2B%3D"
    )
    for target, status in (
        (f"{path}?blockToken=abc%2B%3D", 400),
        (f"/snapshots/{SNAP}/blocks/2?blockToken=abc%2B%3D", 403),
    ):
        request = urllib.request.Request(emulator.url + target, headers=headers)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request)
        assert err.value.code == status, err.value.read()


def test_counters_and_control_endpoint(ebs, emulator, sparse) -> None:
    page = ebs.list_snapshot_blocks(SnapshotId=SNAP, MaxResults=100)
    for b in page["Blocks"][:3]:
        ebs.get_snapshot_block(
            SnapshotId=SNAP, BlockIndex=b["BlockIndex"], BlockToken=b["BlockToken"]
        )["BlockData"].read()
    stats = json.loads(urllib.request.urlopen(f"{emulator.url}/_emulator/stats").read())
    assert stats["calls"] == {"ListSnapshotBlocks": 1, "GetSnapshotBlock": 3}
    assert stats["block_gets"] == {f"{SNAP}:0": 1, f"{SNAP}:3": 1, f"{SNAP}:6": 1}
    request = urllib.request.Request(
        f"{emulator.url}/_emulator/faults",
        method="POST",
        data=json.dumps({"latency": 0.01}).encode(),
    )
    assert json.loads(urllib.request.urlopen(request).read())["latency"] == 0.01
    assert emulator.faults.latency == 0.01
    urllib.request.urlopen(urllib.request.Request(f"{emulator.url}/_emulator/reset", method="POST"))
    assert emulator.counters.snapshot()["calls"] == {}


def test_endpoint_goes_away_and_comes_back(store, sparse) -> None:
    server = EmulatorServer(store).start()
    url = server.url
    client = no_retry_client(url)
    client.list_snapshot_blocks(SnapshotId=SNAP, MaxResults=100)
    server.stop()
    with pytest.raises(botocore.exceptions.EndpointConnectionError):
        client.list_snapshot_blocks(SnapshotId=SNAP, MaxResults=100)
    server.start()
    try:
        assert server.url == url
        client.list_snapshot_blocks(SnapshotId=SNAP, MaxResults=100)
    finally:
        server.stop()


def test_the_process_launcher_says_why_the_emulator_did_not_start(tmp_path: Path) -> None:
    """Benchmarks and tests start `python -m ebsfs.emulator` through one launcher: a
    server that exits says why (its stderr), and the launcher leaves no process."""
    errors = tmp_path / "emulator.err"
    with pytest.raises(emulator_process.EmulatorDidNotStart) as raised:
        emulator_process.start(["--snapshot", "nonsense"], stderr=errors)
    assert "exited with status 2" in str(raised.value)
    assert "expected ID=PATH, got 'nonsense'" in str(raised.value)
    image = tmp_path / "disk.img"
    image.write_bytes(b"\x07" * 4096)
    with emulator_process.running(["--snapshot", f"snap-0e7={image}"]) as url:
        answer = urllib.request.urlopen(f"{url}/_emulator/stats")
        assert answer.status == 200
        answer.close()
