"""The partitions of a raw disk image (GPT or MBR), read through an async read(offset, size).

Written here rather than taken from dissect.volume (AGPL, while ebsfs is MIT) or pytsk3's
volume system (a native library as a hard dependency, and synchronous reads). FUSE-free.
"""

from __future__ import annotations

import logging
import struct
import uuid
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ebsfs.errors import PartitionTableError

log = logging.getLogger(__name__)

Read = Callable[[int, int], Awaitable[bytes]]
"""async read(offset, size) -> bytes; may be short only at the end of the disk."""

MBR_SIGNATURE = b"\x55\xaa"
EXTENDED_TYPES = frozenset({0x05, 0x0F, 0x85})
GPT_PROTECTIVE = 0xEE
GPT_SIGNATURE = b"EFI PART"
MAX_EBRS = 128
MAX_ENTRY_ARRAY = 1 << 20  # bytes; the usual array is 128 entries of 128 bytes, 16 KiB
_MBR_ENTRY = struct.Struct("<B3xB3xII")  # status, type, first LBA, sector count
_GPT_HEADER = struct.Struct("<12xII4xQQQQ16xQIII")


@dataclass(frozen=True)
class Partition:
    """One partition holding data, numbered as Linux and `fdisk -l` number it."""

    number: int  # GPT: entry slot + 1, gaps kept; MBR: primaries 1-4 by slot, logicals 5, 6, ...
    offset: int  # bytes from the start of the disk
    size: int  # bytes
    scheme: str  # "gpt" or "mbr"
    type: str  # GPT: type GUID, lower-case canonical form; MBR: "0x83" style
    name: str = ""  # GPT partition name; "" for MBR


async def find_partitions(read: Read, disk_size: int, sector_size: int = 512) -> list[Partition]:
    """The partitions of the disk, in table order; [] when it has no partition table (a bare
    filesystem, zeros, a FAT/NTFS boot sector). Reads a few sectors: MBR, GPT, EBRs."""
    if disk_size < max(512, sector_size):
        return []
    head = await read(0, min(2 * sector_size, disk_size))
    mbr = head[:512]
    entries = _mbr_entries(mbr) if _is_mbr(mbr) else []
    used = [e for e in entries if e[1] != 0 and e[3] != 0]
    header = head[sector_size : 2 * sector_size]
    if any(e[1] == GPT_PROTECTIVE for e in used):
        parts = await _gpt(read, header, disk_size, sector_size)
    elif used:
        parts = await _mbr(read, entries, disk_size, sector_size)
    else:  # some tools write a GPT without a protective MBR
        try:
            _gpt_header(header, 1, disk_size, sector_size)
        except PartitionTableError:
            return []
        parts = await _gpt(read, header, disk_size, sector_size)
    _check(parts, disk_size, sector_size)
    return parts


async def _read_exact(read: Read, offset: int, size: int) -> bytes:
    """A read that must be complete: a short one means the table points past the disk."""
    data = await read(offset, size)
    if len(data) < size:
        raise PartitionTableError(f"short read at byte {offset}: {len(data)} of {size} bytes")
    return data


def _mbr_entries(sector: bytes) -> list[tuple[int, int, int, int]]:
    """(status, type, first LBA, sector count) of the four entries of an MBR or EBR."""
    return [_MBR_ENTRY.unpack_from(sector, 446 + 16 * i) for i in range(4)]


def _is_mbr(sector: bytes) -> bool:
    """Like libblkid: 55AA at 510, not a FAT/exFAT/NTFS boot sector (which also ends in
    55AA), and each entry's status is 0x00 or 0x80."""
    if len(sector) < 512 or sector[510:512] != MBR_SIGNATURE:
        return False
    if (
        sector[3:11] in (b"NTFS    ", b"EXFAT   ")
        or sector[0x36:0x3B] in (b"FAT12", b"FAT16")
        or sector[0x52:0x57] == b"FAT32"
    ):
        return False
    return all(status in (0x00, 0x80) for status, *_ in _mbr_entries(sector))


async def _mbr(
    read: Read, entries: list[tuple[int, int, int, int]], disk_size: int, ss: int
) -> list[Partition]:
    """Primaries by slot (1-4), then the logicals of the EBR chain from 5 on. The extended
    container itself is not listed: it holds EBRs, not data (fdisk -l shows it, we do not)."""
    parts: list[Partition] = []
    extended: list[tuple[int, int, int]] = []
    for i, (_, ptype, first, count) in enumerate(entries):
        if ptype == 0 or count == 0:
            continue
        if ptype in EXTENDED_TYPES:
            extended.append((i + 1, first, count))
        else:
            parts.append(Partition(i + 1, first * ss, count * ss, "mbr", f"0x{ptype:02x}"))
    number = 5
    for ext_number, ext_first, ext_count in extended:
        ext_end = (ext_first + ext_count) * ss
        if ext_end > disk_size:
            raise PartitionTableError(
                f"extended partition {ext_number} (bytes {ext_first * ss}-{ext_end}) "
                f"ends past the end of the disk ({disk_size} bytes)"
            )
        ebr, seen = ext_first, set[int]()
        while True:
            if ebr in seen:
                raise PartitionTableError(f"the EBR chain loops back to sector {ebr}")
            if len(seen) >= MAX_EBRS:
                raise PartitionTableError(f"the EBR chain is longer than {MAX_EBRS}")
            if not ext_first <= ebr < ext_first + ext_count:
                raise PartitionTableError(
                    f"an EBR at sector {ebr} lies outside extended partition {ext_number}"
                )
            seen.add(ebr)
            table = await _read_exact(read, ebr * ss, 512)
            if table[510:512] != MBR_SIGNATURE:
                raise PartitionTableError(f"the EBR at sector {ebr} has no 55AA signature")
            (_, ltype, lfirst, lcount), (_, ntype, nfirst, ncount) = _mbr_entries(table)[:2]
            if ltype != 0 and lcount != 0:
                part = Partition(number, (ebr + lfirst) * ss, lcount * ss, "mbr", f"0x{ltype:02x}")
                if part.offset + part.size > ext_end:
                    raise PartitionTableError(
                        f"logical partition {number} (bytes {part.offset}-"
                        f"{part.offset + part.size}) ends past its extended partition "
                        f"(bytes {ext_first * ss}-{ext_end})"
                    )
                parts.append(part)
                number += 1
            if ntype not in EXTENDED_TYPES or ncount == 0:
                break
            ebr = ext_first + nfirst  # relative to the start of the extended partition
    return parts


