"""The metadata prefetch's runner (engine/metaprefetch.py) with a fake walker over the
emulator's store: waves in parallel, the budget, stops that never fail a read, room
for the tool's own reads, once per window, the options and the counters."""

from __future__ import annotations

import itertools
import logging
import struct
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trio

import ebsfs
from ebsfs.cli.main import build_parser
from ebsfs.cli.options import engine_config
from ebsfs.constants import BLOCK_SIZE
from ebsfs.emulator import EmulatorServer, Faults, SnapshotStore
from ebsfs.engine.config import EngineConfig, metadata_budget
from ebsfs.engine.engine import Engine
from ebsfs.engine.files import WindowReader
from ebsfs.engine.fsmeta import walkers
from ebsfs.engine.fsmeta.walk import Read, WalkStopped, Wave
from ebsfs.engine.stats import format_report
from ebsfs.errors import ReadFailed, TransientError
from ebsfs.service.api import Block
from tests.fakes import StoreApi, pattern_block

SNAP = "snap-0a"
GIB = 1024**3
MAGIC = b"FAKEFS"


class CountingApi(StoreApi):
    """StoreApi whose GETs take `delay` seconds and count how many are in flight."""

    def __init__(self, store: SnapshotStore, delay: float = 0.0) -> None:
        super().__init__(store)
        self.delay = delay
        self.in_flight = 0
        self.most = 0
        self._gate = threading.Lock()

    def get_snapshot_block(
        self, snapshot_id: str, index: int, token: str, into: memoryview | None = None
    ) -> Block:
        with self._gate:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
        try:
            time.sleep(self.delay)
            return super().get_snapshot_block(snapshot_id, index, token, into)
        finally:
            with self._gate:
                self.in_flight -= 1

    def gets(self) -> int:
        return sum(self.block_gets.values())


class FakeWalker:
    """A filesystem whose head starts with MAGIC; its waves are given. After each wave
    it reads every extent of it (as a real walker parses them)."""

    name = "fakefs"

    def __init__(
        self,
        waves: list[Wave],
        then: Callable[[], None] | None = None,
    ) -> None:
        self.waves = waves
        self.then = then
        self.walks = 0

    def probe(self, head: bytes) -> bool:
        return head.startswith(MAGIC)

    async def walk(self, read: Read, size: int) -> AsyncIterator[Wave]:
        self.walks += 1
        for wave in self.waves:
            yield wave
            for offset, length in wave[:64]:
                await read(offset, length)
        if self.then is not None:
            self.then()


def blocks_wave(indexes: range | list[int]) -> Wave:
    return [(i * BLOCK_SIZE + 100, 200) for i in indexes]


def disk(count: int = 64, head: bytes = MAGIC) -> dict[int, bytes]:
    blocks = {i: pattern_block(1, i) for i in range(count)}
    blocks[0] = head + blocks[0][len(head) :]
    return blocks


def run_engine(
    blocks: dict[int, bytes],
    walker: FakeWalker,
    body: Callable[[Engine, CountingApi], Awaitable[None]],
    delay: float = 0.0,
    **settings: Any,
) -> tuple[Engine, CountingApi]:
    """`body(engine, api)` in a trio loop with the engine running, the fake walker the
    only one it knows."""
    store = SnapshotStore(Faults(seed=1))
    store.add_snapshot(SNAP, blocks, volume_size_gib=1)
    api = CountingApi(store, delay)
    settings.setdefault("cache_size", 256 * BLOCK_SIZE)
    engine = Engine(api, EngineConfig(**settings), [(SNAP, GIB)])
    if engine.metadata is not None:
        engine.metadata.walkers = [walker]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            with trio.fail_after(20):
                await body(engine, api)
            nursery.cancel_scope.cancel()

    trio.run(main)
    return engine, api


def reader(engine: Engine, start: int = 0, length: int = GIB) -> WindowReader:
    return WindowReader(
        engine.images[SNAP], start, length, readahead=False, metadata=engine.metadata
    )


