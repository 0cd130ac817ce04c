"""ebsfs: Amazon EBS snapshots as read-only raw disk images, over FUSE or as Python
file objects (`ebsfs.open`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ebsfs.fileobj import open as open  # noqa: A004

__version__ = "0.1.0"

BLOCK_SIZE = 524288
"""Bytes in one EBS snapshot block; block index = byte offset // BLOCK_SIZE."""

GIB = 1024**3
BLOCKS_PER_GIB = GIB // BLOCK_SIZE


def __getattr__(name: str) -> Any:
    """`ebsfs.open` on first use: `import ebsfs` stays light (no boto3, no trio)."""
    if name == "open":
        from ebsfs.fileobj import open

        return open
    raise AttributeError(f"module 'ebsfs' has no attribute {name!r}")
