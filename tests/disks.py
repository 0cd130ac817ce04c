"""Deterministic builders of small, realistic partitioned disk images (GPT: ext4 + XFS +
NTFS; MBR: two primaries and a logical, all ext4) and read-only loop mounts of them.

Every filesystem is built in its own sparse file, without a loop device, then copied
into the disk at its offset; `sfdisk` writes the table on the plain file. ext4 and XFS
need no privileges; NTFS is populated through an ntfs-3g mount of its file (FUSE, root).

Determinism: fixed UUIDs, labels, hash seed, GPT GUIDs and MBR disk id. Timestamps are
pinned with E2FSPROGS_FAKE_TIME and debugfs (ext4) and libfaketime (`faketime`, for
mkfs.xfs, mkntfs and ntfs-3g); with `faketime` installed two builds are byte-identical,
without it XFS and NTFS get the build time in their inodes (and mkntfs seeds its random
fields from the clock). Rebuilding and comparing found nothing else that varies.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

MiB = 1024 * 1024
SECTOR = 512
EPOCH = 1700000000  # 2023-11-14 22:13:20 UTC: every timestamp in the images
FAKETIME = "2023-11-14 22:13:20"
_CHUNK = 64 * 1024
_ZERO = bytes(_CHUNK)

MOUNT_OPTIONS = {"ext4": "ro,noload", "xfs": "ro,norecovery,nouuid", "ntfs": "ro"}
"""Read-only mount options per fstype: never replay a journal/log (the image is
read-only and may be a crash-consistent snapshot), XFS without the duplicate-UUID check
(the same snapshot may be mounted twice). NTFS goes through ntfs-3g (this kernel has no
ntfs3 driver), so it mounts as `fuseblk`."""

GPT_TYPES = {
    "ext4": "0FC63DAF-8483-4772-8E79-3D69D8477DE4",  # Linux filesystem
    "xfs": "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
    "ntfs": "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7",  # Microsoft basic data
    "none": "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
}
MBR_TYPES = {"ext4": "83", "xfs": "83", "ntfs": "7", "none": "83"}


@dataclass(frozen=True)
class PartSpec:
    """One partition of a built disk, numbered as Linux and fdisk number it."""

    number: int  # 1-4 primary (or GPT slot + 1), 5+ logical
    offset: int  # bytes from the start of the disk
    size: int  # bytes
    fstype: str  # "ext4" | "xfs" | "ntfs" | "none"
    files: dict[str, bytes] = field(hash=False)  # "etc/hostname" -> content
    label: str = ""  # filesystem label (also the GPT partition name)
    uuid: str = ""  # filesystem UUID as blkid shows it (NTFS: 16 hex digits of the serial)
    partuuid: str = ""  # GPT partition GUID; "" for MBR

    @property
    def end(self) -> int:
        """The byte after the partition."""
        return self.offset + self.size


@dataclass(frozen=True)
class Disk:
    """A disk image built by gpt_disk or mbr_disk; `partitions` lists those holding data
    (not an MBR extended container), in table order."""

    path: Path
    size: int
    scheme: str  # "gpt" | "mbr"
    partitions: list[PartSpec] = field(hash=False)

    def partition(self, number: int) -> PartSpec:
        """The partition with this Linux number."""
        for part in self.partitions:
            if part.number == number:
                return part
        raise KeyError(number)


def partition_files(tag: str, big_size: int = 3 * 512 * 1024 + 4099) -> dict[str, bytes]:
    """What a test filesystem holds: small text files, a nested directory, an empty file
    and a pseudo-random file over 1 MiB (spanning four 512 KiB snapshot blocks, not
    ending on a boundary). All of it is computed from `tag`, and differs between tags."""
    rng = random.Random(f"ebsfs-test-disk:{tag}")
    notes = "".join(f"{tag} line {i}: the quick brown fox {i * 7919 % 1000}\n" for i in range(50))
    return {
        "hello.txt": f"hello from {tag}\n".encode(),
        "etc/hostname": f"{tag}\n".encode(),
        "docs/nested/deep/notes.txt": notes.encode(),
        "docs/empty.txt": b"",
        "data/big.bin": rng.randbytes(big_size),
    }


# -- building filesystems --------------------------------------------------------------


def _run(
    cmd: list[str],
    env: dict[str, str] | None = None,
    faketime: bool = False,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a tool, raising with its stderr on failure; under libfaketime if asked for
    and installed."""
    if faketime and shutil.which("faketime"):
        cmd = ["faketime", "-f", FAKETIME, *cmd]
    result = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=120,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({result.returncode}): "
            f"{result.stderr.strip() or result.stdout.strip()}"
        )
    return result


