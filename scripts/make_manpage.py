#!/usr/bin/env python3
"""Write ebsfs's man page, docs/ebsfs.1, from its argument parser, so the page says what
`--help` says and never goes stale (argparse-manpage: pip install 'ebsfs[man]').

    scripts/make_manpage.py [OUTPUT]     (default: docs/ebsfs.1; - for stdout)
    man -l docs/ebsfs.1

Each command gets its section of synopsis, description and options; the sections below
say what no parser knows: mounting from fstab and systemd, files, the environment.
SOURCE_DATE_EPOCH, when set, dates the page (reproducible builds)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ebsfs.cli.main import build_parser  # noqa: E402
from ebsfs.constants import __version__  # noqa: E402

DEFAULT_OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "ebsfs.1")

SECTIONS = {
    "mounting from fstab and systemd": r"""
mount(8) runs \fBmount.fuse.ebsfs\fR from /sbin when it is linked there, or else
\fBmount.fuse3\fR, which runs \fBebsfs\fR\~\fISOURCE\fR\~\fIMOUNTPOINT\fR\~\fB\-o\fR\~\fIOPTIONS\fR
from /bin/sh's default PATH (mount clears PATH): link \fBebsfs\fR into /usr/local/bin.
\fISOURCE\fR is a snapshot id, or several joined by commas. The options are those of
\fBebsfs mount\fR as \fINAME\fR=\fIVALUE\fR or \fINAME\fR: \fBcache_size=2G\fR is
\fB\-\-cache\-size 2G\fR, \fBallow_other\fR is \fB\-\-allow\-other\fR. Give \fBro\fR:
without it mount passes \fBrw\fR, which is refused. noauto, nofail, _netdev, user and
x\-systemd.* are mount's and systemd's own; noexec clears the execute bits of files.
.PP
.nf
mount \-t fuse.ebsfs snap\-0123456789abcdef0 /mnt/snap \-o ro,allow_other,region=us\-east\-1
snap\-0123456789abcdef0,snap\-0fedcba9876543210 /mnt/ebsfs fuse.ebsfs ro,_netdev,nofail 0 0
.fi
.PP
A systemd mount unit has \fBType=fuse.ebsfs\fR and the same \fBWhat=\fR, \fBWhere=\fR
and \fBOptions=\fR; docs/examples/mnt\-ebsfs.mount in the source is one.
\fBumount\fR or \fBebsfs umount\fR unmounts; \fBebsfs mounts\fR lists what is mounted.""",
    "files": r"""
.TP
\fIMOUNTPOINT\fR/\fIsnapshot\-id\fR.img
the whole disk image of a snapshot; \fIsnapshot\-id\fR\-part\fIN\fR.img each
partition; \fIsnapshot\-id\fR.changes the byte ranges changed from the snapshot it
shares blocks with
.TP
~/.aws/config, ~/.aws/credentials
the AWS profiles and credentials (\fB\-\-profile\fR)""",
    "environment": r"""
.TP
AWS_PROFILE, AWS_REGION, AWS_DEFAULT_REGION
the profile and region (\fB\-\-profile\fR, \fB\-\-region\fR)
.TP
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN
credentials, as in the rest of the standard AWS chain
.TP
AWS_ENDPOINT_URL_EBS, AWS_ENDPOINT_URL_EC2, AWS_ENDPOINT_URL, AWS_CA_BUNDLE
another endpoint (the local emulator, ebsfs\-emulator) and its certificate
.TP
HTTPS_PROXY, HTTP_PROXY, NO_PROXY
proxies, honoured by every call""",
    "see also": r"""
\fBmount\fR(8), \fBfstab\fR(5), \fBsystemd.mount\fR(5), \fBmount.fuse3\fR(8),
\fBfusermount3\fR(1), \fBlosetup\fR(8)""",
}


def manpage() -> str:
    from argparse_manpage.manpage import Manpage

    parser = build_parser()
    page = Manpage(
        parser,
        _data={
            "project_name": "ebsfs",
            "version": __version__,
            "manual_title": "ebsfs manual",
            "description": "Amazon EBS snapshots as read-only raw disk images",
        },
    )
    for heading, content in SECTIONS.items():
        page.add_section(heading, "=", content.strip("\n"))
    return str(page)


def main(argv: list[str]) -> int:
    if len(argv) > 1 or argv[:1] in (["-h"], ["--help"]):
        print(__doc__, file=sys.stderr)
        return 2
    output = argv[0] if argv else DEFAULT_OUTPUT
    try:
        text = manpage()
    except ImportError:
        print("make_manpage: needs argparse-manpage: pip install 'ebsfs[man]'", file=sys.stderr)
        return 1
    if output == "-":
        sys.stdout.write(text)
        return 0
    with open(output, "w") as f:
        f.write(text)
    print(f"make_manpage: wrote {os.path.normpath(output)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
