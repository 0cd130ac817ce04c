"""The disk cache as a shared, hostile place (issue 26): blocks keyed by where they came
from (two endpoints serving one snapshot id never mix their bytes), a directory used
only when it is ebsfs's own (tagged, empty, or a strictly recognised cache of an earlier
ebsfs), and nothing inside it followed, changed or deleted unless ebsfs made it: crafted
directories with symbolic and hard links to files outside, which must stay untouched."""

from __future__ import annotations

import base64
import hashlib
import os
import sqlite3
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import ebsfs
from ebsfs.constants import BLOCK_SIZE
from ebsfs.diskcache.directory import prepare
from ebsfs.diskcache.store import DiskCache, Origin
from ebsfs.emulator import EmulatorServer, Faults, SnapshotStore
from ebsfs.engine.config import EngineConfig
from ebsfs.engine.engine import Engine
from ebsfs.engine.plan import plan
from ebsfs.errors import CacheDirError
from tests.fakes import StoreApi, pattern_block
from tests.mounting import ebsfs as run_ebsfs
from tests.mounting import force_unmount

SNAP = "snap-0c1"
BLOCKS = 4
TAG_SIGNATURE = b"Signature: 8a477f597d28d172789f06886806bc55\n"


def image(seed: int) -> bytes:
    return b"".join(pattern_block(seed, i) for i in range(BLOCKS))


def serve(store: SnapshotStore, seed: int) -> None:
    store.add_snapshot(SNAP, {i: pattern_block(seed, i) for i in range(BLOCKS)})


def read_all(url: str, cache: Path, region: str | None = None) -> bytes:
    """The snapshot's first blocks read through ebsfs.open over the cache directory."""
    with ebsfs.open(
        SNAP,
        endpoint_url=url,
        region=region,
        cache_dir=str(cache),
        readahead=False,
        prefetch_metadata=False,
    ) as f:
        return f.read(BLOCKS * BLOCK_SIZE)


def tree(path: Path) -> dict[str, tuple[int, str]]:
    """Everything under `path` (itself included): mode and contents' SHA-256 (or link
    target), short enough for an assertion's diff."""
    found: dict[str, tuple[int, str]] = {}
    for p in [path, *sorted(path.rglob("*"))]:
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            found[str(p)] = (st.st_mode, os.readlink(p))
        elif stat.S_ISREG(st.st_mode):
            with open(p, "rb") as f:
                found[str(p)] = (st.st_mode, hashlib.file_digest(f, "sha256").hexdigest())
        else:
            found[str(p)] = (st.st_mode, "")
    return found


def assert_one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ebsfs"), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def other() -> Iterator[EmulatorServer]:
    """A second endpoint, with a store of its own."""
    store = SnapshotStore(
        Faults(list_rate=0, get_rate=0, seed=2, secret_keys={"AKIDTEST": "secret"})
    )
    with EmulatorServer(store) as server:
        yield server


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """Files outside any cache: a directory (0755) with a file (0644), and a sparse
    file (0644) with data in its 11th block, where a punched hole would show."""
    place = tmp_path / "outside"
    place.mkdir()
    os.chmod(place, 0o755)
    (place / "precious.txt").write_bytes(b"the analyst's notes\n")
    os.chmod(place / "precious.txt", 0o644)
    with open(place / "sparse.bin", "wb") as f:
        f.seek(10 * BLOCK_SIZE)
        f.write(b"\x5a" * BLOCK_SIZE)
    os.chmod(place / "sparse.bin", 0o644)
    return place


# ---- keyed by origin ---------------------------------------------------------------------


def test_two_endpoints_serving_one_snapshot_id_never_mix_through_one_cache_dir(
    emulator: EmulatorServer, other: EmulatorServer, tmp_path: Path
) -> None:
    serve(emulator.store, seed=1)
    serve(other.store, seed=2)
    cache = tmp_path / "c"
    assert read_all(emulator.url, cache) == image(1)
    assert read_all(other.url, cache) == image(2)
    assert other.counters.calls["GetSnapshotBlock"] == BLOCKS
    # Both are kept, each for its own endpoint.
    emulator.counters.reset()
    other.counters.reset()
    assert read_all(emulator.url, cache) == image(1)
    assert read_all(other.url, cache) == image(2)
    assert emulator.counters.calls["GetSnapshotBlock"] == 0
    assert other.counters.calls["GetSnapshotBlock"] == 0


def test_one_endpoint_signed_for_two_regions_is_two_origins(
    emulator: EmulatorServer, tmp_path: Path
) -> None:
    serve(emulator.store, seed=1)
    cache = tmp_path / "c"
    assert read_all(emulator.url, cache, region="us-east-1") == image(1)
    emulator.counters.reset()
    assert read_all(emulator.url, cache, region="eu-west-1") == image(1)
    assert emulator.counters.calls["GetSnapshotBlock"] == BLOCKS


