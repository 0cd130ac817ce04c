"""A minimal blocking HTTP/1.1 client connection for the direct path (GetSnapshotBlock,
and the list calls botocore signs and parses): one GET at a time on a keep-alive socket,
a block's body received straight into the caller's buffer.

Why not http.client: per block it parses headers with the email package, reads the
body through a BufferedReader in many small reads, and waits in poll() before every
recv (Python-level socket timeouts). Each of those steps gives up and takes back the
GIL, which 64-256 worker threads fight over. This one sends the request in one call,
reads the head in one or two, and receives a plain-HTTP body in one recv (MSG_WAITALL)
on a blocking socket whose timeouts the kernel keeps (SO_RCVTIMEO): about 0.2 ms less
CPU per block (docs/performance.md). Only what the EBS direct APIs answer is supported:
a status line, headers, and a body of Content-Length bytes or chunked.

The server is not trusted (a hostile or broken endpoint, or whoever sits on a plain-http
path): the head is parsed ASCII-strict, heads, header counts and bodies are capped, every
answer that does not parse is a ProtocolError (the connection is dropped, the call
retried), and an attempt has an overall deadline: after `read_timeout` of grace the
answer must keep coming at MIN_RATE on average, so a server trickling a byte at a time
cannot hold a call (and its worker thread) for hours. A call nobody waits for any more
is ended from outside (Abandon)."""

from __future__ import annotations

import contextlib
import contextvars
import re
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from ebsfs.constants import BLOCK_SIZE
from ebsfs.errors import ProtocolError

T = TypeVar("T")

MAX_HEAD = 65536
"""Bytes of status line and headers accepted at the most."""
MAX_HEADERS = 100
"""Header lines accepted at the most (http.client's limit; the service sends about 10)."""
MAX_BODY = 2 * BLOCK_SIZE
"""Bytes of a body accepted at the most: a block, or an error answer's few hundred
bytes; a server announcing a gigabyte gets a ProtocolError, not a gigabyte of memory."""
MAX_LINE = 8192
"""Bytes of one chunk-size or trailer line accepted at the most."""
MIN_RATE = 32 * 1024
"""Bytes per second an answer must average once the first `read_timeout` has passed:
a block may take read_timeout + 16 s at the most. Low enough for hundreds of calls
sharing a slow link, high enough that a trickle ends in seconds, not hours."""

SLACK = 0.5
"""Seconds a receive may end after the attempt's deadline: the kernel's receive timeout
is shortened (a system call) only when the deadline is nearer than read_timeout - SLACK,
never for an answer coming at a normal pace."""

QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)
"""Linux's TCP_QUICKACK (None elsewhere: other systems have no such mode to leave)."""

CLOSED = (ProtocolError, ConnectionError, ssl.SSLEOFError, ssl.SSLZeroReturnError)
"""What a connection the server closed (or reset) fails with: ProtocolError when a
receive finds the end of the stream, the others on a send or a receive after a reset or
an unannounced end of TLS."""

_STATUS = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: [\t\x20-\x7e]*)?")
_HEAD = re.compile(
    rb"HTTP/1\.([01]) ([0-9]{3})(?: [\t\x20-\x7e]*)?"
    rb"(?:\r\n[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t\x20-\x7e]*)*"
)
"""A whole head by the same rules as _STATUS, _NAME and _VALUE (linear: a header line
starts with CRLF, which no value holds)."""
_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_VALUE = re.compile(rb"[\t\x20-\x7e]*")
_DECIMAL = re.compile(r"[0-9]{1,18}")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
_EXTENSION = re.compile(rb"[\t\x20-\x7e]*")


