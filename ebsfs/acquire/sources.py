"""Where the bytes of each block of a copy came from, for its custody record: the
service, the disk cache (`--cache-dir`, bytes some earlier session fetched, maybe
from another run's credentials), or a base image. A block a resumed run re-reads
from the output keeps the source its first run recorded (journal.py).

Why it matters: a block from the disk cache was checked against the SHA-256 stored
beside it in the cache, not against the service's answer of this run; a manifest
that called it fetched would claim more than was done. `get --cache-dir-write-only`
takes nothing from the cache (and fetches again what an earlier run of the copy
took from it), while still storing what it fetches there."""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from ebsfs.engine.disktier import DiskTier, DiskView
from ebsfs.engine.image import SnapshotImage
from ebsfs.service.api import Block


class Origin(StrEnum):
    """Where a block's bytes came from: the third column of the block list."""

    SERVICE = "service"
    DISK_CACHE = "disk_cache"
    BASE = "base"
    UNKNOWN = "unknown"
    """Recorded by a version that did not keep sources (a resumed journal's)."""

    @property
    def code(self) -> bytes:
        """Its byte in the journal's `.part.origins` file (0: not recorded)."""
        return _CODES[self]

    @classmethod
    def of_code(cls, code: int) -> Origin:
        return _ORIGINS.get(code, cls.UNKNOWN)


_CODES = {
    Origin.SERVICE: b"s",
    Origin.DISK_CACHE: b"c",
    Origin.BASE: b"b",
    Origin.UNKNOWN: b"\0",
}
_ORIGINS = {code[0]: origin for origin, code in _CODES.items()}
NAMES = frozenset(o.value for o in Origin)
"""The sources a block list may name (manifest.py checks them)."""
RELIED_ON_CACHE = frozenset({Origin.DISK_CACHE, Origin.UNKNOWN})
"""Recorded sources a write-only run does not trust: fetched again."""


@dataclass
class Counts:
    """Blocks of a run by where they came from (the manifest's `counts`)."""

    fetched: int = 0
    """From the service (GetSnapshotBlock), its SHA-256 checked against its answer."""
    from_disk_cache: int = 0
    """From the disk cache (`--cache-dir`): stored there by an earlier session."""
    from_base: int = 0
    resumed: int = 0
    """Blocks a previous run wrote, re-read and found right."""
    refetched: int = 0
    """Blocks a previous run recorded that did not read back right (fetched again)."""

    def as_json(self) -> dict[str, int]:
        return {
            "fetched_blocks": self.fetched,
            "disk_cache_blocks": self.from_disk_cache,
            "base_blocks": self.from_base,
            "resumed_blocks": self.resumed,
            "refetched_blocks": self.refetched,
        }


class WriteOnlyDisk(DiskView):
    """A snapshot's view of the disk cache that is never read, only written:
    `get --cache-dir-write-only`. Every block is fetched from the service (its
    SHA-256 checked against the service's answer) and still stored for later
    sessions."""

    async def load(self, index: int, room: memoryview | None) -> Block | None:
        return None


def write_only(image: SnapshotImage) -> None:
    """Make `image` fetch every block from the service, still storing into its disk
    cache (if it has one). Before any read of the image."""
    if image.disk is not None:
        image.disk = WriteOnlyDisk(image.disk.tier, image.snapshot_id, image.disk.volume_size)


def from_disk_cache(image: SnapshotImage, index: int) -> bool:
    """Whether block `index`, just obtained through the engine, came from the disk
    cache rather than the service (asked with no await in between)."""
    return image.disk is not None and image.disk.served_from_disk(index)


def disk_cache_section(tier: DiskTier | None, write_only: bool, blocks: int) -> dict[str, Any]:
    """The manifest's `disk_cache` section: which cache directory the copy used,
    the origin (endpoint as resolved, region) its blocks there are keyed by, whether
    it was read, and how many of the image's blocks came from it (all runs)."""
    assert tier is not None
    return {
        "directory": os.path.abspath(tier.cache.path),
        "endpoint": tier.cache.origin.endpoint,
        "region": tier.cache.origin.region,
        "read": not write_only,
        "blocks": blocks,
    }
