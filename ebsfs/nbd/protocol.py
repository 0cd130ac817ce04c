"""The NBD protocol's numbers and messages: constants, and pure encoders and decoders of
the fixed newstyle handshake, option haggling, requests and (simple and structured)
replies. No I/O here, so every message can be unit-tested byte for byte.

Written from the protocol document of the nbd project (doc/proto.md: "fixed newstyle"
negotiation, the INFO extension's NBD_OPT_INFO/GO, structured replies and metadata
contexts); no NBD library is maintained on PyPI. All numbers are big-endian."""

from __future__ import annotations

import struct
from dataclasses import dataclass

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# Handshake flags (server) and client flags.
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1
KNOWN_CLIENT_FLAGS = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES

# Transmission flags.
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8

# Options.
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

# Option replies.
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR = 1 << 31
REP_ERR_UNSUP = REP_ERR | 1
REP_ERR_POLICY = REP_ERR | 2
REP_ERR_INVALID = REP_ERR | 3
REP_ERR_UNKNOWN = REP_ERR | 6
REP_ERR_SHUTDOWN = REP_ERR | 7
REP_ERR_TOO_BIG = REP_ERR | 9

# NBD_REP_INFO types.
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# Commands and their flags.
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3

# Structured reply chunks.
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) | 1

# base:allocation states.
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
BASE_ALLOCATION = "base:allocation"

# Errors (the protocol's numbers, which are Linux's).
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

MAX_STRING = 4096
"""The longest export name, query or message the protocol allows."""

_HANDSHAKE = struct.Struct(">QQH")
_OPTION_HEADER = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")
OPTION_HEADER_SIZE = _OPTION_HEADER.size
REQUEST_SIZE = REQUEST.size


class Malformed(ValueError):
    """A client's message that breaks the protocol's rules (the text says which)."""


def handshake(flags: int = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) -> bytes:
    """The server's greeting: NBDMAGIC, IHAVEOPT, its handshake flags."""
    return _HANDSHAKE.pack(NBDMAGIC, IHAVEOPT, flags)


def option_header(data: bytes) -> tuple[int, int]:
    """A client's option header -> (option, length of its data)."""
    magic, option, length = _OPTION_HEADER.unpack(data)
    if magic != IHAVEOPT:
        raise Malformed(f"option magic {magic:#x} is not IHAVEOPT")
    return option, length


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return _OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data


def server_reply(name: str) -> bytes:
    """NBD_REP_SERVER's data: one export's name."""
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw


def info_export(size: int, flags: int) -> bytes:
    return struct.pack(">HQH", INFO_EXPORT, size, flags)


def info_name(name: str) -> bytes:
    return struct.pack(">H", INFO_NAME) + name.encode()


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return struct.pack(">HIII", INFO_BLOCK_SIZE, minimum, preferred, maximum)


def meta_context_reply(context_id: int, name: str) -> bytes:
    return struct.pack(">I", context_id) + name.encode()


def export_name_reply(size: int, flags: int, no_zeroes: bool) -> bytes:
    """The answer to NBD_OPT_EXPORT_NAME, which ends the haggling."""
    return struct.pack(">QH", size, flags) + (b"" if no_zeroes else bytes(124))


class _Reader:
    """Fields taken one after another from an option's data, each checked to be there."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.at = 0
        self.what = what

    def take(self, size: int) -> bytes:
        if self.at + size > len(self.data):
            raise Malformed(f"{self.what}: its data ends early")
        part = self.data[self.at : self.at + size]
        self.at += size
        return part

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def string(self) -> str:
        length = self.u32()
        if length > MAX_STRING:
            raise Malformed(f"{self.what}: a string of {length} bytes (at most {MAX_STRING})")
        raw = self.take(length)
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            raise Malformed(f"{self.what}: a string that is not UTF-8") from None
        if "\0" in text:
            raise Malformed(f"{self.what}: a string with a NUL")
        return text

    def end(self) -> None:
        if self.at != len(self.data):
            raise Malformed(f"{self.what}: {len(self.data) - self.at} bytes too many")


def export_name(data: bytes) -> str:
    """NBD_OPT_EXPORT_NAME's data: the name, all of it."""
    if len(data) > MAX_STRING:
        raise Malformed(f"export name of {len(data)} bytes (at most {MAX_STRING})")
    return _Reader(struct.pack(">I", len(data)) + data, "NBD_OPT_EXPORT_NAME").string()


def info_request(data: bytes) -> tuple[str, list[int]]:
    """NBD_OPT_INFO and NBD_OPT_GO's data -> (export name, information types asked)."""
    reader = _Reader(data, "NBD_OPT_GO")
    name = reader.string()
    count = reader.u16()
    asked = [reader.u16() for _ in range(count)]
    reader.end()
    return name, asked


def meta_context_request(data: bytes, what: str) -> tuple[str, list[str]]:
    """NBD_OPT_LIST/SET_META_CONTEXT's data -> (export name, queries)."""
    reader = _Reader(data, what)
    name = reader.string()
    count = reader.u32()
    if count > len(data) // 4:  # each query takes 4 bytes at the least
        raise Malformed(f"{what}: {count} queries in {len(data)} bytes")
    queries = [reader.string() for _ in range(count)]
    reader.end()
    return name, queries


@dataclass(frozen=True)
class Request:
    flags: int
    type: int
    cookie: int
    offset: int
    length: int


def request(data: bytes) -> Request:
    """A 28-byte request header."""
    magic, flags, kind, cookie, offset, length = REQUEST.unpack(data)
    if magic != REQUEST_MAGIC:
        raise Malformed(f"request magic {magic:#x} is not NBD_REQUEST_MAGIC")
    return Request(flags, kind, cookie, offset, length)


def encode_request(req: Request) -> bytes:
    """A request as a client sends it (tests speak as a client)."""
    return REQUEST.pack(REQUEST_MAGIC, req.flags, req.type, req.cookie, req.offset, req.length)


def simple_reply(cookie: int, error: int = 0) -> bytes:
    """The header of a simple reply (a read's data follows it when error is 0)."""
    return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def chunk_header(cookie: int, kind: int, length: int, done: bool) -> bytes:
    flags = REPLY_FLAG_DONE if done else 0
    return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, kind, cookie, length)


def data_chunk_header(cookie: int, offset: int, size: int, done: bool) -> bytes:
    """The header and offset of an OFFSET_DATA chunk; `size` bytes of data follow."""
    return chunk_header(cookie, REPLY_TYPE_OFFSET_DATA, 8 + size, done) + struct.pack(">Q", offset)


def hole_chunk(cookie: int, offset: int, size: int, done: bool) -> bytes:
    return chunk_header(cookie, REPLY_TYPE_OFFSET_HOLE, 12, done) + struct.pack(">QI", offset, size)


def none_chunk(cookie: int) -> bytes:
    return chunk_header(cookie, REPLY_TYPE_NONE, 0, True)


def error_chunk(cookie: int, error: int, message: str) -> bytes:
    text = message.encode()[:MAX_STRING]
    payload = struct.pack(">IH", error, len(text)) + text
    return chunk_header(cookie, REPLY_TYPE_ERROR, len(payload), True) + payload


def block_status_chunk(cookie: int, context_id: int, extents: list[tuple[int, int]]) -> bytes:
    """A BLOCK_STATUS chunk (the reply's last): (length, flags) descriptors."""
    payload = struct.pack(">I", context_id) + b"".join(
        struct.pack(">II", length, flags) for length, flags in extents
    )
    return chunk_header(cookie, REPLY_TYPE_BLOCK_STATUS, len(payload), True) + payload
