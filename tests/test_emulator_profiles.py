"""The emulator's wire profiles (ServerProfile): benchmarks measure against servers
unlike our loopback one, so each profile must really be what it says."""

from __future__ import annotations

import socket
import time

import ebsfs
from ebsfs.emulator import SnapshotStore
from ebsfs.emulator.server import EmulatorServer, ServerProfile
from tests.fakes import pattern_block

SNAP = "snap-0a"


def served(profile: ServerProfile) -> EmulatorServer:
    store = SnapshotStore()
    store.add_snapshot(SNAP, {i: pattern_block(1, i) for i in range(4)}, volume_size_gib=1)
    return EmulatorServer(store, profile=profile).start()


def accepted_nodelay(server: EmulatorServer) -> int:
    """TCP_NODELAY of the server's side of a fresh connection, once it serves it."""
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.sendall(b"GET /_emulator/stats HTTP/1.1\r\nHost: x\r\n\r\n")
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
        port = int(server.url.rsplit(":", 1)[1])
        started = time.monotonic()
        for _ in range(3):  # three connections one after another: each waits its turn
            with socket.create_connection(("127.0.0.1", port)) as client:
                client.sendall(b"GET /_emulator/stats HTTP/1.1\r\nHost: x\r\n\r\n")
                assert client.recv(12).startswith(b"HTTP/1.")
        assert time.monotonic() - started >= 0.6  # a bound from below: the delay happened
    finally:
        server.stop()


def test_ebsfs_reads_through_every_profile() -> None:
    for profile in (ServerProfile(nagle=True), ServerProfile(accept_delay=0.05, backlog=4)):
        server = served(profile)
        try:
            with ebsfs.open(SNAP, endpoint_url=server.url) as f:
                assert f.pread(4096, 3 * 524288) == bytes(pattern_block(1, 3)[:4096])
        finally:
            server.stop()
