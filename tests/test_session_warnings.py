"""The plain-http warning is said once per endpoint and process, however many sessions
reach it: `ebsfs ls` and a mount make one for the EBS client and one for the EC2 lookup,
and the same warning twice reads like two problems."""

from __future__ import annotations

import logging

import pytest

from ebsfs.service.client import BotoEbsApi
from ebsfs.service.ec2 import Ec2Snapshots
from ebsfs.service.session import ConnectionOptions


@pytest.mark.expected_log(r"http://192\.0\.2\.11:8080 is plain http")
def test_two_sessions_to_one_plain_endpoint_warn_once(caplog, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://192.0.2.11:8080")  # EBS's and EC2's
    options = ConnectionOptions(region="us-east-1")
    BotoEbsApi(options)
    Ec2Snapshots(options)  # the EC2 lookup: a session of its own, the same endpoint
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1
