"""The one mapping of what can go wrong in a call to AWS to ebsfs's typed errors: the
service's error answers (through botocore or the direct GET path alike), botocore's
and urllib3's exceptions, failures of the credential chain and untrusted
certificates. The test fakes use it too, so they fail as the real client does."""

from __future__ import annotations

import json
import re
import urllib.parse

import botocore.exceptions

from ebsfs.errors import (
    CertificateUntrusted,
    CredentialRefreshFailed,
    CredentialsMissing,
    EbsfsError,
    EndpointUnreachable,
    TransientError,
    service_error,
)

NO_CREDENTIALS = "no AWS credentials found (environment, --profile, config files, instance role)"
CREDENTIAL_HINT = (
    "reads fail with EIO until they can: check the profile's credential_process, "
    "run `aws sso login` for an SSO profile, or check the instance role and its "
    "metadata service"
)
CREDENTIAL_ERRORS = (
    botocore.exceptions.CredentialRetrievalError,
    botocore.exceptions.TokenRetrievalError,
    botocore.exceptions.MetadataRetrievalError,
    botocore.exceptions.SSOError,
    botocore.exceptions.RefreshWithMFAUnsupportedError,
    botocore.exceptions.PartialCredentialsError,
)
"""botocore's failures to obtain or refresh credentials (as opposed to AWS refusing them)."""


MAX_MESSAGE = 300
"""Characters of a server's error message kept: it goes into logs and onto terminals."""
_SECRET_PARAMETER = re.compile(
    r"((?:block|page|firstBlock|secondBlock|next)Token|X-Amz-Security-Token|X-Amz-Signature"
    r"|X-Amz-Credential)(=|%3D)[^&\s\"'<>]*",
    re.IGNORECASE,
)


def redact(text: str, *secrets: str | None) -> str:
    """`text` without block and page tokens or signing material: query parameters
    that carry them (botocore's errors quote the request URL), and the given values
    wherever they appear (plain or URL-quoted). Tokens are bearer secrets for a
    snapshot's data for 7 days; messages go to logs, terminals and bug reports."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "<redacted>")
            quoted = urllib.parse.quote(secret, safe="")
            if quoted != secret:
                text = text.replace(quoted, "<redacted>")
    return _SECRET_PARAMETER.sub(r"\1\2<redacted>", text)


def answer_error(status: int, code: str, reason: str, message: str) -> EbsfsError:
    """An error answer of the service (HTTP status, error type, Reason, Message): 5xx
    (or no error type at all) is worth retrying, the rest maps to its typed error.
    The message is the server's text: cut short and redacted."""
    message = redact(message[:MAX_MESSAGE])
    code, reason = code[:100], reason[:100]
    if status >= 500 or not code:
        return TransientError(f"{code or 'HTTP'} {status}: {message}")
    return service_error(code, reason, message)


def rest_json_error(status: int, error_type: str | None, body: bytes) -> EbsfsError:
    """A REST-JSON error answer read off the wire (the direct GET path), mapped as
    botocore's parse of the same answer would be."""
    try:
        data = json.loads(body or b"{}")
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." a million deep
        data = {}
    if not isinstance(data, dict):
        data = {}
    code = str(error_type or data.get("__type") or data.get("code") or "").split(":")[0]
    code = code.rsplit("#", 1)[-1]
    message = str(data.get("message") or data.get("Message") or "")
    return answer_error(status, code, str(data.get("Reason") or ""), message)


def boto_error(err: Exception, *secrets: str | None) -> EbsfsError:
    """A botocore or urllib3 failure (or anything else a boto3 call raised) as the
    typed ebsfs error, its message without tokens (`secrets`: the call's own)."""
    typed = _boto_error(err)
    text = str(typed)
    clean = redact(text, *secrets)
    if clean != text:
        typed.args = (clean, *typed.args[1:])
    return typed


def _boto_error(err: Exception) -> EbsfsError:
    if isinstance(err, botocore.exceptions.ClientError):
        response = err.response
        return answer_error(
            response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0),
            response.get("Error", {}).get("Code", ""),
            str(response.get("Reason", "") or ""),
            response.get("Error", {}).get("Message", ""),
        )
    if isinstance(err, (botocore.exceptions.NoCredentialsError, *CREDENTIAL_ERRORS)):
        return credential_failure(err)
    if isinstance(err, botocore.exceptions.SSLError) and "CERTIFICATE_VERIFY_FAILED" in str(err):
        return untrusted(str(err.kwargs.get("endpoint_url", "")), err)
    if isinstance(
        err, botocore.exceptions.EndpointConnectionError | botocore.exceptions.ConnectTimeoutError
    ):
        return EndpointUnreachable(f"cannot reach {err.kwargs.get('endpoint_url')}")
    return TransientError(f"{type(err).__name__}: {err}")


def credential_failure(err: Exception) -> CredentialRefreshFailed | CredentialsMissing:
    """The typed error, with what to fix, for a failure of the credential chain."""
    if isinstance(err, botocore.exceptions.NoCredentialsError):
        return CredentialsMissing(NO_CREDENTIALS)
    detail = one_line(err)
    if len(detail) > 300:
        detail = detail[:297] + "..."
    return CredentialRefreshFailed(
        f"AWS credentials could not be refreshed ({detail}); {CREDENTIAL_HINT}"
    )


def untrusted(url: str, err: Exception) -> CertificateUntrusted:
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


def one_line(err: BaseException) -> str:
    """`Type: message` with all whitespace runs as single spaces."""
    return " ".join(f"{type(err).__name__}: {err}".split())
