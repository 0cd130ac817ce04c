"""The list calls sent over the direct path's HTTP/1.1 client (service/listsend.py):
signed as botocore signs them (checked by botocore's own signer on the server side),
on the GETs' kept-alive connection, chunked answers parsed; a trickling or huge list
answer ends at its deadline or its cap as a GET does (issue 26); transport failures
typed as on the GET path, page tokens kept out of messages; with a proxy or
--no-direct-get botocore's transport as before. Each server is a small script."""

from __future__ import annotations

import json
import logging
import os
import socket
import ssl
import threading
import time
import tracemalloc
import urllib.parse

import botocore.auth
import pytest

from ebsfs.constants import BLOCK_SIZE
from ebsfs.emulator import EmulatorServer
from ebsfs.emulator.auth import verify_signature
from ebsfs.emulator.store import ApiError
from ebsfs.engine.stats import Stats
from ebsfs.errors import (
    CertificateUntrusted,
    EndpointUnreachable,
    ProtocolError,
    ReadFailed,
    RetriesExhausted,
    TransientError,
)
from ebsfs.service import http1
from ebsfs.service.client import BotoEbsApi
from ebsfs.service.listsend import MAX_LIST_BODY
from ebsfs.service.session import ConnectionOptions
from tests.fakes import pattern_block
from tests.localhttp import Script, Server
from tests.test_hostile_server import (
    BLOCK,
    FEW_RETRIES,
    answering,
    block_answer,
    trickle,
)

PAGE_TOKEN = "SECRET-page-token+/="
KEYS = {"AKIDTEST": "secret"}


@pytest.fixture(autouse=True)
def no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxy settings from the machine: each test sets the ones it is about."""
    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)


def page_body(indexes: range, next_token: str | None = None, changed: bool = False) -> bytes:
    """A list page as the service writes it."""
    if changed:
        entries = [
            {"BlockIndex": i, "FirstBlockToken": f"f{i}", "SecondBlockToken": f"s{i}"}
            for i in indexes
        ]
    else:
        entries = [{"BlockIndex": i, "BlockToken": f"t{i}"} for i in indexes]
    page = {
        "ChangedBlocks" if changed else "Blocks": entries,
        "VolumeSize": 1,
        "BlockSize": BLOCK_SIZE,
        "ExpiryTime": 1.9e9,
    }
    if next_token:
        page["NextToken"] = next_token
    return json.dumps(page).encode()


def sized(body: bytes) -> bytes:
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
    return head.encode() + b"\r\n\r\n" + body


def chunked(body: bytes, piece: int = 97) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked"
    chunks = b"".join(
        f"{len(body[at : at + piece]):x}\r\n".encode() + body[at : at + piece] + b"\r\n"
        for at in range(0, len(body), piece)
    )
    return head + b"\r\n\r\n" + chunks + b"0\r\n\r\n"


def parse_request(raw: bytes) -> tuple[str, str, dict[str, str]]:
    """(method, target, headers by lower-case name) of a request head."""
    lines = raw.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.lower()] = value.strip()
    return method, target, headers


class Verifying:
    """A keep-alive server script: each request's SigV4 signature recomputed with
    botocore's own signer (ebsfs.emulator.auth) and its Host header compared with
    botocore's rule; list calls answered with pages (chunked), GETs with BLOCK."""

    def __init__(self, url: str = "") -> None:
        self.url = url
        self.connections = 0
        self.bad: list[str] = []
        self.targets: list[str] = []

    def __call__(self, server: Server) -> Script:
        def script(conn: socket.socket) -> None:
            self.connections += 1
            while True:
                method, target, headers = parse_request(server.read_request(conn))
                self.targets.append(target)
                try:
                    verify_signature(method, target, headers, KEYS)
                except ApiError as err:
                    self.bad.append(f"{target}: {err.code}")
                if headers.get("host") != botocore.auth._host_from_url(self.url):
                    self.bad.append(f"{target}: Host {headers.get('host')}")
                conn.sendall(self.answer(target))

        return script

    @staticmethod
    def answer(target: str) -> bytes:
        path, _, query = target.partition("?")
        params = urllib.parse.parse_qs(query)
        if "/blocks/" in path:
            return block_answer()
        if path.endswith("/changedblocks"):
            return chunked(page_body(range(4, 8), changed=True))
        if "pageToken" in params:
            assert params["pageToken"] == [PAGE_TOKEN]
            return chunked(page_body(range(2, 4)))
        return chunked(page_body(range(0, 2), next_token=PAGE_TOKEN))