async def settled(engine: Engine, label: str = SNAP) -> dict[str, Any]:
    """The walk's counters once it has ended."""
    while label not in engine.stats.walks or engine.stats.walks[label].state == "running":
        await trio.sleep(0.01)
    return engine.stats.report()["metadata_prefetch"]


# -- waves ------------------------------------------------------------------------------


def test_each_wave_is_fetched_in_parallel_and_the_walker_reads_it_from_memory() -> None:
    walker = FakeWalker([blocks_wave(range(1, 17)), blocks_wave(range(20, 28))])

    async def body(engine: Engine, api: CountingApi) -> None:
        assert bytes(await reader(engine).read(0, 4096)).startswith(MAGIC)
        report = await settled(engine)
        assert report["filesystems"][SNAP] == {
            "filesystem": "fakefs",
            "state": "finished",
            "reason": "",
            "waves": 2,
            "blocks": 24,
        }

    engine, api = run_engine(disk(), walker, body, delay=0.05, max_fetches=16)
    # The walker's reads waited for the wave's own fetches (all 24 counted as prefetched
    # above, none fetched twice below) rather than fetching on their own.
    assert api.most == 8  # the prefetch's own limiter: half of --max-fetches
    assert api.gets() == 25 and max(api.block_gets.values()) == 1  # head + 24, once each
    report = engine.stats.report()["metadata_prefetch"]
    assert (report["blocks"], report["waves"], report["walks_started"]) == (24, 2, 1)
    assert (report["walks_finished"], report["walks_stopped"]) == (1, 0)
    assert report["bytes"] == 24 * BLOCK_SIZE
    text = format_report(engine.stats.report())
    assert "24 blocks prefetched" in text and "fakefs finished, 2 waves, 24 blocks" in text


class HeldBlock(CountingApi):
    """The GET of block `held` waits until some GET of a block in `release_by` starts,
    or `patience` seconds; `released_in_time` says which came first."""

    def __init__(self, store: SnapshotStore, held: int, release_by: set[int]) -> None:
        super().__init__(store)
        self.held, self.release_by = held, release_by
        self.released = threading.Event()
        self.released_in_time: bool | None = None
        self.patience = 5.0

    def get_snapshot_block(
        self, snapshot_id: str, index: int, token: str, into: memoryview | None = None
    ) -> Block:
        if index in self.release_by:
            self.released.set()
        if index == self.held:
            self.released_in_time = self.released.wait(self.patience)
        return super().get_snapshot_block(snapshot_id, index, token, into)


def test_the_next_wave_goes_out_while_the_last_ones_slowest_block_is_on_its_way() -> None:
    """A walker goes on once the blocks it reads are in: the next level's calls do not
    wait behind a slow answer the walker does not need yet (a round trip's tail)."""

    class ParsesTheFirstBlock(FakeWalker):
        async def walk(self, read: Read, size: int) -> AsyncIterator[Wave]:
            yield blocks_wave(range(1, 7))  # block 5 is slow
            await read(1 * BLOCK_SIZE, 100)  # what names the next level
            yield blocks_wave(range(20, 24))
            for i in range(1, 7):  # and now all of the first wave, once it is in
                await read(i * BLOCK_SIZE, 100)

    store = SnapshotStore(Faults(seed=1))
    store.add_snapshot(SNAP, disk(), volume_size_gib=1)
    api = HeldBlock(store, held=5, release_by={20, 21, 22, 23})
    engine = Engine(api, EngineConfig(cache_size=256 * BLOCK_SIZE), [(SNAP, GIB)])
    assert engine.metadata is not None
    engine.metadata.walkers = [ParsesTheFirstBlock([])]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            with trio.fail_after(20):
                await reader(engine).read(0, 10)
                report = await settled(engine)
            nursery.cancel_scope.cancel()
        assert report["filesystems"][SNAP]["state"] == "finished"
        assert report["filesystems"][SNAP]["blocks"] == 10

    trio.run(main)
    assert api.released_in_time  # block 5 was answered only after block 20 was asked
    assert max(api.block_gets.values()) == 1


