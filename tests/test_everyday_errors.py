"""Issue 28: an endpoint that is not EBS (a web server, a proxy) answering with an HTTP
error page is one line naming the status and asking about --endpoint-url, not the
page dumped raw; and it is not retried as if the service had a hiccup."""

from __future__ import annotations

import http.server
from pathlib import Path

import pytest

from ebsfs.errors import EbsfsError, TransientError
from ebsfs.service.failures import answer_error, foreign_answer, rest_json_error
from tests.localhttp import serving, url_of
from tests.mounting import ebsfs

SNAP = "snap-0e28"
PAGE = b"""<!DOCTYPE html>
<html>
<head>
<title>404 Not Found</title>
</head>
<body>
<h1>Not Found</h1>
<p>The requested URL was not found on this server.</p>
<hr>
<address>Apache/2.4.57 (Debian) Server at example.com Port 80</address>
</body>
</html>
"""


class WebServer(http.server.BaseHTTPRequestHandler):
    """A plain web server: every request is an HTML 404 page."""

    status = 404

    def _page(self) -> None:
        self.send_response(self.status)
        self.send_header("Content-Type", "text/html; charset=iso-8859-1")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    do_GET = do_POST = _page

    def log_message(self, *args: object) -> None:
        pass


ONE_LINE = "the endpoint answered HTTP 404 with an HTML page: is --endpoint-url right?"


@pytest.mark.parametrize("command", ["get", "diff"])
def test_an_html_404_is_one_line(command: str, tmp_path: Path) -> None:
    with serving(WebServer) as server:
        args = [SNAP, str(tmp_path / "out.img")] if command == "get" else [SNAP, "snap-0e29"]
        result = ebsfs(command, "--endpoint-url", url_of(server), *args)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and ONE_LINE in lines[0], result.stderr
    assert "<html>" not in lines[0]


def test_the_mapping_of_foreign_answers() -> None:
    page = PAGE.decode()
    err = foreign_answer(404, "text/html; charset=utf-8", page)
    assert isinstance(err, EbsfsError) and not isinstance(err, TransientError)
    assert str(err) == ONE_LINE
    # A proxy's 502 page may be gone on the next try: retried, and still one line.
    late = foreign_answer(502, "text/html", page)
    assert isinstance(late, TransientError)
    assert (
        str(late) == "the endpoint answered HTTP 502 with an HTML page, not the EBS service's error"
    )
    # Not HTML: a plain text body or none is named as such.
    assert "HTTP 403 with a text/plain answer" in str(foreign_answer(403, "text/plain", "no"))
    # The service's own answers are the service's: JSON with an error type.
    assert foreign_answer(404, "application/json", '{"message": "x"}') is None
    assert foreign_answer(400, "", '{"__type": "ValidationException"}') is None
    assert "ResourceNotFound" in str(
        rest_json_error(404, "ResourceNotFoundException", b'{"message": "no snapshot"}')
    )
    # The GET path's answer of a web server: the same one line.
    assert str(rest_json_error(404, None, PAGE)) == ONE_LINE
    assert str(answer_error(404, "404", "", page)) == ONE_LINE
