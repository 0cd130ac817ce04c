"""Async access to an EbsApi: each blocking call runs in a worker thread under a limiter,
so the trio loop (and with it every FUSE request) never waits on the network."""

from __future__ import annotations

import functools
from typing import Any

import trio

from ebsfs.api import MAX_RESULTS, Block, BlockPage, ChangedPage, EbsApi


class AdaptiveLimit:
    """Additive increase, multiplicative decrease of the calls in flight: halve them
    when the service throttles (at most once a second), add one back after every
    `recover_after` calls that went through without throttling."""

    def __init__(self, limiter: trio.CapacityLimiter, maximum: int, minimum: int = 2,
                 recover_after: int = 16) -> None:
        self.limiter = limiter
        self.maximum = maximum
        self.minimum = min(minimum, maximum)
        self.recover_after = recover_after
        self._clean = 0
        self._last_cut = -1.0

    def throttled(self) -> None:
        now = trio.current_time()
        self._clean = 0
        if now - self._last_cut < 1.0:
            return
        self._last_cut = now
        self.limiter.total_tokens = max(self.minimum, int(self.limiter.total_tokens) // 2)

    def succeeded(self) -> None:
        self._clean += 1
        if self._clean >= self.recover_after and self.limiter.total_tokens < self.maximum:
            self._clean = 0
            self.limiter.total_tokens = int(self.limiter.total_tokens) + 1


class RemoteSnapshots:
    """The EbsApi methods as coroutines. Block fetches and list calls have separate
    limiters so a burst of fetches never starves the index of list calls; the fetch
    limiter shrinks while the service throttles and grows back as it clears."""

    def __init__(self, api: EbsApi, max_fetches: int = 64, max_lists: int = 4) -> None:
        self.api = api
        self.fetch_limiter = trio.CapacityLimiter(max_fetches)
        self.list_limiter = trio.CapacityLimiter(max_lists)
        self.fetch_limit = AdaptiveLimit(self.fetch_limiter, max_fetches)

    @staticmethod
    async def _run(limiter: trio.CapacityLimiter, fn: Any, *args: Any, **kw: Any) -> Any:
        # abandon_on_cancel: a read that timed out answers EIO now; the thread ends on
        # its own within the client's timeouts and releases the limiter then.
        return await trio.to_thread.run_sync(
            functools.partial(fn, *args, **kw), limiter=limiter, abandon_on_cancel=True
        )

    async def list_snapshot_blocks(
        self, snapshot_id: str, start_index: int = 0, next_token: str | None = None,
        max_results: int = MAX_RESULTS,
    ) -> BlockPage:
        return await self._run(
            self.list_limiter, self.api.list_snapshot_blocks, snapshot_id,
            start_index=start_index, next_token=next_token, max_results=max_results,
        )

    async def list_changed_blocks(
        self, first_id: str, second_id: str, start_index: int = 0,
        next_token: str | None = None, max_results: int = MAX_RESULTS,
    ) -> ChangedPage:
        return await self._run(
            self.list_limiter, self.api.list_changed_blocks, first_id, second_id,
            start_index=start_index, next_token=next_token, max_results=max_results,
        )

    async def get_snapshot_block(self, snapshot_id: str, index: int, token: str,
                                 into: memoryview | None = None) -> Block:
        before = self.api.get_throttles
        block: Block = await self._run(
            self.fetch_limiter, self.api.get_snapshot_block, snapshot_id, index, token,
            into=into,
        )
        if self.api.get_throttles > before:
            self.fetch_limit.throttled()
        else:
            self.fetch_limit.succeeded()
        return block
