"""Typed errors of the domain, every one of them here: raised below the CLI, turned into
errno by the FUSE face (ebsfs/fuse/operations.py) and into one-line messages and exit
codes by the command line (ebsfs/cli/main.py). Re-exported by `ebsfs`."""

from __future__ import annotations

__all__ = [
    "EbsfsError",
    "UserInputError",
    "BadArgument",
    "ServiceError",
    "SnapshotNotFound",
    "InvalidSnapshotId",
    "AccessDenied",
    "CredentialsRejected",
    "InvalidBlockToken",
    "InvalidPageToken",
    "UnrelatedSnapshots",
    "Throttled",
    "TransientError",
    "ChecksumMismatch",
    "RetriesExhausted",
    "EndpointUnreachable",
    "CertificateUntrusted",
    "CredentialsMissing",
    "CredentialRefreshFailed",
    "ReadFailed",
    "MountFailed",
    "ProtocolError",
    "PartitionTableError",
    "CacheDirError",
    "CacheIndexFailed",
    "MetadataUnavailable",
    "FilesystemUnreadable",
    "OutputError",
    "ManifestError",
    "BaseImageMismatch",
    "VerifyFailed",
]


class EbsfsError(Exception):
    """Base of every error ebsfs reports to a user."""


class UserInputError(EbsfsError):
    """The command line names something that cannot work (bad id, bad option value)."""


class BadArgument(UserInputError, ValueError):
    """A keyword of `ebsfs.open` with a value it cannot take, named: a ValueError as
    Python's own functions raise for one (and a UserInputError, as before)."""


class ServiceError(EbsfsError):
    """The EBS direct API answered with an error.

    `code` is the service's error type (e.g. ValidationException) and `reason` its
    Reason field where the service sends one.
    """

    def __init__(self, message: str, code: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class SnapshotNotFound(ServiceError):
    """The snapshot does not exist, is not in this region, or is not completed."""


class InvalidSnapshotId(ServiceError):
    """The snapshot id is malformed (it must match ^snap-[0-9a-f]+$)."""


class AccessDenied(ServiceError):
    """The credentials may not read this snapshot (IAM, KMS key policy)."""


class CredentialsRejected(ServiceError):
    """AWS does not accept the credentials: unknown access key, wrong secret, expired
    session token, or a clock too far off for the signature."""


class InvalidBlockToken(ServiceError):
    """A block token expired or does not fit the block: list again for a fresh one."""


class InvalidPageToken(ServiceError):
    """A NextToken expired (they live 60 minutes): restart paging from an index."""


class UnrelatedSnapshots(ServiceError):
    """ListChangedBlocks was asked about snapshots of different lineages."""


class Throttled(ServiceError):
    """The service asked us to slow down (RequestThrottledException)."""


class TransientError(EbsfsError):
    """A failure worth retrying: 5xx, dropped connection, short body, bad checksum."""


class ChecksumMismatch(TransientError):
    """A block body did not match its SHA-256 header: the data is not valid."""


class RetriesExhausted(EbsfsError):
    """A call kept failing until its retry budget ran out; readers see EIO."""


class EndpointUnreachable(TransientError):
    """No connection could be made to the endpoint URL (retried: it may come back)."""


class CertificateUntrusted(EbsfsError):
    """The endpoint's TLS certificate does not verify: retrying cannot help."""


class CredentialsMissing(EbsfsError):
    """The AWS credential chain found no credentials."""


class CredentialRefreshFailed(TransientError):
    """Credentials that were there could not be refreshed (a failing credential_process,
    an expired SSO session, a slow instance metadata service): retried, since they
    often come back; a read that runs out of retries gets EIO and the mount lives on."""


class ReadFailed(EbsfsError):
    """A read could not be served (after retries, or past its time limit): EIO."""


class MountFailed(EbsfsError):
    """The kernel mount could not be made."""


class ProtocolError(OSError):
    """The server's answer is not the HTTP/1.1 this client reads (or the connection
    ended early): the connection is useless, the call may be retried."""


class PartitionTableError(EbsfsError):
    """The partition table is damaged or points past the end of the disk."""


class CacheDirError(UserInputError):
    """The cache directory cannot be used: what and why, in one line."""


class CacheIndexFailed(EbsfsError):
    """The disk cache's SQLite index failed in a way retrying will not mend (damaged or
    unwritable): the disk cache turns itself off for the session, reads go on."""


class MetadataUnavailable(EbsfsError):
    """EC2 could not say: no permission, unreachable, or an unknown snapshot."""


class FilesystemUnreadable(EbsfsError):
    """No library here reads this filesystem, or it is damaged: the message says which
    and why, in words a user can act on."""


SERVICE_ERRORS: dict[tuple[str, str], type[ServiceError]] = {
    ("ResourceNotFoundException", ""): SnapshotNotFound,
    ("ValidationException", "INVALID_SNAPSHOT_ID"): InvalidSnapshotId,
    ("ValidationException", "INVALID_BLOCK_TOKEN"): InvalidBlockToken,
    ("ValidationException", "INVALID_PAGE_TOKEN"): InvalidPageToken,
    ("ValidationException", "UNRELATED_SNAPSHOTS"): UnrelatedSnapshots,
    ("AccessDeniedException", ""): AccessDenied,
    ("UnrecognizedClientException", ""): CredentialsRejected,
    ("InvalidClientTokenId", ""): CredentialsRejected,
    ("InvalidSignatureException", ""): CredentialsRejected,
    ("IncompleteSignatureException", ""): CredentialsRejected,
    ("ExpiredTokenException", ""): CredentialsRejected,
    ("SignatureDoesNotMatch", ""): CredentialsRejected,
    ("RequestThrottledException", ""): Throttled,
}

RETRYABLE_CODES = frozenset(
    {"InternalServerException", "ServiceUnavailableException", "InternalFailure"}
)


def service_error(code: str, reason: str, message: str) -> EbsfsError:
    """Map a service error (type, Reason, Message) to the typed exception for it."""
    if code in RETRYABLE_CODES:
        return TransientError(f"{code}: {message}")
    cls = SERVICE_ERRORS.get((code, reason)) or SERVICE_ERRORS.get((code, ""), ServiceError)
    text = f"{code}" + (f" ({reason})" if reason else "") + (f": {message}" if message else "")
    return cls(text, code=code, reason=reason)


def first_leaf(err: BaseException) -> BaseException:
    """The first real error inside (possibly nested) exception groups from trio."""
    while isinstance(err, BaseExceptionGroup) and err.exceptions:
        err = err.exceptions[0]
    return err


class OutputError(EbsfsError):
    """The output of `ebsfs get` (or the image `ebsfs verify` reads) cannot be written or
    read: a missing directory, a full disk, a device too small or in use. What was
    already downloaded is kept: running the same command again resumes."""


class ManifestError(EbsfsError):
    """A manifest (or its per-block side file) is missing, unreadable or not one ebsfs
    wrote."""


class BaseImageMismatch(EbsfsError):
    """The base image of an incremental copy does not match its manifest, or is not of
    an earlier snapshot of the same volume."""


class VerifyFailed(EbsfsError):
    """An image does not match its manifest: `bad` lists (block index, byte offset,
    what is wrong)."""

    def __init__(self, message: str, bad: list[tuple[int, int, str]] | None = None) -> None:
        super().__init__(message)
        self.bad = bad or []
