"""The only module that talks to boto3: the EbsApi of api.py over boto3 and a direct
signed GET path, timeouts, and the mapping of botocore errors to ebsfs's typed errors."""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import boto3
import botocore.config
import botocore.exceptions
import botocore.httpsession
import botocore.session
import urllib3.exceptions

from ebsfs.constants import __version__
from ebsfs.constants import BLOCK_SIZE, CONNECT_TIMEOUT, GIB, MAX_CONNECTIONS, REQUEST_TIMEOUT
from ebsfs.engine.stats import Stats
from ebsfs.errors import (
    CertificateUntrusted,
    CredentialRefreshFailed,
    CredentialsMissing,
    EndpointUnreachable,
    Throttled,
    TransientError,
    UserInputError,
    service_error,
)
from ebsfs.service import http1
from ebsfs.service.api import MAX_RESULTS, Block, BlockPage, ChangedBlock, ChangedPage, verify_block
from ebsfs.service.retry import RetryPolicy
from ebsfs.service.sigv4 import Credentials, GetSigner

log = logging.getLogger(__name__)
T = TypeVar("T")

NO_CREDENTIALS = (
    "no AWS credentials found (environment, --profile, config files, instance role)"
)
CREDENTIAL_HINT = (
    "reads fail with EIO until they can: check the profile's credential_process, "
    "run `aws sso login` for an SSO profile, or check the instance role and its "
    "metadata service"
)
CREDENTIAL_ERRORS = (
    botocore.exceptions.CredentialRetrievalError, botocore.exceptions.TokenRetrievalError,
    botocore.exceptions.MetadataRetrievalError, botocore.exceptions.SSOError,
    botocore.exceptions.RefreshWithMFAUnsupportedError,
    botocore.exceptions.PartialCredentialsError,
)
"""botocore's failures to obtain or refresh credentials (as opposed to AWS refusing them)."""