def verifying_server(serve) -> tuple[Server, Verifying]:
    script = Verifying()
    ref: list[Server] = []
    ref.append(serve(lambda conn: script(ref[0])(conn)))
    script.url = ref[0].url
    return ref[0], script


def api_for(url: str, read_timeout: float = 2.0, direct: bool = True) -> BotoEbsApi:
    return BotoEbsApi(
        ConnectionOptions(
            endpoint_url=url,
            retry=FEW_RETRIES,
            read_timeout=read_timeout,
            connect_timeout=2.0,
            direct_get=direct,
        )
    )


@pytest.mark.parametrize("session_token", [None, "session/token+="])
def test_lists_are_signed_as_botocore_signs_them_and_share_the_gets_connection(
    serve, monkeypatch, session_token: str | None
) -> None:
    """A listing (two pages, the second by a NextToken that needs quoting), a diff's
    page and two GETs: one connection, every signature right, chunked pages parsed."""
    if session_token:
        monkeypatch.setenv("AWS_SESSION_TOKEN", session_token)
    server, script = verifying_server(serve)
    api = api_for(server.url)
    first = api.list_snapshot_blocks("snap-01", start_index=0, max_results=100)
    assert first.blocks == [(0, "t0"), (1, "t1")] and first.next_token == PAGE_TOKEN
    second = api.list_snapshot_blocks("snap-01", next_token=PAGE_TOKEN, max_results=100)
    assert second.blocks == [(2, "t2"), (3, "t3")] and second.next_token is None
    changes = api.list_changed_blocks("snap-00", "snap-01")
    assert [(c.index, c.first_token, c.second_token) for c in changes.changes] == [
        (i, f"f{i}", f"s{i}") for i in range(4, 8)
    ]
    for index in (2, 3):
        assert bytes(api.get_snapshot_block("snap-01", index, "t").data) == BLOCK
    assert script.bad == []
    assert len(script.targets) == 5
    assert script.connections == 1  # the lists went over the GETs' kept-alive connection


