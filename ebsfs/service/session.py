"""Where and as whom ebsfs talks to AWS: the connection options, and the one place that
turns them into a botocore session, clients (EBS and EC2), a credential chain and the
CA bundle, with every configuration mistake as a one-line UserInputError.

botocore's own session, not boto3's: boto3's Session only wraps it (a region, and
handlers for resources and S3 transfers we do not use), and importing boto3 costs
about 70 ms of every command's start (s3transfer), which is the mount's start
(issue 25)."""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import botocore.config
import botocore.exceptions
import botocore.httpsession
import botocore.loaders
import botocore.session

from ebsfs.constants import CONNECT_TIMEOUT, MAX_CONNECTIONS, REQUEST_TIMEOUT
from ebsfs.errors import CredentialsMissing, UserInputError
from ebsfs.service.failures import NO_CREDENTIALS, credential_failure
from ebsfs.service.retry import RetryPolicy
from ebsfs.service.sigv4 import Credentials

log = logging.getLogger(__name__)

MODELS = Path(__file__).parent / "models"
"""Service models searched before botocore's own: EC2's cut to the calls ebsfs makes
(models/README.md). botocore's full EC2 model is 5 MB of JSON, and parsing it took
about 105 ms of the 150 ms an EC2 client cost, on the GIL beside the mount's checks
(issue 25: a mount on AWS, which always asks EC2, returned about 0.1 s later)."""
EC2_API_VERSION = "2016-11-15"
EC2_OPERATIONS = ("DescribeSnapshots",)
"""The only EC2 calls ebsfs makes: all that models/ec2 holds."""

_loaders: dict[str, botocore.loaders.Loader] = {}
"""One botocore loader per search path in this process, shared by every session: its
cache of parsed data is then too. Each session made its own, so the EC2 lookup's
session parsed endpoints.json (1.2 MB) and listed botocore's 400 service directories
again, about 40 ms beside the mount's checks. A loader only reads files and caches
what it parsed (botocore shares that between the clients of one session already)."""
_loaders_lock = threading.Lock()