@dataclass
class ConnectionOptions:
    """Where and as whom to connect; unset fields fall back to the AWS chain."""

    region: str | None = None
    profile: str | None = None
    endpoint_url: str | None = None
    max_connections: int = MAX_CONNECTIONS
    connect_timeout: float = CONNECT_TIMEOUT
    read_timeout: float = REQUEST_TIMEOUT
    direct_get: bool = True
    """GetSnapshotBlock through our own HTTP/1.1 client where it can (no proxy in the
    way); False sends every call through boto3 (`--no-direct-get`)."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)


class BotoEbsApi:
    """EbsApi over one boto3 client (thread-safe; shared by all worker threads).

    botocore's own retries are off: they cannot cover reading the body, and two layers
    of retries multiply. RetryPolicy is the one place that decides."""

    def __init__(self, options: ConnectionOptions, stats: Stats | None = None) -> None:
        self._retry = options.retry
        self.stats = stats or Stats()
        """Requests sent, retries and throttles counted (the engine's stats)."""
        self.get_throttles = 0
        """GetSnapshotBlock answers of RequestThrottledException so far (EbsApi)."""
        config = botocore.config.Config(
            retries={"mode": "standard", "total_max_attempts": 1},
            max_pool_connections=options.max_connections,
            connect_timeout=options.connect_timeout,
            read_timeout=options.read_timeout,
            user_agent_extra="ebsfs",
        )
        try:
            # A botocore session of our own: its resolved ca_bundle is public API.
            core = botocore.session.Session(profile=options.profile)
            # boto3 reads AWS_DEFAULT_REGION but not AWS_REGION, which the AWS CLI and
            # the other SDKs honour.
            region = options.region or os.environ.get("AWS_REGION") or None
            session = boto3.session.Session(botocore_session=core, region_name=region)
            self._client = session.client("ebs", endpoint_url=options.endpoint_url, config=config)
            self._credentials = CredentialSource(session)
            self.region: str | None = self._client.meta.region_name
            self.endpoint_url: str = self._client.meta.endpoint_url
            """Where calls go, as resolved (recorded in `ebsfs get` manifests)."""
            ca_file = botocore_ca_file(core)
            self.core_session = core
        except botocore.exceptions.ProfileNotFound as err:
            raise UserInputError(f"AWS profile not found: {options.profile}") from err
        except botocore.exceptions.NoRegionError as err:
            raise UserInputError(
                "no AWS region configured: pass --region or set AWS_REGION"
            ) from err
        except ValueError as err:  # a malformed endpoint URL
            raise UserInputError(f"invalid endpoint URL: {err}") from err
        self._direct: DirectBlockGetter | None = None
        if not _proxy_configured():
            self._direct = DirectBlockGetter(self._credentials, self._client, options, ca_file)

    def _retried_get(self, what: str, attempt: Callable[[], T]) -> T:
        """RetryPolicy around one GET attempt, counting throttling answers on the way."""

        def counted() -> T:
            try:
                return attempt()
            except Throttled:
                self.get_throttles += 1  # a lost update under a race only delays the back-off
                raise

        return self._retry.call(what, self.stats.counting("GetSnapshotBlock", counted))

    def _call(self, operation: str, **params: Any) -> dict[str, Any]:
        def attempt() -> dict[str, Any]:
            # Resolve (and refresh) credentials first, so their failures are typed and
            # retried like the service's instead of escaping from botocore's signer.
            self._credentials.frozen()
            try:
                return getattr(self._client, operation)(**params)
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError,
                    urllib3.exceptions.HTTPError) as err:
                raise _boto_error(err) from err

        name = "".join(part.capitalize() for part in operation.split("_"))
        return self._retry.call(operation, self.stats.counting(name, attempt))

    def list_snapshot_blocks(
        self, snapshot_id: str, start_index: int = 0, next_token: str | None = None,
        max_results: int = MAX_RESULTS,
    ) -> BlockPage:
        r = self._call("list_snapshot_blocks", SnapshotId=snapshot_id,
                       **_paging(start_index, next_token, max_results))
        return BlockPage(
            blocks=[(b["BlockIndex"], b["BlockToken"]) for b in r.get("Blocks", [])],
            **_page_fields(r),
        )

    def list_changed_blocks(
        self, first_id: str, second_id: str, start_index: int = 0,
        next_token: str | None = None, max_results: int = MAX_RESULTS,
    ) -> ChangedPage:
        r = self._call("list_changed_blocks", FirstSnapshotId=first_id,
                       SecondSnapshotId=second_id,
                       **_paging(start_index, next_token, max_results))
        return ChangedPage(
            changes=[
                ChangedBlock(c["BlockIndex"], c.get("FirstBlockToken"), c.get("SecondBlockToken"))
                for c in r.get("ChangedBlocks", [])
            ],
            **_page_fields(r),
        )

    def get_snapshot_block(self, snapshot_id: str, index: int, token: str,
                           into: memoryview | None = None) -> Block:
        """The verified bytes of one block. The GET and the body read are retried
        together: botocore's retries end when the headers arrive."""
        what = f"GetSnapshotBlock {snapshot_id}:{index}"
        direct = self._direct
        if direct is not None:
            return self._retried_get(what, lambda: direct.get(snapshot_id, index, token, into))

        def attempt() -> Block:
            self._credentials.frozen()
            try:
                r = self._client.get_snapshot_block(
                    SnapshotId=snapshot_id, BlockIndex=index, BlockToken=token
                )
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError,
                    urllib3.exceptions.HTTPError) as err:
                raise _boto_error(err) from err
            stream = r["BlockData"]
            try:
                data = stream.read()
            except (botocore.exceptions.BotoCoreError, urllib3.exceptions.HTTPError,
                    OSError) as err:
                raise TransientError(f"reading block {index} failed: {err}") from err
            finally:
                stream.close()
            checksum = r.get("Checksum", "")
            verify_block(data, checksum, r.get("ChecksumAlgorithm", ""), r.get("DataLength", -1))
            if into is None:
                return Block(data, checksum)
            into[:] = data
            return Block(into, checksum)

        return self._retried_get(what, attempt)


class CredentialSource:
    """The session's credential chain (botocore refreshes temporary credentials in
    it), with every way it can fail turned into a typed error: a failed refresh must
    become EIO for one read, never an exception that ends the mount."""

    def __init__(self, session: boto3.session.Session) -> None:
        try:
            self._credentials = session.get_credentials()
        except botocore.exceptions.ProfileNotFound:
            raise
        except Exception as err:
            raise credential_failure(err) from err

    def frozen(self) -> Credentials:
        """Current credentials, refreshed when near expiry (botocore's rule)."""
        if self._credentials is None:
            raise CredentialsMissing(NO_CREDENTIALS)
        try:
            frozen = self._credentials.get_frozen_credentials()
        except Exception as err:  # a provider may run any code: a process, HTTP, files
            raise credential_failure(err) from err
        return Credentials(frozen.access_key, frozen.secret_key, frozen.token)


