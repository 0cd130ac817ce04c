"""Helpers for the real-mount tier: run the `ebsfs` command, always unmount."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

needs_fuse = pytest.mark.mount
"""The `mount` marker under the name the tests have used: tests/conftest.py skips these
where root or /dev/fuse is missing, and `-m "not mount"` leaves them out."""


def ebsfs(
    *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run_module("ebsfs", *args, timeout=timeout, env=env)


def run_module(
    module: str, *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=env,
    )


def serving_pid(mountpoint: Path) -> int:
    try:
        return int(os.getxattr(mountpoint, "user.ebsfs.pid"))
    except OSError:
        return 0


def wait_gone(pid: int, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


def force_unmount(mountpoint: Path) -> None:
    """Whatever happened, leave no mount and no process behind."""
    pid = serving_pid(mountpoint) if os.path.ismount(mountpoint) else 0
    if os.path.ismount(mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
    if pid and not wait_gone(pid, 10):
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid, 5)


_LOG_LINE = re.compile(r"^\S+ \S+ \d+ (WARNING|ERROR|CRITICAL) (\S+): (.*)$")


def replay_log(log_file: Path) -> None:
    """Re-log the mount process's WARNING and ERROR lines in the test process, where
    the test suite's log check sees them (tests/conftest.py)."""
    if not log_file.exists():
        return
    for line in log_file.read_text(errors="replace").splitlines():
        match = _LOG_LINE.match(line)
        if match:
            logging.getLogger(f"mount.{match[2]}").log(
                logging.getLevelNamesMapping()[match[1]], "%s", match[3]
            )


@contextlib.contextmanager
def mounted(
    url: str, snapshot_ids: list[str], mountpoint: Path, *options: str, launcher: str = "ebsfs"
) -> Iterator[Path]:
    """A real mount through the command line (`python -m LAUNCHER mount ...`), always
    unmounted; its log is checked like the test's own."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    log_file = mountpoint.parent / f"{mountpoint.name}.log"
    if "--log-file" in options:
        log_file = Path(options[options.index("--log-file") + 1])
    else:
        options = (*options, "--log-file", str(log_file))
    try:
        result = run_module(
            launcher, "mount", "--endpoint-url", url, *options, *snapshot_ids, str(mountpoint)
        )
        assert result.returncode == 0, result.stderr
        yield mountpoint
    finally:
        force_unmount(mountpoint)
        replay_log(log_file)


@contextlib.contextmanager
def fs_mounted(device: str, target: Path) -> Iterator[Path]:
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-o", "ro,noload", device, str(target)], check=True, capture_output=True
    )
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], capture_output=True)


def drop_page_cache() -> None:
    """So the next read goes through FUSE again rather than the kernel's cache."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
