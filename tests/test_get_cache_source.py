"""The custody record of `ebsfs get --cache-dir` (issue 26): blocks served from the disk
cache are named as such in the manifest (per block, in its counts, in a `disk_cache`
section), never as fetched; `--cache-dir-write-only` fetches them all; a resumed copy
keeps each recorded block's source; `verify` accepts such manifests and refuses ones
whose sources do not add up."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from ebsfs.acquire import get as acquire
from ebsfs.acquire import manifest
from ebsfs.acquire.verify import verify
from ebsfs.diskcache.keys import Origin, ToStore
from ebsfs.diskcache.store import DiskCache
from ebsfs.emulator import EmulatorServer, SnapshotStore
from ebsfs.engine.config import EngineConfig
from ebsfs.errors import AccessDenied, EbsfsError, ManifestError
from ebsfs.service.api import Block
from ebsfs.service.client import ConnectionOptions
from tests.acquiring import gets
from tests.fakes import StoreApi, pattern_block
from tests.mounting import ebsfs

SNAP = "snap-0cac"
ENDPOINT = "https://ebs.test.invalid"
REGION = "eu-west-3"
BLOCKS = {i: pattern_block(7, i) for i in [*range(0, 12), 40, 41, 100, 2047]}
"""A 1 GiB volume: a dense head, a few scattered blocks, the last one."""


class PlacedApi(StoreApi):
    """The store behind an api that says where its blocks come from (so the disk
    cache keys them by that origin); GetSnapshotBlock calls past `fail_after` are
    refused (a copy cut short)."""

    endpoint_url = ENDPOINT
    region = REGION

    def __init__(self, store: SnapshotStore, fail_after: int | None = None) -> None:
        super().__init__(store)
        self.fail_after = fail_after

    def get_snapshot_block(
        self, snapshot_id: str, index: int, token: str, into: memoryview | None = None
    ) -> Block:
        if self.fail_after is not None and sum(self.block_gets.values()) >= self.fail_after:
            raise AccessDenied("refused by the test")
        return super().get_snapshot_block(snapshot_id, index, token, into)


@pytest.fixture
def store() -> SnapshotStore:
    """SNAP in a store of its own (conftest's, which the emulator fixture serves, is
    replaced: no signature checks needed here)."""
    store = SnapshotStore()
    store.add_snapshot(SNAP, BLOCKS, volume_size_gib=1)
    return store


def run_get(api: StoreApi, cache: Path | None, output: Path, **kw: Any) -> acquire.GetResult:
    config = EngineConfig(
        ConnectionOptions(),
        cache_size=64 * 1024**2,
        max_fetches=4,
        cache_dir=str(cache) if cache is not None else None,
    )
    request = acquire.GetRequest(SNAP, str(output), **kw)
    return acquire.get(config, request, api=api)


def manifest_of(output: Path) -> dict[str, Any]:
    return json.loads(Path(f"{output}.manifest.json").read_text())


def sources(m: dict[str, Any]) -> dict[int, str]:
    """Each listed block's source (the list's third field)."""
    assert all(len(entry) == 3 for entry in m["blocks"]["list"]), m["blocks"]["list"][:3]
    return {entry[0]: entry[2] for entry in m["blocks"]["list"]}


def assert_verifies(output: Path) -> None:
    result = verify(str(output))
    assert result.ok and result.bad_blocks == 0


def seed_cache(cache: Path, indexes: list[int]) -> None:
    """Blocks of SNAP stored in the cache under the api's origin, as an earlier
    session would have left them."""
    disk = DiskCache(str(cache), 64 * 1024**2, origin=Origin(ENDPOINT, REGION))
    try:
        disk.store_many(
            [
                ToStore(
                    SNAP,
                    i,
                    1024**3,
                    BLOCKS[i],
                    base64.b64encode(hashlib.sha256(BLOCKS[i]).digest()).decode(),
                )
                for i in indexes
            ]
        )
    finally:
        disk.close()


def test_first_get_fetches_everything_and_names_the_cache(
    store: SnapshotStore, tmp_path: Path
) -> None:
    api = PlacedApi(store)
    out = tmp_path / "first.img"
    run_get(api, tmp_path / "cache", out)
    m = manifest_of(out)
    assert m["counts"]["fetched_blocks"] == len(BLOCKS)
    assert m["counts"]["disk_cache_blocks"] == 0
    assert set(sources(m).values()) == {"service"}
    assert m["blocks"]["sources"] == {
        "service": len(BLOCKS),
        "disk_cache": 0,
        "base": 0,
        "unknown": 0,
    }
    assert m["disk_cache"] == {
        "directory": str(tmp_path / "cache"),
        "endpoint": ENDPOINT,
        "region": REGION,
        "read": True,
        "blocks": 0,
    }
    assert sum(api.block_gets.values()) == len(BLOCKS)
    assert_verifies(out)


def test_second_get_says_every_block_came_from_the_cache(
    store: SnapshotStore, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    run_get(PlacedApi(store), cache, tmp_path / "first.img")
    api = PlacedApi(store)
    out = tmp_path / "second.img"
    run_get(api, cache, out)
    assert sum(api.block_gets.values()) == 0  # nothing fetched: the cache served all
    m = manifest_of(out)
    assert m["counts"]["fetched_blocks"] == 0  # was len(BLOCKS): "fetched" (the finding)
    assert m["counts"]["disk_cache_blocks"] == len(BLOCKS)
    assert sources(m) == dict.fromkeys(BLOCKS, "disk_cache")
    assert m["blocks"]["sources"]["disk_cache"] == len(BLOCKS)
    assert m["disk_cache"]["blocks"] == len(BLOCKS)
    assert m["disk_cache"]["read"] is True
    assert_verifies(out)


def test_write_only_fetches_everything_again_and_still_stores(
    store: SnapshotStore, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    seed_cache(cache, [0, 1, 2, 40])
    api = PlacedApi(store)
    out = tmp_path / "again.img"
    run_get(api, cache, out, cache_write_only=True)
    assert sum(api.block_gets.values()) == len(BLOCKS)
    m = manifest_of(out)
    assert m["counts"]["fetched_blocks"] == len(BLOCKS)
    assert m["counts"]["disk_cache_blocks"] == 0
    assert set(sources(m).values()) == {"service"}
    assert m["disk_cache"]["read"] is False
    assert m["disk_cache"]["blocks"] == 0
    assert_verifies(out)
    # What it fetched went into the cache: a later copy takes every block from there.
    later = PlacedApi(store)
    run_get(later, cache, tmp_path / "later.img")
    assert sum(later.block_gets.values()) == 0
    assert manifest_of(tmp_path / "later.img")["counts"]["disk_cache_blocks"] == len(BLOCKS)


def cut_short(store: SnapshotStore, cache: Path, out: Path, fetches: int) -> None:
    """A copy with a cache that holds the even blocks, stopped after `fetches` calls."""
    seed_cache(cache, [i for i in BLOCKS if i % 2 == 0])
    with pytest.raises(EbsfsError):
        run_get(PlacedApi(store, fail_after=fetches), cache, out)
    assert os.path.exists(f"{out}.part.json")


@pytest.mark.expected_log(maybe=("refused by the test",))
def test_resumed_copy_keeps_each_blocks_source(store: SnapshotStore, tmp_path: Path) -> None:
    cache, out = tmp_path / "cache", tmp_path / "resumed.img"
    cut_short(store, cache, out, fetches=5)
    api = PlacedApi(store)
    run_get(api, cache, out)
    m = manifest_of(out)
    assert m["counts"]["resumed_blocks"] > 0
    # The even blocks came from the cache, whichever run took them; the odd ones
    # from the service, whichever run fetched them.
    assert sources(m) == {i: "disk_cache" if i % 2 == 0 else "service" for i in BLOCKS}
    cached = sum(1 for i in BLOCKS if i % 2 == 0)
    assert m["disk_cache"]["blocks"] == cached
    assert m["blocks"]["sources"]["disk_cache"] == cached
    assert m["counts"]["disk_cache_blocks"] < cached  # the rest were the first run's
    assert_verifies(out)


@pytest.mark.expected_log(maybe=("refused by the test",))
def test_resumed_write_only_copy_fetches_what_came_from_the_cache(
    store: SnapshotStore, tmp_path: Path
) -> None:
    cache, out = tmp_path / "cache", tmp_path / "strict.img"
    cut_short(store, cache, out, fetches=5)
    api = PlacedApi(store)
    run_get(api, cache, out, cache_write_only=True)
    m = manifest_of(out)
    assert set(sources(m).values()) == {"service"}
    assert m["counts"]["disk_cache_blocks"] == 0
    # Every even block is fetched now (the first run took some from the cache); the
    # odd ones the first run fetched are resumed, not fetched again.
    assert {i for (_, i) in api.block_gets} >= {i for i in BLOCKS if i % 2 == 0}
    assert m["counts"]["resumed_blocks"] > 0
    assert m["disk_cache"]["read"] is False
    assert_verifies(out)


@pytest.mark.expected_log(maybe=("refused by the test",))
def test_journal_of_an_older_version_gives_unknown_sources(
    store: SnapshotStore, tmp_path: Path
) -> None:
    cache, out = tmp_path / "cache", tmp_path / "old.img"
    cut_short(store, cache, out, fetches=5)
    os.unlink(f"{out}.part.origins")  # a journal from before sources were kept
    run_get(PlacedApi(store), cache, out)
    m = manifest_of(out)
    found = sources(m)
    assert m["counts"]["resumed_blocks"] == sum(1 for s in found.values() if s == "unknown")
    assert "unknown" in found.values()
    assert_verifies(out)


def test_get_without_cache_writes_the_manifest_as_before(
    store: SnapshotStore, tmp_path: Path
) -> None:
    out = tmp_path / "plain.img"
    run_get(PlacedApi(store), None, out)
    m = manifest_of(out)
    assert "disk_cache" not in m
    assert all(len(entry) == 2 for entry in m["blocks"]["list"])
    assert m["counts"]["fetched_blocks"] == len(BLOCKS)
    assert_verifies(out)


def rewrite(path: Path, change: Any) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m["disk_cache"].update(blocks=0),  # the list says otherwise
        lambda m: m["blocks"]["list"][0].__setitem__(2, "elsewhere"),
        lambda m: m["blocks"]["list"][0].pop(),  # a source for some blocks only
        lambda m: m.__setitem__("disk_cache", "yes"),
    ],
    ids=["count", "unknown-source", "some-sourced", "section-not-object"],
)
def test_verify_refuses_sources_that_do_not_add_up(
    store: SnapshotStore, tmp_path: Path, change: Any
) -> None:
    cache = tmp_path / "cache"
    run_get(PlacedApi(store), cache, tmp_path / "first.img")
    out = tmp_path / "second.img"
    run_get(PlacedApi(store), cache, out)
    rewrite(Path(f"{out}.manifest.json"), change)
    with pytest.raises(ManifestError):
        verify(str(out))


def test_side_file_names_each_blocks_source(
    store: SnapshotStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past INLINE_BLOCKS the list goes to a side file: a third column there."""
    monkeypatch.setattr(manifest, "INLINE_BLOCKS", 4)
    cache = tmp_path / "cache"
    run_get(PlacedApi(store), cache, tmp_path / "a.img")
    out = tmp_path / "b.img"
    run_get(PlacedApi(store), cache, out)
    m = manifest_of(out)
    side = tmp_path / m["blocks"]["file"]
    lines = [line.split() for line in side.read_text().splitlines() if not line.startswith("#")]
    assert [int(parts[0]) for parts in lines] == sorted(BLOCKS)
    assert {parts[2] for parts in lines} == {"disk_cache"}
    assert m["disk_cache"]["blocks"] == len(BLOCKS)
    assert_verifies(out)


