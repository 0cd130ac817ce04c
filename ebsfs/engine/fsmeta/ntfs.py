"""NTFS: the metadata a tree walk reads (boot sector, the MFT, directory index blocks,
attribute lists), found by parsing the volume itself, wave by wave (see walk.py).

Waves: the boot sector; MFT record 0 ($MFT); the extension records of $MFT's own
$DATA when it has an attribute list (rare: a very fragmented MFT); the whole MFT up to
its initialized size, all at once; then, from every record in use, the runs of its
$INDEX_ALLOCATION (INDX blocks: what a tool listing a directory reads) and of a
non-resident $ATTRIBUTE_LIST, and the few system streams a library loads when it opens
the volume ($AttrDef, $UpCase, $Secure:$SDS). The runs of a file's $DATA are in its
record already: its clusters are file content and never yielded; the long ones of a
user file are told as file runs (walk.py FileRun), within its initialized size, unless
the stream is compressed or encrypted (its clusters are not the bytes a reader gets).

Every number comes from the disk: offsets are checked against the volume's size, a
record failing its update-sequence check is skipped, runlists and attribute walks stop
at their bounds, and every loop has a cap below.
"""

from __future__ import annotations

import bisect
import contextlib
import struct
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

from ebsfs.engine.fsmeta.walk import FILE_RUN_MIN, Extent, FileRun, Read, WalkStopped, Wave

BOOT_SIZE = 512
OEM_ID = b"NTFS    "
MAX_CLUSTER = 2 * 1024 * 1024
"""The largest cluster Windows formats (2 MiB, since Windows 10 1709)."""
MIN_RECORD, MAX_RECORD = 512, 64 * 1024
"""MFT record sizes accepted (1 KiB and 4 KiB in practice)."""
FIXUP_STRIDE = 512
"""Update-sequence fixups protect the last two bytes of every 512 bytes, whatever the
sector size."""
MAX_RECORDS = 1 << 23
"""MFT records scanned at most (8 GiB of 1 KiB records, about 8 million files)."""
MAX_RUNS = 65536
"""Runs decoded per runlist."""
MAX_EXTENTS = 1 << 18
"""Extents yielded in one walk; past it the walk stops (after yielding what fits)."""
MAX_MFT_SEGMENTS = 64
"""Extension records holding $MFT's own $DATA followed at most (rounds and records)."""
MAX_LIST_BYTES = 256 * 1024
"""An $ATTRIBUTE_LIST's size limit in NTFS itself."""
MAX_STREAM = 256 * 1024 * 1024
"""Bytes taken of any one metadata stream (a directory's index blocks, a system
stream)."""
READ_CHUNK = 1024 * 1024
"""MFT bytes parsed per read (records are scanned chunk by chunk, not all held). The
walk parses on the engine's loop and yields to the tools' reads at each read, so the
records of one read are the longest a tool's read waits for the parsing: 1,024 here."""

ATTRIBUTE_LIST, DATA, INDEX_ALLOCATION, END = 0x20, 0x80, 0xA0, 0xFFFFFFFF
IN_USE, DIRECTORY = 0x0001, 0x0002
COMPRESSED, ENCRYPTED = 0x0001, 0x4000
"""Attribute flags: such a stream's clusters are not the bytes a reader gets."""
FIRST_USER_RECORD = 16
"""Records below are the volume's own files ($MFT, $LogFile, $Bitmap, ...): no
tool's reader streams through them, so their runs are not told."""
SYSTEM_STREAMS = {4: "", 9: "$SDS", 10: ""}
"""Record number -> the $DATA stream a library reads when it opens the volume:
$AttrDef, $Secure:$SDS (security descriptors), $UpCase (name collation)."""
_U16, _U32, _U64 = struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<Q")


@dataclass(frozen=True, slots=True)
class Geometry:
    """What the boot sector says, checked."""

    size: int
    cluster: int
    record: int
    mft_offset: int


@dataclass(frozen=True, slots=True)
class Attribute:
    """One attribute header of a record: its bytes in `record[start:end]`."""

    type: int
    name: str
    nonresident: bool
    record: bytes
    start: int
    end: int


def _u16(data: bytes, at: int) -> int:
    return int(_U16.unpack_from(data, at)[0])


def _u32(data: bytes, at: int) -> int:
    return int(_U32.unpack_from(data, at)[0])