def _directories(files: dict[str, bytes]) -> list[str]:
    """Every directory the files need, parents first ("" is the root)."""
    dirs = {""}
    for name in files:
        parts = name.split("/")[:-1]
        dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    return sorted(dirs, key=lambda d: (d.count("/") if d else -1, d))


def stage_files(files: dict[str, bytes], root: Path) -> None:
    """Write `files` under `root`, all timestamps set to EPOCH."""
    for name, data in files.items():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        os.utime(target, (EPOCH, EPOCH))
    for d in _directories(files):
        os.utime(root / d, (EPOCH, EPOCH))


def build_ext4(
    path: Path,
    size: int,
    files: dict[str, bytes],
    label: str,
    uuid: str,
    reset_ctimes: bool = True,
) -> None:
    """An ext4 image of `size` bytes holding `files` (mkfs.ext4 -d), byte-reproducible:
    fixed UUID, hash seed and time, and inode ctimes reset with debugfs (mke2fs copies
    them from the staged files, where the kernel sets them). `reset_ctimes=False` skips
    that pass (its command file cannot name names holding newlines or quotes); the
    image is then reproducible but for the ctimes."""
    env = {"E2FSPROGS_FAKE_TIME": str(EPOCH)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        stage_files(files, root)
        with open(path, "wb") as f:
            f.truncate(size)
        _run(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-b",
                "4096",
                "-I",
                "256",
                "-L",
                label,
                "-U",
                uuid,
                "-E",
                "root_owner=0:0,hash_seed=5e1f0e5e-0000-4000-8000-000000000001",
                "-d",
                str(root),
                str(path),
            ],
            env,
        )
        if not reset_ctimes:
            return
        commands = Path(tmp) / "ctimes"
        commands.write_text(
            "".join(f"sif /{name} ctime @{EPOCH}\n" for name in [*_directories(files), *files])
        )
        _run(["debugfs", "-w", "-f", str(commands), str(path)], env)


def _protofile(files: dict[str, bytes], root: Path) -> str:
    """An mkfs.xfs prototype file for the staged tree at `root` (names without spaces
    or colons)."""
    lines = ["ebsfs-test", "0 0", "d--755 0 0"]

    def walk(directory: str, depth: int) -> None:
        indent = "  " * depth
        prefix = f"{directory}/" if directory else ""
        children = sorted(
            {name[len(prefix) :].split("/")[0] for name in files if name.startswith(prefix)}
        )
        for child in children:
            path = prefix + child
            if any(c in child for c in " :$\t\n"):
                raise ValueError(f"mkfs.xfs -p cannot hold the name {path!r}")
            if path in files:
                lines.append(f"{indent}{child} ---644 0 0 {root / path}")
            else:
                lines.append(f"{indent}{child} d--755 0 0")
                walk(path, depth + 1)
                lines.append(f"{indent}$")

    walk("", 1)
    lines.append("$")
    return "\n".join(lines) + "\n"


