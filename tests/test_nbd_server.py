"""The NBD server in this process (ebsfs/nbd/server.py) over a socket pair, for what a
subprocess cannot show: what a connection holds, and that it gives it all back."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import pytest
import trio

from ebsfs.constants import BLOCK_SIZE, GIB
from ebsfs.emulator.faults import Faults
from ebsfs.emulator.store import SnapshotStore
from ebsfs.engine.config import EngineConfig
from ebsfs.engine.engine import Engine
from ebsfs.nbd import protocol as p
from ebsfs.nbd.exports import snapshot_exports
from ebsfs.nbd.server import MAX_BYTES_ALL, MAX_REQUEST, Server
from tests.fakes import StoreApi
from tests.nbdclient import Client, assemble

SNAP = "snap-01"


def engine_with(blocks: int) -> Engine:
    store = SnapshotStore(Faults(seed=1))
    store.add_snapshot(SNAP, {i: bytes([i % 250 + 1]) * BLOCK_SIZE for i in range(blocks)})
    return Engine(StoreApi(store), EngineConfig(cache_size=8 * BLOCK_SIZE), [(SNAP, GIB)])


async def serve_one(server: Server, speak: Callable[[Client], None]) -> None:
    """Run `speak(client)` in a thread against `server.handle` over a socket pair, until
    both are done."""
    ours, theirs = socket.socketpair()
    client = Client(theirs, timeout=30)
    try:
        async with trio.open_nursery() as nursery:
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
            nursery.start_soon(server.handle, stream)
            await trio.to_thread.run_sync(speak, client)
    finally:
        client.close()


@pytest.mark.expected_log(r"ebsfs\.nbd\.server: NBD connection 1 closed: a reply could not")
def test_a_client_that_reads_no_replies_is_dropped_and_what_it_held_given_back() -> None:
    async def main() -> None:
        engine = engine_with(256)
        server = Server(engine, await snapshot_exports(engine), 30, send_timeout=0.5)

        def speak(client: Client) -> None:
            client.greet()
            client.go(SNAP)
            for n in range(6):  # 192 MiB asked, not read for a while
                client.request(p.CMD_READ, n * MAX_REQUEST, MAX_REQUEST, n)
            time.sleep(3)
            assert client.closed_by_server()  # what it had sent, then the end

        await serve_one(server, speak)
        assert server.budget.free == MAX_BYTES_ALL

    trio.run(main)


def test_one_connection_answers_many_requests_in_flight_exactly() -> None:
    async def main() -> None:
        engine = engine_with(64)
        server = Server(engine, await snapshot_exports(engine), 30)
        expected = b"".join(bytes([i % 250 + 1]) * BLOCK_SIZE for i in range(64))

        def speak(client: Client) -> None:
            client.greet()
            client.structured()
            client.go(SNAP)
            # All sent before any reply is read: at most MAX_IN_FLIGHT requests and
            # 64 MiB, or this client (which reads nothing while it sends) would stall.
            asks = {
                n: (n * 100_003 % (60 * BLOCK_SIZE), 1 + n * 7919 % (3 * BLOCK_SIZE))
                for n in range(40)
            }
            for cookie, (offset, length) in asks.items():
                client.request(p.CMD_READ, offset, length, cookie)
            got: dict[int, list[tuple[int, int, int, bytes]]] = {}
            while len(got) < len(asks):
                chunks = client.chunks()
                got[chunks[0][2]] = chunks
            for cookie, (offset, length) in asks.items():
                assert assemble(got[cookie], offset, length) == expected[offset : offset + length]
            client.request(p.CMD_DISC, 0, 0)
            assert client.closed_by_server()

        await serve_one(server, speak)
        assert server.budget.free == MAX_BYTES_ALL

    trio.run(main)
