"""ebsfs.service.sigv4 against botocore's SigV4Auth: the same headers for the same request."""

from __future__ import annotations

import datetime
import urllib.parse
from unittest import mock

import botocore.auth
import botocore.awsrequest
import botocore.credentials
import pytest

from ebsfs.service.sigv4 import Credentials, GetSigner

NOW = datetime.datetime(2026, 11, 24, 1, 2, 3, tzinfo=datetime.UTC)


def botocore_headers(url: str, credentials: Credentials, now: datetime.datetime) -> dict[str, str]:
    request = botocore.awsrequest.AWSRequest(method="GET", url=url)
    frozen = botocore.credentials.Credentials(*credentials).get_frozen_credentials()
    with mock.patch("botocore.auth.get_current_datetime", return_value=now):
        botocore.auth.SigV4Auth(frozen, "ebs", "eu-west-3").add_auth(request)
    return dict(request.headers.items())


@pytest.mark.parametrize("token", [None, "FwoGZXIvYXdzEJr//////////wEaDGFrZ+/=="])
@pytest.mark.parametrize(
    "netloc,scheme",
    [
        ("127.0.0.1:8123", "http"),
        ("ebs.eu-west-3.amazonaws.com", "https"),
        ("proxy.internal:8443", "https"),
    ],
)
@pytest.mark.parametrize("block_token", ["AAUBAf+/xyz==", "plain", "a b&c=d"])
def test_same_headers_as_botocore(token, netloc, scheme, block_token) -> None:
    credentials = Credentials("AKIDEXAMPLE", "wJalr/K7MDENG+bPxRfiCY", token)
    path = "/snapshots/snap-0123456789abcdef0/blocks/4097"
    query = f"blockToken={urllib.parse.quote(block_token, safe='')}"
    ours = GetSigner("ebs", "eu-west-3").headers(credentials, netloc, path, query, NOW)
    assert ours == botocore_headers(f"{scheme}://{netloc}{path}?{query}", credentials, NOW)


def test_signing_key_follows_the_day_and_the_secret() -> None:
    signer = GetSigner("ebs", "eu-west-3")
    path, query = "/snapshots/snap-01/blocks/0", "blockToken=x"
    for now in (NOW, NOW + datetime.timedelta(days=1)):
        for secret in ("one", "two"):
            credentials = Credentials("AKIDEXAMPLE", secret)
            ours = signer.headers(credentials, "h", path, query, now)
            assert ours == botocore_headers(f"http://h{path}?{query}", credentials, now)
