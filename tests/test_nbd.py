"""`ebsfs nbd` against the emulator, through real clients from Debian's packages
(qemu-img, nbdinfo, nbdcopy) and a raw socket client (tests/nbdclient.py): the holes
are seen, copies are exact and fetch each written block once, and hostile clients get
the protocol's errors without stopping the server."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ebsfs.constants import BLOCK_SIZE
from ebsfs.emulator import EmulatorServer
from ebsfs.emulator.diskimage import build_disk, demo_files
from ebsfs.nbd import protocol as p
from tests.mounting import ebsfs, replay_log
from tests.nbdclient import Client, assemble, error_of

SNAP = "snap-0bd1"
GIB = 1024**3
DISK_SIZE = 64 * 1024 * 1024

needs_clients = pytest.mark.skipif(
    not (shutil.which("qemu-img") and shutil.which("nbdinfo") and shutil.which("nbdcopy")),
    reason="needs qemu-utils and libnbd-bin (scripts/setup.sh installs them)",
)
HOSTILE_LOG = pytest.mark.expected_log(maybe=(r"ebsfs\.nbd\.server: NBD connection \d+ closed",))


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("nbd") / "disk.img"
    build_disk(path, DISK_SIZE, demo_files(blob_mib=3))
    return path


@dataclass
class Served:
    socket: str
    process: subprocess.Popen[str]
    emulator: EmulatorServer
    written: list[int]
    source: Path

    def uri(self, export: str = SNAP) -> str:
        return f"nbd+unix:///{export}?socket={self.socket}"

    def expected(self, size: int = GIB) -> bytes:
        data = self.source.read_bytes()[:size]
        return data + bytes(size - len(data))


def wait_for_socket(path: str, process: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if process.poll() is not None:
            raise AssertionError(f"ebsfs nbd exited {process.returncode}: {process.stderr}")
        if time.monotonic() > deadline:
            raise AssertionError("ebsfs nbd did not listen in time")
        time.sleep(0.05)


@contextlib.contextmanager
def nbd_server(
    emulator: EmulatorServer, tmp_path: Path, *options: str
) -> Iterator[subprocess.Popen[str]]:
    """`ebsfs nbd -f` in a process of its own, stopped with SIGTERM (as a user would)
    whatever the test did; its WARNING and ERROR lines are checked like the test's."""
    log_file = tmp_path / "nbd.log"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ebsfs",
            "nbd",
            "-f",
            "--endpoint-url",
            emulator.url,
            "--log-file",
            str(log_file),
            *options,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        replay_log(log_file)


@pytest.fixture
def served(emulator: EmulatorServer, disk: Path, tmp_path: Path) -> Iterator[Served]:
    snap = emulator.store.add_image(SNAP, disk)
    path = str(tmp_path / "nbd.sock")
    with nbd_server(emulator, tmp_path, SNAP, "--socket", path) as process:
        wait_for_socket(path, process)
        yield Served(path, process, emulator, sorted(snap.blocks), disk)
        assert process.poll() is None, "the server stopped during the test"
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
    assert not os.path.exists(path), "the socket file outlived the server"


def runs_of(blocks: list[int], start: int = 0, end: int = GIB) -> list[tuple[int, int]]:
    """Written blocks as merged (offset, length) byte ranges, clipped to [start, end)
    and relative to start."""
    ranges: list[tuple[int, int]] = []
    for b in blocks:
        lo, hi = max(b * BLOCK_SIZE, start), min((b + 1) * BLOCK_SIZE, end)
        if lo >= hi:
            continue
        if ranges and ranges[-1][0] + ranges[-1][1] == lo - start:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + hi - lo)
        else:
            ranges.append((lo - start, hi - lo))
    return ranges


def qemu_data_ranges(uri: str) -> list[tuple[int, int]]:
    out = subprocess.run(
        ["qemu-img", "map", "--output=json", uri], capture_output=True, text=True, check=True
    ).stdout
    ranges: list[tuple[int, int]] = []
    for entry in json.loads(out):
        if not entry["data"]:
            continue
        if ranges and sum(ranges[-1]) == entry["start"]:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + entry["length"])
        else:
            ranges.append((entry["start"], entry["length"]))
    return ranges


def same_bytes(path: Path, expected: bytes) -> bool:
    with path.open("rb") as f:
        return f.read() == expected


