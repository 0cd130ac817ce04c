"""Where log messages go: stderr in the foreground, --log-file, or syslog once the
mount is in the background; how much with -v and -vv. A background mount with no
syslog socket (containers, minimal hosts) logs to a default file instead, so that
"the log says which block and why" always has a log to look in: for root
/var/log/ebsfs/<mount point>.log, for others $XDG_STATE_HOME/ebsfs/ (default
~/.local/state/ebsfs/), or $LOGS_DIRECTORY when set (systemd's LogsDirectory=), the
mount point's path escaped as systemd names mount units (/mnt/snap -> mnt-snap.log).

ebsfs adds one handler of its own to the root logger and replaces only that one when
asked again (the mount's background child, a second `main()` in one process): other
handlers on the root logger (pytest's log capture, an embedding program's) stay."""

from __future__ import annotations

import logging
import logging.handlers
import os
import socket as pysocket
import sys
from typing import Any, TextIO

from ebsfs.quoting import printable

SYSLOG_SOCKET = "/dev/log"
LOG_DIR_ROOT = "/var/log/ebsfs"
"""Where root's background mounts log when there is no syslog (the FHS's place)."""

HANDLER_NAME = "ebsfs.cli"
"""The name of our handler on the root logger, by which a later call finds it."""


class _PrintableFormatter(logging.Formatter):
    """Log messages carry others' text (a server's error, a library's complaint about a
    file name of the snapshot): escaped as ebsfs.quoting.printable, so none of it can
    drive the terminal or forge a log line. A message is one line whatever it holds; a
    traceback keeps its lines, each escaped."""

    def format(self, record: logging.LogRecord) -> str:
        safe = logging.makeLogRecord(record.__dict__)  # other handlers see the original
        safe.exc_text = None  # another handler may have cached it unescaped
        return super().format(safe)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = printable(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:  # noqa: N802
        return "\n".join(printable(line) for line in super().formatException(ei).split("\n"))

    def formatStack(self, stack_info: str) -> str:  # noqa: N802
        return "\n".join(printable(line) for line in stack_info.split("\n"))


class _CurrentStderr(logging.StreamHandler):
    """Writes to sys.stderr as it is at each message, not as it was when the handler
    was made (a caller in the same process may swap it, as pytest does per test)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def syslog_usable(socket: str = SYSLOG_SOCKET) -> bool:
    """Whether a syslog daemon listens on `socket` (absent, or nobody listening: no).
    Asked directly: logging's SysLogHandler says nothing when it cannot connect, and
    then drops every message."""
    for kind in (pysocket.SOCK_DGRAM, pysocket.SOCK_STREAM):  # as SysLogHandler tries
        with pysocket.socket(pysocket.AF_UNIX, kind) as probe:
            try:
                probe.connect(socket)
            except OSError:
                continue
            return True
    return False


def escaped_path(path: str) -> str:
    """`path` as one file name, as `systemd-escape --path` makes it: slashes become
    dashes, anything but ASCII letters, digits, ":", "_" and "." (and a leading ".")
    becomes \\xNN, so two mount points never share a name (/mnt/a-b: mnt-a\\x2db)."""
    trimmed = "/".join(part for part in path.split("/") if part)
    if not trimmed:
        return "-"
    out = []
    for n, byte in enumerate(os.fsencode(trimmed)):
        char = chr(byte)
        if char == "/":
            out.append("-")
        elif (char.isascii() and char.isalnum()) or char in ":_" or (char == "." and n):
            out.append(char)
        else:
            out.append(f"\\x{byte:02x}")
    return "".join(out)


def default_log_dir() -> str:
    """$LOGS_DIRECTORY (what systemd sets for a service with LogsDirectory=; the
    first, if several); else root: /var/log/ebsfs; others: $XDG_STATE_HOME/ebsfs,
    else ~/.local/state/ebsfs (the XDG Base Directory specification's place for
    logs)."""
    given = os.environ.get("LOGS_DIRECTORY", "").split(":")[0]
    if os.path.isabs(given):
        return given
    if os.geteuid() == 0:
        return LOG_DIR_ROOT
    state = os.environ.get("XDG_STATE_HOME", "")
    if not os.path.isabs(state):  # the specification: a relative value is ignored
        state = os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "ebsfs")


def default_log_file(mountpoint: str) -> str:
    """The log file of a background mount at `mountpoint` when syslog is not there."""
    return os.path.join(default_log_dir(), escaped_path(os.path.realpath(mountpoint)) + ".log")


def background_log(log_file: str | None, mountpoint: str) -> str | None:
    """Where a background mount logs: `log_file` if given, None (syslog) when a syslog
    daemon listens, else default_log_file, its directory made (0700) and the file
    created (0600) here, before the fork, so a failure is the mount's one-line error.
    OSError if it cannot be."""
    if log_file or syslog_usable():
        return log_file
    path = default_log_file(mountpoint)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    _create_private(path)
    return path


def _create_private(path: str) -> None:
    """Created 0600 (the umask may take more away): a log names snapshots, paths and
    errors of an acquisition, no other local user's business. An existing file keeps
    its mode (it may be a shared log on purpose)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600))


def setup_logging(verbose: int, log_file: str | None, background: bool) -> None:
    """Log to one place at the level -v asks for. OSError if `log_file` cannot be
    opened (nothing is changed then)."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler: logging.Handler
    if log_file:
        _create_private(log_file)
        handler = logging.FileHandler(log_file)
    elif background and syslog_usable():
        handler = logging.handlers.SysLogHandler(SYSLOG_SOCKET)
    else:
        handler = _CurrentStderr()
    handler.setFormatter(
        _PrintableFormatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    )
    handler.set_name(HANDLER_NAME)
    root = logging.getLogger()
    for ours in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
        root.removeHandler(ours)
        ours.close()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("ebsfs").setLevel(level)
    # botocore warns with a traceback on every failed credential refresh; ebsfs says
    # in one line what failed and what to fix. Its tracebacks are for -v.
    logging.getLogger("botocore.credentials").setLevel(
        logging.ERROR if verbose == 0 else logging.WARNING
    )
    # botocore at DEBUG logs request URLs, and with them block tokens: never raise it.
