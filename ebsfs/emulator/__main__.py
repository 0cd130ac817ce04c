"""`ebsfs-emulator`: serve raw image files as EBS snapshots on a local endpoint."""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
from typing import Any

from ebsfs.emulator.faults import Faults
from ebsfs.emulator.server import EmulatorServer, ServerProfile
from ebsfs.emulator.store import VOLUME_ID_RE, SnapshotStore

EPILOG = """\
examples:
  ebsfs-emulator --snapshot snap-0123456789abcdef0=disk.img
  ebsfs-emulator --snapshot snap-0a=before.img \\
                 --snapshot snap-0b=after.img,parent=snap-0a --latency 0.02 --jitter 0.01
  ebsfs-emulator --snapshot snap-0a=disk.img --latency 0.02 --backlog 5 \\
                 --slow-tail 0.01:10 --close-after 100 --idle-timeout 60 --seed 1

Point any boto3 client at the printed URL (--endpoint-url or AWS_ENDPOINT_URL). Any
credentials are accepted unless listed with --deny-access-key; with --credentials,
signatures are checked and only those credentials are accepted. It also answers EC2
DescribeSnapshots for its snapshots (owner 123456789012, described by the image's file
name), so with AWS_ENDPOINT_URL set `ebsfs ls` and `aws ec2 describe-snapshots` work.
"""


def _snapshot_spec(text: str) -> dict[str, Any]:
    """Parse ID=PATH[,parent=ID][,size=GiB][,volume=VOLUME_ID]."""
    head, *options = text.split(",")
    if "=" not in head:
        raise argparse.ArgumentTypeError(f"expected ID=PATH, got {text!r}")
    snapshot_id, path = head.split("=", 1)
    spec: dict[str, Any] = {"snapshot_id": snapshot_id, "path": path}
    for option in options:
        key, _, value = option.partition("=")
        if key == "parent" and value:
            spec["parent"] = value
        elif key == "size" and value.isdigit() and int(value) > 0:
            spec["volume_size_gib"] = int(value)
        elif key == "volume" and VOLUME_ID_RE.match(value) and len(value) <= 64:
            spec["volume_id"] = value
        elif key == "volume":
            raise argparse.ArgumentTypeError(
                f"volume {value!r} in {text!r} does not match ^vol-[0-9a-f]+$"
            )
        else:
            raise argparse.ArgumentTypeError(f"unknown snapshot option {option!r} in {text!r}")
    return spec


def _credentials(text: str) -> tuple[str, str]:
    key, sep, secret = text.partition(":")
    if not (key and sep and secret):
        raise argparse.ArgumentTypeError(f"expected KEY_ID:SECRET, got {text!r}")
    return key, secret


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a share between 0 and 1")
    return value


# The option types from here on are public: the bench scripts check the emulator
# options they pass on with them, so a bad value is a usage error there too.


