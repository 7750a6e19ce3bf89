"""The two MQTT backends: an upstream TCP broker, or an in-process amqtt broker.

Both only move bytes (see :mod:`protocols.mqtt.backend`): the front-end has
already authenticated the device and rewritten its packets into the tenant
namespace, so nothing here looks at identity.

* :class:`UpstreamBackend` -- one TCP connection per device session to an
  external broker (mosquitto, EMQX, ...) that speaks MQTT 3.1.1 and 5.0.
* :class:`EmbeddedBackend` -- an amqtt :class:`~amqtt.broker.Broker` in this
  process with a single *external* listener: no socket is opened at all, every
  session is an in-memory duplex pipe, so nothing else on the machine can reach
  the broker. amqtt speaks MQTT 3.1.1 only. Left alone it answers a v5
  CONNECT without properties with CONNACK 0x01 but hangs on one *with*
  properties (it parses it as 3.1.1 and waits for bytes that never come), so
  the backend judges the first packet itself: anything but a 3.1.1 CONNECT is
  answered with the 3.1.1 CONNACK 0x01 "unacceptable protocol version" (3.1,
  5.0) or just closed (not a CONNECT), and amqtt never sees it. The front-end
  refuses v5 on this backend before connecting anyway.

Connection semantics (both backends): :meth:`read` returns ``b""`` once the
broker closed or the connection was lost or closed locally; :meth:`write` after
close is a no-op; :meth:`drain` raises :class:`ConnectionResetError` once the
connection is gone; :meth:`close` is idempotent, never raises and never waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any, Final, Literal, cast

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.plugins.base import BaseAuthPlugin

from protocols.mqtt.backend import Backend, BackendConnection, BackendLink, BackendPeer
from protocols.mqtt.codec import Connack, ConnectReturnCode, encode

__all__ = [
    "DEFAULT_PIPE_LIMIT",
    "READ_CHUNK",
    "BackendError",
    "BackendUnavailable",
    "EmbeddedBackend",
    "UpstreamBackend",
    "embedded_broker_config",
    "make_backend",
]

log = logging.getLogger(__name__)

READ_CHUNK: Final = 64 * 1024
"""Largest chunk :meth:`BackendConnection.read` returns."""
DEFAULT_PIPE_LIMIT: Final = 64 * 1024
"""Embedded backend: bytes queued in one direction before ``drain()`` waits."""
_LISTENER: Final = "default"
_STOP_GRACE: Final = 2.0


class BackendError(OSError):
    """The backend cannot serve connections (not started, stopped, broker failed)."""


class BackendUnavailable(BackendError):
    """The upstream broker could not be reached (``host:port`` in the message)."""


# --------------------------------------------------------------------------
# Upstream: a TCP broker
# --------------------------------------------------------------------------


class _UpstreamConnection:
    """A :class:`BackendConnection` over an asyncio stream pair."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_close: Callable[[_UpstreamConnection], None],
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._on_close = on_close
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    async def read(self) -> bytes:
        if self._closed:
            return b""
        try:
            return await self._reader.read(READ_CHUNK)
        except OSError:  # ConnectionResetError and friends: the broker is gone
            return b""

    def write(self, data: bytes) -> None:
        if self._closed or self._writer.transport.is_closing():
            return
        self._writer.write(data)

    async def drain(self) -> None:
        if self._closed:
            raise ConnectionResetError("backend connection closed")
        await self._writer.drain()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        transport = self._writer.transport
        try:
            if transport.get_write_buffer_size():
                # The broker is not taking our bytes: do not let a stalled peer
                # keep the connection (and its buffer) alive.
                transport.abort()
            else:
                transport.close()  # FIN after nothing: a clean close
        except Exception:
            with contextlib.suppress(Exception):
                transport.abort()
        finally:
            self._on_close(self)