class Abandon:
    """Set (from any thread) once nobody waits for a call any more, for example when
    the read that asked for a block gave up: the worker thread then ends the exchange
    under way (`hook`) and tries no more, instead of holding its fetch slot, its
    connection and its room in the cache until its own deadline and retries end."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hooks: list[Callable[[], None]] = []
        self.fired = False

    def fire(self) -> None:
        with self._lock:
            self.fired = True
            hooks, self._hooks = self._hooks, []
        for hook in hooks:
            hook()

    def add(self, on_fire: Callable[[], None]) -> None:
        """Run `on_fire` when the call is abandoned (at once if it already is), until
        `discard`."""
        with self._lock:
            fired = self.fired
            if not fired:
                self._hooks.append(on_fire)
        if fired:
            on_fire()

    def discard(self, on_fire: Callable[[], None]) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._hooks.remove(on_fire)

    @contextlib.contextmanager
    def hook(self, on_fire: Callable[[], None]) -> Iterator[None]:
        """Run `on_fire` if the call is abandoned while the block runs (at once if it
        already is)."""
        self.add(on_fire)
        try:
            yield
        finally:
            self.discard(on_fire)


_ABANDON: contextvars.ContextVar[Abandon | None] = contextvars.ContextVar(
    "ebsfs_abandon", default=None
)


def current_abandon() -> Abandon | None:
    """The Abandon of the call this thread runs for, if its caller gave it one."""
    return _ABANDON.get()


@contextlib.contextmanager
def abandonable(abandon: Abandon) -> Iterator[None]:
    """Calls made in the block (in this thread) stop once `abandon` fires."""
    token = _ABANDON.set(abandon)
    try:
        yield
    finally:
        _ABANDON.reset(token)


class Response:
    """Status and headers (names lower-cased) of one answer; `body` holds the body
    unless it was received into the caller's buffer."""

    __slots__ = ("status", "headers", "body", "will_close")

    def __init__(self, status: int, headers: dict[str, str], will_close: bool) -> None:
        self.status = status
        self.headers = headers
        self.body: bytes | None = None
        self.will_close = will_close


def _handshake(sock: ssl.SSLSocket, timeout: float | Callable[[], float]) -> float:
    """Completes the TLS handshake within `timeout`, the seconds it took. A function is
    asked for the deadline again whenever the one it gave is reached (connections.Pool
    extends it while other connects are queued with this one); TimeoutError once the
    handshake has waited the deadline it last gave."""
    deadline = timeout if callable(timeout) else lambda: timeout
    started = time.monotonic()
    while True:
        left = deadline() - (time.monotonic() - started)
        if left <= 0:
            raise TimeoutError("the TLS handshake timed out")
        sock.settimeout(left)
        try:
            sock.do_handshake()
        except TimeoutError:  # the handshake's state is kept: it goes on where it was
            continue
        return time.monotonic() - started