def test_cached_blocks_and_holes_are_not_fetched_again() -> None:
    blocks = disk(16)  # blocks 16 and up were never written
    walker = FakeWalker([blocks_wave(range(0, 8)), blocks_wave(range(4, 40))])

    async def body(engine: Engine, api: CountingApi) -> None:
        await reader(engine).read(3 * BLOCK_SIZE, 10)  # the tool read block 3 first
        await reader(engine).read(0, 10)
        await settled(engine)

    engine, api = run_engine(blocks, walker, body)
    assert sorted(i for _, i in api.block_gets) == list(range(16))
    assert engine.stats.prefetch_blocks == 14  # not block 0 (the head), nor 3
    # What the walk asked for is known as metadata (read-ahead leaves walks alone)
    assert engine.images[SNAP]._metadata_blocks == {1, 2, *range(4, 16)}


def test_a_walker_parsing_cached_metadata_lets_other_tasks_run_between_its_reads() -> None:
    """Walkers parse on the engine's loop; a wave's reads are cache hits, which return
    without yielding. The runner's read yields at every call, so a walk of a huge MFT or
    inode table never holds the tools' reads back for more than one read's parsing."""
    between: list[int] = []

    class ManyReads(FakeWalker):
        async def walk(self, read: Read, size: int) -> AsyncIterator[Wave]:
            yield blocks_wave(range(1, 5))
            for n in range(200):  # every one a cache hit
                await read(BLOCK_SIZE + n * 4096, 4096)
                between.append(ticks[0])

    walker = ManyReads([])
    ticks = [0]

    async def body(engine: Engine, api: CountingApi) -> None:
        async def ticker() -> None:
            while True:
                ticks[0] += 1
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            await reader(engine).read(0, 4096)
            await settled(engine)
            nursery.cancel_scope.cancel()

    run_engine(disk(), walker, body)
    assert len(between) == 200
    # The ticker ran between most two reads of the walker (trio shuffles each batch of
    # runnable tasks, so not all); with no checkpoint in the runner's read, never.
    assert sum(1 for a, b in itertools.pairwise(between) if b > a) >= 100


# -- the budget -------------------------------------------------------------------------


def test_the_budget_bounds_the_blocks_and_stops_every_walk(
    caplog: pytest.LogCaptureFixture,
) -> None:
    walker = FakeWalker([blocks_wave(range(1, 13)), blocks_wave(range(13, 20))])
    caplog.set_level(logging.INFO, "ebsfs.engine.metaprefetch")

    async def body(engine: Engine, api: CountingApi) -> None:
        await reader(engine).read(0, 10)
        report = await settled(engine)
        assert report["filesystems"][SNAP]["state"] == "stopped"
        assert report["filesystems"][SNAP]["reason"] == "budget spent"
        # Once spent, no other window starts a walk.
        await reader(engine, 32 * BLOCK_SIZE, 16 * BLOCK_SIZE).read(0, 10)
        await trio.sleep(0.1)

    engine, api = run_engine(disk(), walker, body, prefetch_metadata_budget=5 * BLOCK_SIZE)
    assert engine.stats.prefetch_blocks == 5 and api.gets() == 1 + 5 + 1
    assert walker.walks == 1
    spent = [r for r in caplog.records if "budget of 5 blocks" in r.getMessage()]
    assert len(spent) == 1 and spent[0].levelno == logging.INFO


def test_the_default_budget_is_half_the_memory_cache_or_a_quarter_of_the_disk_cache() -> None:
    assert metadata_budget(EngineConfig(cache_size=512 * 1024**2)) == 512
    with_disk = EngineConfig(cache_dir="/nonexistent", cache_dir_size=16 * GIB)
    assert metadata_budget(with_disk) == 8192
    assert metadata_budget(EngineConfig(prefetch_metadata_budget=64 * 1024**2)) == 128


