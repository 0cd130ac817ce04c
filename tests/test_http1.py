"""ebsfs.service.http1, the GET path's HTTP/1.1 client, against a scripted server: the answers
the emulator never gives (chunked bodies, closes, stalls, garbage) read right or fail as
a retryable OSError, never as wrong bytes or a hang."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from ebsfs.service import http1
from tests.localhttp import tls_server_context

BODY = bytes(range(256)) * 2048  # 512 KiB


@pytest.fixture
def server() -> Iterator[Callable[[Callable[[socket.socket], None]], int]]:
    """Serve one connection with the given script; returns the port."""
    listeners: list[socket.socket] = []
    threads: list[threading.Thread] = []

    def start(script: Callable[[socket.socket], None]) -> int:
        listener = socket.create_server(("127.0.0.1", 0))
        listeners.append(listener)

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                script(conn)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        threads.append(thread)
        return int(listener.getsockname()[1])

    yield start
    for listener in listeners:
        listener.close()
    for thread in threads:
        thread.join(timeout=5)


def read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    return data


def answer(conn: socket.socket, head: str, body: bytes = b"") -> None:
    conn.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)


def test_a_body_of_content_length_lands_in_the_room_given(server) -> None:
    def script(conn: socket.socket) -> None:
        for _ in range(2):  # keep-alive: two requests on one connection
            request = read_request(conn)
            assert request.startswith(b"GET /x?y=1 HTTP/1.1\r\n") and b"Host: h\r\n" in request
            answer(conn, f"HTTP/1.1 200 OK\nContent-Length: {len(BODY)}\nX-Amz-Checksum: c\n", BODY)

    connection = http1.Connection("127.0.0.1", server(script), None, 2.0, 2.0)
    for _ in range(2):
        room = memoryview(bytearray(len(BODY)))
        response = connection.get("/x?y=1", {"Host": "h"}, room)
        assert response.status == 200 and response.body is None and not response.will_close
        assert response.headers["x-amz-checksum"] == "c"
        assert bytes(room) == BODY
    connection.close()


def test_an_answer_at_a_normal_pace_leaves_the_kernel_timeout_alone(server, monkeypatch) -> None:
    """The receive timeout is shortened (a system call) only near the attempt's deadline;
    a regression made that one or two calls a block, and the receive loop's bookkeeping
    cost a TLS read 20 % of its CPU under 32 threads (docs/performance.md)."""

    def script(conn: socket.socket) -> None:
        for _ in range(3):
            read_request(conn)
            answer(conn, f"HTTP/1.1 200 OK\nContent-Length: {len(BODY)}\n", BODY)

    connection = http1.Connection("127.0.0.1", server(script), None, 2.0, 2.0)
    changed: list[float] = []
    monkeypatch.setattr(
        http1, "_kernel_timeouts", lambda sock, seconds, both=False: changed.append(seconds)
    )
    for _ in range(3):
        room = memoryview(bytearray(len(BODY)))
        connection.get("/", {}, room)
        assert bytes(room) == BODY
    connection.close()
    assert changed == []


def test_a_chunked_body_is_decoded(server) -> None:
    def script(conn: socket.socket) -> None:
        read_request(conn)
        chunks = b"".join(
            f"{len(part):x};ext=1\r\n".encode() + part + b"\r\n"
            for part in (BODY[:1000], BODY[1000:300000], BODY[300000:])
        )
        answer(
            conn,
            "HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n",
            chunks + b"0\r\nX-Trailer: 1\r\n\r\n",
        )

    connection = http1.Connection("127.0.0.1", server(script), None, 2.0, 2.0)
    response = connection.get("/", {}, memoryview(bytearray(len(BODY))))
    assert response.body == BODY


def test_an_error_answer_keeps_its_body(server) -> None:
    def script(conn: socket.socket) -> None:
        read_request(conn)
        body = b'{"message": "no"}'
        answer(
            conn, f"HTTP/1.1 403 Forbidden\nContent-Length: {len(body)}\nConnection: close\n", body
        )

    connection = http1.Connection("127.0.0.1", server(script), None, 2.0, 2.0)
    response = connection.get("/", {}, memoryview(bytearray(len(BODY))))
    assert response.status == 403 and response.body == b'{"message": "no"}'
    assert response.will_close


@pytest.mark.parametrize("cut", ["before the answer", "in the head", "in the body"])
def test_a_connection_cut_short_is_a_protocol_error(server, cut) -> None:
    def script(conn: socket.socket) -> None:
        read_request(conn)
        if cut == "in the head":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Le")
        elif cut == "in the body":
            answer(conn, f"HTTP/1.1 200 OK\nContent-Length: {len(BODY)}\n", BODY[:100000])

    connection = http1.Connection("127.0.0.1", server(script), None, 2.0, 2.0)
    with pytest.raises(http1.ProtocolError):
        connection.get("/", {}, memoryview(bytearray(len(BODY))))


def test_a_stalled_body_times_out_within_the_read_timeout(server) -> None:
    release = threading.Event()

    def script(conn: socket.socket) -> None:
        read_request(conn)
        answer(conn, f"HTTP/1.1 200 OK\nContent-Length: {len(BODY)}\n", BODY[:1000])
        release.wait(10)

    connection = http1.Connection("127.0.0.1", server(script), None, 2.0, 0.5)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        connection.get("/", {}, memoryview(bytearray(len(BODY))))
    release.set()
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    "head", ["HTTP/2 200\n", "garbage\n", "HTTP/1.1 200 OK\nno colon\n", "HTTP/1.1 200 OK\n"]
)
def test_answers_this_client_cannot_read_are_protocol_errors(server, head) -> None:
    def script(conn: socket.socket) -> None:
        read_request(conn)
        answer(conn, head)

    connection = http1.Connection("127.0.0.1", server(script), None, 2.0, 2.0)
    with pytest.raises(http1.ProtocolError):
        connection.get("/", {}, memoryview(bytearray(len(BODY))))


@pytest.mark.parametrize("grows", [True, False])
def test_a_handshake_past_its_deadline_goes_on_when_the_deadline_grows(
    tls_files: tuple[str, str], grows: bool
) -> None:
    """The TLS handshake's deadline is asked again when reached (connections.Pool grows
    it while other connects are queued with this one): the handshake then goes on where
    it was, on the same socket. A deadline that does not grow ends it."""
    cert = tls_files[0]
    server_side = tls_server_context(tls_files)
    listener = socket.create_server(("127.0.0.1", 0))
    served = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        time.sleep(0.3)  # the accept loop's turn comes late
        with contextlib.suppress(OSError), server_side.wrap_socket(conn, server_side=True):
            served.wait(5)

    thread = threading.Thread(target=serve)
    thread.start()
    asked: list[float] = []

    def deadline() -> float:
        asked.append(time.monotonic())
        return 0.1 if len(asked) == 1 or not grows else 2.0

    client_side = ssl.create_default_context(cafile=cert)
    try:
        if grows:
            conn = http1.Connection(
                "127.0.0.1", listener.getsockname()[1], client_side, 1.0, 5.0, deadline
            )
            assert conn.handshake_seconds is not None and conn.handshake_seconds > 0.2
            assert len(asked) == 2
            conn.close()
        else:
            with pytest.raises(TimeoutError):
                http1.Connection(
                    "127.0.0.1", listener.getsockname()[1], client_side, 1.0, 5.0, deadline
                )
    finally:
        served.set()
        thread.join(timeout=10)
        listener.close()


def test_a_handshake_trickled_a_byte_at_a_time_ends_at_its_deadline(
    tls_files: tuple[str, str],
) -> None:
    """A hostile (or broken) server that sends its side of the TLS handshake one byte
    every 20 ms: each byte arrives well within any receive timeout, but the handshake
    is held to the deadline as a whole (each wait is what is left of it), so the
    connect ends at 0.5 s, not when the last of some thousand bytes arrives."""
    server_side = tls_server_context(tls_files)
    listener = socket.create_server(("127.0.0.1", 0))
    ours, theirs = socket.socketpair()
    stop = threading.Event()
    trickled = [0]

    def tls_server() -> None:  # a real handshake, on the far end of the trickle
        with contextlib.suppress(OSError), server_side.wrap_socket(theirs, server_side=True):
            stop.wait(10)

    def trickle() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(0.01)
            ours.settimeout(0.01)
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    ours.sendall(conn.recv(65536))  # the client's bytes, at once
                with contextlib.suppress(TimeoutError):
                    conn.sendall(ours.recv(1))  # the server's, a byte at a time
                    trickled[0] += 1
                    time.sleep(0.02)

    threads = [threading.Thread(target=tls_server), threading.Thread(target=trickle)]
    for thread in threads:
        thread.start()
    client_side = ssl.create_default_context(cafile=tls_files[0])
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError):
            http1.Connection(
                "127.0.0.1", listener.getsockname()[1], client_side, 1.0, 5.0, lambda: 0.5
            )
        assert time.monotonic() - started < 2.0
        assert trickled[0] >= 10  # bytes kept coming while it waited
    finally:
        stop.set()
        for end in (ours, theirs):  # wakes the TLS server's handshake (close would not)
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(timeout=10)
        ours.close()
        theirs.close()
        listener.close()
