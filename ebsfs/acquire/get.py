"""`ebsfs get`: a verified, resumable copy of a snapshot with its custody manifest, a
thin face over the read engine. This module runs one copy: the plan (plan.py), the
engine, the target, the journal, the pipeline (copy.py), and the manifest at the end.

Resume: each written block is recorded in the journal (journal.py). Running the same
command again re-reads the recorded blocks from the output, checks each against its
record (a mismatch is fetched again), and fetches only the rest. An incremental copy
(`--base-image`) takes every block that ListChangedBlocks does not name from the base
image (base.py), checked against the base's manifest. Until the manifest is written
the image is not done: a regular file is OUTPUT.part until then.

A resumed run first makes sure its target is the one the journal's run was writing
(identity.py): another file or disk under the same name is refused in one line."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import trio

from ebsfs.acquire.base import BaseImage
from ebsfs.acquire.copy import Copy
from ebsfs.acquire.identity import check_resume, identify, new_nonce
from ebsfs.acquire.journal import Journal, JournalState
from ebsfs.acquire.manifest import BlockListWriter, Manifest, side_file_path, write_manifest
from ebsfs.acquire.plan import CopyPlan, GetRequest, Layout, patient, preflight, window_for
from ebsfs.acquire.progress import Progress, QuietProgress
from ebsfs.acquire.sources import Origin, disk_cache_section, write_only
from ebsfs.acquire.target import (
    DeviceTarget,
    FileTarget,
    Target,
    TargetKind,
    failure,
    open_target,
)
from ebsfs.constants import BLOCK_SIZE, __version__
from ebsfs.engine import engine
from ebsfs.engine.config import EngineConfig
from ebsfs.engine.engine import Engine
from ebsfs.errors import EbsfsError, first_leaf
from ebsfs.service.api import EbsApi

__all__ = ["GetRequest", "GetResult", "get"]

log = logging.getLogger(__name__)


@dataclass
class GetResult:
    manifest: Manifest
    manifest_path: str
    output: str
    already_done: bool = False
    """The output was a finished copy already: nothing was fetched or written."""
    throttles: int = 0
    """Throttling answers the service gave this run (all waited out)."""


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def get(
    config: EngineConfig,
    request: GetRequest,
    progress: Progress | None = None,
    api: EbsApi | None = None,
) -> GetResult:
    """Copy a snapshot as `request` says, resuming an unfinished run of the same copy.
    Raises typed EbsfsErrors; nothing downloaded is lost on any of them."""
    progress = progress or QuietProgress()
    layout = Layout.of(request)
    done, resume = preflight(request, layout)
    if done is not None:
        return GetResult(done, layout.manifest, layout.output, already_done=True)
    base = BaseImage(request.base_image, request.base_manifest) if request.base_image else None
    snapshot, note = request.metadata() if request.metadata else (None, None)
    window = window_for(config)
    # Blocks are written and hashed once, never read again: the cache need only hold
    # the window (more would only fault in fresh memory, docs/performance.md).
    config = dataclasses.replace(config, cache_size=min(config.cache_size, window * BLOCK_SIZE))
    config = patient(config)
    try:
        the_engine = engine.connect(config, [request.snapshot_id], share_lineage=False, api=api)
        image = the_engine.images[request.snapshot_id]
        if request.cache_write_only:
            write_only(image)
        if base is not None:
            base.check(request.snapshot_id, image.size)
        plan = CopyPlan(
            image,
            layout,
            window,
            config.read_timeout,
            config.connection.retry.throttle_budget or 0.0,
            base=base,
            resume=resume,
            sha256=request.image_hash,
            md5=request.md5,
            snapshot=snapshot,
            snapshot_note=note,
            cache_write_only=request.cache_write_only,
        )
        return _run(the_engine, plan, progress)
    finally:
        if base is not None:
            base.close()


def _open_journal(plan: CopyPlan, target: FileTarget | DeviceTarget) -> Journal:
    """The journal of this run, locked: the unfinished run's state, or a new one."""
    journal = Journal(plan.layout.stem)
    state = plan.resume or JournalState(
        snapshot_id=plan.image.snapshot_id,
        output=os.path.abspath(plan.layout.output),
        volume_size=plan.image.size,
        started=utc_now(),
        ebsfs_version=__version__,
    )
    journal.lock(new=plan.resume is None)
    try:
        _identify(plan, target, state)
    except BaseException:
        journal.close()
        raise
    state.runs += 1
    if plan.image.disk is not None:
        section = disk_cache_section(plan.image.disk.tier, plan.cache_write_only, 0)
        state.disk_cache = {k: v for k, v in section.items() if k != "blocks"}
    journal.state = state
    journal.save(state)
    return journal