# -- stops --------------------------------------------------------------------------------


def test_walk_stopped_ends_the_walk_and_reads_go_on() -> None:
    def damaged() -> None:
        raise WalkStopped("inode table past the end")

    walker = FakeWalker([blocks_wave(range(1, 4))], then=damaged)

    async def body(engine: Engine, api: CountingApi) -> None:
        await reader(engine).read(0, 10)
        report = await settled(engine)
        assert report["walks_stopped"] == 1
        assert report["filesystems"][SNAP]["reason"] == "inode table past the end"
        assert bytes(await reader(engine).read(9 * BLOCK_SIZE, 4)) == pattern_block(1, 9)[:4]

    run_engine(disk(), walker, body)


@pytest.mark.expected_log(r"ebsfs\.engine\.metaprefetch: snap-0a: metadata prefetch failed")
def test_a_walker_bug_is_logged_once_and_reads_go_on(caplog: pytest.LogCaptureFixture) -> None:
    def bug() -> None:
        raise KeyError("oops")

    walker = FakeWalker([blocks_wave(range(1, 4))], then=bug)
    blocks = disk()
    blocks[8] = MAGIC + blocks[8][len(MAGIC) :]  # a second fake filesystem at block 8

    async def body(engine: Engine, api: CountingApi) -> None:
        await reader(engine).read(0, 10)
        report = await settled(engine)
        assert report["filesystems"][SNAP]["reason"] == "walker failed: KeyError('oops')"
        await reader(engine, 8 * BLOCK_SIZE, 8 * BLOCK_SIZE).read(0, 10)
        report = await settled(engine, f"{SNAP}@{8 * BLOCK_SIZE}")
        assert report["walks_stopped"] == 2
        assert bytes(await reader(engine).read(40 * BLOCK_SIZE, 4)) == pattern_block(1, 40)[:4]

    run_engine(blocks, walker, body)
    warned = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and warned[0].exc_info  # the traceback, once


def test_hostile_waves_end_quickly_with_bounded_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """More extents than a wave may have, negative, empty and overflowing ones, then a
    read outside the filesystem: bounded work, a few blocks, WalkStopped, no exception.
    (The caps are lowered here; at their real values a wave costs about a second.)"""
    from ebsfs.engine import metaprefetch

    monkeypatch.setattr(metaprefetch, "MAX_WAVE_EXTENTS", 20_000)
    monkeypatch.setattr(metaprefetch, "PLAN_SLICE", 1000)

    class Hostile(FakeWalker):
        async def walk(self, read: Read, size: int) -> AsyncIterator[Wave]:
            # Blocks 0-6 over and over, then blocks 7-20 past the cap: never looked at.
            yield [(i % 7 * BLOCK_SIZE, 1) for i in range(20_000)] + blocks_wave(range(7, 21))
            yield [(0, -5), (-10, 5), (GIB - 1, 2**40), (2**62, 2**62), (5 * BLOCK_SIZE, 0)]
            await read(-1, 10)
            while True:
                yield [(0, 1)]

    async def body(engine: Engine, api: CountingApi) -> None:
        await reader(engine).read(0, 10)
        started = time.monotonic()
        report = await settled(engine)
        assert time.monotonic() - started < 5
        walk = report["filesystems"][SNAP]
        assert (walk["state"], walk["reason"]) == ("stopped", "read of 10 bytes at -1 refused")
        assert walk["waves"] == 2

    engine, api = run_engine(disk(), Hostile([]), body)
    assert engine.stats.prefetch_blocks == 6  # blocks 1-6; 2047 was never written


def test_a_wave_looks_at_a_bounded_number_of_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    from ebsfs.engine import metaprefetch

    monkeypatch.setattr(metaprefetch, "MAX_WAVE_BLOCKS", 10)

    class Wide(FakeWalker):
        async def walk(self, read: Read, size: int) -> AsyncIterator[Wave]:
            yield [(0, GIB)]

    async def body(engine: Engine, api: CountingApi) -> None:
        await reader(engine).read(0, 10)
        assert (await settled(engine))["filesystems"][SNAP]["state"] == "finished"

    engine, api = run_engine(disk(), Wide([]), body)
    assert engine.stats.prefetch_blocks == 9  # blocks 1-9 of the first 10 looked at


