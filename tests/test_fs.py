"""The FUSE Operations called directly, with no kernel: names, attributes, errno."""

from __future__ import annotations

import errno
import os
import stat
import threading
import time

import pyfuse3
import pytest
import trio

from ebsfs.constants import BLOCK_SIZE
from ebsfs.emulator import Faults, SnapshotStore
from ebsfs.engine.config import EngineConfig
from ebsfs.engine.engine import Engine
from ebsfs.engine.files import snapshot_nodes
from ebsfs.errors import TransientError
from ebsfs.fuse.operations import ROOT_INODE, EbsOperations
from tests.fakes import FailingApi, StoreApi, pattern_block

GIB = 1024**3


def operations(api, snapshots, bases=None, **settings) -> EbsOperations:
    """What a mount of `snapshots` serves, with no kernel: the engine and its nodes."""
    engine = Engine(api, EngineConfig(**settings), snapshots, bases)
    return EbsOperations(trio.run(snapshot_nodes, engine))


@pytest.fixture
def ops_and_api():
    store = SnapshotStore(Faults(seed=1))
    store.add_snapshot("snap-01", {0: pattern_block(1, 0)}, volume_size_gib=1)
    store.add_snapshot("snap-02", {5: pattern_block(2, 5)}, volume_size_gib=2)
    api = StoreApi(store)
    ops = operations(api, [("snap-01", GIB), ("snap-02", 2 * GIB)], cache_size=8 * BLOCK_SIZE)
    return ops, api


def call(coro_fn, *args):
    return trio.run(coro_fn, *args)


def test_one_read_only_image_per_snapshot(ops_and_api) -> None:
    ops, _ = ops_and_api
    assert [name for name, _ in ops.entries()] == [b"snap-01.img", b"snap-02.img"]
    root = call(ops.getattr, ROOT_INODE)
    assert stat.S_ISDIR(root.st_mode)
    attr = call(ops.lookup, ROOT_INODE, b"snap-02.img")
    assert stat.S_ISREG(attr.st_mode) and stat.S_IMODE(attr.st_mode) == 0o444
    assert attr.st_size == 2 * GIB


def test_unknown_names_are_enoent(ops_and_api) -> None:
    ops, _ = ops_and_api
    with pytest.raises(pyfuse3.FUSEError) as err:
        call(ops.lookup, ROOT_INODE, b"snap-03.img")
    assert err.value.errno == errno.ENOENT


@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC])
def test_writes_are_refused(ops_and_api, flags) -> None:
    ops, _ = ops_and_api
    inode = call(ops.lookup, ROOT_INODE, b"snap-01.img").st_ino
    with pytest.raises(pyfuse3.FUSEError) as err:
        call(ops.open, inode, flags, None)
    assert err.value.errno == errno.EROFS


def test_open_and_read(ops_and_api) -> None:
    ops, _ = ops_and_api
    inode = call(ops.lookup, ROOT_INODE, b"snap-02.img").st_ino
    info = call(ops.open, inode, os.O_RDONLY, None)
    data = call(ops.read, info.fh, 5 * BLOCK_SIZE - 10, 20)
    assert data == bytes(10) + pattern_block(2, 5)[:10]
    call(ops.release, info.fh)


@pytest.mark.expected_log(
    r"read of snap-01.img failed: snap-01: read at 0: down",
    r"snap-01: partition table could not be read",
)
def test_remote_failure_is_eio(ops_and_api) -> None:
    ops, api = ops_and_api
    failing = FailingApi(
        api, lambda n, op: TransientError("down") if op == "GetSnapshotBlock" else None
    )
    ops = operations(failing, [("snap-01", GIB)])
    inode = call(ops.lookup, ROOT_INODE, b"snap-01.img").st_ino
    info = call(ops.open, inode, os.O_RDONLY, None)
    with pytest.raises(pyfuse3.FUSEError) as err:
        call(ops.read, info.fh, 0, 4096)
    assert err.value.errno == errno.EIO


def test_xattrs_name_the_snapshot_and_the_serving_process(ops_and_api) -> None:
    ops, _ = ops_and_api
    inode = call(ops.lookup, ROOT_INODE, b"snap-01.img").st_ino
    assert call(ops.getxattr, inode, b"user.ebsfs.snapshot_id", None) == b"snap-01"
    assert call(ops.getxattr, ROOT_INODE, b"user.ebsfs.pid", None) == str(os.getpid()).encode()
    with pytest.raises(pyfuse3.FUSEError):
        call(ops.getxattr, inode, b"user.other", None)


