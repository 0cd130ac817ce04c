"""The checks before an engine exists (engine/plan.py): several snapshots at once with a
deterministic error, and what they hand on to the engine so that starting costs no call
twice (the first page of each block index, the botocore session)."""

from __future__ import annotations

import pytest
import trio

from ebsfs.emulator import SnapshotStore
from ebsfs.engine import plan as planning
from ebsfs.engine.config import EngineConfig
from ebsfs.engine.engine import build, connect
from ebsfs.errors import SnapshotNotFound
from ebsfs.service.session import ConnectionOptions
from tests.fakes import StoreApi, pattern_block

SNAPSHOTS = ["snap-0a", "snap-0b", "snap-0c"]


def store_api() -> StoreApi:
    store = SnapshotStore()
    for n, snapshot_id in enumerate(SNAPSHOTS):
        store.add_snapshot(snapshot_id, {0: pattern_block(n, 0), 3: pattern_block(n, 3)})
    return StoreApi(store)


def test_each_snapshot_is_checked_once_and_its_first_page_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(planning, "FIRST_PAGES_KEPT", 2)
    api = store_api()
    checked = planning.plan(EngineConfig(), SNAPSHOTS, share_lineage=False, api=api)
    assert checked.snapshots == [(s, 1024**3) for s in SNAPSHOTS]
    assert api.calls["ListSnapshotBlocks"] == 3
    # The first two keep their page from block 0 (both blocks on it); the third not.
    assert sorted(checked.first_pages) == SNAPSHOTS[:2]
    assert [i for i, _ in checked.first_pages["snap-0a"].blocks] == [0, 3]


def test_the_first_missing_snapshot_in_the_order_given_is_the_error() -> None:
    api = store_api()
    ids = ["snap-0a", "snap-0dead1", "snap-0b", "snap-0dead2"]
    for _ in range(5):  # checked in parallel: the error must not depend on who answers first
        with pytest.raises(SnapshotNotFound, match="snap-0dead1"):
            planning.plan(EngineConfig(), ids, share_lineage=False, api=api)


def test_reading_block_zero_after_the_checks_lists_nothing() -> None:
    api = store_api()
    engine = connect(EngineConfig(), ["snap-0a"], api=api)
    listed = api.calls["ListSnapshotBlocks"]
    image = engine.images["snap-0a"]

    async def read() -> bytes:
        return bytes(await image.read(0, 4096))

    assert trio.run(read) == bytes(pattern_block(0, 0)[:4096])
    assert api.calls["ListSnapshotBlocks"] == listed == 1
    assert api.calls["GetSnapshotBlock"] == 1


def test_the_engines_client_is_made_from_the_checks_session() -> None:
    options = ConnectionOptions(endpoint_url="http://127.0.0.1:9", region="us-east-1")
    config = EngineConfig(connection=options)
    checker = planning.BotoEbsApi(options)  # what plan() makes when given no api
    checked = planning.Plan([("snap-0a", 1024**3)], {}, session=checker.session)
    engine = build(config, checked)
    assert engine.api.session is checker.session  # type: ignore[attr-defined]
    alone = build(config, planning.Plan([("snap-0a", 1024**3)], {}))
    assert alone.api.session is not checker.session  # type: ignore[attr-defined]


def test_block_zero_comes_with_the_checks_and_is_not_fetched_again() -> None:
    api = store_api()
    assert not planning.plan(EngineConfig(), ["snap-0a"], api=api).first_blocks
    assert api.calls["GetSnapshotBlock"] == 0  # only when asked (ebsfs get fetches nothing)
    api = store_api()
    checked = planning.plan(EngineConfig(), ["snap-0a"], api=api, fetch_first_block=True)
    assert api.calls["GetSnapshotBlock"] == 1
    assert bytes(checked.first_blocks["snap-0a"][0].data) == bytes(pattern_block(0, 0))
    engine = build(EngineConfig(), checked, api)
    image = engine.images["snap-0a"]

    async def read() -> bytes:
        return bytes(await image.read(0, 8192)) + bytes(await image.read(3 * 524288, 16))

    assert trio.run(read) == bytes(pattern_block(0, 0)[:8192]) + bytes(pattern_block(0, 3)[:16])
    assert api.calls["GetSnapshotBlock"] == 2  # block 3 only: block 0 came with the checks
    assert engine.stats.blocks_fetched == 2


