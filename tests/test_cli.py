"""Bad input: one line naming the problem, a non-zero exit, no traceback, no mount."""

from __future__ import annotations

import io
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ebsfs.cli import main as cli
from ebsfs.cli.logs import HANDLER_NAME, setup_logging
from ebsfs.cli.main import build_parser
from ebsfs.cli.options import connection_options, engine_config, parse_size
from ebsfs.emulator import EmulatorServer
from ebsfs.service.client import BotoEbsApi, ConnectionOptions
from tests.acquiring import add, sparse_blocks
from tests.fakes import pattern_block
from tests.mounting import ebsfs, force_unmount, mounted, needs_fuse

SNAP = "snap-0c1"


@pytest.fixture
def mnt(tmp_path: Path):
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    force_unmount(path)


def assert_one_line_error(result, *words: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ebsfs"), lines
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("512M", 512 * 2**20),
        ("2G", 2 * 2**30),
        ("1.5GiB", int(1.5 * 2**30)),
        ("65536", 65536),
        ("100k", 102400),
    ],
)
def test_parse_size(text, expected) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "args,words",
    [
        (["--cache-size", "lots"], ["--cache-size", "lots"]),
        (["--max-fetches", "0"], ["--max-fetches"]),
        (["--read-timeout", "-1"], ["--read-timeout"]),
        (["--read-timeout", "nan"], ["--read-timeout", "nan"]),  # waited forever
        (["--request-timeout", "inf"], ["--request-timeout", "inf"]),
        (["--cache-dir-size", "big"], ["--cache-dir-size", "big"]),
    ],
)
def test_bad_option_values(args, words, mnt) -> None:
    assert_one_line_error(ebsfs("mount", *args, SNAP, str(mnt)), *words)


def test_log_file_that_cannot_be_opened(mnt, tmp_path) -> None:
    result = ebsfs("mount", "--log-file", str(tmp_path / "no" / "such.log"), SNAP, str(mnt))
    assert_one_line_error(result, "cannot open log file")


def test_malformed_snapshot_id(mnt) -> None:
    result = ebsfs("mount", "--endpoint-url", "http://127.0.0.1:1", "vol-123", str(mnt))
    assert_one_line_error(result, "invalid snapshot id", "vol-123")


def test_missing_mount_point(emulator: EmulatorServer, tmp_path) -> None:
    result = ebsfs("mount", "--endpoint-url", emulator.url, SNAP, str(tmp_path / "absent"))
    assert_one_line_error(result, "does not exist")


def test_unknown_snapshot(emulator: EmulatorServer, mnt) -> None:
    result = ebsfs("mount", "--endpoint-url", emulator.url, "snap-0fff", str(mnt))
    assert_one_line_error(result, "snapshot not found", "snap-0fff")
    assert not os.path.ismount(mnt)


def test_unreachable_endpoint(mnt) -> None:
    result = ebsfs("mount", "--endpoint-url", "http://127.0.0.1:9", SNAP, str(mnt))
    assert_one_line_error(result, "cannot reach", "127.0.0.1:9")


def test_malformed_endpoint(mnt) -> None:
    result = ebsfs("mount", "--endpoint-url", "not a url", SNAP, str(mnt))
    assert_one_line_error(result, "endpoint")


