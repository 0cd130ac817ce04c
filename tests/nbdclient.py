"""A raw NBD client for the tests: speaks the protocol byte by byte (ebsfs.nbd.protocol's
encoders for what a client sends), so a test can be the well-behaved client that libnbd
is not made to be, or the hostile one no real client is."""

from __future__ import annotations

import socket
import struct

from ebsfs.nbd import protocol as p


class Client:
    def __init__(self, path: str | socket.socket, timeout: float = 20) -> None:
        """Connects to the unix socket at `path`, or speaks over a connected socket."""
        if isinstance(path, socket.socket):
            self.sock = path
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(path)
        self.sock.settimeout(timeout)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def recv_exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            part = self.sock.recv(size - len(data))
            if not part:
                raise EOFError(f"closed after {len(data)} of {size} bytes")
            data += part
        return data

    def closed_by_server(self) -> bool:
        """True once the server has closed the connection (reads end)."""
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def greet(self, flags: int = p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES) -> int:
        """Read the greeting, answer with `flags`; the server's handshake flags."""
        magic, opt, hflags = struct.unpack(">QQH", self.recv_exactly(18))
        assert (magic, opt) == (p.NBDMAGIC, p.IHAVEOPT)
        self.sock.sendall(struct.pack(">I", flags))
        return int(hflags)

    def option(self, option: int, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">QII", p.IHAVEOPT, option, len(data)) + data)

    def reply(self) -> tuple[int, int, bytes]:
        """One option reply: (option, reply type, data)."""
        magic, option, kind, length = struct.unpack(">QIII", self.recv_exactly(20))
        assert magic == p.OPTION_REPLY_MAGIC
        return option, kind, self.recv_exactly(length)

    def replies(self) -> list[tuple[int, bytes]]:
        """Replies up to the final one (ACK or an error): [(type, data)]."""
        got = []
        while True:
            _, kind, data = self.reply()
            got.append((kind, data))
            if kind == p.REP_ACK or kind & p.REP_ERR:
                return got

    def structured(self) -> None:
        self.option(p.OPT_STRUCTURED_REPLY)
        assert self.replies() == [(p.REP_ACK, b"")]

    def set_allocation(self, name: str) -> None:
        raw, query = name.encode(), p.BASE_ALLOCATION.encode()
        data = struct.pack(">I", len(raw)) + raw + struct.pack(">II", 1, len(query)) + query
        self.option(p.OPT_SET_META_CONTEXT, data)
        kinds = [kind for kind, _ in self.replies()]
        assert kinds == [p.REP_META_CONTEXT, p.REP_ACK]

    def go(self, name: str) -> tuple[int, int]:
        """NBD_OPT_GO: (export size, transmission flags)."""
        raw = name.encode()
        self.option(p.OPT_GO, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))
        size = flags = -1
        for kind, data in self.replies():
            if kind == p.REP_INFO and struct.unpack(">H", data[:2])[0] == p.INFO_EXPORT:
                _, size, flags = struct.unpack(">HQH", data)
            elif kind != p.REP_INFO and kind != p.REP_ACK:
                raise AssertionError(f"NBD_OPT_GO answered {kind:#x}: {data!r}")
        return size, flags

    def request(self, kind: int, offset: int, length: int, cookie: int = 1, flags: int = 0) -> None:
        self.sock.sendall(p.encode_request(p.Request(flags, kind, cookie, offset, length)))

    def simple(self, length: int = 0) -> tuple[int, int, bytes]:
        """A simple reply: (error, cookie, `length` bytes of data when no error)."""
        magic, error, cookie = struct.unpack(">IIQ", self.recv_exactly(16))
        assert magic == p.SIMPLE_REPLY_MAGIC, hex(magic)
        return error, cookie, self.recv_exactly(length) if error == 0 else b""

    def chunks(self) -> list[tuple[int, int, int, bytes]]:
        """A structured reply's chunks up to the one flagged DONE: (flags, type, cookie,
        payload); a simple reply (allowed for a request without data) comes as type -1."""
        got = []
        while True:
            (magic,) = struct.unpack(">I", self.recv_exactly(4))
            if magic == p.SIMPLE_REPLY_MAGIC:
                error, cookie = struct.unpack(">IQ", self.recv_exactly(12))
                got.append((p.REPLY_FLAG_DONE, -1, cookie, struct.pack(">I", error)))
                return got
            assert magic == p.STRUCTURED_REPLY_MAGIC, hex(magic)
            flags, kind, cookie, length = struct.unpack(">HHQI", self.recv_exactly(16))
            got.append((flags, kind, cookie, self.recv_exactly(length)))
            if flags & p.REPLY_FLAG_DONE:
                return got


def error_of(chunks: list[tuple[int, int, int, bytes]]) -> int:
    """The error number of a reply's error chunk (or simple reply), 0 if none."""
    for _, kind, _, payload in chunks:
        if kind == p.REPLY_TYPE_ERROR or kind == -1:
            return int(struct.unpack(">I", payload[:4])[0])
    return 0


def assemble(chunks: list[tuple[int, int, int, bytes]], offset: int, length: int) -> bytes:
    """The bytes a structured read reply describes (data and hole chunks), checked to
    cover [offset, offset+length) exactly once."""
    out = bytearray(length)
    covered = 0
    for _, kind, _, payload in chunks:
        if kind == p.REPLY_TYPE_OFFSET_DATA:
            (at,) = struct.unpack(">Q", payload[:8])
            data = payload[8:]
            assert offset <= at and at + len(data) <= offset + length
            out[at - offset : at - offset + len(data)] = data
            covered += len(data)
        elif kind == p.REPLY_TYPE_OFFSET_HOLE:
            at, size = struct.unpack(">QI", payload)
            assert offset <= at and at + size <= offset + length and size > 0
            covered += size
    assert covered == length, (covered, length)
    return bytes(out)
