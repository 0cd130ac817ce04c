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
    ServiceError,
    TransientError,
    service_error,
)
from ebsfs.quoting import printable

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


MIN_SECRET = 8
"""Characters a token needs before redact looks for it in a message."""


def redact(text: str, *secrets: str | None) -> str:
    """`text` without block and page tokens or signing material: query parameters
    that carry them (botocore's errors quote the request URL), and the given values
    wherever they appear (plain or URL-quoted). Tokens are bearer secrets for a
    snapshot's data for 7 days; messages go to logs, terminals and bug reports. A
    value shorter than MIN_SECRET is no secret (the service's tokens are about a
    hundred characters) and is left alone: replacing every "t" garbled the message."""
    for secret in secrets:
        if secret and len(secret) >= MIN_SECRET:
            text = text.replace(secret, "<redacted>")
            quoted = urllib.parse.quote(secret, safe="")
            if quoted != secret:
                text = text.replace(quoted, "<redacted>")
    return _SECRET_PARAMETER.sub(r"\1\2<redacted>", text)


def foreign_answer(status: int, content_type: str, body: str) -> EbsfsError | None:
    """An error answer that is not the EBS service's, or None if it may be: the service
    answers errors in JSON with an error type, a web server or a proxy (a wrong
    --endpoint-url) with a page. One line naming the status and what came, never the
    page: 5xx is retried (a proxy's gateway error may pass), the rest is not."""
    kind = content_type.split(";")[0].strip().lower()
    text = body.lstrip()
    if not text or kind.endswith("json") or text.startswith(("{", "[")):
        return None  # an empty body: as before (a 5xx of the service's may have none)
    if text.startswith("<?xml") or (kind.endswith("xml") and "html" not in kind):
        what = "an XML document"
    elif kind == "text/html" or text[:1] == "<":
        what = "an HTML page"
    else:
        what = f"a {printable(kind)[:60]} answer" if kind else "an answer that is not JSON"
    line = f"the endpoint answered HTTP {status} with {what}"
    if status >= 500:  # a proxy or load balancer in front of the right endpoint, maybe
        return TransientError(f"{line}, not the EBS service's error")
    return ServiceError(f"{line}: is --endpoint-url right?", code=f"HTTP {status}")


def answer_error(
    status: int, code: str, reason: str, message: str, content_type: str = ""
) -> EbsfsError:
    """An error answer of the service (HTTP status, error type, Reason, Message): 5xx
    (or no error type at all) is worth retrying, the rest maps to its typed error.
    The message is the server's text: cut short and redacted. An answer with no error
    type (botocore then names it by its status) whose body is not JSON is not the
    service's: foreign_answer."""
    if not code or code.isdigit():
        foreign = foreign_answer(status, content_type, message)
        if foreign is not None:
            return foreign
    message = redact(message[:MAX_MESSAGE])
    code, reason = code[:100], reason[:100]
    if status >= 500 or not code:
        return TransientError(f"{code or 'HTTP'} {status}: {message}")
    return service_error(code, reason, message)


def rest_json_error(
    status: int, error_type: str | None, body: bytes, content_type: str = ""
) -> EbsfsError:
    """A REST-JSON error answer read off the wire (the direct GET path), mapped as
    botocore's parse of the same answer would be."""
    try:
        data = json.loads(body or b"{}")
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." a million deep
        data = None
    if data is None and not error_type:  # not JSON, no error type: not the service's
        foreign = foreign_answer(status, content_type, body[:4096].decode("latin-1"))
        if foreign is not None:
            return foreign
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
        metadata = response.get("ResponseMetadata", {})
        return answer_error(
            metadata.get("HTTPStatusCode", 0),
            response.get("Error", {}).get("Code", ""),
            str(response.get("Reason", "") or ""),
            response.get("Error", {}).get("Message", ""),
            str(metadata.get("HTTPHeaders", {}).get("content-type", "")),
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
