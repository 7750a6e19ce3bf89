"""A small asyncio MQTT client over TLS for fleets and benchmarks.

Built on the project's sans-IO codec (:mod:`protocols.mqtt.codec`) and a plain
:class:`asyncio.Protocol`, so one connection costs a transport, a decoder and a
few futures (no stream objects, no task per connection). The TCP connect and
the TLS upgrade are separate steps, which lets callers time them separately.
Also provides the ``mqtt`` (8883: ClientId = CN) and ``mqtt-service`` (9883:
username = tenant id) drivers of ``fleet run``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable
from typing import cast

from gateway.fleet.driver import (
    ConnectFailure,
    ConnectTimings,
    Device,
    DriverOptions,
    classify,
    client_context,
)
from protocols.mqtt.codec import (
    Connack,
    Connect,
    Disconnect,
    MqttDecoder,
    MqttProtocolError,
    Packet,
    Pingreq,
    Puback,
    Publish,
    Suback,
    Subscribe,
    SubscriptionOptions,
    encode,
)

__all__ = ["CoreDriver", "MqttConnection", "MqttSession", "ServiceDriver", "open_mqtt"]

MAX_INCOMING = 1 << 20
"""Largest packet accepted from the server (bytes)."""

PublishCallback = Callable[[Publish], None]


class _MqttProtocol(asyncio.Protocol):
    """Bytes in → packets → futures and counters."""

    def __init__(self, version: int, on_publish: PublishCallback | None) -> None:
        loop = asyncio.get_running_loop()
        self.version = version
        self.transport: asyncio.Transport | None = None
        self.decoder = MqttDecoder(MAX_INCOMING, version, server=False)
        self.connack: asyncio.Future[Connack] = loop.create_future()
        self.suback: asyncio.Future[Suback] | None = None
        self.lost: asyncio.Future[None] = loop.create_future()
        self.failure: str | None = None
        self.on_publish = on_publish
        self.received = 0
        self.pending: dict[int, float] = {}
        self.acked = 0
        self.ack_latencies: list[float] = []
        self._can_write: asyncio.Future[None] | None = None

    # asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            packets = self.decoder.feed(data)
        except MqttProtocolError as exc:
            for p in exc.packets:
                self._packet(p)
            self.fail("malformed")
            if self.transport is not None:
                self.transport.abort()
            return
        for p in packets:
            self._packet(p)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(classify(exc) if exc is not None else "closed")
        err = ConnectFailure(self.failure or "closed")
        for fut in (self.connack, self.suback):
            if fut is not None and not fut.done():
                fut.set_exception(err)
                fut.exception()  # retrieved: nobody may be waiting any more
        if not self.lost.done():
            self.lost.set_result(None)
        self._wake_writer()

    def pause_writing(self) -> None:
        if self._can_write is None:
            self._can_write = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        self._wake_writer()

    # internals ---------------------------------------------------------------------
    def _wake_writer(self) -> None:
        waiter, self._can_write = self._can_write, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def drain(self) -> None:
        if self.failure is not None:
            raise ConnectFailure(self.failure)
        waiter = self._can_write
        if waiter is not None:
            await waiter

    def fail(self, reason: str) -> None:
        """Record why the connection ends (the first reason wins)."""
        if self.failure is None:
            self.failure = reason

    def _packet(self, p: Packet) -> None:
        if isinstance(p, Publish):
            self.received += 1
            if p.qos == 1 and p.packet_id is not None and self.transport is not None:
                self.transport.write(encode(Puback(p.packet_id), self.version))
            if self.on_publish is not None:
                self.on_publish(p)
        elif isinstance(p, Puback):
            sent = self.pending.pop(p.packet_id, None)
            if sent is not None:
                self.acked += 1
                self.ack_latencies.append(time.perf_counter() - sent)
        elif isinstance(p, Connack):
            if not self.connack.done():
                self.connack.set_result(p)
        elif isinstance(p, Suback):
            if self.suback is not None and not self.suback.done():
                self.suback.set_result(p)
        elif isinstance(p, Disconnect):
            self.fail(f"disconnect:{p.reason_code}")


class MqttConnection:
    """A connected MQTT client (after a successful CONNACK)."""

    def __init__(
        self, transport: asyncio.Transport, proto: _MqttProtocol, timings: ConnectTimings
    ) -> None:
        self.transport = transport
        self.proto = proto
        self.timings = timings
        self._next_id = 0

    @property
    def failure(self) -> str | None:
        """None while connected, else why the connection ended."""
        return self.proto.failure

    @property
    def received(self) -> int:
        """PUBLISH packets received."""
        return self.proto.received

    def _packet_id(self) -> int:
        self._next_id = self._next_id % 65535 + 1
        return self._next_id

    def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        """Queue one PUBLISH (QoS 1 acknowledgements are counted as they arrive)."""
        packet_id = None
        if qos:
            packet_id = self._packet_id()
            self.proto.pending[packet_id] = time.perf_counter()
        self.write(encode(Publish(topic, payload, qos, packet_id=packet_id), self.proto.version))

    def write(self, data: bytes) -> None:
        """Queue raw MQTT bytes (e.g. a pre-encoded QoS 0 PUBLISH)."""
        if self.proto.failure is None and not self.transport.is_closing():
            self.transport.write(data)

    async def drain(self) -> None:
        """Wait until the transport accepts more data; :class:`ConnectFailure` if lost."""
        await self.proto.drain()

    def ping(self) -> None:
        self.write(encode(Pingreq(), self.proto.version))

    async def subscribe(self, topic_filter: str, qos: int = 0, wait: float = 10.0) -> int:
        """Subscribe and wait for SUBACK; returns the granted code."""
        self.proto.suback = asyncio.get_running_loop().create_future()
        packet = Subscribe(self._packet_id(), ((topic_filter, SubscriptionOptions(qos)),))
        self.write(encode(packet, self.proto.version))
        try:
            suback = await asyncio.wait_for(self.proto.suback, wait)
        except TimeoutError:
            raise ConnectFailure("timeout", "no SUBACK") from None
        return suback.reason_codes[0]

    async def disconnect(self, grace: float = 2.0) -> None:
        """Send DISCONNECT and close the TLS connection (bounded, never raises)."""
        self.write(encode(Disconnect(), self.proto.version))
        self.proto.fail("closed_by_client")
        self.transport.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self.proto.lost), grace)
        if not self.proto.lost.done():
            self.transport.abort()

    def abort(self) -> None:
        self.proto.fail("closed_by_client")
        self.transport.abort()

    async def wait_lost(self) -> None:
        await asyncio.shield(self.proto.lost)


async def _start_tls(
    loop: asyncio.AbstractEventLoop,
    raw: asyncio.Transport,
    proto: _MqttProtocol,
    context: ssl.SSLContext,
    host: str,
    server_hostname: str | None,
    deadline: float,
) -> asyncio.Transport:
    if server_hostname is None and context.check_hostname:
        server_hostname = host
    try:
        tls = await asyncio.wait_for(
            loop.start_tls(
                raw,
                proto,
                context,
                server_hostname=server_hostname,
                ssl_handshake_timeout=max(deadline - loop.time(), 0.1),
            ),
            max(deadline - loop.time(), 0.001),
        )
    except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
        raw.abort()
        raise ConnectFailure(classify(exc), str(exc)) from None
    if tls is None:  # pragma: no cover - start_tls contract
        raw.abort()
        raise ConnectFailure("closed", "TLS upgrade returned no transport")
    return tls


async def open_mqtt(
    host: str,
    port: int,
    context: ssl.SSLContext | None,
    *,
    client_id: str,
    username: str | None = None,
    password: bytes | None = None,
    keepalive: int = 60,
    connect_timeout: float = 10.0,
    server_hostname: str | None = None,
    version: int = 4,
    on_publish: PublishCallback | None = None,
    local_addr: tuple[str, int] | None = None,
) -> MqttConnection:
    """TCP connect, TLS handshake, CONNECT, CONNACK; :class:`ConnectFailure` otherwise.

    ``connect_timeout`` bounds the whole sequence. ``context=None`` speaks plain
    TCP (a backend client of a broker, not a device). ``local_addr`` binds the
    client side (e.g. another 127.x.y.z: more than one source address's
    ephemeral ports).
    """
    loop = asyncio.get_running_loop()
    timeout = connect_timeout
    deadline = loop.time() + timeout
    t0 = time.perf_counter()
    try:
        raw, proto = await asyncio.wait_for(
            loop.create_connection(
                lambda: _MqttProtocol(version, on_publish), host, port, local_addr=local_addr
            ),
            timeout,
        )
    except (OSError, TimeoutError) as exc:
        raise ConnectFailure(classify(exc), str(exc)) from None
    t1 = time.perf_counter()
    if context is None:
        tls = raw
    else:
        tls = await _start_tls(loop, raw, proto, context, host, server_hostname, deadline)
    proto.transport = tls
    t2 = time.perf_counter()
    connect = Connect(
        client_id, protocol_level=version, keepalive=keepalive, username=username, password=password
    )
    tls.write(encode(connect, version))
    try:
        connack = await asyncio.wait_for(
            asyncio.shield(proto.connack), max(deadline - loop.time(), 0.001)
        )
    except TimeoutError:
        tls.abort()
        raise ConnectFailure("timeout", "no CONNACK") from None
    except ConnectFailure:
        tls.abort()
        raise
    if connack.reason_code != 0:
        tls.abort()
        raise ConnectFailure(f"connack:{connack.reason_code}", "CONNACK refused")
    t3 = time.perf_counter()
    return MqttConnection(tls, proto, ConnectTimings(tcp=t1 - t0, tls=t2 - t1, accept=t3 - t2))


class MqttSession:
    """A :class:`~gateway.fleet.driver.DeviceSession` over :class:`MqttConnection`."""

    def __init__(self, conn: MqttConnection, topic: str, qos: int, payload_size: int) -> None:
        self.conn = conn
        self.timings = conn.timings
        self.topic = topic
        self.qos = qos
        self.payload = b"x" * max(payload_size - 8, 0)

    @property
    def failure(self) -> str | None:
        return self.conn.failure

    @property
    def acked(self) -> int:
        return self.conn.proto.acked

    def take_ack_latencies(self) -> list[float]:
        taken, self.conn.proto.ack_latencies = self.conn.proto.ack_latencies, []
        return taken

    async def send(self, seq: int) -> None:
        self.conn.publish(self.topic, seq.to_bytes(8, "big") + self.payload, self.qos)
        await self.conn.drain()

    async def keepalive(self) -> None:
        self.conn.ping()
        await self.conn.drain()

    async def close(self) -> None:
        await self.conn.disconnect()

    def abort(self) -> None:
        self.conn.abort()


class CoreDriver:
    """``mqtt``: the core listener (8883), ClientId = certificate CN."""

    def __init__(self, options: DriverOptions) -> None:
        self.options = options
        self._contexts: dict[str, ssl.SSLContext] = {}

    def username(self, device: Device) -> str | None:
        return None

    def context(self, device: Device) -> ssl.SSLContext:
        ctx = self._contexts.get(device.device_id)
        if ctx is None:
            ctx = self._contexts[device.device_id] = client_context(device, self.options)
        return ctx

    async def connect(self, device: Device) -> MqttSession:
        o = self.options
        conn = await open_mqtt(
            o.host,
            o.port,
            self.context(device),
            client_id=device.device_id,
            username=self.username(device),
            keepalive=o.keepalive,
            connect_timeout=o.connect_timeout,
            server_hostname=o.server_name,
        )
        topic = o.topic.replace("{device}", device.device_id)
        return MqttSession(conn, topic, o.qos, o.payload_size)


class ServiceDriver(CoreDriver):
    """``mqtt-service``: the service listener (9883), username = tenant id."""

    def __init__(self, options: DriverOptions) -> None:
        if not options.tenant:
            raise ValueError("protocol mqtt-service needs the tenant id (--tenant)")
        super().__init__(options)

    def username(self, device: Device) -> str | None:
        return self.options.tenant