def credential_failure(err: Exception) -> CredentialRefreshFailed | CredentialsMissing:
    """The typed error, with what to fix, for a failure of the credential chain."""
    if isinstance(err, botocore.exceptions.NoCredentialsError):
        return CredentialsMissing(NO_CREDENTIALS)
    detail = " ".join(f"{type(err).__name__}: {err}".split())
    if len(detail) > 300:
        detail = detail[:297] + "..."
    return CredentialRefreshFailed(f"AWS credentials could not be refreshed ({detail}); "
                                   f"{CREDENTIAL_HINT}")


def botocore_ca_file(session: botocore.session.Session) -> str:
    """The CA bundle botocore verifies the endpoint with: the profile's or
    AWS_CA_BUNDLE's ca_bundle, else REQUESTS_CA_BUNDLE, else its default bundle
    (certifi's). The direct GET path trusts exactly this, so both paths agree."""
    verify = session.get_config_variable("ca_bundle") or os.environ.get("REQUESTS_CA_BUNDLE")
    return str(botocore.httpsession.get_cert_path(verify or True))


def _tls_context(ca_file: str) -> ssl.SSLContext:
    try:
        if os.path.isdir(ca_file):
            return ssl.create_default_context(capath=ca_file)
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as err:
        raise UserInputError(
            f"cannot load the CA bundle {ca_file} (from ca_bundle in the profile, "
            f"AWS_CA_BUNDLE or REQUESTS_CA_BUNDLE): {getattr(err, 'strerror', None) or err}"
        ) from err


def _paging(start_index: int, next_token: str | None, max_results: int) -> dict[str, Any]:
    """Paging parameters: the service ignores StartingBlockIndex once a NextToken is given."""
    if next_token:
        return {"MaxResults": max_results, "NextToken": next_token}
    return {"MaxResults": max_results, "StartingBlockIndex": start_index}


def _page_fields(r: dict[str, Any]) -> dict[str, Any]:
    """What every list page carries besides its entries."""
    return {
        "next_token": r.get("NextToken") or None,
        "expiry": r["ExpiryTime"].timestamp() if "ExpiryTime" in r else float("inf"),
        "volume_size": r["VolumeSize"] * GIB,
        "block_size": r.get("BlockSize", BLOCK_SIZE),
    }


def _proxy_configured() -> bool:
    """botocore honours proxy settings; the direct path does not, so it steps aside."""
    names = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY")
    return any(os.environ.get(n) or os.environ.get(n.lower()) for n in names)


