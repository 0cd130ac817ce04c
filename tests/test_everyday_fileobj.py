"""Issue 28: `ebsfs.open` and `open_snapshots` refuse a keyword value they cannot take
with a ValueError naming the keyword, before anything is loaded or called (it was a
bare TypeError from deep inside the engine)."""

from __future__ import annotations

from typing import Any

import pytest

import ebsfs
from ebsfs import fileobj
from ebsfs.engine.config import EngineConfig
from ebsfs.errors import UserInputError

SNAP = "snap-0e28"


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("cache_size", "banana"),
        ("cache_size", 1.5),
        ("cache_size", True),
        ("cache_size", -1),
        ("max_fetches", "8"),
        ("max_fetches", 0),
        ("cache_dir_size", None),
        ("prefetch_metadata_budget", "64M"),
        ("read_timeout", "60"),
        ("read_timeout", float("nan")),
        ("read_timeout", 0),
        ("request_timeout", float("inf")),
        ("readahead", "no"),
        ("hedge", 0),
        ("direct_get", None),
        ("prefetch_metadata", "yes"),
        ("region", 1),
        ("endpoint_url", b"http://x"),
        ("cache_dir", 3),
    ],
)
def test_bad_keyword_values_raise_value_error_naming_them(keyword: str, value: Any) -> None:
    with pytest.raises(ValueError, match=rf"^{keyword} must be .*, got ") as err:
        ebsfs.open(SNAP, **{"endpoint_url": "http://127.0.0.1:9", keyword: value})
    assert isinstance(err.value, UserInputError)  # what it was for a negative size


def test_snapshot_ids_must_be_a_list_of_ids() -> None:
    with pytest.raises(ValueError, match="^snapshot_ids must be a list"):
        ebsfs.open_snapshots(SNAP, endpoint_url="http://127.0.0.1:9")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="^snapshot_ids must be a list"):
        ebsfs.open_snapshots([SNAP, 7], endpoint_url="http://127.0.0.1:9")  # type: ignore[list-item]


def test_reads_wait_out_throttling_as_long_as_a_read_may_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As the mount: throttling is not 8 attempts and EIO, but waited out within the
    read's time limit."""
    seen: list[EngineConfig] = []

    def capture(config: EngineConfig, *args: Any, **kw: Any) -> list[Any]:
        seen.append(config)
        return [None]

    monkeypatch.setattr(fileobj, "open_with", capture)
    ebsfs.open(SNAP, read_timeout=45.0)
    assert seen[0].connection.retry.throttle_budget == 45.0
    assert seen[0].read_timeout == 45.0