def test_the_first_partitions_head_comes_with_the_checks_and_waits_in_the_cache() -> None:
    """Block 2 (1 MiB, where partitioning tools start the first partition) is fetched
    beside block 0 when written; the engine moves both into its cache when it starts
    (held beside it, they would be memory outside the cache's bound)."""
    store = SnapshotStore()
    store.add_snapshot("snap-0a", {i: pattern_block(0, i) for i in (0, 2, 5)})
    api = StoreApi(store)
    checked = planning.plan(EngineConfig(), ["snap-0a"], api=api, fetch_first_block=True)
    assert sorted(checked.first_blocks["snap-0a"]) == [0, 2]
    assert sorted(i for _, i in api.block_gets) == [0, 2]
    engine = build(EngineConfig(), checked, api)
    image = engine.images["snap-0a"]

    async def main() -> bytes:
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            assert ("snap-0a", 0) in engine.cache and ("snap-0a", 2) in engine.cache
            assert not image._first_blocks
            data = bytes(await image.read(2 * 524288 + 1024, 16))
            nursery.cancel_scope.cancel()
        return data

    assert trio.run(main) == bytes(pattern_block(0, 2)[1024:1040])
    assert api.block_gets == {("snap-0a", 0): 1, ("snap-0a", 2): 1}  # no call again
    assert engine.stats.blocks_fetched == 2


def test_no_block_is_fetched_beside_the_checks_with_a_disk_cache(tmp_path) -> None:
    """The disk cache may hold them: a call beside the checks is one it would save."""
    store = SnapshotStore()
    store.add_snapshot("snap-0a", {i: pattern_block(0, i) for i in (0, 2, 5)})
    api = StoreApi(store)
    config = EngineConfig(cache_dir=str(tmp_path / "cache"))
    checked = planning.plan(config, ["snap-0a"], api=api, fetch_first_block=True)
    assert checked.first_blocks == {} and not api.block_gets


def test_block_zero_of_a_snapshot_served_through_its_base_is_not_fetched_beside_the_checks() -> (
    None
):
    store = SnapshotStore()
    store.add_snapshot("snap-0a", {0: pattern_block(0, 0), 3: pattern_block(0, 3)})
    store.add_snapshot(
        "snap-0b", {0: pattern_block(0, 0), 3: pattern_block(1, 3)}, parent="snap-0a"
    )
    api = StoreApi(store)
    checked = planning.plan(EngineConfig(), ["snap-0a", "snap-0b"], api=api, fetch_first_block=True)
    assert checked.bases == {"snap-0b": "snap-0a"}
    assert sorted(checked.first_blocks) == ["snap-0a"]  # 0b's block 0 may be 0a's
    assert [s for s, _ in api.block_gets] == ["snap-0a"]


def test_a_hostile_answer_to_block_zero_beside_the_checks_costs_nothing_but_the_call() -> None:
    """Crafted: the server answers the checks' block 0 with a body that fails its
    checksum. Nothing is kept from it: the mount's engine fetches block 0 itself and
    reads the snapshot's true bytes."""
    from ebsfs.errors import ChecksumMismatch
    from tests.fakes import FailingApi

    inner = store_api()
    first_get = [True]

    def plan_failures(_: int, operation: str) -> Exception | None:
        if operation == "GetSnapshotBlock" and first_get[0]:
            first_get[0] = False
            return ChecksumMismatch("SHA-256 of the body does not match x-amz-Checksum")
        return None

    api = FailingApi(inner, plan_failures)
    checked = planning.plan(EngineConfig(), ["snap-0a"], api=api, fetch_first_block=True)
    assert checked.first_blocks == {} and not first_get[0]
    engine = build(EngineConfig(), checked, api)
    data = trio.run(engine.images["snap-0a"].read, 0, 4096)
    assert bytes(data) == bytes(pattern_block(0, 0)[:4096])