def fetched_once(served: Served) -> None:
    """Every block fetched is a written one, and none twice."""
    gets = served.emulator.counters.block_gets
    counts = {index: n for (snap, index), n in gets.items() if snap == SNAP}
    assert set(counts) <= set(served.written)
    assert all(n == 1 for n in counts.values()), {i: n for i, n in counts.items() if n > 1}


def partition_window(served: Served) -> tuple[int, int]:
    """(offset, size) of partition 1, from the GPT sfdisk wrote."""
    dump = subprocess.run(
        ["sfdisk", "--json", str(served.source)], capture_output=True, text=True, check=True
    ).stdout
    part = json.loads(dump)["partitiontable"]["partitions"][0]
    return part["start"] * 512, part["size"] * 512


@needs_clients
def test_nbdinfo_lists_the_snapshot_and_its_partitions(served: Served) -> None:
    out = subprocess.run(
        ["nbdinfo", "--list", "--json", f"nbd+unix://?socket={served.socket}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    exports = {e["export-name"]: e for e in json.loads(out)["exports"]}
    assert sorted(exports) == [SNAP, f"{SNAP}-part1"]
    assert exports[SNAP]["export-size"] == GIB
    assert exports[f"{SNAP}-part1"]["export-size"] == partition_window(served)[1]
    assert exports[SNAP]["is_read_only"] and exports[SNAP]["can_multi_conn"]
    assert "base:allocation" in exports[SNAP]["contexts"]


@needs_clients
def test_qemu_img_map_lists_exactly_the_written_blocks_as_data(served: Served) -> None:
    assert qemu_data_ranges(served.uri()) == runs_of(served.written)
    offset, size = partition_window(served)
    assert qemu_data_ranges(served.uri(f"{SNAP}-part1")) == runs_of(
        served.written, offset, offset + size
    )
    # The default export (no name) is the only snapshot.
    assert qemu_data_ranges(f"nbd+unix://?socket={served.socket}") == runs_of(served.written)


@needs_clients
def test_qemu_img_convert_copies_exactly_fetching_each_written_block_once(
    served: Served, tmp_path: Path
) -> None:
    out = tmp_path / "copy.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", served.uri(), str(out)], check=True)
    assert out.stat().st_size == GIB and same_bytes(out, served.expected())
    fetched_once(served)
    counts = served.emulator.counters.block_gets
    assert {i for (s, i) in counts if s == SNAP} | {0} == set(served.written)
    # qemu-img compare over NBD reads only the data and agrees.
    assert subprocess.run(["qemu-img", "compare", served.uri(), str(out)]).returncode == 0


@needs_clients
def test_nbdcopy_copies_exactly_fetching_each_written_block_once(
    served: Served, tmp_path: Path
) -> None:
    out = tmp_path / "copy.raw"
    subprocess.run(["nbdcopy", served.uri(), str(out)], check=True)
    assert same_bytes(out, served.expected())
    fetched_once(served)
    offset, size = partition_window(served)
    part = tmp_path / "part.raw"
    subprocess.run(["nbdcopy", served.uri(f"{SNAP}-part1"), str(part)], check=True)
    assert same_bytes(part, served.expected()[offset : offset + size])
    fetched_once(served)


@needs_clients
def test_a_volume_of_several_index_chunks_maps_and_copies_exactly(
    emulator: EmulatorServer, tmp_path: Path
) -> None:
    # 6 GiB: the block index lists 4 GiB at a time, and a block status reply stops at
    # a chunk's end; the clients ask again for the rest.
    written = [0, 3, 8185, 8186, 8195, 9000, 12287]  # a hole across 8192
    blocks = {i: bytes([i % 251 + 1]) * BLOCK_SIZE for i in written}
    emulator.store.add_snapshot(SNAP, blocks, volume_size_gib=6)
    path = str(tmp_path / "s.sock")
    with nbd_server(emulator, tmp_path, SNAP, "--socket", path) as process:
        wait_for_socket(path, process)
        uri = f"nbd+unix:///{SNAP}?socket={path}"
        assert qemu_data_ranges(uri) == runs_of(written, 0, 6 * GIB)
        out = tmp_path / "copy.raw"
        subprocess.run(["nbdcopy", uri, str(out)], check=True)
        assert out.stat().st_size == 6 * GIB
        assert out.stat().st_blocks * 512 <= (len(written) + 8) * BLOCK_SIZE  # holes not written
        with out.open("rb") as f:
            for i in range(12288):
                f.seek(i * BLOCK_SIZE)
                head = f.read(16)
                assert head == blocks.get(i, bytes(BLOCK_SIZE))[:16], i
        gets = emulator.counters.block_gets
        assert sorted(i for (_, i) in gets) == written and set(gets.values()) == {1}


