"""The options several commands share: their argument groups, the value checks, and the
one way from parsed options to ConnectionOptions and EngineConfig, so that an option
means the same in every command.

Light on purpose: `ebsfs --help` imports this; boto3 and the engine are imported only
when a command builds its settings."""

from __future__ import annotations

import argparse
import math
import re
from typing import TYPE_CHECKING, NoReturn, TypeAlias

from ebsfs.constants import (
    CONNECT_TIMEOUT,
    MAX_CONNECTIONS,
    MAX_FETCHES,
    READ_TIMEOUT,
    REQUEST_TIMEOUT,
)

if TYPE_CHECKING:
    from ebsfs.engine.config import EngineConfig
    from ebsfs.service.client import ConnectionOptions
    from ebsfs.service.retry import RetryPolicy

    Commands: TypeAlias = argparse._SubParsersAction["Parser"]
    """What the commands' modules add their subparsers to."""

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)

_ENGINE_OPTIONS = (
    "cache_size",
    "max_fetches",
    "hedge",
    "read_timeout",
    "cache_dir",
    "cache_dir_size",
    "prefetch_metadata",
    "prefetch_metadata_budget",
)
"""EngineConfig fields a command may have as options of the same name; a command
without one gets the engine's default."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line naming the problem, not a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse_size(text: str) -> int:
    """'512M', '2G', '1.5GiB', '65536' -> bytes (binary units)."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (examples: 512M, 2G)")
    number, unit = float(match[1]), match[2].lower()
    return int(number * 1024 ** "_kmgt".index(unit or "_"))


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < math.inf:  # nan and inf too: a timeout of nan waits forever
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def connection_arguments(parser: argparse.ArgumentParser, ebs: bool = True) -> None:
    """Where and as whom to connect, and the logging options; `ebs` for the commands
    that call the EBS direct APIs (all but `ls`)."""
    group = parser.add_argument_group("AWS connection (default: the standard AWS chain)")
    group.add_argument(
        "--region",
        help="AWS region of the snapshots (default: AWS_REGION, "
        "AWS_DEFAULT_REGION or the profile's region)",
    )
    group.add_argument(
        "--profile",
        help="named profile from ~/.aws/config (default: AWS_PROFILE or the default chain)",
    )
    if ebs:
        group.add_argument(
            "--endpoint-url",
            help="EBS endpoint to use instead of AWS's, e.g. "
            "the local emulator (default: AWS_ENDPOINT_URL_EBS or "
            "AWS_ENDPOINT_URL)",
        )
        group.add_argument(
            "--no-direct-get",
            dest="direct_get",
            action="store_false",
            help="send GetSnapshotBlock through boto3 instead of ebsfs's own "
            "HTTP/1.1 client (slower; for proxies or endpoints the "
            "direct path cannot talk to); *_PROXY and NO_PROXY are "
            "honoured either way",
        )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more logging: -v for progress, -vv for every call",
    )
    parser.add_argument(
        "--log-file",
        help="append log messages to this file (default: stderr in the foreground; "
        "in the background syslog, or with no syslog daemon /var/log/ebsfs/MOUNTPOINT.log "
        "as root, else $XDG_STATE_HOME/ebsfs/, or $LOGS_DIRECTORY when set)",
    )


def engine_arguments(parser: argparse.ArgumentParser, cache_help: str, timeout_help: str) -> None:
    """How much to hold and how to fetch: the options every command that reads blocks
    shares (mount, get), with the same names and defaults as EngineConfig."""
    group = parser.add_argument_group("cache and fetching")
    group.add_argument(
        "--cache-size", type=parse_size, default="512M", metavar="SIZE", help=cache_help
    )
    group.add_argument(
        "--max-fetches",
        type=positive_int,
        default=MAX_FETCHES,
        metavar="N",
        help="GetSnapshotBlock calls in flight at once, at the most (default: "
        f"{MAX_FETCHES}; read-ahead keeps as many in flight as the "
        "measured latency needs, no more than half the cache holds, "
        "fewer while the service throttles)",
    )
    group.add_argument(
        "--read-timeout",
        type=positive_float,
        default=READ_TIMEOUT,
        metavar="SECONDS",
        help=timeout_help,
    )
    group.add_argument(
        "--request-timeout",
        type=positive_float,
        default=REQUEST_TIMEOUT,
        metavar="SECONDS",
        help="longest wait for the service to answer one call (connect or "
        f"body) before it is retried (default: {REQUEST_TIMEOUT:g})",
    )
    group.add_argument(
        "--no-hedge",
        dest="hedge",
        action="store_false",
        help="never ask for a block twice. By default a GetSnapshotBlock call "
        "outstanding twice as long as the slowest 5%% of recent answers is asked "
        "again on another connection and the first answer is used, at most 1.5%% "
        "more calls (a dropped connection or a server's slow tail then costs a "
        "round trip, not seconds); `ebsfs stats` counts them",
    )


