"""A mount shared with other users, and the unbounded work left in the faces (issue 26):
owner and modes of what a shared mount shows (--uid, --gid, --file-mode, --dir-mode),
one spooled `.changes` report however often it is opened, and an overall --timeout
for `ebsfs diff` against an endpoint that answers slowly for ever."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio

from ebsfs.cli.main import main
from ebsfs.cli.mount import group_id, read_only_mode, user_id
from ebsfs.constants import BLOCK_SIZE
from ebsfs.emulator import EmulatorServer, Faults, SnapshotStore
from ebsfs.engine import files
from ebsfs.engine.config import EngineConfig
from ebsfs.engine.diff import Diff
from ebsfs.engine.engine import Engine
from ebsfs.engine.files import snapshot_nodes
from ebsfs.errors import TransientError
from ebsfs.fuse.operations import ROOT_INODE, EbsOperations, Ownership
from tests.fakes import FailingApi, StoreApi, pattern_block
from tests.mounting import ebsfs, mounted

GIB = 1024**3
PARENT, CHILD = "snap-0aa1", "snap-0aa2"
SHARED = Ownership(uid=1234, gid=5678, file_mode=0o440, dir_mode=0o550)


def lineage_store(store: SnapshotStore) -> SnapshotStore:
    store.add_snapshot(PARENT, {i: pattern_block(1, i) for i in range(40)}, volume_size_gib=1)
    store.add_snapshot(CHILD, {i: pattern_block(2, i) for i in range(0, 40, 2)}, parent=PARENT)
    return store


def lineage_ops(
    ownership: Ownership | None = None, wrap: Callable[[StoreApi], Any] | None = None
) -> EbsOperations:
    """A lineage mounted together, with no kernel: images and the child's `.changes`."""
    api = StoreApi(lineage_store(SnapshotStore(Faults(seed=1))))
    api = wrap(api) if wrap else api
    engine = Engine(
        api, EngineConfig(cache_size=8 * BLOCK_SIZE), [(PARENT, GIB), (CHILD, GIB)], {CHILD: PARENT}
    )
    return EbsOperations(trio.run(snapshot_nodes, engine), ownership=ownership)


# --uid, --gid, --file-mode, --dir-mode


def test_ownership_is_every_file_and_directory_s() -> None:
    ops = lineage_ops(SHARED)
    names = [name for name, _ in ops.entries()]
    assert names == [f"{PARENT}.img".encode(), f"{CHILD}.img".encode(), f"{CHILD}.changes".encode()]
    root = trio.run(ops.getattr, ROOT_INODE)
    assert stat.S_ISDIR(root.st_mode) and stat.S_IMODE(root.st_mode) == 0o550
    assert (root.st_uid, root.st_gid) == (1234, 5678)
    for name, inode in ops.entries():
        for attr in (trio.run(ops.lookup, ROOT_INODE, name), trio.run(ops.getattr, inode)):
            assert stat.S_ISREG(attr.st_mode) and stat.S_IMODE(attr.st_mode) == 0o440, name
            assert (attr.st_uid, attr.st_gid) == (1234, 5678), name


def test_without_options_the_mount_is_its_users_and_readable() -> None:
    ops = lineage_ops()
    attr = trio.run(ops.getattr, ops.entries()[0][1])
    assert stat.S_IMODE(attr.st_mode) == 0o444
    assert (attr.st_uid, attr.st_gid) == (os.getuid(), os.getgid())
    assert stat.S_IMODE(trio.run(ops.getattr, ROOT_INODE).st_mode) == 0o555


@pytest.mark.parametrize("mode", [0o644, 0o4444, 0o1555, 0o200])
def test_ownership_refuses_write_and_special_bits(mode: int) -> None:
    with pytest.raises(ValueError):
        Ownership(file_mode=mode)
    with pytest.raises(ValueError):
        Ownership(dir_mode=mode)


def test_option_values() -> None:
    assert user_id("root") == 0 and user_id("1234") == 1234 and user_id("0") == 0
    assert group_id("root") == 0 and group_id("5678") == 5678
    assert read_only_mode("0440") == read_only_mode("440") == read_only_mode("0o440") == 0o440
    assert read_only_mode("0") == 0 and read_only_mode("0555") == 0o555