class DirectBlockGetter:
    """GetSnapshotBlock without botocore's per-call machinery.

    Why not boto3 here: a botocore call costs about 2.8 ms of CPU (endpoint rules,
    event hooks, user-agent building, URL re-encoding, parsing), and it all runs under
    the GIL, so one process tops out near 350 calls/s (180 MB/s) whatever the latency.
    This path keeps what matters from botocore, its credential chain (refreshing
    credentials included) and its resolved endpoint, signs with ebsfs.service.sigv4 (checked
    against botocore's signer, at a ninth of its cost), and sends the request on a
    keep-alive connection per worker thread (ebsfs/service/http1.py), receiving the body
    straight into the cache (docs/performance.md). List calls, rare and small, stay on
    boto3.
    """

    def __init__(self, credentials: CredentialSource, client: Any,
                 options: ConnectionOptions, ca_file: str) -> None:
        endpoint = urllib.parse.urlsplit(client.meta.endpoint_url)
        self._https = endpoint.scheme == "https"
        self._host = endpoint.hostname or ""
        self._port = endpoint.port or (443 if self._https else 80)
        self._base_path = endpoint.path.rstrip("/")
        self._url = f"{endpoint.scheme}://{endpoint.netloc}{self._base_path}"
        default_port = 443 if self._https else 80
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._host_header = host if self._port == default_port else f"{host}:{self._port}"
        self._signer = GetSigner("ebs", client.meta.region_name)
        self._credentials = credentials
        self._timeout = (options.connect_timeout, options.read_timeout)
        self._ssl = _tls_context(ca_file) if self._https else None
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
        headers = self._signer.headers(self._credentials.frozen(), self._host_header,
                                       path, query)
        headers["Host"] = self._host_header
        headers["User-Agent"] = self._user_agent
        return headers

    def get(self, snapshot_id: str, index: int, token: str,
            into: memoryview | None = None) -> Block:
        """One attempt: the verified block (received straight into `into` when given),
        or a typed error."""
        path = (f"{self._base_path}/snapshots/{urllib.parse.quote(snapshot_id, safe='')}"
                f"/blocks/{index}")
        query = f"blockToken={urllib.parse.quote(token, safe='')}"
        headers = self._signed_headers(path, query)
        try:
            response = self._connection().get(f"{path}?{query}", headers, into)
        except OSError as err:
            self._drop_connection()
            if isinstance(err, ssl.SSLCertVerificationError):
                raise _untrusted(self._url, err) from err
            if isinstance(err, ConnectionRefusedError | socket.gaierror):
                raise EndpointUnreachable(f"cannot reach {self._url}: {err}") from err
            raise TransientError(f"GetSnapshotBlock {index}: {type(err).__name__}: {err}") from err
        if response.will_close:
            self._drop_connection()
        answer = response.headers
        body = into if response.body is None else response.body
        if response.status != 200:
            raise _error_from_response(response.status, answer.get("x-amzn-errortype"),
                                       response.body or b"")
        assert body is not None
        try:
            length = int(answer.get("x-amz-data-length") or -1)
        except ValueError:
            length = -1
        checksum = answer.get("x-amz-checksum") or ""
        verify_block(body, checksum, answer.get("x-amz-checksum-algorithm") or "", length)
        if into is None or body is into:
            return Block(body, checksum)
        into[:] = body  # an answer of another length fails verification before this
        return Block(into, checksum)


def _error_from_response(status: int, error_type: str | None, body: bytes) -> Exception:
    """A REST-JSON error answer as the typed exception botocore's path would give."""
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    code = (error_type or data.get("__type") or data.get("code") or "").split(":")[0]
    code = code.rsplit("#", 1)[-1]
    message = str(data.get("message") or data.get("Message") or "")
    return _answer_error(status, code, str(data.get("Reason") or ""), message)


def _answer_error(status: int, code: str, reason: str, message: str) -> Exception:
    """An error answer of the service: 5xx (or no error type at all) is worth
    retrying, the rest maps to its typed error."""
    if status >= 500 or not code:
        return TransientError(f"{code or 'HTTP'} {status}: {message}")
    return service_error(code, reason, message)


def _boto_error(err: Exception) -> Exception:
    """A botocore or urllib3 failure as the typed ebsfs error."""
    if isinstance(err, botocore.exceptions.ClientError):
        response = err.response
        return _answer_error(
            response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0),
            response.get("Error", {}).get("Code", ""),
            str(response.get("Reason", "") or ""),
            response.get("Error", {}).get("Message", ""),
        )
    if isinstance(err, (botocore.exceptions.NoCredentialsError, *CREDENTIAL_ERRORS)):
        return credential_failure(err)
    if isinstance(err, botocore.exceptions.SSLError) and "CERTIFICATE_VERIFY_FAILED" in str(err):
        return _untrusted(str(err.kwargs.get("endpoint_url", "")), err)
    if isinstance(err, botocore.exceptions.EndpointConnectionError
                  | botocore.exceptions.ConnectTimeoutError):
        return EndpointUnreachable(f"cannot reach {err.kwargs.get('endpoint_url')}")
    return TransientError(f"{type(err).__name__}: {err}")


def _untrusted(url: str, err: Exception) -> CertificateUntrusted:
    """The one message for a certificate that does not verify, from either GET path."""
    parts = urllib.parse.urlsplit(url)
    detail = getattr(err, "verify_message", "")
    if not detail:
        found = re.search(r"certificate verify failed: ([^(]+)", str(err))
        detail = found[1].strip() if found else "certificate verify failed"
    return CertificateUntrusted(
        f"the TLS certificate of {parts.scheme}://{parts.netloc} is not trusted ({detail}); "
        "set AWS_CA_BUNDLE (or ca_bundle in the profile) to the CA bundle that signs it"
    )