def _u64(data: bytes, at: int) -> int:
    return int(_U64.unpack_from(data, at)[0])


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def geometry(boot: bytes, size: int) -> Geometry:
    """Cluster and record sizes and where the MFT starts; WalkStopped if not sane."""
    if len(boot) < BOOT_SIZE or boot[3:11] != OEM_ID:
        raise WalkStopped("no NTFS boot sector")
    sector = _u16(boot, 0x0B)
    if not _power_of_two(sector) or not 256 <= sector <= 4096:
        raise WalkStopped(f"bytes per sector {sector}")
    raw = boot[0x0D]
    per_cluster = 1 << (256 - raw) if raw > 0x80 else raw  # > 0x80: a negative shift
    cluster = sector * per_cluster
    if not _power_of_two(per_cluster) or cluster > MAX_CLUSTER:
        raise WalkStopped(f"sectors per cluster {raw:#x}")
    per_record = struct.unpack_from("<b", boot, 0x40)[0]
    record = per_record * cluster if per_record > 0 else 1 << min(-per_record, 31)
    if not _power_of_two(record) or not MIN_RECORD <= record <= MAX_RECORD:
        raise WalkStopped(f"MFT record size {record}")
    mft_offset = _u64(boot, 0x30) * cluster
    if mft_offset == 0 or mft_offset + record > size:
        raise WalkStopped("the MFT lies outside the volume")
    return Geometry(size, cluster, record, mft_offset)


def fixed(raw: bytes, record: int) -> bytes | None:
    """The record with its update-sequence fixups applied; None if it is not a FILE
    record or fails the check (torn or damaged)."""
    if len(raw) < record or raw[:4] != b"FILE":
        return None
    usa, count = _u16(raw, 4), _u16(raw, 6)
    if count != record // FIXUP_STRIDE + 1 or usa < 0x28 or usa % 2 or usa + 2 * count > record:
        return None
    out = bytearray(raw[:record])
    usn = out[usa : usa + 2]
    for i in range(1, count):
        end = i * FIXUP_STRIDE
        if out[end - 2 : end] != usn:
            return None
        out[end - 2 : end] = out[usa + 2 * i : usa + 2 * i + 2]
    return bytes(out)


def attributes(record: bytes) -> list[Attribute]:
    """The attribute headers of a fixed record, in order, up to the first damaged one."""
    found: list[Attribute] = []
    used = min(_u32(record, 0x18), len(record))
    at = _u16(record, 0x14)
    if at < 0x28:  # inside the record header
        return found
    while at + 16 <= used:
        kind, length = _u32(record, at), _u32(record, at + 4)
        if kind == END or length < 16 or length % 8 or at + length > used:
            break
        nonresident = record[at + 8] != 0
        name_length, name_at = record[at + 9], _u16(record, at + 10)
        if length < (0x40 if nonresident else 0x18) or name_at + 2 * name_length > length:
            break
        name = record[at + name_at : at + name_at + 2 * name_length].decode("utf-16-le", "replace")
        found.append(Attribute(kind, name, nonresident, record, at, at + length))
        at += length
    return found


def resident_value(attr: Attribute) -> bytes:
    """A resident attribute's value (empty if its bounds are damaged)."""
    length, offset = _u32(attr.record, attr.start + 0x10), _u16(attr.record, attr.start + 0x14)
    if offset < 0x18 or attr.start + offset + length > attr.end:
        return b""
    return attr.record[attr.start + offset : attr.start + offset + length]


def runs(attr: Attribute) -> list[tuple[int | None, int]]:
    """A non-resident attribute's runlist: (first cluster, clusters), None for a hole;
    decoding stops at the first malformed run."""
    data, at, end = attr.record, attr.start + _u16(attr.record, attr.start + 0x20), attr.end
    if at < attr.start + 0x40:
        return []
    found: list[tuple[int | None, int]] = []
    lcn = 0
    while at < end and len(found) < MAX_RUNS:
        header = data[at]
        width, shift = header & 0x0F, header >> 4
        if header == 0 or width == 0 or width > 8 or shift > 8 or at + 1 + width + shift > end:
            break
        count = int.from_bytes(data[at + 1 : at + 1 + width], "little")
        if count == 0:
            break
        if shift:
            lcn += int.from_bytes(
                data[at + 1 + width : at + 1 + width + shift], "little", signed=True
            )
            found.append((lcn, count))
        else:
            found.append((None, count))
        at += 1 + width + shift
    return found


def segment(attr: Attribute) -> tuple[int, int, int, int]:
    """(first VCN, last VCN, data size, initialized size) of a non-resident attribute;
    the sizes hold only in the segment starting at VCN 0."""
    start = attr.start
    return (
        _u64(attr.record, start + 0x10),
        _u64(attr.record, start + 0x18),
        _u64(attr.record, start + 0x30),
        _u64(attr.record, start + 0x38),
    )


