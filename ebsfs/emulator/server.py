"""The emulator's HTTP side: the EBS direct API wire format (REST-JSON), fault
injection around each call, and a small control endpoint (/_emulator/...) for tests."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
import ssl
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ebsfs.emulator.auth import access_key_of, verify_signature
from ebsfs.emulator.faults import Counters, Faults, RateLimiter
from ebsfs.emulator.store import ApiError, SnapshotStore

log = logging.getLogger(__name__)

_LIST = re.compile(r"^/snapshots/([^/]+)/blocks$")
_GET = re.compile(r"^/snapshots/([^/]+)/blocks/([^/]+)$")
_CHANGED = re.compile(r"^/snapshots/([^/]+)/changedblocks$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: with Nagle's algorithm the body then
    # waits for a delayed ACK (40 ms on Linux) on every keep-alive request.
    disable_nagle_algorithm = True
    server: _HttpServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:  # noqa: N802
        self.server.emulator.handle_api(self)

    def do_POST(self) -> None:  # noqa: N802
        self.server.emulator.handle_control(self)


class _NagleHandler(_Handler):
    """Nagle's algorithm left on, as many servers leave it: the body waits for the
    client's delayed ACK of the headers (a profile for benchmarks, `--nagle`)."""

    disable_nagle_algorithm = False


class _HttpServer(ThreadingHTTPServer):
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
        super().__init__(address, _NagleHandler if self.profile.nagle else _Handler)

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


@dataclass(frozen=True)
class ServerProfile:
    """How the server behaves on the wire, beside the EBS behaviour (Faults): the real
    service's front ends are not our loopback server. Defaults: Nagle off, accepts at
    once, a listen queue of 256."""

    nagle: bool = False
    accept_delay: float = 0.0
    """Seconds the accept loop waits before each accept."""
    backlog: int = 256
    """The listen queue's length (the kernel may cap it at net.core.somaxconn)."""


