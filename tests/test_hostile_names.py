"""Others' text printed safely (issue 26): file names of a snapshot in `diff --files`
(text, JSON, -z), snapshot descriptions in `ebsfs ls`, a server's words in an error.
Names are written by the attacker: an ESC sequence must not drive the terminal, a
newline must not forge a line, bytes that are not UTF-8 must not stop the listing.

Unit tier: the listing's writers over hand-made changes. Emulator tier: ext4 images
made at test time by mkfs.ext4 -d (no root) holding such names, and small misbehaving
EBS and EC2 endpoints."""

from __future__ import annotations

import base64
import http.server
import io
import json
import os
import shutil
import subprocess
import unicodedata
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

from ebsfs.cli import main as cli
from ebsfs.emulator import EmulatorServer
from ebsfs.engine.diff import Diff
from ebsfs.forensics.filediff import FileChange, FileDiff, FilesystemChanges, Unread
from ebsfs.quoting import printable, quote
from tests.localhttp import serving, url_of
from tests.mounting import ebsfs

FIRST, SECOND = "snap-0a1a", "snap-0a2b"
ESC = "/x\x1b]0;pwned\x07\x1b[2J"
FORGED = "/real.txt\nD\tinjected-fake-line"
NOT_UTF8 = "/bad-\udcff\udcfe"  # the bytes 0xff 0xfe, as ebsfs carries them (surrogateescape)
BIDI = "/invoice-\u202etxt.exe"
CAFE = "/café"


def unsafe(text: str) -> list[str]:
    """Characters a terminal acts on or that hide what text says (tab and newline
    excepted: the listing's own separators)."""
    return [
        ch
        for ch in text
        if ch not in "\t\n" and unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp")
    ]


# -- unit tier: quoting and the writers --------------------------------------------------


@pytest.mark.parametrize(
    "name,shown",
    [
        ("/etc/passwd", "/etc/passwd"),
        ("/a b/c", "/a b/c"),
        (CAFE, CAFE),
        (ESC, '"/x\\033]0;pwned\\a\\033[2J"'),
        (FORGED, '"/real.txt\\nD\\tinjected-fake-line"'),
        (NOT_UTF8, '"/bad-\\377\\376"'),
        (BIDI, '"/invoice-\\342\\200\\256txt.exe"'),
        ("/back\\slash", '"/back\\\\slash"'),
        ('/say "hi"', '"/say \\"hi\\""'),
        ("/csi-\x9b2J", '"/csi-\\302\\2332J"'),
        (b"/raw-\xc3\x28", '"/raw-\\303("'),
    ],
)
def test_names_are_quoted_as_git_quotes_paths(name: str | bytes, shown: str) -> None:
    assert quote(name) == shown
    assert not unsafe(quote(name))
    assert quote("/café", ascii_only=True) == '"/caf\\303\\251"'


def test_a_message_is_made_printable_without_quotes() -> None:
    assert printable('denied: "x" \x1b[2J\r\n') == 'denied: "x" \\033[2J\\r\\n'


def listing(*changes: FileChange) -> FileDiff:
    fs = FilesystemChanges(None, 0, 1 << 30, "ext4", list(changes), entries=(3, 4))
    return FileDiff(FIRST, SECOND, Diff(FIRST, SECOND, 1 << 30, 512 * 1024), [fs])


HOSTILE = listing(
    FileChange("added", FORGED, "file"),
    FileChange("added", ESC, "file"),
    FileChange("deleted", NOT_UTF8, "file"),
    FileChange("modified", BIDI, "file", ["renamed", "ctime"], old_path=CAFE),
)


def test_text_listing_escapes_every_name_and_never_fails_to_encode() -> None:
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", newline="")
    HOSTILE.write_text(out)  # before: UnicodeEncodeError on the bytes that are not UTF-8
    out.flush()
    text = out.buffer.getvalue().decode("utf-8")
    lines = text.splitlines()
    assert not unsafe(text)
    assert lines[1:5] == [
        'A\t"/real.txt\\nD\\tinjected-fake-line"',
        'A\t"/x\\033]0;pwned\\a\\033[2J"',
        'D\t"/bad-\\377\\376"',
        'R\t/café\t"/invoice-\\342\\200\\256txt.exe"\tctime',
    ]
    assert lines[5].startswith(f"{FIRST} -> {SECOND}: 4 changed")
    assert len(lines) == 6  # no forged line


