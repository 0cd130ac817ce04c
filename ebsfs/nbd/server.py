"""One NBD connection from greeting to goodbye, over the shared engine: the fixed
newstyle haggling, then requests answered as they complete, several at once.

Concurrency rules (one trio loop): a connection's requests are read by one task, in
order, and each is answered by a task of its own; replies are written whole under the
connection's lock, so chunks of different replies never interleave mid-message. At
most MAX_IN_FLIGHT requests and MAX_BYTES_IN_FLIGHT bytes of reads are in flight per
connection, MAX_BYTES_ALL over all of them (the reader waits before taking more), and
a reply that cannot be written within SEND_TIMEOUT ends its connection: memory is
bounded whatever clients send, and one that reads no replies holds nothing for long.
Anything a client does wrong ends that connection alone, logged; the server and its
other connections go on."""

from __future__ import annotations

import contextlib
import logging
import struct
from dataclasses import dataclass

import trio

from ebsfs.constants import BLOCK_SIZE, NBD_HANDSHAKE_TIMEOUT
from ebsfs.engine.cache import Loan
from ebsfs.engine.engine import Engine
from ebsfs.engine.files import WindowReader
from ebsfs.errors import EbsfsError, first_leaf
from ebsfs.nbd import protocol as p
from ebsfs.nbd.exports import Export, allocation
from ebsfs.quoting import printable

log = logging.getLogger(__name__)

MAX_REQUEST = 32 * 1024**2
"""The largest read (and write payload, refused) a client may send: NBD's usual
maximum block size, and what `ebsfs.open` asks of the engine at once."""
PREFERRED_BLOCK = BLOCK_SIZE
MAX_OPTION_DATA = 64 * 1024
"""An option's data beyond this is no honest client's (names are at most 4 KiB)."""
MAX_IN_FLIGHT = 64
MAX_BYTES_IN_FLIGHT = 64 * 1024**2
"""Per connection: requests and bytes of reads being answered at once."""
MAX_BYTES_ALL = 512 * 1024**2
"""Bytes of reads being answered at once over all connections."""
SEND_TIMEOUT = 120.0
"""Seconds a reply may take to be written: a client that sends requests and never
reads the replies is disconnected, and what its requests held is given back."""
CONTEXT_ID = 1
"""The id of `base:allocation`, the one metadata context."""
TRANSMISSION_FLAGS = p.FLAG_HAS_FLAGS | p.FLAG_READ_ONLY | p.FLAG_SEND_FLUSH | p.FLAG_CAN_MULTI_CONN
"""Read-only, flush accepted (nothing to flush), and one cache shared by every
connection: clients may spread their requests over several (nbdcopy does)."""
HOLE = p.STATE_HOLE | p.STATE_ZERO


class ClientGone(Exception):
    """The client closed the connection."""


class Hangup(Exception):
    """The client broke the protocol in a way that leaves no reply to give: close."""


class Wire:
    """A connection's bytes: exact reads from a buffer, whole writes under a lock."""

    def __init__(self, stream: trio.abc.Stream, send_timeout: float = SEND_TIMEOUT) -> None:
        self.stream = stream
        self.send_timeout = send_timeout
        self._buffer = bytearray()
        self._lock = trio.Lock()

    async def exactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            data = await self.stream.receive_some(
                max(65536, min(size - len(self._buffer), 1 << 20))
            )
            if not data:
                raise ClientGone
            self._buffer += data
        out = bytes(self._buffer[:size])
        del self._buffer[:size]
        return out

    async def skip(self, size: int) -> None:
        """Read and drop `size` bytes, a MiB at a time."""
        while size:
            size -= len(await self.exactly(min(size, 1 << 20)))

    async def send(self, *parts: bytes | memoryview) -> None:
        async with self._lock:
            with trio.move_on_after(self.send_timeout):
                for part in parts:
                    if len(part):
                        await self.stream.send_all(part)
                return
        raise Hangup(
            f"a reply could not be written within {self.send_timeout:g}s (the client reads none)"
        )


class Budget:
    """Bytes of reads in flight on one connection. One task takes (the request reader);
    many give back."""

    def __init__(self, total: int) -> None:
        self.free = total
        self._freed: trio.Event | None = None

    async def take(self, size: int) -> None:
        while self.free < size:
            self._freed = self._freed or trio.Event()
            await self._freed.wait()
        self.free -= size

    def give(self, size: int) -> None:
        self.free += size
        if self._freed is not None:
            self._freed.set()
            self._freed = None


