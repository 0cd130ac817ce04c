#!/usr/bin/env python3
"""Which files an intruder touched between two snapshots, with `ebsfs diff --files`:
a GPT disk whose root partition is XFS (as on Amazon Linux) holding 300 MB of files,
snapshotted, then changed through a real mount, snapshotted again. Needs root (loop
devices). Prints what a user would see and the GetSnapshotBlock calls it cost.

    sudo .venv/bin/python scripts/filediff_demo.py [xfs|ext4|ntfs]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from ebsfs.emulator import EmulatorServer, Faults, SnapshotStore  # noqa: E402
from tests.snapshot_pairs import (  # noqa: E402
    MiB,
    change,
    copy_sparse,
    mkfs,
    mounted_rw,
    populate,
)

BEFORE, AFTER = "snap-0be1", "snap-0af1"
SIZE = 2048 * MiB
PART = (1 * MiB, SIZE - 2 * MiB)


def ebsfs(*args: str) -> str:
    shown = " ".join(a if not a.startswith("http") else "http://127.0.0.1:PORT" for a in args)
    print(f"$ ebsfs {shown}")
    out = subprocess.run(
        [sys.executable, "-m", "ebsfs", *args], capture_output=True, text=True, check=True
    ).stdout
    return out


def main() -> None:
    fstype = sys.argv[1] if len(sys.argv) > 1 else "xfs"
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "demo")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "demo")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        before, after = tmp / "before.img", tmp / "after.img"
        with open(before, "wb") as f:
            f.truncate(SIZE)
        subprocess.run(
            ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(before)],
            input=f"label: gpt\nstart={PART[0] // 512}, size={PART[1] // 512}, type=linux\n",
            text=True,
            check=True,
            capture_output=True,
        )
        mkfs(fstype, before, PART[1], PART[0])
        with mounted_rw(fstype, before, tmp / "mnt", *PART) as mnt:
            populate(mnt, bulk_bytes=300 * 1000**2)
        copy_sparse(before, after)
        with mounted_rw(fstype, after, tmp / "mnt", *PART) as mnt:
            change(mnt, fstype)
        store = SnapshotStore(Faults(seed=1))
        store.add_image(BEFORE, before)
        store.add_image(AFTER, after, parent=BEFORE)
        written = len(store.get(AFTER).indexes)
        with EmulatorServer(store) as server:
            url = server.url
            print(
                f"# {BEFORE} (before) and {AFTER} (after): a 2 GiB volume, GPT, "
                f"partition 1 {fstype} holding 300 MB of files ({written} blocks written)\n"
            )
            print(ebsfs("diff", "--endpoint-url", url, BEFORE, AFTER).rstrip())
            print()
            server.counters.reset()
            print(ebsfs("diff", "--files", "--endpoint-url", url, BEFORE, AFTER).rstrip())
            gets = sum(server.counters.block_gets.values())
            print(
                f"\n# GetSnapshotBlock calls: {gets} ({100 * gets / written:.1f} % of the "
                f"{written} written blocks; each block at most once: "
                f"{max(server.counters.block_gets.values())})\n"
            )
            result = json.loads(
                ebsfs("diff", "--files", "--json", "--endpoint-url", url, BEFORE, AFTER)
            )
            print("# (the entry for /usr/bin/tool, one of", len(result["files"]), "files)")
            tool = next(f for f in result["files"] if f["path"] == "/usr/bin/tool")
            print(json.dumps(tool, indent=2))


if __name__ == "__main__":
    main()