def build_xfs(path: Path, size: int, files: dict[str, bytes], label: str, uuid: str) -> None:
    """An XFS image holding `files` (mkfs.xfs -p protofile). xfsprogs >= 5.19 refuses
    filesystems under 300 MB unless TEST_DIR, TEST_DEV and QA_CHECK_FS are set (its
    fstests escape hatch, also spelled --unsupported); the kernel mounts them fine."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        stage_files(files, root)
        proto = Path(tmp) / "proto"
        proto.write_text(_protofile(files, root))
        with open(path, "wb") as f:
            f.truncate(size)
        _run(
            [
                "mkfs.xfs",
                "-q",
                "-f",
                "-L",
                label,
                "-m",
                f"uuid={uuid}",
                "-p",
                str(proto),
                str(path),
            ],
            {"TEST_DIR": tmp, "TEST_DEV": str(path), "QA_CHECK_FS": "xfs"},
            faketime=True,
        )


def _wait_mounted(
    proc: subprocess.Popen[bytes], cmd: list[str], target: Path, log: IO[bytes], timeout: float = 15
) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.ismount(target):
        if proc.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            said = log.read().decode(errors="replace").strip()
            state = (
                f"exited with {proc.returncode}"
                if proc.returncode is not None
                else f"did not mount within {timeout} s"
            )
            raise RuntimeError(f"{' '.join(cmd)} {state}: {said}")
        time.sleep(0.02)


def _unmount(target: Path) -> None:
    """Unmount, lazily if busy; never raises."""
    if not os.path.ismount(target):
        return
    if subprocess.run(["umount", str(target)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Wait for a FUSE daemon to finish after its unmount (it writes back and closes the
    volume then); kill it if it hangs."""
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def _ntfs3g(
    source: str | Path, target: Path, options: str, faketime: bool = False
) -> Iterator[Path]:
    """ntfs-3g in the foreground (no_detach) so that, after the unmount, waiting for it
    guarantees the volume is written back and the device closed."""
    cmd = ["ntfs-3g", "-o", f"{options},no_detach", str(source), str(target)]
    if faketime and shutil.which("faketime"):
        cmd = ["faketime", "-f", FAKETIME, *cmd]
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            _wait_mounted(proc, cmd, target, log)
            yield target
        finally:
            _unmount(target)
            _stop(proc)


def build_ntfs(
    path: Path, size: int, files: dict[str, bytes], label: str, serial: str, start_sector: int = 0
) -> None:
    """An NTFS image holding `files`: mkntfs on the plain file, then the files copied in
    through an ntfs-3g mount of it (no loop device; needs /dev/fuse and root). `serial`
    is 16 hex digits (what blkid shows as UUID); `start_sector` goes in the boot sector's
    hidden-sectors field, as Windows expects."""
    with open(path, "wb") as f:
        f.truncate(size)
    _run(
        [
            "mkntfs",
            "-q",
            "-F",
            "-Q",
            "-L",
            label,
            "-s",
            str(SECTOR),
            "-p",
            str(start_sector),
            "-H",
            "255",
            "-S",
            "63",
            str(path),
        ],
        faketime=True,
    )
    with (
        tempfile.TemporaryDirectory() as tmp,
        _ntfs3g(path, Path(tmp) / "mnt", "rw", faketime=True) as mnt,
    ):
        for name, data in files.items():
            (mnt / name).parent.mkdir(parents=True, exist_ok=True)
            (mnt / name).write_bytes(data)
    _run(["ntfslabel", "-q", f"--new-serial={serial}", str(path)], faketime=True)