def _gpt_header(sector: bytes, lba: int, disk_size: int, ss: int) -> tuple[int, int, int, int]:
    """(entries LBA, entry count, entry size, entries CRC) of a valid GPT header at `lba`;
    PartitionTableError saying what is wrong otherwise."""
    if sector[:8] != GPT_SIGNATURE:
        raise PartitionTableError(f"no GPT header at LBA {lba}")
    if len(sector) < _GPT_HEADER.size:
        raise PartitionTableError(f"GPT header at LBA {lba} is cut short by the disk's end")
    hsize, hcrc, my_lba, _, _, _, elba, count, esize, ecrc = _GPT_HEADER.unpack_from(sector)
    if not 92 <= hsize <= len(sector):
        raise PartitionTableError(f"GPT header at LBA {lba} has a bad size {hsize}")
    if zlib.crc32(sector[:16] + bytes(4) + sector[20:hsize]) != hcrc:
        raise PartitionTableError(f"GPT header at LBA {lba} fails its CRC")
    if my_lba != lba:
        raise PartitionTableError(f"GPT header at LBA {lba} says it is at LBA {my_lba}")
    if esize < 128 or esize % 8 or not 0 < count * esize <= MAX_ENTRY_ARRAY:
        raise PartitionTableError(f"GPT header at LBA {lba}: bad entry array {count}x{esize}")
    if elba * ss + count * esize > disk_size:
        raise PartitionTableError(f"GPT entry array at LBA {elba} is past the end of the disk")
    return elba, count, esize, ecrc


async def _gpt_at(read: Read, lba: int, sector: bytes, disk_size: int, ss: int) -> list[Partition]:
    """The partitions of the GPT whose header is `sector`, read from `lba`."""
    elba, count, esize, ecrc = _gpt_header(sector, lba, disk_size, ss)
    array = await _read_exact(read, elba * ss, count * esize)
    if zlib.crc32(array) != ecrc:
        raise PartitionTableError(f"GPT entry array at LBA {elba} fails its CRC")
    parts = []
    for i in range(count):
        entry = array[i * esize : i * esize + 128]
        if entry[:16] == bytes(16):
            continue
        first, last = struct.unpack_from("<QQ", entry, 32)
        name = entry[56:128].decode("utf-16-le", errors="replace").split("\0", 1)[0]
        parts.append(
            Partition(
                i + 1,
                first * ss,
                (last - first + 1) * ss,
                "gpt",
                str(uuid.UUID(bytes_le=entry[:16])),
                name,
            )
        )
    return parts


async def _gpt(read: Read, header: bytes, disk_size: int, ss: int) -> list[Partition]:
    """The primary GPT, or the backup at the last LBA when the primary is damaged."""
    try:
        return await _gpt_at(read, 1, header, disk_size, ss)
    except PartitionTableError as primary:
        last = disk_size // ss - 1
        try:
            parts = await _gpt_at(read, last, await _read_exact(read, last * ss, ss), disk_size, ss)
        except PartitionTableError as backup:
            raise PartitionTableError(f"primary GPT: {primary}; backup GPT: {backup}") from None
        log.warning("primary GPT damaged (%s); using the backup GPT at LBA %d", primary, last)
        return parts


def _check(parts: list[Partition], disk_size: int, ss: int) -> None:
    """Every partition inside the disk, none ending before it starts, none overlapping."""
    for p in parts:
        end = p.offset + p.size
        if p.size <= 0:
            raise PartitionTableError(
                f"partition {p.number} ends before it starts "
                f"(first LBA {p.offset // ss}, last {end // ss - 1})"
            )
        if end > disk_size:
            raise PartitionTableError(
                f"partition {p.number} (bytes {p.offset}-{end}) ends "
                f"past the end of the disk ({disk_size} bytes)"
            )
    ordered = sorted(parts, key=lambda p: p.offset)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if b.offset < a.offset + a.size:
            raise PartitionTableError(
                f"partitions {a.number} (bytes {a.offset}-{a.offset + a.size}) and "
                f"{b.number} (bytes {b.offset}-{b.offset + b.size}) overlap"
            )