def test_structured_reads_mark_holes_and_block_status_answers_from_the_index(
    served: Served,
) -> None:
    expected = served.expected(DISK_SIZE)
    with Client(served.socket) as c:
        assert c.greet() & p.FLAG_FIXED_NEWSTYLE
        c.structured()
        c.set_allocation(SNAP)
        size, flags = c.go(SNAP)
        assert size == GIB and flags & p.FLAG_READ_ONLY and flags & p.FLAG_SEND_DF
        # Many requests in flight at once, answered in any order, each exact.
        asks = {n: (n * 3 * BLOCK_SIZE + 1000 * n, 2 * BLOCK_SIZE + 77) for n in range(1, 20)}
        for cookie, (offset, length) in asks.items():
            c.request(p.CMD_READ, offset, length, cookie)
        answers: dict[int, list[tuple[int, int, int, bytes]]] = {}
        while len(answers) < len(asks):
            chunks = c.chunks()
            answers[chunks[0][2]] = chunks
        for cookie, (offset, length) in asks.items():
            assert assemble(answers[cookie], offset, length) == expected[offset : offset + length]
        # A hole is sent as a hole, not as zeros.
        hole = next(b for b in range(1, 100) if b not in served.written)
        c.request(p.CMD_READ, hole * BLOCK_SIZE, BLOCK_SIZE, 7)
        chunks = c.chunks()
        assert [kind for _, kind, _, _ in chunks] == [p.REPLY_TYPE_OFFSET_HOLE]
        # DF: one data chunk, zeros included.
        c.request(p.CMD_READ, hole * BLOCK_SIZE, BLOCK_SIZE, 8, flags=p.CMD_FLAG_DF)
        chunks = c.chunks()
        assert [kind for _, kind, _, _ in chunks] == [p.REPLY_TYPE_OFFSET_DATA]
        assert chunks[0][3][8:] == bytes(BLOCK_SIZE)
        # Block status over the whole disk: the written blocks, each run merged.
        c.request(p.CMD_BLOCK_STATUS, 0, DISK_SIZE, 9)
        ((_, kind, _, payload),) = c.chunks()
        assert kind == p.REPLY_TYPE_BLOCK_STATUS
        pairs = struct.unpack(f">{(len(payload) - 4) // 4}I", payload[4:])
        at, data = 0, []
        for length, state in zip(pairs[::2], pairs[1::2], strict=True):
            if state == 0:
                data.append((at, length))
            else:
                assert state == p.STATE_HOLE | p.STATE_ZERO
            at += length
        assert at == DISK_SIZE and data == runs_of(served.written, 0, DISK_SIZE)
        c.request(p.CMD_BLOCK_STATUS, 0, DISK_SIZE, 10, flags=p.CMD_FLAG_REQ_ONE)
        ((_, _, _, payload),) = c.chunks()
        assert len(payload) == 12
        c.request(p.CMD_DISC, 0, 0)
        assert c.closed_by_server()


def test_simple_replies_and_the_old_export_name_option(served: Served) -> None:
    expected = served.expected(DISK_SIZE)
    with Client(served.socket) as c:
        c.greet(flags=p.FLAG_C_FIXED_NEWSTYLE)  # no NO_ZEROES: 124 zeros follow
        c.option(p.OPT_EXPORT_NAME, f"{SNAP}-part1".encode())
        size, flags = struct.unpack(">QH", c.recv_exactly(10))
        assert c.recv_exactly(124) == bytes(124)
        offset, part_size = partition_window(served)
        assert size == part_size and not flags & p.FLAG_SEND_DF
        c.request(p.CMD_READ, 1000, 3 * BLOCK_SIZE, 5)
        error, cookie, data = c.simple(3 * BLOCK_SIZE)
        assert (error, cookie) == (0, 5)
        assert data == expected[offset + 1000 : offset + 1000 + 3 * BLOCK_SIZE]
        c.request(p.CMD_READ, part_size - 10, 20, 6)  # past the end
        assert c.simple() == (p.EINVAL, 6, b"")
        c.request(p.CMD_BLOCK_STATUS, 0, 4096, 7)  # no context selected
        assert c.simple() == (p.EINVAL, 7, b"")
        c.request(p.CMD_FLUSH, 0, 0, 8)
        assert c.simple() == (0, 8, b"")
        c.request(p.CMD_DISC, 0, 0)
        assert c.closed_by_server()


