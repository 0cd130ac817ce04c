"""Where log messages go: stderr in the foreground, --log-file, or syslog once the
mount is in the background; how much with -v and -vv.

ebsfs adds one handler of its own to the root logger and replaces only that one when
asked again (the mount's background child, a second `main()` in one process): other
handlers on the root logger (pytest's log capture, an embedding program's) stay."""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from typing import Any, TextIO

from ebsfs.quoting import printable

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


def setup_logging(verbose: int, log_file: str | None, background: bool) -> None:
    """Log to one place at the level -v asks for. OSError if `log_file` cannot be
    opened (nothing is changed then)."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler: logging.Handler
    if log_file:
        # Created 0600 (the umask may take more away): the log names snapshots,
        # paths and errors of an acquisition, no other local user's business. An
        # existing file keeps its mode (it may be a shared log on purpose).
        os.close(os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600))
        handler = logging.FileHandler(log_file)
    elif background and os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler("/dev/log")
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