def backlog(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 1-65535, got {value}")
    return value


def seconds(text: str) -> float:
    """A finite number >= 0 (also for the rates). float() takes "nan" and "inf": a
    latency of nan was silently none, one of inf failed every call in time.sleep,
    and a token lifetime of either put NaN or Infinity, not JSON, in list answers."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def slow_tail(text: str) -> tuple[float, float]:
    """FRACTION:FACTOR, e.g. 0.01:10 (1 % of calls ten times the latency)."""
    fraction, sep, factor = text.partition(":")
    try:
        share, times = float(fraction), float(factor)
    except ValueError:
        share = times = math.nan
    if not sep or not 0.0 <= share <= 1.0 or not 1.0 <= times < math.inf:
        raise argparse.ArgumentTypeError(
            f"expected FRACTION:FACTOR with 0 <= FRACTION <= 1 and a finite FACTOR >= 1 "
            f"(e.g. 0.01:10), got {text!r}"
        )
    return share, times


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ebsfs-emulator",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--snapshot",
        action="append",
        type=_snapshot_spec,
        default=[],
        metavar="ID=PATH[,parent=ID][,size=GiB][,volume=VOL]",
        help="serve the raw image PATH as completed snapshot ID; with parent=, "
        "as a later snapshot of the same volume (ListChangedBlocks works "
        "between them); size= sets VolumeSize (default: image size rounded "
        "up to GiB); volume= the volume id EC2 DescribeSnapshots gives (default: "
        "the parent's, else vol- and the id's digits: snap-0a -> vol-0a). "
        "Repeatable; parents first.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=0, help="port (default: a free one, printed)")
    p.add_argument("--url-file", help="also write the endpoint URL to this file once listening")
    p.add_argument(
        "--tls-cert",
        metavar="PEM",
        help="serve HTTPS, like the real service, with this certificate chain "
        "(clients trust it through AWS_CA_BUNDLE)",
    )
    p.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    w = p.add_argument_group("the wire (benchmark profiles: servers unlike this one)")
    w.add_argument(
        "--nagle",
        action="store_true",
        help="leave Nagle's algorithm on (a body then waits for the client's delayed ACK)",
    )
    w.add_argument(
        "--accept-delay",
        type=seconds,
        default=0.0,
        help="seconds the accept loop waits before each new connection",
    )
    w.add_argument("--backlog", type=backlog, default=256, help="listen queue length (default 256)")
    w.add_argument(
        "--close-after",
        type=count,
        default=0,
        metavar="N",
        help="close a keep-alive connection after its Nth answer, which says "
        "`Connection: close` (default 0: never)",
    )
    w.add_argument(
        "--close-silently",
        action="store_true",
        help="with --close-after: close with no header, as an idle-timeout close looks "
        "to a client that sends its next request just then",
    )
    w.add_argument(
        "--idle-timeout",
        type=seconds,
        default=0.0,
        metavar="S",
        help="close a connection silently once it has waited S seconds for its next "
        "request, as load balancers do (60 is typical; default 0: never)",
    )
    f = p.add_argument_group("faults and load (defaults behave like the real service)")
    f.add_argument("--latency", type=seconds, default=0.0, help="seconds added to every call")
    f.add_argument("--jitter", type=seconds, default=0.0, help="up to this many more seconds")
    f.add_argument(
        "--slow-tail",
        type=slow_tail,
        default=(0.0, 1.0),
        metavar="FRACTION:FACTOR",
        help="that share of calls (drawn with --seed) waits FACTOR times its latency "
        "and jitter, e.g. 0.01:10",
    )
    f.add_argument(
        "--error-rate",
        type=_share,
        default=0.0,
        help="share of calls answered InternalServerException",
    )
    f.add_argument(
        "--corrupt-rate",
        type=_share,
        default=0.0,
        help="share of block bodies corrupted under a true checksum header",
    )
    f.add_argument(
        "--truncate-rate", type=_share, default=0.0, help="share of block bodies cut short"
    )
    f.add_argument(
        "--short-pages",
        type=_share,
        default=0.0,
        help="share of list pages cut short or empty while NextToken is set",
    )
    f.add_argument(
        "--token-lifetime",
        type=seconds,
        default=7 * 24 * 3600.0,
        help="seconds a block token lives (default 7 days)",
    )
    f.add_argument(
        "--renew-tokens",
        action="store_true",
        help="renew a snapshot's block tokens on every new ListSnapshotBlocks listing, "
        "refusing earlier ones (INVALID_BLOCK_TOKEN), as AWS says may happen",
    )
    f.add_argument(
        "--get-rate",
        type=seconds,
        default=1000.0,
        help="GetSnapshotBlock calls/s per snapshot before throttling "
        "(default 1000, 0 = unlimited)",
    )
    f.add_argument(
        "--list-rate",
        type=seconds,
        default=50.0,
        help="list calls/s before throttling (default 50, 0 = unlimited)",
    )
    f.add_argument(
        "--deny-access-key",
        action="append",
        default=[],
        metavar="KEY_ID",
        help="answer AccessDeniedException to requests signed with this key id",
    )
    f.add_argument(
        "--credentials",
        action="append",
        type=_credentials,
        default=[],
        metavar="KEY_ID:SECRET",
        help="check every request's SigV4 signature and accept only these "
        "credentials (repeatable; default: any signature passes)",
    )
    f.add_argument("--seed", type=int, help="seed for the fault dice")
    p.add_argument("-v", "--verbose", action="store_true", help="log every request")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
    )
    faults = Faults(
        latency=args.latency,
        jitter=args.jitter,
        slow_share=args.slow_tail[0],
        slow_factor=args.slow_tail[1],
        error_rate=args.error_rate,
        corrupt_rate=args.corrupt_rate,
        truncate_rate=args.truncate_rate,
        short_pages=args.short_pages,
        token_lifetime=args.token_lifetime,
        renew_tokens=args.renew_tokens,
        get_rate=args.get_rate,
        list_rate=args.list_rate,
        deny_access_keys=args.deny_access_key,
        secret_keys=dict(args.credentials),
        seed=args.seed,
    )
    store = SnapshotStore(faults)
    if bool(args.tls_cert) != bool(args.tls_key):
        print("ebsfs-emulator: error: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    if args.close_silently and not args.close_after:
        print("ebsfs-emulator: error: --close-silently needs --close-after", file=sys.stderr)
        return 2
    try:
        server = EmulatorServer(
            store,
            host=args.host,
            port=args.port,
            tls=(args.tls_cert, args.tls_key) if args.tls_cert else None,
            profile=ServerProfile(
                nagle=args.nagle,
                accept_delay=args.accept_delay,
                backlog=args.backlog,
                close_after=args.close_after,
                close_silently=args.close_silently,
                idle_timeout=args.idle_timeout,
            ),
        )
    except (OSError, ValueError) as err:
        print(
            f"ebsfs-emulator: error: cannot load the TLS certificate {args.tls_cert} "
            f"with key {args.tls_key}: {getattr(err, 'strerror', None) or err}",
            file=sys.stderr,
        )
        return 1
    try:
        for spec in args.snapshot:
            snap = store.add_image(**spec)
            print(
                f"ebsfs-emulator: {snap.snapshot_id}: {snap.volume_size_gib} GiB, "
                f"{len(snap.indexes)} blocks written",
                flush=True,
            )
    except (OSError, ValueError) as err:
        print(f"ebsfs-emulator: error: {err}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        server.start()
    except OSError as err:
        print(
            f"ebsfs-emulator: error: cannot listen on {args.host}:{args.port}: {err}",
            file=sys.stderr,
        )
        return 1
    print(f"ebsfs-emulator: listening on {server.url}", flush=True)
    if args.url_file:
        with open(args.url_file, "w") as out:
            out.write(server.url + "\n")
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
