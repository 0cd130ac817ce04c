"""Calls from other threads onto the trio thread, many per wake-up.

Why not `TrioToken.run_sync_soon` for each: every call writes a byte to trio's wake-up
socket while holding trio's entry-queue lock. The `send` gives up the GIL and must take
it back before the lock is released, so with dozens of fetch workers and the hashers
of `ebsfs get` finishing hundreds of times a second, threads queue on that lock behind
one waiting for the GIL, and the trio thread drains one byte per call. Here a thread
only appends to a list; the first call after the trio thread last emptied it schedules
one drain, and the drain runs everything posted until then (docs/performance.md)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import trio

_INBOX: trio.lowlevel.RunVar[Inbox] = trio.lowlevel.RunVar("ebsfs_inbox")


class Inbox:
    """Posts `fn(arg)` calls from any thread to run on the trio thread, in order.
    A posted call must not raise (as with run_sync_soon, that would end the run)."""

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self._token = token
        self._lock = threading.Lock()
        self._calls: list[tuple[Callable[[Any], object], Any]] = []
        self._scheduled = False

    def post(self, fn: Callable[[Any], object], arg: Any) -> None:
        """Any thread. Raises trio.RunFinishedError once the run is over."""
        with self._lock:
            self._calls.append((fn, arg))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._token.run_sync_soon(self._drain)
        except BaseException:
            with self._lock:
                self._scheduled = False
            raise

    def _drain(self) -> None:  # trio thread
        with self._lock:
            calls, self._calls = self._calls, []
            self._scheduled = False
        for fn, arg in calls:
            fn(arg)


def current() -> Inbox:
    """The inbox of the running trio loop (trio thread only)."""
    try:
        return _INBOX.get()
    except LookupError:
        inbox = Inbox(trio.lowlevel.current_trio_token())
        _INBOX.set(inbox)
        return inbox