def test_changes_file_reads_in_pieces(monkeypatch) -> None:
    """The `.changes` text of a lineage mounted together, read at offsets like the
    kernel does; spilled to a temporary file when large (here past 256 bytes)."""
    monkeypatch.setattr("ebsfs.engine.diff.SPOOL_IN_MEMORY", 256)
    store = SnapshotStore(Faults(seed=1))
    store.add_snapshot("snap-0a", {i: pattern_block(1, i) for i in range(40)}, volume_size_gib=1)
    store.add_snapshot(
        "snap-0b", {i: pattern_block(2, i) for i in range(0, 40, 2)}, parent="snap-0a"
    )
    ops = operations(
        StoreApi(store),
        [("snap-0a", GIB), ("snap-0b", GIB)],
        {"snap-0b": "snap-0a"},
        cache_size=8 * BLOCK_SIZE,
    )
    inode = call(ops.lookup, ROOT_INODE, b"snap-0b.changes").st_ino

    async def read_all() -> bytes:
        info = await ops.open(inode, os.O_RDONLY, None)  # type: ignore[arg-type]
        parts, offset = [], 0
        while chunk := await ops.read(info.fh, offset, 100):
            parts.append(chunk)
            offset += len(chunk)
        await ops.release(info.fh)
        return b"".join(parts)

    text = trio.run(read_all).decode()
    lines = text.splitlines()
    assert lines[0] == (
        "snap-0a -> snap-0b: 20 blocks changed, 10.0 MiB of a 1.0 GiB volume, in 20 ranges"
    )
    assert len(lines) == 2 + 20 and lines[-1].split() == [
        str(38 * BLOCK_SIZE),
        str(BLOCK_SIZE),
        "38",
    ]


def lineage_ops(api_wrapper=None, read_timeout: float = 60.0):
    store = SnapshotStore(Faults(seed=1))
    store.add_snapshot("snap-0a", {i: pattern_block(1, i) for i in range(8)}, volume_size_gib=1)
    store.add_snapshot("snap-0b", {0: pattern_block(2, 0)}, parent="snap-0a")
    api = StoreApi(store)
    ops = operations(
        api_wrapper(api) if api_wrapper else api,
        [("snap-0a", GIB), ("snap-0b", GIB)],
        {"snap-0b": "snap-0a"},
        cache_size=8 * BLOCK_SIZE,
        read_timeout=read_timeout,
    )
    return ops


@pytest.mark.expected_log(
    r"opening snap-0b.changes failed", r"snap-0b: partition table could not be read"
)
def test_a_changes_file_that_cannot_be_listed_leaves_no_open_handle() -> None:
    ops = lineage_ops(
        lambda api: FailingApi(
            api, lambda n, op: TransientError("down") if op == "ListChangedBlocks" else None
        )
    )
    inode = call(ops.lookup, ROOT_INODE, b"snap-0b.changes").st_ino
    for _ in range(3):
        with pytest.raises(pyfuse3.FUSEError) as err:
            call(ops.open, inode, os.O_RDONLY, None)
        assert err.value.errno == errno.EIO
    assert ops.open_handles == 0


@pytest.mark.expected_log(
    r"opening snap-0b.changes failed: .*took over 1s", r"snap-0b: partition table could not be read"
)
def test_a_changes_listing_that_hangs_is_eio_within_the_read_timeout() -> None:
    release = threading.Event()

    class Hanging(StoreApi):
        def list_changed_blocks(self, *args, **kw):
            release.wait(30)
            return super().list_changed_blocks(*args, **kw)

    ops = lineage_ops(lambda api: Hanging(api.store), read_timeout=1.0)
    inode = call(ops.lookup, ROOT_INODE, b"snap-0b.changes").st_ino
    started = time.monotonic()
    try:
        with pytest.raises(pyfuse3.FUSEError) as err:
            call(ops.open, inode, os.O_RDONLY, None)
        assert err.value.errno == errno.EIO
        assert time.monotonic() - started < 10
    finally:
        release.set()


def test_statfs_counts_each_image_once() -> None:
    ops = lineage_ops()
    assert [name for name, _ in ops.entries()] == [
        b"snap-0a.img",
        b"snap-0b.img",
        b"snap-0b.changes",
    ]
    data = call(ops.statfs, None)
    assert data.f_blocks * data.f_bsize == 2 * GIB


@pytest.mark.expected_log(
    r"read failed \(EIO\): unexpected RuntimeError: planted",
    r"getattr failed \(EIO\): unexpected ZeroDivisionError",
)
def test_an_unexpected_exception_in_a_handler_is_eio_and_the_next_call_works(
    ops_and_api, monkeypatch, caplog
) -> None:
    """The net under every handler: a bug answers EIO (pyfuse3 would end the mount on
    it), logged with its traceback the first time only; the next read works."""
    ops, _ = ops_and_api
    inode = call(ops.lookup, ROOT_INODE, b"snap-02.img").st_ino
    info = call(ops.open, inode, os.O_RDONLY, None)
    image = ops._handles[info.fh][0].image
    original = image.read
    failures = iter([RuntimeError("planted"), RuntimeError("planted")])

    async def buggy(*args):
        err = next(failures, None)
        if err is not None:
            raise err
        return await original(*args)

    monkeypatch.setattr(image, "read", buggy)
    for _ in range(2):
        with pytest.raises(pyfuse3.FUSEError) as err:
            call(ops.read, info.fh, 5 * BLOCK_SIZE, 10)
        assert err.value.errno == errno.EIO
    assert call(ops.read, info.fh, 5 * BLOCK_SIZE, 10) == pattern_block(2, 5)[:10]
    logged = [r for r in caplog.records if "planted" in r.getMessage()]
    assert len(logged) == 2
    assert logged[0].exc_info is not None and logged[1].exc_info is None
    # Every handler has the net, not just read.
    monkeypatch.setattr(ops, "_attr", lambda inode: 1 / 0)
    with pytest.raises(pyfuse3.FUSEError) as err:
        call(ops.getattr, ROOT_INODE)
    assert err.value.errno == errno.EIO
