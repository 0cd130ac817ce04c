"""Shared fixtures: a clean AWS environment, an in-process emulator, boto3 clients; the
`mount` marker skipped where root or /dev/fuse is missing; and a check that fails any
test logging a WARNING or ERROR it did not declare, in its fixtures too, or not logging
one it declared (s3ql's rule: an unexpected warning is a bug, and it is how a mount
dying quietly shows)."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Generator, Iterator
from typing import TYPE_CHECKING

import boto3
import pytest

from ebsfs.emulator import EmulatorServer, Faults, SnapshotStore
from ebsfs.emulator.selfsigned import make_certificate

if TYPE_CHECKING:
    from tests.localhttp import Script, Server


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
    # A background mount with no --log-file and no syslog logs to a file: into the
    # test's temporary space, not /var/log/ebsfs (tests of that place unset it).
    monkeypatch.setenv("LOGS_DIRECTORY", str(home / "logs"))


@pytest.fixture
def store() -> SnapshotStore:
    """Checks signatures against the credentials of aws_env, as the service would."""
    return SnapshotStore(
        Faults(list_rate=0, get_rate=0, seed=1, secret_keys={"AKIDTEST": "secret"})
    )


@pytest.fixture
def emulator(store: SnapshotStore) -> Iterator[EmulatorServer]:
    with EmulatorServer(store) as server:
        yield server


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    cert, key = make_certificate(tmp_path_factory.mktemp("tls"))
    return str(cert), str(key)


@pytest.fixture
def https_emulator(
    store: SnapshotStore, tls_files: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[EmulatorServer]:
    """The emulator over HTTPS, as the real service is, its certificate trusted through
    AWS_CA_BUNDLE (by boto3 and by ebsfs's own GET path alike)."""
    monkeypatch.setenv("AWS_CA_BUNDLE", tls_files[0])
    with EmulatorServer(store, tls=tls_files) as server:
        yield server


@pytest.fixture
def ebs(emulator: EmulatorServer):
    """A real boto3 EBS client talking HTTP to the emulator."""
    return boto3.session.Session().client("ebs", endpoint_url=emulator.url, region_name="us-east-1")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "expected_log(*patterns, maybe=()): regexes for the WARNING/ERROR messages this "
        "test expects (searched in 'logger: message'); each of `patterns` must appear, "
        "those of `maybe` may (a race decides), and any other such message fails the test",
    )


