"""Issue 28's papercuts in get, verify, mount and the progress display: examples kept
one command a line, losetup -P explained, a bar on a terminal of 0 columns, and the
manifest of a copy to a device or a stream kept out of the current directory."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from ebsfs.acquire.plan import GetRequest, Layout
from ebsfs.cli.progress import BarProgress, LineProgress, progress_for
from ebsfs.emulator import EmulatorServer
from tests.acquiring import add
from tests.fakes import pattern_block
from tests.mounting import ebsfs

SNAP = "snap-0e28"


def test_get_help_keeps_one_example_a_line() -> None:
    shown = ebsfs("get", "--help").stdout
    examples = shown[shown.index("examples:") :].splitlines()[1:]
    assert [line.split()[:2] for line in examples if line.strip()] == [["ebsfs", "get"]] * 3
    assert any(line.endswith("| gzip > disk.img.gz") for line in examples), examples


def test_mount_help_says_what_to_do_without_loop_partitions() -> None:
    shown = ebsfs("mount", "--help").stdout
    assert "losetup -r -P" in shown
    assert "-part1.img" in shown and "partition support" in " ".join(shown.split())


def _zero_column_pty() -> tuple[int, int]:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 0, 0, 0, 0))
    return master, slave


def _drain(master: int) -> str:
    shown = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        shown += chunk
    return shown.decode(errors="replace")


def test_a_terminal_of_zero_columns_still_shows_progress() -> None:
    master, slave = _zero_column_pty()
    try:
        with os.fdopen(slave, "w") as tty:
            progress = progress_for("disk.img", quiet=False, out=tty)
            assert isinstance(progress, LineProgress)
            status = BarProgress(out=tty)
            status.status("p1 (ext4): reading metadata")
            status.close()
        shown = _drain(master)
    finally:
        os.close(master)
    assert "ebsfs: p1 (ext4): reading metadata" in shown


def test_the_default_manifest_of_a_device_or_a_stream_is_not_here(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    device = Layout.of(GetRequest(SNAP, "/dev/loop7"))
    assert device.manifest == str(tmp_path / "state/ebsfs/get/snap-0e28-dev-loop7.manifest.json")
    assert device.stem == device.manifest.removesuffix(".manifest.json")
    assert Layout.of(GetRequest(SNAP, "/dev/loop7")).manifest == device.manifest  # resumable
    stream = Layout.of(GetRequest(SNAP, "-")).manifest
    assert re.fullmatch(
        re.escape(str(tmp_path / "state/ebsfs/get/snap-0e28-stdout-")) + r"\d{8}T[\d.]+Z"
        r"\.manifest\.json",
        stream,
    ), stream
    assert Layout.of(GetRequest(SNAP, "-", manifest="m.manifest.json")).manifest == (
        "m.manifest.json"
    )
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert Layout.of(GetRequest(SNAP, "-")).manifest.startswith("/var/lib/ebsfs/get/")


def test_get_to_stdout_writes_nothing_into_the_current_directory(
    emulator: EmulatorServer, tmp_path: Path
) -> None:
    add(emulator.store, SNAP, {0: pattern_block(28, 0)}, volume_gib=1)
    here = tmp_path / "here"
    here.mkdir()
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    with open(os.devnull, "wb") as sink:
        done = subprocess.run(
            [sys.executable, "-m", "ebsfs", "get", "--endpoint-url", emulator.url, SNAP, "-"],
            cwd=here,
            stdout=sink,
            stderr=subprocess.PIPE,
            text=True,
            env={**env, "PYTHONPATH": os.getcwd()},
            timeout=120,
        )
    found = re.search(r"manifest (\S+\.manifest\.json)", done.stderr)
    try:
        assert done.returncode == 0, done.stderr
        assert list(here.iterdir()) == []
        assert found and os.path.isabs(found[1]) and "/ebsfs/get/" in found[1], done.stderr
        assert os.path.exists(found[1])
    finally:
        if found and os.path.exists(found[1]):
            os.unlink(found[1])
