"""Build deterministic disk images (GPT + one ext4 partition with files) for the demo,
the tests and the benchmarks, without mounting anything (mkfs.ext4 -d, sfdisk)."""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

PARTITION_START = 1024 * 1024
FS_UUID = "5e1f0e5e-0000-4000-8000-00000000eb5f"
"""The ext4 partition starts at 1 MiB (sector 2048), as partitioning tools put it."""


def demo_files(seed: int = 7, blob_mib: int = 4) -> dict[str, bytes]:
    """What the demo filesystem holds: a small Linux-looking tree, some binary data."""
    rng = random.Random(seed)
    auth = "".join(
        f"Nov 2{i % 10} 0{i % 10}:1{i % 6}:00 web-1 sshd[{1000 + i}]: "
        f"{'Accepted publickey' if i % 7 else 'Failed password'} for "
        f"{'deploy' if i % 7 else 'root'} from 198.51.100.{i % 250} port {40000 + i}\n"
        for i in range(400)
    )
    return {
        "README.txt": b"This ext4 filesystem lives inside an EBS snapshot served by the "
        b"ebsfs emulator.\nebsfs read only the blocks you looked at.\n",
        "etc/hostname": b"web-1\n",
        "etc/os-release": b'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\n',
        "var/log/auth.log": auth.encode(),
        "home/alice/notes.txt": b"rotate the deploy key\ncheck cron on web-1\n",
        "srv/data/blob.bin": rng.randbytes(blob_mib * 1024 * 1024),
    }


def build_ext4(path: Path, size: int, files: dict[str, bytes], label: str = "demo") -> None:
    """An ext4 filesystem image of `size` bytes holding `files`."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, data in files.items():
            target = root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        with open(path, "wb") as f:
            f.truncate(size)
        subprocess.run(
            # Fixed UUID and hash seed: the same files give the same blocks, so two
            # images of one "volume" differ only where their files do.
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-L",
                label,
                "-U",
                FS_UUID,
                "-E",
                "root_owner=0:0,hash_seed=5e1f0e5e-0000-4000-8000-000000000001",
                "-d",
                str(root),
                str(path),
            ],
            check=True,
            capture_output=True,
            env={**os.environ, "E2FSPROGS_FAKE_TIME": "1700000000"},
        )


def build_disk(path: Path, size: int, files: dict[str, bytes], label: str = "demo") -> int:
    """A GPT disk of `size` bytes with one ext4 partition (from 1 MiB to 1 MiB before
    the end) holding `files`. Returns the partition's byte offset."""
    part_size = size - 2 * PARTITION_START
    with tempfile.TemporaryDirectory() as tmp:
        part = Path(tmp) / "part.img"
        build_ext4(part, part_size, files, label)
        with open(path, "wb") as f:
            f.truncate(size)
        subprocess.run(
            ["sfdisk", "--quiet", str(path)],
            input="label: gpt\nlabel-id: 5E1F0E5E-0000-4000-8000-0000000000D1\n"
            f"start={PARTITION_START // 512}, size={part_size // 512}, type=linux, "
            f"name={label}, uuid=5E1F0E5E-0000-4000-8000-0000000000F1\n",
            text=True,
            check=True,
            capture_output=True,
        )
        copy_sparse(part, path, PARTITION_START)
    return PARTITION_START


def copy_sparse(source: Path, target: Path, offset: int, chunk: int = 524288) -> None:
    """Copy `source` into `target` at `offset`, leaving holes where it holds zeros (a
    large mostly empty filesystem stays cheap on disk)."""
    zeros = bytes(chunk)
    with open(source, "rb") as src, open(target, "r+b") as dst:
        position = offset
        while data := src.read(chunk):
            if data != zeros[: len(data)]:
                dst.seek(position)
                dst.write(data)
            position += len(data)


def random_image(
    path: Path, size: int, seed: int = 1, sparse_every: int = 0, written: float = 1.0
) -> None:
    """An image of random (deterministic) blocks. With sparse_every=N, every Nth
    512 KiB block is left zero so the snapshot has absent blocks; with written=F, each
    block is written with probability F (holes at random, as real volumes have)."""
    rng = random.Random(seed)
    block = 524288
    with open(path, "wb") as f:
        for n in range(size // block):
            hole = (sparse_every and n % sparse_every == 0) or (
                written < 1.0 and rng.random() >= written
            )
            if hole:
                f.seek(block, os.SEEK_CUR)
            else:
                f.write(rng.randbytes(block))
        f.truncate(size)


MIN_SIZE_MIB = 8
"""The demo files (a 4 MiB blob among them) and ext4's own structures need this much."""

DESCRIPTION = """\
Write the demo disk: a raw image of SIZE_MIB MiB with a GPT partition table and one
ext4 partition (from 1 MiB to 1 MiB before the end) holding a small Linux-looking tree
(/etc/hostname, /var/log/auth.log, /home/alice/notes.txt, a 4 MiB /srv/data/blob.bin).
The same arguments always give the same bytes. Nothing is mounted: mkfs.ext4 -d and
sfdisk build it, so no root is needed."""

EPILOG = """\
examples:
  python -m ebsfs.emulator.diskimage disk.img 64
  ebsfs-emulator --snapshot snap-0123456789abcdef0=disk.img
"""


def _size_mib(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of MiB: {text!r}") from None
    if value < MIN_SIZE_MIB:
        raise argparse.ArgumentTypeError(f"must be at least {MIN_SIZE_MIB} MiB, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=(  # the console script's name, or how the module was run
            "ebsfs-demo-disk"
            if os.path.basename(sys.argv[0]) == "ebsfs-demo-disk"
            else "python -m ebsfs.emulator.diskimage"
        ),
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", metavar="PATH", help="the image file to write (replaced if it exists)")
    p.add_argument(
        "size_mib",
        metavar="SIZE_MIB",
        type=_size_mib,
        nargs="?",
        default=64,
        help=f"the disk's size in MiB (default 64, at least {MIN_SIZE_MIB})",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m ebsfs.emulator.diskimage PATH [SIZE_MIB]`: write the demo disk. Bad
    input is one line and exit status 2, a failed build one line and 1."""
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Path(args.path)
    if not out.parent.is_dir():
        parser.error(f"cannot write {args.path}: no directory {str(out.parent)!r}")
    try:
        offset = build_disk(out, args.size_mib * 1024 * 1024, demo_files())
    except subprocess.CalledProcessError as err:
        output = err.stderr or b""
        if isinstance(output, bytes):
            output = output.decode(errors="replace")
        said = output.strip().splitlines()
        detail = said[-1] if said else f"exit status {err.returncode}"
        print(f"{parser.prog}: error: {err.cmd[0]} failed: {detail}", file=sys.stderr)
        return 1
    except OSError as err:
        where = f" {err.filename}:" if err.filename else ""
        print(f"{parser.prog}: error:{where} {err.strerror or err}", file=sys.stderr)
        return 1
    print(f"{out}: {args.size_mib} MiB GPT disk, ext4 partition at byte {offset}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
