"""The custody record of an acquisition: OUTPUT.manifest.json, written by `ebsfs get`
when (and only when) the image is complete, and checked by `ebsfs verify`.

It records what was copied (snapshot id, volume size, block size, written blocks),
the SHA-256 of the whole image (unless `get --no-image-hash`; and its MD5, the older
forensic convention, when `get --md5` asked for it), when, with what
(ebsfs version, region, endpoint), the snapshot's EC2 metadata where it could be had,
and the SHA-256 of every written block, in hex: inline for up to INLINE_BLOCKS blocks,
else in a side file (`<stem>.blocks.sha256`, one `INDEX SHA256` line per block,
ascending) whose own SHA-256 the manifest records. A copy that had a disk cache
(`get --cache-dir`) names each block's source as a third field (`service`,
`disk_cache`, `base`; sources.py), sums them up in the block list's `sources`, and
says which cache in a `disk_cache` section: a block from the cache was checked
against the digest stored there, not against this run's answer from the service.
Memory stays bounded whatever the volume: the block list is written and read line
by line."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from ebsfs.acquire.sources import NAMES, Origin
from ebsfs.constants import BLOCK_SIZE
from ebsfs.errors import ManifestError

FORMAT = "ebsfs-manifest/1"
INLINE_BLOCKS = 4096
"""Blocks listed inside the manifest at most (about 300 KB of JSON); more go to a side file."""
MANIFEST_SUFFIX = ".manifest.json"
BLOCKS_SUFFIX = ".blocks.sha256"
SNAPSHOT_ID = re.compile(r"snap-[0-9a-f]{1,59}")
"""engine.config's, without importing the engine (`verify` reads local files only)."""
LINE_MAX = 4096
"""Characters a side file's line may have (its lines have under 150)."""
MANIFEST_MAX = 64 * 1024**2
"""Bytes a manifest may have (one with INLINE_BLOCKS blocks and EC2 metadata has
under 1 MiB): a larger one is not ebsfs's, and is not parsed into memory."""
PRIVATE = 0o600
"""The mode evidence files are created with (the umask may take more away): an image
holds the volume's secrets (keys, password hashes, mail), and its manifest, journal
and block lists pin the volume's contents block by block (a reader can confirm a
guessed file) and carry the snapshot's tags and description. 0644, the mode a
default umask gives, showed them to every local user."""


def private_flags(flags: int) -> int:
    """`flags` for creating an evidence file: created if missing, never through a
    symbolic link (a link planted in a shared directory would redirect the write)."""
    return flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