class _UpstreamLink(asyncio.Protocol):
    """A :class:`BackendLink` driven by the TCP transport's callbacks (no streams,
    no task). Slotted: one per idle session."""

    __slots__ = ("_closed", "_links", "_paused", "_peer", "_transport")

    def __init__(self, links: set[_UpstreamLink]) -> None:
        self._links = links  # the backend's open links: this one leaves it on close
        self._transport: asyncio.Transport | None = None
        self._peer: BackendPeer | None = None
        self._closed = False
        self._paused = False

    @property
    def closed(self) -> bool:
        return self._closed

    def attach(self, peer: BackendPeer) -> None:
        self._peer = peer

    # transport callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self._closed and self._peer is not None:
            self._peer.backend_data(data)

    def eof_received(self) -> bool:
        return False  # close: the front-end does not half-close

    def connection_lost(self, exc: Exception | None) -> None:
        was_closed = self._closed
        self._closed = True
        self._links.discard(self)
        if not was_closed and self._peer is not None:
            self._peer.backend_lost()

    def pause_writing(self) -> None:
        if self._peer is not None:
            self._peer.backend_pause_writing()

    def resume_writing(self) -> None:
        if self._peer is not None:
            self._peer.backend_resume_writing()

    # BackendLink

    def write(self, data: bytes) -> None:
        t = self._transport
        if self._closed or t is None or t.is_closing():
            return
        t.write(data)

    def pause_reading(self) -> None:
        t = self._transport
        if not self._paused and t is not None and not t.is_closing():
            self._paused = True
            t.pause_reading()

    def resume_reading(self) -> None:
        t = self._transport
        if self._paused and t is not None and not t.is_closing():
            self._paused = False
            t.resume_reading()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        transport = self._transport
        try:
            if transport is None:
                return
            if transport.get_write_buffer_size():
                transport.abort()  # a stalled broker must not keep the buffer alive
            else:
                transport.close()
        except Exception:
            with contextlib.suppress(Exception):
                if transport is not None:
                    transport.abort()
        finally:
            self._links.discard(self)


class UpstreamBackend:
    """Forward every device session over its own TCP connection to a broker."""

    name = "upstream"

    def __init__(
        self,
        host: str,
        port: int,
        *,
        connect_timeout: float = 10.0,
        tls: ssl.SSLContext | None = None,
        server_name: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.tls = tls
        """Client context for TLS to the broker (``None``: plain TCP)."""
        self.server_name = server_name or host
        self._connections: set[_UpstreamConnection] = set()
        self._links: set[_UpstreamLink] = set()
        self._stopped = False

    @property
    def open_connections(self) -> int:
        return len(self._connections) + len(self._links)

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, **self._tls_args()),
                self.connect_timeout,
            )
        except TimeoutError as exc:
            raise BackendUnavailable(
                f"MQTT broker {self.host}:{self.port} unreachable: "
                f"no connection within {self.connect_timeout:g}s"
            ) from exc
        except OSError as exc:
            raise BackendUnavailable(
                f"MQTT broker {self.host}:{self.port} unreachable: {exc}"
            ) from exc

    async def start(self) -> None:
        """One bounded reachability probe (connect, then close again)."""
        self._stopped = False
        _, writer = await self._open()
        writer.close()
        with contextlib.suppress(OSError):
            await asyncio.wait_for(writer.wait_closed(), self.connect_timeout)

    async def stop(self) -> None:
        self._stopped = True
        for conn in list(self._connections):
            conn.close()
        for link in list(self._links):
            link.close()

    def _tls_args(self) -> dict[str, Any]:
        if self.tls is None:
            return {}
        return {
            "ssl": self.tls,
            "server_hostname": self.server_name,
            "ssl_handshake_timeout": self.connect_timeout,
        }

    def _check_running(self) -> None:
        if self._stopped:
            raise BackendError("upstream backend stopped")

    async def connect(self) -> BackendConnection:
        self._check_running()
        reader, writer = await self._open()
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._stopped:  # stop() ran while we were connecting
            writer.transport.abort()
            raise BackendError("upstream backend stopped")
        conn = _UpstreamConnection(reader, writer, self._connections.discard)
        self._connections.add(conn)
        return conn

    async def connect_link(self, peer: BackendPeer) -> BackendLink:
        """Open a callback-driven connection: ``peer`` gets the data and the end."""
        self._check_running()
        loop = asyncio.get_running_loop()
        link = _UpstreamLink(self._links)
        try:
            # asyncio.timeout, not wait_for: no extra task per session
            async with asyncio.timeout(self.connect_timeout):
                transport, _ = await loop.create_connection(
                    lambda: link, self.host, self.port, **self._tls_args()
                )
        except TimeoutError as exc:
            raise BackendUnavailable(
                f"MQTT broker {self.host}:{self.port} unreachable: "
                f"no connection within {self.connect_timeout:g}s"
            ) from exc
        except OSError as exc:
            raise BackendUnavailable(
                f"MQTT broker {self.host}:{self.port} unreachable: {exc}"
            ) from exc
        # TCP_NODELAY: both loops' TCP transports set it themselves (asking for
        # the socket here would keep a socket object per session with uvloop)
        if self._stopped:  # stop() ran while we were connecting
            transport.abort()
            raise BackendError("upstream backend stopped")
        if link.closed:  # lost before we got here
            raise BackendUnavailable(f"MQTT broker {self.host}:{self.port} closed the connection")
        self._links.add(link)
        link.attach(peer)
        return link