class FailingBlocks(CountingApi):
    """GETs of the blocks in `failing` fail (a service that keeps failing them)."""

    failing: set[int] = set()

    def get_snapshot_block(
        self, snapshot_id: str, index: int, token: str, into: memoryview | None = None
    ) -> Block:
        if index in self.failing:
            raise TransientError(f"block {index} unavailable")
        return super().get_snapshot_block(snapshot_id, index, token, into)


def run_failing(failing: set[int], walker: FakeWalker, body: Any) -> Engine:
    store = SnapshotStore(Faults(seed=1))
    store.add_snapshot(SNAP, disk(), volume_size_gib=1)
    api = FailingBlocks(store)
    api.failing = failing
    engine = Engine(api, EngineConfig(cache_size=256 * BLOCK_SIZE), [(SNAP, GIB)])
    assert engine.metadata is not None
    engine.metadata.walkers = [walker]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            with trio.fail_after(20):
                await body(engine)
            nursery.cancel_scope.cancel()

    trio.run(main)
    return engine


def test_a_block_the_service_fails_stops_the_walk_not_the_reads() -> None:
    walker = FakeWalker([blocks_wave(range(1, 9)), blocks_wave(range(9, 12))])

    async def body(engine: Engine) -> None:
        await reader(engine).read(0, 10)
        walk = (await settled(engine))["filesystems"][SNAP]
        assert walk["state"] == "stopped" and walk["reason"].startswith("read failed: ")
        assert "block 5 unavailable" in walk["reason"]
        assert walk["waves"] == 1 and walk["blocks"] == 7
        assert bytes(await reader(engine).read(30 * BLOCK_SIZE, 4)) == pattern_block(1, 30)[:4]

    run_failing({5}, walker, body)


def test_a_head_that_cannot_be_read_starts_no_walk() -> None:
    walker = FakeWalker([blocks_wave(range(1, 9))])

    async def body(engine: Engine) -> None:
        with pytest.raises(ReadFailed):
            await reader(engine).read(0, 10)  # the tool's own read reports it
        await trio.sleep(0.2)
        assert engine.stats.walks == {} and walker.walks == 0
        # Nor were the partitions looked for (and found missing for good).
        assert engine.known_partitions(SNAP) is None
        assert bytes(await reader(engine).read(30 * BLOCK_SIZE, 4)) == pattern_block(1, 30)[:4]
        failing.clear()  # the service recovers: the next read of the head walks
        await reader(engine).read(0, 10)
        assert (await settled(engine))["walks_finished"] == 1
        assert engine.known_partitions(SNAP) == []

    failing = {0}
    run_failing(failing, walker, body)


def test_an_extent_over_the_whole_disk_costs_the_budget_and_no_more() -> None:
    class Huge(FakeWalker):
        async def walk(self, read: Read, size: int) -> AsyncIterator[Wave]:
            yield [(-(2**62), 2**63)]
            yield [(0, GIB)]

    async def body(engine: Engine, api: CountingApi) -> None:
        await reader(engine).read(0, 10)
        report = await settled(engine)
        assert report["filesystems"][SNAP]["reason"] == "budget spent"

    engine, api = run_engine(disk(), Huge([]), body, prefetch_metadata_budget=20 * BLOCK_SIZE)
    assert engine.stats.prefetch_blocks == 20 and api.gets() == 21


def test_the_endless_walker_meets_the_wave_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    from ebsfs.engine import metaprefetch

    monkeypatch.setattr(metaprefetch, "MAX_WAVES", 50)

    class Endless(FakeWalker):
        async def walk(self, read: Read, size: int) -> AsyncIterator[Wave]:
            while True:
                yield [(0, 1)]

    async def body(engine: Engine, api: CountingApi) -> None:
        await reader(engine).read(0, 10)
        report = await settled(engine)
        assert report["filesystems"][SNAP]["reason"] == "more than 50 waves"

    run_engine(disk(), Endless([]), body)


