"""BotoEbsApi against the emulator over HTTP, on both GetSnapshotBlock paths (direct
and botocore): bytes, checksums, the error mapping (the same as the test fakes'),
retries; which path a GET takes (direct_get, proxies and NO_PROXY); and the session
helper (region, profile, endpoint, credentials)."""

from __future__ import annotations

import base64
import collections
import hashlib
import http.client
import http.server
import logging
import os
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ebsfs.constants import BLOCK_SIZE
from ebsfs.emulator import EmulatorServer
from ebsfs.errors import (
    AccessDenied,
    CertificateUntrusted,
    CredentialsMissing,
    EbsfsError,
    EndpointUnreachable,
    InvalidBlockToken,
    InvalidSnapshotId,
    RetriesExhausted,
    SnapshotNotFound,
    UnrelatedSnapshots,
    UserInputError,
)
from ebsfs.service.client import BotoEbsApi, ConnectionOptions
from ebsfs.service.direct import proxy_variable
from ebsfs.service.retry import RetryPolicy
from tests.fakes import StoreApi, pattern_block
from tests.localhttp import serving, url_of

SNAP = "snap-0c0c"
FAST_RETRY = RetryPolicy(attempts=20, base_delay=0.001, max_delay=0.01, deadline=20)


@pytest.fixture(autouse=True)
def no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxy settings from the machine: each test sets the ones it is about."""
    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)


class PathSpy:
    """Counts the GetSnapshotBlock attempts each path sent: the direct getter's and
    boto3's (whatever their outcome)."""

    def __init__(self, api: BotoEbsApi, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sent: collections.Counter[str] = collections.Counter()
        if api._direct is not None:
            monkeypatch.setattr(api._direct, "get", self._counting("direct", api._direct.get))
        monkeypatch.setattr(
            api._client,
            "get_snapshot_block",
            self._counting("botocore", api._client.get_snapshot_block),
        )

    def _counting(self, path: str, call: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.sent[path] += 1
            return call(*args, **kwargs)

        return counted


def get_paths(api: BotoEbsApi, monkeypatch: pytest.MonkeyPatch) -> collections.Counter[str]:
    """GET one block (two, in fact) and say which path each GET took."""
    spy = PathSpy(api, monkeypatch)
    t = tokens(api)
    for i in (0, 2):
        assert api.get_snapshot_block(SNAP, i, t[i]).data == pattern_block(4, i)
    return spy.sent


@pytest.fixture(params=["direct", "botocore"])
def api(request, emulator: EmulatorServer, monkeypatch) -> BotoEbsApi:
    emulator.store.add_snapshot(SNAP, {i: pattern_block(4, i) for i in range(0, 40, 2)})
    client = BotoEbsApi(
        ConnectionOptions(
            endpoint_url=emulator.url, retry=FAST_RETRY, direct_get=request.param == "direct"
        )
    )
    assert get_paths(client, monkeypatch) == {request.param: 2}
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
def test_https_with_a_trusted_certificate(
    https_emulator: EmulatorServer, monkeypatch, path
) -> None:
    """The real service's scheme: TLS on both GET paths, bodies cut short and corrupted
    included (a TLS stream cut mid-body must be retried, never half-served)."""
    https_emulator.store.add_snapshot(SNAP, {i: pattern_block(4, i) for i in range(0, 40, 2)})
    api = BotoEbsApi(
        ConnectionOptions(
            endpoint_url=https_emulator.url, retry=FAST_RETRY, direct_get=path == "direct"
        )
    )
    assert https_emulator.url.startswith("https://")
    assert get_paths(api, monkeypatch) == {path: 2}
    t = tokens(api)
    https_emulator.faults.corrupt_rate, https_emulator.faults.truncate_rate = 0.3, 0.3
    for i in range(0, 40, 2):
        room = memoryview(bytearray(BLOCK_SIZE))
        assert api.get_snapshot_block(SNAP, i, t[i], into=room).data is room
        assert bytes(room) == pattern_block(4, i)
    counters = https_emulator.counters.errors
    assert counters["Corrupted"] + counters["Truncated"] > 0


@pytest.mark.parametrize("path", ["direct", "botocore"])
def test_https_with_an_untrusted_certificate_fails_at_once(
    https_emulator: EmulatorServer, monkeypatch, path
) -> None:
    https_emulator.store.add_snapshot(SNAP, {0: pattern_block(4, 0)})
    api = BotoEbsApi(ConnectionOptions(endpoint_url=https_emulator.url, retry=FAST_RETRY))
    t = tokens(api)
    monkeypatch.delenv("AWS_CA_BUNDLE")
    untrusting = BotoEbsApi(
        ConnectionOptions(
            endpoint_url=https_emulator.url, retry=FAST_RETRY, direct_get=path == "direct"
        )
    )
    spy = PathSpy(untrusting, monkeypatch)
    with pytest.raises(CertificateUntrusted, match="AWS_CA_BUNDLE"):
        untrusting.get_snapshot_block(SNAP, 0, t[0])
    assert spy.sent == {path: 1}
    with pytest.raises(CertificateUntrusted):
        untrusting.list_snapshot_blocks(SNAP)
    assert https_emulator.counters.calls["GetSnapshotBlock"] == 0  # never got through


def test_unreachable_endpoint() -> None:
    api = BotoEbsApi(
        ConnectionOptions(
            endpoint_url="http://127.0.0.1:9", retry=RetryPolicy(attempts=2, base_delay=0.001)
        )
    )
    with pytest.raises(RetriesExhausted) as err:
        api.get_snapshot_block(SNAP, 0, "AAAA")
    assert isinstance(err.value.__cause__, EndpointUnreachable)


def test_fetch_concurrency_shrinks_while_throttled_and_grows_back(emulator: EmulatorServer) -> None:
    import trio

    from ebsfs.engine.remote import RemoteSnapshots

    emulator.store.add_snapshot(SNAP, {i: pattern_block(4, i) for i in range(120)})
    api = BotoEbsApi(
        ConnectionOptions(
            endpoint_url=emulator.url,
            retry=RetryPolicy(attempts=30, base_delay=0.02, max_delay=0.5, deadline=60),
        )
    )
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


# ---- which path a GET takes ---------------------------------------------------------


class _ForwardProxy(http.server.BaseHTTPRequestHandler):
    """A plain-HTTP forward proxy (what urllib3 speaks to for an http:// URL): relays
    each GET to the absolute URL it names and records it in `server.seen`."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802
        target = urllib.parse.urlsplit(self.path)
        self.server.seen.append(target.path)  # type: ignore[attr-defined]
        upstream = http.client.HTTPConnection(target.hostname or "", target.port, timeout=10)
        headers = {
            k: v
            for k, v in self.headers.items()
            if k.lower() not in ("proxy-connection", "proxy-authorization")
        }
        upstream.request("GET", f"{target.path}?{target.query}", headers=headers)
        answer = upstream.getresponse()
        body = answer.read()
        upstream.close()
        self.send_response(answer.status)
        for name, value in answer.getheaders():
            if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def forward_proxy() -> Iterator[tuple[str, list[str]]]:
    """The proxy's URL and the paths it has relayed."""
    with serving(_ForwardProxy) as server:
        server.seen = []  # type: ignore[attr-defined]
        yield url_of(server), server.seen  # type: ignore[attr-defined]


@pytest.fixture
def snapshot(emulator: EmulatorServer) -> EmulatorServer:
    emulator.store.add_snapshot(SNAP, {i: pattern_block(4, i) for i in range(0, 8, 2)})
    return emulator


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy"])
def test_a_proxy_for_the_endpoint_turns_the_direct_path_off(
    snapshot: EmulatorServer, forward_proxy, monkeypatch, variable
) -> None:
    """botocore honours the proxy and the direct path cannot: GETs go through boto3."""
    url, seen = forward_proxy
    monkeypatch.setenv(variable, url)
    monkeypatch.setenv("NO_PROXY", "example.com,127.0.0.2")  # names other hosts only
    api = BotoEbsApi(ConnectionOptions(endpoint_url=snapshot.url, retry=FAST_RETRY))
    assert get_paths(api, monkeypatch) == {"botocore": 2}
    assert f"/snapshots/{SNAP}/blocks/2" in seen


@pytest.mark.parametrize(
    "no_proxy", ["127.0.0.1", "localhost, 127.0.0.1", "*", "127.0.0.1:{port}", ".0.0.1"]
)
@pytest.mark.parametrize("variable", ["NO_PROXY", "no_proxy"])
def test_no_proxy_naming_the_endpoint_keeps_the_direct_path(
    snapshot: EmulatorServer, monkeypatch, variable, no_proxy
) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    port = urllib.parse.urlsplit(snapshot.url).port
    monkeypatch.setenv(variable, no_proxy.format(port=port))
    api = BotoEbsApi(ConnectionOptions(endpoint_url=snapshot.url, retry=FAST_RETRY))
    assert get_paths(api, monkeypatch) == {"direct": 2}


def test_a_proxy_for_another_scheme_keeps_the_direct_path(
    snapshot: EmulatorServer, monkeypatch
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # the endpoint is http://
    api = BotoEbsApi(ConnectionOptions(endpoint_url=snapshot.url, retry=FAST_RETRY))
    assert get_paths(api, monkeypatch) == {"direct": 2}


def test_direct_get_false_turns_the_direct_path_off_and_says_so_once(
    snapshot: EmulatorServer, monkeypatch, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="ebsfs")
    listing_only = BotoEbsApi(ConnectionOptions(endpoint_url=snapshot.url, direct_get=False))
    tokens(listing_only)
    assert not caplog.records  # a client that only lists has nothing to say
    api = BotoEbsApi(
        ConnectionOptions(endpoint_url=snapshot.url, retry=FAST_RETRY, direct_get=False)
    )
    assert get_paths(api, monkeypatch) == {"botocore": 2}
    assert [r.getMessage() for r in caplog.records] == [
        "GetSnapshotBlock goes through boto3, not the faster direct path: direct GETs "
        "turned off (--no-direct-get)"
    ]
    assert caplog.records[0].levelno == logging.INFO


@pytest.mark.parametrize(
    ("url", "env", "expected"),
    [
        ("https://ebs.us-east-1.amazonaws.com", {"HTTPS_PROXY": "http://p:3128"}, "https_proxy"),
        ("https://ebs.us-east-1.amazonaws.com", {"https_proxy": "http://p:3128"}, "https_proxy"),
        ("https://ebs.us-east-1.amazonaws.com", {"HTTP_PROXY": "http://p:3128"}, None),
        ("https://ebs.us-east-1.amazonaws.com", {"all_proxy": "socks5://p:1080"}, None),
        ("http://10.0.0.5:8080", {"http_proxy": "http://p:3128"}, "http_proxy"),
        (
            "https://ebs.us-east-1.amazonaws.com",
            {"HTTPS_PROXY": "http://p:3128", "NO_PROXY": ".amazonaws.com"},
            None,
        ),
        (
            "https://ebs.us-east-1.amazonaws.com",
            {"HTTPS_PROXY": "http://p:3128", "no_proxy": "amazonaws.com"},
            None,
        ),
        (
            "https://ebs.us-east-1.amazonaws.com",
            {"HTTPS_PROXY": "http://p:3128", "NO_PROXY": "EBS.us-east-1.amazonaws.com"},
            None,
        ),
        (
            "https://ebs.us-east-1.amazonaws.com",
            {"HTTPS_PROXY": "http://p:3128", "NO_PROXY": "*"},
            None,
        ),
        (
            "https://ebs.us-east-1.amazonaws.com",
            {"HTTPS_PROXY": "http://p:3128", "NO_PROXY": "s3.amazonaws.com,example.com"},
            "https_proxy",
        ),
        (
            "https://ebs.us-east-1.amazonaws.com",
            {"HTTPS_PROXY": "http://p:3128", "NO_PROXY": "zonaws.com"},
            "https_proxy",
        ),
        (
            "http://10.0.0.5:8080",
            {"http_proxy": "http://p:3128", "no_proxy": "10.0.0.5:8080"},
            None,
        ),
        (
            "http://10.0.0.5:8080",
            {"http_proxy": "http://p:3128", "no_proxy": "10.0.0.5:9090"},
            "http_proxy",
        ),
    ],
)
def test_proxy_rules(monkeypatch, url: str, env: dict[str, str], expected: str | None) -> None:
    """urllib's rules, which botocore follows: per scheme, any case, no_proxy by host,
    domain suffix (not a bare string suffix), host:port, and '*'."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert proxy_variable(url) == expected


# ---- the fakes fail as the client does ----------------------------------------------


@pytest.mark.parametrize("path", ["direct", "botocore"])
def test_the_fake_maps_errors_as_the_client_does(emulator: EmulatorServer, store, path) -> None:
    """tests/fakes.StoreApi and the real client, same store, same mistakes: the same
    typed errors with the same messages."""
    store.add_snapshot(SNAP, {i: pattern_block(4, i) for i in range(4)})
    store.add_snapshot("snap-0d0d", {0: pattern_block(5, 0)})
    real = BotoEbsApi(
        ConnectionOptions(endpoint_url=emulator.url, retry=FAST_RETRY, direct_get=path == "direct")
    )
    fake = StoreApi(store)
    t = tokens(real)
    mistakes: list[Callable[[Any], object]] = [
        lambda api: api.get_snapshot_block(SNAP, 2, t[0]),
        lambda api: api.get_snapshot_block("snap-0fff", 0, t[0]),
        lambda api: api.list_snapshot_blocks("snap-nothex"),
        lambda api: api.list_snapshot_blocks("snap-0fff"),
        lambda api: api.list_changed_blocks(SNAP, "snap-0d0d"),
    ]
    for mistake in mistakes:
        with pytest.raises(EbsfsError) as from_real:
            mistake(real)
        with pytest.raises(EbsfsError) as from_fake:
            mistake(fake)
        assert type(from_fake.value) is type(from_real.value)
        assert str(from_fake.value) == str(from_real.value)


# ---- the session: region, profile, endpoint, credentials ----------------------------


def test_aws_region_comes_before_aws_default_region(emulator: EmulatorServer, monkeypatch) -> None:
    assert BotoEbsApi(ConnectionOptions(endpoint_url=emulator.url)).region == "us-east-1"
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    assert BotoEbsApi(ConnectionOptions(endpoint_url=emulator.url)).region == "eu-west-1"
    assert (
        BotoEbsApi(ConnectionOptions(endpoint_url=emulator.url, region="ap-south-1")).region
        == "ap-south-1"
    )


def test_the_profile_gives_the_region(emulator: EmulatorServer, monkeypatch) -> None:
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    with open(os.environ["AWS_CONFIG_FILE"], "w") as f:
        f.write("[profile case]\nregion = sa-east-1\n")
    api = BotoEbsApi(ConnectionOptions(endpoint_url=emulator.url, profile="case"))
    assert api.region == "sa-east-1"


@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL_EBS", "AWS_ENDPOINT_URL"])
def test_endpoint_from_the_environment(snapshot: EmulatorServer, monkeypatch, variable) -> None:
    monkeypatch.setenv(variable, snapshot.url)
    api = BotoEbsApi(ConnectionOptions(retry=FAST_RETRY))
    assert api.endpoint_url == snapshot.url
    assert get_paths(api, monkeypatch) == {"direct": 2}
    assert snapshot.counters.calls["GetSnapshotBlock"] == 2


def test_endpoint_url_option_comes_before_the_environment(
    snapshot: EmulatorServer, monkeypatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_EBS", "http://127.0.0.1:9")
    assert BotoEbsApi(ConnectionOptions(endpoint_url=snapshot.url)).endpoint_url == snapshot.url


@pytest.mark.parametrize(
    ("options", "unset", "message"),
    [
        ({"profile": "nope"}, None, "AWS profile not found: nope"),
        ({}, "AWS_DEFAULT_REGION", "no AWS region configured: pass --region or set AWS_REGION"),
        ({"endpoint_url": "not a url"}, None, "invalid endpoint URL: Invalid endpoint: not a url"),
    ],
)
def test_configuration_mistakes_are_user_errors(
    monkeypatch, options: dict[str, Any], unset: str | None, message: str
) -> None:
    if unset:
        monkeypatch.delenv(unset)
    with pytest.raises(UserInputError) as err:
        BotoEbsApi(ConnectionOptions(**options))
    assert str(err.value) == message


def test_missing_credentials_fail_at_once(snapshot: EmulatorServer, monkeypatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    for direct_get in (True, False):
        api = BotoEbsApi(ConnectionOptions(endpoint_url=snapshot.url, direct_get=direct_get))
        with pytest.raises(CredentialsMissing, match="no AWS credentials found"):
            api.list_snapshot_blocks(SNAP)
        with pytest.raises(CredentialsMissing):
            api.get_snapshot_block(SNAP, 0, "AAAA")
    assert snapshot.counters.calls["GetSnapshotBlock"] == 0


@pytest.mark.parametrize("direct_get", [True, False])
def test_ebsfs_open_passes_direct_get_on(snapshot: EmulatorServer, direct_get: bool) -> None:
    from ebsfs.fileobj import open as open_snapshot

    with open_snapshot(SNAP, endpoint_url=snapshot.url, direct_get=direct_get) as f:
        api = f._loop.engine.api
        assert isinstance(api, BotoEbsApi)
        assert (api._direct is not None) is direct_get