def stream_extents(attr: Attribute, geo: Geometry, limit: int) -> list[tuple[int, Extent]]:
    """(position in the stream, extent on disk) of one segment's allocated runs: no more
    than its VCN range claims, nor than `limit` bytes of the stream when it starts at
    VCN 0; parts outside the volume left out."""
    first, last, data_size, _ = segment(attr)
    if last < first or first * geo.cluster >= geo.size:  # metadata streams are not sparse
        return []
    clusters = last - first + 1
    if first == 0:
        clusters = min(clusters, -(-min(data_size, limit) // geo.cluster))
    found: list[tuple[int, Extent]] = []
    vcn = first
    for lcn, count in runs(attr):
        count = min(count, clusters - (vcn - first))
        if count <= 0:
            break
        if lcn is not None and lcn >= 0:
            offset = lcn * geo.cluster
            length = min(count * geo.cluster, geo.size - offset)
            if length > 0:
                found.append((vcn * geo.cluster, (offset, length)))
        vcn += count
    return found


def list_entries(value: bytes) -> list[tuple[int, str, int]]:
    """(type, name, record number) of each $ATTRIBUTE_LIST entry, up to a damaged one."""
    found: list[tuple[int, str, int]] = []
    at = 0
    while at + 0x1A <= len(value):
        kind, length = _u32(value, at), _u16(value, at + 4)
        name_length, name_at = value[at + 6], value[at + 7]
        if length < 0x1A or at + length > len(value) or name_at + 2 * name_length > length:
            break
        name = value[at + name_at : at + name_at + 2 * name_length].decode("utf-16-le", "replace")
        found.append((kind, name, _u64(value, at + 0x10) & 0xFFFFFFFFFFFF))
        at += length
    return found


class MftMap:
    """Where the MFT's own $DATA lies: segments found so far, by stream position."""

    def __init__(self, geo: Geometry) -> None:
        self.geo = geo
        self.pieces: dict[int, Extent] = {}
        self.initialized = 0
        self._starts: list[int] = []

    def add(self, attr: Attribute) -> None:
        first, _, data_size, initialized = segment(attr)
        if first == 0:
            self.initialized = min(initialized, data_size, MAX_RECORDS * self.geo.record)
        for position, extent in stream_extents(attr, self.geo, MAX_RECORDS * self.geo.record):
            if len(self.pieces) >= MAX_RUNS:
                break
            self.pieces.setdefault(position, extent)
        self._starts = sorted(self.pieces)

    def ordered(self) -> list[tuple[int, Extent]]:
        """The pieces in stream order, overlaps cut (damage must not scan a record
        twice), up to the initialized size."""
        found = []
        reached = 0
        for position in self._starts:
            offset, length = self.pieces[position]
            if position < reached:
                offset, length, position = (
                    offset + reached - position,
                    length - (reached - position),
                    reached,
                )
            length = min(length, self.initialized - position)
            if length > 0:
                found.append((position, (offset, length)))
                reached = position + length
        return found

    def record_at(self, number: int) -> int | None:
        """Where record `number` lies on disk, if one known piece holds all of it."""
        position = number * self.geo.record
        i = bisect.bisect_right(self._starts, position) - 1
        if i < 0:
            return None
        start = self._starts[i]
        offset, length = self.pieces[start]
        if position + self.geo.record <= start + length:
            return offset + position - start
        return None


def merged(extents: list[Extent]) -> Wave:
    """Sorted, overlaps and neighbours joined."""
    wave: Wave = []
    for offset, length in sorted(extents):
        if wave and offset <= wave[-1][0] + wave[-1][1]:
            last = wave[-1]
            wave[-1] = (last[0], max(last[1], offset + length - last[0]))
        else:
            wave.append((offset, length))
    return wave


async def read_extents(read: Read, extents: list[Extent], cap: int) -> bytes:
    """The bytes of `extents` joined, at most `cap`."""
    parts, total = [], 0
    for offset, length in extents:
        length = min(length, cap - total)
        if length <= 0:
            break
        parts.append(await read(offset, length))
        total += length
    return b"".join(parts)


async def records(read: Read, mft: MftMap) -> AsyncGenerator[tuple[int, bytes], None]:
    """(record number, raw record) of every record of the MFT, chunk by chunk."""
    size = mft.geo.record
    carry, expected = b"", -1
    for position, (offset, length) in mft.ordered():
        if position != expected:
            carry = b""  # a gap in the stream: a straddling record is lost
        expected = position + length
        done = 0
        while done < length:
            n = min(READ_CHUNK, length - done)
            data = carry + await read(offset + done, n)
            base = position + done - len(carry)
            done += n
            whole = len(data) // size * size
            for at in range(0, whole, size):
                yield (base + at) // size, data[at : at + size]
            carry = data[whole:]


class NtfsWalker:
    """The NTFS walker (module docstring)."""

    name = "ntfs"
    reports_file_runs = True

    def probe(self, head: bytes) -> bool:
        try:
            geometry(head[:BOOT_SIZE], 1 << 62)
        except WalkStopped:
            return False
        return True

    async def walk(
        self, read: Read, size: int, file_run: FileRun | None = None
    ) -> AsyncIterator[Wave]:
        budget = Budget()
        yield budget.take([(0, BOOT_SIZE)])
        geo = geometry(await read(0, BOOT_SIZE), size)
        yield budget.take([(geo.mft_offset, geo.record)])
        base = fixed(await read(geo.mft_offset, geo.record), geo.record)
        if base is None:
            raise WalkStopped("MFT record 0 fails its check")
        mft = MftMap(geo)
        own = attributes(base)
        for attr in own:
            if attr.type == DATA and attr.nonresident and attr.name == "":
                mft.add(attr)
        if not mft.pieces:
            raise WalkStopped("MFT record 0 has no $DATA runs")
        listed = next((a for a in own if a.type == ATTRIBUTE_LIST), None)
        if listed is not None:  # $MFT's runs continue in extension records
            if listed.nonresident:
                pieces = [e for _, e in stream_extents(listed, geo, MAX_LIST_BYTES)]
                yield budget.take(merged(pieces))
                value = await read_extents(read, pieces, MAX_LIST_BYTES)
            else:
                value = resident_value(listed)
            wanted = {n for kind, name, n in list_entries(value) if kind == DATA and not name}
            wanted = set(sorted(wanted - {0})[:MAX_MFT_SEGMENTS])
            for _ in range(MAX_MFT_SEGMENTS):
                found = {n: at for n in wanted if (at := mft.record_at(n)) is not None}
                if not found:
                    break
                yield budget.take(merged([(at, geo.record) for at in found.values()]))
                for at in found.values():
                    extension = fixed(await read(at, geo.record), geo.record)
                    for attr in attributes(extension) if extension else []:
                        if attr.type == DATA and attr.nonresident and attr.name == "":
                            mft.add(attr)
                wanted -= found.keys()
        yield budget.take(merged([e for _, e in mft.ordered()]))
        wave: list[Extent] = []
        async with contextlib.aclosing(records(read, mft)) as stream:
            async for number, raw in stream:
                if raw[:4] != b"FILE" or not _u16(raw, 0x16) & IN_USE:
                    continue
                record = fixed(raw, geo.record)
                if record is None:
                    continue
                for attr in attributes(record):
                    if attr.nonresident and wanted_stream(number, attr):
                        wave.extend(e for _, e in stream_extents(attr, geo, MAX_STREAM))
                    elif file_run is not None and _user_file(number, record, attr):
                        tell_runs(attr, geo, file_run)
                if len(wave) > MAX_EXTENTS:
                    break
        yield budget.take(merged(wave))
        budget.check()


def _user_file(number: int, record: bytes, attr: Attribute) -> bool:
    """Whether `attr` is the first segment of a user file's unnamed, plain $DATA."""
    return (
        attr.type == DATA
        and attr.nonresident
        and attr.name == ""
        and number >= FIRST_USER_RECORD
        and not _u16(record, 0x16) & DIRECTORY
        and not _u16(record, attr.start + 0x0C) & (COMPRESSED | ENCRYPTED)
        and segment(attr)[0] == 0
    )


def tell_runs(attr: Attribute, geo: Geometry, file_run: FileRun) -> None:
    """Tell the allocated runs of FILE_RUN_MIN bytes or more of a file's $DATA, cut at
    its initialized size (past it a reader gets zeros, whatever the clusters hold)."""
    initialized = segment(attr)[3]
    for position, (offset, length) in stream_extents(attr, geo, initialized):
        length = min(length, initialized - position)
        if length >= FILE_RUN_MIN:
            file_run(offset, length)


def wanted_stream(number: int, attr: Attribute) -> bool:
    """Whether a non-resident attribute of record `number` is metadata a walk reads."""
    if attr.type in (INDEX_ALLOCATION, ATTRIBUTE_LIST):
        return True
    return attr.type == DATA and SYSTEM_STREAMS.get(number) == attr.name


class Budget:
    """MAX_EXTENTS over the whole walk: a wave past it is cut, and the walk then stops."""

    def __init__(self) -> None:
        self.left = MAX_EXTENTS
        self.cut = False

    def take(self, wave: Wave) -> Wave:
        self.check()
        if len(wave) > self.left:
            wave, self.cut = wave[: self.left], True
        self.left -= len(wave)
        return wave

    def check(self) -> None:
        if self.cut:
            raise WalkStopped(f"more than {MAX_EXTENTS} metadata extents")


WALKER = NtfsWalker()