def build_filesystem(path: Path, part: PartSpec) -> None:
    """The filesystem of `part` (with its files, label and UUID) in its own file."""
    if part.fstype == "ext4":
        build_ext4(path, part.size, part.files, part.label, part.uuid)
    elif part.fstype == "xfs":
        build_xfs(path, part.size, part.files, part.label, part.uuid)
    elif part.fstype == "ntfs":
        build_ntfs(path, part.size, part.files, part.label, part.uuid, part.offset // SECTOR)
    elif part.fstype == "none":
        with open(path, "wb") as f:
            f.truncate(part.size)
    else:
        raise ValueError(f"unknown fstype {part.fstype!r}")


def copy_range(src: Path, src_offset: int, size: int, dst: Path, dst_offset: int) -> None:
    """Copy `size` bytes between files, keeping the destination sparse: runs of zeros
    are skipped, so `dst` must be zero (a hole) there already."""
    with open(src, "rb") as fin, open(dst, "r+b") as fout:
        fin.seek(src_offset)
        done = 0
        while done < size:
            chunk = fin.read(min(_CHUNK, size - done))
            if not chunk:
                raise ValueError(f"{src} ends before byte {src_offset + size}")
            if chunk != _ZERO[: len(chunk)]:
                fout.seek(dst_offset + done)
                fout.write(chunk)
            done += len(chunk)


def extract_partition(image: Path, part: PartSpec, dest: Path) -> Path:
    """The bytes of `part` in a file of their own (sparse), as `dd skip= count=` would."""
    with open(dest, "wb") as f:
        f.truncate(part.size)
    copy_range(image, part.offset, part.size, dest, 0)
    return dest


def _assemble(path: Path, size: int, table: str, parts: list[PartSpec]) -> None:
    """Write an empty sparse disk, its partition table (sfdisk on the plain file), then
    each filesystem, built apart, at its offset."""
    with open(path, "wb") as f:
        f.truncate(size)
    _run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(path)], input=table)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        for part in parts:
            fs = Path(tmp) / f"part{part.number}.img"
            build_filesystem(fs, part)
            copy_range(fs, 0, part.size, path, part.offset)
            fs.unlink()


# -- the disks --------------------------------------------------------------------------

GPT_LAYOUT = [  # number, fstype, offset, size: 1 MiB aligned, back to back
    (1, "ext4", 1 * MiB, 24 * MiB),
    (2, "xfs", 25 * MiB, 40 * MiB),
    (3, "ntfs", 65 * MiB, 24 * MiB),
]
"""GPT partitions; the default 96 MiB disk leaves 7 MiB unallocated before the backup
GPT in its last 33 sectors."""


def gpt_disk(path: Path, size: int = 96 * MiB) -> Disk:
    """A GPT disk: 1 = ext4 "gpt-ext4", 2 = XFS "gpt-xfs", 3 = NTFS "gpt-ntfs" (see
    GPT_LAYOUT), each holding partition_files(label); the rest unallocated."""
    end = GPT_LAYOUT[-1][2] + GPT_LAYOUT[-1][3]
    if size < end + 33 * SECTOR:
        raise ValueError(f"a GPT disk needs at least {end + 33 * SECTOR} bytes")
    parts = []
    for number, fstype, offset, psize in GPT_LAYOUT:
        label = f"gpt-{fstype}"
        uuid = (
            f"5E1F0E5E000000B{number}"
            if fstype == "ntfs"
            else f"5e1f0e5e-0000-4000-8000-0000000000b{number}"
        )
        parts.append(
            PartSpec(
                number,
                offset,
                psize,
                fstype,
                partition_files(label),
                label,
                uuid,
                f"5E1F0E5E-0000-4000-8000-0000000000C{number}",
            )
        )
    table = "label: gpt\nlabel-id: 5E1F0E5E-0000-4000-8000-0000000000D2\n" + "".join(
        f"start={p.offset // SECTOR}, size={p.size // SECTOR}, type={GPT_TYPES[p.fstype]}, "
        f"name={p.label}, uuid={p.partuuid}\n"
        for p in parts
    )
    _assemble(path, size, table, parts)
    return Disk(path, size, "gpt", parts)


MBR_EXTENDED = 49 * MiB
"""Where mbr_disk's extended partition (number 3, type 0x5) starts; it runs to the end
of the disk, its first EBR at its first sector."""


