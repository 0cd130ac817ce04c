"""ebsfs: Amazon EBS snapshots as read-only raw disk images, over FUSE or as Python
file objects (`ebsfs.open`).

The public API is what this module names: `open`, `open_snapshots`, `diff_files`, the
errors (`ebsfs.errors`, re-exported here) and the block size. Everything under the
subpackages may change between releases.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ebsfs.constants import BLOCK_SIZE, BLOCKS_PER_GIB, GIB, __version__
from ebsfs.errors import *  # noqa: F403 (the errors are part of the public API)
from ebsfs.errors import __all__ as _errors

if TYPE_CHECKING:
    from ebsfs.fileobj import open as open  # noqa: A004
    from ebsfs.fileobj import open_snapshots as open_snapshots
    from ebsfs.forensics.filediff import diff_files as diff_files

__all__ = [
    "BLOCK_SIZE",
    "BLOCKS_PER_GIB",
    "GIB",
    "__version__",
    "diff_files",
    "open",
    "open_snapshots",
    *_errors,
]

_LAZY = {
    "open": "ebsfs.fileobj",
    "open_snapshots": "ebsfs.fileobj",
    "diff_files": "ebsfs.forensics.filediff",
}


def __getattr__(name: str) -> Any:
    """The file-object API on first use: `import ebsfs` stays light (no boto3, no trio)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ebsfs' has no attribute {name!r}")