class Connection:
    """One keep-alive connection (one thread uses it at a time). Timeouts are the
    kernel's: the TCP connect within `connect_timeout`, the TLS handshake within
    `handshake_timeout` (by default what is left of `connect_timeout`; a function is
    asked again each time the deadline it gave is reached), then every send
    and receive within `read_timeout` (a stalled answer raises TimeoutError), and the
    whole answer within its deadline (MIN_RATE). How long the connect and the handshake
    took is kept (connections.Pool judges its deadlines by them)."""

    def __init__(
        self,
        host: str,
        port: int,
        tls: ssl.SSLContext | None,
        connect_timeout: float,
        read_timeout: float,
        handshake_timeout: float | Callable[[], float] | None = None,
    ) -> None:
        started = time.monotonic()
        sock = socket.create_connection((host, port), timeout=connect_timeout)
        self.connect_seconds = time.monotonic() - started
        self.handshake_seconds: float | None = None
        """None over plain HTTP."""
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                if handshake_timeout is None:
                    handshake_timeout = connect_timeout - self.connect_seconds
                sock = tls.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
                self.handshake_seconds = _handshake(sock, handshake_timeout)
            sock.settimeout(None)
            _kernel_timeouts(sock, read_timeout, both=True)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._plain = tls is None
        self._read_timeout = read_timeout
        self._waiting = read_timeout
        """The receive timeout the kernel holds now (shorter near the deadline)."""
        self._deadline = 0.0
        self._sent = 0
        """Requests sent on this connection so far."""
        self._unanswered = False
        """No byte of the answer to the request under way has come yet."""
        self._head = bytearray(MAX_HEAD)
        self._view = memoryview(self._head)

    def close(self) -> None:
        self._sock.close()

    def retransmitted(self) -> bool:
        """Whether TCP sent a segment of this connection again (a dropped SYN, say):
        then its connect time measured a loss, not the path (Linux's TCP_INFO)."""
        try:
            info = self._sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        except (AttributeError, OSError):
            return False
        return len(info) >= 104 and struct.unpack_from("I", info, 100)[0] > 0

    def abort(self) -> None:
        """From another thread: end the exchange under way (a receive blocked in it
        returns at once, and the call fails with a ProtocolError or OSError)."""
        with contextlib.suppress(OSError):
            # socket.socket's own shutdown: SSLSocket's would drop its SSL object
            # under the reading thread's feet.
            socket.socket.shutdown(self._sock, socket.SHUT_RDWR)

    def went_stale(self, err: OSError) -> bool:
        """Whether `err`, from the exchange just tried, only says that the server had
        closed this kept-alive connection while it sat idle: the connection served a
        request before, and it closed (or was reset) before any byte of this answer came.
        Such a GET is sent again at once on a new connection, as http.client and urllib3
        do: a GET is idempotent, and the server dropped it unanswered (a timeout is not
        this: the server may be working on it)."""
        return self._unanswered and self._sent > 1 and isinstance(err, CLOSED)

    def get(
        self,
        target: str,
        headers: dict[str, str],
        into: memoryview | None,
        limit: int = MAX_BODY,
    ) -> Response:
        """GET `target`. A 200 answer whose body is exactly len(into) bytes is received
        into `into` (response.body stays None); any other body goes to response.body,
        and one longer than both `limit` and `into` is a ProtocolError."""
        request = (
            f"GET {target} HTTP/1.1\r\n"
            + "".join(f"{name}: {value}\r\n" for name, value in headers.items())
            + "\r\n"
        )
        self._deadline = time.monotonic() + self._read_timeout
        self._sent += 1
        self._unanswered = True
        self._call(self._sock.sendall, request.encode("latin-1"))
        # Our send put Linux in its interactive mode, which delays the ACK of what comes
        # back (40 ms) for a reply to carry it: a server with Nagle's algorithm on holds
        # the last small piece of its answer (a body after its head, a TLS record) until
        # that ACK. QUICKACK leaves the mode until our next send: one system call per
        # request, none per receive.
        if QUICKACK is not None:
            self._sock.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)
        filled, head_end = self._read_head()
        response = parse_head(bytes(self._view[:head_end]))
        extra = self._view[head_end + 4 : filled]
        limit = max(limit, len(into) if into is not None else 0)
        size = body_size(response.headers, limit)
        if size is None:
            response.body = self._read_chunked(bytes(extra), limit)
            return response
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

    def _receive(self, room: memoryview, flags: int = 0) -> int:
        """One receive into `room` within the attempt's deadline, which every byte
        received moves on by 1/MIN_RATE s. 0 at the end of the stream."""
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(
                f"the answer came slower than {MIN_RATE // 1024} KiB/s "
                f"after {self._read_timeout:g}s"
            )
        wait = self._read_timeout if remaining > self._read_timeout - SLACK else remaining
        if wait != self._waiting:  # only near the deadline: no system call otherwise
            _kernel_timeouts(self._sock, wait)
            self._waiting = wait
        if flags:
            got = self._call(self._sock.recv_into, room, len(room), flags)
        else:
            got = self._call(self._sock.recv_into, room)
        self._deadline += got / MIN_RATE
        return got

    def _read_head(self) -> tuple[int, int]:
        """Receive until the end of the headers: (bytes in the buffer, where the
        blank line starts)."""
        filled = 0
        while True:
            got = self._receive(self._view[filled:])
            if not got:
                raise ProtocolError("the connection closed before an answer")
            self._unanswered = False
            start = max(0, filled - 3)
            filled += got
            end = self._head.find(b"\r\n\r\n", start, filled)
            if end >= 0:
                return filled, end
            if filled == MAX_HEAD:
                raise ProtocolError("the answer's headers are too long")

    def _receive_into(self, room: memoryview) -> None:
        """Fill `room`. `_receive` unrolled while the deadline is far: a TLS body takes
        a receive per 16 KiB record (32 a block), and each line here runs under the
        GIL the other worker threads wait for: this is the hottest loop of a read."""
        flags = socket.MSG_WAITALL if self._plain else 0
        receive = self._sock.recv_into
        monotonic = time.monotonic
        # Before `calm`, a receive bounded by the kernel's timeout ends before the
        # deadline (plus SLACK), so it needs neither a check nor a shorter timeout.
        steady = self._waiting == self._read_timeout
        calm = self._deadline - self._read_timeout + SLACK if steady else 0.0
        taken = 0  # bytes received on the fast path, not yet added to the deadline
        try:
            while room:
                if monotonic() < calm:
                    got = receive(room, len(room), flags)
                    taken += got
                    calm += got / MIN_RATE
                else:  # near the deadline (a slow answer): the careful path
                    self._deadline += taken / MIN_RATE
                    taken = 0
                    calm = 0.0
                    got = self._receive(room, flags)
                if not got:
                    raise ProtocolError("the connection closed in the middle of the body")
                room = room[got:]
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise TimeoutError("the service did not answer in time") from None
        self._deadline += taken / MIN_RATE

    def _read_chunked(self, pending: bytes, limit: int) -> bytes:
        """A chunked body of `limit` bytes at the most, trailers skipped."""
        body = bytearray()
        buffered = bytearray(pending)
        scratch = bytearray(65536)

        def more() -> None:
            got = self._receive(memoryview(scratch))
            if not got:
                raise ProtocolError("the connection closed in a chunked body")
            buffered.extend(scratch[:got])

        def line() -> bytes:
            while (end := buffered.find(b"\r\n")) < 0:
                if len(buffered) > MAX_LINE:
                    raise ProtocolError("a line of a chunked body is too long")
                more()
            if end > MAX_LINE:
                raise ProtocolError("a line of a chunked body is too long")
            text = bytes(buffered[:end])
            del buffered[: end + 2]
            return text

        def take(count: int) -> bytes:
            while len(buffered) < count:
                more()
            data = bytes(buffered[:count])
            del buffered[:count]
            return data

        while True:
            size = chunk_size(line())
            if size > limit - len(body):
                raise ProtocolError(f"a chunked body of more than {limit} bytes")
            if size == 0:
                trailers = 0
                while trailer := line():  # trailers, up to the blank line
                    trailers += len(trailer)
                    if trailers > MAX_HEAD:
                        raise ProtocolError("the chunked body's trailers are too long")
                if buffered:
                    raise ProtocolError("bytes after the end of a chunked body")
                return bytes(body)
            body += take(size)
            if take(2) != b"\r\n":
                raise ProtocolError("a chunk does not end in CRLF")


