"""The emulator's HTTP side: the EBS direct API wire format (REST-JSON), fault
injection around each call, EC2 DescribeSnapshots (a form POST, see ec2.py) and a small
control endpoint (/_emulator/...) for tests."""

from __future__ import annotations

import json
import logging
import re
import socket
import ssl
import threading
import time
import uuid
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ebsfs.emulator import ec2
from ebsfs.emulator.auth import access_key_of, verify_signature
from ebsfs.emulator.faults import Counters, Faults, RateLimiter
from ebsfs.emulator.store import ApiError, SnapshotStore
from ebsfs.emulator.wire import Handler, HttpServer, ServerProfile

__all__ = ["EmulatorServer", "ServerProfile"]

log = logging.getLogger(__name__)

_LIST = re.compile(r"^/snapshots/([^/]+)/blocks$")
_GET = re.compile(r"^/snapshots/([^/]+)/blocks/([^/]+)$")
_CHANGED = re.compile(r"^/snapshots/([^/]+)/changedblocks$")


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
        Nagle, a slow accept loop, a short listen queue, keep-alive connections closed
        after N answers or when idle (ServerProfile)."""
        self.profile = profile
        self.store = store or SnapshotStore()
        self.ec2 = ec2.DescribeSnapshots(self.store)
        self._tls: ssl.SSLContext | None = None
        if tls is not None:
            self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._tls.load_cert_chain(*tls)
        self.counters = Counters()
        self.limiter = RateLimiter()
        self._host, self._port = host, port
        self._httpd: HttpServer | None = None
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
        self._httpd = HttpServer((self._host, self._port), self, self._tls, self.profile)
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
        self._httpd = HttpServer((self._host, self._port), self, self._tls, self.profile)
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

    def handle_api(self, req: Handler) -> None:
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
        served_at_once = operation == "GetSnapshotBlock"
        if served_at_once:
            self.counters.get_started()
        try:
            self._admit(req, operation, args)
            faults = self.faults
            delay = self._delay(operation)
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
        finally:
            if served_at_once:
                self.counters.get_ended()

    def _delay(self, operation: str) -> float:
        """Seconds this call waits: the latency, its jitter, and for the slow tail's
        share of calls all that times its factor (a heavy tail: one slow call in a
        hundred is what a sequential reader waits behind)."""
        faults, dice = self.faults, self.store.dice
        delay = faults.latency
        if faults.jitter:
            delay += dice.uniform(0, faults.jitter)
        slow = dice.chance(faults.slow_share)
        if slow:
            delay *= faults.slow_factor
            log.debug("slow tail: %s waits %.3fs (x%g)", operation, delay, faults.slow_factor)
        self.counters.delayed(delay, slow)
        return delay

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

    def _admit(self, req: Handler, operation: str, args: dict[str, Any]) -> None:
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

    def _send_block(self, req: Handler, args: dict[str, Any]) -> None:
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
        req: Handler,
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

    def _send_error(self, req: Handler, err: ApiError) -> None:
        self.counters.error(err.code)
        body: dict[str, Any] = {"message": err.message}
        if err.reason:
            body["Reason"] = err.reason
        self._send_json(req, err.status, body, {"x-amzn-ErrorType": err.code})

    # ---- POST: EC2, control -----------------------------------------------------------

    def handle_post(self, req: Handler) -> None:
        """A POST is the control endpoint's, EC2's (a form with an Action: boto3 sends
        EC2 calls here too when AWS_ENDPOINT_URL is set), or no operation we know."""
        if urlsplit(req.path).path.startswith("/_emulator/"):
            self.handle_control(req)
            return
        length = req.headers.get("Content-Length", "0")
        if not length.isdigit() or int(length) > ec2.MAX_BODY:
            req.close_connection = True  # the body is left unread
            self._send_json(req, 413, {"message": "request body too large"})
            return
        body = req.rfile.read(int(length))
        form = ec2.parse_form(body)
        if not ec2.is_ec2_form(req.headers.get("Content-Type", ""), form):
            self._send_error(req, ApiError(404, "UnknownOperationException", "", "Unknown path"))
            return
        action = form["Action"]
        self.counters.call(action if action == "DescribeSnapshots" else "Ec2OtherAction")
        try:
            self._admit_ec2(req, body)
            delay = self._delay(action)  # EC2 answers over the same network
            if delay > 0:
                time.sleep(delay)
            payload, status = self.ec2.answer(form), 200
        except ec2.Ec2Error as err:
            self.counters.error(err.code)
            payload, status = ec2.error_body(err), err.status
        req.send_response(status)
        req.send_header("Content-Type", "text/xml;charset=UTF-8")
        req.send_header("Content-Length", str(len(payload)))
        req.end_headers()
        req.wfile.write(payload)

    def _admit_ec2(self, req: Handler, body: bytes) -> None:
        """Signatures and denied keys as for the EBS calls, answered in EC2's words;
        no quotas or injected faults (those are the EBS direct API's)."""
        try:
            key = access_key_of(req.headers.get("Authorization", ""))
            if self.faults.secret_keys:
                headers = {name.lower(): value for name, value in req.headers.items()}
                verify_signature(req.command, req.path, headers, self.faults.secret_keys, body)
        except ApiError as err:
            status, code = ec2.AUTH_ERRORS[err.code]
            raise ec2.Ec2Error(status, code, err.message) from None
        if key in self.faults.deny_access_keys:
            raise ec2.Ec2Error(
                403, "UnauthorizedOperation", "You are not authorized to perform this operation."
            )

    # ---- control ---------------------------------------------------------------------

    def handle_control(self, req: Handler) -> None:
        """GET /_emulator/stats, POST /_emulator/reset, GET or POST /_emulator/faults.
        A POST's body is read whatever the path: left unread, it would be taken for
        the connection's next request."""
        path = urlsplit(req.path).path
        length = req.headers.get("Content-Length", "0")
        body = req.rfile.read(int(length)) if req.command == "POST" and length.isdigit() else b""
        if path == "/_emulator/stats":
            self._send_json(req, 200, self.counters.snapshot())
        elif path == "/_emulator/reset" and req.command == "POST":
            self.counters.reset()
            self._send_json(req, 200, {})
        elif path == "/_emulator/faults":
            if req.command == "POST":
                try:
                    self.faults.update(json.loads(body or b"{}"))
                except (ValueError, TypeError) as err:
                    self._send_json(req, 400, {"message": str(err)})
                    return
            self._send_json(req, 200, self.faults.as_dict())
        else:
            self._send_json(req, 404, {"message": "unknown control path"})
