"""What one `ebsfs get` is to do, decided before any block moves: the request, where
its files go (Layout), the local checks that fail in one line before any call
(preflight: an output already finished, an unfinished copy to resume, a name taken),
and the plan a copy runs by (CopyPlan)."""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ebsfs.acquire.base import BaseImage
from ebsfs.acquire.journal import Journal, JournalState
from ebsfs.acquire.manifest import Manifest, manifest_path, read_manifest
from ebsfs.acquire.target import TargetKind, check_directory
from ebsfs.engine.cache import SLAB_SIZE
from ebsfs.engine.config import EngineConfig, check_snapshot_id
from ebsfs.engine.image import SnapshotImage
from ebsfs.errors import ManifestError, OutputError, UserInputError
from ebsfs.quoting import printable
from ebsfs.service.retry import COPY_THROTTLE_WAIT

SnapshotMetadata = tuple[dict[str, Any] | None, str | None]
"""The snapshot's EC2 metadata for the manifest, and why there is none when there is
none."""


@dataclass
class GetRequest:
    """What to copy where. `output` is a file path, a block device or "-" (standard
    output). The manifest goes to `manifest` (default: OUTPUT.manifest.json, or for a
    device or a stream a file in the state directory: default_manifest)."""

    snapshot_id: str
    output: str
    manifest: str | None = None
    base_image: str | None = None
    base_manifest: str | None = None
    md5: bool = False
    """Also the image's MD5 (the older forensic convention). Off unless asked: it
    takes one core per 0.7 GB/s of image, holes included, 2.4 times the SHA-256's CPU;
    on two cores it made copies 1.2-1.5 times slower (docs/performance.md)."""
    image_hash: bool = True
    """The whole image's SHA-256 (sha256sum's). Without it the manifest still pins
    every byte (each written block's SHA-256, zeros elsewhere) and `verify` checks
    them all; what is saved is hashing every never-written byte, about 0.6 s of one
    core per GiB of volume, which is most of a copy of a mostly empty volume."""
    metadata: Callable[[], SnapshotMetadata] | None = None
    """Asked once local checks passed: the snapshot's EC2 metadata for the manifest
    (service/ec2.py), and why there is none when there is none."""
    cache_write_only: bool = False
    """Take no block from the disk cache (fetch them all, an earlier run's cached
    ones too), still storing what is fetched there: a copy that must not rely on
    bytes an earlier session left on local disk."""


@dataclass
class Layout:
    """The files of one copy: the output, its manifest, the journal stem."""

    kind: TargetKind
    output: str
    manifest: str
    stem: str
    """Journal and spool files are `<stem>.part.*`."""

    @classmethod
    def of(cls, request: GetRequest) -> Layout:
        kind = TargetKind.of(request.output)
        if kind is TargetKind.FILE:
            manifest = request.manifest or manifest_path(request.output)
            stem = request.output
        else:
            manifest = request.manifest or default_manifest(request, kind)
            stem = manifest.removesuffix(".manifest.json")
        return cls(kind, request.output, manifest, stem)


def state_dir() -> str:
    """Where `get` keeps what it has no better place for: /var/lib/ebsfs for root,
    $XDG_STATE_HOME/ebsfs (default ~/.local/state/ebsfs) for others."""
    if os.geteuid() == 0:
        return "/var/lib/ebsfs"
    state = os.environ.get("XDG_STATE_HOME", "")
    if not os.path.isabs(state):  # the XDG specification: a relative one is ignored
        state = os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "ebsfs")


def default_manifest(request: GetRequest, kind: TargetKind) -> str:
    """The manifest of a copy to a device or a stream when --manifest is not given: in
    the state directory, never in the current one (which the user did not name). A
    device's is the same on every run (its resume record goes beside it); a stream's
    is new each time (a stream is never resumed)."""
    if kind is TargetKind.DEVICE:
        where = re.sub(r"[^A-Za-z0-9._]", "_", os.path.realpath(request.output).strip("/"))
        name = f"{request.snapshot_id}-{where.replace('_', '-')}"
    else:
        now = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        name = f"{request.snapshot_id}-stdout-{now}"
    return os.path.join(state_dir(), "get", f"{name}.manifest.json")


def shown(text: str) -> str:
    """`text` from a journal (a file anyone with the directory may have planted) for a
    one-line message: its control characters escaped."""
    return printable(text)


def already_done(layout: Layout, snapshot_id: str) -> Manifest | None:
    """The manifest of a finished copy of this snapshot at this output, if there is one."""
    if not os.path.exists(layout.manifest):
        return None
    try:
        done = read_manifest(layout.manifest)
    except ManifestError:
        return None
    return done if done.snapshot_id == snapshot_id else None


