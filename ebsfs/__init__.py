"""ebsfs: Amazon EBS snapshots as read-only raw disk images over FUSE."""

__version__ = "0.1.0"

BLOCK_SIZE = 524288
"""Bytes in one EBS snapshot block; block index = byte offset // BLOCK_SIZE."""

GIB = 1024**3
BLOCKS_PER_GIB = GIB // BLOCK_SIZE