def test_cli_says_where_blocks_came_from(emulator: EmulatorServer, tmp_path: Path) -> None:
    """Through the endpoint and the command line: the summary line and the flag."""
    cache = str(tmp_path / "cache")
    common = ("get", "--endpoint-url", emulator.url, "--cache-dir", cache, SNAP)
    first = ebsfs(*common, str(tmp_path / "a.img"))
    assert first.returncode == 0, first.stderr
    assert f"({len(BLOCKS)} fetched)" in first.stderr
    second = ebsfs(*common, str(tmp_path / "b.img"))
    assert second.returncode == 0, second.stderr
    assert f"(0 fetched, {len(BLOCKS)} from the disk cache)" in second.stderr
    m = manifest_of(tmp_path / "b.img")
    assert m["disk_cache"]["endpoint"] == emulator.url.rstrip("/")
    assert m["disk_cache"]["region"] and m["disk_cache"]["blocks"] == len(BLOCKS)
    before = gets(emulator)
    third = ebsfs(*common, str(tmp_path / "c.img"), "--cache-dir-write-only")
    assert third.returncode == 0, third.stderr
    assert f"({len(BLOCKS)} fetched)" in third.stderr
    assert gets(emulator) - before == len(BLOCKS)
    assert ebsfs("verify", str(tmp_path / "b.img")).returncode == 0


