"""The NBD codec byte for byte (ebsfs/nbd/protocol.py), and block status from the block
index (ebsfs/nbd/exports.py) with small index chunks, no network."""

from __future__ import annotations

import struct

import pytest
import trio

from ebsfs.constants import BLOCK_SIZE
from ebsfs.emulator.faults import Faults
from ebsfs.emulator.store import SnapshotStore
from ebsfs.engine.cache import BlockCache
from ebsfs.engine.image import SnapshotImage
from ebsfs.engine.index import BlockIndex
from ebsfs.engine.remote import RemoteSnapshots
from ebsfs.nbd import protocol as p
from ebsfs.nbd.exports import Export, allocation
from tests.fakes import StoreApi

B = BLOCK_SIZE


def test_the_greeting_and_option_replies_are_the_documented_bytes() -> None:
    assert p.handshake() == b"NBDMAGICIHAVEOPT\x00\x03"
    assert p.option_reply(7, p.REP_ACK) == (
        bytes.fromhex("0003e889045565a9") + b"\x00\x00\x00\x07" + b"\x00\x00\x00\x01" + bytes(4)
    )
    assert p.option_reply(3, p.REP_SERVER, p.server_reply("ab"))[-6:] == b"\x00\x00\x00\x02ab"
    assert p.info_export(GIB := 1024**3, 0x103) == b"\x00\x00" + struct.pack(">QH", GIB, 0x103)
    assert p.info_block_size(1, B, 32 << 20) == struct.pack(">HIII", 3, 1, B, 32 << 20)
    assert p.export_name_reply(5, 3, no_zeroes=True) == struct.pack(">QH", 5, 3)
    assert p.export_name_reply(5, 3, no_zeroes=False) == struct.pack(">QH", 5, 3) + bytes(124)
    assert p.REP_ERR_UNSUP == 0x80000001 and p.REP_ERR_UNKNOWN == 0x80000006


def test_option_headers_and_data_are_checked() -> None:
    assert p.option_header(struct.pack(">QII", p.IHAVEOPT, 7, 12)) == (7, 12)
    with pytest.raises(p.Malformed, match="IHAVEOPT"):
        p.option_header(struct.pack(">QII", 1, 7, 12))
    go = struct.pack(">I", 4) + b"snap" + struct.pack(">HHH", 2, p.INFO_NAME, p.INFO_BLOCK_SIZE)
    assert p.info_request(go) == ("snap", [p.INFO_NAME, p.INFO_BLOCK_SIZE])
    for bad, why in (
        (go[:-1], "ends early"),
        (go + b"x", "too many"),
        (struct.pack(">I", 5000) + bytes(5000) + bytes(2), "at most 4096"),
        (struct.pack(">I", 2) + b"a\0" + bytes(2), "NUL"),
        (struct.pack(">I", 2) + b"\xff\xfe" + bytes(2), "UTF-8"),
        (struct.pack(">I", 2**32 - 1), "at most"),
    ):
        with pytest.raises(p.Malformed, match=why):
            p.info_request(bad)
    query = b"base:allocation"
    meta = struct.pack(">I", 1) + b"x" + struct.pack(">II", 1, len(query)) + query
    assert p.meta_context_request(meta, "set") == ("x", ["base:allocation"])
    with pytest.raises(p.Malformed, match="queries"):
        p.meta_context_request(struct.pack(">I", 0) + struct.pack(">I", 10**6), "set")
    assert p.export_name(b"snap-1") == "snap-1"
    with pytest.raises(p.Malformed):
        p.export_name(bytes(5000))


def test_requests_and_replies_round_trip() -> None:
    request = p.Request(p.CMD_FLAG_DF, p.CMD_READ, 0xDEADBEEF, 2**40, 4096)
    raw = p.encode_request(request)
    assert len(raw) == 28 and raw[:4] == b"\x25\x60\x95\x13"
    assert p.request(raw) == request
    with pytest.raises(p.Malformed, match="magic"):
        p.request(b"\x00" * 28)
    assert p.simple_reply(9, p.EIO) == struct.pack(">IIQ", 0x67446698, 5, 9)
    header = p.data_chunk_header(9, 4096, 100, done=True)
    assert header == struct.pack(">IHHQIQ", 0x668E33EF, 1, 1, 9, 108, 4096)
    assert p.hole_chunk(9, 0, B, done=False) == struct.pack(
        ">IHHQIQI", 0x668E33EF, 0, 2, 9, 12, 0, B
    )
    assert p.none_chunk(3) == struct.pack(">IHHQI", 0x668E33EF, 1, 0, 3, 0)
    error = p.error_chunk(3, p.EINVAL, "no")
    assert error == struct.pack(">IHHQIIH", 0x668E33EF, 1, 0x8001, 3, 8, 22, 2) + b"no"
    status = p.block_status_chunk(3, 1, [(B, 0), (2 * B, 3)])
    assert status[16:] == struct.pack(">IIIIII", 20, 1, B, 0, 2 * B, 3)
    assert struct.unpack(">I", status[16:20])[0] == len(status) - 20


WRITTEN = [0, 1, 5, 9, 10, 11]


def small_chunked_image() -> SnapshotImage:
    """A 16-block snapshot whose index is listed 4 blocks at a time."""
    store = SnapshotStore(Faults(seed=1))
    store.add_snapshot("snap-01", {i: bytes([i + 1]) * B for i in WRITTEN}, volume_size_gib=1)
    remote = RemoteSnapshots(StoreApi(store), max_fetches=4)
    index = BlockIndex(remote, "snap-01", 16, chunk_blocks=4)
    return SnapshotImage("snap-01", 16 * B, index, BlockCache(8 * B), remote)


def test_allocation_answers_one_index_chunk_at_a_time() -> None:
    image = small_chunked_image()
    whole = Export("snap-01", image, 0, 16 * B, "")

    async def main() -> None:
        # From block 0, only its chunk (blocks 0-3) is answered, though 16 were asked.
        assert await allocation(whole, 0, 16 * B, 5) == [(2 * B, True), (2 * B, False)]
        assert await allocation(whole, 4 * B, 12 * B, 5) == [(B, False), (B, True), (2 * B, False)]
        assert await allocation(whole, 9 * B + 10, 100, 5) == [(100, True)]
        assert await allocation(whole, 11 * B, 5 * B, 5) == [(B, True)]
        assert await allocation(whole, 4 * B, 12 * B, 5, most=1) == [(B, False)]
        assert await allocation(whole, B // 2, 12 * B, 5, most=1) == [(B // 2 + B, True)]
        # A window starting mid-block (an MBR partition at sector 63) maps its offsets.
        start = B + 63 * 512
        part = Export("snap-01-part1", image, start, 10 * B, "")
        runs = await allocation(part, 0, 10 * B, 5)
        assert runs == [(B - 63 * 512, True), (2 * B, False)]
        # The next chunk starts at the image's block 4, mid-way in the window's block.
        assert await allocation(part, sum(n for n, _ in runs), 2 * B - 5, 5) == [
            (B, False),
            (B - 5, True),
        ]

    trio.run(main)
