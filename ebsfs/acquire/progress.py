"""What `get` and `verify` report while they run: the Progress protocol (numbers only,
never printed here) and QuietProgress for a caller that shows nothing. The displays
are the command line's (ebsfs/cli/progress.py): output to the terminal may not be
wanted by a library caller."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """What a face shows while a copy or a check runs. Called on the task's own loop or
    thread; must not block."""

    def start(self, total: int, done: int) -> None: ...

    def update(self, done: int, fetched: int) -> None: ...

    def throttled(self, answers: int) -> None:
        """The service has answered `answers` calls so far with throttling (the copy
        waits them out): a display says so, or a stalled bar looks like a hang."""

    def close(self) -> None: ...


class QuietProgress:
    """Nothing shown (--quiet, or a caller with no display)."""

    def start(self, total: int, done: int) -> None:
        pass

    def update(self, done: int, fetched: int) -> None:
        pass

    def throttled(self, answers: int) -> None:
        pass

    def close(self) -> None:
        pass