@HOSTILE_LOG
def test_hostile_clients_get_errors_and_never_stop_the_server(served: Served) -> None:
    # Option haggling: an unknown option, a malformed GO, an unknown export; then go on.
    with Client(served.socket) as c:
        c.greet()
        c.option(99, b"junk")
        assert c.replies() == [(p.REP_ERR_UNSUP, b"option 99 is not supported")]
        c.option(p.OPT_GO, b"\x00\x00\x00\x10abc")
        assert c.replies()[0][0] == p.REP_ERR_INVALID
        c.option(p.OPT_GO, struct.pack(">I", 8) + b"snap-nop" + struct.pack(">H", 0))
        assert c.replies()[0][0] == p.REP_ERR_UNKNOWN
        c.option(p.OPT_LIST, b"x")
        assert c.replies()[0][0] == p.REP_ERR_INVALID
        c.option(p.OPT_SET_META_CONTEXT, b"")  # before structured replies
        assert c.replies()[0][0] == p.REP_ERR_INVALID
        c.option(p.OPT_ABORT)
        assert c.replies() == [(p.REP_ACK, b"")]
    # Broken framing: each closes that connection only.
    for hostile in (
        b"NOTMAGIC" + struct.pack(">II", 1, 0),  # bad option magic
        struct.pack(">QII", p.IHAVEOPT, p.OPT_GO, 1 << 30),  # a GiB of option data
    ):
        with Client(served.socket) as c:
            c.greet()
            c.sock.sendall(hostile)
            assert c.closed_by_server()
    with Client(served.socket) as c:
        c.greet(flags=0x80)  # unknown client flags
        assert c.closed_by_server()
    with Client(served.socket) as c:
        c.greet()
        c.option(p.OPT_EXPORT_NAME, b"snap-nothere")  # cannot be refused but by hanging up
        assert c.closed_by_server()
    # Transmission: oversized, out of range, writes, bad magic, early disconnects.
    with Client(served.socket) as c:
        c.greet()
        c.structured()
        c.set_allocation(SNAP)
        c.go(SNAP)
        c.request(p.CMD_READ, 0, 64 * 1024**2, 1)
        assert error_of(c.chunks()) == p.EOVERFLOW
        c.request(p.CMD_READ, GIB - 1, 2, 2)
        assert error_of(c.chunks()) == p.EINVAL
        c.request(p.CMD_READ, 2**64 - 512, 1024, 3)
        assert error_of(c.chunks()) == p.EINVAL
        c.request(p.CMD_READ, 0, 0, 4)
        assert error_of(c.chunks()) == p.EINVAL
        c.request(p.CMD_BLOCK_STATUS, GIB, 1, 5)
        assert error_of(c.chunks()) == p.EINVAL
        c.request(p.CMD_WRITE, 0, 4096, 6)
        c.sock.sendall(bytes(4096))
        assert error_of(c.chunks()) == p.EPERM
        for cookie, kind in ((7, p.CMD_TRIM), (8, p.CMD_WRITE_ZEROES), (9, 42)):
            c.request(kind, 0, 4096, cookie)
            assert error_of(c.chunks()) == (p.EINVAL if kind == 42 else p.EPERM)
        c.request(p.CMD_READ, 0, 4096, 10)  # still in step after all that
        assert len(assemble(c.chunks(), 0, 4096)) == 4096
        c.request(p.CMD_WRITE, 0, 1 << 30, 11)  # a GiB payload is not read: hang up
        assert c.closed_by_server()
    with Client(served.socket) as c:
        c.greet()
        c.go(SNAP)
        c.sock.sendall(b"\x12\x34\x56\x78" + bytes(24))  # bad request magic
        assert c.closed_by_server()
    with Client(served.socket) as c:
        c.greet()
        c.go(SNAP)
        for n in range(40):  # reads in flight, then gone without reading a reply
            c.request(p.CMD_READ, n * BLOCK_SIZE, 2 * BLOCK_SIZE, n)
        c.sock.sendall(p.encode_request(p.Request(0, p.CMD_READ, 99, 0, 4096))[:10])
    with Client(served.socket) as c:
        c.sock.sendall(b"\x00\x00")  # gone mid-greeting
    # The server still serves, to libnbd and to raw clients alike.
    assert served.process.poll() is None
    with Client(served.socket) as c:
        c.greet()
        c.structured()
        assert c.go("")[0] == GIB
        c.request(p.CMD_READ, 0, 4096, 1)
        assert assemble(c.chunks(), 0, 4096) == served.expected(4096)
    if shutil.which("nbdinfo"):
        subprocess.run(["nbdinfo", "--size", served.uri()], check=True, capture_output=True)


