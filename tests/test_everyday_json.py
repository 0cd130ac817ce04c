"""Issue 28: `get --json` and `verify --json` end with one JSON object on stdout saying
what the summary says, for pipelines; and "1 block", not "1 blocks"."""

from __future__ import annotations

import json
from pathlib import Path

from ebsfs.constants import BLOCK_SIZE, GIB
from ebsfs.emulator import EmulatorServer
from tests.acquiring import add, digests
from tests.fakes import pattern_block
from tests.mounting import ebsfs

SNAP = "snap-0e28"


def test_get_and_verify_json(emulator: EmulatorServer, tmp_path: Path) -> None:
    blocks = {0: pattern_block(28, 0), 7: pattern_block(28, 7), 900: pattern_block(28, 900)}
    add(emulator.store, SNAP, blocks, volume_gib=1)
    out = tmp_path / "disk.img"
    got = ebsfs("get", "--json", "--endpoint-url", emulator.url, SNAP, str(out))
    assert got.returncode == 0, got.stderr
    summary = json.loads(got.stdout)
    sha256 = digests(blocks, GIB)[0]
    assert summary["snapshot_id"] == SNAP and summary["output"] == str(out)
    assert summary["manifest"] == f"{out}.manifest.json"
    assert (summary["volume_size"], summary["written_blocks"]) == (GIB, 3)
    assert summary["counts"]["fetched_blocks"] == 3
    assert summary["sha256"] == sha256 and summary["md5"] is None
    assert summary["already_done"] is False and summary["throttled"] == 0
    assert summary["started"] <= summary["finished"]
    assert "sha256" not in got.stderr  # the summary line is the JSON now

    again = json.loads(
        ebsfs("get", "--json", "--endpoint-url", emulator.url, SNAP, str(out)).stdout
    )
    assert again["already_done"] is True and again["sha256"] == sha256

    checked = ebsfs("verify", "--json", str(out))
    assert checked.returncode == 0, checked.stderr
    report = json.loads(checked.stdout)
    assert report["ok"] is True and report["bad_blocks"] == 0 and report["bad"] == []
    assert report["sha256"] == report["manifest_sha256"] == sha256
    assert (report["snapshot_id"], report["written_blocks"]) == (SNAP, 3)

    with open(out, "r+b") as f:  # one written block damaged, one hole written
        f.seek(7 * BLOCK_SIZE + 10)
        f.write(b"x")
        f.seek(20 * BLOCK_SIZE)
        f.write(b"y")
    bad = ebsfs("verify", "--json", str(out))
    assert bad.returncode == 1
    report = json.loads(bad.stdout)
    assert report["ok"] is False and report["bad_blocks"] == 2
    assert [(b["index"], b["offset"]) for b in report["bad"]] == [
        (7, 7 * BLOCK_SIZE),
        (20, 20 * BLOCK_SIZE),
    ]
    assert bad.stderr.strip().endswith("does not match its manifest: 2 bad blocks")


def test_json_refused_with_the_image_on_stdout(tmp_path: Path) -> None:
    result = ebsfs("get", "--json", SNAP, "-")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "ebsfs: error: --json needs an OUTPUT other than -: standard output is the image"
    ]


def test_one_block_is_singular(emulator: EmulatorServer, tmp_path: Path) -> None:
    add(emulator.store, SNAP, {3: pattern_block(28, 3)}, volume_gib=1)
    out = tmp_path / "one.img"
    got = ebsfs("get", "--endpoint-url", emulator.url, SNAP, str(out))
    assert got.returncode == 0, got.stderr
    assert "1 written block (1 fetched)" in got.stderr.splitlines()[-1]
    assert "1 written block," in ebsfs("verify", str(out)).stdout