@pytest.mark.expected_log(r"not used: the service client \(StoreApi\) does not say")
def test_a_client_that_does_not_say_its_endpoint_gets_no_disk_cache(tmp_path: Path) -> None:
    store = SnapshotStore(Faults(seed=1))
    serve(store, seed=1)
    api = StoreApi(store)
    config = EngineConfig(cache_dir=str(tmp_path / "c"))
    checked = plan(config, [SNAP], api=api)
    engine = Engine(api, config, checked.snapshots)
    assert engine.disk is None
    assert bytes(trio.run(engine.images[SNAP].read, 0, BLOCK_SIZE)) == pattern_block(1, 0)
    engine.close()


# ---- whose directory ---------------------------------------------------------------------


def test_a_new_or_empty_directory_is_tagged_as_ebsfs_s_own(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for cache in (tmp_path / "new" / "c", tmp_path / "empty"):
        prepare(str(cache))
        tag = cache / "CACHEDIR.TAG"
        assert tag.read_bytes().startswith(TAG_SIGNATURE + b"# This directory is an ebsfs")
        assert stat.S_IMODE(tag.lstat().st_mode) == 0o600
        prepare(str(cache))  # and taken again as its own


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    force_unmount(path)


@pytest.mark.parametrize("kind", ["blocks dir", "index file", "another tag"])
def test_foreign_directories_are_refused_in_one_line_and_left_untouched(
    emulator: EmulatorServer, mnt: Path, tmp_path: Path, kind: str
) -> None:
    """Directories that merely hold an entry named like ebsfs's (the old rule adopted
    them and emptied `blocks/`), or another program's CACHEDIR.TAG."""
    serve(emulator.store, seed=1)
    cache = tmp_path / "mine"
    cache.mkdir()
    os.chmod(cache, 0o755)
    (cache / "thesis.tex").write_text("mine")
    if kind == "blocks dir":
        (cache / "blocks").mkdir()
        (cache / "blocks" / "notes.txt").write_text("mine too")
        words = ["is not empty and is not an ebsfs cache"]
    elif kind == "index file":
        (cache / "index.sqlite").write_text("my own index, not a database")
        words = ["is not empty and is not an ebsfs cache"]
    else:
        (cache / "CACHEDIR.TAG").write_bytes(TAG_SIGNATURE + b"# made by another tool\n")
        words = ["is not an ebsfs cache", "another program's"]
    before = tree(cache)
    result = run_ebsfs(
        "mount", "--endpoint-url", emulator.url, "--cache-dir", str(cache), SNAP, str(mnt)
    )
    assert_one_line_error(result, *words)
    assert not os.path.ismount(mnt)
    assert tree(cache) == before


# ---- nothing inside followed -----------------------------------------------------------


def made_cache(emulator: EmulatorServer, cache: Path) -> list[Path]:
    """A cache ebsfs made and filled; its data files."""
    serve(emulator.store, seed=1)
    assert read_all(emulator.url, cache) == image(1)
    data = sorted(p for p in (cache / "blocks").iterdir() if p.name.startswith(SNAP))
    assert data
    return data


@pytest.mark.parametrize(
    "planted,words",
    [
        ("blocks symlink", ["blocks is not a directory ebsfs made"]),
        ("shard symlink", ["is not a file ebsfs made", "a symbolic link"]),
        ("shard hard link", ["is not a file ebsfs made", "2 hard links"]),
        ("index symlink", ["index.sqlite is not a file ebsfs made", "a symbolic link"]),
        ("wal symlink", ["index.sqlite-wal is not a file ebsfs made", "a symbolic link"]),
    ],
)
def test_links_planted_in_a_cache_are_never_followed(
    emulator: EmulatorServer, tmp_path: Path, outside: Path, planted: str, words: list[str]
) -> None:
    """A symbolic or hard link where ebsfs keeps its own files refuses the directory,
    and what it points at is neither read, changed, emptied nor chmodded."""
    cache = tmp_path / "c"
    data = made_cache(emulator, cache)
    if planted == "blocks symlink":
        for p in (cache / "blocks").iterdir():
            p.unlink()
        (cache / "blocks").rmdir()
        (cache / "blocks").symlink_to(outside)
    elif planted == "shard symlink":
        for p in data:
            p.unlink()
            p.symlink_to(outside / "sparse.bin")
    elif planted == "shard hard link":
        for p in data:
            p.unlink()
            os.link(outside / "sparse.bin", p)
    elif planted == "index symlink":
        (cache / "index.sqlite").unlink()
        (cache / "index.sqlite").symlink_to(outside / "precious.txt")
    else:
        (cache / "index.sqlite-wal").unlink(missing_ok=True)
        (cache / "index.sqlite-wal").symlink_to(outside / "precious.txt")
    before = tree(outside)
    try:
        with pytest.raises(CacheDirError) as refused:
            read_all(emulator.url, cache)
    finally:
        assert tree(outside) == before
    message = str(refused.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_files_ebsfs_did_not_make_are_left_alone(emulator: EmulatorServer, tmp_path: Path) -> None:
    cache = tmp_path / "c"
    made_cache(emulator, cache)
    (cache / "blocks" / "stray").write_text("not ebsfs's")
    (cache / "README").write_text("what this directory is")
    emulator.counters.reset()
    assert read_all(emulator.url, cache) == image(1)
    assert (cache / "blocks" / "stray").read_text() == "not ebsfs's"
    assert (cache / "README").read_text() == "what this directory is"
    assert emulator.counters.calls["GetSnapshotBlock"] == 0  # and the cache still serves


# ---- caches of earlier versions -----------------------------------------------------------


def legacy_cache(cache: Path, seed: int) -> None:
    """A cache as ebsfs wrote it before issue 26 (index format 1, no tag): blocks keyed
    by snapshot and index only, holding `seed`'s bytes with their true checksums."""
    (cache / "blocks").mkdir(parents=True)
    with open(cache / "blocks" / f"{SNAP}.0", "wb") as f:
        f.truncate(1024**3)
        for i in range(BLOCKS):
            f.seek(i * BLOCK_SIZE)
            f.write(pattern_block(seed, i))
    conn = sqlite3.connect(cache / "index.sqlite")
    conn.executescript(
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE snapshots (
            snapshot TEXT PRIMARY KEY, volume_size INTEGER NOT NULL, used REAL NOT NULL);
        CREATE TABLE blocks (
            snapshot TEXT NOT NULL, idx INTEGER NOT NULL, checksum TEXT NOT NULL,
            used REAL NOT NULL, PRIMARY KEY (snapshot, idx)) WITHOUT ROWID;
        CREATE TABLE unrelated (
            first TEXT NOT NULL, second TEXT NOT NULL, PRIMARY KEY (first, second))
            WITHOUT ROWID;
        """
    )
    conn.execute("INSERT INTO meta VALUES ('format', '1')")
    conn.execute("INSERT INTO meta VALUES ('blocks', ?)", (str(BLOCKS),))
    conn.execute("INSERT INTO snapshots VALUES (?, ?, 1.0)", (SNAP, 1024**3))
    for i in range(BLOCKS):
        digest = hashlib.sha256(pattern_block(seed, i)).digest()
        conn.execute(
            "INSERT INTO blocks VALUES (?, ?, ?, 1.0)", (SNAP, i, base64.b64encode(digest).decode())
        )
    conn.commit()
    conn.close()
    os.chmod(cache, 0o700)


@pytest.mark.expected_log(r"made by an earlier ebsfs.*emptied, starting afresh")
def test_a_cache_of_an_earlier_ebsfs_starts_afresh(
    emulator: EmulatorServer, tmp_path: Path
) -> None:
    """Its blocks do not say which endpoint they came from (here: another server's
    bytes for the same snapshot id), so none is served."""
    serve(emulator.store, seed=1)
    cache = tmp_path / "c"
    legacy_cache(cache, seed=7)
    assert read_all(emulator.url, cache) == image(1)
    assert emulator.counters.calls["GetSnapshotBlock"] == BLOCKS
    assert (cache / "CACHEDIR.TAG").is_file()
    assert not (cache / "blocks" / f"{SNAP}.0").exists()


def test_an_earlier_cache_holding_anything_else_is_refused(
    emulator: EmulatorServer, tmp_path: Path
) -> None:
    serve(emulator.store, seed=1)
    cache = tmp_path / "c"
    legacy_cache(cache, seed=7)
    (cache / "blocks" / "notes.txt").write_text("not ebsfs's")
    before = tree(cache)
    with pytest.raises(CacheDirError, match="is not empty and is not an ebsfs cache"):
        read_all(emulator.url, cache)
    assert tree(cache) == before


def test_a_cache_of_a_newer_ebsfs_is_refused_not_emptied(
    emulator: EmulatorServer, tmp_path: Path
) -> None:
    cache = tmp_path / "c"
    made_cache(emulator, cache)
    with sqlite3.connect(cache / "index.sqlite") as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'format'")
    conn.close()
    data = {p.name: p.read_bytes() for p in (cache / "blocks").iterdir()}
    with pytest.raises(CacheDirError, match="made by a newer ebsfs"):
        read_all(emulator.url, cache)
    assert {p.name: p.read_bytes() for p in (cache / "blocks").iterdir()} == data


def test_a_snapshot_id_with_a_trailing_newline_never_names_a_file(tmp_path: Path) -> None:
    """`re.match` with `$` let "snap-0c1\\n" through: a data file named with a newline."""
    cache = DiskCache(str(tmp_path / "c"), origin=Origin("http://ebs.test", "us-east-1"))
    data = pattern_block(1, 0)
    checksum = base64.b64encode(hashlib.sha256(data).digest()).decode()
    assert not cache.store(f"{SNAP}\n", 0, 1024**3, data, checksum).stored
    assert cache.load(f"{SNAP}\n", 0, None).checksum is None
    cache.close()
    assert all("\n" not in name for name in os.listdir(tmp_path / "c" / "blocks"))
