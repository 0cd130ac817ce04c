"""The emulator's connections: how it accepts, keeps and closes them (ServerProfile),
so that benchmarks and tests meet servers unlike our loopback one."""

from __future__ import annotations

import contextlib
import io
import logging
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from ebsfs.emulator.server import EmulatorServer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerProfile:
    """How the server behaves on the wire, beside the EBS behaviour (Faults): the real
    service's front ends are not our loopback server. Defaults: Nagle off, accepts at
    once, a listen queue of 256, keep-alive connections kept as long as clients want."""

    nagle: bool = False
    accept_delay: float = 0.0
    """Seconds the accept loop waits before each accept."""
    backlog: int = 256
    """The listen queue's length (the kernel may cap it at net.core.somaxconn)."""
    close_after: int = 0
    """Close a connection after its Nth answer (0: never), as front ends that cap the
    requests per keep-alive connection do."""
    close_silently: bool = False
    """With close_after: close with no `Connection: close` on that answer, as an idle
    timeout looks to a client that sends its next request just then."""
    idle_timeout: float = 0.0
    """Seconds a connection may wait for its next request before it is closed silently
    (0: never); load balancers and S3's front ends close after about 60 s."""


class Handler(BaseHTTPRequestHandler):
    """One connection: its requests go to the EmulatorServer; the profile decides when
    the connection ends."""

    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: with Nagle's algorithm the body then
    # waits for a delayed ACK (40 ms on Linux) on every keep-alive request.
    disable_nagle_algorithm = True
    server: HttpServer
    answers = 0
    """Answers begun on this connection (one handler serves one connection)."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:  # noqa: N802
        self.server.emulator.handle_api(self)

    def do_POST(self) -> None:  # noqa: N802
        self.server.emulator.handle_post(self)

    def handle(self) -> None:
        """Requests until the client or the profile ends the connection."""
        self.close_connection = True
        while self._next_request_comes():
            self.handle_one_request()
            if self.close_connection:
                return

    def _next_request_comes(self) -> bool:
        """False when the profile's idle timeout passes with no request: the handler
        then returns and the connection is closed with no answer."""
        idle = self.server.profile.idle_timeout
        if not idle:
            return True
        self.connection.settimeout(idle)
        try:
            cast(io.BufferedReader, self.rfile).peek(1)  # returns what it already holds
        except TimeoutError:
            log.debug("%s idle for %gs: closed", self.address_string(), idle)
            self.server.emulator.counters.closed("idle")
            return False
        except OSError:
            return False  # reset by the client: nobody to answer
        self.connection.settimeout(None)
        return True

    def end_headers(self) -> None:
        """Every answer passes here: the profile's Nth answer closes the connection,
        saying so or not."""
        profile = self.server.profile
        self.answers += 1
        if profile.close_after and self.answers == profile.close_after:
            if profile.close_silently:
                self.close_connection = True
            else:
                self.send_header("Connection", "close")  # sets close_connection too
            self.server.emulator.counters.closed("silent" if profile.close_silently else "said")
        super().end_headers()


class NagleHandler(Handler):
    """Nagle's algorithm left on, as many servers leave it: the body waits for the
    client's delayed ACK of the headers (a profile for benchmarks, `--nagle`)."""

    disable_nagle_algorithm = False


class HttpServer(ThreadingHTTPServer):
    """A thread per connection, TLS handshakes in those threads, the open connections
    known so that stop() can drop them."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        emulator: EmulatorServer,
        tls: ssl.SSLContext | None = None,
        profile: ServerProfile | None = None,
    ) -> None:
        self.emulator = emulator
        self.tls = tls
        self.profile = profile or ServerProfile()
        self.request_queue_size = self.profile.backlog  # listen() is called in __init__
        self.open_sockets: set[socket.socket] = set()
        self.sockets_lock = threading.Lock()
        super().__init__(address, NagleHandler if self.profile.nagle else Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept one connection, after the profile's delay: a server slow to accept
        makes a burst of new connections wait in the listen queue."""
        if self.profile.accept_delay:
            time.sleep(self.profile.accept_delay)
        return super().get_request()

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Serve one connection (in its own thread): the TLS handshake happens here, so
        a slow client never holds up the accept loop. The TLS socket takes over the
        connection, so it is what drop_connections() must shut down."""
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        with self.sockets_lock:
            self.open_sockets.discard(request)
        request.settimeout(10.0)
        try:
            conn = self.tls.wrap_socket(request, server_side=True)
        except OSError as err:
            log.debug("TLS handshake with %s failed: %s", client_address, err)
            request.close()
            return
        conn.settimeout(None)
        with self.sockets_lock:
            self.open_sockets.add(conn)
        try:
            super().finish_request(conn, client_address)
        finally:
            with self.sockets_lock:
                self.open_sockets.discard(conn)
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def process_request(self, request: Any, client_address: Any) -> None:
        self.emulator.counters.connection()
        with self.sockets_lock:
            self.open_sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away mid-answer (killed, or cancelled its read) is
        normal: a debug line, not socketserver's traceback on stderr."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            log.debug("%s went away: %s", client_address, sys.exc_info()[1])
            return
        super().handle_error(request, client_address)

    def drop_connections(self) -> None:
        """Close every open connection, as a server that goes away does."""
        with self.sockets_lock:
            sockets = list(self.open_sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
