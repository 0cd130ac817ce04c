"""The emulator in a process of its own, started as a user starts it (`python -m
ebsfs.emulator`): for benchmarks and tests whose server must not share their
interpreter (its threads, its GIL). One launcher for both, so they wait for it, report
its failures and stop it alike."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path


class EmulatorDidNotStart(RuntimeError):
    """It exited, or did not listen in time: why, with what it wrote to stderr."""


def start(
    arguments: Sequence[str], timeout: float = 30.0, stderr: Path | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """Start the emulator with `arguments` (not --url-file, added here) and wait until
    it listens: the process and its URL. Its stderr goes to the file `stderr` if given,
    else nowhere. EmulatorDidNotStart if it exits first or does not listen within
    `timeout` seconds (a large image's written blocks are indexed before it listens);
    it is then killed."""
    with tempfile.TemporaryDirectory(prefix="ebsfs-emulator-") as tmp:
        url_file = Path(tmp) / "url"
        command = [sys.executable, "-m", "ebsfs.emulator", *arguments, "--url-file", str(url_file)]
        with open(stderr, "wb") if stderr else contextlib.nullcontext() as errors:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=errors if errors is not None else subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while not (url_file.exists() and url_file.read_text().endswith("\n")):
            if process.poll() is not None:
                raise EmulatorDidNotStart(
                    f"the emulator exited with status {process.returncode}{_said(stderr)}"
                )
            if time.monotonic() > deadline:
                stop(process)
                raise EmulatorDidNotStart(
                    f"the emulator did not listen within {timeout:g} s{_said(stderr)}"
                )
            time.sleep(0.05)
        return process, url_file.read_text().strip()


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop it (SIGTERM, then SIGKILL after 10 s) and reap it."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def running(
    arguments: Sequence[str], timeout: float = 30.0, stderr: Path | None = None
) -> Iterator[str]:
    """`start`, yielding the URL, and `stop` however the caller's block ends."""
    process, url = start(arguments, timeout, stderr)
    try:
        yield url
    finally:
        stop(process)


def _said(stderr: Path | None) -> str:
    if stderr is None or not stderr.exists():
        return ""
    text = stderr.read_text(errors="replace").strip()
    return f": {text[-2000:]}" if text else ""