@HOSTILE_LOG
def test_a_silent_client_is_dropped_after_the_handshake_timeout(
    emulator: EmulatorServer, disk: Path, tmp_path: Path
) -> None:
    emulator.store.add_image(SNAP, disk)
    path = str(tmp_path / "s.sock")
    options = ("--socket", path, "--handshake-timeout", "1")
    with nbd_server(emulator, tmp_path, SNAP, *options) as process:
        wait_for_socket(path, process)
        with Client(path, timeout=10) as c:
            c.greet()
            started = time.monotonic()
            assert c.closed_by_server()
            assert time.monotonic() - started < 8


def test_the_command_refuses_what_cannot_work(emulator: EmulatorServer, tmp_path: Path) -> None:
    emulator.store.add_snapshot(SNAP, {0: b"\x01" * BLOCK_SIZE})
    regular = tmp_path / "file"
    regular.write_text("keep me")
    for args, words in (
        (["--socket", str(regular)], "not a socket"),
        (["--socket", str(tmp_path / "no" / "s.sock")], "directory does not exist"),
        (["--socket", str(tmp_path / "s.sock"), "--bind", "0.0.0.0"], "--bind goes with --port"),
        (["--socket", str(tmp_path / "s.sock"), "--port", "10809"], "not allowed with"),
        (["--port", "70000"], "not a TCP port"),
        (["--socket", str(tmp_path / "s.sock"), "snap-0bad"], "snap-0bad"),
    ):
        result = ebsfs("nbd", "--endpoint-url", emulator.url, SNAP, *args)
        assert result.returncode != 0
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert words in result.stderr and "Traceback" not in result.stderr
    assert regular.read_text() == "keep me"


def test_in_the_background_it_replaces_a_stale_socket_and_cleans_up(
    emulator: EmulatorServer, disk: Path, tmp_path: Path
) -> None:
    emulator.store.add_image(SNAP, disk)
    path = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a killed server leaves
    log_file = tmp_path / "bg.log"
    result = ebsfs(
        "nbd",
        "--endpoint-url",
        emulator.url,
        "--log-file",
        str(log_file),
        SNAP,
        "--socket",
        str(path),
    )
    pid = 0
    try:
        assert result.returncode == 0, result.stderr
        assert f"nbd+unix:///{SNAP}?socket={path}" in result.stderr
        pid = _listener_pid(path)
        with Client(str(path)) as c:
            c.greet()
            assert c.go(SNAP)[0] == GIB
        again = ebsfs("nbd", "--endpoint-url", emulator.url, SNAP, "--socket", str(path))
        assert again.returncode != 0 and "in use" in again.stderr
    finally:
        if pid:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 20
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not _alive(pid)
        replay_log(log_file)
    assert not path.exists()


@needs_clients
def test_a_tcp_port_serves_too(emulator: EmulatorServer, disk: Path, tmp_path: Path) -> None:
    emulator.store.add_image(SNAP, disk)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with nbd_server(emulator, tmp_path, SNAP, "--port", str(port)) as process:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
        out = subprocess.run(
            ["nbdinfo", "--size", f"nbd://127.0.0.1:{port}/{SNAP}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert int(out) == GIB


def _listener_pid(path: Path) -> int:
    """The process whose command line names the socket (the background server)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"nbd" in cmdline and str(path).encode() in cmdline and _alive(int(entry)):
            return int(entry)
    raise AssertionError("no background server found")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
