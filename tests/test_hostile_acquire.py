"""`ebsfs get` in shared places and after accidents (issue 26): a resumed copy never
trusts zeros the disk may have lost (progress saved only after a flush), never resumes
onto another disk or file that took the name of its target, and its evidence files
(image, journal, block lists, manifest, --log-file) are no other local user's to read.
Every run is cut short the same way on any version: one block's fetch fails once the
journal has recorded some progress."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ebsfs.acquire import copy as copy_module
from ebsfs.acquire import get as acquire
from ebsfs.acquire import manifest as manifest_module
from ebsfs.acquire import target as target_module
from ebsfs.acquire.journal import Journal, JournalState
from ebsfs.acquire.target import DeviceTarget, FileTarget
from ebsfs.acquire.verify import verify
from ebsfs.cli import main as cli
from ebsfs.cli.logs import setup_logging
from ebsfs.constants import BLOCK_SIZE, GIB
from ebsfs.emulator import SnapshotStore
from ebsfs.engine.config import EngineConfig
from ebsfs.errors import AccessDenied, ManifestError, OutputError, UserInputError
from ebsfs.service.api import Block
from ebsfs.service.client import ConnectionOptions
from tests.acquiring import add, digests, file_digest
from tests.disks import loop_device
from tests.fakes import StoreApi, pattern_block

SNAP = "snap-0e26"
POISON = 600
"""The block whose fetch fails, once the journal has recorded progress."""
BLOCKS = {i: pattern_block(26, i) for i in (0, 1, 2, 3, 300, 301, POISON, 700, 2047)}
"""A 1 GiB volume: never-written runs before and after the poisoned block."""
GARBAGE_AT = (100, 450, 1000, 1500, 2000)
"""Never-written blocks where a disk (or a file) holds old bytes: zeroed, or lost."""
GARBAGE = b"\xa5" * BLOCK_SIZE


class CutShort(StoreApi):
    """The store, except that block POISON fails (AccessDenied) once `progressed` is
    set (or after 30 s): a run stopped part way, after some progress was saved."""

    def __init__(self, store: SnapshotStore) -> None:
        super().__init__(store)
        self.progressed = threading.Event()

    def get_snapshot_block(
        self, snapshot_id: str, index: int, token: str, into: memoryview | None = None
    ) -> Block:
        if index == POISON:
            self.progressed.wait(30)
            raise AccessDenied("the test cuts this run short")
        return super().get_snapshot_block(snapshot_id, index, token, into)


def run_get(
    store: SnapshotStore, output: Path | str, manifest: Path | None = None, api: object = None
) -> acquire.GetResult:
    config = EngineConfig(ConnectionOptions(), cache_size=64 * 1024**2, max_fetches=8)
    request = acquire.GetRequest(SNAP, str(output), manifest=str(manifest) if manifest else None)
    return acquire.get(config, request, api=api or StoreApi(store))  # type: ignore[arg-type]


def cut_short(
    store: SnapshotStore,
    output: Path | str,
    manifest: Path | None,
    monkeypatch: pytest.MonkeyPatch,
    progressed: Callable[[JournalState], bool] | None = None,
    records: int = 0,
) -> None:
    """A run that stops at block POISON once a saved state satisfies `progressed` (a
    device) or `records` blocks are recorded (a file)."""
    api = CutShort(store)
    save, record = Journal.save, Journal.record
    counted = [0]

    def saving(journal: Journal, state: JournalState) -> None:
        save(journal, state)
        if progressed is not None and progressed(state):
            api.progressed.set()

    def recording(journal: Journal, index: int, digest: bytes) -> None:
        record(journal, index, digest)
        counted[0] += 1
        if records and counted[0] >= records:
            api.progressed.set()

    with monkeypatch.context() as patch:
        patch.setattr(Journal, "save", saving)
        patch.setattr(Journal, "record", recording)
        with pytest.raises(AccessDenied):
            run_get(store, output, manifest, api)


def zeroed(state: JournalState) -> bool:
    return bool(state.zeroed_through)


@pytest.fixture
def every_step_saved(monkeypatch: pytest.MonkeyPatch) -> None:
    """The state saved at every zeroing step (64 MiB), not every 2 s."""
    monkeypatch.setattr(copy_module, "STATE_EVERY", 0.0)
    monkeypatch.setattr(copy_module, "ZERO_STEP", 64 * 1024**2)


def disk_with_garbage(path: Path, size: int = GIB + 8 * 1024**2) -> Path:
    """A sparse backing file, old bytes where the snapshot never wrote."""
    with open(path, "wb") as f:
        f.truncate(size)
        for i in GARBAGE_AT:
            f.seek(i * BLOCK_SIZE)
            f.write(GARBAGE)
    return path


def sample(device: str) -> list[bytes]:
    """The blocks of `device` a copy would write or zero first, and the last one."""
    with open(device, "rb") as f:
        found = []
        for i in (*BLOCKS, *GARBAGE_AT):
            f.seek(i * BLOCK_SIZE)
            found.append(f.read(BLOCK_SIZE))
    return found


def holds_garbage(device: str) -> bool:
    with open(device, "rb") as f:
        for i in GARBAGE_AT:
            f.seek(i * BLOCK_SIZE)
            if f.read(BLOCK_SIZE) == GARBAGE:
                return True
    return False


# -- a power cut: progress is saved only once the zeros it claims are flushed -------


@pytest.mark.mount
def test_zeroing_is_flushed_before_the_journal_claims_it(
    store: SnapshotStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, every_step_saved: None
) -> None:
    add(store, SNAP, BLOCKS, volume_gib=1)
    manifest = tmp_path / "m.manifest.json"
    lock = threading.Lock()
    asked_through = [0]  # zeroing asked of the device and finished (maybe still cached)
    durable_through = [0]  # ... and flushed since
    device_fsyncs = [0]
    claims: list[tuple[int, int]] = []  # (zeroed_through saved, durable then)
    zero, save, fsync = DeviceTarget.zero, Journal.save, os.fsync

    def zeroing(target: DeviceTarget, offset: int, length: int) -> None:
        zero(target, offset, length)
        with lock:
            asked_through[0] = max(asked_through[0], offset + length)

    def flushing(fd: int) -> None:
        if not stat.S_ISBLK(os.fstat(fd).st_mode):
            fsync(fd)
            return
        with lock:
            device_fsyncs[0] += 1
            cut = device_fsyncs[0] == 3
            claim = asked_through[0]
        if cut:  # the power goes at this flush: what it would have made durable is lost
            raise OSError(errno.EIO, "power cut (the test)")
        fsync(fd)
        with lock:
            durable_through[0] = max(durable_through[0], claim)

    def saving(journal: Journal, state: JournalState) -> None:
        with lock:
            claims.append((state.zeroed_through or 0, durable_through[0]))
        save(journal, state)

    backing = disk_with_garbage(tmp_path / "disk.raw")
    with loop_device(backing, writable=True) as device:
        with monkeypatch.context() as patch:
            patch.setattr(DeviceTarget, "zero", zeroing)
            patch.setattr(Journal, "save", saving)
            patch.setattr(os, "fsync", flushing)
            try:
                run_get(store, device, manifest)
            except OutputError as err:
                assert "power cut" in str(err)
        assert any(claimed for claimed, _ in claims), "no zeroing was ever saved"
        assert [c for c in claims if c[0] > c[1]] == []
        # What was not flushed is lost: old bytes again past the last flush.
        with open(device, "r+b") as f:
            for i in GARBAGE_AT:
                if i * BLOCK_SIZE >= durable_through[0]:
                    f.seek(i * BLOCK_SIZE)
                    f.write(GARBAGE)
        result = run_get(store, device, manifest)
        assert result.manifest.sha256 == digests(BLOCKS, GIB)[0]
        assert verify(device, str(manifest)).ok  # the disk holds what the manifest says


# -- another disk under the same name ---------------------------------------------


@pytest.mark.mount
def test_resume_onto_another_disk_under_the_same_name_is_refused(
    store: SnapshotStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, every_step_saved: None
) -> None:
    """A renamed /dev/sdX: the name the copy was given (here a symbolic link, as
    /dev/disk/by-path ones are) now leads to another disk of the same size, no serial
    number either (loop devices have none): only the fingerprint tells them apart."""
    add(store, SNAP, BLOCKS, volume_gib=1)
    manifest = tmp_path / "m.manifest.json"
    name = tmp_path / "evidence-disk"
    first, other = disk_with_garbage(tmp_path / "a.raw"), disk_with_garbage(tmp_path / "b.raw")
    with loop_device(first, writable=True) as a, loop_device(other, writable=True) as b:
        name.symlink_to(a)
        cut_short(store, name, manifest, monkeypatch, progressed=zeroed)
        assert Journal(str(tmp_path / "m")).load().zeroed_through
        name.unlink()
        name.symlink_to(b)
        before = sample(b)
        with pytest.raises(OutputError) as caught:
            run_get(store, name, manifest)
        message = str(caught.value)
        assert "\n" not in message and "refusing to resume" in message, message
        assert "fingerprint" in message and "m.part*" in message, message
        assert sample(b) == before  # nothing written to the wrong disk
        # The right disk under the name again: the copy resumes and is exact.
        name.unlink()
        name.symlink_to(a)
        result = run_get(store, name, manifest)
        assert result.manifest.sha256 == digests(BLOCKS, GIB)[0]
        assert result.manifest.counts["resumed_blocks"] > 0
        assert verify(str(name), str(manifest)).ok


@pytest.mark.mount
def test_a_journal_without_identity_trusts_no_earlier_zeroing(
    store: SnapshotStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, every_step_saved: None
) -> None:
    """A journal of a version before identities (or whose fingerprint was retired at
    the end of a run) cannot prove its disk: the resumed run zeroes again."""
    add(store, SNAP, BLOCKS, volume_gib=1)
    manifest = tmp_path / "m.manifest.json"
    backing = disk_with_garbage(tmp_path / "a.raw")
    with loop_device(backing, writable=True) as device:
        cut_short(store, device, manifest, monkeypatch, progressed=zeroed)
        state_file = tmp_path / "m.part.json"
        state = json.loads(state_file.read_text())
        assert state["zeroed_through"]
        state.pop("target", None)
        state_file.write_text(json.dumps(state, indent=1) + "\n")
        with open(device, "r+b") as f:  # the zeros an older version trusted, lost
            f.seek(GARBAGE_AT[0] * BLOCK_SIZE)
            f.write(GARBAGE)
        result = run_get(store, device, manifest)
        assert not holds_garbage(device)
        assert result.manifest.sha256 == digests(BLOCKS, GIB)[0]
        assert verify(device, str(manifest)).ok


@pytest.mark.mount
def test_a_run_cut_short_after_its_fingerprint_is_retired_resumes(
    store: SnapshotStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The end of a run: the fingerprint is retired in the journal, the last block gets
    its own bytes, then the manifest fails. The same command resumes (zeroing again,
    re-reading what was written) instead of refusing a disk with no fingerprint."""
    add(store, SNAP, BLOCKS, volume_gib=1)
    manifest = tmp_path / "m.manifest.json"
    backing = disk_with_garbage(tmp_path / "a.raw")
    with loop_device(backing, writable=True) as device:
        with monkeypatch.context() as patch:

            def no_manifest(path: str, _manifest: object) -> None:
                raise OSError(errno.ENOSPC, "No space left on device", path)

            patch.setattr(acquire, "write_manifest", no_manifest)
            with pytest.raises(OutputError, match="No space left"):
                run_get(store, device, manifest)
        state = Journal(str(tmp_path / "m")).load()
        assert state.target is not None and state.target.fingerprint is None
        result = run_get(store, device, manifest)
        assert result.manifest.counts["resumed_blocks"] == len(BLOCKS) - 1  # not the last
        assert verify(device, str(manifest)).ok


