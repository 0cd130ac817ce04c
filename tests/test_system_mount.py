"""Mounting as a system does (issue 28): mount(8)'s helper, `mount -t fuse.ebsfs`, an
fstab line and a systemd unit's Options=, through ebsfs/cli/mounthelper.py.

The real mounts run in a private mount namespace in which /usr/local/sbin holds only an
`ebsfs` that runs this checkout: mount(8) clears PATH before it runs mount.fuse3, which
finds the type's program on /bin/sh's default PATH. Nothing outside the namespace sees
that directory or the mount; whatever happens, the script unmounts with fusermount3 and
the test kills the serving process if it outlived it."""

from __future__ import annotations

import configparser
import hashlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from ebsfs.cli.main import build_parser, main
from ebsfs.cli.mounthelper import is_helper_call, translate
from ebsfs.constants import BLOCK_SIZE
from ebsfs.emulator import EmulatorServer
from ebsfs.errors import UserInputError
from tests.fakes import pattern_block
from tests.mounting import replay_log, wait_gone

SNAP_A, SNAP_B = "snap-0c1", "snap-0c2"
EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"


# The options: mount(8)'s and mount.fuse3's arguments -> `ebsfs mount`'s


def test_options_map_to_those_of_ebsfs_mount() -> None:
    args = translate(
        [
            f"{SNAP_A},{SNAP_B}",
            "/mnt/snap",
            "-o",
            "ro,allow_other,endpoint_url=http://127.0.0.1:8080,region=eu-west-1,"
            "profile=forensics,cache_size=1G,cache_dir=/var/cache/ebsfs,uid=1000,gid=adm,"
            "file_mode=0440,dir_mode=0550,no_hedge,log-file=/var/log/ebsfs.log",
        ]
    )
    assert args == [
        "mount",
        "--allow-other",
        "--endpoint-url=http://127.0.0.1:8080",
        "--region=eu-west-1",
        "--profile=forensics",
        "--cache-size=1G",
        "--cache-dir=/var/cache/ebsfs",
        "--uid=1000",
        "--gid=adm",
        "--file-mode=0440",
        "--dir-mode=0550",
        "--no-hedge",
        "--log-file=/var/log/ebsfs.log",
        "--",
        SNAP_A,
        SNAP_B,
        "/mnt/snap",
    ]
    parsed = build_parser().parse_args(args)
    assert parsed.snapshot_ids == [SNAP_A, SNAP_B] and parsed.cache_size == 1024**3


def test_generic_options_of_mount_and_mount_fuse3_are_accepted() -> None:
    # What mount(8) passes for `defaults,user,noauto,nofail,_netdev,x-systemd.automount`
    # and what mount.fuse3 adds (dev, suid), and the rest of the VFS flags.
    generic = (
        "ro,defaults,auto,noauto,nofail,_netdev,user,users,nouser,dev,nodev,suid,nosuid,"
        "exec,noatime,relatime,x-systemd.automount,x-systemd.requires=network-online.target,X-mount.mkdir,"
        "comment=evidence"
    )
    assert translate([SNAP_A, "/mnt", "-o", generic]) == ["mount", "--", SNAP_A, "/mnt"]
    # mount(8)'s flags to a helper: -n (no mtab), -v, -s, and mount.fuse.ebsfs's -t
    assert translate([SNAP_A, "/mnt", "-n", "-v", "-t", "fuse.ebsfs", "-o", "ro"]) == [
        "mount",
        "--",
        SNAP_A,
        "/mnt",
    ]


def test_noexec_clears_the_execute_bits_of_files() -> None:
    args = translate([SNAP_A, "/mnt", "-o", "file_mode=0555,noexec"])
    assert args is not None and "--file-mode=0444" in args


def test_a_fake_mount_checks_the_options_only() -> None:
    assert translate([SNAP_A, "/nonexistent", "-f", "-o", "ro,cache_size=64M"]) is None


