"""The gateway's own short MQTT sessions with the backend: publish, read retained.

HTTP devices send into the same bus as MQTT devices (``POST /topics/...``) and
read retained state (``GET /topics/...``). Each call opens one backend
connection (:meth:`~protocols.mqtt.backend.Backend.connect`), speaks MQTT 3.1.1
with the sans-IO codec and disconnects: no shared connection to reconnect, no
state to go stale, and it works the same with the embedded and an upstream
broker. The caller passes topics already mounted in the tenant's namespace and
a client id ``<tenant>:http-<device>-<random>`` (unique, so two calls never take
over each other's session). Callers bound a call with ``asyncio.timeout``.

Reading a retained message: SUBSCRIBE to the exact topic, then SUBSCRIBE to a
*fence* topic outside every tenant's namespace (``_gateway.fence/<random>``:
tenant ids cannot contain ``.``). Brokers handle one connection's packets in
order and send a subscription's retained messages before they handle the next
SUBSCRIBE (mosquitto queues them with the SUBACK; amqtt awaits them before
reading the next subscription), so the fence's SUBACK means "no retained
message follows". A message that arrives without the retain flag is live
traffic and is ignored.

Publishing ends with the same fence before DISCONNECT: amqtt hands a PUBLISH
(and sends its PUBACK) before its session loop has routed it, and drops it if
DISCONNECT wins that race; the fence's SUBACK comes from that loop, after the
message was routed (and retained).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass

from protocols.mqtt.backend import Backend, BackendConnection
from protocols.mqtt.codec import (
    Connack,
    Connect,
    Disconnect,
    MqttDecoder,
    MqttProtocolError,
    Packet,
    Puback,
    Publish,
    Suback,
    Subscribe,
    SubscriptionOptions,
    encode,
)

__all__ = ["BusError", "BusSession", "RetainedMessage", "publish", "read_retained"]

_VERSION = 4  # 3.1.1: what every backend speaks, the embedded amqtt included
_FENCE_PREFIX = "_gateway.fence/"


class BusError(OSError):
    """The broker refused or broke the exchange (unreachable, CONNACK refused, bad bytes)."""


@dataclass(frozen=True, slots=True)
class RetainedMessage:
    topic: str
    payload: bytes
    qos: int


@dataclass(frozen=True, slots=True)
class BusSession:
    """How the gateway logs in to the backend for one call."""

    client_id: str
    username: str | None = None
    password: bytes | None = None
    max_packet_size: int = 256 * 1024
    """Largest packet accepted from the broker (a bigger retained message is a BusError)."""


class _Client:
    def __init__(self, conn: BackendConnection, max_packet_size: int) -> None:
        self.conn = conn
        self.decoder = MqttDecoder(max_packet_size, _VERSION, server=False)
        self.queue: list[Packet] = []
        self.next_id = 0

    def packet_id(self) -> int:
        self.next_id = self.next_id % 65535 + 1
        return self.next_id

    async def send(self, packet: Packet) -> None:
        self.conn.write(encode(packet, _VERSION))
        await self.conn.drain()

    async def receive(self) -> Packet:
        while not self.queue:
            data = await self.conn.read()
            if not data:
                raise BusError("the broker closed the connection")
            try:
                self.queue.extend(self.decoder.feed(data))
            except MqttProtocolError as exc:
                raise BusError(f"the broker sent invalid MQTT: {exc.message}") from None
        return self.queue.pop(0)

    async def login(self, session: BusSession) -> None:
        await self.send(
            Connect(
                session.client_id,
                _VERSION,
                clean_start=True,
                keepalive=0,  # the session lasts one call
                username=session.username,
                password=session.password if session.username is not None else None,
            )
        )
        packet = await self.receive()
        if not isinstance(packet, Connack) or packet.reason_code != 0:
            code = packet.reason_code if isinstance(packet, Connack) else "no CONNACK"
            raise BusError(f"the broker refused the gateway's session ({code})")

    async def fence(self, after: Callable[[Packet], None] = lambda _p: None) -> None:
        """Subscribe to a topic no one publishes to and wait for its SUBACK; every
        packet the broker sends before it goes to ``after``."""
        pid = self.packet_id()
        topic = _FENCE_PREFIX + secrets.token_hex(8)
        await self.send(Subscribe(pid, ((topic, SubscriptionOptions(qos=0)),)))
        while True:
            packet = await self.receive()
            if isinstance(packet, Suback) and packet.packet_id == pid:
                return
            after(packet)

    async def logout(self) -> None:
        await self.send(Disconnect())


async def _run(
    backend: Backend, session: BusSession, topic: str, op: _Op
) -> RetainedMessage | None:
    conn = await backend.connect()
    try:
        client = _Client(conn, session.max_packet_size)
        await client.login(session)
        result = await op.run(client, topic)
        await client.logout()
        return result
    except (ConnectionError, MqttProtocolError) as exc:
        raise BusError(str(exc)) from None
    finally:
        conn.close()


class _Op:
    async def run(self, client: _Client, topic: str) -> RetainedMessage | None:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class _Publish(_Op):
    payload: bytes
    qos: int
    retain: bool

    async def run(self, client: _Client, topic: str) -> RetainedMessage | None:
        pid = client.packet_id() if self.qos else None
        await client.send(Publish(topic, self.payload, self.qos, self.retain, packet_id=pid))
        acked = self.qos == 0

        def seen(packet: Packet) -> None:
            nonlocal acked
            acked = acked or (isinstance(packet, Puback) and packet.packet_id == pid)

        await client.fence(seen)
        while not acked:  # a broker may answer the fence before the PUBACK
            seen(await client.receive())
        return None


class _ReadRetained(_Op):
    async def run(self, client: _Client, topic: str) -> RetainedMessage | None:
        pid = client.packet_id()
        await client.send(Subscribe(pid, ((topic, SubscriptionOptions(qos=0)),)))
        found: RetainedMessage | None = None
        refused = False

        def seen(packet: Packet) -> None:
            nonlocal found, refused
            if isinstance(packet, Suback) and packet.packet_id == pid:
                refused = not packet.reason_codes or packet.reason_codes[0] >= 0x80
            elif isinstance(packet, Publish) and packet.topic == topic and packet.retain:
                found = RetainedMessage(packet.topic, packet.payload, packet.qos)

        await client.fence(seen)
        if refused:
            raise BusError("the broker refused the subscription")
        return found


async def publish(
    backend: Backend,
    session: BusSession,
    topic: str,
    payload: bytes,
    *,
    qos: int,
    retain: bool,
) -> None:
    """Publish once (QoS 0 or 1; QoS 1 returns after the broker's PUBACK).

    Raises :class:`BusError` (an ``OSError``, as are connection failures).
    """
    if qos not in (0, 1):
        raise ValueError("qos must be 0 or 1")
    await _run(backend, session, topic, _Publish(payload, qos, retain))


async def read_retained(
    backend: Backend, session: BusSession, topic: str
) -> RetainedMessage | None:
    """The retained message of ``topic`` (an exact topic name), or None.

    Raises :class:`BusError` (an ``OSError``, as are connection failures).
    """
    return await _run(backend, session, topic, _ReadRetained())