# --------------------------------------------------------------------------
# Embedded: amqtt in-process over in-memory pipes
# --------------------------------------------------------------------------


class _Pipe:
    """One direction of an in-memory byte stream: one writer, one reader.

    ``feed_eof`` is the writer's end of stream (buffered bytes are still read);
    ``close_reader`` is the reader going away (buffered and later bytes are
    dropped, reads return EOF, waiting writers are released). The writer side
    waits in :meth:`wait_space` while more than ``limit`` bytes are queued.
    """

    def __init__(self, limit: int) -> None:
        self._buf = bytearray()
        self._limit = limit
        self._eof = False
        self._reader_closed = False
        self._readable = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def reader_closed(self) -> bool:
        return self._reader_closed

    def _update(self) -> None:
        if self._buf or self._eof or self._reader_closed:
            self._readable.set()
        else:
            self._readable.clear()
        if len(self._buf) <= self._limit or self._reader_closed:
            self._space.set()
        else:
            self._space.clear()

    # writer side

    def write(self, data: bytes) -> None:
        if self._eof or self._reader_closed or not data:
            return
        self._buf += data
        self._update()

    async def wait_space(self) -> None:
        while not self._space.is_set():
            await self._space.wait()

    def feed_eof(self) -> None:
        self._eof = True
        self._update()

    # reader side

    def close_reader(self) -> None:
        self._reader_closed = True
        self._buf.clear()
        self._update()

    def _take(self, n: int) -> bytes:
        chunk = bytes(self._buf[:n])
        del self._buf[:n]
        self._update()
        return chunk

    async def read_some(self, n: int) -> bytes:
        """Up to ``n`` bytes as soon as any are there; ``b""`` at EOF."""
        while not self._readable.is_set():
            await self._readable.wait()
        if self._reader_closed:
            return b""
        return self._take(n)

    async def read_exactly(self, n: int) -> bytes:
        """``n`` bytes, fewer only at EOF (amqtt treats a short read as EOF).

        Consumes as it goes, so a packet larger than the limit cannot deadlock
        against a writer waiting for space.
        """
        out = bytearray()
        while len(out) < n:
            chunk = await self.read_some(n - len(out))
            if not chunk:
                break
            out += chunk
        return bytes(out)

    async def read_all(self) -> bytes:
        out = bytearray()
        while chunk := await self.read_some(READ_CHUNK):
            out += chunk
        return bytes(out)


class _BrokerReader(ReaderAdapter):  # type: ignore[misc]
    """amqtt's view of the gateway -> broker pipe."""

    def __init__(self, pipe: _Pipe) -> None:
        self._pipe = pipe

    async def read(self, n: int = -1) -> bytes:
        if n < 0:
            return await self._pipe.read_all()
        return await self._pipe.read_exactly(n)

    def feed_eof(self) -> None:
        self._pipe.feed_eof()


class _BrokerWriter(WriterAdapter):  # type: ignore[misc]
    """amqtt's view of the broker -> gateway pipe; closing it closes both ways."""

    def __init__(self, to_gateway: _Pipe, to_broker: _Pipe, peer: tuple[str, int]) -> None:
        self._to_gateway = to_gateway
        self._to_broker = to_broker
        self._peer = peer

    def write(self, data: bytes) -> None:
        self._to_gateway.write(data)  # dropped once the gateway side closed

    async def drain(self) -> None:
        await self._to_gateway.wait_space()

    def get_peer_info(self) -> tuple[str, int]:
        return self._peer

    def get_ssl_info(self) -> None:
        return None

    async def close(self) -> None:
        self.close_now()

    def close_now(self) -> None:
        self._to_gateway.feed_eof()
        self._to_broker.close_reader()


