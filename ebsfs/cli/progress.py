"""The command line's one progress display, for every command that shows progress. On
a terminal, a tqdm bar: over an image's bytes with rate and time left (`get`,
`verify`: the Progress protocol of ebsfs.acquire.progress), or a status line rewritten
in place (`diff --files`: what is being read). Otherwise a plain line every few
seconds, which logs and CI keep readable; nothing with --quiet.

tqdm because it is small, has no dependencies, is widely kept, and gets rate
smoothing, time left and terminal width right, which our own code would not."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

from ebsfs.acquire.progress import QuietProgress
from ebsfs.engine.diff import human

if TYPE_CHECKING:
    from tqdm import tqdm

FALLBACK_COLUMNS = 80
"""A bar's width on a terminal that says it has no columns."""
STATUS_EVERY = 0.2
"""Seconds between two status lines on a terminal, at the least."""


class BarProgress:
    """A tqdm bar over the image's bytes (the position reached in order), or, through
    `status`, one line of text rewritten in place and cleared at `close`."""

    def __init__(
        self,
        label: str = "",
        out: IO[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.out = out or sys.stderr
        self.clock = clock
        self._bar: tqdm[Any] | None = None
        self._done = 0
        self._fetched = 0
        self._throttled = 0
        self._status_shown: float | None = None

    def start(self, total: int, done: int) -> None:
        from tqdm import tqdm  # here: `ebsfs mount` imports this module for `plural`

        self._bar = tqdm(
            total=total,
            initial=done,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=self.label,
            file=self.out,
            **_width(self.out),
            mininterval=0.5,
            smoothing=0.1,
        )
        self._done = done

    def update(self, done: int, fetched: int) -> None:
        if self._bar is None or done <= self._done:
            return
        self._bar.update(done - self._done)
        self._done, self._fetched = done, fetched
        self._postfix(refresh=False)

    def throttled(self, answers: int) -> None:
        """Shown at once: the bar may stand still while the copy waits."""
        self._throttled = answers
        if self._bar is not None:
            self._postfix(refresh=True)

    def _postfix(self, refresh: bool) -> None:
        assert self._bar is not None
        text = _counts(self._fetched, self._throttled)
        if text:
            self._bar.set_postfix_str(text, refresh=refresh)

    def status(self, text: str) -> None:
        """`ebsfs: [LABEL: ]TEXT` in place of the previous status, at most every
        STATUS_EVERY seconds (a faster caller's lines in between are skipped)."""
        now = self.clock()
        if self._status_shown is not None and now - self._status_shown < STATUS_EVERY:
            return
        self._status_shown = now
        line = f"{self.label}: {text}" if self.label else text
        if self._bar is None:
            # No numbers: only the text, cut to the terminal's width by tqdm.
            from tqdm import tqdm

            self._bar = tqdm(
                desc=line,
                bar_format="ebsfs: {desc}",
                file=self.out,
                leave=False,
                **_width(self.out),
            )
        else:
            self._bar.set_description_str(line)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class LineProgress:
    """`ebsfs: LABEL: 1.2 GiB of 8.0 GiB (15%), 210 MB/s, 35s left, 2400 blocks fetched`
    every `interval` seconds, and once at the end."""

    def __init__(
        self,
        label: str,
        out: IO[str] | None = None,
        interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.out = out or sys.stderr
        self.interval = interval
        self.clock = clock
        self.total = 0
        self._started = self._shown = 0.0
        self._first = 0
        self._done = 0
        self._fetched = 0
        self._throttled = 0

    def start(self, total: int, done: int) -> None:
        self.total = total
        self._started = self._shown = self.clock()
        self._first = self._done = done

    def update(self, done: int, fetched: int) -> None:
        self._done, self._fetched = done, fetched
        self._maybe_show()

    def throttled(self, answers: int) -> None:
        self._throttled = answers
        self._maybe_show()

    def _maybe_show(self) -> None:
        now = self.clock()
        if now - self._shown >= self.interval:
            self._shown = now
            self._show(now)

    def _show(self, now: float) -> None:
        elapsed = max(now - self._started, 1e-6)
        rate = (self._done - self._first) / elapsed
        share = 100.0 * self._done / self.total if self.total else 100.0
        text = (
            f"ebsfs: {self.label}: {human(self._done)} of {human(self.total)} "
            f"({share:.0f}%), {rate / 1e6:.0f} MB/s"
        )
        if rate > 0 and self._done < self.total:
            text += f", {_duration((self.total - self._done) / rate)} left"
        counts = _counts(self._fetched, self._throttled)
        if counts:
            text += f", {counts}"
        print(text, file=self.out, flush=True)

    def close(self) -> None:
        """A last line for a run long enough to have shown any, once it is complete (a
        failure's one-line error stays the last word)."""
        if self.total and self._shown > self._started and self._done >= self.total:
            self._show(self.clock())
        self.total = 0


def plural(count: int, noun: str) -> str:
    """`1 block`, `2 blocks`: "1 blocks" reads as a bug."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def throttling(answers: int) -> str:
    """`throttled 3 times (waited out)`: what a copy's display says of throttling."""
    return f"throttled {plural(answers, 'time')} (waited out)"


def _counts(fetched: int, throttled: int) -> str:
    parts = [f"{plural(fetched, 'block')} fetched"] if fetched else []
    if throttled:
        parts.append(throttling(throttled))
    return ", ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_for(
    label: str, quiet: bool, out: IO[str] | None = None
) -> BarProgress | LineProgress | QuietProgress:
    """The display that suits where standard error goes."""
    out = out or sys.stderr
    if quiet:
        return QuietProgress()
    if out.isatty() and columns(out) > 0:
        return BarProgress(label, out)
    # Not a terminal, or one that says it is 0 columns wide (a pty nobody sized, as
    # some CI runners and `script` make): tqdm would draw nothing there at all.
    return LineProgress(label, out)


def _width(out: IO[str]) -> dict[str, Any]:
    """tqdm's width: the terminal's as it changes, or 80 columns where it says 0."""
    return {"dynamic_ncols": True} if columns(out) > 0 else {"ncols": FALLBACK_COLUMNS}


def columns(out: IO[str]) -> int:
    """The width of the terminal `out` writes to (0: unknown)."""
    try:
        return os.get_terminal_size(out.fileno()).columns
    except (OSError, ValueError, AttributeError):  # not a file, closed, no terminal
        return 0
