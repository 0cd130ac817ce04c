"""A minimal blocking HTTP/1.1 client connection for GetSnapshotBlock: one request at a
time on a keep-alive socket, the body received straight into the caller's buffer.

Why not http.client: per block it parses headers with the email package, reads the
body through a BufferedReader in many small reads, and waits in poll() before every
recv (Python-level socket timeouts). Each of those steps gives up and takes back the
GIL, which 64-256 worker threads fight over. This one sends the request in one call,
reads the head in one or two, and receives a plain-HTTP body in one recv (MSG_WAITALL)
on a blocking socket whose timeouts the kernel keeps (SO_RCVTIMEO): about 0.2 ms less
CPU per block (docs/performance.md). Only what the EBS direct APIs answer is supported:
a status line, headers, and a body of Content-Length bytes or chunked."""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Callable
from typing import Any, TypeVar

from ebsfs.errors import ProtocolError

T = TypeVar("T")

MAX_HEAD = 65536
"""Bytes of status line and headers accepted at the most."""


class Response:
    """Status and headers (names lower-cased) of one answer; `body` holds the body
    unless it was received into the caller's buffer."""

    __slots__ = ("status", "headers", "body", "will_close")

    def __init__(self, status: int, headers: dict[str, str], will_close: bool) -> None:
        self.status = status
        self.headers = headers
        self.body: bytes | None = None
        self.will_close = will_close


class Connection:
    """One keep-alive connection (one thread uses it at a time). Timeouts are the
    kernel's: connect within `connect_timeout`, then every send and receive within
    `read_timeout` (a stalled answer raises TimeoutError)."""

    def __init__(
        self,
        host: str,
        port: int,
        tls: ssl.SSLContext | None,
        connect_timeout: float,
        read_timeout: float,
    ) -> None:
        sock = socket.create_connection((host, port), timeout=connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                sock = tls.wrap_socket(sock, server_hostname=host)  # handshake, timed
            sock.settimeout(None)
            seconds = int(read_timeout)
            limit = struct.pack("ll", seconds, int((read_timeout - seconds) * 1e6))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._plain = tls is None
        self._head = bytearray(MAX_HEAD)
        self._view = memoryview(self._head)

    def close(self) -> None:
        self._sock.close()

    def get(self, target: str, headers: dict[str, str], into: memoryview | None) -> Response:
        """GET `target`. A 200 answer whose body is exactly len(into) bytes is received
        into `into` (response.body stays None); any other body goes to response.body."""
        request = (
            f"GET {target} HTTP/1.1\r\n"
            + "".join(f"{name}: {value}\r\n" for name, value in headers.items())
            + "\r\n"
        )
        self._call(self._sock.sendall, request.encode("latin-1"))
        filled, head_end = self._read_head()
        response = _parse_head(self._view[:head_end])
        extra = self._view[head_end + 4 : filled]
        length = response.headers.get("content-length")
        if "chunked" in response.headers.get("transfer-encoding", "").lower():
            response.body = self._read_chunked(bytes(extra))
        elif length is None:
            raise ProtocolError("the answer has no Content-Length")
        else:
            size = int(length)
            if len(extra) > size:
                raise ProtocolError("the answer is longer than its Content-Length")
            if response.status == 200 and into is not None and size == len(into):
                into[: len(extra)] = extra
                self._receive_into(into[len(extra) :])
            else:
                room = bytearray(size)
                room[: len(extra)] = extra
                self._receive_into(memoryview(room)[len(extra) :])
                response.body = bytes(room)
        return response

    @staticmethod
    def _call(fn: Callable[..., T], *args: Any) -> T:
        """A socket call; the kernel's timeout (EAGAIN) as a TimeoutError."""
        try:
            return fn(*args)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise TimeoutError("the service did not answer in time") from None

    def _read_head(self) -> tuple[int, int]:
        """Receive until the end of the headers: (bytes in the buffer, where the
        blank line starts)."""
        filled = 0
        while True:
            got = self._call(self._sock.recv_into, self._view[filled:])
            if not got:
                raise ProtocolError("the connection closed before an answer")
            start = max(0, filled - 3)
            filled += got
            end = self._head.find(b"\r\n\r\n", start, filled)
            if end >= 0:
                return filled, end
            if filled == MAX_HEAD:
                raise ProtocolError("the answer's headers are too long")

    def _receive_into(self, room: memoryview) -> None:
        flags = socket.MSG_WAITALL if self._plain else 0
        while room:
            got = self._call(self._sock.recv_into, room, len(room), flags)
            if not got:
                raise ProtocolError("the connection closed in the middle of the body")
            room = room[got:]

    def _read_chunked(self, pending: bytes) -> bytes:
        body = bytearray()
        buffered = bytearray(pending)

        def line() -> bytes:
            while b"\r\n" not in buffered:
                more = self._call(self._sock.recv, 65536)
                if not more:
                    raise ProtocolError("the connection closed in a chunked body")
                buffered.extend(more)
                if len(buffered) > MAX_HEAD and b"\r\n" not in buffered:
                    raise ProtocolError("a chunk size line is too long")
            text, _, rest = bytes(buffered).partition(b"\r\n")
            buffered[:] = rest
            return text

        def take(count: int) -> bytes:
            while len(buffered) < count:
                more = self._call(self._sock.recv, max(65536, count - len(buffered)))
                if not more:
                    raise ProtocolError("the connection closed in a chunked body")
                buffered.extend(more)
            data = bytes(buffered[:count])
            del buffered[:count]
            return data

        while True:
            try:
                size = int(line().split(b";", 1)[0], 16)
            except ValueError:
                raise ProtocolError("a chunk size is not hexadecimal") from None
            if size == 0:
                while line():  # trailers, up to the blank line
                    pass
                if buffered:
                    raise ProtocolError("bytes after the end of a chunked body")
                return bytes(body)
            body += take(size)
            if take(2) != b"\r\n":
                raise ProtocolError("a chunk does not end in CRLF")


def _parse_head(head: memoryview) -> Response:
    lines = bytes(head).decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise ProtocolError(f"not an HTTP/1.1 status line: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon:
            raise ProtocolError(f"a malformed header line: {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    will_close = (
        headers.get("connection", "").lower() == "close"
        or version == "HTTP/1.0"
        and headers.get("connection", "").lower() != "keep-alive"
    )
    return Response(int(code), headers, will_close)
