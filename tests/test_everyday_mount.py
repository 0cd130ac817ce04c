"""Issue 28, everyday mounts: a background mount with no syslog logs to a default file
it names in its one success line; a non-empty mount point is refused unless asked."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ebsfs.cli import logs
from ebsfs.emulator import EmulatorServer
from tests.acquiring import add
from tests.fakes import pattern_block
from tests.mounting import ebsfs, mounted, needs_fuse, wait_gone

SNAP = "snap-0e28"
BLOCKS = {i: pattern_block(28, i) for i in range(4)}

# In a mount namespace of its own: /dev/log (if any) made useless and /var/log a
# directory of the test's, so the mount finds no syslog and the machine's logs are
# untouched; the FUSE mount lives and is unmounted in there too.
SCRIPT = r"""
set -u
if [ -e /dev/log ]; then mount --bind /dev/null /dev/log; fi
mount --bind "$VARLOG" /var/log
trap 'fusermount3 -u "$MNT" 2>/dev/null' EXIT
"$PYTHON" -m ebsfs mount -v --endpoint-url "$URL" "$SNAP" "$MNT" 2>"$ERR" || exit 3
head -c 1048576 "$MNT/$SNAP.img" | sha256sum > "$SUM"
"$PYTHON" -m ebsfs umount "$MNT"
"""


@needs_fuse
def test_background_mount_without_syslog_logs_where_its_line_says(
    emulator: EmulatorServer, tmp_path: Path
) -> None:
    add(emulator.store, SNAP, BLOCKS, volume_gib=1)
    mnt, varlog = tmp_path / "snap mnt", tmp_path / "varlog"
    mnt.mkdir()
    varlog.mkdir()
    err, digest = tmp_path / "mount.err", tmp_path / "sum"
    env = {
        **os.environ,
        "VARLOG": str(varlog),
        "MNT": str(mnt),
        "PYTHON": sys.executable,
        "URL": emulator.url,
        "SNAP": SNAP,
        "ERR": str(err),
        "SUM": str(digest),
    }
    env.pop("LOGS_DIRECTORY", None)  # the default place, not one a caller chose
    name = logs.escaped_path(str(mnt.resolve())) + ".log"
    log_file = varlog / "ebsfs" / name
    try:
        done = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", SCRIPT],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        _end_the_mount_process(log_file)
    assert done.returncode == 0, (done.stderr, err.read_text() if err.exists() else "")
    lines = err.read_text().splitlines()
    success = [line for line in lines if line.startswith("ebsfs: mounted")]
    assert success == [f"ebsfs: mounted 1 snapshot at {mnt}; log: /var/log/ebsfs/{name}"], lines
    assert "\\x20" in name  # the space of "snap mnt", escaped as systemd does
    assert stat.S_IMODE(log_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(log_file.parent.stat().st_mode) == 0o700
    logged = log_file.read_text()
    assert f"serving 1 snapshot(s) at {mnt}" in logged and f"unmounted {mnt}" in logged
    assert digest.read_text().split()[0]  # the image was read through the mount


def _end_the_mount_process(log_file: Path) -> None:
    """The mount process, if a failure left it running (its pid is in every log line)."""
    if not log_file.exists():
        return
    found = re.search(r"^\S+ \S+ (\d+) ", log_file.read_text(), re.MULTILINE)
    if found and not wait_gone(int(found[1]), 5):
        os.kill(int(found[1]), signal.SIGKILL)


def test_default_log_places(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LOGS_DIRECTORY", raising=False)
    assert logs.escaped_path("/mnt/snap") == "mnt-snap"
    assert logs.escaped_path("/mnt/a-b/") == "mnt-a\\x2db"
    assert logs.escaped_path("/srv/.hidden") == "srv-.hidden"
    assert logs.escaped_path("/.x") == "\\x2ex"
    assert logs.escaped_path("/") == "-"
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert logs.default_log_file("/mnt/snap") == "/var/log/ebsfs/mnt-snap.log"
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert logs.default_log_dir() == str(tmp_path / "state" / "ebsfs")
    monkeypatch.setenv("XDG_STATE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert logs.default_log_dir() == str(tmp_path / ".local" / "state" / "ebsfs")
    monkeypatch.setenv("LOGS_DIRECTORY", f"{tmp_path}/logs:/var/log/other")
    assert logs.default_log_file("/mnt/snap") == str(tmp_path / "logs" / "mnt-snap.log")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert logs.default_log_dir() == str(tmp_path / "logs")


def test_no_syslog_socket_is_unusable(tmp_path: Path) -> None:
    assert not logs.syslog_usable(str(tmp_path / "absent"))
    (tmp_path / "plain").write_text("")
    assert not logs.syslog_usable(str(tmp_path / "plain"))


def test_a_non_empty_mount_point_is_refused_in_one_line(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (mnt / "notes.txt").write_text("mine")
    result = ebsfs("mount", "--endpoint-url", "http://127.0.0.1:9", SNAP, str(mnt))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not empty" in lines[0] and "--nonempty" in lines[0], lines
    assert (mnt / "notes.txt").read_text() == "mine"
    assert "--nonempty" in ebsfs("mount", "--help").stdout


@needs_fuse
def test_nonempty_mounts_over_files_and_leaves_them(
    emulator: EmulatorServer, tmp_path: Path
) -> None:
    add(emulator.store, SNAP, BLOCKS, volume_gib=1)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (mnt / "notes.txt").write_text("mine")
    with mounted(emulator.url, [SNAP], mnt, "--nonempty"):
        assert sorted(os.listdir(mnt)) == [f"{SNAP}.img"]
    assert (mnt / "notes.txt").read_text() == "mine"
