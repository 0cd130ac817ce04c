"""Going to the background once ready, as `ebsfs mount` and `ebsfs nbd` do: the
command returns when its server serves, or prints why it could not."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable

from ebsfs.errors import EbsfsError, first_leaf

log = logging.getLogger(__name__)

parent_finished = False
"""Set in the parent once its child serves (or has failed and said why): all that is
left of the command is its last line, so its entry point may end the process without
Python's finalization (cli/main.run)."""


def run_in_background(work: Callable[[Callable[[], None]], None], what: str = "mount") -> int:
    """Fork; the child runs `work(ready)` in a new session. The parent returns 0 once
    the child calls ready(), or prints the child's error and returns 1. `what` names
    the child in messages ("mount": "the mount process failed: ...")."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        global parent_finished
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            message = pipe.read().decode(errors="replace")
        parent_finished = True
        if message.startswith("ok"):
            return 0
        if not message:
            _, status = os.waitpid(pid, 0)
            message = f"the {what} process exited before it was ready (status {status})"
        print(f"ebsfs: error: {message.strip()}", file=sys.stderr)
        return 1
    os.close(read_end)
    os.setsid()
    reported = False

    def ready() -> None:
        nonlocal reported
        os.write(write_end, b"ok\n")
        os.close(write_end)
        reported = True
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)

    code = 0
    try:
        work(ready)
    except BaseException as err:  # the parent prints it; a daemon has no terminal
        code = 1
        leaf = first_leaf(err)
        text = str(leaf) if isinstance(leaf, EbsfsError) else f"{type(leaf).__name__}: {leaf}"
        log.error("%s process failed: %s\n%s", what, text, traceback.format_exc())
        if not reported:
            os.write(write_end, f"the {what} process failed: {text}".encode())
    finally:
        logging.shutdown()
        os._exit(code)
