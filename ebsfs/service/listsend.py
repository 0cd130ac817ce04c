"""The list calls (ListSnapshotBlocks, ListChangedBlocks) sent over the direct path's
HTTP/1.1 connections: botocore still builds, signs and parses them, and a `before-send`
handler puts the signed request on the wire through http1 instead of urllib3.

Why: urllib3 and botocore read an answer with a timeout per receive only and the whole
body into memory before parsing, so a hostile endpoint could trickle a page a byte at a
time for hours or answer a gigabyte. http1 parses ASCII-strict, caps the body and gives
every attempt its deadline (read_timeout, then MIN_RATE), as for GetSnapshotBlock; and
a listing then shares its worker thread's kept-alive connection (and TLS handshake)
with the GETs that follow it."""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator
from typing import Any

from botocore.awsrequest import AWSPreparedRequest, AWSResponse

from ebsfs.service.direct import DirectBlockGetter

MAX_LIST_BODY = 16 * 1024 * 1024
"""Bytes of a list answer's body accepted at the most. A full page (10,000 entries) of
ListChangedBlocks, with two block tokens of about 200 characters each, is about 4.5 MB
(of ListSnapshotBlocks about 2.5 MB), and 8.7 MB with tokens twice as long: 16 MiB
holds that, and refuses a body announcing (or streaming) a gigabyte after 16 MiB, not
at the end of memory."""
LIST_OPERATIONS = ("ListSnapshotBlocks", "ListChangedBlocks")
_SECRET_PARAMETERS = ("pageToken",)
"""Query parameters kept out of messages (a NextToken is a bearer secret for an hour)."""


class _Body:
    """The `raw` of an AWSResponse: botocore reads a non-streaming body through stream()."""

    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **kwargs: Any) -> Iterator[bytes]:
        yield self._body


class ListSender:
    """The `before-send` handler of one boto3 EBS client's list calls."""

    def __init__(self, getter: DirectBlockGetter) -> None:
        self._getter = getter

    def register(self, events: Any) -> None:
        """Send the list calls of the client whose `meta.events` is `events`."""
        for operation in LIST_OPERATIONS:
            events.register(f"before-send.ebs.{operation}", self.send)

    def send(self, request: AWSPreparedRequest, **kwargs: Any) -> AWSResponse | None:
        """The answer to the signed `request`, received through http1, or None (botocore
        sends it) for a request this path does not take: not a GET without a body, or
        not to the endpoint, or a header that cannot go on the wire as it is."""
        host = self._getter.host_for(request.url)
        if request.method != "GET" or request.body or host is None:
            return None
        signed = _wire_headers(request)
        if signed is None:
            return None
        # As urllib3 sends them: Host first (what botocore signed when the request has
        # none), and a body not encoded (an unsigned header, as urllib3's is).
        headers = {"Host": signed.pop("Host", host)}
        if not any(name.lower() == "accept-encoding" for name in signed):
            headers["Accept-Encoding"] = "identity"
        headers.update(signed)
        parts = urllib.parse.urlsplit(request.url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if not target.isascii():
            return None
        operation = str(kwargs.get("event_name", "")).rsplit(".", 1)[-1] or "list call"
        secret = _secret_of(parts.query)
        response = self._getter.send(operation, target, headers, None, MAX_LIST_BODY, secret)
        return AWSResponse(
            request.url, response.status, response.headers, _Body(response.body or b"")
        )


def _wire_headers(request: AWSPreparedRequest) -> dict[str, str] | None:
    """The request's headers exactly as signed (a header botocore signed must be sent
    byte for byte), or None if one holds what no header line may (CR, LF, NUL, or
    anything but latin-1)."""
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        name = name.decode("latin-1") if isinstance(name, bytes) else str(name)
        value = value.decode("latin-1") if isinstance(value, bytes) else str(value)
        line = name + value
        if any(c in line for c in "\r\n\0") or not all(ord(c) < 256 for c in line):
            return None
        if name.lower() == "host":
            name = "Host"
        headers[name] = value
    return headers


def _secret_of(query: str) -> str | None:
    """The page token in a list call's query, unquoted (redact finds both forms), if any."""
    for name, _, value in (part.partition("=") for part in query.split("&")):
        if name in _SECRET_PARAMETERS and value:
            return urllib.parse.unquote(value)
    return None
