"""The direct GetSnapshotBlock path: a signed GET on a pooled keep-alive connection
(sigv4.py + http1.py + connections.py) instead of a botocore call, reopened at once when
the server had closed it; the list calls' transport too (listsend.py); and the rule for when
it may be used (not when the user turns it off, not when a proxy applies to the endpoint)."""

from __future__ import annotations

import logging
import os
import platform
import socket
import ssl
import traceback
import urllib.parse
import urllib.request
from collections.abc import Callable

from ebsfs.constants import __version__
from ebsfs.errors import (
    EbsfsError,
    EndpointUnreachable,
    TransientError,
    UserInputError,
)
from ebsfs.service import connections, http1
from ebsfs.service.api import Block, verify_block
from ebsfs.service.connections import given_up
from ebsfs.service.failures import redact, rest_json_error, untrusted
from ebsfs.service.session import ConnectionOptions, CredentialSource
from ebsfs.service.sigv4 import GetSigner

log = logging.getLogger(__name__)


def why_not_direct(options: ConnectionOptions, endpoint_url: str) -> str | None:
    """Why GetSnapshotBlock must go through botocore, or None when the direct path
    may take it: the user said so, or a proxy applies to the endpoint (botocore
    honours proxies; the direct path does not speak to them)."""
    if not options.direct_get:
        return "direct GETs turned off (--no-direct-get)"
    variable = proxy_variable(endpoint_url)
    if variable is not None:
        host = urllib.parse.urlsplit(endpoint_url).netloc
        return f"{variable} applies to {host} (and no_proxy does not exempt it)"
    return None


def proxy_variable(url: str) -> str | None:
    """The proxy setting that applies to `url` under the standard environment rules,
    named by its variable (`https_proxy` or `http_proxy`, either case), or None.
    no_proxy/NO_PROXY exempts hosts by name, domain suffix, host:port or `*`. These are
    urllib.request's rules as botocore applies them: by the URL's scheme only, so
    all_proxy (which boto3 ignores) does not turn the direct path off either; both
    paths go where boto3 would."""
    proxies = urllib.request.getproxies_environment()
    parts = urllib.parse.urlsplit(url)
    bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
    if bypass(parts.netloc, proxies):
        return None
    return f"{parts.scheme}_proxy" if proxies.get(parts.scheme) else None