def _sniff_connect(head: bytes | bytearray) -> Literal["more", "accept", "refuse", "drop"]:
    """Judge the start of a session's first packet before amqtt sees it.

    ``accept``: an MQTT 3.1.1 CONNECT; ``refuse``: a CONNECT of another
    version (3.1 or 5.0), answered with CONNACK 0x01; ``drop``: not a CONNECT
    at all, closed without an answer ([MQTT-3.1.0-1]); ``more``: need bytes.
    amqtt's own check only comes after parsing the whole packet as 3.1.1,
    which waits forever for bytes that never come when a v5 CONNECT carries
    properties.
    """
    if not head:
        return "more"
    if head[0] != 0x10:
        return "drop"
    for pos in range(1, 5):  # Remaining Length, at most four bytes
        if pos >= len(head):
            return "more"
        if not head[pos] & 0x80:
            break
    else:
        return "drop"
    name_at = pos + 3
    if len(head) < name_at:
        return "more"
    name_len = int.from_bytes(head[pos + 1 : name_at], "big")
    if name_len not in (4, 6):
        return "drop"
    if len(head) <= name_at + name_len:
        return "more"
    name = bytes(head[name_at : name_at + name_len])
    level = head[name_at + name_len]
    if name == b"MQTT" and level == 4:
        return "accept"
    if name in (b"MQTT", b"MQIsdp"):
        return "refuse"
    return "drop"


# 3.1.1 CONNACK 0x01 "unacceptable protocol version" (the form amqtt itself sends).
_REFUSE_VERSION: Final = encode(Connack(False, ConnectReturnCode.UNACCEPTABLE_PROTOCOL_VERSION), 4)


class _EmbeddedConnection:
    """The gateway's end of an in-memory session with the embedded broker.

    The amqtt session starts (``start_session``) only once the first bytes are
    a 3.1.1 CONNECT; anything else is answered here and never reaches amqtt.
    """

    def __init__(
        self,
        to_broker: _Pipe,
        to_gateway: _Pipe,
        start_session: Callable[[], None],
        on_close: Callable[[_EmbeddedConnection], None],
    ) -> None:
        self._to_broker = to_broker
        self._to_gateway = to_gateway
        self._start_session = start_session
        self._on_close = on_close
        self._head: bytearray | None = bytearray()  # None once the CONNECT was judged
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def queued_to_broker(self) -> int:
        """Bytes written but not yet read by the broker."""
        return self._to_broker.buffered + len(self._head or b"")

    @property
    def queued_to_gateway(self) -> int:
        """Bytes the broker wrote that :meth:`read` has not returned yet."""
        return self._to_gateway.buffered

    async def read(self) -> bytes:
        return await self._to_gateway.read_some(READ_CHUNK)

    def write(self, data: bytes) -> None:
        if self._closed:
            return
        if self._head is None:
            self._to_broker.write(data)
            return
        self._head += data
        verdict = _sniff_connect(self._head)
        if verdict == "more":
            return
        head = bytes(self._head)
        self._head = None
        if verdict == "accept":
            self._to_broker.write(head)
            self._start_session()
            return
        if verdict == "refuse":
            self._to_gateway.write(_REFUSE_VERSION)
        self._to_gateway.feed_eof()
        self._to_broker.close_reader()

    async def drain(self) -> None:
        if self._closed or self._to_broker.reader_closed:
            raise ConnectionResetError("embedded broker connection closed")
        await self._to_broker.wait_space()
        if self._to_broker.reader_closed:
            raise ConnectionResetError("embedded broker connection closed")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._head = None
        self._to_broker.feed_eof()  # amqtt reads what is queued, then EOF
        self._to_gateway.close_reader()
        self._on_close(self)


class _GatewayAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]
    """Accept every session: the gateway authenticated the device already.

    Unlike amqtt's ``AnonymousAuthPlugin`` this does not flag the session as
    anonymous; amqtt drops anonymous sessions on disconnect and never queues
    QoS 1/2 messages for them, which would break ``clean_session=0`` devices.
    """

    async def authenticate(self, *, session: Any) -> bool:
        return True


class _GatewayBroker(Broker):  # type: ignore[misc]
    """amqtt's broker with its retained-message leak closed.

    On every CONNECT amqtt 0.12 sends the retained messages matching *every*
    topic filter any session subscribed to (``Broker._handle_client_session``
    loops over the broker-wide subscription table) -- across tenants, since
    all tenants share this broker. Only a session's own subscriptions count.
    """

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Any
    ) -> None:
        subscribers = self._subscriptions.get(subscription[0], ())
        if any(s.client_id == session.client_id for s, _ in subscribers):
            await super()._publish_retained_messages_for_subscription(subscription, session)