@pytest.mark.expected_log(maybe=("refused by the test",))
def test_resumed_without_the_cache_still_names_it(store: SnapshotStore, tmp_path: Path) -> None:
    """The run that finishes has no --cache-dir: the blocks an earlier run took from the
    cache are still in the image, and the manifest still says which cache."""
    cache, out = tmp_path / "cache", tmp_path / "later.img"
    cut_short(store, cache, out, fetches=5)
    run_get(PlacedApi(store), None, out)
    m = manifest_of(out)
    taken = [i for i, s in sources(m).items() if s == "disk_cache"]
    assert taken and all(i % 2 == 0 for i in taken)
    assert m["disk_cache"] == {
        "directory": str(cache),
        "endpoint": ENDPOINT,
        "region": REGION,
        "read": True,
        "blocks": len(taken),
    }
    assert_verifies(out)


@pytest.mark.expected_log(maybe=("refused by the test",))
def test_a_planted_journal_section_is_refused(store: SnapshotStore, tmp_path: Path) -> None:
    cache, out = tmp_path / "cache", tmp_path / "planted.img"
    cut_short(store, cache, out, fetches=5)
    state = Path(f"{out}.part.json")
    data = json.loads(state.read_text())
    data["disk_cache"]["extra"] = "\x1b]0;forged\x07"
    state.write_text(json.dumps(data))
    with pytest.raises(EbsfsError, match="not an ebsfs journal"):
        run_get(PlacedApi(store), cache, out)
