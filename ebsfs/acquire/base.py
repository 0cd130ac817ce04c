"""The base of an incremental copy (`ebsfs get --base-image`): a verified copy of an
earlier snapshot of the same volume and its manifest. A block that ListChangedBlocks
does not name is read from the base instead of fetched, and checked against the
base's manifest before it is used."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from typing import Any

from ebsfs.acquire.manifest import file_sha256, manifest_path, read_manifest
from ebsfs.acquire.target import is_block_device
from ebsfs.constants import BLOCK_SIZE
from ebsfs.engine.diff import ChangedRange
from ebsfs.errors import BaseImageMismatch, ManifestError


class BaseImage:
    """A verified copy of an earlier snapshot of the same volume, and its manifest."""

    def __init__(self, path: str, manifest_file: str | None) -> None:
        self.path = path
        self.manifest_path = manifest_file or manifest_path(path)
        try:
            self.manifest = read_manifest(self.manifest_path)
        except ManifestError as err:
            raise BaseImageMismatch(f"base image {path}: {err}") from err
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except OSError as err:
            raise BaseImageMismatch(f"cannot open base image {path}: {err.strerror}") from err
        size = os.lseek(self.fd, 0, os.SEEK_END)
        regular = not is_block_device(path)
        if size < self.manifest.volume_size or (regular and size != self.manifest.volume_size):
            os.close(self.fd)
            raise BaseImageMismatch(
                f"base image {path} holds {size} bytes, its manifest {self.manifest_path} "
                f"says {self.manifest.volume_size}: not the copy the manifest describes"
            )
        self._digests: Iterator[tuple[int, bytes]] | None = None
        self._next: tuple[int, bytes] | None = None
        self._changes: Iterator[ChangedRange] | None = None
        self._change: ChangedRange | None = None

    @property
    def snapshot_id(self) -> str:
        return self.manifest.snapshot_id

    def check(self, snapshot_id: str, volume_size: int) -> None:
        if self.snapshot_id == snapshot_id:
            raise BaseImageMismatch(
                f"base image {self.path} is a copy of {snapshot_id} itself: nothing to fetch"
            )
        if self.manifest.volume_size != volume_size:
            raise BaseImageMismatch(
                f"base image {self.path} is of a {self.manifest.volume_size}-byte volume, "
                f"{snapshot_id} of a {volume_size}-byte one: not the same volume"
            )

    def start(self, changes: Iterator[ChangedRange]) -> None:
        """Begin walking the changed ranges and the base's block list (both ascending)."""
        self._changes = changes
        self._change = next(changes, None)
        self._digests = self.manifest.block_digests()
        self._next = next(self._digests, None)

    def unchanged_digest(self, index: int) -> bytes | None:
        """The base's SHA-256 of block `index` if ListChangedBlocks does not name it
        (so the base holds the same data), else None. Indexes must come ascending."""
        assert self._changes is not None and self._digests is not None
        while self._change is not None and self._change.last_block < index:
            self._change = next(self._changes, None)
        if self._change is not None and self._change.first_block <= index:
            return None
        while self._next is not None and self._next[0] < index:
            self._next = next(self._digests, None)
        if self._next is None or self._next[0] != index:
            raise BaseImageMismatch(
                f"the base manifest {self.manifest_path} lists no block {index}, which is "
                f"unchanged since {self.snapshot_id} and written: the manifest is not that "
                "snapshot's"
            )
        return self._next[1]

    def read_verified(self, index: int, digest: bytes) -> bytes:
        offset = index * BLOCK_SIZE
        try:
            data = os.pread(self.fd, BLOCK_SIZE, offset)
        except OSError as err:
            raise BaseImageMismatch(f"cannot read base image {self.path}: {err.strerror}") from err
        if len(data) != BLOCK_SIZE or hashlib.sha256(data).digest() != digest:
            raise BaseImageMismatch(
                f"base image {self.path} does not match its manifest at block {index} "
                f"(offset {offset}): check it with `ebsfs verify {self.path}`"
            )
        return data

    def describe(self) -> dict[str, Any]:
        return {
            "snapshot_id": self.snapshot_id,
            "image": os.path.abspath(self.path),
            "manifest": os.path.abspath(self.manifest_path),
            "manifest_sha256": file_sha256(self.manifest_path),
            "image_sha256": self.manifest.sha256,
        }

    def close(self) -> None:
        os.close(self.fd)