# -- another file under the name of OUTPUT.part -----------------------------------


def test_resume_onto_a_replaced_part_file_is_refused(
    store: SnapshotStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    add(store, SNAP, BLOCKS, volume_gib=1)
    out = tmp_path / "disk.img"
    part = tmp_path / "disk.img.part"
    cut_short(store, out, None, monkeypatch, records=4)
    # Another file takes the name: the same recorded blocks, old bytes in a hole.
    forged = tmp_path / "forged"
    with open(part, "rb") as old, open(forged, "wb") as new:
        new.truncate(GIB)
        for i in (0, 1, 2, 3):
            old.seek(i * BLOCK_SIZE)
            new.seek(i * BLOCK_SIZE)
            new.write(old.read(BLOCK_SIZE))
        new.seek(GARBAGE_AT[0] * BLOCK_SIZE)
        new.write(GARBAGE)
    os.replace(forged, part)
    with pytest.raises(OutputError) as caught:
        run_get(store, out)
    message = str(caught.value)
    assert "\n" not in message and "refusing to resume" in message, message
    assert "another file" in message and "disk.img.part*" in message, message
    assert not out.exists()
    # Removed, the .part is made afresh: the same command resumes from nothing.
    part.unlink()
    result = run_get(store, out)
    assert file_digest(out) == digests(BLOCKS, GIB)[0] == result.manifest.sha256


def test_a_symlink_planted_as_the_part_file_is_not_followed(
    store: SnapshotStore, tmp_path: Path
) -> None:
    add(store, SNAP, BLOCKS, volume_gib=1)
    out = tmp_path / "disk.img"
    victim = tmp_path / "victim"
    (tmp_path / "disk.img.part").symlink_to(victim)  # dangling: "exists" says no
    with pytest.raises(OutputError) as caught:
        run_get(store, out)
    assert "disk.img.part" in str(caught.value) and "\n" not in str(caught.value)
    assert not victim.exists()


# -- evidence files are private ----------------------------------------------------


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_evidence_files_are_created_0600(
    store: SnapshotStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, umask_022: None
) -> None:
    """An image holds the volume's secrets; its journal, block lists and manifest pin
    its contents block by block. A default umask made them all 0644."""
    add(store, SNAP, BLOCKS, volume_gib=1)
    monkeypatch.setattr(manifest_module, "INLINE_BLOCKS", 2)  # a side file too
    out = tmp_path / "disk.img"
    cut_short(store, out, None, monkeypatch, records=4)
    unfinished = sorted(p.name for p in tmp_path.iterdir())
    assert {"disk.img.part", "disk.img.part.json", "disk.img.part.sums"} <= set(unfinished)
    assert {p: mode(tmp_path / p) for p in unfinished} == {p: 0o600 for p in unfinished}
    os.chmod(tmp_path / "disk.img.part", 0o644)  # as an earlier version left it
    os.chmod(tmp_path / "disk.img.part.sums", 0o644)
    run_get(store, out)
    finished = sorted(p.name for p in tmp_path.iterdir())
    assert finished == ["disk.img", "disk.img.blocks.sha256", "disk.img.manifest.json"]
    assert {p: mode(tmp_path / p) for p in finished} == {p: 0o600 for p in finished}


def test_a_stricter_umask_is_honoured(store: SnapshotStore, tmp_path: Path) -> None:
    add(store, SNAP, {0: pattern_block(26, 0)}, volume_gib=1)
    old = os.umask(0o277)
    try:
        run_get(store, tmp_path / "disk.img")
    finally:
        os.umask(old)
    assert mode(tmp_path / "disk.img") == mode(tmp_path / "disk.img.manifest.json") == 0o400


@pytest.mark.expected_log("ebsfs.test: private")
def test_log_file_is_created_0600_and_an_existing_one_keeps_its_mode(
    tmp_path: Path, umask_022: None
) -> None:
    root = logging.getLogger()
    handlers, level, ebsfs_level = root.handlers[:], root.level, logging.getLogger("ebsfs").level
    new, shared = tmp_path / "new.log", tmp_path / "shared.log"
    shared.write_text("")
    shared.chmod(0o640)
    try:
        setup_logging(0, str(new), background=False)
        logging.getLogger("ebsfs.test").warning("private")
        setup_logging(0, str(shared), background=False)
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.getLogger("ebsfs").setLevel(ebsfs_level)
    assert "private" in new.read_text()
    assert mode(new) == 0o600 and mode(shared) == 0o640


# -- hostile manifests and journals are never printed raw ---------------------------


def small_image(tmp_path: Path, snapshot_id: str) -> tuple[Path, Path]:
    """A 1 MiB image of zeros and a manifest saying so, with `snapshot_id` in it."""
    image = tmp_path / "zeros.img"
    image.write_bytes(bytes(2 * BLOCK_SIZE))
    manifest = tmp_path / "zeros.img.manifest.json"
    fields = {
        "format": manifest_module.FORMAT,
        "snapshot_id": snapshot_id,
        "volume_size": 2 * BLOCK_SIZE,
        "block_size": BLOCK_SIZE,
        "written_blocks": 0,
        "sha256": hashlib.sha256(bytes(2 * BLOCK_SIZE)).hexdigest(),
        "md5": None,
        "started": "x",
        "finished": "x",
        "ebsfs_version": "x",
        "blocks": {"list": []},
    }
    manifest.write_text(json.dumps(fields))
    return image, manifest


def test_verify_does_not_print_a_manifests_control_characters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image, _ = small_image(tmp_path, "snap-0\x1b]0;owned\x07\x1b[2J")
    code = cli.main(["verify", "-q", str(image)])
    out, err = capsys.readouterr()
    assert "\x1b" not in out + err and "\x07" not in out + err
    assert code == 1 and "not a snapshot id" in err and len(err.splitlines()) == 1, err
    good, _ = small_image(tmp_path, "snap-0abc")
    assert cli.main(["verify", "-q", str(good)]) == 0
    assert "OK: snap-0abc" in capsys.readouterr().out


def test_a_planted_journal_is_not_printed_raw(store: SnapshotStore, tmp_path: Path) -> None:
    out = tmp_path / "disk.img"
    state = {
        "snapshot_id": "snap-1\x1b[2J\nD\tforged",
        "output": str(out),
        "volume_size": GIB,
        "started": "x",
        "ebsfs_version": "x",
        "runs": 1,
    }
    (tmp_path / "disk.img.part.json").write_text(json.dumps(state))
    with pytest.raises(UserInputError) as caught:
        run_get(store, out)
    assert "\x1b" not in str(caught.value) and "\n" not in str(caught.value), caught.value


def test_a_side_file_line_is_bounded(tmp_path: Path) -> None:
    side = tmp_path / "x.blocks.sha256"
    side.write_text("1 " + "0" * 100_000 + "\n")
    with open(side, encoding="ascii") as f, pytest.raises(ManifestError, match="longer than"):
        list(manifest_module._lines(f, str(side)))


def test_the_direct_descriptor_is_the_same_file_even_if_the_name_moves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The O_DIRECT descriptor is a second open: by name, a file (or device node)
    put under that name in between would take every aligned block."""
    out = tmp_path / "disk.img"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"")
    real_open = os.open

    def swapping(path: str, flags: int, *args: int) -> int:
        if flags & getattr(os, "O_DIRECT", 0) and os.path.exists(f"{out}.part"):
            os.replace(elsewhere, f"{out}.part")  # someone renames another file in
        return real_open(path, flags, *args)

    monkeypatch.setattr(target_module.os, "open", swapping)
    target = FileTarget(str(out), 4 * BLOCK_SIZE)
    try:
        if target.direct.fd < 0:
            pytest.skip(f"{tmp_path} has no O_DIRECT")
        ours, direct = os.fstat(target.fd), os.fstat(target.direct.fd)
        assert (direct.st_dev, direct.st_ino) == (ours.st_dev, ours.st_ino)
    finally:
        target.close()
