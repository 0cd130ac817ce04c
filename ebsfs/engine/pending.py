"""One computation per key in flight: later callers wait for the first one's result."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import trio

K = TypeVar("K")
V = TypeVar("V")


class _Flight(Generic[V]):
    __slots__ = ("done", "value", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.value: V | None = None
        self.error: BaseException | None = None


class SingleFlight(Generic[K, V]):
    """Deduplicates concurrent work by key (s3ql's one-fetch-per-block rule).

    Concurrency rule: the dict is only touched between awaits on the trio thread, so
    check-then-insert is atomic. If the first caller is cancelled, waiters are woken
    with no value and run the work themselves; if it fails, they get its error."""

    def __init__(self) -> None:
        self._flights: dict[K, _Flight[V]] = {}

    def __contains__(self, key: K) -> bool:
        return key in self._flights

    def __len__(self) -> int:
        return len(self._flights)

    async def run(self, key: K, work: Callable[[], Awaitable[V]]) -> V:
        while True:
            flight = self._flights.get(key)
            if flight is None:
                break
            await flight.done.wait()
            if flight.error is not None:
                raise flight.error
            if flight.value is not None:
                return flight.value
        flight = _Flight()
        self._flights[key] = flight
        try:
            flight.value = await work()
            return flight.value
        except trio.Cancelled:
            raise
        except Exception as err:
            flight.error = err
            raise
        finally:
            del self._flights[key]
            flight.done.set()
