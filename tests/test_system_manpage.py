"""The man page (issue 28): scripts/make_manpage.py writes it from the parser, with a
section for every command, and groff renders it without a warning."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ebsfs.cli.main import build_parser, command_names

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "make_manpage.py"


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> str:
    output = tmp_path_factory.mktemp("man") / "ebsfs.1"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(output)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SOURCE_DATE_EPOCH": "1780000000"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == f"make_manpage: wrote {output}\n"
    return output.read_text()


def test_it_names_every_command(page: str) -> None:
    assert page.startswith('.TH EBSFS "1" "2026\\-05\\-28" "ebsfs ')
    names = command_names(build_parser())
    assert {"mount", "umount", "mounts", "completion", "get", "verify", "diff"} <= names
    for name in names:
        assert f".SH COMMAND \\fI\\,'ebsfs {name}'\\/\\fR" in page, name
    # and their options, as --help says them
    assert "\\fB\\-\\-allow\\-other\\fR" in page and "\\fB\\-\\-json\\fR" in page


def test_it_says_what_the_parser_cannot(page: str) -> None:
    for heading in ("MOUNTING FROM FSTAB AND SYSTEMD", "FILES", "ENVIRONMENT", "SEE ALSO"):
        assert f"\n.SH {heading}\n" in page
    assert "mount \\-t fuse.ebsfs snap\\-0123456789abcdef0" in page


@pytest.mark.skipif(shutil.which("groff") is None, reason="no groff")
def test_groff_renders_it_without_warnings(page: str, tmp_path: Path) -> None:
    (tmp_path / "ebsfs.1").write_text(page)
    result = subprocess.run(
        ["groff", "-man", "-Tutf8", "-P-cbou", "-ww", str(tmp_path / "ebsfs.1")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "MOUNTING FROM FSTAB AND SYSTEMD" in result.stdout


def test_stdout_and_usage() -> None:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "-"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and out.stdout.startswith(".TH EBSFS")
    bad = subprocess.run(
        [sys.executable, str(SCRIPT), "a", "b"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "make_manpage.py [OUTPUT]" in bad.stderr
