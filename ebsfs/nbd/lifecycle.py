"""The NBD server's life: listen on a unix socket or a TCP port, serve every connection
over one engine, stop cleanly on SIGINT/SIGTERM, and leave no socket file behind."""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import os
import signal
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass

import trio

from ebsfs.constants import NBD_HANDSHAKE_TIMEOUT
from ebsfs.engine.engine import Engine
from ebsfs.errors import UserInputError
from ebsfs.nbd.exports import Export, snapshot_exports
from ebsfs.nbd.server import Server

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Listen:
    """Where to listen: a unix socket path, or a TCP port on an address."""

    socket_path: str | None = None
    port: int | None = None
    bind: str = "127.0.0.1"

    def describe(self) -> str:
        if self.socket_path is not None:
            return f"unix socket {self.socket_path}"
        host = f"[{self.bind}]" if ":" in self.bind else self.bind
        return f"{host}:{self.port}"

    def uri(self, export: str) -> str:
        """The NBD URI of an export here (as qemu-img and nbdinfo take it)."""
        if self.socket_path is not None:
            return f"nbd+unix:///{export}?socket={self.socket_path}"
        host = f"[{self.bind}]" if ":" in self.bind else self.bind
        return f"nbd://{host}:{self.port}/{export}"


def check_socket_path(path: str) -> None:
    """A unix socket path that can be listened on: nothing there, or a stale socket
    (no server answers on it: removed). Anything else is a one-line UserInputError;
    nothing that is not a socket is ever removed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise UserInputError(f"socket {path}: its directory does not exist") from None
        return
    except OSError as err:
        raise UserInputError(f"socket {path}: {err.strerror or err}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise UserInputError(f"socket {path}: a file that is not a socket is there; not replaced")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # stale: its server is gone
        log.info("removed the stale socket %s", path)
        return
    except OSError as err:
        raise UserInputError(f"socket {path}: {err.strerror or err}") from None
    finally:
        probe.close()
    raise UserInputError(f"socket {path} is in use: another server listens on it")


async def _open_listener(listen: Listen) -> trio.SocketListener:
    if listen.socket_path is not None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(listen.socket_path)
        except OSError as err:
            sock.close()
            raise UserInputError(
                f"cannot listen on {listen.describe()}: {err.strerror or err}"
            ) from None
    else:
        family = socket.AF_INET6 if ":" in listen.bind else socket.AF_INET
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            await sock.bind((listen.bind, listen.port or 0))
        except OSError as err:
            sock.close()
            if err.errno == errno.EADDRINUSE:
                raise UserInputError(f"{listen.describe()} is in use") from None
            raise UserInputError(
                f"cannot listen on {listen.describe()}: {err.strerror or err}"
            ) from None
    sock.listen(128)
    return trio.SocketListener(sock)


def serve(
    engine: Engine,
    listen: Listen,
    on_ready: Callable[[dict[str, Export]], None],
    handshake_timeout: float = NBD_HANDSHAKE_TIMEOUT,
) -> None:
    """Find the exports, listen, call `on_ready(exports)`, and serve until SIGINT or
    SIGTERM. The socket file is removed on the way out, whatever ends the server."""
    created: tuple[int, int] | None = None

    async def main() -> None:
        nonlocal created
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            exports = await snapshot_exports(engine)
            server = Server(engine, exports, engine.config.read_timeout, handshake_timeout)
            listener = await _open_listener(listen)
            if listen.socket_path is not None:
                st = os.stat(listen.socket_path)
                created = (st.st_dev, st.st_ino)

            async def watch_signals() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for signum in signals:
                        log.info("signal %d: stopping the NBD server", signum)
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(watch_signals)
            nursery.start_soon(trio.serve_listeners, server.handle, [listener])
            # What was made to start (boto3's ~70,000 objects) lives as long as the
            # server: frozen, collections walk only what serving makes (as the mount).
            gc.freeze()
            on_ready(exports)
            log.info("serving %d NBD export(s) on %s", len(exports), listen.describe())

    try:
        trio.run(main)
    finally:
        if created is not None and listen.socket_path is not None:
            with contextlib.suppress(OSError):
                st = os.stat(listen.socket_path)
                if (st.st_dev, st.st_ino) == created:  # ours, not a later server's
                    os.unlink(listen.socket_path)
        engine.close()
        log.info("NBD server stopped")