_warned_plain: set[str] = set()
"""Plain-http endpoints warned of in this process: once, however many sessions (the
EBS client's and the EC2 lookup's) reach them."""
_warned_lock = threading.Lock()


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
    """GetSnapshotBlock through our own HTTP/1.1 client unless a proxy applies to the
    endpoint (botocore honours proxies, the direct path does not); False sends every
    call through boto3 (`--no-direct-get`)."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    rate_limiter: Callable[[], None] | None = None
    """Called in the worker thread before every GetSnapshotBlock attempt (retries and
    hedges included), blocking until the call may go: a limit on calls per second
    shared beyond this process (`ebsfs scan`'s cluster-wide quota, fleet/ratelimit.py).
    None: no limit but the service's own throttling."""


def custom_endpoint_set(service: str, endpoint_url: str | None = None) -> bool:
    """Whether calls to `service` ("EBS", "EC2") go to an endpoint other than AWS's:
    `endpoint_url` given, or AWS_ENDPOINT_URL_<SERVICE> or AWS_ENDPOINT_URL set."""
    return bool(
        endpoint_url
        or os.environ.get(f"AWS_ENDPOINT_URL_{service.upper()}")
        or os.environ.get("AWS_ENDPOINT_URL")
    )


class AwsSession:
    """One botocore session for a ConnectionOptions: the profile (`--profile`, else
    AWS_PROFILE), the region (`--region`, else AWS_REGION, else what botocore finds:
    AWS_DEFAULT_REGION, the profile), and the endpoint (`endpoint_url`, else botocore's
    AWS_ENDPOINT_URL_<SERVICE> and AWS_ENDPOINT_URL).

    A session of our own, not boto3's default one: its resolved ca_bundle is public
    API, and sessions are not thread-safe (the clients made from it are)."""

    def __init__(self, options: ConnectionOptions) -> None:
        self._options = options
        with self._user_errors("endpoint URL"):
            self.core = botocore.session.Session(profile=options.profile)
            # Ours after AWS_DATA_PATH's (the user's models win), before botocore's.
            user_paths = self.core.get_config_variable("data_path")
            search = os.pathsep.join(p for p in (user_paths, str(MODELS)) if p)
            self.core.register_component("data_loader", _loader(search))
            # botocore reads AWS_DEFAULT_REGION but not AWS_REGION, which the AWS CLI
            # and the other SDKs honour.
            region = options.region or os.environ.get("AWS_REGION") or None
            if region:
                self.core.set_config_variable("region", region)

    def client(
        self,
        service: str,
        config: botocore.config.Config,
        endpoint_url: str | None = None,
        endpoint_name: str = "endpoint URL",
    ) -> Any:
        """A botocore client of `service` ("ebs", "ec2"); `endpoint_name` names the
        endpoint in the message for a malformed URL."""
        with self._user_errors(endpoint_name):
            client = self.core.create_client(service, endpoint_url=endpoint_url, config=config)
        self._warn_if_plain(str(client.meta.endpoint_url))
        return client

    def _warn_if_plain(self, url: str) -> None:
        """Say once per endpoint and process when calls go over plain http to another host: the
        session token, the signed headers, block tokens and the blocks' bytes then
        cross the network readable by anyone on the path (who may also change the
        answers: checksums come with them). A warning, not a refusal: a lab endpoint
        on a private network is a choice the user can make knowingly; loopback
        (the emulator, an SSH tunnel) never leaves the host and is not warned of."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or is_loopback(parts.hostname or ""):
            return
        with _warned_lock:
            if url in _warned_plain:
                return
            _warned_plain.add(url)
        log.warning(
            "%s is plain http: the session token, signed requests, block tokens and "
            "the snapshot's data cross the network unencrypted and can be read or "
            "changed on the way; use https",
            f"{parts.scheme}://{parts.netloc}",
        )

    def credentials(self) -> CredentialSource:
        with self._user_errors("endpoint URL"):
            return CredentialSource(self.core)

    def ca_file(self) -> str:
        """The CA bundle botocore verifies the endpoint with: the profile's or
        AWS_CA_BUNDLE's ca_bundle, else REQUESTS_CA_BUNDLE, else its default bundle
        (certifi's). The direct GET path trusts exactly this, so both paths agree."""
        verify = self.core.get_config_variable("ca_bundle") or os.environ.get("REQUESTS_CA_BUNDLE")
        return str(botocore.httpsession.get_cert_path(verify or True))

    @contextmanager
    def _user_errors(self, endpoint_name: str) -> Iterator[None]:
        """botocore's configuration errors (raised whenever it first reads the
        profile) as the one-line errors a user can act on."""
        try:
            yield
        except botocore.exceptions.ProfileNotFound as err:
            raise UserInputError(f"AWS profile not found: {self._options.profile}") from err
        except botocore.exceptions.NoRegionError as err:
            raise UserInputError(
                "no AWS region configured: pass --region or set AWS_REGION"
            ) from err
        except ValueError as err:  # a malformed endpoint URL
            raise UserInputError(f"invalid {endpoint_name}: {err}") from err


def _loader(search: str) -> botocore.loaders.Loader:
    with _loaders_lock:
        loader = _loaders.get(search)
        if loader is None:
            loader = _loaders[search] = botocore.loaders.create_loader(search)
        return loader


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) is this machine by definition: localhost
    names and loopback addresses (not resolved: a name's DNS answer proves nothing)."""
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class CredentialSource:
    """The session's credential chain (botocore refreshes temporary credentials in
    it), with every way it can fail turned into a typed error: a failed refresh must
    become EIO for one read, never an exception that ends the mount."""

    def __init__(self, session: botocore.session.Session) -> None:
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
