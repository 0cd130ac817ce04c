"""Bad input: one line naming the problem, a non-zero exit, no traceback, no mount."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ebsfs.cli.main import parse_size
from ebsfs.emulator import EmulatorServer
from tests.fakes import pattern_block
from tests.mounting import ebsfs, force_unmount, mounted, needs_fuse

SNAP = "snap-0c1"


@pytest.fixture
def mnt(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    force_unmount(path)


def assert_one_line_error(result, *words: str) -> None:  # type: ignore[no-untyped-def]
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ebsfs"), lines
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("text,expected", [
    ("512M", 512 * 2**20), ("2G", 2 * 2**30), ("1.5GiB", int(1.5 * 2**30)), ("65536", 65536),
    ("100k", 102400),
])
def test_parse_size(text, expected) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("args,words", [
    (["--cache-size", "lots"], ["--cache-size", "lots"]),
    (["--max-fetches", "0"], ["--max-fetches"]),
    (["--read-timeout", "-1"], ["--read-timeout"]),
    (["--cache-dir-size", "big"], ["--cache-dir-size", "big"]),
])
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


@pytest.mark.parametrize("variable,value", [
    ("AWS_SECRET_ACCESS_KEY", "wrong"), ("AWS_ACCESS_KEY_ID", "AKIDUNKNOWN"),
])
def test_rejected_credentials(emulator: EmulatorServer, mnt, monkeypatch, variable,
                              value) -> None:
    emulator.store.add_snapshot(SNAP, {0: pattern_block(1, 0)})
    monkeypatch.setenv(variable, value)
    result = ebsfs("mount", "--endpoint-url", emulator.url, SNAP, str(mnt))
    assert_one_line_error(result, "AWS rejected the credentials")


def test_untrusted_certificate(https_emulator: EmulatorServer, mnt, monkeypatch) -> None:
    https_emulator.store.add_snapshot(SNAP, {0: pattern_block(1, 0)})
    monkeypatch.delenv("AWS_CA_BUNDLE")
    result = ebsfs("mount", "--endpoint-url", https_emulator.url, SNAP, str(mnt))
    assert_one_line_error(result, "TLS certificate", "not trusted", "AWS_CA_BUNDLE")


def test_region_and_endpoint_from_the_environment(emulator: EmulatorServer, mnt,
                                                  monkeypatch) -> None:
    """AWS_REGION and AWS_ENDPOINT_URL work like --region and --endpoint-url."""
    emulator.store.add_snapshot(SNAP, {0: pattern_block(1, 0)})
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", emulator.url)
    if not os.access("/dev/fuse", os.W_OK):
        pytest.skip("needs /dev/fuse")
    result = ebsfs("mount", SNAP, str(mnt))
    assert result.returncode == 0, result.stderr
    assert (mnt / f"{SNAP}.img").stat().st_size == 1024**3


def test_help_explains_every_option() -> None:
    result = ebsfs("mount", "--help")
    assert result.returncode == 0
    for option in ("--foreground", "--cache-size", "--max-fetches", "--read-timeout",
                   "--allow-other", "--region", "--profile", "--endpoint-url", "--verbose",
                   "--log-file", "--cache-dir", "--cache-dir-size"):
        assert option in result.stdout
    result = ebsfs("stats", "--help")
    assert result.returncode == 0 and "--json" in result.stdout


@pytest.mark.parametrize("setup,words", [
    ("file", ["is not a directory"]),
    ("foreign", ["is not empty and is not an ebsfs cache"]),
    ("small", ["cache dir size must be at least 1M"]),
])
def test_cache_dirs_that_cannot_work(emulator: EmulatorServer, mnt, tmp_path, setup,
                                     words) -> None:
    emulator.store.add_snapshot(SNAP, {0: pattern_block(1, 0)})
    cache = tmp_path / "cache"
    size = ["--cache-dir-size", "100k"] if setup == "small" else []
    if setup == "file":
        cache.write_text("x")
    elif setup == "foreign":
        cache.mkdir()
        (cache / "thesis.tex").write_text("mine")
    result = ebsfs("mount", "--endpoint-url", emulator.url, "--cache-dir", str(cache), *size,
                   SNAP, str(mnt))
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
