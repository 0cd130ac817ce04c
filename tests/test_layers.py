"""The architecture as tests: the layers of docs/design.md (import-linter contracts in
pyproject.toml) and modules small enough to read."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_MODULE_LINES = 500


def test_imports_follow_the_layers() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_module_is_over_500_lines() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in sorted((ROOT / "ebsfs").rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"split these modules (lines): {long}"


def test_the_public_api_is_at_the_top_and_import_ebsfs_stays_light() -> None:
    code = (
        "import sys, ebsfs\n"
        "heavy = [m for m in ('boto3', 'botocore', 'trio', 'pyfuse3') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "from ebsfs import diff_files, open, open_snapshots, EbsfsError, ReadFailed\n"
        "from ebsfs.fileobj import open as real_open\n"
        "assert open is real_open and issubclass(ReadFailed, EbsfsError)\n"
        "assert ebsfs.BLOCK_SIZE == 524288 and ebsfs.__version__\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
