"""The filesystem walkers the metadata prefetch knows, and which one a filesystem's
first bytes belong to."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence

from ebsfs.engine.fsmeta.walk import Walker

log = logging.getLogger(__name__)

MODULES = ("ext4", "xfs", "ntfs")
"""Modules of this package that end with a module-level `WALKER`."""


def _load() -> tuple[Walker, ...]:
    """Every walker whose module is there (a module not written yet is skipped)."""
    found = []
    for name in MODULES:
        try:
            module = importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"{__package__}.{name}":
                continue  # not written yet
            log.warning("metadata walker %s not loaded: %s", name, err, exc_info=True)
            continue
        except Exception as err:  # a broken walker costs its prefetch, never the tool
            log.warning("metadata walker %s not loaded: %s", name, err, exc_info=True)
            continue
        found.append(module.WALKER)
    return tuple(found)


WALKERS: tuple[Walker, ...] = _load()


def find(head: bytes, walkers: Sequence[Walker] = WALKERS) -> Walker | None:
    """The walker whose probe accepts `head` (a filesystem's first HEAD_SIZE bytes)."""
    for walker in walkers:
        if walker.probe(head):
            return walker
    return None
