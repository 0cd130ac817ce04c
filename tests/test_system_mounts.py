"""`ebsfs mounts` (issue 28): the active ebsfs mounts from /proc/self/mountinfo, each
with its snapshots and serving process, and what it says of a mount whose process is
gone or stopped."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from ebsfs.cli import mounts
from ebsfs.cli.main import main
from ebsfs.emulator import EmulatorServer
from tests.fakes import pattern_block
from tests.mounting import ebsfs, mounted, serving_pid

SNAP_A, SNAP_B, SNAP_C = "snap-0d1", "snap-0d2", "snap-0d3"

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
95 22 0:52 / /mnt/with\\040space rw,nosuid,nodev,relatime shared:50 - fuse.ebsfs ebsfs ro,user_id=0
96 22 0:53 / /home/u/remote rw,nosuid,nodev,relatime shared:51 - fuse.sshfs u@host: rw,user_id=1000
97 22 0:54 / /mnt/plain rw,relatime - fuse ebsfs ro,user_id=0
98 22 0:55 / /mnt/snap rw,relatime - fuse.ebsfs ebsfs ro,user_id=0,group_id=0
"""


def test_mountpoints_are_the_ebsfs_ones_unescaped() -> None:
    assert mounts.mountpoints(MOUNTINFO) == ["/mnt/with space", "/mnt/snap"]
    assert mounts.mountpoints("") == []


def test_no_mounts_is_a_one_line_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO.splitlines()[0] + "\n")
    monkeypatch.setattr(mounts, "MOUNTINFO", str(info))
    assert main(["mounts"]) == 0
    out, err = capsys.readouterr()
    assert (out, err) == ("", "ebsfs: no ebsfs mounts\n")
    assert main(["mounts", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_a_mount_point_that_is_not_ours_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Listed from mountinfo, unreadable: a plain directory has no user.ebsfs.pid."""
    info = tmp_path / "mountinfo"
    info.write_text(f"98 22 0:55 / {tmp_path} rw - fuse.ebsfs ebsfs ro\n")
    monkeypatch.setattr(mounts, "MOUNTINFO", str(info))
    assert main(["mounts", "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry["mountpoint"] == str(tmp_path) and entry["pid"] is None
    assert entry["error"]  # ENODATA's words
    assert main(["mounts"]) == 0
    assert capsys.readouterr().out == f"{tmp_path}  ({entry['error']})\n"


@pytest.fixture
def three_snapshots(emulator: EmulatorServer) -> None:
    for seed, snapshot_id in enumerate((SNAP_A, SNAP_B, SNAP_C), start=1):
        blocks = {i: pattern_block(seed, i) for i in range(4)}
        emulator.store.add_snapshot(snapshot_id, blocks, volume_size_gib=1)


def ours(listed: list[dict], *mountpoints: Path) -> list[dict]:
    """Other tests may mount at the same time: only ours."""
    wanted = {str(m) for m in mountpoints}
    return [m for m in listed if m["mountpoint"] in wanted]


@pytest.mark.mount
def test_lists_active_mounts_with_snapshots_and_pid(
    emulator: EmulatorServer, three_snapshots: None, tmp_path: Path
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    with (
        mounted(emulator.url, [SNAP_A, SNAP_B], first),
        mounted(emulator.url, [SNAP_C], second),
    ):
        result = ebsfs("mounts", "--json")
        assert result.returncode == 0, result.stderr
        assert ours(json.loads(result.stdout), first, second) == [
            {
                "mountpoint": str(first),
                "pid": serving_pid(first),
                "snapshots": [SNAP_A, SNAP_B],
                "error": None,
            },
            {
                "mountpoint": str(second),
                "pid": serving_pid(second),
                "snapshots": [SNAP_C],
                "error": None,
            },
        ]
        text = ebsfs("mounts").stdout.splitlines()
        assert f"{first}  pid {serving_pid(first)}  {SNAP_A} {SNAP_B}" in text
        assert f"{second}  pid {serving_pid(second)}  {SNAP_C}" in text


@pytest.mark.mount
def test_dead_and_stopped_mounts_are_listed_with_the_reason(
    emulator: EmulatorServer, three_snapshots: None, tmp_path: Path
) -> None:
    """Stopped mounts are asked at once: two cost one wait, not two."""
    dead, stopped, also = tmp_path / "dead", tmp_path / "stopped", tmp_path / "also"
    with (
        mounted(emulator.url, [SNAP_A], dead),
        mounted(emulator.url, [SNAP_B], stopped),
        mounted(emulator.url, [SNAP_C], also),
    ):
        os.kill(serving_pid(dead), signal.SIGKILL)
        pids = [serving_pid(stopped), serving_pid(also)]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            result = ebsfs("mounts", "--json")
            took = time.monotonic() - started
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        assert result.returncode == 0, result.stderr
        listed = ours(json.loads(result.stdout), dead, stopped, also)
        waited = f"not answering (no answer in {mounts.ANSWER_TIMEOUT:g} s)"
        assert [m["error"] for m in listed] == [
            "Transport endpoint is not connected",
            waited,
            waited,
        ]
        assert took < 1.8 * mounts.ANSWER_TIMEOUT


def test_a_mount_point_not_in_utf8_elsewhere_breaks_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    info = tmp_path / "mountinfo"
    info.write_bytes(b"97 22 0:54 / /mnt/caf\xe9 rw - ext4 /dev/sdb1 rw\n")
    monkeypatch.setattr(mounts, "MOUNTINFO", str(info))
    assert main(["mounts", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