# -- the tool's own reads ----------------------------------------------------------------


def test_a_tool_read_during_a_prefetch_gets_a_slot_at_once() -> None:
    """40 blocks at 0.2 s each, 4 at a time, take 2 s; the tool's read of another block
    meanwhile takes one call's time."""
    walker = FakeWalker([blocks_wave(range(1, 41))])

    async def body(engine: Engine, api: CountingApi) -> None:
        await reader(engine).read(0, 10)
        await trio.sleep(0.3)
        assert engine.stats.walks[SNAP].state == "running"
        started = time.monotonic()
        data = await reader(engine).read(50 * BLOCK_SIZE, 4)
        took = time.monotonic() - started
        assert bytes(data) == pattern_block(1, 50)[:4]
        assert took < 0.6, took
        assert engine.stats.walks[SNAP].state == "running"
        await settled(engine)

    engine, api = run_engine(disk(), walker, body, delay=0.2, max_fetches=8)
    assert api.most <= 5  # 4 of the prefetch, 1 of the tool


# -- when it starts --------------------------------------------------------------------------


def test_each_window_is_walked_once_and_only_from_its_head() -> None:
    walker = FakeWalker([blocks_wave(range(1, 3))])

    async def body(engine: Engine, api: CountingApi) -> None:
        await reader(engine).read(5 * BLOCK_SIZE, 10)  # the middle: a file, not a walk
        await trio.sleep(0.1)
        assert engine.stats.walks == {}
        for _ in range(3):
            await reader(engine).read(1024, 1024)  # the superblock, three handles
        await settled(engine)
        await trio.sleep(0.1)

    engine, _ = run_engine(disk(), walker, body)
    assert walker.walks == 1 and list(engine.stats.walks) == [SNAP]


def mbr(parts: list[tuple[int, int]]) -> bytes:
    """A sector of an MBR with primary partitions (first sector, sectors) of type 0x83."""
    sector = bytearray(512)
    for n, (first, count) in enumerate(parts):
        struct.pack_into("<B3sB3sII", sector, 446 + 16 * n, 0, b"", 0x83, b"", first, count)
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def test_an_image_read_walks_the_partition_whose_head_it_touches() -> None:
    """A loop device on the image reads a partition's head at its offset in the image."""
    sectors = BLOCK_SIZE // 512
    blocks = disk(64, head=mbr([(8 * sectors, 16 * sectors), (32 * sectors, 16 * sectors)]))
    blocks[8] = MAGIC + blocks[8][len(MAGIC) :]  # partition 1 holds the fake filesystem
    walker = FakeWalker([blocks_wave(range(1, 4))])
    label = f"{SNAP}-part1"

    async def body(engine: Engine, api: CountingApi) -> None:
        await reader(engine).read(0, 512)  # the partition table: the table is read
        while engine.known_partitions(SNAP) is None:
            await trio.sleep(0.01)
        await trio.sleep(0.1)
        assert engine.stats.walks == {}
        await reader(engine).read(32 * BLOCK_SIZE, 4096)  # partition 2: no filesystem
        await reader(engine).read(8 * BLOCK_SIZE + 1024, 4096)
        await settled(engine, label)
        # The partition file of the same window does not walk it again.
        await reader(engine, 8 * BLOCK_SIZE, 16 * BLOCK_SIZE).read(0, 10)
        await trio.sleep(0.1)

    engine, api = run_engine(blocks, walker, body)
    assert list(engine.stats.walks) == [label] and walker.walks == 1
    assert {i for _, i in api.block_gets} == {0, 8, 9, 10, 11, 32}


