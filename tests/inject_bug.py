"""`python -m tests.inject_bug ARGS...`: the `ebsfs` command with a bug planted in the
read path, for the real-mount tests of the FUSE face's net. While the file named by
EBSFS_TEST_BUG_FILE exists, every block lookup raises RuntimeError (no typed error:
what a bug in ebsfs or a library surprise looks like)."""

from __future__ import annotations

import os
import sys

from ebsfs.cli import main as cli
from ebsfs.engine.cache import Loan
from ebsfs.engine.image import SnapshotImage
from ebsfs.service.api import Block

_flag = os.environ["EBSFS_TEST_BUG_FILE"]
_block = SnapshotImage.block


async def _buggy_block(self: SnapshotImage, index: int, loan: Loan | None = None) -> Block:
    if os.path.exists(_flag):
        raise RuntimeError(f"planted bug reading block {index}")
    return await _block(self, index, loan)


SnapshotImage.block = _buggy_block  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(cli.main())