def open_private(path: str) -> IO[str]:
    """A new text file at `path`, mode PRIVATE (a stale one of the same name replaced)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, private_flags(os.O_WRONLY) | os.O_EXCL, PRIVATE)
    return open(fd, "w", encoding="utf-8")


def manifest_path(output: str) -> str:
    return output + MANIFEST_SUFFIX


def side_file_path(manifest: str) -> str:
    """`disk.img.manifest.json` -> `disk.img.blocks.sha256` (beside the manifest)."""
    stem = manifest[: -len(MANIFEST_SUFFIX)] if manifest.endswith(MANIFEST_SUFFIX) else manifest
    return stem + BLOCKS_SUFFIX


@dataclass
class Manifest:
    """What a manifest says. `blocks` is the block-list section as written: either
    `list` ([index, sha256 hex] pairs) or `file` and `file_sha256`."""

    snapshot_id: str
    volume_size: int
    block_size: int
    written_blocks: int
    sha256: str | None
    """None when the copy was made with --no-image-hash."""
    md5: str | None
    """None unless the copy was made with --md5."""
    started: str
    finished: str
    ebsfs_version: str
    region: str | None
    endpoint: str | None
    output: str
    blocks: dict[str, Any]
    snapshot: dict[str, Any] | None = None
    snapshot_note: str | None = None
    base: dict[str, Any] | None = None
    counts: dict[str, int] = field(default_factory=dict)
    disk_cache: dict[str, Any] | None = None
    """The disk cache the copy used (sources.disk_cache_section); None without one."""
    path: str = ""
    """Where it was read from (not written)."""

    def as_json(self) -> dict[str, Any]:
        data = {
            "format": FORMAT,
            "snapshot_id": self.snapshot_id,
            "volume_size": self.volume_size,
            "block_size": self.block_size,
            "written_blocks": self.written_blocks,
            "sha256": self.sha256,
            "md5": self.md5,
            "started": self.started,
            "finished": self.finished,
            "ebsfs_version": self.ebsfs_version,
            "region": self.region,
            "endpoint": self.endpoint,
            "output": self.output,
            "snapshot": self.snapshot,
            "snapshot_note": self.snapshot_note,
            "base": self.base,
            "counts": self.counts,
            "blocks": self.blocks,
        }
        if self.disk_cache is not None:  # manifests without one stay as they were
            data["disk_cache"] = self.disk_cache
        return data

    @property
    def volume_blocks(self) -> int:
        return -(-self.volume_size // self.block_size)

    def block_digests(self) -> Iterator[tuple[int, bytes]]:
        """(index, SHA-256) of every written block, ascending, from the manifest or its
        side file (whose own SHA-256 is checked first). ManifestError if malformed."""
        if "list" in self.blocks:
            yield from _checked(_inline(self.blocks["list"], self.path), self)
            return
        side = self.side_file()
        expected = self.blocks.get("file_sha256")
        if file_sha256(side) != expected:
            raise ManifestError(
                f"{side} does not match the SHA-256 its manifest "
                f"{self.path} records (changed or truncated)"
            )
        with open(side, encoding="ascii", errors="replace") as f:
            yield from _checked(_lines(f, side), self)

    def side_file(self) -> str:
        name = self.blocks.get("file")
        if not isinstance(name, str) or not name or os.sep in name:
            raise ManifestError(f"{self.path}: no block list")
        return os.path.join(os.path.dirname(os.path.abspath(self.path)), name)


Entry = tuple[int, str, str | None]
"""(index, SHA-256 hex, source or None) of one block-list entry."""


def _inline(entries: Any, where: str) -> Iterator[Entry]:
    if not isinstance(entries, list):
        raise ManifestError(f"{where}: the block list is not a list")
    for entry in entries:
        if not (
            isinstance(entry, list)
            and len(entry) in (2, 3)
            and isinstance(entry[0], int)
            and not isinstance(entry[0], bool)
            and isinstance(entry[1], str)
            and (len(entry) == 2 or entry[2] in NAMES)
        ):
            raise ManifestError(f"{where}: malformed block entry {entry!r:.80}")
        yield entry[0], entry[1], entry[2] if len(entry) == 3 else None


def _lines(f: IO[str], where: str) -> Iterator[Entry]:
    number = 0
    while line := f.readline(LINE_MAX):
        number += 1
        if len(line) == LINE_MAX and not line.endswith("\n"):  # a hostile file's
            raise ManifestError(f"{where}:{number}: line longer than {LINE_MAX} characters")
        if line.startswith("#") or not line.strip():
            continue
        parts = line.split()
        if (
            len(parts) not in (2, 3)
            or not (parts[0].isascii() and parts[0].isdigit())
            or (len(parts) == 3 and parts[2] not in NAMES)
        ):
            raise ManifestError(f"{where}:{number}: expected 'INDEX SHA256 [SOURCE]'")
        yield int(parts[0]), parts[1], parts[2] if len(parts) == 3 else None


def _checked(entries: Iterator[Entry], manifest: Manifest) -> Iterator[tuple[int, bytes]]:
    """The digests, each entry checked; at the end, the count and (for a list with
    sources) the blocks from the disk cache against what the manifest says."""
    previous = -1
    count = 0
    from_cache = 0
    sourced = None
    for index, text, source in entries:
        if sourced is None:
            sourced = source is not None
        if sourced != (source is not None):
            raise ManifestError(
                f"{manifest.path}: block {index}: sources named for some blocks only"
            )
        from_cache += source == Origin.DISK_CACHE
        try:
            digest = bytes.fromhex(text)
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise ManifestError(f"{manifest.path}: block {index}: {text!r:.80} is not a SHA-256")
        if not previous < index < manifest.volume_blocks:
            raise ManifestError(f"{manifest.path}: block {index} out of order or past the volume")
        previous = index
        count += 1
        yield index, digest
    if count != manifest.written_blocks:
        raise ManifestError(
            f"{manifest.path}: lists {count} blocks, says {manifest.written_blocks}"
        )
    said = (manifest.disk_cache or {}).get("blocks")
    if sourced and said is not None and said != from_cache:
        raise ManifestError(
            f"{manifest.path}: lists {from_cache} blocks from the disk cache, says {said!r:.40}"
        )


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError as err:
        raise ManifestError(f"cannot read {path}: {err.strerror}") from err
    return digest.hexdigest()


class BlockListWriter:
    """The per-block list, written line by line in ascending order to a temporary file
    as blocks are hashed; `finish` makes it the manifest's inline list or the side file."""

    def __init__(self, spool_path: str, snapshot_id: str, sources: bool = False) -> None:
        """`sources`: name each block's source (a copy with a disk cache)."""
        self.spool_path = spool_path
        self.count = 0
        self.sources = sources
        self.by_source: dict[str, int] = {}
        """Blocks listed per source (when `sources`)."""
        self._hash = hashlib.sha256()
        self._file = open_private(spool_path)
        self._write(
            f"# ebsfs: SHA-256 of each written {BLOCK_SIZE}-byte block of "
            f"{snapshot_id}: block index (byte offset = index * {BLOCK_SIZE}), "
            "then the hex digest"
            + (", then where its bytes came from (service, disk_cache, base)" if sources else "")
            + "\n"
        )

    def _write(self, text: str) -> None:
        self._file.write(text)
        self._hash.update(text.encode())

    def add(self, index: int, digest: bytes, origin: Origin = Origin.SERVICE) -> None:
        self.count += 1
        if not self.sources:
            self._write(f"{index} {digest.hex()}\n")
            return
        self.by_source[origin.value] = self.by_source.get(origin.value, 0) + 1
        self._write(f"{index} {digest.hex()} {origin.value}\n")

    def finish(self, side_path: str) -> dict[str, Any]:
        """The manifest's `blocks` section; the spool becomes the side file when there
        are more than INLINE_BLOCKS blocks, else it is removed."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        section: dict[str, Any] = {"algorithm": "sha256", "encoding": "hex", "count": self.count}
        if self.sources:
            section["sources"] = {o.value: self.by_source.get(o.value, 0) for o in Origin}
        if self.count <= INLINE_BLOCKS:
            with open(self.spool_path, encoding="ascii") as f:
                section["list"] = [
                    [i, h] if s is None else [i, h, s] for i, h, s in _lines(f, self.spool_path)
                ]
            os.unlink(self.spool_path)
            return section
        os.replace(self.spool_path, side_path)
        section["file"] = os.path.basename(side_path)
        section["file_sha256"] = self._hash.hexdigest()
        return section

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.spool_path)


def write_manifest(path: str, manifest: Manifest) -> None:
    """Atomically: a reader sees no manifest or the whole of it, never a part. Each
    block of an inline list on a line of its own."""
    data = manifest.as_json()
    entries = data["blocks"].get("list")
    if entries is None:
        write_text_atomic(path, json.dumps(data, indent=1) + "\n")
        return
    placeholder = '"@blocks@"'
    text = json.dumps({**data, "blocks": {**data["blocks"], "list": "@blocks@"}}, indent=1)
    listing = (
        "[\n" + ",\n".join(f"   {json.dumps(entry)}" for entry in entries) + "\n  ]"
        if entries
        else "[]"
    )
    write_text_atomic(path, text.replace(placeholder, listing) + "\n")


def write_json_atomic(path: str, data: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open_private(tmp) as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    sync_directory(path)


def sync_directory(path: str) -> None:
    """Make a rename in `path`'s directory durable."""
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _section(value: object) -> dict[str, Any] | None:
    """A manifest's `disk_cache` section: an object or absent (TypeError if not)."""
    if value is None or isinstance(value, dict):
        return value
    raise TypeError("disk_cache")


