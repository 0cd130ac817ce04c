"""Mount lifecycle: wire the stack, run pyfuse3 under trio, unmount cleanly on
SIGINT/SIGTERM, and `ebsfs umount` (going to the background: cli/background.py)."""

from __future__ import annotations

import gc
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyfuse3
import trio

from ebsfs.engine.engine import Engine
from ebsfs.engine.files import snapshot_nodes
from ebsfs.engine.timeline import VolumeSource, by_time, refresh
from ebsfs.errors import EbsfsError, MountFailed, UserInputError
from ebsfs.fuse.operations import EbsOperations, Ownership

log = logging.getLogger(__name__)


@dataclass
class MountConfig:
    """How to mount; what to read and how lives in the Engine (engine.py)."""

    mountpoint: str
    allow_other: bool = False
    fuse_debug: bool = False
    start_times: dict[str, float] = field(default_factory=dict)
    """Snapshot id -> its StartTime (EC2), shown as its files' mtime."""
    timeline: bool = False
    """Show `by-time/` (`mount --volume`): a link per snapshot named by its StartTime."""
    volume_source: VolumeSource | None = None
    """Asks EC2 for the volumes' snapshots again (`mount --volume`), for refreshes."""
    refresh: float = 0.0
    """Seconds between refreshes (0: never)."""
    of_volumes: list[str] = field(default_factory=list)
    """The snapshots mounted because they are the volumes' (a refresh may take them
    away when deleted; those named on the command line stay)."""
    ownership: Ownership = field(default_factory=Ownership)
    """Owner and modes of every file and directory shown (--uid, --gid, --file-mode,
    --dir-mode): what the kernel checks before it lets another user read."""


def fuse_options(config: MountConfig) -> set[str]:
    options = set(pyfuse3.default_options)
    options |= {"fsname=ebsfs", "subtype=ebsfs", "ro"}
    if config.allow_other:
        options.add("allow_other")
    if config.fuse_debug:
        options.add("debug")
    return options


KERNEL_READAHEAD_KB = 4096


def raise_kernel_readahead(device: int, kib: int = KERNEL_READAHEAD_KB) -> None:
    """Let the kernel read ahead 4 MiB on this mount (default 128 KiB): it then sends
    1 MiB FUSE reads, several at once, instead of 128 KiB ones. Less costs sequential
    readers at the service's latencies (`dd` of a dense disk at 200 ms: 1 MiB 0.73x,
    2 MiB 0.89x), though at 4 MiB a tool reading one file through the image (`icat`)
    has the kernel read up to 8 MiB past its end (docs/performance.md). Needs root;
    without it the default stays. Must run after the FUSE INIT exchange, which resets
    the value."""
    path = f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(kib))
    except OSError as err:
        log.warning(
            "kernel read-ahead of the mount stays at its default, 128 KiB (%s); "
            "sequential reads are about a fifth slower. As root: echo %d > %s",
            err.strerror or err,
            kib,
            path,
        )


