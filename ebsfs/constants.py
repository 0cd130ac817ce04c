"""Sizes the service fixes and the defaults every face shares, in one place so that the
CLI, `ebsfs.open` and the engine cannot drift apart."""

from __future__ import annotations

BLOCK_SIZE = 524288
"""Bytes in one EBS snapshot block; block index = byte offset // BLOCK_SIZE."""

GIB = 1024**3
BLOCKS_PER_GIB = GIB // BLOCK_SIZE