@dataclass
class Session:
    """What the haggling agreed on."""

    export: Export
    structured: bool
    allocation: bool
    """`base:allocation` was selected for this export: BLOCK_STATUS may be asked."""


class Server:
    """Serves the exports to any number of connections (`handle` each)."""

    def __init__(
        self,
        engine: Engine,
        exports: dict[str, Export],
        read_timeout: float,
        handshake_timeout: float = NBD_HANDSHAKE_TIMEOUT,
        send_timeout: float = SEND_TIMEOUT,
    ) -> None:
        self.engine = engine
        self.exports = exports
        self.read_timeout = read_timeout
        self.handshake_timeout = handshake_timeout
        self.send_timeout = send_timeout
        whole = [e for e in exports.values() if e.name == e.image.snapshot_id]
        self.default = whole[0] if len(whole) == 1 else None
        """The export of the empty name: the snapshot, when there is only one."""
        self.connections = 0
        self.budget = Budget(MAX_BYTES_ALL)

    def find(self, name: str) -> Export | None:
        return self.default if name == "" else self.exports.get(name)

    async def handle(self, stream: trio.abc.Stream) -> None:
        """One connection, to its end. Never raises but Cancelled: a client's mistake,
        disconnect or a bug met while serving it ends this connection only."""
        self.connections += 1
        number = self.connections
        try:
            async with stream:
                await self._session(Wire(stream, self.send_timeout), number)
        except Exception as group:  # Cancelled (the server stopping) is no Exception
            err = first_leaf(group)  # the request tasks' nursery wraps what they raise
            if isinstance(err, ClientGone):
                log.debug("NBD connection %d: the client went away", number)
            elif isinstance(err, Hangup | p.Malformed):
                log.warning("NBD connection %d closed: %s", number, err)
            elif isinstance(err, trio.BrokenResourceError | trio.ClosedResourceError | OSError):
                log.info("NBD connection %d lost: %s", number, err or type(err).__name__)
            else:  # a bug: logged, the server goes on
                log.error(
                    "NBD connection %d failed: unexpected %s: %s",
                    number,
                    type(err).__name__,
                    err,
                    exc_info=err,
                )

    async def _session(self, wire: Wire, number: int) -> None:
        await wire.send(p.handshake())
        try:
            with trio.fail_after(self.handshake_timeout):
                (flags,) = struct.unpack(">I", await wire.exactly(4))
                if flags & ~p.KNOWN_CLIENT_FLAGS:
                    raise Hangup(f"unknown client flags {flags:#x}")
                session = await self._haggle(wire, bool(flags & p.FLAG_C_NO_ZEROES))
        except trio.TooSlowError:
            raise Hangup(f"no export chosen within {self.handshake_timeout:g}s") from None
        if session is None:
            return
        log.info(
            "NBD connection %d: export %s%s",
            number,
            printable(session.export.name),
            " (structured replies)" if session.structured else "",
        )
        await self._transmit(wire, session)

    def _flags(self, structured: bool) -> int:
        return TRANSMISSION_FLAGS | (p.FLAG_SEND_DF if structured else 0)

    async def _haggle(self, wire: Wire, no_zeroes: bool) -> Session | None:
        """Options until one chooses an export (the Session) or the client aborts (None)."""
        structured = False
        selected: str | None = None  # the export `base:allocation` was selected for
        while True:
            option, length = p.option_header(await wire.exactly(p.OPTION_HEADER_SIZE))
            if length > MAX_OPTION_DATA:
                raise Hangup(f"option {option} with {length} bytes of data")
            data = await wire.exactly(length)

            async def reply(kind: int, payload: bytes = b"", option: int = option) -> None:
                await wire.send(p.option_reply(option, kind, payload))

            if option == p.OPT_EXPORT_NAME:
                name = p.export_name(data)
                export = self.find(name)
                if export is None:  # no way to say so but to hang up
                    raise Hangup(f"NBD_OPT_EXPORT_NAME of an unknown export {printable(name)}")
                await wire.send(
                    p.export_name_reply(export.size, self._flags(structured), no_zeroes)
                )
                return Session(export, structured, selected == export.name)
            if option == p.OPT_ABORT:
                # It may have closed already, as the protocol allows.
                with contextlib.suppress(trio.BrokenResourceError, OSError):
                    await reply(p.REP_ACK)
                return None
            if option == p.OPT_LIST:
                if data:
                    await reply(p.REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")
                    continue
                for export in self.exports.values():
                    await reply(p.REP_SERVER, p.server_reply(export.name))
                await reply(p.REP_ACK)
            elif option in (p.OPT_INFO, p.OPT_GO):
                try:
                    name, asked = p.info_request(data)
                except p.Malformed as err:
                    await reply(p.REP_ERR_INVALID, str(err).encode())
                    continue
                export = self.find(name)
                if export is None:
                    await reply(p.REP_ERR_UNKNOWN, f"no export {printable(name)}".encode())
                    continue
                await reply(p.REP_INFO, p.info_export(export.size, self._flags(structured)))
                if p.INFO_NAME in asked:
                    await reply(p.REP_INFO, p.info_name(export.name))
                if p.INFO_DESCRIPTION in asked:
                    await reply(
                        p.REP_INFO,
                        struct.pack(">H", p.INFO_DESCRIPTION) + export.description.encode(),
                    )
                await reply(p.REP_INFO, p.info_block_size(1, PREFERRED_BLOCK, MAX_REQUEST))
                await reply(p.REP_ACK)
                if option == p.OPT_GO:
                    return Session(export, structured, selected == export.name)
            elif option == p.OPT_STRUCTURED_REPLY:
                if data:
                    await reply(p.REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data")
                    continue
                structured = True
                await reply(p.REP_ACK)
            elif option in (p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT):
                listing = option == p.OPT_LIST_META_CONTEXT
                if not structured:
                    await reply(p.REP_ERR_INVALID, b"negotiate structured replies first")
                    continue
                try:
                    name, queries = p.meta_context_request(data, "meta context option")
                except p.Malformed as err:
                    await reply(p.REP_ERR_INVALID, str(err).encode())
                    continue
                export = self.find(name)
                if export is None:
                    await reply(p.REP_ERR_UNKNOWN, f"no export {printable(name)}".encode())
                    continue
                wanted = (listing and not queries) or any(
                    q == p.BASE_ALLOCATION or (listing and q == "base:") for q in queries
                )
                if not listing:
                    selected = export.name if wanted else None
                if wanted:
                    await reply(
                        p.REP_META_CONTEXT,
                        p.meta_context_reply(0 if listing else CONTEXT_ID, p.BASE_ALLOCATION),
                    )
                await reply(p.REP_ACK)
            else:
                await reply(p.REP_ERR_UNSUP, f"option {option} is not supported".encode())

    async def _transmit(self, wire: Wire, session: Session) -> None:
        """Requests until NBD_CMD_DISC (answering those in flight first) or the end."""
        export = session.export
        reader = WindowReader(
            export.image, export.start, export.size, metadata=self.engine.metadata
        )
        slots = trio.Semaphore(MAX_IN_FLIGHT)
        budget = Budget(MAX_BYTES_IN_FLIGHT)
        async with trio.open_nursery() as nursery:
            while True:
                request = p.request(await wire.exactly(p.REQUEST_SIZE))
                if request.type == p.CMD_DISC:
                    return  # the nursery waits for the replies in flight
                if request.type == p.CMD_WRITE:
                    # Its payload follows: read it past (bounded), or hang up.
                    if request.length > MAX_REQUEST:
                        raise Hangup(f"a write of {request.length} bytes (at most {MAX_REQUEST})")
                    await wire.skip(request.length)
                cost = request.length if request.type == p.CMD_READ else 0
                cost = min(cost, MAX_REQUEST)  # a larger read is refused, nothing held
                await slots.acquire()
                await budget.take(cost)
                await self.budget.take(cost)

                async def answer(request: p.Request = request, cost: int = cost) -> None:
                    try:
                        await self._answer(wire, session, reader, request)
                    finally:
                        slots.release()
                        budget.give(cost)
                        self.budget.give(cost)

                nursery.start_soon(answer)

    async def _answer(
        self, wire: Wire, session: Session, reader: WindowReader, request: p.Request
    ) -> None:
        kind = request.type
        if kind == p.CMD_READ:
            await self._read(wire, session, reader, request)
        elif kind == p.CMD_BLOCK_STATUS:
            await self._block_status(wire, session, request)
        elif kind == p.CMD_FLUSH:
            await wire.send(p.simple_reply(request.cookie))
        elif kind in (p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES):
            await self._error(wire, session, request, p.EPERM, "the export is read-only")
        else:
            await self._error(wire, session, request, p.EINVAL, f"unknown command {kind}")

    async def _error(
        self, wire: Wire, session: Session, request: p.Request, error: int, message: str
    ) -> None:
        if session.structured:
            await wire.send(p.error_chunk(request.cookie, error, message))
        else:
            await wire.send(p.simple_reply(request.cookie, error))

    def _range_error(self, session: Session, request: p.Request) -> tuple[int, str] | None:
        """Why a read or BLOCK_STATUS asks for a range it cannot have, or None."""
        size = session.export.size
        if request.length == 0:
            return p.EINVAL, "a request of 0 bytes"
        if request.offset + request.length > size:
            return p.EINVAL, (
                f"bytes {request.offset}+{request.length} are past the export's end ({size})"
            )
        return None

    async def _read(
        self, wire: Wire, session: Session, reader: WindowReader, request: p.Request
    ) -> None:
        if request.length > MAX_REQUEST:
            error = p.EOVERFLOW if session.structured else p.EINVAL
            await self._error(
                wire,
                session,
                request,
                error,
                f"a read of {request.length} bytes (at most {MAX_REQUEST})",
            )
            return
        refused = self._range_error(session, request)
        if refused is not None:
            await self._error(wire, session, request, *refused)
            return
        offset, length, cookie = request.offset, request.length, request.cookie
        with Loan() as loan:
            try:
                data = await reader.read(offset, length, loan=loan)
                if len(data) != length:
                    raise EbsfsError(f"read {len(data)} bytes of {length}")
                runs = [(length, True)]
                if session.structured and not request.flags & p.CMD_FLAG_DF:
                    runs = await self._runs(session.export, offset, length)
            except EbsfsError as err:
                log.error(
                    "NBD read of %s at %d failed: %s", printable(session.export.name), offset, err
                )
                await self._error(wire, session, request, p.EIO, str(err))
                return
            if not session.structured:
                await wire.send(p.simple_reply(cookie), data)
                return
            parts: list[bytes | memoryview] = []
            view = memoryview(data)
            at = 0
            for n, (size, written) in enumerate(runs):
                last = n == len(runs) - 1
                if written:
                    parts += [
                        p.data_chunk_header(cookie, offset + at, size, last),
                        view[at : at + size],
                    ]
                else:
                    parts.append(p.hole_chunk(cookie, offset + at, size, last))
                at += size
            await wire.send(*parts)

    async def _runs(self, export: Export, offset: int, length: int) -> list[tuple[int, bool]]:
        """Data and hole runs of the whole range (allocation answers a chunk at a time)."""
        runs: list[tuple[int, bool]] = []
        at = offset
        while at < offset + length:
            for size, written in await allocation(
                export, at, offset + length - at, self.read_timeout
            ):
                if runs and runs[-1][1] == written:
                    runs[-1] = (runs[-1][0] + size, written)
                else:
                    runs.append((size, written))
                at += size
        return runs

    async def _block_status(self, wire: Wire, session: Session, request: p.Request) -> None:
        if not session.allocation:
            await self._error(wire, session, request, p.EINVAL, "no metadata context selected")
            return
        refused = self._range_error(session, request)
        if refused is not None:
            await self._error(wire, session, request, *refused)
            return
        most = 1 if request.flags & p.CMD_FLAG_REQ_ONE else None
        try:
            runs = await allocation(
                session.export, request.offset, request.length, self.read_timeout, most
            )
        except EbsfsError as err:
            log.error("NBD block status of %s failed: %s", printable(session.export.name), err)
            await self._error(wire, session, request, p.EIO, str(err))
            return
        extents = [(size, 0 if written else HOLE) for size, written in runs]
        await wire.send(p.block_status_chunk(request.cookie, CONTEXT_ID, extents))
