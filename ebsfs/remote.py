"""Async access to an EbsApi: each blocking call runs in a worker thread under a limiter,
so the trio loop (and with it every FUSE request) never waits on the network."""

from __future__ import annotations

import functools
from typing import Any

import trio

from ebsfs.client import MAX_RESULTS, BlockPage, ChangedPage, EbsApi


class RemoteSnapshots:
    """The EbsApi methods as coroutines. Block fetches and list calls have separate
    limiters so a burst of fetches never starves the index of list calls."""

    def __init__(self, api: EbsApi, max_fetches: int = 64, max_lists: int = 4) -> None:
        self.api = api
        self.fetch_limiter = trio.CapacityLimiter(max_fetches)
        self.list_limiter = trio.CapacityLimiter(max_lists)

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
        return await self._run(  # type: ignore[no-any-return]
            self.list_limiter, self.api.list_snapshot_blocks, snapshot_id,
            start_index=start_index, next_token=next_token, max_results=max_results,
        )

    async def list_changed_blocks(
        self, first_id: str, second_id: str, start_index: int = 0,
        next_token: str | None = None, max_results: int = MAX_RESULTS,
    ) -> ChangedPage:
        return await self._run(  # type: ignore[no-any-return]
            self.list_limiter, self.api.list_changed_blocks, first_id, second_id,
            start_index=start_index, next_token=next_token, max_results=max_results,
        )

    async def get_snapshot_block(self, snapshot_id: str, index: int, token: str) -> bytes:
        return await self._run(  # type: ignore[no-any-return]
            self.fetch_limiter, self.api.get_snapshot_block, snapshot_id, index, token
        )
