"""Shared fixtures: a clean AWS environment, an in-process emulator, boto3 clients."""

from __future__ import annotations

import os
from collections.abc import Iterator

import boto3
import pytest

from ebsfs.emulator import EmulatorServer, Faults, SnapshotStore
from ebsfs.emulator.selfsigned import make_certificate


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Dummy credentials and a region; nothing from the developer's own AWS setup."""
    home = tmp_path_factory.mktemp("aws")
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(home / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def store() -> SnapshotStore:
    """Checks signatures against the credentials of aws_env, as the service would."""
    return SnapshotStore(Faults(list_rate=0, get_rate=0, seed=1,
                                secret_keys={"AKIDTEST": "secret"}))


@pytest.fixture
def emulator(store: SnapshotStore) -> Iterator[EmulatorServer]:
    with EmulatorServer(store) as server:
        yield server


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    cert, key = make_certificate(tmp_path_factory.mktemp("tls"))
    return str(cert), str(key)


@pytest.fixture
def https_emulator(store: SnapshotStore, tls_files: tuple[str, str],
                   monkeypatch: pytest.MonkeyPatch) -> Iterator[EmulatorServer]:
    """The emulator over HTTPS, as the real service is, its certificate trusted through
    AWS_CA_BUNDLE (by boto3 and by ebsfs's own GET path alike)."""
    monkeypatch.setenv("AWS_CA_BUNDLE", tls_files[0])
    with EmulatorServer(store, tls=tls_files) as server:
        yield server


@pytest.fixture
def ebs(emulator: EmulatorServer):  # type: ignore[no-untyped-def]
    """A real boto3 EBS client talking HTTP to the emulator."""
    return boto3.session.Session().client("ebs", endpoint_url=emulator.url, region_name="us-east-1")
