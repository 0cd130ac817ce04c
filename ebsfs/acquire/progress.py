"""Progress of `get` and `verify`: what the copy and the check report (the Progress
protocol: numbers only), and the command line's displays of it. On a terminal, a tqdm
bar with bytes, rate and time left; otherwise a plain line every few seconds, which
logs and CI keep readable; nothing with --quiet.

tqdm because it is small, has no dependencies, is widely kept, and gets rate
smoothing, time left and terminal width right, which our own code would not."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO, Any, Protocol

from tqdm import tqdm

from ebsfs.engine.diff import human


class Progress(Protocol):
    """What a face shows while a copy or a check runs. Called on the task's own loop or
    thread; must not block."""

    def start(self, total: int, done: int) -> None: ...

    def update(self, done: int, fetched: int) -> None: ...

    def close(self) -> None: ...


class BarProgress:
    """A tqdm bar over the image's bytes (the position reached in order)."""

    def __init__(self, label: str, out: IO[str] | None = None) -> None:
        self.label = label
        self.out = out or sys.stderr
        self._bar: tqdm[Any] | None = None
        self._done = 0

    def start(self, total: int, done: int) -> None:
        self._bar = tqdm(total=total, initial=done, unit="B", unit_scale=True,
                         unit_divisor=1024, desc=self.label, file=self.out,
                         dynamic_ncols=True, mininterval=0.5, smoothing=0.1)
        self._done = done

    def update(self, done: int, fetched: int) -> None:
        if self._bar is None or done <= self._done:
            return
        self._bar.update(done - self._done)
        self._done = done
        if fetched:
            self._bar.set_postfix_str(f"{fetched} blocks fetched", refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class LineProgress:
    """`ebsfs: LABEL: 1.2 GiB of 8.0 GiB (15%), 210 MB/s, 35s left, 2400 blocks fetched`
    every `interval` seconds, and once at the end."""

    def __init__(self, label: str, out: IO[str] | None = None, interval: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label = label
        self.out = out or sys.stderr
        self.interval = interval
        self.clock = clock
        self.total = 0
        self._started = self._shown = 0.0
        self._first = 0
        self._done = 0
        self._fetched = 0

    def start(self, total: int, done: int) -> None:
        self.total = total
        self._started = self._shown = self.clock()
        self._first = self._done = done

    def update(self, done: int, fetched: int) -> None:
        self._done, self._fetched = done, fetched
        now = self.clock()
        if now - self._shown >= self.interval:
            self._shown = now
            self._show(now)

    def _show(self, now: float) -> None:
        elapsed = max(now - self._started, 1e-6)
        rate = (self._done - self._first) / elapsed
        share = 100.0 * self._done / self.total if self.total else 100.0
        text = (f"ebsfs: {self.label}: {human(self._done)} of {human(self.total)} "
                f"({share:.0f}%), {rate / 1e6:.0f} MB/s")
        if rate > 0 and self._done < self.total:
            text += f", {_duration((self.total - self._done) / rate)} left"
        if self._fetched:
            text += f", {self._fetched} blocks fetched"
        print(text, file=self.out, flush=True)

    def close(self) -> None:
        """A last line for a run long enough to have shown any, once it is complete (a
        failure's one-line error stays the last word)."""
        if self.total and self._shown > self._started and self._done >= self.total:
            self._show(self.clock())
        self.total = 0


class QuietProgress:
    """Nothing shown (--quiet, or a caller with no display)."""

    def start(self, total: int, done: int) -> None:
        pass

    def update(self, done: int, fetched: int) -> None:
        pass

    def close(self) -> None:
        pass


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_for(label: str, quiet: bool, out: IO[str] | None = None
                 ) -> BarProgress | LineProgress | QuietProgress:
    """The display that suits where standard error goes."""
    out = out or sys.stderr
    if quiet:
        return QuietProgress()
    if out.isatty():
        return BarProgress(label, out)
    return LineProgress(label, out)