def read_manifest(path: str) -> Manifest:
    """The manifest at `path`, or ManifestError saying why it cannot be used."""
    try:
        with open(path, encoding="utf-8") as f:
            if os.fstat(f.fileno()).st_size > MANIFEST_MAX:
                raise ManifestError(f"{path} is too large to be an ebsfs manifest")
            data = json.load(f)
    except FileNotFoundError:
        raise ManifestError(
            f"no manifest {path} (a copy is finished only once `ebsfs get` "
            "has written its manifest)"
        ) from None
    except OSError as err:
        raise ManifestError(f"cannot read manifest {path}: {err.strerror}") from err
    except ValueError as err:
        raise ManifestError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ManifestError(f"{path} is not an ebsfs manifest ({FORMAT})")
    try:
        manifest = Manifest(
            snapshot_id=str(data["snapshot_id"]),
            volume_size=int(data["volume_size"]),
            block_size=int(data["block_size"]),
            written_blocks=int(data["written_blocks"]),
            sha256=None if data["sha256"] is None else str(data["sha256"]),
            md5=None if data["md5"] is None else str(data["md5"]),
            started=str(data["started"]),
            finished=str(data["finished"]),
            ebsfs_version=str(data["ebsfs_version"]),
            region=data.get("region"),
            endpoint=data.get("endpoint"),
            output=str(data.get("output", "")),
            blocks=dict(data["blocks"]),
            snapshot=data.get("snapshot"),
            snapshot_note=data.get("snapshot_note"),
            base=data.get("base"),
            counts=dict(data.get("counts") or {}),
            disk_cache=_section(data.get("disk_cache")),
            path=path,
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ManifestError(f"{path}: missing or malformed field {err}") from err
    if not SNAPSHOT_ID.fullmatch(manifest.snapshot_id):  # printed by `verify`
        raise ManifestError(f"{path}: snapshot_id is not a snapshot id")
    if manifest.block_size != BLOCK_SIZE or manifest.volume_size <= 0:
        raise ManifestError(
            f"{path}: block size {manifest.block_size} or volume size "
            f"{manifest.volume_size} is not one of an EBS snapshot"
        )
    return manifest