def test_prefetch_now_walks_every_filesystem_with_no_read() -> None:
    """The mount's choice (fuse/mount.py): walks start as it serves, before any tool
    reads; the partition table is read first. A partition with no filesystem known
    is probed and left; each window is walked once even if a tool's read comes too."""
    sectors = BLOCK_SIZE // 512
    blocks = disk(64, head=mbr([(8 * sectors, 16 * sectors), (32 * sectors, 16 * sectors)]))
    blocks[8] = MAGIC + blocks[8][len(MAGIC) :]
    walker = FakeWalker([blocks_wave(range(1, 4))])
    label = f"{SNAP}-part1"

    async def body(engine: Engine, api: CountingApi) -> None:
        engine.prefetch_metadata_now()
        engine.prefetch_metadata_now()  # twice: nothing more
        await settled(engine, label)
        await reader(engine, 8 * BLOCK_SIZE, 16 * BLOCK_SIZE).read(1024, 10)
        await trio.sleep(0.1)

    engine, api = run_engine(blocks, walker, body)
    assert list(engine.stats.walks) == [label] and walker.walks == 1
    assert {i for _, i in api.block_gets} == {0, 8, 9, 10, 11, 32}


def test_prefetch_now_walks_a_bare_filesystem_and_nothing_when_off() -> None:
    walker = FakeWalker([blocks_wave(range(1, 3))])

    async def body(engine: Engine, api: CountingApi) -> None:
        engine.prefetch_metadata_now()
        await settled(engine)

    engine, api = run_engine(disk(), walker, body)
    assert list(engine.stats.walks) == [SNAP] and {i for _, i in api.block_gets} == {0, 1, 2}

    async def off(engine: Engine, api: CountingApi) -> None:
        engine.prefetch_metadata_now()
        await trio.sleep(0.2)

    engine, api = run_engine(disk(), walker, off, prefetch_metadata=False)
    assert api.gets() == 0


# -- options ------------------------------------------------------------------------------


def test_off_with_the_option() -> None:
    walker = FakeWalker([blocks_wave(range(1, 9))])

    async def body(engine: Engine, api: CountingApi) -> None:
        await reader(engine).read(0, 10)
        await trio.sleep(0.2)

    engine, api = run_engine(disk(), walker, body, prefetch_metadata=False)
    assert engine.metadata is None and walker.walks == 0 and api.gets() == 1
    assert engine.stats.report()["metadata_prefetch"] == {"enabled": False}
    assert "prefetch off (--no-prefetch-metadata)" in format_report(engine.stats.report())


def test_cli_options_reach_the_engine_config() -> None:
    parser = build_parser()
    args = parser.parse_args(
        ["mount", "--no-prefetch-metadata", "--prefetch-metadata-budget", "64M", SNAP, "/mnt"]
    )
    config = engine_config(args)
    assert config.prefetch_metadata is False
    assert config.prefetch_metadata_budget == 64 * 1024**2
    config = engine_config(parser.parse_args(["diff", "--files", "snap-01", "snap-02"]))
    assert config.prefetch_metadata is True and config.prefetch_metadata_budget is None
    config = engine_config(
        parser.parse_args(["diff", "--prefetch-metadata-budget", "1G", "snap-01", "snap-02"])
    )
    assert config.prefetch_metadata_budget == GIB


@pytest.fixture
def served() -> Any:
    store = SnapshotStore(Faults(list_rate=0, get_rate=0, seed=1))
    store.add_snapshot(SNAP, disk(32), volume_size_gib=1)
    with EmulatorServer(store) as server:
        yield server


