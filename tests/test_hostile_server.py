"""A hostile or broken endpoint (issue 26): answers the HTTP client cannot parse fail as
a ProtocolError and are retried, never as a ValueError or a gigabyte of memory; a
trickling answer ends at its deadline; a read that gave up gives its fetch slot back
and ends its exchange; tokens never reach a message; list paging from a server that
never ends it stops with a clear error. Each server here is a small script on a socket."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import socket
import ssl
import threading
import time
import tracemalloc
from collections.abc import Callable

import botocore.exceptions
import pytest
import trio

from ebsfs.constants import BLOCK_SIZE
from ebsfs.engine import index as index_module
from ebsfs.engine.config import check_snapshot_id
from ebsfs.engine.index import pages
from ebsfs.engine.remote import RemoteSnapshots
from ebsfs.errors import (
    InvalidPageToken,
    InvalidSnapshotId,
    ProtocolError,
    RetriesExhausted,
    ServiceError,
)
from ebsfs.service import http1
from ebsfs.service.api import Block
from ebsfs.service.client import BotoEbsApi
from ebsfs.service.failures import boto_error
from ebsfs.service.retry import RetryPolicy
from ebsfs.service.session import ConnectionOptions
from tests.localhttp import Script, Server, tls_server_context

BLOCK = bytes(range(256)) * (BLOCK_SIZE // 256)
FEW_RETRIES = RetryPolicy(attempts=3, base_delay=0.001, max_delay=0.01, deadline=20)
TOKEN = "SECRET-block-token+/="


def block_answer(body: bytes = BLOCK) -> bytes:
    checksum = base64.b64encode(hashlib.sha256(body).digest()).decode()
    return (
        f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nx-amz-Checksum: {checksum}\r\n"
        f"x-amz-Checksum-Algorithm: SHA256\r\nx-amz-Data-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def answering(server_ref: list[Server], raw: bytes, then: Callable[[], None] = lambda: None):
    def script(conn: socket.socket) -> None:
        server_ref[0].read_request(conn)
        conn.sendall(raw)
        then()

    return script


def one_answer(serve, raw: bytes, hold: float = 0.0) -> Server:
    ref: list[Server] = []
    server = serve(answering(ref, raw, lambda: time.sleep(hold)))
    ref.append(server)
    return server


def get(server: Server, read_timeout: float = 2.0) -> http1.Response:
    connection = http1.Connection("127.0.0.1", server.port, None, 2.0, read_timeout)
    try:
        return connection.get("/", {"Host": "h"}, memoryview(bytearray(BLOCK_SIZE)))
    finally:
        connection.close()


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n",
        b"HTTP/1.1 \xb200 OK\r\nContent-Length: 0\r\n\r\n",  # a superscript two, latin-1
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: +0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0_0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length : 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Amz-Checksum: \xe9t\xe9\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Bad: a\x1bb\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nContent-Length: 5\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n" + b"X-A: b\r\n" * 200 + b"\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n+5\r\nabcde\r\n0\r\n\r\n",
    ],
)
def test_answers_that_do_not_parse_are_protocol_errors(serve, head: bytes) -> None:
    with pytest.raises(ProtocolError):
        get(one_answer(serve, head))


def test_a_huge_content_length_allocates_nothing(serve) -> None:
    server = one_answer(serve, b"HTTP/1.1 500 Oops\r\nContent-Length: 300000000\r\n\r\n{}")
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError):
            get(server)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024**2


def test_chunked_bodies_and_trailers_are_bounded(serve) -> None:
    chunk = b"10000\r\n" + bytes(65536) + b"\r\n"
    endless = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 64 + b"0\r\n\r\n"
    with pytest.raises(ProtocolError):
        get(one_answer(serve, endless))
    trailers = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n" + b"X: y\r\n" * 40000
    with pytest.raises(ProtocolError):
        get(one_answer(serve, trailers + b"\r\n"))


def trickle(data: bytes, pause: float, server_ref: list[Server], head: bytes = b"") -> Script:
    def script(conn: socket.socket) -> None:
        server_ref[0].read_request(conn)
        conn.sendall(head)
        for byte in data:
            if server_ref[0].stop.is_set():
                return
            conn.sendall(bytes([byte]))
            time.sleep(pause)

    return script


@pytest.mark.parametrize("where", ["head", "body"])
def test_a_trickling_answer_ends_at_its_deadline(serve, where: str) -> None:
    """A byte every 0.1 s never trips a 1 s receive timeout; the attempt's deadline
    (1 s of grace, then 32 KiB/s) ends it anyway."""
    ref: list[Server] = []
    answer = block_answer()
    if where == "head":
        script = trickle(answer[:200], 0.1, ref)  # 20 s of head
    else:
        cut = answer.index(b"\r\n\r\n") + 4
        script = trickle(answer[cut : cut + 200], 0.1, ref, head=answer[:cut])
    ref.append(serve(script))
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        get(ref[0], read_timeout=1.0)
    assert time.monotonic() - started < 5


def test_a_slow_honest_answer_is_not_cut_short(serve) -> None:
    """512 KiB in 16 pieces 0.15 s apart (about 200 KiB/s): within the deadline."""
    answer = block_answer()

    def script(conn: socket.socket) -> None:
        ref[0].read_request(conn)
        step = len(answer) // 16 + 1
        for at in range(0, len(answer), step):
            conn.sendall(answer[at : at + step])
            time.sleep(0.15)

    ref: list[Server] = []
    ref.append(serve(script))
    response = get(ref[0], read_timeout=1.0)
    assert response.status == 200


def direct_api(server: Server, read_timeout: float = 2.0, direct: bool = True) -> BotoEbsApi:
    return BotoEbsApi(
        ConnectionOptions(
            endpoint_url=server.url,
            retry=FEW_RETRIES,
            read_timeout=read_timeout,
            connect_timeout=2.0,
            direct_get=direct,
        )
    )


def test_a_parse_failure_drops_the_connection_and_is_retried(serve) -> None:
    ref: list[Server] = []
    bad = answering(ref, b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n")
    good = answering(ref, block_answer())
    ref.append(serve(bad, good))
    block = direct_api(ref[0]).get_snapshot_block("snap-01", 3, TOKEN)
    assert bytes(block.data) == BLOCK
    assert len(ref[0].requests) == 2


class StuckApi:
    """An EbsApi whose GETs of block 0 hang until released (or 10 s)."""

    get_throttles = 0

    def __init__(self) -> None:
        self.release = threading.Event()

    def get_snapshot_block(self, snapshot_id, index, token, into=None) -> Block:
        if index == 0:
            self.release.wait(10)
        return Block(b"x", None)


def test_a_read_that_gave_up_gives_its_fetch_slot_back() -> None:
    api = StuckApi()
    remote = RemoteSnapshots(api, max_fetches=2)  # type: ignore[arg-type]

    async def main() -> bool:
        for _ in range(2):  # two reads give up on slow answers: both slots were theirs
            with trio.move_on_after(0.1):
                await remote.get_snapshot_block("snap-01", 0, "t")
        assert remote.fetch_limiter.borrowed_tokens == 0
        with trio.move_on_after(2) as scope:
            await remote.get_snapshot_block("snap-01", 1, "t")
        return not scope.cancelled_caught

    try:
        assert trio.run(main), "a third fetch waited for slots nobody waited for"
    finally:
        api.release.set()


def test_calls_given_up_past_the_strays_bound_keep_their_slots() -> None:
    """A call that cannot be interrupted (boto3's) runs on: past a bound, the slots
    of such calls stay taken, or a trickling server could pile up threads."""
    api = StuckApi()
    remote = RemoteSnapshots(api, max_fetches=4)  # type: ignore[arg-type]
    remote.strays.limit = 1

    async def main() -> None:
        for _ in range(3):
            with trio.move_on_after(0.05):
                await remote.get_snapshot_block("snap-01", 0, "t")
        assert remote.strays.count == 1
        assert remote.fetch_limiter.borrowed_tokens == 2
        api.release.set()
        while remote.fetch_limiter.borrowed_tokens or remote.strays.count:
            await trio.sleep(0.01)

    try:
        trio.run(main)
    finally:
        api.release.set()


def test_a_read_that_gave_up_ends_its_exchange_and_its_retries(serve) -> None:
    ended = threading.Event()

    def stall(conn: socket.socket) -> None:
        ref[0].read_request(conn)
        conn.sendall(block_answer()[:1000])
        conn.settimeout(20)
        try:
            conn.recv(1)  # b"" once the client ends the exchange
        finally:
            ended.set()

    ref: list[Server] = []
    ref.append(serve(stall))
    remote = RemoteSnapshots(direct_api(ref[0], read_timeout=15.0))

    async def main() -> None:
        with trio.move_on_after(0.3):
            await remote.get_snapshot_block("snap-01", 3, TOKEN)

    trio.run(main)
    assert ended.wait(3), "the worker thread still waits on an answer nobody wants"
    time.sleep(0.3)
    assert len(ref[0].requests) == 1  # and it tried no more


def test_tokens_never_reach_messages_or_logs_on_the_boto3_path(serve, caplog) -> None:
    def silent(conn: socket.socket) -> None:
        ref[0].read_request(conn)
        time.sleep(3)

    ref: list[Server] = []
    ref.append(serve(silent))
    api = direct_api(ref[0], read_timeout=0.3, direct=False)
    caplog.set_level(logging.DEBUG, logger="ebsfs")
    with pytest.raises(RetriesExhausted) as failure:
        api.get_snapshot_block("snap-01", 3, TOKEN)
    assert "blockToken=<redacted>" in str(failure.value)
    for text in (str(failure.value), caplog.text):
        assert "SECRET" not in text and "block-token" not in text


@pytest.mark.parametrize(
    "err",
    [
        botocore.exceptions.EndpointConnectionError(
            endpoint_url=f"https://ebs/snapshots/snap-1/blocks/3?blockToken={TOKEN}"
        ),
        botocore.exceptions.ReadTimeoutError(
            endpoint_url="https://ebs/snapshots/snap-1/blocks?pageToken=SECRET&maxResults=100"
        ),
        botocore.exceptions.ParamValidationError(report=f"Invalid BlockToken value: {TOKEN}"),
    ],
)
def test_boto_errors_are_redacted(err: Exception) -> None:
    message = str(boto_error(err, TOKEN))
    assert "SECRET" not in message and "<redacted>" in message


def test_a_snapshot_id_with_a_trailing_newline_is_refused() -> None:
    with pytest.raises(InvalidSnapshotId):
        check_snapshot_id("snap-0123abcd\n")
    assert check_snapshot_id("snap-0123abcd") == "snap-0123abcd"


@pytest.mark.expected_log(r"http://192\.0\.2\.10:8080 is plain http")
def test_a_plain_http_endpoint_off_this_host_is_warned_of_once(caplog) -> None:
    api = BotoEbsApi(ConnectionOptions(endpoint_url="http://192.0.2.10:8080"))
    BotoEbsApi(ConnectionOptions(endpoint_url="http://192.0.2.10:8080"), session=api.session)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1


@pytest.mark.parametrize("url", ["http://127.0.0.1:9", "http://localhost:9", "http://[::1]:9"])
def test_a_loopback_endpoint_is_not_warned_of(url: str, caplog) -> None:
    BotoEbsApi(ConnectionOptions(endpoint_url=url))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def run_pages(fetch, limit: int = 2000) -> list[tuple[list, str | None, float]]:
    async def main() -> list:
        got = []
        async for page in pages(fetch, 0, "snap-01"):
            got.append(page)
            assert len(got) < limit, "the listing never ends"
        return got

    return trio.run(main)


def test_endless_empty_pages_stop_with_a_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(index_module, "MAX_IDLE_PAGES", 50)
    calls = 0

    async def fetch(start: int, token: str | None):
        nonlocal calls
        calls += 1
        return [], f"t{calls}", float("inf")

    with pytest.raises(ServiceError, match="does not advance"):
        run_pages(fetch)
    assert calls <= 52


def test_a_page_token_handed_back_is_a_clear_error() -> None:
    async def fetch(start: int, token: str | None):
        return [], "same", float("inf")

    with pytest.raises(ServiceError, match="does not advance"):
        run_pages(fetch)


def test_a_page_token_refused_forever_stops(monkeypatch) -> None:
    monkeypatch.setattr(index_module, "MAX_IDLE_PAGES", 50)

    async def fetch(start: int, token: str | None):
        if token is not None:
            raise InvalidPageToken("refused")
        return [], "t", float("inf")

    with pytest.raises(ServiceError, match="does not advance"):
        run_pages(fetch)


def test_entries_that_go_back_are_dropped() -> None:
    answers = iter([([(5, "a"), (6, "b")], "t1"), ([(3, "c"), (6, "d"), (9, "e")], None)])

    async def fetch(start: int, token: str | None):
        entries, next_token = next(answers)
        return entries, next_token, float("inf")

    listed = [index for entries, _, _ in run_pages(fetch) for index, _ in entries]
    assert listed == [5, 6, 9]


@pytest.mark.parametrize(
    "page",
    [
        {"Blocks": [{"BlockIndex": -1, "BlockToken": "t"}]},
        {"Blocks": [{"BlockIndex": 2048, "BlockToken": "t"}]},  # past a 1 GiB volume
        {"Blocks": [{"BlockIndex": 1, "BlockToken": "t" * 5000}]},
        {"Blocks": [], "BlockSize": 512},
        {"Blocks": [], "VolumeSize": 0},
        {"Blocks": [], "VolumeSize": 2**40},
    ],
)
def test_list_pages_that_cannot_be_right_are_refused(serve, page: dict) -> None:
    body = json.dumps({"VolumeSize": 1, "BlockSize": BLOCK_SIZE, **page}).encode()
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
    server = one_answer(serve, head.encode() + b"\r\n\r\n" + body)
    with pytest.raises(ServiceError, match="cannot be right"):
        direct_api(server).list_snapshot_blocks("snap-01")


def test_a_hostile_error_message_is_cut_short(serve) -> None:
    body = json.dumps({"message": "x" * 100000}).encode()
    head = (
        "HTTP/1.1 403 Forbidden\r\nx-amzn-ErrorType: AccessDeniedException\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    server = one_answer(serve, head.encode() + body)
    with pytest.raises(ServiceError) as failure:
        direct_api(server).get_snapshot_block("snap-01", 3, TOKEN)
    assert len(str(failure.value)) < 400


def test_an_error_body_nested_a_million_deep_is_just_unreadable(serve) -> None:
    body = b"[" * 500000
    head = (
        "HTTP/1.1 403 Forbidden\r\nx-amzn-ErrorType: AccessDeniedException\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    server = one_answer(serve, head.encode() + body)
    with pytest.raises(ServiceError, match="AccessDeniedException"):
        direct_api(server).get_snapshot_block("snap-01", 3, TOKEN)


@pytest.mark.parametrize("body", [{"__type": 5}, {"code": ["x"]}, {"message": {"a": 1}}])
def test_an_error_body_of_the_wrong_shape_is_still_an_error(serve, body: dict) -> None:
    raw = json.dumps(body).encode()
    head = f"HTTP/1.1 400 Bad\r\nContent-Length: {len(raw)}\r\n\r\n"
    server = one_answer(serve, head.encode() + raw)
    with pytest.raises((ServiceError, RetriesExhausted)):
        direct_api(server).get_snapshot_block("snap-01", 3, TOKEN)


@pytest.mark.parametrize(
    "body",
    [
        b'{"VolumeSize": 1, "ExpiryTime": "abc", "Blocks": []}',
        b'{"VolumeSize": 1, "ExpiryTime": 1e400, "Blocks": []}',
        b'{"VolumeSize": 1, "ExpiryTime": [1], "Blocks": []}',
        b'{"VolumeSize": 1, "Blocks": {"a": 1}}',
        b"[1, 2]",
        b"[" * 100000,
    ],
)
def test_list_answers_botocore_cannot_parse_are_service_failures(serve, body: bytes) -> None:
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
    server = one_answer(serve, head.encode() + b"\r\n\r\n" + body)
    with pytest.raises((ServiceError, RetriesExhausted)):
        direct_api(server).list_snapshot_blocks("snap-01")


def test_a_huge_body_on_the_boto3_path_is_not_read_whole(serve) -> None:
    head = (
        block_answer()
        .split(b"\r\n\r\n")[0]
        .replace(f"Content-Length: {BLOCK_SIZE}".encode(), b"Content-Length: 400000000")
    )
    server = one_answer(serve, head + b"\r\n\r\n" + bytes(48 * 1024**2))
    tracemalloc.start()
    try:
        with pytest.raises(RetriesExhausted):
            direct_api(server, direct=False).get_snapshot_block("snap-01", 3, TOKEN)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 24 * 1024**2


def test_abort_ends_a_stalled_tls_exchange(tls_files: tuple[str, str]) -> None:
    """Over TLS too: the raw socket is shut down under the SSL layer, and the reading
    thread gets an OSError at once (not a crash, not a wait for its timeout)."""
    cert = tls_files[0]
    server_side = tls_server_context(tls_files)
    listener = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with server_side.wrap_socket(conn, server_side=True) as tls:
            tls.recv(65536)
            tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
            done.wait(20)

    threading.Thread(target=serve, daemon=True).start()
    client_side = ssl.create_default_context(cafile=cert)
    port = int(listener.getsockname()[1])
    connection = http1.Connection("localhost", port, client_side, 2.0, 15.0)
    threading.Timer(0.3, connection.abort).start()
    started = time.monotonic()
    try:
        with pytest.raises(OSError):
            connection.get("/", {"Host": "h"}, None)
        assert time.monotonic() - started < 3
    finally:
        done.set()
        connection.close()
        listener.close()


def test_a_token_too_short_to_be_secret_does_not_garble_messages() -> None:
    """A test's (or a hostile server's) token "t" was replaced everywhere: the message
    came out as `Ge<redacted>Snapsho<redacted>Block`."""
    from ebsfs.service.failures import redact

    assert redact("GetSnapshotBlock 0: ConnectionResetError", "t") == (
        "GetSnapshotBlock 0: ConnectionResetError"
    )
    assert "SECRETTOKEN" not in redact("url?x=SECRETTOKEN&y", "SECRETTOKEN")