def embedded_broker_config(session_expiry_interval: int | None) -> dict[str, Any]:
    """The amqtt broker configuration used by :class:`EmbeddedBackend`.

    One external listener (no socket), our accept-all auth plugin and nothing
    else: no ``$SYS`` plugin, no packet/event logger, no persistence.
    """
    return {
        "listeners": {_LISTENER: {"type": "external"}},
        "plugins": {f"{__name__}.{_GatewayAuthPlugin.__qualname__}": {}},
        "session_expiry_interval": session_expiry_interval,
        "timeout_disconnect_delay": 0,
    }


def _quiet_amqtt_logging() -> None:
    # amqtt logs every connection at INFO, and its state machines (the
    # ``transitions`` library, used by nothing else here) every state change.
    for name in ("amqtt", "transitions"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:  # leave an explicit configuration alone
            logger.setLevel(logging.WARNING)


class EmbeddedBackend:
    """An in-process amqtt broker reachable only through :meth:`connect`.

    ``pipe_limit`` bounds the bytes queued in each direction of a session
    (``drain()`` waits above it, on both the gateway's and amqtt's side). amqtt
    itself still starts one task per message it delivers, so a device that
    stops reading makes amqtt's pending deliveries grow: the front-end must
    close sessions whose device does not keep up.
    ``session_expiry_interval`` (seconds) bounds how long amqtt keeps a
    disconnected ``clean_session=0`` session; ``None`` keeps them forever.
    """

    name = "embedded"

    def __init__(
        self,
        *,
        pipe_limit: int = DEFAULT_PIPE_LIMIT,
        session_expiry_interval: int | None = 24 * 3600,
    ) -> None:
        if pipe_limit < 1:
            raise ValueError("pipe_limit must be positive")
        self.pipe_limit = pipe_limit
        self.session_expiry_interval = session_expiry_interval
        self._broker: Any = None
        self._connections: set[_EmbeddedConnection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._seq = 0

    @property
    def broker(self) -> Any:
        """The running amqtt ``Broker`` (``None`` when stopped)."""
        return self._broker

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    async def start(self) -> None:
        if self._broker is not None:
            return
        _quiet_amqtt_logging()
        broker = _GatewayBroker(embedded_broker_config(self.session_expiry_interval))
        try:
            await broker.start()
        except Exception as exc:
            raise BackendError(f"embedded MQTT broker failed to start: {exc}") from exc
        self._broker = broker

    async def stop(self) -> None:
        broker, self._broker = self._broker, None
        # EOF to every session: amqtt ends them as an unclean close (wills are
        # published, as an upstream broker would when the gateway goes away).
        for conn in list(self._connections):
            conn.close()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=_STOP_GRACE)
        if broker is not None:
            try:
                await asyncio.wait_for(broker.shutdown(), _STOP_GRACE * 5)
            except Exception:
                log.exception("embedded MQTT broker did not shut down cleanly")
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def connect(self) -> BackendConnection:
        broker = self._broker
        if broker is None:
            raise BackendError("embedded MQTT broker is not running")
        self._seq += 1
        to_broker = _Pipe(self.pipe_limit)
        to_gateway = _Pipe(self.pipe_limit)
        seq = self._seq
        reader = _BrokerReader(to_broker)
        writer = _BrokerWriter(to_gateway, to_broker, ("gateway", seq))

        def start_session() -> None:
            if self._broker is not broker:  # stopped (or restarted) meanwhile
                asyncio.get_running_loop().call_soon(writer.close_now)
                return
            task = asyncio.create_task(
                self._serve(broker, reader, writer), name=f"mqtt-embedded-session-{seq}"
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        conn = _EmbeddedConnection(to_broker, to_gateway, start_session, self._connections.discard)
        self._connections.add(conn)
        return conn

    async def _serve(self, broker: Any, reader: _BrokerReader, writer: _BrokerWriter) -> None:
        try:
            await broker.external_connected(reader, writer, _LISTENER)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("embedded MQTT broker session failed")
        finally:
            # amqtt does not close the writer on every exit path (e.g. EOF
            # before CONNECT): make sure both sides see the end.
            writer.close_now()


# --------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------


def make_backend(
    kind: Literal["embedded", "upstream"],
    *,
    host: str,
    port: int,
    connect_timeout: float,
    tls: ssl.SSLContext | None = None,
    server_name: str | None = None,
) -> Backend:
    """The configured backend; ``host``/``port``/``tls`` are ignored for ``embedded``."""
    if kind == "embedded":
        return EmbeddedBackend()
    if kind == "upstream":
        return UpstreamBackend(
            host, port, connect_timeout=connect_timeout, tls=tls, server_name=server_name
        )
    raise ValueError(f"unknown MQTT backend {kind!r}")
