"""mount(8)'s way in: `mount -t fuse.ebsfs SOURCE DIR -o OPTIONS`, an /etc/fstab line
and a systemd mount unit become the arguments of `ebsfs mount`.

mount(8) runs `/sbin/mount.fuse.ebsfs SOURCE DIR [-sfnv] [-o OPTIONS]` when that exists
(this module's entry point, linked there), or else mount.fuse3, which runs `ebsfs SOURCE
DIR -o OPTIONS` through /bin/sh with no PATH of the caller's (sh's own: /usr/local/sbin,
/usr/local/bin, /usr/sbin, /usr/bin, /sbin, /bin); cli/main.py hands such a call here.
SOURCE is one snapshot id or several joined by commas. An option NAME=VALUE is `ebsfs
mount`'s --NAME VALUE (dashes or underscores alike) and a bare NAME its flag --NAME, so
every option of `ebsfs mount` means the same in both places; the generic options that
mount(8) and mount.fuse3 pass are accepted, `rw` is refused: the mount is read-only."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from ebsfs.errors import UserInputError

GENERIC = frozenset(
    {
        "ro",
        "defaults",
        "auto",
        "noauto",
        "nofail",
        "_netdev",
        "user",
        "users",
        "nouser",
        "owner",
        "group",
        "dev",
        "nodev",
        "suid",
        "nosuid",
        "exec",
        "atime",
        "noatime",
        "diratime",
        "nodiratime",
        "relatime",
        "norelatime",
        "strictatime",
        "lazytime",
        "sync",
        "async",
        "dirsync",
        "silent",
        "loud",
        "default_permissions",
    }
)
"""Options of mount(8), its fstab and mount.fuse3 that need nothing from ebsfs: those
mount(8) acts on itself (noauto, nofail, _netdev, user), the read-only mount's own
(ro, defaults), and VFS flags that hold anyway: ebsfs shows no device node and no
setuid file (nodev, nosuid), times never change, and the kernel always checks
permissions (default_permissions). mount.fuse3 adds dev and suid to every call."""

IGNORED_PREFIXES = ("x-", "X-", "comment=")
"""Options for other programs: x-systemd.*, x-gvfs-*, x-mount.* and fstab comments
(mount(8) drops most before a helper sees them; a hand-run helper gets them all)."""

NOT_OPTIONS = frozenset({"help", "foreground"})
"""`ebsfs mount` options that make no sense from mount(8): a foreground mount would
hold mount(8), and a systemd unit with it, until unmounted."""


def is_helper_call(argv: list[str], commands: set[str]) -> bool:
    """Whether `ebsfs ARGS` is mount.fuse3's call, `ebsfs SOURCE DIR -o OPTIONS`, or a
    person's `ebsfs snap-... DIR`, rather than an ebsfs command."""
    if len(argv) < 2 or argv[0].startswith("-") or argv[0] in commands:
        return False
    return "-o" in argv[2:] or argv[0].startswith(("snap-", "ebsfs#"))


