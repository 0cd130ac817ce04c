"""Kept-alive connections the server closed while they sat idle (issue 27): the direct
path sends the GET again at once on a new connection, once, with no back-off and no
retry counted, as http.client and urllib3 do; a new connection's failure, a timeout, or
a second failure still go to the retry policy. Each server is a small script on a socket."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import pytest

from ebsfs.constants import BLOCK_SIZE
from ebsfs.engine.stats import Stats
from ebsfs.errors import ProtocolError, RetriesExhausted, TransientError
from ebsfs.service import http1
from ebsfs.service.client import BotoEbsApi
from ebsfs.service.retry import RetryPolicy
from ebsfs.service.session import ConnectionOptions
from tests.localhttp import Server, tls_server_context
from tests.test_hostile_server import BLOCK, TOKEN, block_answer

T = TypeVar("T")


@dataclass(frozen=True)
class CountingPolicy(RetryPolicy):
    """A quick RetryPolicy that notes each back-off it sleeps."""

    attempts: int = 3
    base_delay: float = 0.001
    max_delay: float = 0.01
    sleeps: list[float] = field(default_factory=list)

    def call(
        self, what: str, fn: Callable[[], T], sleep: Callable[[float], None] = time.sleep
    ) -> T:
        def noted(seconds: float) -> None:
            self.sleeps.append(seconds)
            sleep(seconds)

        return super().call(what, fn, noted)


def reset(conn: socket.socket) -> None:
    """At the next request, close with a TCP reset (SO_LINGER 0) instead of a FIN (a
    reset at once could destroy the answer before the client read it)."""
    conn.recv(65536)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def answer_once(ref: list[Server], then: Callable[[socket.socket], None] = lambda c: None):
    """A connection that answers one GET, says nothing of closing, and closes."""

    def script(conn: socket.socket) -> None:
        ref[0].read_request(conn)
        conn.sendall(block_answer())
        then(conn)

    return script


def api_of(server: Server, policy: RetryPolicy, read_timeout: float = 2.0) -> BotoEbsApi:
    return BotoEbsApi(
        ConnectionOptions(
            endpoint_url=server.url, retry=policy, read_timeout=read_timeout, connect_timeout=2.0
        ),
        stats=Stats(),
    )


def fetch(api: BotoEbsApi, count: int) -> None:
    for index in range(count):
        assert bytes(api.get_snapshot_block("snap-01", index, TOKEN).data) == BLOCK


@pytest.mark.parametrize("close", ["fin", "reset"])
def test_a_server_closing_each_connection_costs_no_retry(serve, close: str) -> None:
    """Ten GETs, each on a connection the server closed after the one before: every
    one sent again at once on a new connection, no retry counted, no back-off."""
    ref: list[Server] = []
    ref.append(serve(answer_once(ref, reset if close == "reset" else lambda c: None)))
    policy = CountingPolicy()
    api = api_of(ref[0], policy)
    fetch(api, 10)
    assert isinstance(api.stats, Stats)
    assert api.stats.calls["GetSnapshotBlock"] == 10 and api.stats.retries == 0
    assert policy.sleeps == []
    assert len(ref[0].requests) == 10  # each read once by the server, on its own connection


def test_a_server_closing_tls_connections_costs_no_retry(
    serve, tls_files: tuple[str, str], monkeypatch
) -> None:
    """Over TLS the closed connection shows as an end of stream or an SSL EOF."""
    cert = tls_files[0]
    monkeypatch.setenv("AWS_CA_BUNDLE", cert)
    server_side = tls_server_context(tls_files)

    def script(conn: socket.socket) -> None:
        with server_side.wrap_socket(conn, server_side=True) as tls:
            ref[0].read_request(tls)
            tls.sendall(block_answer())

    ref: list[Server] = []
    ref.append(serve(script))
    policy = CountingPolicy()
    api = BotoEbsApi(
        ConnectionOptions(endpoint_url=f"https://127.0.0.1:{ref[0].port}", retry=policy),
        stats=Stats(),
    )
    fetch(api, 6)
    assert isinstance(api.stats, Stats) and api.stats.retries == 0
    assert policy.sleeps == []


def test_a_new_connection_failing_goes_to_the_retry_policy(serve) -> None:
    """Only a connection that served a GET before can be stale: a new one closed
    before answering is the server's failure, retried with a back-off as before."""
    ref: list[Server] = []

    def slam(conn: socket.socket) -> None:
        ref[0].read_request(conn)

    ref.append(serve(slam, answer_once(ref)))
    policy = CountingPolicy()
    api = api_of(ref[0], policy)
    fetch(api, 1)
    assert isinstance(api.stats, Stats) and api.stats.retries == 1
    assert len(policy.sleeps) == 1


