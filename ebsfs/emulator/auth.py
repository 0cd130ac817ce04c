"""SigV4 verification for the emulator: with known credentials configured, a request
whose signature does not match is refused as the real service refuses it.

The signature is recomputed with botocore's own signer (not ebsfs.service.sigv4), so the
tests that run against the emulator check ebsfs's signer end to end."""

from __future__ import annotations

import re
from collections.abc import Mapping

import botocore.auth
import botocore.awsrequest
import botocore.credentials

from ebsfs.emulator.store import ApiError

_AUTHORIZATION = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<key>[^/,\s]+)/(?P<day>\d{8})/(?P<region>[^/]+)/"
    r"(?P<service>[^/]+)/aws4_request,\s*SignedHeaders=(?P<signed>[a-z0-9;-]+),\s*"
    r"Signature=(?P<signature>[0-9a-f]{64})$"
)


def _parse(authorization: str) -> re.Match[str]:
    m = _AUTHORIZATION.match(authorization)
    if m is None:
        raise ApiError(
            403,
            "IncompleteSignatureException",
            "",
            "Authorization header requires a valid AWS4-HMAC-SHA256 signature",
        )
    return m


def access_key_of(authorization: str) -> str:
    """The access key id of a well-formed SigV4 Authorization header, else 403."""
    return _parse(authorization)["key"]


def verify_signature(
    method: str,
    path_and_query: str,
    headers: Mapping[str, str],
    secret_keys: Mapping[str, str],
    body: bytes = b"",
) -> None:
    """Raise the service's 403 unless the request is signed with a known key's secret.
    `headers` are keyed by lower-case name; `body` is signed too (EC2's form)."""
    m = _parse(headers.get("authorization", ""))
    secret = secret_keys.get(m["key"])
    if secret is None:
        raise ApiError(
            403,
            "UnrecognizedClientException",
            "",
            "The security token included in the request is invalid.",
        )
    amz_date = headers.get("x-amz-date", "")
    signed = m["signed"].split(";")
    if "host" not in signed or not amz_date.startswith(m["day"]):
        raise ApiError(
            403,
            "IncompleteSignatureException",
            "",
            "Host and X-Amz-Date must be signed, for the day of the scope",
        )
    request = botocore.awsrequest.AWSRequest(
        method=method,
        url=f"http://{headers.get('host', '')}{path_and_query}",
        headers={name: headers.get(name, "") for name in signed},
        data=body,
    )
    request.context["timestamp"] = amz_date
    credentials = botocore.credentials.Credentials(
        m["key"], secret, headers.get("x-amz-security-token")
    )
    signer = botocore.auth.SigV4Auth(credentials, m["service"], m["region"])
    expected = signer.signature(
        signer.string_to_sign(request, signer.canonical_request(request)), request
    )
    if expected != m["signature"]:
        raise ApiError(
            403,
            "InvalidSignatureException",
            "",
            "The request signature we calculated does not match the signature you provided.",
        )