def privileged() -> bool:
    """Root with /dev/fuse: what the `mount` tier needs (real FUSE mounts, loop devices,
    mkfs and mount, switching users)."""
    return os.geteuid() == 0 and os.access("/dev/fuse", os.R_OK | os.W_OK)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The `mount` marker is the one switch: tests carrying it are skipped where the
    privileges are missing, and `-m "not mount"` is the unprivileged tier."""
    if privileged():
        return
    skip = pytest.mark.skip(reason="mount tier: needs root and /dev/fuse")
    for item in items:
        if item.get_closest_marker("mount"):
            item.add_marker(skip)


class LogCheck(logging.Handler):
    """Every WARNING and above logged from the start of one test's setup to the end of
    its teardown (fixtures included), attached to the root logger."""

    def __init__(self, item: pytest.Item) -> None:
        super().__init__(logging.WARNING)
        markers = list(item.iter_markers("expected_log"))
        self.patterns = [re.compile(p) for m in markers for p in m.args]
        self.tolerated = [re.compile(p) for m in markers for p in m.kwargs.get("maybe", ())]
        self.records: list[logging.LogRecord] = []
        self.checked = 0
        self.heard: set[int] = set()
        """Indexes of the patterns some record matched."""
        self.completed = False
        """Setup and call passed: only then must every expected message have come."""

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def attach(self) -> None:
        logging.getLogger().addHandler(self)

    def detach(self) -> None:
        logging.getLogger().removeHandler(self)

    def problems(self, phase: str) -> list[str]:
        """The unexpected messages since the last check, and whether this handler was
        removed (re-attached then: whatever removed it must leave others' handlers)."""
        found = []
        if self not in logging.getLogger().handlers:
            self.attach()
            found.append(
                f"the log check's handler was removed from the root logger "
                f"(during {phase}): messages may have been missed"
            )
        for record in self.records[self.checked :]:
            text = f"{record.name}: {record.getMessage()}"
            matched = {n for n, p in enumerate(self.patterns) if p.search(text)}
            self.heard |= matched
            if not matched and not any(p.search(text) for p in self.tolerated):
                found.append(f"{record.levelname} {text} (in {phase})")
        self.checked = len(self.records)
        return found

    def missing(self) -> list[str]:
        return [
            f"expected, never logged: {p.pattern!r}"
            for n, p in enumerate(self.patterns)
            if n not in self.heard
        ]


_LOG_CHECK = pytest.StashKey[LogCheck]()


def _fail_on(problems: list[str]) -> None:
    if problems:
        pytest.fail(
            "log check (declare expected messages with @pytest.mark.expected_log):"
            "\n  " + "\n  ".join(problems[:20]),
            pytrace=False,
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    """Attach the log check before any fixture runs (s3ql's rule: an unexpected warning
    is a bug, and it is how a mount dying quietly shows; the mount helpers replay the
    mount process's log here too)."""
    check = LogCheck(item)
    item.stash[_LOG_CHECK] = check
    check.attach()
    try:
        yield
    except BaseException:
        check.problems("setup")  # the failure is the news; its log is in the report
        raise
    _fail_on(check.problems("setup"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    check = item.stash[_LOG_CHECK]
    try:
        yield
    except BaseException:
        check.problems("call")
        raise
    problems = check.problems("call")
    check.completed = not problems
    _fail_on(problems)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    """Detach the check after the last fixture is torn down; fail on what was logged
    since the call, and on any expected message that never came."""
    check = item.stash.get(_LOG_CHECK, None)
    if check is None:  # setup never began (another plugin's setup hook failed first)
        return (yield)
    try:
        yield
    finally:
        problems = check.problems("teardown")
        check.detach()
    _fail_on(problems + (check.missing() if check.completed else []))


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
                'printf \'{"Version": 1, "AccessKeyId": "AKIDTEST", '
                '"SecretAccessKey": "secret", "SessionToken": "session", '
                '"Expiration": "%s"}\\n\' "$exp"\n'
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
def profile_ca_bundle(
    https_emulator: EmulatorServer, tls_files: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> str:
    """The HTTPS emulator trusted only through a profile's ca_bundle (no AWS_CA_BUNDLE):
    returns the profile's name."""
    monkeypatch.delenv("AWS_CA_BUNDLE")
    with open(os.environ["AWS_CONFIG_FILE"], "a") as f:
        f.write(
            f"[profile tls]\nca_bundle = {tls_files[0]}\n"
            "aws_access_key_id = AKIDTEST\naws_secret_access_key = secret\n"
        )
    return "tls"


@pytest.fixture
def signed_regions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The region of the SigV4 scope of every request the in-process emulator receives
    from now on (botocore's and ebsfs's own signer alike), in order."""
    from ebsfs.emulator import server

    regions: list[str] = []
    admit = server.access_key_of

    def recording(authorization: str) -> str:
        scope = re.search(r"Credential=[^/]+/\d{8}/([^/]+)/", authorization)
        regions.append(scope[1] if scope else "")
        return admit(authorization)

    monkeypatch.setattr(server, "access_key_of", recording)
    return regions


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    """Start raw socket servers playing the given scripts (tests/localhttp.Server),
    closed after the test. (Imported here: test_log_check runs this conftest alone.)"""
    from tests.localhttp import Server

    servers: list[Server] = []

    def start(*scripts: Script) -> Server:
        servers.append(Server(list(scripts)))
        return servers[-1]

    yield start
    for server in servers:
        server.close()