def test_a_stale_connection_is_replaced_once_only(serve) -> None:
    """The second GET finds its connection closed, and the new one closed too before
    any answer: that is a failure of the server, for the retry policy; each attempt
    then opens one connection (no resending in a loop)."""
    ref: list[Server] = []

    def slam(conn: socket.socket) -> None:
        ref[0].read_request(conn)

    ref.append(serve(answer_once(ref), slam))
    policy = CountingPolicy()
    api = api_of(ref[0], policy)
    fetch(api, 1)
    with pytest.raises(RetriesExhausted) as failure:
        fetch(api, 1)
    assert isinstance(failure.value.__cause__, TransientError)
    assert len(policy.sleeps) == policy.attempts - 1
    time.sleep(0.2)
    # One connection served the first GET; then each attempt of the second opened one
    # (the first attempt's being the stale connection's replacement), and no more.
    assert len(ref[0].requests) == 1 + policy.attempts


def test_a_timeout_on_a_kept_alive_connection_is_not_resent_at_once(serve) -> None:
    """A server slow to answer may be working on the GET: that is for the retry policy."""
    ref: list[Server] = []
    release = threading.Event()

    def answer_then_stall(conn: socket.socket) -> None:
        ref[0].read_request(conn)
        conn.sendall(block_answer())
        ref[0].read_request(conn)
        release.wait(10)

    ref.append(serve(answer_then_stall, answer_once(ref)))
    policy = CountingPolicy()
    api = api_of(ref[0], policy, read_timeout=0.5)
    try:
        fetch(api, 2)
    finally:
        release.set()
    assert isinstance(api.stats, Stats) and api.stats.retries == 1
    assert len(policy.sleeps) == 1


@pytest.mark.parametrize(
    ("second", "stale"),
    [("closed", True), ("reset", True), ("half a head", False), ("silent", False)],
)
def test_only_a_reused_connection_failing_before_any_byte_went_stale(
    serve, second: str, stale: bool
) -> None:
    """http1's rule, on the connection itself: what the second GET on a connection
    meets after a good first answer."""
    ref: list[Server] = []
    release = threading.Event()

    def script(conn: socket.socket) -> None:
        ref[0].read_request(conn)
        conn.sendall(block_answer())
        if second == "reset":
            reset(conn)
        elif second == "half a head":
            ref[0].read_request(conn)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Le")
        elif second == "silent":
            ref[0].read_request(conn)
            release.wait(10)

    ref.append(serve(script))
    connection = http1.Connection("127.0.0.1", ref[0].port, None, 2.0, 0.5)
    try:
        connection.get("/", {"Host": "h"}, memoryview(bytearray(BLOCK_SIZE)))
        with pytest.raises(OSError) as failure:
            connection.get("/", {"Host": "h"}, memoryview(bytearray(BLOCK_SIZE)))
        assert connection.went_stale(failure.value) is stale
    finally:
        release.set()
        connection.close()


def test_a_new_connection_closed_before_an_answer_is_not_stale(serve) -> None:
    def slam(conn: socket.socket) -> None:
        ref[0].read_request(conn)

    ref: list[Server] = []
    ref.append(serve(slam))
    connection = http1.Connection("127.0.0.1", ref[0].port, None, 2.0, 2.0)
    try:
        with pytest.raises(ProtocolError) as failure:
            connection.get("/", {"Host": "h"}, None)
        assert not connection.went_stale(failure.value)
    finally:
        connection.close()