class DirectBlockGetter:
    """GetSnapshotBlock without botocore's per-call machinery.

    Why not boto3 here: a botocore call costs about 2.8 ms of CPU (endpoint rules,
    event hooks, user-agent building, URL re-encoding, parsing), and it all runs under
    the GIL, so one process tops out near 350 calls/s (180 MB/s) whatever the latency.
    This path keeps what matters from botocore, its credential chain (refreshing
    credentials included) and its resolved endpoint, signs with ebsfs.service.sigv4
    (checked against botocore's signer, at a ninth of its cost), and sends the request
    on a pooled keep-alive connection (http1.py, connections.py), receiving
    the body straight into the cache (docs/performance.md). List calls are signed
    and parsed by botocore but sent here too (listsend.py), on the same connections.
    """

    def __init__(
        self,
        credentials: CredentialSource,
        endpoint_url: str,
        region: str,
        options: ConnectionOptions,
        ca_file: str,
    ) -> None:
        endpoint = urllib.parse.urlsplit(endpoint_url)
        self._https = endpoint.scheme == "https"
        self._host = endpoint.hostname or ""
        self._port = endpoint.port or (443 if self._https else 80)
        self._base_path = endpoint.path.rstrip("/")
        self._url = f"{endpoint.scheme}://{endpoint.netloc}{self._base_path}"
        default_port = 443 if self._https else 80
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._host_header = host if self._port == default_port else f"{host}:{self._port}"
        self._signer = GetSigner("ebs", region)
        self._credentials = credentials
        self._timeout = (options.connect_timeout, options.read_timeout)
        self._ssl = tls_context(ca_file) if self._https else None
        self._pool = connections.Pool(self._connect, options.connect_timeout)
        self._user_agent = f"ebsfs/{__version__} Python/{platform.python_version()}"

    def _connect(self, seconds: float, handshake_seconds: Callable[[], float]) -> http1.Connection:
        return http1.Connection(
            self._host, self._port, self._ssl, seconds, self._timeout[1], handshake_seconds
        )

    def connections(self) -> dict[str, int | float]:
        """The connection counters (connections.Pool.counters) for the engine's stats."""
        return self._pool.counters()

    def _signed_headers(self, path: str, query: str) -> dict[str, str]:
        headers = self._signer.headers(self._credentials.frozen(), self._host_header, path, query)
        headers["Host"] = self._host_header
        headers["User-Agent"] = self._user_agent
        return headers

    def host_for(self, url: str) -> str | None:
        """The Host header botocore signs for `url` (botocore.auth's _host_from_url:
        lower case, the port only when not the scheme's default, IPv6 in brackets),
        or None when `url` is not on this endpoint (the request is then not ours)."""
        parts = urllib.parse.urlsplit(url)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            return None
        ours = parts.scheme == ("https" if self._https else "http")
        if not ours or parts.hostname != self._host.lower() or port != self._port:
            return None
        return self._host_header

    def get(
        self, snapshot_id: str, index: int, token: str, into: memoryview | None = None
    ) -> Block:
        """One attempt: the verified block (received straight into `into` when given),
        or a typed error."""
        path = (
            f"{self._base_path}/snapshots/{urllib.parse.quote(snapshot_id, safe='')}/blocks/{index}"
        )
        query = f"blockToken={urllib.parse.quote(token, safe='')}"
        headers = self._signed_headers(path, query)
        what = f"GetSnapshotBlock {index}"
        response = self.send(what, f"{path}?{query}", headers, into, secret=token)
        answer = response.headers
        body = into if response.body is None else response.body
        if response.status != 200:
            raise rest_json_error(
                response.status, answer.get("x-amzn-errortype"), response.body or b""
            )
        assert body is not None
        stated = answer.get("x-amz-data-length") or ""
        plain = stated.isascii() and stated.isdigit() and len(stated) <= 18
        length = int(stated) if plain else -1
        checksum = answer.get("x-amz-checksum") or ""
        verify_block(body, checksum, answer.get("x-amz-checksum-algorithm") or "", length)
        if into is None or body is into:
            return Block(body, checksum)
        into[:] = body  # an answer of another length fails verification before this
        return Block(into, checksum)

    def send(
        self,
        what: str,
        target: str,
        headers: dict[str, str],
        into: memoryview | None = None,
        limit: int = http1.MAX_BODY,
        secret: str | None = None,
    ) -> http1.Response:
        """One signed GET on this thread's connection (`what` names it in messages,
        `secret` is kept out of them): the answer, or a typed error. A connection the
        server had closed while it sat idle is replaced and the GET sent again at once,
        once (http1.Connection.went_stale), not as a retry: no back-off, not counted."""
        gone = http1.current_abandon()
        if gone is not None and gone.fired:
            raise given_up(what)
        try:
            return self._exchange(what, target, headers, into, limit, gone)
        except OSError as err:
            # The failed exchange's buffers (a body of up to `limit` bytes) are freed
            # now: the exception's frames would keep them until the garbage collector
            # breaks the cycle botocore's frames make with it, one per attempt.
            traceback.clear_frames(err.__traceback__)
            if gone is not None and gone.fired:
                raise given_up(what) from err
            raise self._failure(what, err, secret) from err

    def _exchange(
        self,
        what: str,
        target: str,
        headers: dict[str, str],
        into: memoryview | None,
        limit: int,
        gone: http1.Abandon | None,
    ) -> http1.Response:
        """The GET on a pooled connection, sent again on a new one if the server had
        closed it; a connection is given back only after a whole exchange, and not
        when the answer says it closes (or the call was abandoned: maybe shut down)."""
        pool = self._pool
        conn = pool.take(what, gone)
        if gone is not None and gone.fired:  # given up while it connected: keep the connection
            pool.give(conn)
            raise given_up(what)
        try:
            response = self._once(conn, target, headers, into, limit, gone)
        except OSError as err:
            pool.discard(conn)
            if not conn.went_stale(err) or (gone is not None and gone.fired):
                raise
            log.debug("a kept-alive connection was closed by the server (%s): reopened", err)
            conn = pool.replace(what, gone)
            try:
                response = self._once(conn, target, headers, into, limit, gone)
            except OSError:
                pool.discard(conn)
                raise
        except BaseException:
            pool.discard(conn)
            raise
        if response.will_close or (gone is not None and gone.fired):
            pool.discard(conn)
        else:
            pool.give(conn)
        return response

    @staticmethod
    def _once(
        conn: http1.Connection,
        target: str,
        headers: dict[str, str],
        into: memoryview | None,
        limit: int,
        gone: http1.Abandon | None,
    ) -> http1.Response:
        if gone is None:
            return conn.get(target, headers, into, limit)
        with gone.hook(conn.abort):  # a read that gives up ends the exchange at once
            return conn.get(target, headers, into, limit)

    def _failure(self, what: str, err: OSError, secret: str | None) -> EbsfsError:
        """A transport failure as the typed error the boto3 path gives for it (its
        message without `secret`: a hostile server may echo the request)."""
        if isinstance(err, ssl.SSLCertVerificationError):
            return untrusted(self._url, err)
        if isinstance(err, ConnectionRefusedError | socket.gaierror):
            return EndpointUnreachable(f"cannot reach {self._url}: {err}")
        return TransientError(redact(f"{what}: {type(err).__name__}: {err}", secret))


def tls_context(ca_file: str) -> ssl.SSLContext:
    """A context that trusts exactly botocore's CA bundle (a file or a directory)."""
    try:
        if os.path.isdir(ca_file):
            return ssl.create_default_context(capath=ca_file)
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as err:
        raise UserInputError(
            f"cannot load the CA bundle {ca_file} (from ca_bundle in the profile, "
            f"AWS_CA_BUNDLE or REQUESTS_CA_BUNDLE): {getattr(err, 'strerror', None) or err}"
        ) from err