def test_missing_credentials(emulator: EmulatorServer, mnt, monkeypatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    result = ebsfs("mount", "--endpoint-url", emulator.url, SNAP, str(mnt))
    assert_one_line_error(result, "no AWS credentials")


def test_missing_region(emulator: EmulatorServer, mnt, monkeypatch) -> None:
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    result = ebsfs("mount", "--endpoint-url", emulator.url, SNAP, str(mnt))
    assert_one_line_error(result, "region")


def test_unknown_profile(emulator: EmulatorServer, mnt) -> None:
    result = ebsfs("mount", "--profile", "nosuch", "--endpoint-url", emulator.url, SNAP, str(mnt))
    assert_one_line_error(result, "profile", "nosuch")


def test_access_denied(emulator: EmulatorServer, mnt, monkeypatch) -> None:
    emulator.store.add_snapshot(SNAP, {0: pattern_block(1, 0)})
    emulator.faults.deny_access_keys = ["AKIDDENIED"]
    emulator.faults.secret_keys["AKIDDENIED"] = "secret"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDDENIED")
    result = ebsfs("mount", "--endpoint-url", emulator.url, SNAP, str(mnt))
    assert_one_line_error(result, "access denied", "ebs:GetSnapshotBlock")


@pytest.mark.parametrize(
    "variable,value",
    [
        ("AWS_SECRET_ACCESS_KEY", "wrong"),
        ("AWS_ACCESS_KEY_ID", "AKIDUNKNOWN"),
    ],
)
def test_rejected_credentials(emulator: EmulatorServer, mnt, monkeypatch, variable, value) -> None:
    emulator.store.add_snapshot(SNAP, {0: pattern_block(1, 0)})
    monkeypatch.setenv(variable, value)
    result = ebsfs("mount", "--endpoint-url", emulator.url, SNAP, str(mnt))
    assert_one_line_error(result, "AWS rejected the credentials")


def test_untrusted_certificate(https_emulator: EmulatorServer, mnt, monkeypatch) -> None:
    https_emulator.store.add_snapshot(SNAP, {0: pattern_block(1, 0)})
    monkeypatch.delenv("AWS_CA_BUNDLE")
    result = ebsfs("mount", "--endpoint-url", https_emulator.url, SNAP, str(mnt))
    assert_one_line_error(result, "TLS certificate", "not trusted", "AWS_CA_BUNDLE")


@needs_fuse
def test_region_and_endpoint_from_the_environment(
    emulator: EmulatorServer, mnt, monkeypatch, signed_regions
) -> None:
    """AWS_REGION and AWS_ENDPOINT_URL work like --region and --endpoint-url: the
    emulator serves the bytes, and every request is signed for eu-west-1."""
    block = pattern_block(1, 0)
    emulator.store.add_snapshot(SNAP, {0: block})
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", emulator.url)
    result = ebsfs("mount", SNAP, str(mnt))
    assert result.returncode == 0, result.stderr
    assert (mnt / f"{SNAP}.img").stat().st_size == 1024**3
    with open(mnt / f"{SNAP}.img", "rb") as f:
        assert f.read(len(block)) == block
    assert emulator.counters.calls["GetSnapshotBlock"] >= 1
    assert set(signed_regions) == {"eu-west-1"}


def test_help_explains_every_option() -> None:
    result = ebsfs("mount", "--help")
    assert result.returncode == 0
    for option in (
        "--foreground",
        "--cache-size",
        "--max-fetches",
        "--read-timeout",
        "--allow-other",
        "--region",
        "--profile",
        "--endpoint-url",
        "--verbose",
        "--log-file",
        "--cache-dir",
        "--cache-dir-size",
    ):
        assert option in result.stdout
    result = ebsfs("stats", "--help")
    assert result.returncode == 0 and "--json" in result.stdout


@pytest.mark.parametrize(
    "setup,words",
    [
        ("file", ["is not a directory"]),
        ("foreign", ["is not empty and is not an ebsfs cache"]),
        ("small", ["cache dir size must be at least 1M"]),
    ],
)
def test_cache_dirs_that_cannot_work(emulator: EmulatorServer, mnt, tmp_path, setup, words) -> None:
    emulator.store.add_snapshot(SNAP, {0: pattern_block(1, 0)})
    cache = tmp_path / "cache"
    size = ["--cache-dir-size", "100k"] if setup == "small" else []
    if setup == "file":
        cache.write_text("x")
    elif setup == "foreign":
        cache.mkdir()
        (cache / "thesis.tex").write_text("mine")
    result = ebsfs(
        "mount", "--endpoint-url", emulator.url, "--cache-dir", str(cache), *size, SNAP, str(mnt)
    )
    assert_one_line_error(result, *words)
    assert not os.path.ismount(mnt)
    if setup == "foreign":
        assert os.listdir(cache) == ["thesis.tex"]


@needs_fuse
def test_umount_of_something_not_mounted(tmp_path) -> None:
    assert_one_line_error(ebsfs("umount", str(tmp_path)), "not a mount point")


@needs_fuse
def test_already_mounted(emulator: EmulatorServer, tmp_path) -> None:
    emulator.store.add_snapshot(SNAP, {0: pattern_block(1, 0)})
    with mounted(emulator.url, [SNAP], tmp_path / "mnt") as mnt:
        result = ebsfs("mount", "--endpoint-url", emulator.url, SNAP, str(mnt))
        assert_one_line_error(result, "already a mount point")


@pytest.mark.parametrize(
    "command",
    [
        ["mount", SNAP, "/mnt"],
        ["get", SNAP, "disk.img"],
        ["diff", SNAP, "snap-0c2"],
    ],
)
def test_no_direct_get_reaches_the_connection_options(command: list[str]) -> None:
    parser = build_parser()
    assert engine_config(parser.parse_args(command)).connection.direct_get is True
    args = parser.parse_args([command[0], "--no-direct-get", *command[1:]])
    assert engine_config(args).connection.direct_get is False
    assert connection_options(args).direct_get is False


def test_no_direct_get_reaches_the_clients(
    emulator: EmulatorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every EBS client that `get` and `diff` make is told, whichever path builds it."""
    add(emulator.store, SNAP, sparse_blocks(1, volume_gib=1), volume_gib=1)
    emulator.store.add_snapshot("snap-0c2", {0: pattern_block(2, 0)}, parent=SNAP)
    made: list[ConnectionOptions] = []
    real_init = BotoEbsApi.__init__

    def spy(self: BotoEbsApi, options: ConnectionOptions, *args: Any, **kwargs: Any) -> None:
        made.append(options)
        real_init(self, options, *args, **kwargs)

    monkeypatch.setattr(BotoEbsApi, "__init__", spy)
    url = ["--endpoint-url", emulator.url, "--no-direct-get"]
    assert cli.main(["get", "-q", *url, SNAP, str(tmp_path / "disk.img")]) == 0
    assert cli.main(["diff", *url, SNAP, "snap-0c2"]) == 0
    assert made and {options.direct_get for options in made} == {False}
    made.clear()
    assert cli.main(["diff", "--endpoint-url", emulator.url, SNAP, "snap-0c2"]) == 0
    assert made and {options.direct_get for options in made} == {True}


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, put back as it was (handlers, levels) after the test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    ebsfs_level = logging.getLogger("ebsfs").level
    yield root
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("ebsfs").setLevel(ebsfs_level)


@pytest.mark.expected_log("ebsfs.test: heard by both")
def test_logging_replaces_only_its_own_handler(root_logger: logging.Logger, tmp_path: Path) -> None:
    """Set up twice (a second main() in one process, the mount's background child):
    one handler of ours, the latest, and every other handler of the root logger kept
    (pytest's capture, the test suite's log check, an embedding program's)."""
    theirs = _Records()
    root_logger.addHandler(theirs)
    setup_logging(0, None, background=False)
    setup_logging(1, str(tmp_path / "ebsfs.log"), background=False)
    ours = [h for h in root_logger.handlers if h.get_name() == HANDLER_NAME]
    assert len(ours) == 1 and isinstance(ours[0], logging.FileHandler)
    assert theirs in root_logger.handlers
    logging.getLogger("ebsfs.test").warning("heard by both")
    ours[0].flush()
    assert theirs.messages == ["heard by both"]
    assert "heard by both" in (tmp_path / "ebsfs.log").read_text()


def test_main_in_process_keeps_the_other_handlers(
    emulator: EmulatorServer, root_logger: logging.Logger
) -> None:
    theirs = _Records()
    root_logger.addHandler(theirs)
    emulator.store.add_snapshot(SNAP, {0: pattern_block(1, 0)}, volume_size_gib=1)
    emulator.store.add_snapshot("snap-0c2", {0: pattern_block(2, 0)}, parent=SNAP)
    for _ in range(2):
        assert cli.main(["diff", "--endpoint-url", emulator.url, SNAP, "snap-0c2"]) == 0
    assert theirs in root_logger.handlers
    assert [h.get_name() for h in root_logger.handlers].count(HANDLER_NAME) == 1


@pytest.mark.expected_log("ebsfs: said to the new stderr")
def test_logging_writes_to_the_stderr_of_the_moment(
    root_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller in the same process may swap sys.stderr after main() (pytest does, per
    test): messages follow it instead of going to a stream that may be closed."""
    setup_logging(0, None, background=False)
    later = io.StringIO()
    monkeypatch.setattr(sys, "stderr", later)
    logging.getLogger("ebsfs").error("said to the new stderr")
    assert "ERROR ebsfs: said to the new stderr" in later.getvalue()