@pytest.mark.parametrize(
    "options, message",
    [
        ("rw", "read-only: give ro in the mount options"),
        ("ro,bogus", "unknown mount option 'bogus'"),
        ("foreground", "unknown mount option 'foreground'"),
        ("remount,ro", "cannot be remounted: unmount it and mount again"),
        ("region", "mount option region needs a value: region=..."),
        ("allow_other=yes", "mount option allow_other takes no value"),
    ],
)
def test_mistakes_are_named(options: str, message: str) -> None:
    with pytest.raises(UserInputError, match=re.escape(message)):
        translate([SNAP_A, "/mnt", "-o", options])


def test_sloppy_ignores_unknown_options() -> None:
    assert translate([SNAP_A, "/mnt", "-s", "-o", "bogus,ro"]) == ["mount", "--", SNAP_A, "/mnt"]


@pytest.mark.parametrize(
    "argv",
    [
        [SNAP_A],
        [SNAP_A, "/mnt", "extra"],
        [f"{SNAP_A},,{SNAP_B}", "/mnt"],
        [",", "/m"],
        [SNAP_A, "/mnt", "--cache-size", "1G"],
        [SNAP_A, "/mnt", "-o"],
        [SNAP_A, "/mnt", "-N", "1234"],
    ],
)
def test_bad_source_or_arguments(argv: list[str]) -> None:
    with pytest.raises(UserInputError):
        translate(argv)