class AbandonedReplies(logging.Filter):
    """pyfuse3 logs an ERROR when the kernel no longer wants an answer (ENOENT: the
    reader was interrupted, or readahead was in flight at unmount). Nothing is lost
    and nothing is wrong: keep it for -vv only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "fuse_reply_* failed with No such file or directory" not in record.getMessage():
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger("ebsfs").isEnabledFor(logging.DEBUG)


def serve(engine: Engine, config: MountConfig, on_ready: Callable[[], None]) -> None:
    """Find each snapshot's partitions, mount, call `on_ready`, and serve until
    unmounted or signalled."""
    logging.getLogger("pyfuse3").addFilter(AbandonedReplies())
    initialized = False
    stopped_by_signal = False

    async def main() -> None:
        nonlocal initialized, stopped_by_signal
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            nodes = await snapshot_nodes(engine, config.start_times)
            # A mount is for walking: its filesystems' metadata is on the way before the
            # tool's first read (which comes ~150 ms after the mount returns).
            engine.prefetch_metadata_now()
            ops = EbsOperations(
                nodes,
                stats=engine.stats.report,
                ownership=config.ownership,
                directories=[by_time(_mounted(config.start_times, engine))]
                if config.timeline
                else None,
            )
            try:
                pyfuse3.init(ops, config.mountpoint, fuse_options(config))
            except RuntimeError as err:
                raise MountFailed(f"cannot mount at {config.mountpoint}: {err}") from err
            initialized = True
            ops.invalidate = _invalidate

            async def watch_signals() -> None:
                nonlocal stopped_by_signal
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for signum in signals:
                        log.info("signal %d: unmounting %s", signum, config.mountpoint)
                        stopped_by_signal = True
                        pyfuse3.terminate()
                        return

            async def run_fuse() -> None:
                await pyfuse3.main()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_signals)
            nursery.start_soon(run_fuse)
            if config.volume_source is not None and config.refresh > 0:
                nursery.start_soon(keep_refreshing, engine, ops, config)
            # The mount answers its first request: INIT is done and the loop is serving.
            with trio.fail_after(30):
                root = await trio.to_thread.run_sync(os.stat, config.mountpoint)
            raise_kernel_readahead(root.st_dev)
            # boto3 and botocore leave ~70,000 objects that live as long as the mount;
            # every full collection walked them all (35-45 ms each, docs/performance.md).
            # Frozen, collections see only what serving makes.
            gc.freeze()
            on_ready()
            log.info("serving %d snapshot(s) at %s", len(engine.images), config.mountpoint)

    unmount = True
    try:
        trio.run(main)
        # pyfuse3.main also returns when someone else unmounted (fusermount3 -u).
        unmount = stopped_by_signal
    finally:
        if initialized:
            pyfuse3.close(unmount=unmount)
            log.info("unmounted %s", config.mountpoint)
        engine.close()


async def keep_refreshing(engine: Engine, ops: EbsOperations, config: MountConfig) -> None:
    """Every `refresh` seconds, the snapshots taken since shown (timeline.refresh). A
    failure is logged and tried again next time: the mount goes on as it is."""
    assert config.volume_source is not None
    start_times = dict(config.start_times)
    of_volumes = set(config.of_volumes)
    while True:
        await trio.sleep(config.refresh)
        try:
            found = await refresh(engine, config.volume_source, start_times, of_volumes, ops.in_use)
        except EbsfsError as err:
            log.warning("refresh failed, tried again in %gs: %s", config.refresh, err)
            continue
        except Exception as err:  # a bug: the mount lives on without refreshes
            log.error("refresh failed (no more refreshes): %s", err, exc_info=err)
            return
        if found is not None:
            ops.remove(found.removed)
            ops.add(found.nodes)
            ops.set_links(found.links)


def _invalidate(parent: int, name: bytes) -> None:
    """The kernel forgets a name (a deleted snapshot's file, an old link)."""
    pyfuse3.invalidate_entry_async(parent, name, ignore_enoent=True)


def _mounted(start_times: dict[str, float], engine: Engine) -> dict[str, float]:
    return {s: t for s, t in start_times.items() if s in engine.images}


def unmount(mountpoint: str, lazy: bool = False, timeout: float = 30.0) -> None:
    """Unmount an ebsfs mount and wait for its process to exit."""
    path = os.path.realpath(mountpoint)
    if not os.path.ismount(path):
        raise UserInputError(f"{mountpoint} is not a mount point")
    try:
        pid = int(os.getxattr(path, "user.ebsfs.pid"))
    except OSError:
        pid = 0  # not ebsfs, or its process is gone: unmount anyway
    command = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [path]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        detail = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
        hint = " (files are open; close them or use --lazy)" if "busy" in detail else ""
        raise UserInputError(f"cannot unmount {mountpoint}: {detail}{hint}")
    if pid and not lazy:
        deadline = time.monotonic() + timeout
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            if _is_zombie(pid):
                break
            time.sleep(0.05)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
