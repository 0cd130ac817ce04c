"""What names a block in the disk cache, and what its operations answer: a block is
(origin, snapshot id, index), because a snapshot id names different bytes at two
endpoints (a test emulator, a hostile server, another region): blocks one origin
fetched are never served for another."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

SNAPSHOT_ID = re.compile(r"snap-[0-9a-f]{1,59}")
"""A snapshot id as it may appear in a data file's name (use fullmatch)."""
ORIGIN_KEY = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class Origin:
    """Where blocks come from: the endpoint URL as the client resolved it and the
    region its requests are signed for. Compared exactly: two spellings of one
    endpoint only cost a fetch, never a wrong byte."""

    endpoint: str
    region: str

    @property
    def key(self) -> str:
        """128 bits of SHA-256 of both: the column in the index and part of the data
        files' names (a name the endpoint's text could never inject into)."""
        text = json.dumps([self.endpoint, self.region])
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    @classmethod
    def of(cls, api: object) -> Origin | None:
        """The origin of what `api` fetches, from its `endpoint_url` and `region`; None
        when it does not say (then nothing it fetches may be cached: it could be any
        server's bytes)."""
        endpoint = getattr(api, "endpoint_url", None)
        region = getattr(api, "region", None)
        if not isinstance(endpoint, str) or not endpoint:
            return None
        return cls(endpoint, region if isinstance(region, str) else "")


BlockKey = tuple[str, int]
"""(snapshot id, block index), within the cache's own origin."""


@dataclass(frozen=True)
class Loaded:
    """What a load found: the checksum of a verified hit, or why there was none."""

    checksum: str | None = None
    damaged: bool = False
    data: memoryview | None = None


MISS = Loaded()


@dataclass(frozen=True)
class ToStore:
    """A verified block waiting to be written."""

    snapshot_id: str
    index: int
    volume_size: int
    data: bytes | memoryview
    checksum: str


@dataclass
class Stored:
    """What a batch of stores did."""

    stored: list[BlockKey] = field(default_factory=list)
    present: list[BlockKey] = field(default_factory=list)
    """Stored already (by another process)."""
    evicted: list[BlockKey] = field(default_factory=list)
    """Blocks of this origin evicted to make room."""
    evicted_elsewhere: int = 0
    """Blocks of other origins evicted to make room."""
    full: bool = False
    """The filesystem had no room for some (ENOSPC): they were not kept."""


DATA_NAME = re.compile(r"(snap-[0-9a-f]{1,59})\.([0-9a-f]{32})\.(\d{1,9})")
"""A data file's name in `blocks/` (use fullmatch): snapshot id, origin key, shard."""


def data_name(origin_key: str, snapshot_id: str, shard: int) -> str:
    """The data file of one shard of one origin's snapshot; ValueError for a name that
    is not one (nothing else is ever made in `blocks/`)."""
    name = f"{snapshot_id}.{origin_key}.{shard}"
    if DATA_NAME.fullmatch(name) is None:
        raise ValueError(f"not a cache data file name: {name!r}")
    return name