def test_ebsfs_takes_mount_fuse3s_call_with_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    commands = {"mount", "get", "mounts"}
    assert is_helper_call([SNAP_A, "/mnt", "-o", "ro,dev,suid"], commands)
    assert is_helper_call([SNAP_A, "/mnt"], commands)
    assert not is_helper_call(["mount", SNAP_A, "/mnt"], commands)
    assert not is_helper_call(["mout", SNAP_A, "/mnt"], commands)  # argparse's error
    assert main([SNAP_A, str(tmp_path), "-o", "ro,bogus,dev,suid"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown mount option 'bogus'" in err
    assert main([SNAP_A, str(tmp_path), "-o", "rw,dev,suid"]) == 1
    assert "read-only" in capsys.readouterr().err
    # Translated, the call is `ebsfs mount`'s own, with its own one-line errors.
    assert main([SNAP_A, str(tmp_path / "missing"), "-o", "ro"]) == 1
    err = capsys.readouterr().err
    assert err == f"ebsfs: error: mount point {tmp_path / 'missing'} does not exist\n"


# A systemd mount unit (docs/examples)


def unit(path: Path) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return parser["Mount"]


def test_the_systemd_unit_example_parses_with_the_helper() -> None:
    path = EXAMPLES / "mnt-ebsfs.mount"
    mount = unit(path)
    assert mount["Type"] == "fuse.ebsfs"
    # systemd names a mount unit after its mount point: /mnt/ebsfs is mnt-ebsfs.mount
    assert path.name == mount["Where"].strip("/").replace("/", "-") + ".mount"
    args = translate([mount["What"], mount["Where"], "-o", mount["Options"]])
    assert args is not None
    parsed = build_parser().parse_args(args)
    assert parsed.snapshot_ids and all(s.startswith("snap-") for s in parsed.snapshot_ids)
    assert parsed.mountpoint == mount["Where"] and parsed.allow_other


def test_the_automount_example_names_the_same_mount_point() -> None:
    automount = configparser.ConfigParser(interpolation=None)
    automount.read_string((EXAMPLES / "mnt-ebsfs.automount").read_text())
    assert automount["Automount"]["Where"] == unit(EXAMPLES / "mnt-ebsfs.mount")["Where"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_accepts_the_unit_examples(tmp_path: Path) -> None:
    units = [EXAMPLES / "mnt-ebsfs.mount", EXAMPLES / "mnt-ebsfs.automount"]
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert (result.returncode, result.stderr) == (0, ""), result.stderr


def test_the_fstab_example_parses_with_the_helper() -> None:
    for line in (EXAMPLES / "fstab").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            source, target, fstype, options = line.split()[:4]
            assert fstype == "fuse.ebsfs"
            args = translate([source, target, "-o", options])
            assert args is not None
            build_parser().parse_args(args)


# Real mount(8)


@pytest.fixture
def snapshots(emulator: EmulatorServer) -> dict[str, bytes]:
    """Two small snapshots; the first 8 blocks of each, as the images must read."""
    wanted = {}
    for seed, snapshot_id in enumerate((SNAP_A, SNAP_B), start=1):
        blocks = {i: pattern_block(seed, i) for i in range(8)}
        emulator.store.add_snapshot(snapshot_id, blocks, volume_size_gib=1)
        wanted[snapshot_id] = b"".join(blocks[i] for i in range(8))
    return wanted


def in_namespace(
    tmp_path: Path, script: str, sbin_helper: bool = False, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run bash `script` (set -eu) in a private mount namespace with `ebsfs` (this
    checkout) on /bin/sh's default PATH, and with `sbin_helper` mount.fuse.ebsfs in
    /sbin too (a read-only overlay of /usr/sbin), where mount(8) looks for helpers; $MP
    is an empty directory, unmounted with fusermount3 when the script ends however it
    ends. The serving process is killed if it outlives the script; its log
    (log_file=$LOG) is checked like the test's."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python = shlex.quote(sys.executable)
    for name, command in (
        ("ebsfs", f"{python} -m ebsfs"),
        ("mount.fuse.ebsfs", f"{python} -c {shlex.quote(HELPER)}"),
    ):
        calls = shlex.quote(str(tmp_path / "calls"))
        (bin_dir / name).write_text(f'#!/bin/sh\necho "$0 $*" >> {calls}\nexec {command} "$@"\n')
        (bin_dir / name).chmod(0o755)
    mountpoint, log, pid_file = tmp_path / "mnt", tmp_path / "mount.log", tmp_path / "pid"
    mountpoint.mkdir()
    bind = f"mount --bind {shlex.quote(str(bin_dir))} /usr/local/sbin\n"
    if sbin_helper:
        bind += (
            f"mount -t overlay overlay -o lowerdir={shlex.quote(str(bin_dir))}:/usr/sbin "
            "/usr/sbin || { echo 'no overlay'; exit 0; }\n"
        )
    prologue = f"""set -eu
MP={shlex.quote(str(mountpoint))}; LOG={shlex.quote(str(log))}
trap 'getfattr --only-values -n user.ebsfs.pid "$MP" > {pid_file} 2>/dev/null || true
      fusermount3 -u -z "$MP" 2>/dev/null || true' EXIT
"""
    try:
        result = subprocess.run(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "bash",
                "-c",
                prologue + bind + script,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    finally:
        text = pid_file.read_text().strip() if pid_file.exists() else ""
        if text.isdigit() and not wait_gone(int(text), 10):
            os.kill(int(text), signal.SIGKILL)
        replay_log(log)
    if result.stdout == "no overlay\n":
        pytest.skip("no overlayfs here to put mount.fuse.ebsfs in /sbin")
    return result


HELPER = "import sys; from ebsfs.cli.mounthelper import main; sys.exit(main())"
"""What the mount.fuse.ebsfs entry point runs (pyproject.toml)."""


def test_the_helper_is_an_entry_point() -> None:
    with open(EXAMPLES.parent.parent / "pyproject.toml", "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts["mount.fuse.ebsfs"] == "ebsfs.cli.mounthelper:main"


def pid_of_mount(output: str) -> int:
    match = re.search(r"^pid (\d+)$", output, re.MULTILINE)
    assert match, output
    return int(match[1])


@pytest.mark.mount
def test_mount_t_fuse_ebsfs_mounts_and_umount_unmounts(
    emulator: EmulatorServer, snapshots: dict[str, bytes], tmp_path: Path
) -> None:
    expected = tmp_path / "expected"
    expected.write_bytes(snapshots[SNAP_B])
    script = f"""
mount -t fuse.ebsfs {SNAP_A},{SNAP_B} "$MP" \\
    -o ro,allow_other,nofail,_netdev,uid=1234,file_mode=0440,log_file="$LOG" \\
    -o endpoint_url={emulator.url}
findmnt -n -o FSTYPE,OPTIONS "$MP"
stat -c '%n %u %a %s' "$MP/{SNAP_A}.img" "$MP/{SNAP_B}.img"
cmp -n {8 * BLOCK_SIZE} "$MP/{SNAP_B}.img" {expected}
echo "pid $(getfattr --only-values -n user.ebsfs.pid "$MP")"
umount "$MP"
mountpoint -q "$MP" && echo still mounted || echo unmounted
"""
    result = in_namespace(tmp_path, script)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("fuse.ebsfs ro,")
    assert lines[1:3] == [
        f"{tmp_path}/mnt/{SNAP_A}.img 1234 440 {1024**3}",
        f"{tmp_path}/mnt/{SNAP_B}.img 1234 440 {1024**3}",
    ]
    assert lines[-1] == "unmounted"
    assert wait_gone(pid_of_mount(result.stdout))  # umount ended the serving process


@pytest.mark.mount
def test_an_fstab_line_mounts(
    emulator: EmulatorServer, snapshots: dict[str, bytes], tmp_path: Path
) -> None:
    fstab = tmp_path / "fstab"
    log = tmp_path / "mount.log"
    fstab.write_text(
        "# an alternative fstab (mount --fstab)\n"
        f"{SNAP_A} {tmp_path / 'mnt'} fuse.ebsfs "
        f"defaults,ro,noauto,nofail,_netdev,x-systemd.automount,endpoint_url={emulator.url},"
        f"cache_size=64M,log_file={log} 0 0\n"
    )
    script = f"""
mount --fstab {fstab} "$MP"
findmnt -n -o FSTYPE "$MP"
head -c {8 * BLOCK_SIZE} "$MP/{SNAP_A}.img" | sha256sum
echo "pid $(getfattr --only-values -n user.ebsfs.pid "$MP")"
umount "$MP"
"""
    result = in_namespace(tmp_path, script)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "fuse.ebsfs"
    assert lines[1].split()[0] == hashlib.sha256(snapshots[SNAP_A]).hexdigest()
    assert wait_gone(pid_of_mount(result.stdout))


@pytest.mark.mount
def test_a_bad_option_through_mount_is_one_line(emulator: EmulatorServer, tmp_path: Path) -> None:
    script = f"""
mount -t fuse.ebsfs {SNAP_A} "$MP" -o ro,cache_sise=1G,endpoint_url={emulator.url} \\
    || echo "status $?"
mountpoint -q "$MP" && echo mounted || echo not mounted
"""
    result = in_namespace(tmp_path, script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["status 1", "not mounted"]
    assert result.stderr.count("\n") == 1, result.stderr
    assert "unknown mount option 'cache_sise'" in result.stderr


@pytest.mark.mount
def test_mount_runs_mount_fuse_ebsfs_from_sbin(
    emulator: EmulatorServer, snapshots: dict[str, bytes], tmp_path: Path
) -> None:
    """With the helper linked into /sbin, mount(8) runs it directly, without
    mount.fuse3's filtering of the options."""
    script = f"""
mount -t fuse.ebsfs {SNAP_A} "$MP" -o ro,nofail,noauto,user,endpoint_url={emulator.url} \\
    -o log_file="$LOG"
stat -c '%s %a' "$MP/{SNAP_A}.img"
echo "pid $(getfattr --only-values -n user.ebsfs.pid "$MP")"
umount "$MP"
"""
    result = in_namespace(tmp_path, script, sbin_helper=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"{1024**3} 444"
    assert wait_gone(pid_of_mount(result.stdout))
    # mount(8) ran the helper in /sbin, which mount(8) passes nofail and user to
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 1 and calls[0].startswith("/sbin/mount.fuse.ebsfs"), calls
    assert "nofail" in calls[0]