def preflight(request: GetRequest, layout: Layout) -> tuple[Manifest | None, JournalState | None]:
    """Local checks before any call: (a finished copy already there, the state of an
    unfinished run to resume). One-line errors for anything that cannot work."""
    check_snapshot_id(request.snapshot_id)
    if request.md5 and not request.image_hash:
        raise UserInputError(
            "--md5 and --no-image-hash do not go together: the MD5 is a hash of the whole image"
        )
    if layout.kind is TargetKind.STREAM and os.isatty(1):
        raise UserInputError(
            "refusing to write a disk image to a terminal: redirect "
            "standard output or give a file name"
        )
    if layout.kind is TargetKind.FILE:
        check_directory(layout.output, "output")
        if os.path.isdir(layout.output):
            raise OutputError(f"{layout.output} is a directory: give a file name for the image")
    if request.manifest is None and layout.kind is not TargetKind.FILE:
        made_here = os.path.dirname(layout.manifest)
        try:
            os.makedirs(made_here, mode=0o700, exist_ok=True)
        except OSError as err:
            raise OutputError(
                f"cannot create {made_here} for the manifest: {err.strerror or err}; "
                "give --manifest FILE"
            ) from err
    check_directory(layout.manifest, "manifest")
    journal = Journal(layout.stem)
    if layout.kind is not TargetKind.STREAM and journal.exists():
        state = journal.load()
        if state.snapshot_id != request.snapshot_id:
            raise UserInputError(
                f"{layout.output} belongs to an unfinished copy of {shown(state.snapshot_id)} "
                f"({journal.state_path}), not {request.snapshot_id}: finish it with `ebsfs "
                f"get {shown(state.snapshot_id)} {layout.output}`, or remove "
                f"{layout.stem}.part* to discard it"
            )
        if state.output != os.path.abspath(layout.output):
            raise UserInputError(
                f"{journal.state_path} is the record of a copy to "
                f"{shown(state.output)}, not {layout.output}"
            )
        return None, state
    done = already_done(layout, request.snapshot_id)
    if layout.kind is TargetKind.FILE:
        if os.path.exists(layout.output):
            if done is not None:
                return done, None
            raise OutputError(
                f"{layout.output} exists and is not a finished copy of "
                f"{request.snapshot_id}: remove it or choose another name"
            )
        if os.path.lexists(layout.output + ".part"):  # a dangling symlink too
            raise OutputError(
                f"{layout.output}.part exists but no record of an unfinished "
                "copy does: remove it or choose another name"
            )
    if layout.kind is TargetKind.DEVICE and done is not None:
        return done, None
    if os.path.exists(layout.manifest):
        raise OutputError(
            f"manifest {layout.manifest} exists already: remove it or choose "
            "another with --manifest"
        )
    return None, None


def patient(config: EngineConfig) -> EngineConfig:
    """`config` with a throttle budget for its calls (COPY_THROTTLE_WAIT unless its
    retry policy has one): a copy waits out throttling, where a mount's reads keep
    their time limit."""
    retry = config.connection.retry
    if retry.throttle_budget is not None:
        return config
    retry = dataclasses.replace(retry, throttle_budget=COPY_THROTTLE_WAIT)
    connection = dataclasses.replace(config.connection, retry=retry)
    return dataclasses.replace(config, connection=connection)


def window_for(config: EngineConfig) -> int:
    """Blocks a copy holds at once: enough to keep every fetch busy twice over, and up
    to the cache size's worth (in 1 MiB units, the cache's own) beyond that."""
    return max(2 * config.max_fetches, config.cache_size // SLAB_SIZE)


@dataclass
class CopyPlan:
    """One copy, decided: which image, to where, from which base, with which hashes,
    resuming which unfinished run. What the copy (copy.py) and its manifest need."""

    image: SnapshotImage
    layout: Layout
    window: int
    """Blocks held in memory at once (window_for)."""
    read_timeout: float
    """Seconds a block or a page of the block list may take before the copy fails."""
    throttle_budget: float = 0.0
    """Seconds of throttling added to each of those limits at the most (patience.py)."""
    base: BaseImage | None = None
    resume: JournalState | None = None
    """The state of the unfinished run this one continues (preflight), if any."""
    sha256: bool = True
    """The whole image's SHA-256 (GetRequest.image_hash)."""
    md5: bool = False
    """The whole image's MD5 (GetRequest.md5)."""
    snapshot: dict[str, Any] | None = None
    """The snapshot's EC2 metadata, for the manifest."""
    snapshot_note: str | None = None
    """Why the manifest has no EC2 metadata, when it has none."""
    cache_write_only: bool = False
    """GetRequest.cache_write_only."""