@pytest.mark.parametrize(
    "option,value,words",
    [
        ("--file-mode", "0644", "write bits"),
        ("--dir-mode", "0755", "write bits"),
        ("--file-mode", "4444", "setuid"),
        ("--file-mode", "rw-r--r--", "not an octal mode"),
        ("--file-mode", "0999", "not an octal mode"),
        ("--file-mode", "", "not an octal mode"),
        ("--uid", "no-such-user-ebsfs", "no user"),
        ("--uid", "4294967295", "not a valid id"),
        ("--uid", "-1", "no user"),
        ("--uid", "bad\x1b[2Jname", "no user"),
        ("--gid", "no-such-group-ebsfs", "no group"),
        ("--gid", "99999999999", "not a valid id"),
    ],
)
def test_bad_ownership_options_are_one_line(
    option: str, value: str, words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["mount", f"{option}={value}", "snap-0123456789abcdef0", "/nonexistent"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and words in err, err
    assert "\x1b" not in err and "Traceback" not in err


def test_help_explains_each_ownership_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["mount", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--uid USER", "--gid GROUP", "--file-mode MODE", "--dir-mode MODE"):
        assert option in text
    assert "read-only" in text and "0444" in text and "0555" in text


@pytest.fixture
def open_place() -> Iterator[Path]:
    """A directory every user can reach (pytest's own are root's alone)."""
    place = Path(tempfile.mkdtemp(prefix="ebsfs-shared-"))
    place.chmod(0o755)
    try:
        yield place
    finally:
        for child in place.iterdir():
            if child.is_dir() and not os.path.ismount(child):
                child.rmdir()
            elif child.is_file():
                child.unlink()
        place.rmdir()


def read_as(uid: int, gid: int, path: Path) -> int | bytes:
    """The first 16 bytes of `path` as another user would read them, or the errno that
    user gets. A forked child (no exec: this test's Python may be in root's home)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        code = 0
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            fd = os.open(path, os.O_RDONLY)
            os.write(write_end, os.pread(fd, 16, 0))
        except OSError as err:
            code = err.errno or 1
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) or data


@pytest.mark.mount
def test_a_shared_mount_shows_its_owner_and_modes_and_the_kernel_keeps_them(
    emulator: EmulatorServer, open_place: Path
) -> None:
    lineage_store(emulator.store)
    options = ["--allow-other", "--uid", "1234", "--gid", "5678"]
    options += ["--file-mode", "0440", "--dir-mode", "0550"]
    with mounted(emulator.url, [PARENT, CHILD], open_place / "mnt", *options) as mnt:
        top = os.stat(mnt)
        assert stat.S_IMODE(top.st_mode) == 0o550 and (top.st_uid, top.st_gid) == (1234, 5678)
        names = sorted(os.listdir(mnt))
        assert names == sorted([f"{PARENT}.img", f"{CHILD}.img", f"{CHILD}.changes"])
        for name in names:
            st = os.stat(mnt / name)
            assert stat.S_IMODE(st.st_mode) == 0o440, name
            assert (st.st_uid, st.st_gid) == (1234, 5678), name
        image = mnt / f"{PARENT}.img"
        first = pattern_block(1, 0)[:16]
        assert read_as(1234, 100, image) == first  # the owner
        assert read_as(4321, 5678, image) == first  # the group
        assert read_as(65534, 65534, image) == errno.EACCES  # anyone else


# .changes: one spool for all its open handles


def test_many_opens_of_changes_at_once_share_one_listing_and_spool(monkeypatch) -> None:
    made: list[object] = []
    text_file = Diff.text_file

    def counted(self: Diff) -> object:
        spool = text_file(self)
        made.append(spool)
        return spool

    monkeypatch.setattr(Diff, "text_file", counted)
    ops = lineage_ops()
    inode = trio.run(ops.lookup, ROOT_INODE, f"{CHILD}.changes".encode()).st_ino
    opens = 200

    async def open_all() -> list[bytes]:
        handles: list[int] = []

        async def one() -> None:
            info = await ops.open(inode, os.O_RDONLY, None)  # type: ignore[arg-type]
            handles.append(info.fh)

        async with trio.open_nursery() as nursery:
            for _ in range(opens):
                nursery.start_soon(one)
        assert len(made) == 1, f"{len(made)} reports spooled for {opens} opens"
        texts = [bytes(await ops.read(fh, 0, 1 << 20)) for fh in handles]
        for fh in handles[:-1]:
            await ops.release(fh)
        assert not made[0].closed  # type: ignore[attr-defined]
        assert bytes(await ops.read(handles[-1], 0, 1 << 20)) == texts[0]
        await ops.release(handles[-1])
        return texts

    texts = trio.run(open_all)
    assert len(texts) == opens and len(set(texts)) == 1
    assert texts[0].startswith(f"{PARENT} -> {CHILD}: 20 blocks changed".encode())
    assert made[0].closed and ops.open_handles == 0  # type: ignore[attr-defined]

    async def open_again() -> bytes:
        info = await ops.open(inode, os.O_RDONLY, None)  # type: ignore[arg-type]
        try:
            return bytes(await ops.read(info.fh, 0, 1 << 20))
        finally:
            await ops.release(info.fh)

    assert trio.run(open_again) == texts[0]
    assert len(made) == 2 and made[1].closed  # type: ignore[attr-defined]


@pytest.mark.expected_log(
    r"opening snap-0aa2\.changes failed: .*down", r"snap-0aa2: partition table could not be read"
)
def test_opens_of_a_changes_that_cannot_be_listed_at_once_ask_the_service_once() -> None:
    attempts: list[int] = []

    def plan(number: int, operation: str) -> Exception | None:
        if operation != "ListChangedBlocks":
            return None
        attempts.append(number)
        return TransientError("down")

    ops = lineage_ops(wrap=lambda api: FailingApi(api, plan))
    inode = trio.run(ops.lookup, ROOT_INODE, f"{CHILD}.changes".encode()).st_ino

    async def open_at_once(count: int) -> list[int]:
        errnos: list[int] = []

        async def one() -> None:
            try:
                await ops.open(inode, os.O_RDONLY, None)  # type: ignore[arg-type]
            except pyfuse3.FUSEError as err:
                errnos.append(err.errno)

        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(one)
        return errnos

    before = len(attempts)
    assert trio.run(open_at_once, 1) == [errno.EIO]
    alone = len(attempts) - before
    assert alone >= 1
    assert trio.run(open_at_once, 20) == [errno.EIO] * 20
    assert len(attempts) - before - alone == alone, "one listing for all the opens"
    assert ops.open_handles == 0


# diff --timeout


@pytest.mark.parametrize("files", [False, True], ids=["blocks", "files"])
def test_diff_gives_up_after_its_timeout(emulator: EmulatorServer, files: bool) -> None:
    lineage_store(emulator.store)
    emulator.faults.latency = 1.0  # every call slow, each within its own limits
    emulator.faults.short_pages = 1.0  # and many pages
    started = time.monotonic()
    extra = ["--files"] if files else []
    result = ebsfs("diff", *extra, "--timeout", "2", "--endpoint-url", emulator.url, PARENT, CHILD)
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "gave up after --timeout 2s" in lines[0]
    assert elapsed < 15 and result.stdout == ""


def test_diff_within_its_timeout_is_unchanged(emulator: EmulatorServer) -> None:
    lineage_store(emulator.store)
    result = ebsfs("diff", "--timeout", "60", "--endpoint-url", emulator.url, PARENT, CHILD)
    assert result.returncode == 0, result.stderr
    assert "20 blocks changed" in result.stdout.splitlines()[0]


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_diff_timeout_must_be_positive(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["diff", f"--timeout={value}", PARENT, CHILD])
    assert exited.value.code == 2 and "--timeout" in capsys.readouterr().err


@pytest.mark.expected_log(r"opening snap-0aa2\.changes failed: listing .* took over 0\.3s")
def test_a_changes_listing_that_pages_slowly_fails_its_open_at_the_diff_timeout(
    monkeypatch,
) -> None:
    """An endpoint answering ListChangedBlocks slowly for ever held every open of the
    mounted `.changes` (each page had only its own deadline, --read-timeout); the
    listing has the default of `ebsfs diff --timeout` now, lowered here to 0.3 s."""
    monkeypatch.setattr(files, "DIFF_TIMEOUT", 0.3)
    ops = lineage_ops()
    inode = trio.run(ops.lookup, ROOT_INODE, f"{CHILD}.changes".encode()).st_ino

    async def pages_for_ever(self: Engine, snapshot_id: str) -> Diff:
        while True:
            await trio.sleep(0.1)  # a page every 0.1 s, each well within its deadline

    monkeypatch.setattr(Engine, "changes", pages_for_ever)

    async def open_it() -> int:
        try:
            await ops.open(inode, os.O_RDONLY, None)  # type: ignore[arg-type]
        except pyfuse3.FUSEError as err:
            return err.errno
        return 0

    started = time.monotonic()
    assert trio.run(open_it) == errno.EIO
    assert time.monotonic() - started < 5


def test_a_listed_changes_file_shows_its_size() -> None:
    """`.changes` said 0 bytes however much it held (issue 28): its size is known once
    listed, and `stat` after a read shows it."""
    ops = lineage_ops()
    inode = trio.run(ops.lookup, ROOT_INODE, f"{CHILD}.changes".encode()).st_ino
    assert trio.run(ops.getattr, inode).st_size == 0  # not listed yet

    async def read_it() -> bytes:
        info = await ops.open(inode, os.O_RDONLY, None)  # type: ignore[arg-type]
        try:
            return bytes(await ops.read(info.fh, 0, 1 << 20))
        finally:
            await ops.release(info.fh)

    text = trio.run(read_it)
    assert text and trio.run(ops.getattr, inode).st_size == len(text)
