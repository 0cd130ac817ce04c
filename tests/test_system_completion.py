"""Shell completion (issue 28): `ebsfs completion SHELL` prints a script, and bash,
given it, completes ebsfs's commands and options by asking `ebsfs` (argcomplete)."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from ebsfs.cli.main import build_parser, command_names, main


def completions(tmp_path: Path, line: str) -> list[str]:
    """What bash offers at the end of `line`, through the printed script, with an
    `ebsfs` (this checkout) on PATH as an installed one would be."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    wrapper = bin_dir / "ebsfs"
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m ebsfs "$@"\n')
    wrapper.chmod(0o755)
    script = f"""
PATH={shlex.quote(str(bin_dir))}:$PATH
eval "$(ebsfs completion bash)"
COMP_LINE={shlex.quote(line)}; COMP_POINT=${{#COMP_LINE}}; COMP_TYPE=9
read -r -a COMP_WORDS <<< "$COMP_LINE"
[[ "$COMP_LINE" == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
_python_argcomplete ebsfs
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    result = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    return sorted(w.strip() for w in result.stdout.splitlines() if w.strip())


def test_the_bash_script_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["completion", "bash"]) == 0
    script = capsys.readouterr().out
    assert "complete -o nospace -o default -o bashdefault -F _python_argcomplete ebsfs" in script


def test_the_zsh_and_fish_scripts_are_printed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["completion", "zsh"]) == 0
    assert capsys.readouterr().out.startswith("#compdef ebsfs")
    assert main(["completion", "fish"]) == 0
    assert "complete --command ebsfs" in capsys.readouterr().out


def test_bash_completes_every_command(tmp_path: Path) -> None:
    names = command_names(build_parser())
    assert {"mount", "mounts", "completion", "get", "umount"} <= names
    offered = completions(tmp_path, "ebsfs ")
    assert [w for w in offered if not w.startswith("-")] == sorted(names)
    assert "--version" in offered
    assert completions(tmp_path, "ebsfs mo") == ["mount", "mounts"]


def test_bash_completes_options_and_choices(tmp_path: Path) -> None:
    assert completions(tmp_path, "ebsfs mount --allow") == ["--allow-other"]
    offered = completions(tmp_path, "ebsfs completion ")
    assert [w for w in offered if not w.startswith("-")] == ["bash", "fish", "tcsh", "zsh"]


def test_an_unknown_shell_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["completion", "ksh"])
    assert exit.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_without_argcomplete(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "argcomplete", None)  # import fails
    assert main(["completion", "bash"]) == 1
    assert capsys.readouterr().err == (
        "ebsfs: error: shell completion needs argcomplete: pip install 'ebsfs[completion]'\n"
    )
    # A shell asking then gets no answer and no traceback.
    monkeypatch.setenv("_ARGCOMPLETE", "1")
    with pytest.raises(SystemExit) as exit:
        main([])
    assert exit.value.code == 1
    assert capsys.readouterr() == ("", "")