def test_a_trickling_list_page_ends_at_its_deadline(serve) -> None:
    """A byte every 0.1 s never trips the 1 s receive timeout botocore has; the
    attempt's deadline (1 s of grace, then 32 KiB/s) ends each attempt in about 1 s."""
    ref: list[Server] = []
    ref.append(serve(trickle(sized(page_body(range(100))), 0.1, ref)))  # minutes of page
    api = api_for(ref[0].url, read_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(RetriesExhausted) as failure:
        api.list_snapshot_blocks("snap-01")
    assert time.monotonic() - started < 10
    cause = failure.value.__cause__
    assert isinstance(cause, TransientError) and isinstance(cause.__cause__, TimeoutError)
    assert str(cause).startswith("ListSnapshotBlocks: TimeoutError")


def hundred_megabytes(ref: list[Server], framing: str) -> Script:
    """A list answer of 100 MB of JSON whitespace, announced or chunked."""

    def script(conn: socket.socket) -> None:
        ref[0].read_request(conn)
        mib = b" " * 1024**2
        if framing == "announced":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n")
            piece = mib
        else:
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            piece = b"100000\r\n" + mib + b"\r\n"
        for _ in range(100):
            if ref[0].stop.is_set():
                return
            conn.sendall(piece)

    return script


@pytest.mark.parametrize("framing", ["announced", "chunked"])
def test_a_list_answer_of_100_mb_is_refused_without_taking_100_mb(serve, framing: str) -> None:
    """botocore reads a body whole before parsing it; the cap (MAX_LIST_BODY) refuses
    an announced one at its head and a chunked one once past the cap."""
    ref: list[Server] = []
    warm = sized(page_body(range(2))).replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
    ref.append(serve(answering(ref, warm), hundred_megabytes(ref, framing)))
    api = api_for(ref[0].url)
    api.list_snapshot_blocks("snap-01")  # botocore's lazy loading done before counting
    tracemalloc.start()
    try:
        with pytest.raises(RetriesExhausted) as failure:
            api.list_snapshot_blocks("snap-01")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    cause = failure.value.__cause__
    assert isinstance(cause, TransientError) and isinstance(cause.__cause__, ProtocolError)
    assert peak < (8 * 1024**2 if framing == "announced" else 2 * MAX_LIST_BODY)


def test_a_full_page_fits_the_cap() -> None:
    """10,000 entries of ListChangedBlocks with 400-character tokens (twice the
    service's) fit under MAX_LIST_BODY."""
    token = "A" * 400
    entries = [
        {"BlockIndex": 10**7 + i, "FirstBlockToken": token, "SecondBlockToken": token}
        for i in range(10000)
    ]
    body = json.dumps({"ChangedBlocks": entries, "NextToken": token, "VolumeSize": 16384})
    assert len(body) < MAX_LIST_BODY


@pytest.mark.parametrize("echo", ["request line", "token in a header"])
def test_page_tokens_never_reach_messages_on_the_list_path(serve, caplog, echo: str) -> None:
    """A server echoing the request into an answer that does not parse: the error
    quotes what it sent, the NextToken redacted."""

    def script(conn: socket.socket) -> None:
        line = ref[0].read_request(conn).split(b"\r\n")[0]
        if echo == "request line":
            conn.sendall(line + b"\r\n\r\n")
        else:
            conn.sendall(b"HTTP/1.1 200 OK\r\nX: " + PAGE_TOKEN.encode() + b"\x01\r\n\r\n")

    ref: list[Server] = []
    ref.append(serve(script))
    caplog.set_level(logging.DEBUG, logger="ebsfs")
    with pytest.raises(RetriesExhausted) as failure:
        api_for(ref[0].url).list_snapshot_blocks("snap-01", next_token=PAGE_TOKEN)
    assert isinstance(failure.value.__cause__, TransientError)
    assert isinstance(failure.value.__cause__.__cause__, ProtocolError)
    for text in (str(failure.value), caplog.text):
        assert "SECRET" not in text and "page-token" not in text


def test_an_unreachable_endpoint_is_typed_on_the_list_path() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now
    with pytest.raises(RetriesExhausted) as failure:
        api_for(f"http://127.0.0.1:{port}").list_snapshot_blocks("snap-01")
    assert isinstance(failure.value.__cause__, EndpointUnreachable)
    assert isinstance(failure.value.__cause__.__cause__, ConnectionRefusedError)


def test_an_untrusted_certificate_is_typed_on_the_list_path(
    https_emulator: EmulatorServer, monkeypatch
) -> None:
    monkeypatch.delenv("AWS_CA_BUNDLE")
    with pytest.raises(CertificateUntrusted, match="AWS_CA_BUNDLE") as failure:
        api_for(https_emulator.url).list_snapshot_blocks("snap-01")
    assert isinstance(failure.value.__cause__, ssl.SSLCertVerificationError)  # http1's


def test_an_abandoned_list_call_ends_its_exchange(serve) -> None:
    release = threading.Event()

    def stall(conn: socket.socket) -> None:
        ref[0].read_request(conn)
        release.wait(20)

    ref: list[Server] = []
    ref.append(serve(stall))
    api = api_for(ref[0].url, read_timeout=15.0)
    gone = http1.Abandon()
    threading.Timer(0.3, gone.fire).start()
    started = time.monotonic()
    try:
        with http1.abandonable(gone), pytest.raises(ReadFailed, match="given up"):
            api.list_snapshot_blocks("snap-01")
    finally:
        release.set()
    assert time.monotonic() - started < 3
    assert len(ref[0].requests) == 1


def test_the_emulators_lists_page_the_same_on_both_transports(emulator: EmulatorServer) -> None:
    """End to end (the emulator checks every signature): paging by NextToken through
    both list calls gives what botocore's own transport gives."""
    one, other = pattern_block(1, 0), pattern_block(2, 0)  # one object a snapshot: small
    emulator.store.add_snapshot("snap-0a", dict.fromkeys(range(0, 700, 3), one))
    emulator.store.add_snapshot("snap-0b", dict.fromkeys(range(0, 700, 5), other), parent="snap-0a")

    def everything(api: BotoEbsApi) -> tuple[list, list]:
        blocks, changes, token = [], [], None
        while True:
            page = api.list_snapshot_blocks("snap-0a", next_token=token, max_results=100)
            blocks += [index for index, _ in page.blocks]
            if not (token := page.next_token):
                break
        while True:
            diff = api.list_changed_blocks("snap-0a", "snap-0b", next_token=token, max_results=100)
            changes += [c.index for c in diff.changes]
            if not (token := diff.next_token):
                break
        return blocks, changes

    direct = everything(api_for(emulator.url))
    assert direct == everything(api_for(emulator.url, direct=False))
    assert direct[0] == list(range(0, 700, 3)) and direct[1]
    assert emulator.counters.calls["ListSnapshotBlocks"] >= 2 * 3


def test_with_a_proxy_lists_go_through_botocore(serve, monkeypatch) -> None:
    """botocore honours the proxy; the direct path would not: lists stay on botocore's
    transport (the scripted server plays the proxy and sees the absolute URL)."""
    ref: list[Server] = []

    def proxy(conn: socket.socket) -> None:
        ref[0].read_request(conn)
        conn.sendall(sized(page_body(range(2))))

    ref.append(serve(proxy))
    monkeypatch.setenv("HTTP_PROXY", ref[0].url)
    api = api_for("http://127.0.0.2:9")
    assert api.why_not_direct is not None
    assert api.list_snapshot_blocks("snap-01").blocks == [(0, "t0"), (1, "t1")]
    assert ref[0].requests[0].startswith(b"GET http://127.0.0.2:9/snapshots/snap-01/blocks?")


def test_without_the_direct_path_lists_go_through_botocore(serve) -> None:
    """--no-direct-get: botocore's transport, its limits (an answer announcing more
    than the cap is read as botocore reads it, not refused)."""
    ref: list[Server] = []

    def answer(conn: socket.socket) -> None:
        ref[0].read_request(conn)
        body = page_body(range(2)) + b" " * (MAX_LIST_BODY + 1)
        conn.sendall(sized(body))

    ref.append(serve(answer))
    api = api_for(ref[0].url, direct=False)
    assert api.list_snapshot_blocks("snap-01").blocks == [(0, "t0"), (1, "t1")]


@pytest.mark.parametrize(
    "endpoint",
    [
        "https://EBS.Example.com",
        "https://ebs.example.com:443",
        "https://ebs.example.com:8443",
        "http://127.0.0.1:8080",
        "http://localhost",
        "http://[::1]:8080",
        "https://[::1]",
    ],
)
def test_the_host_header_is_the_one_botocore_signs(endpoint: str) -> None:
    """botocore signs a Host it derives from the URL (lower case, no default port,
    IPv6 in brackets) and lets urllib3 send one: http1 must send that same one."""
    api = api_for(endpoint)
    assert api._direct is not None
    url = f"{api.endpoint_url}/snapshots/snap-01/blocks?maxResults=100"
    assert api._direct.host_for(url) == botocore.auth._host_from_url(url)
    assert api._direct.host_for("https://elsewhere.example.com/snapshots") is None


def test_list_calls_on_connections_the_server_closes_cost_no_retry(serve) -> None:
    """Lists share the GETs' reopening of a kept-alive connection the server closed."""
    ref: list[Server] = []

    def once(conn: socket.socket) -> None:
        target = parse_request(ref[0].read_request(conn))[1]
        conn.sendall(Verifying.answer(target))  # then closes, saying nothing of it

    ref.append(serve(once))
    stats = Stats()
    api = BotoEbsApi(ConnectionOptions(endpoint_url=ref[0].url, retry=FEW_RETRIES), stats=stats)
    for _ in range(3):
        assert api.list_snapshot_blocks("snap-01").next_token == PAGE_TOKEN
        assert bytes(api.get_snapshot_block("snap-01", 1, "SECRET-block-token").data) == BLOCK
    assert stats.retries == 0 and stats.calls["ListSnapshotBlocks"] == 3


def test_a_list_request_carries_the_header_lines_urllib3_sends(serve) -> None:
    """The same header lines, in the same order, on both transports (Host first, a
    body asked for unencoded), so an endpoint cannot tell the paths apart."""
    ref: list[Server] = []
    seen: list[list[str]] = []

    def record(conn: socket.socket) -> None:
        head = ref[0].read_request(conn).split(b"\r\n\r\n")[0].decode()
        seen.append([line.split(":")[0] for line in head.split("\r\n")[1:]])
        assert "Accept-Encoding: identity" in head
        answer = sized(page_body(range(2)))
        conn.sendall(answer.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1))

    ref.append(serve(record))
    for direct in (True, False):
        api_for(ref[0].url, direct=direct).list_snapshot_blocks("snap-01")
    assert seen[0] == seen[1] and seen[0][0] == "Host"
