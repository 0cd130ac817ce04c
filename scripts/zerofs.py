#!/usr/bin/env python3
"""A trivial pyfuse3 filesystem: one read-only file of SIZE bytes that reads as zeros.
It measures the FUSE ceiling of this machine for bench_read.py (same stack as ebsfs:
pyfuse3 + trio, same mount options, same kernel cache settings).

    zerofs.py MOUNTPOINT SIZE_BYTES [--distinct]    (foreground; SIGTERM or Ctrl-C unmounts)

With --distinct, replies come from SIZE bytes of memory (as ebsfs's replies come from
its cache), not from one hot 1 MiB buffer.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys

import pyfuse3
import trio

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ebsfs.fuse.mount import raise_kernel_readahead  # noqa: E402

ZEROS = bytes(1024 * 1024)
FILE_INODE = pyfuse3.ROOT_INODE + 1


class ZeroFS(pyfuse3.Operations):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.distinct: bytearray | None = None

    async def getattr(self, inode: int, ctx=None) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode, attr.st_size = stat.S_IFDIR | 0o555, 0
        else:
            attr.st_mode, attr.st_size = stat.S_IFREG | 0o444, self.size
        attr.entry_timeout = attr.attr_timeout = 3600
        return attr

    async def lookup(self, parent_inode: int, name: bytes, ctx=None):
        if name != b"zero.img":
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.getattr(FILE_INODE)

    async def open(self, inode: int, flags: int, ctx):
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(  # type: ignore[override]  # pyfuse3 replies from any buffer
        self, fh: int, off: int, size: int
    ) -> bytes | memoryview:
        size = max(0, min(size, self.size - off))
        if self.distinct is not None:  # as ebsfs does: each offset its own memory
            at = off % (len(self.distinct) - size + 1)
            return memoryview(self.distinct)[at : at + size]
        return ZEROS[:size] if size <= len(ZEROS) else bytes(size)


def main() -> None:
    mountpoint, size = sys.argv[1], int(sys.argv[2])
    fs = ZeroFS(size)
    if len(sys.argv) > 3 and sys.argv[3] == "--distinct":
        fs.distinct = bytearray(b"\1" * size)  # replies from as much memory as ebsfs's cache
    pyfuse3.init(fs, mountpoint, set(pyfuse3.default_options) | {"ro", "fsname=zerofs"})

    async def run() -> None:
        async with trio.open_nursery() as nursery:

            async def tune() -> None:
                # The same kernel read-ahead ebsfs sets, so the ceiling is comparable.
                root = await trio.to_thread.run_sync(os.stat, mountpoint)
                raise_kernel_readahead(root.st_dev)

            nursery.start_soon(tune)

            async def stop() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        pyfuse3.terminate()
                        return

            nursery.start_soon(stop)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    try:
        trio.run(run)
    finally:
        pyfuse3.close(unmount=True)
        os._exit(0)


if __name__ == "__main__":
    main()