def test_json_carries_a_display_form_and_the_raw_bytes() -> None:
    out = io.StringIO()
    HOSTILE.write_json(out)
    assert not unsafe(out.getvalue())
    files = json.loads(out.getvalue())["files"]
    raw = [base64.b64decode(f["path_b64"]) for f in files]
    assert raw == [
        FORGED.encode(),
        ESC.encode(),
        b"/bad-\xff\xfe",
        BIDI.encode(),
    ]
    assert [f["path"] for f in files] == [quote(FORGED), quote(ESC), quote(NOT_UTF8), quote(BIDI)]
    assert base64.b64decode(files[3]["old_path_b64"]) == CAFE.encode()
    assert files[3]["old_path"] == CAFE
    assert files[0]["old_path"] is None and files[0]["old_path_b64"] is None


def test_z_writes_raw_names_between_nuls() -> None:
    out = io.BytesIO()
    HOSTILE.write_z(out)
    assert out.getvalue().split(b"\0") == [
        b"A",
        b"",
        FORGED.encode(),
        b"",
        b"A",
        b"",
        ESC.encode(),
        b"",
        b"D",
        b"",
        b"/bad-\xff\xfe",
        b"",
        b"R",
        b"",
        CAFE.encode(),
        BIDI.encode(),
        b"ctime",
        b"",  # after the last NUL
    ]


def test_z_quotes_the_names_for_a_terminal() -> None:
    out = io.BytesIO()
    HOSTILE.write_z(out, raw=False)
    names = out.getvalue().split(b"\0")[2:15:4]
    assert names == [quote(n, ascii_only=True).encode() for n in (FORGED, ESC, NOT_UTF8, CAFE)]


@pytest.mark.parametrize(
    "args,words",
    [
        (["diff", "-z", FIRST, SECOND], "-z needs --files"),
        (["diff", "--files", "-z", "--json", FIRST, SECOND], "-z and --json"),
    ],
)
def test_z_is_only_for_the_files_listing(
    args: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("ebsfs: error: ") and words in err and err.count("\n") == 1


# -- emulator tier: names in a real filesystem ------------------------------------------

NAMES = [
    b"\x1b]0;pwned\x07\x1b[2J",
    b"real.txt\nD\tinjected-fake-line",
    b"bad-\xff\xfe",
    b"caf\xc3\xa9",
    b"back\\slash",
]


def ext4_image(path: Path, files: dict[bytes, bytes]) -> None:
    """A 16 MiB ext4 holding `files` (raw names, in the root), by mkfs.ext4 -d."""
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("needs mkfs.ext4 (e2fsprogs)")
    root = path.with_suffix(".d")
    root.mkdir()
    for name, data in files.items():
        with open(os.path.join(os.fsencode(root), name), "wb") as f:
            f.write(data)
    with open(path, "wb") as f:
        f.truncate(16 * 1024 * 1024)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-b", "4096", "-d", str(root), str(path)],
        check=True,
        capture_output=True,
        timeout=60,
    )


@pytest.fixture
def hostile_pair(emulator: EmulatorServer, tmp_path: Path) -> EmulatorServer:
    """Two snapshots of one ext4: the second adds a file under each hostile name (the
    first holds none, so that no inode of the first is taken for one of them)."""
    ext4_image(tmp_path / "before.img", {})
    ext4_image(tmp_path / "after.img", {n: b"payload\n" for n in NAMES})
    emulator.store.add_image(FIRST, tmp_path / "before.img")
    emulator.store.add_image(SECOND, tmp_path / "after.img", parent=FIRST)
    return emulator


def test_diff_files_prints_hostile_names_quoted(hostile_pair: EmulatorServer) -> None:
    result = ebsfs("diff", "--files", "--endpoint-url", hostile_pair.url, FIRST, SECOND)
    assert result.returncode == 0, result.stderr  # before: UnicodeEncodeError, traceback
    assert "Traceback" not in result.stderr
    assert not unsafe(result.stdout)
    added = sorted(line for line in result.stdout.splitlines() if line.startswith("A\t"))
    assert added == sorted(
        f"A\t{quote(b'/' + name)}" for name in NAMES
    )  # one line each: none forged


