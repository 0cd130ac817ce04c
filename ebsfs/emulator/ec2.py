"""EC2 DescribeSnapshots for the emulator's snapshots, so that `ebsfs ls`, a mount's
image mtimes and `get`'s manifest work against the emulator as against AWS.

The EC2 Query API: a form-encoded POST (`Action=DescribeSnapshots&Version=...`)
answered in XML, errors as `<Response><Errors><Error>`. It comes to the same endpoint
as the EBS direct API when AWS_ENDPOINT_URL is set; the form's Action tells them apart.
Only this one action: it is the only EC2 call ebsfs makes. Written here rather than
borrowed from moto: moto renders from its own backend objects (volumes, regions,
accounts) and is a test dependency, while the emulator is shipped and runs on the
standard library.
"""

from __future__ import annotations

import datetime
import hashlib
import re
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from urllib.parse import parse_qs

from ebsfs.emulator.store import SNAPSHOT_ID_RE, Snapshot, SnapshotStore, Tokens

NAMESPACE = "http://ec2.amazonaws.com/doc/2016-11-15/"
MAX_BODY = 1 << 20
"""A longer form is refused unread: nothing a client sends for DescribeSnapshots comes
near, and no client makes the emulator hold more."""
PAGE_TOKEN_LIFETIME = 24 * 3600.0
_ILLEGAL_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
"""What XML 1.0 cannot carry (control characters; lone surrogates, which an image's
undecodable file name brings): shown as U+FFFD rather than failing the answer."""


class Ec2Error(Exception):
    """An error answer in EC2's shape: HTTP status, code, message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _invalid(message: str) -> Ec2Error:
    return Ec2Error(400, "InvalidParameterValue", message)


# EBS direct API error types of a failed authentication, in EC2's words.
AUTH_ERRORS = {
    "UnrecognizedClientException": (401, "AuthFailure"),
    "InvalidSignatureException": (403, "SignatureDoesNotMatch"),
    "IncompleteSignatureException": (400, "IncompleteSignature"),
    "AccessDeniedException": (403, "UnauthorizedOperation"),
}


def is_ec2_form(content_type: str, form: Mapping[str, str]) -> bool:
    """Whether a POST is an EC2 Query API call (a form with an Action)."""
    return content_type.startswith("application/x-www-form-urlencoded") and "Action" in form


def parse_form(body: bytes) -> dict[str, str]:
    """The form's fields (the last value of a repeated one)."""
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {name: values[-1] for name, values in fields.items()}


def numbered(form: Mapping[str, str], prefix: str) -> list[str]:
    """`PREFIX.1`, `PREFIX.2`, ... in their numbers' order (the Query API's lists)."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)$")
    found = [(int(m[1]), value) for name, value in form.items() if (m := pattern.match(name))]
    return [value for _, value in sorted(found)]


def filters_of(form: Mapping[str, str]) -> list[tuple[str, list[str]]]:
    """`Filter.N.Name` with its `Filter.N.Value.M`, in N's order."""
    names = re.compile(r"Filter\.(\d+)\.Name$")
    found = sorted((int(m[1]), value) for name, value in form.items() if (m := names.match(name)))
    return [(name, numbered(form, f"Filter.{n}.Value")) for n, name in found]


def _wildcard(pattern: str) -> re.Pattern[str]:
    """EC2's filter values: `*` any run of characters, `?` any one."""
    return re.compile(re.escape(pattern).replace(r"\*", ".*").replace(r"\?", ".") + r"\Z", re.S)


def iso_time(seconds: float) -> str:
    """EC2's timestamps: UTC with milliseconds, e.g. 2023-11-14T22:13:20.250Z."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


_ITEM = [
    ("snapshotId", "snapshot-id"),
    ("volumeId", "volume-id"),
    ("status", "status"),
    ("startTime", "start-time"),
    ("progress", "progress"),
    ("ownerId", "owner-id"),
    ("volumeSize", "volume-size"),
    ("description", "description"),
    ("encrypted", "encrypted"),
    ("storageTier", "storage-tier"),
]
"""The item's elements, in EC2's order, and the filter field each shows."""
FILTERS = frozenset(name for _, name in _ITEM)
"""The filters on the item's own fields (tags, alias and KMS key match nothing here)."""


