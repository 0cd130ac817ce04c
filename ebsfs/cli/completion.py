"""`ebsfs completion SHELL`: the script that makes a shell complete ebsfs's commands,
options and file names.

argcomplete (Apache-2.0, the `completion` extra) writes it: the shell asks `ebsfs`
itself at each Tab (cli/main.py answers through `complete` before anything else runs),
so completion always matches the installed version and no generated list goes stale."""

from __future__ import annotations

import argparse
import os
import sys
from types import ModuleType
from typing import TYPE_CHECKING

from ebsfs.errors import UserInputError

if TYPE_CHECKING:
    from ebsfs.cli.options import Commands

SHELLS = ("bash", "zsh", "fish", "tcsh")

ASKING = "_ARGCOMPLETE"
"""Set in the environment when a shell's completion function runs `ebsfs` to ask."""


def add_parser(commands: Commands) -> None:
    completion = commands.add_parser(
        "completion",
        help="print a shell completion script (bash, zsh, fish, tcsh)",
        description="Print the script that makes SHELL complete ebsfs's commands, options "
        "and file names. Needs argcomplete (pip install 'ebsfs[completion]').",
        epilog="examples: ebsfs completion bash > "
        '~/.local/share/bash-completion/completions/ebsfs (or eval "$(ebsfs completion '
        'bash)" in ~/.bashrc); ebsfs completion zsh > ~/.zfunc/_ebsfs with fpath+=~/.zfunc '
        "before compinit in ~/.zshrc",
    )
    completion.set_defaults(run=cmd_completion)
    completion.add_argument("shell", choices=SHELLS, metavar="SHELL", help=", ".join(SHELLS))
    completion.add_argument("-v", "--verbose", action="count", default=0, help=argparse.SUPPRESS)
    completion.add_argument("--log-file", help=argparse.SUPPRESS)


def _argcomplete() -> ModuleType:
    try:
        import argcomplete
    except ImportError:
        raise UserInputError(
            "shell completion needs argcomplete: pip install 'ebsfs[completion]'"
        ) from None
    return argcomplete


def cmd_completion(args: argparse.Namespace) -> int:
    script: str = _argcomplete().shellcode(["ebsfs"], shell=args.shell)
    sys.stdout.write(script)
    return 0


def asked() -> bool:
    return ASKING in os.environ


def complete(parser: argparse.ArgumentParser) -> None:
    """Answer a shell's completion request and exit (argcomplete writes the answer to
    the descriptor the shell's function reads). Without argcomplete, exit quietly:
    the shell then offers file names."""
    try:
        import argcomplete
    except ImportError:
        raise SystemExit(1) from None
    argcomplete.autocomplete(parser)
