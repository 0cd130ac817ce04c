"""The README's try-it block runs as written (issue 28): it is taken from README.md and
run by bash with the installed commands on PATH. Only what must differ on a shared
test machine is changed: /tmp paths become the test's own directory, and port 8123 a
free one. Whatever happens, the mount is taken down and the emulator stopped."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mounting import needs_fuse

ROOT = Path(__file__).resolve().parent.parent


def try_it_block() -> str:
    """The shell block after the README's "pasted as it is" sentence."""
    text = (ROOT / "README.md").read_text()
    after = text.index("pasted as it is")
    match = re.search(r"```\n(.*?)```", text[after:], re.S)
    assert match, "the README's try-it block is gone"
    return match.group(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_try_it_block_uses_only_installed_commands() -> None:
    """No `python3 -m`: with pipx, python3 is not the interpreter ebsfs is installed in."""
    block = try_it_block()
    assert "python3 -m" not in block and "ebsfs-demo-disk" in block


@needs_fuse
@pytest.mark.mount
def test_the_readme_try_it_block_runs_as_written(tmp_path: Path) -> None:
    block = try_it_block()
    port = str(free_port())
    script = block.replace("/tmp/", f"{tmp_path}/").replace("8123", port)
    mnt = tmp_path / "snap"
    cleanup = f"rc=$?; fusermount3 -u {mnt} 2>/dev/null || :; kill %1 2>/dev/null || :; exit $rc"
    guarded = f"set -e\ntrap '{cleanup}' EXIT\n" + script
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("AWS_") and key != "LOGS_DIRECTORY"
    }
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    env["LOGS_DIRECTORY"] = str(tmp_path / "logs")
    result = subprocess.run(
        ["bash", "-c", guarded], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "snap-0123456789abcdef0  vol-0123456789abcdef0" in out  # ebsfs ls
    assert "snap-0123456789abcdef0-part1.img" in out and "snap-0123456789abcdef0.img" in out
    assert "GetSnapshotBlock" in out  # ebsfs stats
    assert not os.path.ismount(mnt)
