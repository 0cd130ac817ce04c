"""The direct GetSnapshotBlock path: a signed GET on a keep-alive connection per worker
thread (sigv4.py + http1.py) instead of a botocore call, and the rule for when it may
be used (not when the user turns it off, not when a proxy applies to the endpoint)."""

from __future__ import annotations

import os
import platform
import socket
import ssl
import threading
import urllib.parse
import urllib.request

from ebsfs.constants import __version__
from ebsfs.errors import EndpointUnreachable, ReadFailed, TransientError, UserInputError
from ebsfs.service import http1
from ebsfs.service.api import Block, verify_block
from ebsfs.service.failures import rest_json_error, untrusted
from ebsfs.service.session import ConnectionOptions, CredentialSource
from ebsfs.service.sigv4 import GetSigner


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
    on a keep-alive connection per worker thread (ebsfs/service/http1.py), receiving
    the body straight into the cache (docs/performance.md). List calls, rare and
    small, stay on boto3.
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
        self._local = threading.local()
        self._user_agent = f"ebsfs/{__version__} Python/{platform.python_version()}"

    def _connection(self) -> http1.Connection:
        conn: http1.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = http1.Connection(self._host, self._port, self._ssl, *self._timeout)
            self._local.conn = conn
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()

    def _signed_headers(self, path: str, query: str) -> dict[str, str]:
        headers = self._signer.headers(self._credentials.frozen(), self._host_header, path, query)
        headers["Host"] = self._host_header
        headers["User-Agent"] = self._user_agent
        return headers

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
        gone = http1.current_abandon()
        if gone is not None and gone.fired:
            raise abandoned(index)
        try:
            conn = self._connection()
            if gone is None:
                response = conn.get(f"{path}?{query}", headers, into)
            else:  # a read that gives up ends the exchange at once (remote.in_worker)
                with gone.hook(conn.abort):
                    response = conn.get(f"{path}?{query}", headers, into)
        except OSError as err:
            self._drop_connection()
            if gone is not None and gone.fired:
                raise abandoned(index) from err
            if isinstance(err, ssl.SSLCertVerificationError):
                raise untrusted(self._url, err) from err
            if isinstance(err, ConnectionRefusedError | socket.gaierror):
                raise EndpointUnreachable(f"cannot reach {self._url}: {err}") from err
            raise TransientError(f"GetSnapshotBlock {index}: {type(err).__name__}: {err}") from err
        if response.will_close or (gone is not None and gone.fired):  # maybe shut down
            self._drop_connection()
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


def abandoned(index: int) -> ReadFailed:
    """What a GET nobody waits for any more ends with: not retried."""
    return ReadFailed(f"GetSnapshotBlock {index}: given up, the read that asked for it is gone")


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
