"""The emulator's wire profiles (ServerProfile) and its slow tail (Faults): benchmarks
measure against servers unlike our loopback one, so each profile must really be what
it says, on the wire, and ebsfs must read through it."""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from pathlib import Path

import pytest

import ebsfs
from ebsfs.emulator import Faults, SnapshotStore
from ebsfs.emulator import process as emulator_process
from ebsfs.emulator.__main__ import main as emulator_main
from ebsfs.emulator.server import EmulatorServer, ServerProfile
from tests.fakes import pattern_block

SNAP = "snap-0a"
STATS = b"GET /_emulator/stats HTTP/1.1\r\nHost: x\r\n\r\n"
AUTH = (
    "AWS4-HMAC-SHA256 Credential=AKIDTEST/20260101/us-east-1/ebs/aws4_request, "
    "SignedHeaders=host, Signature=" + "0" * 64
)
"""Well formed, so the call passes authentication (the server checks no signature)."""
LIST = (
    f"GET /snapshots/{SNAP}/blocks?maxResults=100 HTTP/1.1\r\nHost: x\r\n"
    f"Authorization: {AUTH}\r\n\r\n"
).encode()


def served(profile: ServerProfile, faults: Faults | None = None) -> EmulatorServer:
    store = SnapshotStore(faults)
    store.add_snapshot(SNAP, {i: pattern_block(1, i) for i in range(4)}, volume_size_gib=1)
    return EmulatorServer(store, profile=profile).start()


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def answer(sock: socket.socket) -> tuple[str, dict[str, str], bytes]:
    """One HTTP answer read off the socket: status line, headers (lower-case names),
    body (by Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        assert piece, f"the connection closed before an answer ended: {data!r}"
        data += piece
    head, body = data.split(b"\r\n\r\n", 1)
    status, *lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines)}
    while len(body) < int(headers["content-length"]):
        piece = sock.recv(65536)
        assert piece, "the connection closed in the middle of a body"
        body += piece
    return status, headers, body


def closed_by_server(sock: socket.socket, within: float = 5.0) -> bool:
    """The server closed its side: a read gives end of stream or a reset (the server
    closing on a request it never read resets), not silence for `within` seconds."""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def accepted_nodelay(server: EmulatorServer) -> int:
    """TCP_NODELAY of the server's side of a fresh connection, once it serves it."""
    with socket.create_connection(("127.0.0.1", port_of(server.url))) as client:
        client.sendall(STATS)
        client.recv(1)
        sockets = list(server._httpd.open_sockets)  # type: ignore[union-attr]
        return max(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in sockets)


def test_nagle_is_off_by_default_and_on_in_its_profile() -> None:
    for profile, expected in ((ServerProfile(), 1), (ServerProfile(nagle=True), 0)):
        server = served(profile)
        try:
            assert bool(accepted_nodelay(server)) == bool(expected)
        finally:
            server.stop()


def test_a_slow_accept_loop_delays_each_new_connection() -> None:
    server = served(ServerProfile(accept_delay=0.3))
    try:
        started = time.monotonic()
        for _ in range(3):  # three connections one after another: each waits its turn
            with socket.create_connection(("127.0.0.1", port_of(server.url))) as client:
                client.sendall(STATS)
                assert client.recv(12).startswith(b"HTTP/1.")
        assert time.monotonic() - started >= 0.6  # a bound from below: the delay happened
    finally:
        server.stop()


@pytest.mark.parametrize("silently", [False, True])
def test_a_connection_is_closed_after_its_nth_answer(silently: bool) -> None:
    """Answers 1 and 2 keep the connection; the 3rd says `Connection: close` (or, when
    silent, says nothing) and the server closes, even on a request sent just then."""
    server = served(ServerProfile(close_after=3, close_silently=silently))
    try:
        with socket.create_connection(("127.0.0.1", port_of(server.url))) as client:
            for _ in range(2):
                client.sendall(STATS)
                status, headers, _ = answer(client)
                assert status.endswith("200 OK") and "connection" not in headers
            client.sendall(LIST)  # an API answer counts as well as a control one
            status, headers, _ = answer(client)
            assert status.endswith("200 OK")
            assert headers.get("connection") == (None if silently else "close")
            with contextlib.suppress(OSError):  # the server may have reset already
                client.sendall(STATS)  # the next request, sent as the server closes
            assert closed_by_server(client)
        with socket.create_connection(("127.0.0.1", port_of(server.url))) as client:
            client.sendall(STATS)  # a new connection counts from 1 again
            assert "connection" not in answer(client)[1]
        assert server.counters.snapshot()["connections"] == 2
    finally:
        server.stop()