def _identify(plan: CopyPlan, target: FileTarget | DeviceTarget, state: JournalState) -> None:
    """Check a resumed run's target is the journal's (refused in one line if not; an
    earlier run's zeroing forgotten where it cannot be proven), and record it, a
    device with a new fingerprint where it has none of this copy's."""
    current = identify(target.fd)
    device = target if isinstance(target, DeviceTarget) else None
    trusted = True
    # A .part this run created holds nothing of an earlier run's: nothing to check.
    if plan.resume is not None and not (isinstance(target, FileTarget) and target.created):
        found = device.fingerprint_found() if device is not None else None
        start_over = f"{plan.layout.stem}.part*"
        trusted = check_resume(state.target, current, found, target.name, start_over)
        if not trusted and state.zeroed_through:
            log.info("%s: identity not proven: zeroing it again", target.name)
            state.zeroed_through = 0
    if device is not None and device.unrecorded is not None:
        fingerprint = state.target.fingerprint if trusted and state.target else None
        if fingerprint is None:
            fingerprint = new_nonce()
            device.stamp(fingerprint)  # durable before the journal names it
        current.fingerprint = fingerprint
    state.target = current


def _run(the_engine: Engine, plan: CopyPlan, progress: Progress) -> GetResult:
    layout = plan.layout
    target = open_target(layout.kind, layout.output, plan.image.size)
    journal = None
    try:
        if isinstance(target, FileTarget | DeviceTarget):
            journal = _open_journal(plan, target)
        started = journal.state.started if journal and journal.state else utc_now()
        try:
            blocks = BlockListWriter(
                f"{layout.stem}.part.blocks",
                plan.image.snapshot_id,
                sources=plan.image.disk is not None
                or bool(journal and journal.state and journal.state.disk_cache is not None),
            )
        except OSError as err:
            raise failure("cannot create", f"{layout.stem}.part.blocks", err) from err
        copy = Copy(plan, target, journal, blocks, progress)
        try:
            trio.run(_copy_with_base, the_engine, copy)
            _finish(target, journal)
            manifest = _manifest(the_engine, copy, started)
            write_manifest(layout.manifest, manifest)
        except BaseException:
            blocks.discard()
            raise
        if isinstance(target, FileTarget):
            target.publish()
        if journal is not None:
            journal.remove()
        manifest.path = layout.manifest
        throttles = the_engine.stats.throttles
        return GetResult(manifest, layout.manifest, layout.output, throttles=throttles)
    except OSError as err:
        raise failure("cannot write", getattr(err, "filename", None) or target.name, err) from err
    finally:
        progress.close()
        target.close()
        if journal is not None:
            journal.close()


def _finish(target: Target, journal: Journal | None) -> None:
    """Everything on stable storage; a device's fingerprint retired in the journal
    before its block gets its own bytes (a run cut short after that resumes, trusting
    only what re-reads right, instead of finding no fingerprint and refusing)."""
    target.flush()
    state = journal.state if journal is not None else None
    if journal is not None and state and state.target and state.target.fingerprint:
        state.target = dataclasses.replace(state.target, fingerprint=None)
        journal.save(state)
    target.finish()


async def _copy_with_base(the_engine: Engine, copy: Copy) -> None:
    try:
        if copy.base is not None:
            diff = await the_engine.diff(copy.base.snapshot_id, copy.image.snapshot_id)
            copy.base.start(diff.ranges())
        await copy.run()
    except BaseExceptionGroup as group:  # the first real failure, typed, for the CLI
        leaf = first_leaf(group)
        if isinstance(leaf, EbsfsError | OSError):
            raise leaf from None
        raise


def _manifest(the_engine: Engine, copy: Copy, started: str) -> Manifest:
    plan, layout = copy.plan, copy.plan.layout
    section = copy.blocks.finish(side_file_path(layout.manifest))
    counts = copy.counts.as_json()
    counts["runs"] = copy.state.runs if copy.state else 1
    return Manifest(
        snapshot_id=plan.image.snapshot_id,
        volume_size=plan.image.size,
        block_size=BLOCK_SIZE,
        written_blocks=copy.blocks.count,
        sha256=copy.sha256.hexdigest() if copy.sha256 else None,
        md5=copy.md5.hexdigest() if copy.md5 else None,
        started=started,
        finished=utc_now(),
        ebsfs_version=__version__,
        region=getattr(the_engine.api, "region", None),
        endpoint=getattr(the_engine.api, "endpoint_url", None),
        output=("-" if layout.kind is TargetKind.STREAM else os.path.abspath(layout.output)),
        blocks=section,
        snapshot=plan.snapshot,
        snapshot_note=plan.snapshot_note,
        base=plan.base.describe() if plan.base is not None else None,
        counts=counts,
        disk_cache=_disk_cache(the_engine, copy),
    )


def _disk_cache(the_engine: Engine, copy: Copy) -> dict[str, Any] | None:
    """The manifest's `disk_cache` section: this run's cache, else that of the latest
    earlier run of the copy that had one (its blocks are still in the image)."""
    taken = copy.blocks.by_source.get(Origin.DISK_CACHE, 0)
    if the_engine.disk is not None:
        return disk_cache_section(the_engine.disk, copy.plan.cache_write_only, taken)
    earlier = copy.state.disk_cache if copy.state is not None else None
    return None if earlier is None else {**earlier, "blocks": taken}