def _kernel_timeouts(sock: socket.socket, seconds: float, both: bool = False) -> None:
    """SO_RCVTIMEO (and SO_SNDTIMEO) of `seconds`, never 0 (which means forever)."""
    whole = int(seconds)
    micro = max(0 if whole else 1, int((seconds - whole) * 1e6))
    limit = struct.pack("ll", whole, micro)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
    if both:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)


def parse_head(head: bytes) -> Response:
    """The status line and headers (the head without its blank line), ASCII-strict:
    anything else is a ProtocolError."""
    lines = head.split(b"\r\n")
    whole = _HEAD.fullmatch(head)
    if whole is None or len(lines) - 1 > MAX_HEADERS:
        raise ProtocolError(_what_breaks(lines) or "a malformed head")
    headers: dict[str, str] = {}
    for line in head.decode("ascii").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        key = name.lower()
        value = value.strip(" \t")
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    connection = headers.get("connection", "").lower()
    http10 = whole[1] == b"0"
    will_close = connection == "close" or (http10 and connection != "keep-alive")
    return Response(int(whole[2]), headers, will_close)


def _what_breaks(lines: list[bytes]) -> str | None:
    """Which rule of parse_head a head's lines break, naming the line; None when they
    keep them all. (parse_head checks the head whole by one match, _HEAD: twice as fast
    as line by line, for every answer; these are its rules spelled out.)"""
    if _STATUS.fullmatch(lines[0]) is None:
        return f"not an HTTP/1.1 status line: {_shown(lines[0])}"
    if len(lines) - 1 > MAX_HEADERS:
        return f"more than {MAX_HEADERS} header lines"
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _NAME.fullmatch(name) or not _VALUE.fullmatch(value):
            return f"a malformed header line: {_shown(line)}"
    return None


def body_size(headers: dict[str, str], limit: int) -> int | None:
    """The body's Content-Length, or None for a chunked body; a ProtocolError for
    anything else this client will not read (no length, two framings, an encoding
    other than chunked, more than `limit` bytes)."""
    encoding = headers.get("transfer-encoding")
    length = headers.get("content-length")
    if encoding is not None:
        if encoding.lower() != "chunked":
            raise ProtocolError(f"a Transfer-Encoding this client does not read: {encoding[:40]!r}")
        if length is not None:
            raise ProtocolError("an answer with both Content-Length and Transfer-Encoding")
        return None
    if length is None:
        raise ProtocolError("the answer has no Content-Length")
    if not _DECIMAL.fullmatch(length):
        raise ProtocolError(f"a Content-Length that is not a number: {length[:40]!r}")
    size = int(length)
    if size > limit:
        raise ProtocolError(f"an answer of {size} bytes (at most {limit} expected)")
    return size


def chunk_size(line: bytes) -> int:
    """The size on a chunk-size line (extensions ignored), or a ProtocolError."""
    digits, _, extension = line.partition(b";")
    digits = digits.rstrip(b" \t")
    if not _HEX.fullmatch(digits) or not _EXTENSION.fullmatch(extension):
        raise ProtocolError(f"a chunk size is not hexadecimal: {_shown(line)}")
    return int(digits, 16)


def _shown(raw: bytes) -> str:
    """Up to 80 bytes of what the server sent, printable whatever they hold."""
    return repr(raw[:80])