def test_the_most_gets_served_at_once_are_counted() -> None:
    """Three GETs sent together on three connections are held together by the latency:
    the peak is 3, and stays 3 once they have ended; after a reset, GETs one after
    another count 1. What bench_read sets issue 27's bound on
    (connections opened <= 2 x calls in flight)."""
    server = served(ServerProfile(), Faults(latency=1.0))
    get = (
        f"GET /snapshots/{SNAP}/blocks/0?blockToken=t HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: {AUTH}\r\n\r\n"
    ).encode()
    try:
        port = port_of(server.url)
        with contextlib.ExitStack() as stack:
            clients = [
                stack.enter_context(socket.create_connection(("127.0.0.1", port))) for _ in range(3)
            ]
            for client in clients:
                client.sendall(get)
            for client in clients:
                answer(client)  # refused (no such token) after the latency: still a GET
            assert server.counters.snapshot()["gets_peak"] == 3
            # A call ends once its handler returns, a moment after its answer is sent.
            deadline = time.monotonic() + 10
            while server.counters.gets_now and time.monotonic() < deadline:
                time.sleep(0.01)
            server.counters.reset()
            assert server.counters.snapshot()["gets_peak"] == 0
            for _ in range(2):
                clients[1].sendall(get)
                answer(clients[1])
            assert server.counters.snapshot()["gets_peak"] == 1
    finally:
        server.stop()


def test_a_control_post_body_is_not_taken_for_the_next_request() -> None:
    """POST /_emulator/reset with a body (as bench_read sends it), then another request
    on the same keep-alive connection: answered, not refused as a garbled request."""
    server = served(ServerProfile())
    try:
        with socket.create_connection(("127.0.0.1", port_of(server.url))) as client:
            client.sendall(b"POST /_emulator/reset HTTP/1.1\r\nHost: x\r\n")
            client.sendall(b"Content-Length: 2\r\n\r\n{}")
            assert answer(client)[0].endswith("200 OK")
            client.sendall(STATS)
            assert answer(client)[0].endswith("200 OK")
    finally:
        server.stop()


def test_without_a_profile_connections_stay_open() -> None:
    """The default keeps a connection however many answers and however idle: the
    closing tests above could not pass on a server that closes anyway."""
    server = served(ServerProfile())
    try:
        with socket.create_connection(("127.0.0.1", port_of(server.url))) as client:
            for _ in range(5):
                client.sendall(STATS)
                assert "connection" not in answer(client)[1]
            assert not closed_by_server(client, within=1.0)
            client.sendall(STATS)
            assert answer(client)[0].endswith("200 OK")
    finally:
        server.stop()


def test_an_idle_connection_is_closed_silently() -> None:
    server = served(ServerProfile(idle_timeout=0.5))
    try:
        with socket.create_connection(("127.0.0.1", port_of(server.url))) as client:
            for _ in range(3):  # requests that come in time keep the connection
                time.sleep(0.05)
                client.sendall(STATS)
                assert "connection" not in answer(client)[1]
            idle_from = time.monotonic()  # the server's idle time began before this
            assert closed_by_server(client)
            assert time.monotonic() - idle_from >= 0.5  # from below: not before its time
        with socket.create_connection(("127.0.0.1", port_of(server.url))) as client:
            assert closed_by_server(client)  # idle before a first request too
    finally:
        server.stop()


