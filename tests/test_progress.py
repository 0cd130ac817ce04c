"""The command line's progress display (ebsfs/cli/progress.py): for `get` and `verify` a
bar on a terminal, a plain line every few seconds otherwise, nothing with --quiet; for
`diff --files` a status line on a terminal."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

from ebsfs.acquire.progress import QuietProgress
from ebsfs.cli.progress import BarProgress, LineProgress, progress_for
from ebsfs.emulator import EmulatorServer
from tests.acquiring import add, sparse_blocks
from tests.mounting import ebsfs

MIB = 1024**2


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def terminal() -> tuple[int, int]:
    """A pseudo-terminal 100 columns wide (a new one has none)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    return master, slave


def read_all(master: int) -> bytes:
    """What was written to a pseudo-terminal until its other end closed."""
    shown = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: every writer has closed its end
            return shown
        if not chunk:
            return shown
        shown += chunk


def test_a_plain_line_every_few_seconds() -> None:
    out, clock = io.StringIO(), Clock()
    progress = LineProgress("disk.img", out, interval=5.0, clock=clock)
    progress.start(1000 * MIB, 0)
    for second in range(1, 12):
        clock.now += 1
        progress.update(second * 50 * MIB, second * 100)
    lines = out.getvalue().splitlines()
    assert lines == [
        "ebsfs: disk.img: 250.0 MiB of 1000.0 MiB (25%), 52 MB/s, 15s left, 500 blocks fetched",
        "ebsfs: disk.img: 500.0 MiB of 1000.0 MiB (50%), 52 MB/s, 10s left, 1000 blocks fetched",
    ]
    progress.update(1000 * MIB, 2000)
    progress.close()
    assert (
        out.getvalue()
        .splitlines()[-1]
        .startswith("ebsfs: disk.img: 1000.0 MiB of 1000.0 MiB (100%)")
    )


def test_no_last_line_for_a_run_that_failed_or_was_quick() -> None:
    out, clock = io.StringIO(), Clock()
    progress = LineProgress("x", out, clock=clock)
    progress.start(100, 0)
    clock.now += 1
    progress.update(100, 1)
    progress.close()
    assert out.getvalue() == ""


def test_the_display_suits_standard_error() -> None:
    assert isinstance(progress_for("x", quiet=True), QuietProgress)
    assert isinstance(progress_for("x", quiet=False, out=io.StringIO()), LineProgress)
    master, slave = terminal()
    try:
        with os.fdopen(slave, "w") as tty:
            bar = progress_for("x", quiet=False, out=tty)
            assert isinstance(bar, BarProgress)
            bar.start(10 * MIB, 0)
            bar.update(5 * MIB, 3)
            bar.close()
        shown = read_all(master).decode(errors="replace")
    finally:
        os.close(master)
    assert "x:" in shown and "5.00M/10.0M" in shown and "%|" in shown


def test_a_status_line_rewritten_in_place_then_cleared() -> None:
    clock = Clock()
    master, slave = terminal()
    try:
        with os.fdopen(slave, "w") as tty:
            line = BarProgress(out=tty, clock=clock)
            line.status("p1 (ext4): reading the first snapshot's metadata")
            clock.now += 0.1
            line.status("p1 (ext4): too soon to show")
            clock.now += 0.2
            line.status("p1 (ext4): 4096 entries read in the first snapshot")
            line.close()
        shown = read_all(master).decode(errors="replace")
    finally:
        os.close(master)
    assert "ebsfs: p1 (ext4): reading the first snapshot's metadata" in shown
    assert "too soon" not in shown
    assert "ebsfs: p1 (ext4): 4096 entries read in the first snapshot" in shown
    # Cleared at the end: the last thing written is blank up to the line's start.
    assert shown.rstrip(" ").endswith("\r"), repr(shown[-80:])
    assert "\n" not in shown


def test_get_on_a_terminal_shows_a_bar(emulator: EmulatorServer, tmp_path: Path) -> None:
    add(emulator.store, "snap-0ba7", sparse_blocks(1, volume_gib=1), volume_gib=1)
    master, slave = terminal()
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ebsfs",
                "get",
                "--endpoint-url",
                emulator.url,
                "snap-0ba7",
                str(tmp_path / "disk.img"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=slave,
        )
        os.close(slave)
        shown = read_all(master)
        assert proc.wait(120) == 0, shown
    finally:
        os.close(master)
    text = shown.decode(errors="replace")
    assert "disk.img:" in text and "100%|" in text and "1.00G/1.00G" in text
    assert "sha256" in text  # the summary line after the bar


def test_quiet_says_nothing(emulator: EmulatorServer, tmp_path: Path) -> None:
    add(emulator.store, "snap-0ba8", sparse_blocks(2, volume_gib=1), volume_gib=1)
    result = ebsfs(
        "get", "-q", "--endpoint-url", emulator.url, "snap-0ba8", str(tmp_path / "disk.img")
    )
    assert result.returncode == 0 and result.stderr == "" and result.stdout == ""
