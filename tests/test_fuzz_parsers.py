"""Fuzzing with Hypothesis (issue 26), on a fixed budget (derandomized, so CI runs the
same examples every time, in a few seconds): the HTTP client's head and body parsing and
the partition-table parser take whatever a hostile server or snapshot holds and answer
with a result that makes sense or their one typed error, never anything else."""

from __future__ import annotations

import contextlib
import queue
import socket
import struct
import threading
import uuid
import zlib
from collections.abc import Iterator

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ebsfs.engine.partitions import Partition, find_partitions
from ebsfs.errors import PartitionTableError, ProtocolError
from ebsfs.service import http1

BUDGET = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# --- HTTP -------------------------------------------------------------------------

NAMES = ["Content-Length", "Transfer-Encoding", "Connection", "x-amz-Checksum", "X-A", "C l"]
VALUES = st.one_of(
    st.sampled_from(["0", "5", "chunked", "close", "keep-alive", "+5", "1_0", "", " 7 "]),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.binary(max_size=12).map(lambda b: b.decode("latin-1")),
)
STATUS = st.one_of(
    st.sampled_from([b"HTTP/1.1 200 OK", b"HTTP/1.0 500 x", b"HTTP/1.1 \xb200", b"HTTP/2 200"]),
    st.binary(max_size=20),
)


@st.composite
def heads(draw: st.DrawFn) -> bytes:
    status = draw(STATUS)
    headers = draw(st.lists(st.tuples(st.sampled_from(NAMES), VALUES), max_size=6))
    lines = [status] + [f"{n}: {v}".encode("latin-1") for n, v in headers]
    return b"\r\n".join(lines)


@st.composite
def chunked(draw: st.DrawFn) -> bytes:
    parts = []
    for data in draw(st.lists(st.binary(max_size=40), max_size=4)):
        size = draw(st.one_of(st.just(f"{len(data):x}"), VALUES))
        parts.append(size.encode("latin-1") + b"\r\n" + data + b"\r\n")
    end = draw(st.sampled_from([b"0\r\n\r\n", b"0\r\nX: y\r\n\r\n", b"0\r\n", b""]))
    return b"".join(parts) + end


ANSWERS = st.one_of(
    st.tuples(heads(), st.binary(max_size=64)).map(lambda t: t[0] + b"\r\n\r\n" + t[1]),
    st.tuples(heads(), chunked()).map(lambda t: t[0] + b"\r\n\r\n" + t[1]),
    st.binary(max_size=200),
)


@BUDGET
@given(head=heads())
def test_parse_head_answers_or_raises_a_protocol_error(head: bytes) -> None:
    try:
        response = http1.parse_head(head)
    except ProtocolError:
        return
    assert 0 <= response.status <= 999
    assert all(name == name.lower() and name.isascii() for name in response.headers)
    try:
        size = http1.body_size(response.headers, http1.MAX_BODY)
    except ProtocolError:
        return
    assert size is None or 0 <= size <= http1.MAX_BODY


@BUDGET
@given(head=heads())
def test_the_whole_head_match_keeps_the_line_by_line_rules(head: bytes) -> None:
    """parse_head checks a head with one regular expression (_HEAD) for speed; it must
    accept exactly the heads whose every line keeps the rules spelled out line by line."""
    lines = head.split(b"\r\n")
    whole = http1._HEAD.fullmatch(head) is not None and len(lines) - 1 <= http1.MAX_HEADERS
    assert whole == (http1._what_breaks(lines) is None)