def slow_tail_run(seed: int) -> dict[str, float]:
    """200 list calls, one after another on one connection, against 2 ms of latency
    and a slow tail of 10 % at 10x: the server's own delay decisions, counted."""
    faults = Faults(latency=0.002, slow_share=0.1, slow_factor=10.0, seed=seed, list_rate=0)
    server = served(ServerProfile(), faults)
    try:
        with socket.create_connection(("127.0.0.1", port_of(server.url))) as client:
            for _ in range(200):
                client.sendall(LIST)
                assert answer(client)[0].endswith("200 OK")
        delays: dict[str, float] = server.counters.snapshot()["delays"]
        return delays
    finally:
        server.stop()


def test_a_slow_tail_slows_its_share_of_calls_by_its_factor() -> None:
    delays = slow_tail_run(seed=7)
    assert delays["calls"] == 200
    assert 10 <= delays["slow_calls"] <= 30  # 10 % of 200, give or take the dice
    fast_calls = delays["calls"] - delays["slow_calls"]
    fast_seconds = delays["seconds"] - delays["slow_seconds"]
    assert fast_seconds == pytest.approx(fast_calls * 0.002)
    assert delays["slow_seconds"] == pytest.approx(delays["slow_calls"] * 0.002 * 10)
    assert slow_tail_run(seed=7) == delays  # seeded: the same calls again


def test_no_slow_tail_by_default() -> None:
    server = served(ServerProfile(), Faults(latency=0.001, list_rate=0))
    try:
        with socket.create_connection(("127.0.0.1", port_of(server.url))) as client:
            for _ in range(20):
                client.sendall(LIST)
                answer(client)
        delays = server.counters.snapshot()["delays"]
        assert delays["calls"] == 20 and delays["slow_calls"] == 0
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("profile", "faults", "pause", "proof"),
    [
        (ServerProfile(nagle=True), None, 0.0, None),
        (ServerProfile(accept_delay=0.05, backlog=4), None, 0.0, None),
        (ServerProfile(close_after=1), None, 0.0, ("closes", "said")),
        (ServerProfile(close_after=1, close_silently=True), None, 0.0, ("closes", "silent")),
        (ServerProfile(idle_timeout=0.2), None, 0.4, ("closes", "idle")),
        (
            ServerProfile(),
            Faults(latency=0.001, slow_share=0.5, slow_factor=20, seed=3),
            0.0,
            ("delays", "slow_calls"),
        ),
    ],
)
def test_ebsfs_reads_through_every_profile(
    profile: ServerProfile, faults: Faults | None, pause: float, proof: tuple[str, str] | None
) -> None:
    """Every block read right, each in its own call, `pause` apart; and the server's
    counters prove ebsfs met what the profile does (a close of that kind, a slow call)."""
    server = served(profile, faults)
    try:
        with ebsfs.open(SNAP, endpoint_url=server.url) as f:
            for index in (3, 0, 2, 1):
                got = f.pread(4096, index * 524288 + 1000)
                assert got == bytes(pattern_block(1, index)[1000:5096])
                time.sleep(pause)
        stats = server.counters.snapshot()
        assert stats["calls"]["GetSnapshotBlock"] >= 4
        if proof is not None:
            assert stats[proof[0]].get(proof[1], 0) >= 1, stats
        if proof is not None and proof[0] == "closes":  # and ebsfs opened others
            assert stats["connections"] >= 4, stats
    finally:
        server.stop()