class DescribeSnapshots:
    """The action over a SnapshotStore: SnapshotId.N, Owner.N, RestorableBy.N,
    Filter.N (with * and ? wildcards), MaxResults and NextToken, as EC2 takes them."""

    def __init__(self, store: SnapshotStore) -> None:
        self.store = store
        self._tokens = Tokens()

    def fields(self, snap: Snapshot) -> dict[str, str]:
        """The item's fields, which the filters also match against."""
        return {
            "snapshot-id": snap.snapshot_id,
            "volume-id": snap.volume_id,
            "status": "completed",
            "start-time": iso_time(snap.start_time),
            "progress": "100%",
            "owner-id": self.store.owner_id,
            "volume-size": str(snap.volume_size_gib),
            "description": snap.description,
            "encrypted": "false",
            "storage-tier": "standard",
        }

    def answer(self, form: Mapping[str, str]) -> bytes:
        """The XML answer, or Ec2Error."""
        action = form.get("Action", "")
        if action != "DescribeSnapshots":
            raise Ec2Error(
                400, "InvalidAction", f"The action {action} is not valid for this web service."
            )
        wanted = numbered(form, "SnapshotId")
        if form.get("DryRun", "").lower() == "true":
            # Authenticated already, and every caller may describe: it would succeed.
            raise Ec2Error(
                412, "DryRunOperation", "Request would have succeeded, but DryRun flag is set."
            )
        limit = self._max_results(form.get("MaxResults"), wanted)
        keep = self._selection(form)
        found = self._by_id(wanted) if wanted else self.store.snapshots()
        matching = [snap for snap in found if keep(snap)]
        query = self._query_key(form)
        start = self._resume(form.get("NextToken"), query)
        end = len(matching) if limit is None else start + limit
        page, more = matching[start:end], end < len(matching)
        token = (
            self._tokens.seal("d", query, end, time.time() + PAGE_TOKEN_LIFETIME) if more else None
        )
        return self._render(page, token)

    def _max_results(self, value: str | None, wanted: list[str]) -> int | None:
        if value is None:
            return None
        if wanted:
            raise Ec2Error(
                400,
                "InvalidParameterCombination",
                "The parameter snapshotSet cannot be used with the parameter maxResults",
            )
        try:
            number = int(value)
        except ValueError:
            number = -1
        if not 5 <= number <= 1000:
            raise _invalid(
                f"Value ( {value} ) for parameter maxResults is invalid. "
                "Expecting a value between 5 and 1000."
            )
        return number

    def _by_id(self, wanted: list[str]) -> list[Snapshot]:
        """The snapshots named, in the store's order; one unknown fails the call."""
        known = {snap.snapshot_id: snap for snap in self.store.snapshots()}
        for snapshot_id in wanted:
            if not snapshot_id:
                raise _invalid(
                    "Value () for parameter snapshotId is invalid. "
                    "Parameter may not be null or empty."
                )
            if not SNAPSHOT_ID_RE.match(snapshot_id) or len(snapshot_id) > 64:
                raise _invalid(
                    f"Value ({snapshot_id}) for parameter snapshotId is invalid. "
                    "Expected: 'snap-...'."
                )
        for snapshot_id in wanted:
            if snapshot_id not in known:
                raise Ec2Error(
                    400, "InvalidSnapshot.NotFound", f"The snapshot '{snapshot_id}' does not exist."
                )
        names = set(wanted)
        return [snap for snap in known.values() if snap.snapshot_id in names]

    def _selection(self, form: Mapping[str, str]) -> Callable[[Snapshot], bool]:
        """Owners, restorable-by and filters as one test (values of one filter are
        alternatives, the filters all apply)."""
        owner = self.store.owner_id
        excluded = False  # every snapshot, whatever its fields
        for key in ("Owner", "RestorableBy"):
            people = numbered(form, key)
            for person in people:
                if not (person.isdigit() or person in ("self", "amazon", "aws-marketplace", "all")):
                    raise Ec2Error(400, "InvalidUserID.Malformed", f"Invalid user id: '{person}'")
            # Emulated snapshots are private to their one account: none is Amazon's
            # or public.
            if people and not any(person in ("self", owner) for person in people):
                excluded = True
        conditions: list[tuple[str, list[re.Pattern[str]]]] = []
        for name, values in filters_of(form):
            if name.startswith("tag:") or name in ("tag-key", "owner-alias", "kms-key-id"):
                excluded = True  # no tags, no alias, no key
            elif name not in FILTERS:
                raise _invalid(f"The filter '{name}' is invalid")
            else:
                conditions.append((name, [_wildcard(value) for value in values]))

        def keep(snap: Snapshot) -> bool:
            fields = self.fields(snap)
            return not excluded and all(
                any(p.match(fields[name]) for p in patterns) for name, patterns in conditions
            )

        return keep

    @staticmethod
    def _query_key(form: Mapping[str, str]) -> str:
        """What a NextToken is bound to: the query without its paging."""
        rest = sorted((k, v) for k, v in form.items() if k not in ("NextToken", "MaxResults"))
        return hashlib.sha256(repr(rest).encode()).hexdigest()[:16]

    def _resume(self, token: str | None, query: str) -> int:
        if token is None:
            return 0
        fields = self._tokens.open(token)
        if (
            fields is None
            or len(fields) != 4
            or fields[0] != "d"
            or fields[1] != query
            or float(fields[3]) < time.time()
        ):
            raise Ec2Error(
                400,
                "InvalidPaginationToken",
                "The specified pagination token is not valid or is expired.",
            )
        return int(fields[2])

    def _render(self, page: list[Snapshot], token: str | None) -> bytes:
        root = ET.Element("DescribeSnapshotsResponse", xmlns=NAMESPACE)
        ET.SubElement(root, "requestId").text = str(uuid.uuid4())
        found = ET.SubElement(root, "snapshotSet")
        for snap in page:
            item = ET.SubElement(found, "item")
            fields = self.fields(snap)
            for tag, name in _ITEM:
                ET.SubElement(item, tag).text = _ILLEGAL_XML.sub("\ufffd", fields[name])
            ET.SubElement(item, "tagSet")
        if token is not None:
            ET.SubElement(root, "nextToken").text = token
        return ET.tostring(root, encoding="UTF-8", xml_declaration=True)


def error_body(err: Ec2Error) -> bytes:
    """EC2's error document, which botocore's EC2 parser reads."""
    root = ET.Element("Response")
    error = ET.SubElement(ET.SubElement(root, "Errors"), "Error")
    ET.SubElement(error, "Code").text = err.code
    ET.SubElement(error, "Message").text = _ILLEGAL_XML.sub("\ufffd", err.message)
    ET.SubElement(root, "RequestID").text = str(uuid.uuid4())
    return ET.tostring(root, encoding="UTF-8", xml_declaration=True)
