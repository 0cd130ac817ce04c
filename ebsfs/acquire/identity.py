"""Which file or device an unfinished `ebsfs get` was writing, so that a resumed run
never trusts (nor overwrites) something else that took its name: a renamed /dev/sdX,
a disk swapped while the machine was off, an OUTPUT.part replaced by another file.

A file is known by its device and inode. A block device by its size, its serial or
WWN where sysfs has one, and a fingerprint: a random nonce this copy wrote (and
flushed) into the image's last block, which the copy fills with its own bytes only at
the very end (target.DeviceTarget). Device numbers are recorded but prove nothing:
/dev/sdb is 8:16 whichever disk answers to it, and one disk may come back as another
number after a reboot."""

from __future__ import annotations

import dataclasses
import os
import stat
from dataclasses import dataclass
from typing import Any

from ebsfs.errors import OutputError

FINGERPRINT_MAGIC = b"ebsfs get: unfinished copy; fingerprint "
FINGERPRINT_BYTES = 4096
"""What the fingerprint takes at the start of the last block (one page: O_DIRECT and
the device's logical block size both allow it)."""
SERIAL_FILES = ("wwid", "device/wwid", "device/serial", "serial", "dm/uuid")
"""Where sysfs keeps a stable name of a whole disk (NVMe, SCSI/SATA, virtio, device
mapper), the first found winning."""
SERIAL_MAX = 256


@dataclass
class TargetIdentity:
    """What a journal records of its target (`target` in `<stem>.part.json`)."""

    kind: str
    """"file" or "device"."""
    device: str
    """MAJOR:MINOR: the file system's (st_dev) for a file, the device's own (st_rdev)."""
    inode: int | None = None
    """A file's inode."""
    size: int | None = None
    """A device's capacity in bytes."""
    serial: str | None = None
    """A device's serial or WWN, as sysfs gives it (for comparison only, never printed)."""
    fingerprint: str | None = None
    """The hex nonce written into a device's last block; None once the copy has begun
    writing that block's own bytes (the end of a run)."""

    @classmethod
    def from_json(cls, data: object) -> TargetIdentity:
        """ValueError unless `data` is an identity as `as_json` writes it."""
        if not isinstance(data, dict):
            raise ValueError("target is not a JSON object")
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        try:
            identity = cls(**values)
        except TypeError as err:
            raise ValueError(str(err)) from err
        ints = (identity.inode, identity.size)
        texts = (identity.serial, identity.fingerprint)
        if (
            identity.kind not in ("file", "device")
            or not isinstance(identity.device, str)
            or any(v is not None and (type(v) is not int) for v in ints)
            or any(v is not None and not isinstance(v, str) for v in texts)
        ):
            raise ValueError(f"target is {data!r}")
        return identity

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def _numbers(dev: int) -> str:
    return f"{os.major(dev)}:{os.minor(dev)}"


def identify(fd: int) -> TargetIdentity:
    """The identity of the open file or block device `fd` (no fingerprint yet)."""
    st = os.fstat(fd)
    if not stat.S_ISBLK(st.st_mode):
        return TargetIdentity("file", _numbers(st.st_dev), inode=st.st_ino)
    size = os.lseek(fd, 0, os.SEEK_END)
    return TargetIdentity(
        "device", _numbers(st.st_rdev), size=size, serial=sysfs_serial(st.st_rdev)
    )


def _read_small(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            raw = f.read(SERIAL_MAX)
    except OSError:
        return None
    text = raw.decode("ascii", "backslashreplace").strip()
    return text or None


def sysfs_serial(rdev: int) -> str | None:
    """A stable name of the disk behind `rdev` (with the partition's number and start
    for a partition), or None where sysfs has none (loop devices, some virtio disks)."""
    node = os.path.realpath(f"/sys/dev/block/{_numbers(rdev)}")
    if not os.path.isdir(node):
        return None
    where = ""
    number = _read_small(os.path.join(node, "partition"))
    if number is not None:
        where = f" partition {number} start {_read_small(os.path.join(node, 'start'))}"
        node = os.path.dirname(node)
    for name in SERIAL_FILES:
        value = _read_small(os.path.join(node, name))
        if value is not None:
            return f"{name}={value}{where}"
    return None


def fingerprint_bytes(nonce: str) -> bytes:
    """The page written at the start of a device's last block while a copy runs."""
    head = FINGERPRINT_MAGIC + nonce.encode("ascii") + b"\n"
    return head + bytes(FINGERPRINT_BYTES - len(head))


def new_nonce() -> str:
    return os.urandom(16).hex()


def check_resume(
    recorded: TargetIdentity | None,
    current: TargetIdentity,
    found_fingerprint: bytes | None,
    name: str,
    start_over: str,
) -> bool:
    """Whether an earlier run's zeroing of this target may be trusted. False when the
    identity cannot be proven (a journal of an older version; a fingerprint retired
    at the end of a run): the resumed run then trusts only what re-reads right.
    OutputError, before anything is written, when the target is provably another one:
    resuming would record bytes it does not hold (and write over someone's disk).
    `found_fingerprint` is what the device holds where the fingerprint goes."""
    if recorded is None:
        return current.kind == "file"
    why = ""
    if recorded.kind != current.kind:
        why = f"it is a {current.kind}, the copy's target a {recorded.kind}"
    elif current.kind == "file":
        if (recorded.device, recorded.inode) != (current.device, current.inode):
            why = "another file took its name since the copy started"
    elif recorded.size != current.size:
        why = f"it holds {current.size} bytes, the copy's device {recorded.size}"
    elif recorded.serial != current.serial:
        why = "its serial number (WWN) differs from the copy's device"
    elif recorded.fingerprint is None:
        return False
    elif found_fingerprint != fingerprint_bytes(recorded.fingerprint):
        why = "it does not hold the fingerprint the copy wrote on its device"
    if why:
        raise OutputError(
            f"{name} is not what this unfinished copy was writing ({why}): refusing to "
            f"resume onto it; give the right {recorded.kind}, or remove {start_over} "
            "to start over"
        )
    return True