def mbr_disk(path: Path, size: int = 96 * MiB, chs_aligned: bool = False) -> Disk:
    """An MBR disk: primaries 1 and 2, an extended partition 3 from 49 MiB to the end of
    the disk, and in it logical 5 (1 MiB after the EBR, as fdisk puts it); all ext4,
    labelled "mbr-p1", "mbr-p2", "mbr-p5", each with partition_files(label).
    With chs_aligned, partition 1 starts at sector 63 as DOS-era tools put it (not 4 KiB
    nor 512 KiB aligned) and still ends at 25 MiB."""
    if size < MBR_EXTENDED + 42 * MiB:
        raise ValueError(f"an MBR disk needs at least {MBR_EXTENDED + 42 * MiB} bytes")
    first = 63 * SECTOR if chs_aligned else 1 * MiB
    layout = [
        (1, first, 25 * MiB - first),
        (2, 25 * MiB, 24 * MiB),
        (5, MBR_EXTENDED + 1 * MiB, 40 * MiB),
    ]
    parts = [
        PartSpec(
            n,
            offset,
            psize,
            "ext4",
            partition_files(f"mbr-p{n}"),
            f"mbr-p{n}",
            f"5e1f0e5e-0000-4000-8000-0000000000a{n}",
        )
        for n, offset, psize in layout
    ]
    lines = [f"start={p.offset // SECTOR}, size={p.size // SECTOR}, type=83" for p in parts]
    lines.insert(
        2, f"start={MBR_EXTENDED // SECTOR}, size={(size - MBR_EXTENDED) // SECTOR}, type=5"
    )
    table = "label: dos\nlabel-id: 0x5e1f0e5e\n" + "".join(f"{line}\n" for line in lines)
    _assemble(path, size, table, parts)
    return Disk(path, size, "mbr", parts)


# -- mounting ---------------------------------------------------------------------------


@contextlib.contextmanager
def loop_device(
    file: Path, offset: int = 0, size: int | None = None, writable: bool = False
) -> Iterator[str]:
    """A loop device over `size` bytes of `file` from `offset` (all of it by default),
    read-only unless `writable`, always detached."""
    cmd = ["losetup", *([] if writable else ["-r"]), "--show", "-f", "-o", str(offset)]
    if size is not None:
        cmd += ["--sizelimit", str(size)]
    device = _run([*cmd, str(file)]).stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], capture_output=True)


@contextlib.contextmanager
def mount_device(device: str, fstype: str, target: Path) -> Iterator[Path]:
    """Mount a block device read-only with MOUNT_OPTIONS[fstype], always unmounted
    (ntfs-3g also waited for)."""
    if fstype not in MOUNT_OPTIONS:
        raise ValueError(f"cannot mount fstype {fstype!r}")
    target.mkdir(parents=True, exist_ok=True)
    if fstype == "ntfs":
        with _ntfs3g(device, target, MOUNT_OPTIONS[fstype]):
            yield target
        return
    _run(["mount", "-t", fstype, "-o", MOUNT_OPTIONS[fstype], device, str(target)])
    try:
        yield target
    finally:
        _unmount(target)


@contextlib.contextmanager
def loop_mount_partition(image: Path, part: PartSpec, target: Path) -> Iterator[Path]:
    """Mount partition `part` of the disk `image` read-only at `target` through a loop
    device by offset and sizelimit; always unmounted and detached."""
    with (
        loop_device(image, part.offset, part.size) as device,
        mount_device(device, part.fstype, target),
    ):
        yield target


@contextlib.contextmanager
def loop_mount_file(file: Path, fstype: str, target: Path) -> Iterator[Path]:
    """Mount a whole file holding one filesystem (a partition image, such as one exposed
    by ebsfs) read-only at `target`, as `mount -o loop,ro,...` would, but with its own
    loop device (losetup -r) so it is always detached."""
    with loop_device(file) as device, mount_device(device, fstype, target):
        yield target


def read_tree(root: Path) -> dict[str, bytes]:
    """Every regular file under `root` ("a/b" -> content), skipping the filesystems' own
    entries (lost+found, NTFS's $-files and System Volume Information)."""
    found = {}
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if rel.split("/")[0] in ("lost+found", "System Volume Information") or rel.startswith("$"):
            continue
        if path.is_file():
            found[rel] = path.read_bytes()
    return found