def test_ebsfs_open_prefetches_and_can_be_told_not_to(served: EmulatorServer) -> None:
    walker = FakeWalker([blocks_wave(range(1, 11))])
    with ebsfs.open(SNAP, endpoint_url=served.url, readahead=False) as f:
        metadata = f._loop.engine.metadata
        assert metadata is not None
        metadata.walkers = [walker]
        assert f.pread(16, 0).startswith(MAGIC)
        deadline = time.monotonic() + 10
        while f.stats()["metadata_prefetch"]["walks_finished"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert f.stats()["metadata_prefetch"]["blocks"] == 10
    with ebsfs.open(SNAP, endpoint_url=served.url, prefetch_metadata=False) as f:
        assert f._loop.engine.metadata is None
        assert f.stats()["metadata_prefetch"] == {"enabled": False}


def test_walkers_find_by_probe() -> None:
    fake = FakeWalker([])
    assert walkers.find(MAGIC + bytes(100), [fake]) is fake
    assert walkers.find(bytes(65536), [fake]) is None
    assert walkers.find(bytes(65536)) is None  # zeros are no filesystem we know


# -- a real mount, a real walker, sleuthkit ----------------------------------------------

TREE_SNAP = "snap-0e4"


@pytest.fixture(scope="module")
def ext4_tree(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A bare 256 MiB ext4 holding 2,400 small files in 240 directories (mkfs -d)."""
    from tests.disks import build_ext4

    files = {
        f"d{d:03}/s{d % 7}/f{i:02}.txt": b"%d/%d\n" % (d, i) for d in range(240) for i in range(10)
    }
    path = tmp_path_factory.mktemp("metaprefetch") / "tree.img"
    build_ext4(path, 256 * 1024**2, files, "meta", "5e1f0e5e-0000-4000-8000-0000000000e1")
    return path


@pytest.mark.mount
def test_fls_on_a_mount_finds_its_metadata_prefetched(ext4_tree: Any, tmp_path: Any) -> None:
    """`fls -r` through a real mount (20 ms a call), with the prefetch off then on: the
    same listing, and with it on most of the tool's block reads are prefetch hits
    (blocks the tool had to wait a call for, one at a time, fall to under half)."""
    import json
    import os
    import subprocess

    from tests.mounting import mounted

    runs = {}
    for mode in ("off", "on"):
        store = SnapshotStore(
            Faults(
                latency=0.02, list_rate=0, get_rate=0, seed=1, secret_keys={"AKIDTEST": "secret"}
            )
        )
        store.add_image(TREE_SNAP, ext4_tree)
        options = ["--no-prefetch-metadata"] if mode == "off" else []
        with (
            EmulatorServer(store) as server,
            mounted(server.url, [TREE_SNAP], tmp_path / f"mnt-{mode}", *options) as mnt,
        ):
            started = time.monotonic()
            listing = subprocess.run(
                ["fls", "-r", "-p", str(mnt / f"{TREE_SNAP}.img")],
                capture_output=True,
                text=True,
                check=True,
                timeout=300,
            ).stdout
            took = time.monotonic() - started
            report = json.loads(os.getxattr(mnt, "user.ebsfs.stats"))
            prefetch = report["metadata_prefetch"]
            deadline = time.monotonic() + 30
            while mode == "on" and prefetch["walks_started"] > (
                prefetch["walks_finished"] + prefetch["walks_stopped"]
            ):
                assert time.monotonic() < deadline
                time.sleep(0.1)
                report = json.loads(os.getxattr(mnt, "user.ebsfs.stats"))
                prefetch = report["metadata_prefetch"]
        runs[mode] = (listing, took, report)
        print(f"prefetch {mode}: fls -r {took:.2f} s, {json.dumps(prefetch)[:300]}")
        print(f"  GetSnapshotBlock {report['calls']['GetSnapshotBlock']}")
    off_listing, off_took, off = runs["off"]
    on_listing, on_took, on = runs["on"]
    assert on_listing == off_listing and on_listing.count("\n") > 2400
    walk = on["metadata_prefetch"]["filesystems"][TREE_SNAP]
    assert walk["filesystem"] == "ext4" and walk["state"] == "finished", walk
    misses_off = off["blocks_fetched"]
    misses_on = on["blocks_fetched"] - on["metadata_prefetch"]["blocks"]
    print(f"tool misses: {misses_off} off, {misses_on} on; fls {off_took:.2f} s -> {on_took:.2f} s")
    assert misses_on * 2 < misses_off