def test_diff_files_z_and_json_give_the_exact_bytes(hostile_pair: EmulatorServer) -> None:
    url = hostile_pair.url
    raw = subprocess.run(
        [*ebsfs_command(), "diff", "--files", "-z", "--endpoint-url", url, FIRST, SECOND],
        capture_output=True,
        timeout=60,
    )
    assert raw.returncode == 0, raw.stderr
    fields = raw.stdout.split(b"\0")
    assert fields[-1] == b""  # every field ends with NUL
    records = [fields[k : k + 4] for k in range(0, len(fields) - 1, 4)]
    assert {r[0] for r in records} <= {b"A", b"M"}  # the root's times changed too
    added = [r for r in records if r[0] == b"A"]
    assert sorted(added) == sorted([b"A", b"", b"/" + name, b""] for name in NAMES)
    result = ebsfs("diff", "--files", "--json", "--endpoint-url", url, FIRST, SECOND)
    assert result.returncode == 0, result.stderr
    files = [f for f in json.loads(result.stdout)["files"] if f["change"] == "added"]
    assert sorted(base64.b64decode(f["path_b64"]) for f in files) == sorted(
        b"/" + name for name in NAMES
    )


def test_an_output_that_is_not_utf8_gets_ascii_escapes(hostile_pair: EmulatorServer) -> None:
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    url = hostile_pair.url
    result = ebsfs("diff", "--files", "--endpoint-url", url, FIRST, SECOND, env=env)
    assert result.returncode == 0, result.stderr  # before: UnicodeEncodeError
    assert result.stdout.isascii()
    assert 'A\t"/caf\\303\\251"\n' in result.stdout


def test_unreadable_parts_are_quoted_in_every_form() -> None:
    fs = FilesystemChanges(2, 0, 1 << 30, "ext4", [], entries=(3, 4))
    fs.unreadable = [Unread("second", "/etc/\x1b[2Jx", "directory", "bad \x1b[31m magic")]
    result = FileDiff(FIRST, SECOND, Diff(FIRST, SECOND, 1 << 30, 512 * 1024), [fs])
    text = io.StringIO()
    result.write_text(text)
    assert text.getvalue().splitlines()[1] == (
        'U\t"/etc/\\033[2Jx"\tdirectory unreadable in the second snapshot: bad \\033[31m magic'
    )
    assert "0 modified, 1 unreadable" in text.getvalue()
    listed = io.StringIO()
    result.write_json(listed)
    [item] = json.loads(listed.getvalue())["filesystems"][0]["unreadable"]
    assert base64.b64decode(item["path_b64"]) == b"/etc/\x1b[2Jx"
    assert (item["path"], item["reason"]) == ('"/etc/\\033[2Jx"', "bad \\033[31m magic")
    raw = io.BytesIO()
    result.write_z(raw)
    assert raw.getvalue().split(b"\0") == [
        b"U",
        b"2",
        b"/etc/\x1b[2Jx",
        b"directory unreadable in the second snapshot: bad \\033[31m magic",
        b"",
    ]


def ebsfs_command() -> list[str]:
    import sys

    return [sys.executable, "-m", "ebsfs"]


# -- others' text from servers ----------------------------------------------------------


def serve(
    answer: Callable[[http.server.BaseHTTPRequestHandler], None],
) -> Generator[str, None, None]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            answer(self)

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            answer(self)

        def log_message(self, *args: object) -> None:
            pass

    with serving(Handler) as server:
        yield url_of(server)