def ec2_argument(parser: argparse.ArgumentParser, why: str) -> None:
    parser.add_argument(
        "--ec2-endpoint-url",
        metavar="URL",
        help=f"EC2 endpoint for DescribeSnapshots ({why}; default: "
        "AWS_ENDPOINT_URL_EC2, AWS_ENDPOINT_URL or AWS's; with a custom "
        "EBS endpoint and none of these, EC2 is not asked)",
    )


def cache_dir_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """--cache-dir and --cache-dir-size, for every command that reads blocks; the group,
    for a command's own disk-cache options."""
    group = parser.add_argument_group("disk cache (off unless --cache-dir is given)")
    group.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="keep fetched blocks in DIR (created 0700) and read them from "
        "there later, in this and later sessions, each checked against "
        "its SHA-256 first; snapshot data is then on local disk. DIR may "
        "be shared by several mounts at once",
    )
    group.add_argument(
        "--cache-dir-size",
        type=parse_size,
        default="16G",
        metavar="SIZE",
        help="space DIR may take at the most, e.g. 4G, 500G (default: 16G; "
        "less when free space is short: the cache leaves 1G or a tenth "
        "of its filesystem free); least recently used blocks go first",
    )
    return group


def prefetch_arguments(parser: argparse.ArgumentParser) -> None:
    """--no-prefetch-metadata and --prefetch-metadata-budget (mount, diff)."""
    group = parser.add_argument_group("metadata prefetch (on unless --no-prefetch-metadata)")
    group.add_argument(
        "--no-prefetch-metadata",
        dest="prefetch_metadata",
        action="store_false",
        help="do not fetch filesystem metadata ahead. By default the metadata of "
        "each ext4, XFS or NTFS filesystem (a partition, or a disk with no partition "
        "table: inode tables, directories, extent trees, MFT, index blocks; never "
        "file contents) is fetched in the background, in parallel, one round trip "
        "per level of the tree, so a walk such as fls -r or find waits far fewer "
        "service calls: a mount starts it as it starts serving, other commands once "
        "a tool reads the filesystem's start. It uses at most half of --max-fetches, "
        "so the tool's own reads never wait behind it",
    )
    group.add_argument(
        "--prefetch-metadata-budget",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help="bytes the metadata prefetch may fetch, all filesystems together, "
        "e.g. 64M, 2G (default: half of --cache-size, or a quarter of "
        "--cache-dir-size with --cache-dir); once spent it stops, with a log line",
    )


def connection_options(
    args: argparse.Namespace,
    retry: RetryPolicy | None = None,
    max_connections: int = MAX_CONNECTIONS,
) -> ConnectionOptions:
    """The connection settings from the options (those a command lacks: defaults)."""
    from ebsfs.service.client import ConnectionOptions
    from ebsfs.service.retry import RetryPolicy

    timeout = getattr(args, "request_timeout", REQUEST_TIMEOUT)
    return ConnectionOptions(
        region=args.region,
        profile=args.profile,
        endpoint_url=getattr(args, "endpoint_url", None),
        max_connections=max_connections,
        retry=retry or RetryPolicy(),
        connect_timeout=min(CONNECT_TIMEOUT, timeout),
        read_timeout=timeout,
        direct_get=getattr(args, "direct_get", True),
    )


def engine_config(args: argparse.Namespace, retry: RetryPolicy | None = None) -> EngineConfig:
    """The engine's settings from the options every reading command shares."""
    from ebsfs.engine.config import EngineConfig

    given = {name: getattr(args, name) for name in _ENGINE_OPTIONS if hasattr(args, name)}
    return EngineConfig(connection=connection_options(args, retry), **given)
