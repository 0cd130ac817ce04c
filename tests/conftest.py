"""Shared fixtures: a clean AWS environment, an in-process emulator, boto3 clients, and
a check that fails any test logging a WARNING or ERROR it did not declare (s3ql's
rule: an unexpected warning is a bug, and it is how a mount dying quietly shows)."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Generator, Iterator

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


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "expected_log(*patterns): regexes for the WARNING/ERROR messages this test expects "
        "(searched in 'logger: message'); any other such message fails the test",
    )


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    """Collect WARNING and above from every logger during the test (the mount
    helpers replay the mount process's log here too); fail on any undeclared one."""
    collector = _Collector()
    root = logging.getLogger()
    root.addHandler(collector)
    try:
        result = yield
    finally:
        root.removeHandler(collector)
    patterns = [re.compile(p) for m in item.iter_markers("expected_log") for p in m.args]
    unexpected = []
    for record in collector.records:
        text = f"{record.name}: {record.getMessage()}"
        if not any(p.search(text) for p in patterns):
            unexpected.append(f"{record.levelname} {text}")
    if unexpected:
        pytest.fail("unexpected log messages (declare expected ones with "
                    "@pytest.mark.expected_log):\n  " + "\n  ".join(unexpected[:20]),
                    pytrace=False)
    return result


class CredentialHelper:
    """A `credential_process` profile whose helper fails while `down` is True: the
    refresh path of SSO, instance roles and assumed roles. Its credentials expire in
    5 minutes, inside botocore's mandatory refresh window, so every use refreshes."""

    def __init__(self, directory: os.PathLike[str], config_file: str) -> None:
        base = os.fspath(directory)
        self.flag = os.path.join(base, "helper-down")
        self.runs = os.path.join(base, "helper-runs")
        script = os.path.join(base, "helper.sh")
        with open(script, "w") as f:
            f.write(
                "#!/bin/sh\n"
                f"echo run >> '{self.runs}'\n"
                f"if [ -e '{self.flag}' ]; then echo 'token service unavailable' >&2; exit 1; fi\n"
                "exp=$(date -u -d '+5 minutes' +%Y-%m-%dT%H:%M:%SZ)\n"
                "printf '{\"Version\": 1, \"AccessKeyId\": \"AKIDTEST\", "
                "\"SecretAccessKey\": \"secret\", \"SessionToken\": \"session\", "
                "\"Expiration\": \"%s\"}\\n' \"$exp\"\n"
            )
        os.chmod(script, 0o755)
        with open(config_file, "a") as f:
            f.write(f"[profile helper]\ncredential_process = {script}\n")
        self.profile = "helper"

    @property
    def down(self) -> bool:
        return os.path.exists(self.flag)

    @down.setter
    def down(self, value: bool) -> None:
        if value:
            open(self.flag, "w").close()
        elif os.path.exists(self.flag):
            os.unlink(self.flag)

    def run_count(self) -> int:
        if not os.path.exists(self.runs):
            return 0
        with open(self.runs) as f:
            return len(f.readlines())


@pytest.fixture
def credential_helper(tmp_path_factory: pytest.TempPathFactory) -> CredentialHelper:
    return CredentialHelper(tmp_path_factory.mktemp("helper"), os.environ["AWS_CONFIG_FILE"])


@pytest.fixture
def profile_ca_bundle(https_emulator: EmulatorServer, tls_files: tuple[str, str],
                      monkeypatch: pytest.MonkeyPatch) -> str:
    """The HTTPS emulator trusted only through a profile's ca_bundle (no AWS_CA_BUNDLE):
    returns the profile's name."""
    monkeypatch.delenv("AWS_CA_BUNDLE")
    with open(os.environ["AWS_CONFIG_FILE"], "a") as f:
        f.write(f"[profile tls]\nca_bundle = {tls_files[0]}\n"
                "aws_access_key_id = AKIDTEST\naws_secret_access_key = secret\n")
    return "tls"