def reply(
    handler: http.server.BaseHTTPRequestHandler, status: int, body: bytes, **headers: str
) -> None:
    handler.send_response(status)
    for name, value in headers.items():
        handler.send_header(name.replace("_", "-"), value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


@pytest.fixture
def hostile_ebs() -> Iterator[str]:
    """An EBS endpoint whose every answer is a refusal with words of its choosing."""
    message = "no \u001b]0;pwned\u0007\u001b[2J such\nebsfs: error: forged \u202eline"

    def answer(handler: http.server.BaseHTTPRequestHandler) -> None:
        body = json.dumps({"Message": message}).encode()
        reply(handler, 400, body, x_amzn_ErrorType="ValidationException")

    yield from serve(answer)


def test_a_servers_error_message_is_one_printable_line(hostile_ebs: str) -> None:
    result = ebsfs("diff", "--endpoint-url", hostile_ebs, FIRST, SECOND)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr  # before: the server's newline forged a second
    assert lines[0].startswith("ebsfs: error: ")
    assert not unsafe(result.stderr), result.stderr
    assert "\\033]0;pwned\\a" in lines[0]


DESCRIBE = (
    '<?xml version="1.0" encoding="UTF-8"?>'
    '<DescribeSnapshotsResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">'
    "<requestId>1</requestId><snapshotSet><item>"
    "<snapshotId>snap-0c1&#x9b;2J</snapshotId><volumeId>vol-1</volumeId>"
    "<status>completed</status><startTime>2026-01-01T00:00:00.000Z</startTime>"
    "<progress>100%</progress><ownerId>123456789012</ownerId><volumeSize>8</volumeSize>"
    "<description>{description}</description><encrypted>false</encrypted>"
    "</item></snapshotSet></DescribeSnapshotsResponse>"
)


@pytest.fixture
def hostile_ec2() -> Iterator[str]:
    """An EC2 endpoint describing a snapshot with controls XML lets through: C1 CSI,
    a bidirectional override, a line separator."""
    description = "nightly &#x9b;2J&#x9b;31m \u202egnp.exe\u2028forged"

    def answer(handler: http.server.BaseHTTPRequestHandler) -> None:
        body = DESCRIBE.format(description=description).encode()
        reply(handler, 200, body, Content_Type="text/xml")

    yield from serve(answer)


def test_ls_prints_descriptions_and_ids_escaped(hostile_ec2: str) -> None:
    result = ebsfs("ls", "--ec2-endpoint-url", hostile_ec2)
    assert result.returncode == 0, result.stderr
    assert not unsafe(result.stdout), result.stdout  # before: C1 CSI and U+202E raw
    row = result.stdout.splitlines()[1]
    assert row.startswith('"snap-0c1\\302\\2332J"  vol-1')
    assert '"nightly \\302\\2332J\\302\\23331m \\342\\200\\256gnp.exe' in row
    listed = json.loads(ebsfs("ls", "--json", "--ec2-endpoint-url", hostile_ec2).stdout)
    assert listed[0]["Description"] == "nightly \x9b2J\x9b31m \u202egnp.exe\u2028forged"


UNNAMED = (
    "<storageTier>standard</storageTier>"
    + "<unknownSet>"
    + "<item><x>1</x></item>" * 1000
    + "</unknownSet>"
    + "<deep>" * 200
    + "bottom"
    + "</deep>" * 200
)
"""Elements EC2's cut model (ebsfs/service/models) does not name, one of them 200 deep."""


@pytest.mark.parametrize("fields", ["unnamed", "mistyped"])
def test_ec2_answers_the_cut_model_does_not_expect(fields: str) -> None:
    """DescribeSnapshots is parsed with EC2's model cut to it: what it does not name is
    skipped, and a named member of the wrong type is a one-line error, not a traceback
    nor a forged value."""
    body = DESCRIBE.format(description="d")
    if fields == "unnamed":
        body = body.replace("<encrypted>", UNNAMED + "<encrypted>")
    else:
        body = body.replace("<volumeSize>8</volumeSize>", "<volumeSize>lots</volumeSize>")

    def answer(handler: http.server.BaseHTTPRequestHandler) -> None:
        reply(handler, 200, body.encode(), Content_Type="text/xml")

    server = serve(answer)
    try:
        result = ebsfs("ls", "--json", "--ec2-endpoint-url", next(server))
    finally:
        server.close()
    if fields == "unnamed":
        assert result.returncode == 0, result.stderr
        [listed] = json.loads(result.stdout)
        assert (listed["VolumeId"], listed["VolumeSize"]) == ("vol-1", 8)
        assert "bottom" not in result.stdout and "storageTier" not in result.stdout
    else:
        assert result.returncode == 1
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("ebsfs: error: "), result.stderr
        assert "DescribeSnapshots" in lines[0] and "Traceback" not in result.stderr


def test_log_lines_escape_others_text_and_stay_one_line(tmp_path: Path) -> None:
    """A message quoting a snapshot's or a server's text cannot drive the terminal or
    forge a log line; a traceback keeps its lines, each escaped."""
    import logging

    from ebsfs.cli.logs import HANDLER_NAME, setup_logging

    log_file = tmp_path / "ebsfs.log"
    setup_logging(1, str(log_file), background=False)
    try:
        log = logging.getLogger("ebsfs.test_hostile")
        log.info("read %s failed", "a\x1b]0;owned\x07b\nINFO forged line")
        try:
            raise ValueError("bad name \x1b[2J")
        except ValueError:
            log.info("with a traceback", exc_info=True)
    finally:
        root = logging.getLogger()
        for handler in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
            root.removeHandler(handler)
            handler.close()
    text = log_file.read_text()
    assert "\x1b" not in text and "\x07" not in text
    lines = text.splitlines()
    assert lines[0].endswith("read a\\033]0;owned\\ab\\nINFO forged line failed")
    assert not any(line.startswith("INFO forged") for line in lines)
    assert lines[-1] == "ValueError: bad name \\033[2J"
    assert any(line.startswith("Traceback") for line in lines)
