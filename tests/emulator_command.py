"""`python -m ebsfs.emulator` in a process of its own, as a user starts it: what a test
runs when the server must not share the test's interpreter (its threads, its GIL)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def emulator_command(arguments: list[str], url_file: Path) -> Iterator[str]:
    """Starts the emulator with `arguments` (plus --url-file), waits at most 30 s for
    it to listen, yields its URL, and stops it however the test ended."""
    command = [sys.executable, "-m", "ebsfs.emulator", *arguments, "--url-file", str(url_file)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(600):
            if url_file.exists() and url_file.read_text().endswith("\n"):
                break
            assert process.poll() is None, f"the emulator exited: {process.communicate()[1]!r}"
            time.sleep(0.05)
        else:
            raise AssertionError("the emulator did not listen within 30 s")
        yield url_file.read_text().strip()
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()