@pytest.mark.parametrize("silently", [False, True])
def test_over_tls_connections_close_after_n_and_when_idle(
    silently: bool, tls_files: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's tls-nagle-close profile (HTTPS, Nagle on, closes after N answers)
    with an idle timeout besides: the TLS connection closes after its 2nd answer, a
    fresh one when idle; ebsfs reads right through it."""
    profile = ServerProfile(nagle=True, close_after=2, close_silently=silently, idle_timeout=0.3)
    store = SnapshotStore()
    store.add_snapshot(SNAP, {i: pattern_block(1, i) for i in range(4)}, volume_size_gib=1)
    server = EmulatorServer(store, tls=tls_files, profile=profile).start()
    context = ssl.create_default_context(cafile=tls_files[0])
    try:
        for ends_by in ("answers", "idle"):
            with context.wrap_socket(
                socket.create_connection(("127.0.0.1", port_of(server.url))),
                server_hostname="127.0.0.1",
            ) as client:
                client.sendall(STATS)
                assert "connection" not in answer(client)[1]
                if ends_by == "answers":
                    client.sendall(STATS)
                    expected = None if silently else "close"
                    assert answer(client)[1].get("connection") == expected
                assert closed_by_server(client)
        closes = server.counters.snapshot()["closes"]
        assert closes == {"silent" if silently else "said": 1, "idle": 1}
        monkeypatch.setenv("AWS_CA_BUNDLE", tls_files[0])
        with ebsfs.open(SNAP, endpoint_url=server.url) as f:
            for index in (3, 0, 2, 1):
                got = f.pread(4096, index * 524288)
                assert got == bytes(pattern_block(1, index)[:4096])
    finally:
        server.stop()


def test_the_command_line_passes_the_profile_on(tmp_path: Path) -> None:
    """`python -m ebsfs.emulator` with the new options, talked to on the wire: the 2nd
    answer closes the connection, and the slow tail is drawn."""
    image = tmp_path / "disk.img"
    image.write_bytes(b"\x01" * 524288 * 2)
    options = ["--snapshot", f"{SNAP}={image}", "--close-after", "2", "--idle-timeout", "30"]
    options += ["--slow-tail", "1:3", "--latency", "0.001", "--seed", "1", "--list-rate", "0"]
    with emulator_process.running(options, stderr=tmp_path / "emulator.err") as url:
        port = port_of(url)
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(LIST)
            assert "connection" not in answer(client)[1]
            client.sendall(STATS)
            _, headers, body = answer(client)
            assert headers.get("connection") == "close"
            assert closed_by_server(client)
        assert b'"slow_calls": 1' in body


SECONDS = ["--latency", "--jitter", "--accept-delay", "--idle-timeout", "--token-lifetime"]


@pytest.mark.parametrize("option", [*SECONDS, "--get-rate", "--list-rate"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "abc", "1e400"])
def test_bad_seconds_are_refused_in_one_line(
    option: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        emulator_main([f"{option}={value}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    error = [ln for ln in err.splitlines() if ln.startswith("ebsfs-emulator: error:")]
    assert len(error) == 1 and option in error[0] and "Traceback" not in err


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--slow-tail", "0.01"),
        ("--slow-tail", "0.01:"),
        ("--slow-tail", "2:10"),
        ("--slow-tail", "-0.1:10"),
        ("--slow-tail", "0.01:0.5"),
        ("--slow-tail", "0.01:inf"),
        ("--slow-tail", "nan:10"),
        ("--slow-tail", "0.01:nan"),
        ("--slow-tail", "a:b"),
        ("--close-after", "-1"),
        ("--close-after", "two"),
        ("--close-after", "1.5"),
    ],
)
def test_bad_profile_values_are_refused_in_one_line(
    option: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        emulator_main([f"{option}={value}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    error = [ln for ln in err.splitlines() if ln.startswith("ebsfs-emulator: error:")]
    assert len(error) == 1 and option in error[0] and "Traceback" not in err


def test_close_silently_needs_close_after(capsys: pytest.CaptureFixture[str]) -> None:
    assert emulator_main(["--close-silently"]) == 2
    assert (
        capsys.readouterr().err == "ebsfs-emulator: error: --close-silently needs --close-after\n"
    )


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "-0.5"])
def test_the_control_endpoint_refuses_what_the_command_line_refuses(value: str) -> None:
    """bench_read sets the latency through /_emulator/faults: a NaN there (Python's
    JSON takes it) would be silently no latency. Refused whole, nothing changed."""
    server = served(ServerProfile(), Faults(latency=0.001))
    try:
        body = f'{{"jitter": 0.5, "latency": {value}}}'.encode()
        with socket.create_connection(("127.0.0.1", port_of(server.url))) as client:
            client.sendall(b"POST /_emulator/faults HTTP/1.1\r\nHost: x\r\n")
            client.sendall(b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            status, _, answered = answer(client)
        assert status.endswith("400 Bad Request") and b"latency" in answered
        assert (server.faults.latency, server.faults.jitter) == (0.001, 0.0)
    finally:
        server.stop()
