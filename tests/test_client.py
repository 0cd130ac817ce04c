"""BotoEbsApi against the emulator over HTTP, on both GetSnapshotBlock paths (direct
and botocore): bytes, checksums, the error mapping, retries."""

from __future__ import annotations

import base64
import hashlib

import pytest

from ebsfs.constants import BLOCK_SIZE
from ebsfs.emulator import EmulatorServer
from ebsfs.errors import (
    AccessDenied,
    CertificateUntrusted,
    EndpointUnreachable,
    InvalidBlockToken,
    InvalidSnapshotId,
    RetriesExhausted,
    SnapshotNotFound,
    UnrelatedSnapshots,
)
from ebsfs.service.client import BotoEbsApi, ConnectionOptions
from ebsfs.service.retry import RetryPolicy
from tests.fakes import pattern_block

SNAP = "snap-0c0c"
FAST_RETRY = RetryPolicy(attempts=20, base_delay=0.001, max_delay=0.01, deadline=20)


def use_botocore_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy setting sends GetSnapshotBlock through botocore (which honours it);
    NO_PROXY keeps the loopback endpoint direct."""
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")


@pytest.fixture(params=["direct", "botocore"])
def api(request, emulator: EmulatorServer, monkeypatch) -> BotoEbsApi:  # type: ignore[no-untyped-def]
    emulator.store.add_snapshot(SNAP, {i: pattern_block(4, i) for i in range(0, 40, 2)})
    if request.param == "botocore":
        use_botocore_path(monkeypatch)
    client = BotoEbsApi(ConnectionOptions(endpoint_url=emulator.url, retry=FAST_RETRY))
    assert (client._direct is not None) == (request.param == "direct")
    return client


def tokens(api: BotoEbsApi) -> dict[int, str]:
    return dict(api.list_snapshot_blocks(SNAP, max_results=100).blocks)


def test_block_bytes(api) -> None:
    t = tokens(api)
    block = api.get_snapshot_block(SNAP, 4, t[4])
    assert block.data == pattern_block(4, 4)
    assert block.checksum == base64.b64encode(hashlib.sha256(block.data).digest()).decode()


def test_block_received_into_given_room(api) -> None:
    t = tokens(api)
    room = memoryview(bytearray(BLOCK_SIZE))
    assert api.get_snapshot_block(SNAP, 6, t[6], into=room).data is room
    assert bytes(room) == pattern_block(4, 6)


@pytest.mark.parametrize("into_room", [False, True])
def test_corrupt_and_truncated_bodies_are_retried(api, emulator, into_room) -> None:
    t = tokens(api)
    emulator.faults.corrupt_rate, emulator.faults.truncate_rate = 0.3, 0.3
    for i in range(0, 40, 2):
        room = memoryview(bytearray(BLOCK_SIZE)) if into_room else None
        assert bytes(api.get_snapshot_block(SNAP, i, t[i], into=room).data) == pattern_block(4, i)
    assert emulator.counters.errors["Corrupted"] + emulator.counters.errors["Truncated"] > 0


def test_internal_errors_and_throttling_are_retried(api, emulator) -> None:
    t = tokens(api)
    api._retry = RetryPolicy(attempts=12, base_delay=0.05, max_delay=1.0)
    emulator.faults.error_rate, emulator.faults.get_rate = 0.3, 5
    for i in range(0, 20, 2):
        assert api.get_snapshot_block(SNAP, i, t[i]).data == pattern_block(4, i)
    assert emulator.counters.errors["RequestThrottledException"] > 0
    assert api.get_throttles > 0


def test_persistent_failure_exhausts_retries(api, emulator) -> None:
    t = tokens(api)
    emulator.faults.error_rate = 1.0
    with pytest.raises(RetriesExhausted):
        api.get_snapshot_block(SNAP, 0, t[0])


def test_error_mapping(api, emulator, store) -> None:
    t = tokens(api)
    with pytest.raises(InvalidBlockToken):
        api.get_snapshot_block(SNAP, 2, t[0])
    with pytest.raises(SnapshotNotFound):
        api.get_snapshot_block("snap-0fff", 0, t[0])
    with pytest.raises(InvalidSnapshotId):
        api.list_snapshot_blocks("snap-nothex")
    store.add_snapshot("snap-0d0d", {0: pattern_block(5, 0)})
    with pytest.raises(UnrelatedSnapshots):
        api.list_changed_blocks(SNAP, "snap-0d0d")
    emulator.faults.deny_access_keys = ["AKIDTEST"]
    with pytest.raises(AccessDenied):
        api.get_snapshot_block(SNAP, 0, t[0])


@pytest.mark.parametrize("path", ["direct", "botocore"])
def test_https_with_a_trusted_certificate(https_emulator: EmulatorServer, monkeypatch,
                                          path) -> None:
    """The real service's scheme: TLS on both GET paths, bodies cut short and corrupted
    included (a TLS stream cut mid-body must be retried, never half-served)."""
    https_emulator.store.add_snapshot(SNAP, {i: pattern_block(4, i) for i in range(0, 40, 2)})
    if path == "botocore":
        use_botocore_path(monkeypatch)
    api = BotoEbsApi(ConnectionOptions(endpoint_url=https_emulator.url, retry=FAST_RETRY))
    assert https_emulator.url.startswith("https://")
    assert (api._direct is not None) == (path == "direct")
    t = tokens(api)
    https_emulator.faults.corrupt_rate, https_emulator.faults.truncate_rate = 0.3, 0.3
    for i in range(0, 40, 2):
        room = memoryview(bytearray(BLOCK_SIZE))
        assert api.get_snapshot_block(SNAP, i, t[i], into=room).data is room
        assert bytes(room) == pattern_block(4, i)
    counters = https_emulator.counters.errors
    assert counters["Corrupted"] + counters["Truncated"] > 0


@pytest.mark.parametrize("path", ["direct", "botocore"])
def test_https_with_an_untrusted_certificate_fails_at_once(https_emulator: EmulatorServer,
                                                           monkeypatch, path) -> None:
    https_emulator.store.add_snapshot(SNAP, {0: pattern_block(4, 0)})
    api = BotoEbsApi(ConnectionOptions(endpoint_url=https_emulator.url, retry=FAST_RETRY))
    t = tokens(api)
    monkeypatch.delenv("AWS_CA_BUNDLE")
    if path == "botocore":
        use_botocore_path(monkeypatch)
    untrusting = BotoEbsApi(ConnectionOptions(endpoint_url=https_emulator.url,
                                              retry=FAST_RETRY))
    with pytest.raises(CertificateUntrusted, match="AWS_CA_BUNDLE"):
        untrusting.get_snapshot_block(SNAP, 0, t[0])
    with pytest.raises(CertificateUntrusted):
        untrusting.list_snapshot_blocks(SNAP)
    assert https_emulator.counters.calls["GetSnapshotBlock"] == 0  # never got through


def test_unreachable_endpoint() -> None:
    api = BotoEbsApi(ConnectionOptions(endpoint_url="http://127.0.0.1:9",
                                       retry=RetryPolicy(attempts=2, base_delay=0.001)))
    with pytest.raises(RetriesExhausted) as err:
        api.get_snapshot_block(SNAP, 0, "AAAA")
    assert isinstance(err.value.__cause__, EndpointUnreachable)


def test_fetch_concurrency_shrinks_while_throttled_and_grows_back(emulator: EmulatorServer
                                                                  ) -> None:
    import trio

    from ebsfs.engine.remote import RemoteSnapshots

    emulator.store.add_snapshot(SNAP, {i: pattern_block(4, i) for i in range(120)})
    api = BotoEbsApi(ConnectionOptions(endpoint_url=emulator.url, retry=RetryPolicy(
        attempts=30, base_delay=0.02, max_delay=0.5, deadline=60)))
    remote = RemoteSnapshots(api, max_fetches=64)
    t = dict(api.list_snapshot_blocks(SNAP, max_results=1000).blocks)
    limits = []

    async def fetch_all(indexes: range) -> None:
        async with trio.open_nursery() as nursery:
            for i in indexes:
                nursery.start_soon(remote.get_snapshot_block, SNAP, i, t[i])

    async def run() -> None:
        emulator.faults.get_rate = 30
        await fetch_all(range(0, 80))
        limits.append(int(remote.fetch_limiter.total_tokens))
        emulator.faults.get_rate = 0
        for _ in range(6):
            await fetch_all(range(80, 120))
        limits.append(int(remote.fetch_limiter.total_tokens))

    trio.run(run)
    assert api.get_throttles > 0
    assert limits[0] < 64 and limits[1] > limits[0], limits