class EmulatorServer:
    """Serves a SnapshotStore over HTTP on 127.0.0.1, in a background thread.

    Use as a context manager in tests, or `start()`/`stop()`; `url` is the endpoint to
    give boto3. `stop()` then `start()` again keeps the port (an endpoint that goes away
    and comes back)."""

    def __init__(
        self,
        store: SnapshotStore | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: tuple[str, str] | None = None,
        profile: ServerProfile | None = None,
    ) -> None:
        """`tls`: (certificate chain, private key) PEM files to serve HTTPS, as the real
        service does; clients must trust the certificate (AWS_CA_BUNDLE). `profile`:
        Nagle, a slow accept loop, a short listen queue (ServerProfile)."""
        self.profile = profile
        self.store = store or SnapshotStore()
        self._tls: ssl.SSLContext | None = None
        if tls is not None:
            self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._tls.load_cert_chain(*tls)
        self.counters = Counters()
        self.limiter = RateLimiter()
        self._host, self._port = host, port
        self._httpd: _HttpServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def faults(self) -> Faults:
        return self.store.faults

    @property
    def url(self) -> str:
        scheme = "https" if self._tls is not None else "http"
        return f"{scheme}://{self._host}:{self._port}"

    def start(self) -> EmulatorServer:
        self._stopping.clear()
        self._httpd = _HttpServer((self._host, self._port), self, self._tls, self.profile)
        self._port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="ebs-emulator",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.drop_connections()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None

    def serve_forever(self) -> None:
        """Run in the calling thread until interrupted (the command-line emulator)."""
        self._httpd = _HttpServer((self._host, self._port), self, self._tls, self.profile)
        self._port = self._httpd.server_address[1]
        try:
            self._httpd.serve_forever(poll_interval=0.2)
        finally:
            self._httpd.server_close()

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- the API -------------------------------------------------------------------

    def handle_api(self, req: _Handler) -> None:
        parts = urlsplit(req.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        path = parts.path
        if path.startswith("/_emulator/"):
            self.handle_control(req)
            return
        operation, args = self._route(path, query)
        if operation is None:
            self._send_error(req, ApiError(404, "UnknownOperationException", "", "Unknown path"))
            return
        self.counters.call(operation)
        try:
            self._admit(req, operation, args)
            faults = self.faults
            delay = faults.latency
            if faults.jitter:
                delay += self.store.dice.uniform(0, faults.jitter)
            if delay > 0:
                time.sleep(delay)
            if self.store.dice.chance(faults.error_rate):
                raise ApiError(500, "InternalServerException", "", "Injected internal error")
            if operation == "GetSnapshotBlock":
                self._send_block(req, args)
            elif operation == "ListSnapshotBlocks":
                self._send_json(req, 200, self.store.list_snapshot_blocks(**args))
            else:
                self._send_json(req, 200, self.store.list_changed_blocks(**args))
        except ApiError as err:
            self._send_error(req, err)

    @staticmethod
    def _route(path: str, q: dict[str, str]) -> tuple[str | None, dict[str, Any]]:
        if m := _GET.match(path):
            return "GetSnapshotBlock", {
                "snapshot_id": m[1],
                "block_index": m[2],
                "block_token": q.get("blockToken"),
            }
        if m := _LIST.match(path):
            return "ListSnapshotBlocks", {
                "snapshot_id": m[1],
                "next_token": q.get("pageToken"),
                "max_results": q.get("maxResults"),
                "starting_block_index": q.get("startingBlockIndex"),
            }
        if m := _CHANGED.match(path):
            return "ListChangedBlocks", {
                "second_id": m[1],
                "first_id": q.get("firstSnapshotId"),
                "next_token": q.get("pageToken"),
                "max_results": q.get("maxResults"),
                "starting_block_index": q.get("startingBlockIndex"),
            }
        return None, {}

    def _admit(self, req: _Handler, operation: str, args: dict[str, Any]) -> None:
        """Authentication and the service quotas, checked before any work."""
        key = access_key_of(req.headers.get("Authorization", ""))
        if self.faults.secret_keys:
            headers = {name.lower(): value for name, value in req.headers.items()}
            verify_signature(req.command, req.path, headers, self.faults.secret_keys)
        if key in self.faults.deny_access_keys:
            raise ApiError(
                403,
                "AccessDeniedException",
                "UNAUTHORIZED_ACCOUNT",
                "User is not authorized to perform this operation",
            )
        if operation == "GetSnapshotBlock":
            scope, rate = "get:" + args["snapshot_id"], self.faults.get_rate
        else:
            scope, rate = "list", self.faults.list_rate
        if not self.limiter.allow(scope, rate):
            raise ApiError(
                400, "RequestThrottledException", "ACCOUNT_THROTTLED", "Request rate exceeded"
            )

    def _send_block(self, req: _Handler, args: dict[str, Any]) -> None:
        block = self.store.get_snapshot_block(**args)
        data = block.data()
        faults = self.faults
        req.send_response(200)
        req.send_header("Content-Type", "application/octet-stream")
        req.send_header("Content-Length", str(len(data)))
        req.send_header("x-amz-Data-Length", str(len(data)))
        req.send_header("x-amz-Checksum", block.checksum())
        req.send_header("x-amz-Checksum-Algorithm", "SHA256")
        req.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        req.end_headers()
        dice = self.store.dice
        if dice.chance(faults.stall_rate):
            self.counters.error("Stalled")
            self._stopping.wait(faults.stall_seconds)
        if dice.chance(faults.truncate_rate):
            req.wfile.write(data[: len(data) // 2])
            req.close_connection = True
            req.connection.shutdown(socket.SHUT_RDWR)
            self.counters.error("Truncated")
            return
        if dice.chance(faults.corrupt_rate):
            body = bytearray(data)
            body[dice.randint(0, len(body) - 1)] ^= 0xFF
            req.wfile.write(body)
            self.counters.error("Corrupted")
        else:
            req.wfile.write(data)
        self.counters.block(args["snapshot_id"], int(args["block_index"]), len(data))

    def _send_json(
        self,
        req: _Handler,
        status: int,
        body: dict[str, Any],
        headers: dict[str, str] | None = None,
    ) -> None:
        payload = json.dumps(body).encode()
        req.send_response(status)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(payload)))
        req.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        for name, value in (headers or {}).items():
            req.send_header(name, value)
        req.end_headers()
        req.wfile.write(payload)

    def _send_error(self, req: _Handler, err: ApiError) -> None:
        self.counters.error(err.code)
        body: dict[str, Any] = {"message": err.message}
        if err.reason:
            body["Reason"] = err.reason
        self._send_json(req, err.status, body, {"x-amzn-ErrorType": err.code})

    # ---- control ---------------------------------------------------------------------

    def handle_control(self, req: _Handler) -> None:
        """GET /_emulator/stats, POST /_emulator/reset, GET or POST /_emulator/faults."""
        path = urlsplit(req.path).path
        if path == "/_emulator/stats":
            self._send_json(req, 200, self.counters.snapshot())
        elif path == "/_emulator/reset" and req.command == "POST":
            self.counters.reset()
            self._send_json(req, 200, {})
        elif path == "/_emulator/faults":
            if req.command == "POST":
                length = int(req.headers.get("Content-Length", "0"))
                try:
                    self.faults.update(json.loads(req.rfile.read(length) or b"{}"))
                except (ValueError, TypeError) as err:
                    self._send_json(req, 400, {"message": str(err)})
                    return
            self._send_json(req, 200, self.faults.as_dict())
        else:
            self._send_json(req, 404, {"message": "unknown control path"})