def _mount_flags() -> dict[str, argparse.Action]:
    """`ebsfs mount`'s options by their -o name (--cache-size: cache_size), from its
    own parser, so the two never disagree."""
    from ebsfs.cli.main import build_parser

    parser = build_parser()
    (commands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    flags: dict[str, argparse.Action] = {}
    for action in commands.choices["mount"]._actions:
        for flag in action.option_strings:
            name = flag.removeprefix("--").replace("-", "_")
            if flag.startswith("--") and name not in NOT_OPTIONS:
                flags[name] = action
    return flags


def _split(argv: list[str]) -> tuple[list[str], list[str], bool, bool]:
    """mount(8)'s helper arguments: the two positionals, the -o options, and its flags
    -f (fake: check, do not mount) and -s (sloppy: ignore unknown options)."""
    positionals: list[str] = []
    options: list[str] = []
    fake = sloppy = False
    words = iter(argv)
    for word in words:
        if word in ("-o", "-t", "-N"):
            value = next(words, None)
            if value is None:
                raise UserInputError(f"mount option {word} needs a value")
            if word == "-o":
                options += [o for o in value.split(",") if o]
            elif word == "-N":
                raise UserInputError("mount -N (another mount namespace) is not supported")
        elif word.startswith("-o") and len(word) > 2:
            options += [o for o in word[2:].split(",") if o]
        elif word.startswith("-") and len(word) > 1 and set(word[1:]) <= set("sfnvrw"):
            fake = fake or "f" in word
            sloppy = sloppy or "s" in word
            if "w" in word:
                raise UserInputError(_READ_ONLY)
        elif word.startswith("-") and word != "-":
            raise UserInputError(
                f"unknown mount helper flag {word!r} (the helper takes -o NAME=VALUE,...; "
                "or use `ebsfs mount`)"
            )
        else:
            positionals.append(word)
    if len(positionals) != 2:
        raise UserInputError(
            "usage: mount -t fuse.ebsfs SNAPSHOT_ID[,SNAPSHOT_ID...] MOUNTPOINT [-o OPTIONS]"
        )
    return positionals, options, fake, sloppy


_READ_ONLY = (
    "ebsfs mounts are read-only: give ro in the mount options (mount(8) passes rw "
    "when an fstab line or -o says neither)"
)


def translate(argv: list[str]) -> list[str] | None:
    """mount(8)'s helper arguments -> `ebsfs mount` arguments; None for mount -f (checked,
    nothing to mount). A mistake raises UserInputError naming it."""
    (source, mountpoint), options, fake, sloppy = _split(argv)
    snapshots = source.removeprefix("ebsfs#").split(",")
    if not all(snapshots):
        raise UserInputError(
            f"mount source {source!r}: snapshot ids joined by commas, e.g. snap-0123,snap-4567"
        )
    flags = _mount_flags()
    args: list[str] = []
    noexec = False
    for option in options:
        name, has_value, value = option.partition("=")
        key = name.replace("-", "_")
        if key == "rw":
            raise UserInputError(_READ_ONLY)
        if key == "remount":
            raise UserInputError("an ebsfs mount cannot be remounted: unmount it and mount again")
        if key == "noexec":
            noexec = True
            continue
        if key in GENERIC or option.startswith(IGNORED_PREFIXES):
            continue
        action = flags.get(key)
        if action is None:
            if sloppy:
                continue
            raise UserInputError(
                f"unknown mount option {name!r} (ebsfs takes those of `ebsfs mount --help`, "
                "--cache-size 1G as cache_size=1G, --allow-other as allow_other)"
            )
        flag = action.option_strings[-1]
        takes_value = action.nargs != 0
        if takes_value and not has_value:
            raise UserInputError(f"mount option {name} needs a value: {name}=...")
        if not takes_value and has_value:
            raise UserInputError(f"mount option {name} takes no value")
        args.append(f"{flag}={value}" if takes_value else flag)
    if noexec:
        args = _without_execute(args)
    if fake:
        from ebsfs.cli.main import build_parser

        build_parser().parse_args(["mount", *args, "--", *snapshots, mountpoint])
        return None
    return ["mount", *args, "--", *snapshots, mountpoint]


def _without_execute(args: list[str]) -> list[str]:
    """noexec: no execute bit on any file (a file with none cannot be run, even by
    root); the FUSE layer takes no VFS flags, so the modes carry it."""
    from ebsfs.cli.mount import read_only_mode

    kept = []
    for arg in args:
        if arg.startswith("--file-mode="):
            try:
                mode = read_only_mode(arg.partition("=")[2]) & ~0o111
            except argparse.ArgumentTypeError:
                mode = None  # left for `ebsfs mount` to refuse in its words
            if mode is not None:
                arg = f"--file-mode={mode:04o}"
        kept.append(arg)
    return kept


def run(argv: list[str]) -> int:
    """Mount as mount(8) asked: one line and exit code 1 for a mistake."""
    from ebsfs.cli.main import main as ebsfs_main
    from ebsfs.cli.main import say

    try:
        translated = translate(argv)
    except UserInputError as err:
        say(f"ebsfs: error: {err}")
        return 1
    return 0 if translated is None else ebsfs_main(translated)


def main() -> NoReturn:
    """Entry point of mount.fuse.ebsfs: the process ends as `ebsfs mount`'s does."""
    from ebsfs.cli.main import finish

    finish(run(sys.argv[1:]))
