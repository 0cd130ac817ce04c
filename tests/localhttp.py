"""Small servers of a test's own (a misbehaving endpoint, a proxy): an HTTP server run
in a thread for a `with` block, and a raw socket server playing scripted connections
(the `serve` fixture of tests/conftest.py), both stopped whatever the test did."""

from __future__ import annotations

import contextlib
import http.server
import socket
import ssl
import threading
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def serving(
    handler: type[http.server.BaseHTTPRequestHandler],
) -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def url_of(server: http.server.ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


Script = Callable[[socket.socket], None]
"""What the server does with one connection."""


class Server:
    """Serves connections in turn, the n-th with scripts[n] (the last one for the rest),
    and notes each request line it read."""

    def __init__(self, scripts: list[Script]) -> None:
        self.scripts = scripts
        self.requests: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        count = 0
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            script = self.scripts[min(count, len(self.scripts) - 1)]
            count += 1
            threading.Thread(target=self._run, args=(conn, script), daemon=True).start()

    def _run(self, conn: socket.socket, script: Script) -> None:
        with conn, contextlib.suppress(OSError):
            script(conn)

    def read_request(self, conn: socket.socket) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            more = conn.recv(65536)
            if not more:
                raise ConnectionError("closed")
            data += more
        self.requests.append(data.split(b"\r\n", 1)[0])
        return data

    def close(self) -> None:
        self.stop.set()
        self.listener.close()


def tls_server_context(tls_files: tuple[str, str]) -> ssl.SSLContext:
    """A server's TLS context with the tls_files fixture's certificate and key."""
    cert, key = tls_files
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context