@BUDGET
@given(line=st.one_of(st.binary(max_size=30), VALUES.map(lambda v: v.encode("latin-1"))))
def test_chunk_size_is_a_number_or_a_protocol_error(line: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        assert 0 <= http1.chunk_size(line) < 2**64


@pytest.fixture(scope="module")
def answering() -> Iterator[tuple[int, queue.Queue[bytes]]]:
    """A server that answers each connection's request with the next bytes queued,
    then closes it."""
    listener = socket.create_server(("127.0.0.1", 0))
    answers: queue.Queue[bytes] = queue.Queue()

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    more = conn.recv(4096)
                    if not more:
                        break
                    data += more
                with contextlib.suppress(OSError):
                    conn.sendall(answers.get(timeout=5))

    threading.Thread(target=serve, daemon=True).start()
    yield int(listener.getsockname()[1]), answers
    listener.close()


@settings(BUDGET, max_examples=150)
@given(answer=ANSWERS)
def test_any_answer_reads_or_fails_as_an_oserror(answering, answer: bytes) -> None:
    port, answers = answering
    answers.put(answer)
    connection = http1.Connection("127.0.0.1", port, None, 2.0, 2.0)
    try:
        response = connection.get("/", {"Host": "h"}, memoryview(bytearray(16)))
    except OSError:  # ProtocolError, or a timeout
        return
    finally:
        connection.close()
    assert response.body is None or len(response.body) <= http1.MAX_BODY


# --- partition tables ---------------------------------------------------------------

SS = 512


def mbr(entries: list[tuple[int, int, int, int]], boot: bytes = b"") -> bytes:
    sector = bytearray(512)
    sector[: len(boot)] = boot[:446]
    for i, (status, ptype, first, count) in enumerate(entries[:4]):
        struct.pack_into("<B3xB3xII", sector, 446 + 16 * i, status, ptype, first, count)
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def gpt(
    lba: int,
    entries_lba: int,
    rows: list[tuple[int, int, str]],
    count: int,
    esize: int,
    breaks: int,
) -> dict[int, bytes]:
    """Sectors of a GPT at `lba` with `rows` (first, last, name); `breaks` picks one
    field to spoil (0: none)."""
    array = bytearray(count * esize)
    for i, (first, last, name) in enumerate(rows[:count]):
        entry = uuid.UUID(int=0x0FC63DAF848347728E793D69D8477DE4).bytes_le + bytes(16)
        entry += struct.pack("<QQQ", first, last, 0) + name.encode("utf-16-le")[:72]
        array[i * esize : i * esize + len(entry)] = entry
    header = bytearray(512)
    struct.pack_into(
        "<8sIII4xQQQQ16sQIII",
        header,
        0,
        b"EFI PART",
        0x10000,
        92,
        0,
        lba,
        1,
        34,
        2**20,
        bytes(16),
        entries_lba,
        count,
        esize,
        zlib.crc32(array) ^ (breaks == 1),
    )
    struct.pack_into("<I", header, 16, zlib.crc32(bytes(header[:92])) ^ (breaks == 2))
    sectors = {lba: bytes(header)}
    for i in range(0, len(array), SS):
        sectors[entries_lba + i // SS] = bytes(array[i : i + SS])
    return sectors


SECTOR = st.integers(min_value=0, max_value=2**32 - 1)
SMALL = st.integers(min_value=0, max_value=4096)


@st.composite
def disks(draw: st.DrawFn) -> tuple[dict[int, bytes], int]:
    """(sectors by LBA, disk size): an MBR, a GPT, an EBR chain, with fields drawn
    from values near the edges, or noise."""
    # Disks of at least two sectors: a snapshot is a whole number of GiB (for smaller
    # ones see test_a_gpt_signature_on_a_600_byte_disk below).
    size = draw(st.sampled_from([1024, 4096, 1 << 20, 1 << 30])) + draw(
        st.sampled_from([0, 0, 100])
    )
    sectors: dict[int, bytes] = {}
    kind = draw(st.sampled_from(["mbr", "gpt", "gpt", "gpt-bare", "ebr", "ebr", "noise"]))
    entry = st.tuples(
        st.sampled_from([0, 0x80, 0, 0x80, 1]), st.sampled_from([0x83, 0x83, 0x05, 0x0F, 0xEE, 0])
    )
    if kind == "noise":
        for lba in draw(st.lists(SMALL, max_size=4)):
            sectors[lba] = draw(st.binary(min_size=0, max_size=SS))
        return sectors, size
    if kind in ("mbr", "ebr"):
        rows = draw(
            st.lists(
                st.tuples(entry, st.one_of(SMALL, SMALL, SECTOR), SMALL), min_size=1, max_size=4
            )
        )
        sectors[0] = mbr([(s, t, f, c) for (s, t), f, c in rows])
        if kind == "ebr":
            for lba in {f for (_, t), f, _ in rows if t == 0x05}:
                links = draw(st.lists(st.tuples(entry, SMALL, SMALL), min_size=2, max_size=2))
                sectors[lba] = mbr([(s, t, f, c) for (s, t), f, c in links])
        return sectors, size
    if kind == "gpt":
        sectors[0] = mbr([(0, 0xEE, 1, 2**32 - 1)])
    spans = st.tuples(st.one_of(SMALL, SMALL, SECTOR), st.integers(-1, 64), st.text(max_size=8))
    table = [
        (a, max(0, a + n - 1), name) for a, n, name in draw(st.lists(spans, min_size=1, max_size=6))
    ]
    count = draw(st.sampled_from([4, 128, 1, 0, 8193]))
    esize = draw(st.sampled_from([128, 128, 136, 120, 256]))
    elba = draw(st.sampled_from([2, 2, 2, 0, 1, size // SS - 1, 2**40]))
    breaks = draw(st.sampled_from([0, 0, 0, 1, 2]))
    if count * esize <= 1 << 21:
        sectors.update(gpt(1, elba, table, count, esize, breaks))
    if draw(st.booleans()):  # a backup at the last LBA
        last = size // SS - 1
        sectors.update(gpt(last, max(0, last - 33), table, min(count, 4), esize, 0))
    return sectors, size


@pytest.mark.expected_log(maybe=[r"primary GPT damaged .* using the backup GPT"])
@settings(BUDGET, max_examples=250)
@given(disk=disks())
def test_find_partitions_lists_sane_partitions_or_raises_its_error(disk) -> None:
    """Whatever the sectors hold: partitions inside the disk and apart, or the one
    typed error, within a bounded number of bounded reads."""
    sectors, size = disk
    reads: list[tuple[int, int]] = []

    async def read(offset: int, length: int) -> bytes:
        reads.append((offset, length))
        assert offset >= 0 and length <= 1 << 21 and len(reads) <= 200
        out = bytearray()
        for at in range(offset, min(offset + length, size), SS):
            sector = sectors.get(at // SS, bytes(SS)).ljust(SS, b"\0")
            out += sector[at % SS :]
        return bytes(out[: max(0, min(length, size - offset))])

    try:
        parts = trio.run(find_partitions, read, size)
    except PartitionTableError:
        return
    ends = []
    for part in parts:
        assert isinstance(part, Partition)
        assert part.offset >= 0 and part.size > 0 and part.offset + part.size <= size
        ends.append((part.offset, part.offset + part.size))
    ends.sort()
    assert all(a[1] <= b[0] for a, b in zip(ends, ends[1:], strict=False))


def test_a_gpt_signature_on_a_600_byte_disk() -> None:
    """Found by the fuzzing above: a GPT header cut short by the disk's end was unpacked
    (struct.error) instead of refused."""
    disk = bytes(512) + b"EFI PART" + bytes(80)

    async def read(offset: int, length: int) -> bytes:
        return disk[offset : offset + length]

    # No protective MBR and a header that cannot be read: no partition table.
    assert trio.run(find_partitions, read, len(disk)) == []
