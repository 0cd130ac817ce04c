"""Where `ebsfs get` writes an image: a regular file (sparse, and named OUTPUT.part
until its manifest is written), a block device (zeroed where the snapshot holds
nothing, nothing written past the image), or standard output (the image in order,
zeros written out). Every failure is an OutputError naming the file and the cause."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import sys
from enum import StrEnum

from ebsfs.acquire.identity import FINGERPRINT_BYTES, fingerprint_bytes
from ebsfs.acquire.manifest import PRIVATE, private_flags, sync_directory
from ebsfs.constants import BLOCK_SIZE
from ebsfs.errors import OutputError

BLKZEROOUT = 0x127F
"""_IO(0x12, 127): zero a byte range of a block device (the device's Write Zeroes or
unmap where it has them, else the kernel writes zeros for us)."""
ZEROS = bytes(8 * 1024**2)
ZERO_PIECE = 1024**3
"""Bytes zeroed per BLKZEROOUT call: progress moves and Ctrl-C is heard between them."""
RESUME_HINT = "; run the same command again to resume (nothing downloaded is lost)"
DIRECT_ALIGN = 4096
"""What O_DIRECT asks of offsets, lengths and buffer addresses (at most a page on the
file systems and disks we know; a block is 128 of them)."""


class TargetKind(StrEnum):
    """What an output names: a regular file, a block device, or "-" (standard output)."""

    FILE = "file"
    DEVICE = "device"
    STREAM = "stream"

    @classmethod
    def of(cls, output: str) -> TargetKind:
        if output == "-":
            return cls.STREAM
        return cls.DEVICE if is_block_device(output) else cls.FILE


def failure(what: str, path: str, err: OSError) -> OutputError:
    hint = ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "; free some space and run the same command again: it resumes"
    elif err.errno == errno.EROFS:
        hint = " (a read-only file system)"
    return OutputError(f"{what} {path}: {err.strerror or err}{hint}")


class Target:
    """The writing side of a copy. `write` and `read` may be called from several
    worker threads at once (pwrite/pread at distinct offsets); `stream` targets only
    take `write` calls in order, from one thread at a time."""

    name: str
    stream = False
    """Bytes must come in order, holes included (standard output)."""
    resumable = True
    zeroing_costs = False
    """Zeroing writes to the target (a device): a resumed run skips what was zeroed."""
    unrecorded: int | None = None
    """The offset of a block written only by `finish` (a device's fingerprint block):
    never recorded in the journal, so never read back by a resumed run."""

    def write(self, offset: int, data: bytes | memoryview) -> None:
        raise NotImplementedError

    def read(self, offset: int, size: int) -> bytes:
        raise NotImplementedError

    def zero(self, offset: int, length: int) -> None:
        """Bytes the snapshot never wrote: make them read as zeros."""
        raise NotImplementedError

    def flush(self) -> None:
        """Everything written and zeroed so far is on stable storage: called before
        the journal says so, so that a power cut never leaves it claiming more."""

    def finish(self) -> None:
        """Everything written is on stable storage."""
        self.flush()

    def close(self) -> None:
        pass


class DirectWrites:
    """A second descriptor of the output, opened with O_DIRECT: a fetched block goes
    from its receive buffer (page-aligned, in the engine's cache) to the disk without a
    copy into the page cache. A copy of a whole snapshot through the page cache costs
    a kernel copy of every byte, page-cache memory the size of the image, and its
    writeback: the largest part of `ebsfs get`'s system time (docs/performance.md).
    Data O_DIRECT refuses (unaligned: a block read back on resume or from a base image)
    and file systems without it take the ordinary descriptor."""

    def __init__(self, path: str, flags: int) -> None:
        self.fd = -1
        direct = getattr(os, "O_DIRECT", 0)
        if direct:
            try:
                self.fd = os.open(path, flags | direct)
            except OSError:  # a file system without O_DIRECT: buffered writes only
                self.fd = -1

    def write(self, offset: int, data: bytes | memoryview) -> int:
        """Bytes written directly from the start of `data` (0: write them buffered)."""
        if self.fd < 0 or offset % DIRECT_ALIGN or len(data) % DIRECT_ALIGN:
            return 0
        try:
            return os.pwrite(self.fd, data, offset)
        except OSError as err:
            if err.errno == errno.EINVAL:  # an unaligned buffer
                return 0
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def same_file(fd: int, path: str) -> str:
    """A name that opens what `fd` has open, whatever took `path` since (a file renamed
    in, a device node replaced): /proc/self/fd/N, or `path` where there is no /proc."""
    proc = f"/proc/self/fd/{fd}"
    return proc if os.path.exists(proc) else path


class _OnDisk(Target):
    """A file or a device written at offsets: the ordinary descriptor `fd` (reads,
    unaligned writes, fsync) and `direct` beside it. Errors name `self.name`."""

    fd: int
    direct: DirectWrites

    def write(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        try:
            while view:
                written = self.direct.write(offset, view) or os.pwrite(self.fd, view, offset)
                if written == 0:  # nothing written and no error: never loop on it
                    raise OutputError(
                        f"cannot write {self.name}: short write at {offset}{RESUME_HINT}"
                    )
                view, offset = view[written:], offset + written
        except OSError as err:
            raise failure("cannot write", self.name, err) from err

    def read(self, offset: int, size: int) -> bytes:
        try:
            return os.pread(self.fd, size, offset)
        except OSError as err:
            raise failure("cannot read", self.name, err) from err

    def flush(self) -> None:
        try:
            os.fsync(self.fd)  # on a device also the disk's write cache (a FLUSH)
        except OSError as err:
            raise failure("cannot flush", self.name, err) from err

    def close(self) -> None:
        self.direct.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class FileTarget(_OnDisk):
    """A sparse regular file, written as `<path>.part` and renamed by `publish` once
    the manifest is written: an OUTPUT that exists is always finished."""

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        self.part = path + ".part"
        self.name = self.part
        self.created = True
        """Created by this run: whatever an earlier run left cannot be in it."""
        try:
            self.fd = os.open(self.part, private_flags(os.O_RDWR) | os.O_EXCL, PRIVATE)
        except FileExistsError:
            self.created = False
            try:
                self.fd = os.open(self.part, os.O_RDWR | os.O_NOFOLLOW)
            except OSError as err:
                raise failure("cannot open", self.part, err) from err
        except OSError as err:
            raise failure("cannot create", self.part, err) from err
        try:
            st = os.fstat(self.fd)
            if not stat.S_ISREG(st.st_mode):
                raise OutputError(f"{self.part} is not a regular file: remove it to start over")
            if stat.S_IMODE(st.st_mode) & 0o077:  # left by a version that made it 0644
                os.fchmod(self.fd, stat.S_IMODE(st.st_mode) & 0o700)
            if st.st_size != size:
                os.ftruncate(self.fd, size)  # holes: never-written blocks cost no space
        except OSError as err:
            os.close(self.fd)
            raise failure("cannot size", self.part, err) from err
        except OutputError:
            os.close(self.fd)
            raise
        self.direct = DirectWrites(same_file(self.fd, self.part), os.O_WRONLY)

    def zero(self, offset: int, length: int) -> None:
        pass  # a hole since the file was sized, and no run writes there

    def publish(self) -> None:
        """OUTPUT.part becomes OUTPUT (call once the manifest is written)."""
        os.replace(self.part, self.path)
        sync_directory(self.path)
        self.name = self.path


def device_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


class DeviceTarget(_OnDisk):
    """A block device at least as large as the volume, opened exclusively (it fails if
    mounted). Never-written blocks are zeroed with BLKZEROOUT, or written zeros where
    the device refuses it; nothing past the image is touched.

    The image's last block is held back: while the copy runs it holds this copy's
    fingerprint (identity.py: a resumed run checks it is writing the same disk), and
    `finish` writes its own bytes (or zeros) there, after everything else."""

    zeroing_costs = True

    def __init__(self, path: str, size: int) -> None:
        self.path = self.name = path
        self.size = size
        self.zeroout = True
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_EXCL)
        except OSError as err:
            hint = " (mounted or in use?)" if err.errno == errno.EBUSY else ""
            raise OutputError(f"cannot open {path}: {err.strerror}{hint}") from err
        capacity = device_size(self.fd)
        if capacity < size:
            os.close(self.fd)
            raise OutputError(
                f"{path} holds {capacity} bytes, the snapshot {size}: the "
                "device must be at least the volume's size"
            )
        # Not O_EXCL: this process holds the device exclusively through self.fd.
        self.direct = DirectWrites(same_file(self.fd, path), os.O_WRONLY)
        whole = size >= BLOCK_SIZE and size % BLOCK_SIZE == 0  # every EBS volume
        self.unrecorded = size - BLOCK_SIZE if whole else None
        self.held: bytes | None = None
        """The last block's bytes once the copy has them (None: zeros)."""

    def write(self, offset: int, data: bytes | memoryview) -> None:
        assert offset + len(data) <= self.size
        if offset == self.unrecorded:
            assert len(data) == BLOCK_SIZE
            self.held = bytes(data)  # its buffer goes back to the cache after this
            return
        super().write(offset, data)

    def stamp(self, nonce: str) -> None:
        """Write this copy's fingerprint into the held block, durably."""
        assert self.unrecorded is not None
        super().write(self.unrecorded, fingerprint_bytes(nonce))
        self.flush()

    def fingerprint_found(self) -> bytes | None:
        """What the device holds where a fingerprint goes (None: no place for one)."""
        if self.unrecorded is None:
            return None
        return self.read(self.unrecorded, FINGERPRINT_BYTES)

    def finish(self) -> None:
        """The held block's own bytes over the fingerprint, then everything flushed."""
        if self.unrecorded is not None:
            super().write(self.unrecorded, self.held or bytes(BLOCK_SIZE))
        self.flush()

    def zero(self, offset: int, length: int) -> None:
        end = min(offset + length, self.size)
        if self.unrecorded is not None and end > self.unrecorded:
            end = max(offset, self.unrecorded)  # zeros go there at `finish`
            self.held = None
        while offset < end:
            piece = min(ZERO_PIECE, end - offset)
            if self.zeroout:
                try:
                    fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", offset, piece))
                    offset += piece
                    continue
                except OSError as err:
                    if err.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                        raise failure("cannot zero", self.path, err) from err
                    self.zeroout = False  # write the zeros ourselves from now on
            for start in range(offset, offset + piece, len(ZEROS)):
                self.write(start, memoryview(ZEROS)[: min(len(ZEROS), offset + piece - start)])
            offset += piece


class StreamTarget(Target):
    """Standard output: the image in order, never-written blocks as zeros."""

    stream = True
    resumable = False
    name = "standard output"

    def __init__(self, fd: int | None = None) -> None:
        self.fd = sys.stdout.fileno() if fd is None else fd

    def write(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except BrokenPipeError:
            raise OutputError(
                "standard output was closed before the image was complete "
                "(the reader stopped); no manifest written"
            ) from None
        except OSError as err:
            raise failure("cannot write", self.name, err) from err

    def read(self, offset: int, size: int) -> bytes:
        raise AssertionError("a stream is not read back")

    def zero(self, offset: int, length: int) -> None:
        for start in range(offset, offset + length, len(ZEROS)):
            self.write(start, memoryview(ZEROS)[: min(len(ZEROS), offset + length - start)])


def open_target(kind: TargetKind, output: str, size: int) -> Target:
    """The target of a copy of a `size`-byte image to `output`."""
    if kind is TargetKind.STREAM:
        return StreamTarget()
    if kind is TargetKind.DEVICE:
        return DeviceTarget(output, size)
    return FileTarget(output, size)


def is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def check_directory(path: str, what: str) -> None:
    """The directory `path` goes in exists and may be written: a one-line error now
    rather than after the first blocks."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise OutputError(f"cannot write {what} {path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {what} {path}: directory {directory} is not writable")
