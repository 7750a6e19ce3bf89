"""MQTT backends against real brokers: the in-process amqtt one and a mosquitto.

The tests speak MQTT through :class:`BackendConnection` with the project's own
sans-IO codec. Everything runs on 127.0.0.1 and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from protocols.mqtt import backends
from protocols.mqtt.backend import BackendConnection
from protocols.mqtt.backends import (
    BackendError,
    BackendUnavailable,
    EmbeddedBackend,
    UpstreamBackend,
    make_backend,
)
from protocols.mqtt.codec import (
    EMPTY_PROPERTIES,
    Connack,
    Connect,
    Disconnect,
    MqttDecoder,
    Packet,
    Pingreq,
    Pingresp,
    Properties,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    SubscriptionOptions,
    Will,
    encode,
)

TIMEOUT = 5.0
P = TypeVar("P")

MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None
)
needs_mosquitto = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")


# --------------------------------------------------------------------------
# A tiny MQTT client over a BackendConnection
# --------------------------------------------------------------------------


class Client:
    def __init__(self, conn: BackendConnection, version: int = 4) -> None:
        self.conn = conn
        self.version = version
        self.decoder = MqttDecoder(protocol_version=version)
        self.pending: deque[Packet] = deque()
        self.stash: deque[Packet] = deque()
        self.awaiting_rel: set[int] = set()
        self.next_id = 1

    def pid(self) -> int:
        self.next_id += 1
        return self.next_id

    async def send(self, packet: Packet) -> None:
        self.conn.write(encode(packet, self.version))
        await asyncio.wait_for(self.conn.drain(), TIMEOUT)

    async def recv(self) -> Packet | None:
        """Next packet, ``None`` at EOF."""
        while not self.pending:
            data = await asyncio.wait_for(self.conn.read(), TIMEOUT)
            if not data:
                return None
            self.pending.extend(self.decoder.feed(data))
        return self.pending.popleft()

    async def expect(self, kind: type[P]) -> P:
        packet = await self.recv()
        assert isinstance(packet, kind), f"expected {kind.__name__}, got {packet!r}"
        return packet

    async def expect_eof(self) -> None:
        packet = await self.recv()
        assert packet is None, f"expected EOF, got {packet!r}"

    async def connect(self, client_id: str, **kwargs: Any) -> Connack:
        await self.send(Connect(client_id, protocol_level=self.version, **kwargs))
        connack = await self.expect(Connack)
        assert connack.reason_code == 0, connack
        return connack

    async def subscribe(self, topic_filter: str, qos: int = 2, **kwargs: Any) -> Suback:
        pid = self.pid()
        opts = SubscriptionOptions(qos, **kwargs)
        await self.send(Subscribe(pid, ((topic_filter, opts),)))
        suback = await self.expect(Suback)
        assert suback.packet_id == pid
        return suback

    async def _ack(self, kind: type[P], packet_id: int) -> P:
        """Wait for an acknowledgement; PUBLISH/PUBREL seen meanwhile are kept."""
        while True:
            packet = await self.recv()
            if isinstance(packet, kind) and getattr(packet, "packet_id", None) == packet_id:
                return packet
            assert isinstance(packet, Publish | Pubrel), f"unexpected {packet!r}"
            self.stash.append(packet)

    async def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 0,
        *,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> None:
        """Publish and run the whole QoS 1/2 flow."""
        pid = self.pid() if qos else None
        props = EMPTY_PROPERTIES if properties is None else properties
        await self.send(Publish(topic, payload, qos, retain, packet_id=pid, properties=props))
        if pid is not None and qos == 1:
            await self._ack(Puback, pid)
        elif pid is not None and qos == 2:
            await self._ack(Pubrec, pid)
            await self.send(Pubrel(pid))
            await self._ack(Pubcomp, pid)

    async def _incoming(self) -> Packet | None:
        return self.stash.popleft() if self.stash else await self.recv()

    async def message(self) -> Publish:
        """Next PUBLISH, acknowledged (QoS 2: PUBREC now, PUBCOMP on PUBREL)."""
        while True:
            packet = await self._incoming()
            if isinstance(packet, Pubrel):
                assert packet.packet_id in self.awaiting_rel, packet
                self.awaiting_rel.remove(packet.packet_id)
                await self.send(Pubcomp(packet.packet_id))
                continue
            assert isinstance(packet, Publish), f"expected PUBLISH, got {packet!r}"
            if packet.qos == 1:
                assert packet.packet_id is not None
                await self.send(Puback(packet.packet_id))
            elif packet.qos == 2:
                assert packet.packet_id is not None
                await self.send(Pubrec(packet.packet_id))
                self.awaiting_rel.add(packet.packet_id)
            return packet

    async def finish_qos2(self) -> None:
        """Complete every open QoS 2 delivery (PUBREL -> PUBCOMP)."""
        while self.awaiting_rel:
            packet = await self._incoming()
            assert isinstance(packet, Pubrel), f"expected PUBREL, got {packet!r}"
            self.awaiting_rel.remove(packet.packet_id)
            await self.send(Pubcomp(packet.packet_id))

    async def ping(self) -> None:
        """Round trip: the broker has read everything sent before."""
        await self.send(Pingreq())
        await self.expect(Pingresp)


async def client(backend: Any, client_id: str, version: int = 4, **kwargs: Any) -> Client:
    c = Client(await asyncio.wait_for(backend.connect(), TIMEOUT), version)
    await c.connect(client_id, **kwargs)
    return c


async def eventually(predicate: Any, what: str) -> None:
    """Poll ``predicate`` (bounded): for broker-internal state with no event."""
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def wait_accepting(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited: {log.read_text(errors='replace')}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.01)  # retry; bounded by the caller's wait_for
            continue
        writer.close()
        await writer.wait_closed()
        return


@pytest.fixture
async def mosquitto(tmp_path: Path) -> AsyncIterator[tuple[str, int]]:
    assert MOSQUITTO is not None
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    log = tmp_path / "mosquitto.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT)
    try:
        await asyncio.wait_for(wait_accepting(port, proc, log), TIMEOUT)
        yield "127.0.0.1", port
    finally:
        proc.terminate()
        try:
            proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(TIMEOUT)


@pytest.fixture
async def embedded_backend() -> AsyncIterator[EmbeddedBackend]:
    backend = EmbeddedBackend()
    await asyncio.wait_for(backend.start(), TIMEOUT)
    yield backend
    await asyncio.wait_for(backend.stop(), TIMEOUT)


@pytest.fixture
async def upstream_backend(mosquitto: tuple[str, int]) -> AsyncIterator[UpstreamBackend]:
    host, port = mosquitto
    backend = UpstreamBackend(host, port, connect_timeout=TIMEOUT)
    await asyncio.wait_for(backend.start(), TIMEOUT)
    yield backend
    await asyncio.wait_for(backend.stop(), TIMEOUT)


@pytest.fixture(
    params=[
        "embedded",
        pytest.param("upstream", marks=needs_mosquitto),
    ]
)
def backend(request: pytest.FixtureRequest) -> Iterator[Any]:
    yield request.getfixturevalue(f"{request.param}_backend")


# --------------------------------------------------------------------------
# Both backends, MQTT 3.1.1
# --------------------------------------------------------------------------


async def test_publish_qos_0_1_2(backend: Any) -> None:
    a = await client(backend, "a")
    b = await client(backend, "b")
    suback = await b.subscribe("t/#", qos=2)
    assert suback.reason_codes == (2,)

    for qos in (0, 1, 2):
        await a.publish(f"t/{qos}", f"m{qos}".encode(), qos)
    got = {}
    for _ in range(3):
        msg = await b.message()
        got[msg.topic] = msg
    await b.finish_qos2()
    assert {t: m.payload for t, m in got.items()} == {"t/0": b"m0", "t/1": b"m1", "t/2": b"m2"}
    assert not any(m.retain for m in got.values())
    if backend.name == "upstream":
        # mosquitto delivers at min(publish QoS, subscription QoS)...
        assert [got[f"t/{q}"].qos for q in (0, 1, 2)] == [0, 1, 2]
    else:
        # ...amqtt at the subscription's QoS (an amqtt quirk, harmless here).
        assert [got[f"t/{q}"].qos for q in (0, 1, 2)] == [2, 2, 2]
    await a.send(Disconnect())
    await b.send(Disconnect())


async def test_retained_message_reaches_later_subscriber(backend: Any) -> None:
    witness = await client(backend, "witness")
    await witness.subscribe("r/#", qos=1)
    a = await client(backend, "a")
    await a.publish("r/state", b"on", 1, retain=True)
    live = await witness.message()
    assert (live.topic, live.payload, live.retain) == ("r/state", b"on", False)

    late = await client(backend, "late")
    await late.subscribe("r/#", qos=1)
    msg = await late.message()
    assert (msg.topic, msg.payload, msg.retain) == ("r/state", b"on", True)


async def test_retained_messages_only_for_own_subscriptions(backend: Any) -> None:
    # amqtt 0.12 alone sends a new session the retained messages of every
    # filter *anyone* subscribed to: across tenants on a shared broker.
    other_tenant = await client(backend, "tenant-a/dev")
    await other_tenant.subscribe("tenant-a/#", qos=1)
    await other_tenant.publish("tenant-a/secret", b"s3cret", 1, retain=True)
    assert (await other_tenant.message()).payload == b"s3cret"

    dev = await client(backend, "tenant-b/dev")
    await dev.subscribe("tenant-b/#", qos=1)
    await dev.ping()  # nothing else may arrive before the PINGRESP
    dev.conn.close()

    again = await client(backend, "tenant-b/dev", clean_start=False)
    await again.ping()


async def test_will_published_on_close_without_disconnect(backend: Any) -> None:
    watcher = await client(backend, "watcher")
    await watcher.subscribe("will/#", qos=1)

    dev = await client(backend, "dev", will=Will("will/dev", b"gone", qos=1))
    dev.conn.close()  # no DISCONNECT: unclean
    msg = await watcher.message()
    assert (msg.topic, msg.payload) == ("will/dev", b"gone")


async def test_no_will_after_disconnect(backend: Any) -> None:
    watcher = await client(backend, "watcher")
    await watcher.subscribe("will/#", qos=1)

    dev = await client(backend, "dev", will=Will("will/dev", b"gone", qos=1))
    await dev.send(Disconnect())
    await dev.expect_eof()  # the broker closes after DISCONNECT, will discarded
    dev.conn.close()

    other = await client(backend, "other")
    await other.publish("will/sentinel", b"s", 1)
    msg = await watcher.message()
    assert msg.topic == "will/sentinel"


async def test_close_frees_session_and_client_id_can_reconnect(backend: Any) -> None:
    first = await client(backend, "dev")
    await first.subscribe("x/#", qos=1)
    first.conn.close()
    first.conn.close()  # idempotent
    assert await asyncio.wait_for(first.conn.read(), TIMEOUT) == b""
    first.conn.write(b"ignored after close")

    if backend.name == "embedded":
        sessions = backend.broker.sessions

        def released() -> bool:
            entry = sessions.get("dev")
            return entry is None or entry[0].transitions.state == "disconnected"

        await eventually(released, "amqtt to release the session")

    again = await client(backend, "dev")
    await again.subscribe("x/#", qos=1)
    await again.publish("x/1", b"hello", 1)
    msg = await again.message()
    assert (msg.topic, msg.payload) == ("x/1", b"hello")


async def test_persistent_session_queues_while_offline(backend: Any) -> None:
    dev = await client(backend, "dev", clean_start=False)
    await dev.subscribe("q/#", qos=1)
    await dev.send(Disconnect())
    await dev.expect_eof()
    dev.conn.close()

    pub = await client(backend, "pub")
    await pub.publish("q/1", b"while offline", 1)
    await pub.ping()

    back = Client(await backend.connect())
    connack = await back.connect("dev", clean_start=False)
    assert connack.session_present
    msg = await back.message()
    assert (msg.topic, msg.payload) == ("q/1", b"while offline")


async def test_broker_close_reads_as_eof(backend: Any) -> None:
    c = await client(backend, "dev")
    await c.send(Disconnect())
    assert await asyncio.wait_for(c.conn.read(), TIMEOUT) == b""
    assert await asyncio.wait_for(c.conn.read(), TIMEOUT) == b""
    c.conn.close()


async def test_stop_closes_open_connections(backend: Any) -> None:
    c = await client(backend, "dev")
    assert backend.open_connections == 1
    await asyncio.wait_for(backend.stop(), TIMEOUT)
    assert await asyncio.wait_for(c.conn.read(), TIMEOUT) == b""
    assert backend.open_connections == 0
    with pytest.raises(BackendError):
        await backend.connect()


# --------------------------------------------------------------------------
# Embedded only
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "connect",
    [
        Connect("v5", protocol_level=5),
        Connect(
            "v5",
            protocol_level=5,
            will=Will("w", b"x", properties=Properties(will_delay_interval=5)),
            properties=Properties(session_expiry_interval=30, receive_maximum=10),
        ),
    ],
    ids=["bare", "with-properties"],
)
async def test_embedded_refuses_v5_connect(
    embedded_backend: EmbeddedBackend, connect: Connect
) -> None:
    # amqtt alone answers a property-less v5 CONNECT with CONNACK 0x01 but waits
    # forever on one with properties (it parses it as 3.1.1); the backend
    # refuses every non-3.1.1 CONNECT itself, before amqtt sees it.
    conn = await embedded_backend.connect()
    conn.write(encode(connect, 5))
    c = Client(conn, version=4)
    connack = await c.expect(Connack)
    assert (connack.session_present, connack.reason_code) == (False, 1)
    await c.expect_eof()
    with pytest.raises(ConnectionResetError):
        await conn.drain()
    conn.close()
    assert not embedded_backend._tasks  # no amqtt session was started

    ok = await client(embedded_backend, "v311")  # the broker is unaffected
    await ok.ping()


async def test_embedded_refuses_mqtt_3_1_and_drops_garbage(
    embedded_backend: EmbeddedBackend,
) -> None:
    conn = await embedded_backend.connect()
    c = Client(conn, version=3)
    conn.write(encode(Connect("old", protocol_level=3), 3))
    assert (await c.expect(Connack)).reason_code == 1
    await c.expect_eof()

    conn = await embedded_backend.connect()
    conn.write(b"\x30\x05\x00\x01tab")  # a PUBLISH first: closed, no answer
    assert await asyncio.wait_for(conn.read(), TIMEOUT) == b""
    conn.close()


async def test_embedded_close_before_connect(embedded_backend: EmbeddedBackend) -> None:
    conn = await embedded_backend.connect()
    conn.write(b"\x10")  # a CONNECT started, then the device went away
    conn.close()
    assert await asyncio.wait_for(conn.read(), TIMEOUT) == b""
    assert embedded_backend.open_connections == 0
    assert not embedded_backend._tasks


async def test_embedded_opens_no_socket() -> None:
    psutil = pytest.importorskip("psutil")
    me = psutil.Process()

    def listening() -> set[tuple[Any, ...]]:
        return {c.laddr for c in me.net_connections("all") if c.status == psutil.CONN_LISTEN}

    before = listening()
    backend = EmbeddedBackend()
    await backend.start()
    try:
        c = await client(backend, "dev")
        await c.ping()
        assert listening() == before
    finally:
        await backend.stop()


async def test_embedded_stop_leaves_no_pending_tasks() -> None:
    backend = EmbeddedBackend()
    await backend.start()
    watcher = await client(backend, "watcher")
    await watcher.subscribe("#", qos=1)
    dev = await client(backend, "dev", will=Will("will/dev", b"gone", qos=1))
    await dev.publish("t", b"x", 1)
    await watcher.message()
    half = await backend.connect()
    half.write(b"\x10\x0c")  # a session stuck in the middle of its CONNECT

    await asyncio.wait_for(backend.stop(), TIMEOUT)
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert others == []
    assert backend.broker is None
    for conn in (watcher.conn, dev.conn, half):
        assert await asyncio.wait_for(conn.read(), TIMEOUT) == b""
    with pytest.raises(BackendError):
        await backend.connect()


async def test_embedded_backpressure_towards_slow_reader() -> None:
    limit = 1024
    backend = EmbeddedBackend(pipe_limit=limit)
    await backend.start()
    try:
        slow = await client(backend, "slow")
        await slow.subscribe("bulk", qos=0)
        pub = await client(backend, "pub")
        payload = b"p" * 300
        packet_size = len(encode(Publish("bulk", payload), 4))
        for _ in range(40):
            await pub.publish("bulk", payload, 0)
        await pub.ping()

        conn = slow.conn
        assert isinstance(conn, backends._EmbeddedConnection)
        await eventually(lambda: conn.queued_to_gateway >= limit, "the pipe to fill")
        for _ in range(20):  # give amqtt every chance to overfill it
            await asyncio.sleep(0)
        assert conn.queued_to_gateway <= limit + packet_size

        for _ in range(40):  # nothing was lost: amqtt waited in drain()
            msg = await slow.message()
            assert msg.payload == payload
            assert conn.queued_to_gateway <= limit + packet_size
    finally:
        await backend.stop()


async def test_pipe_drain_waits_above_limit() -> None:
    pipe = backends._Pipe(limit=10)
    pipe.write(b"x" * 25)
    waiter = asyncio.ensure_future(pipe.wait_space())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not waiter.done()
    assert await pipe.read_exactly(10) == b"x" * 10
    for _ in range(5):
        await asyncio.sleep(0)
    assert not waiter.done()  # 15 bytes still queued
    assert await pipe.read_some(100) == b"x" * 15
    await asyncio.wait_for(waiter, TIMEOUT)

    # A packet larger than the limit is consumed as it arrives (no deadlock).
    reader = asyncio.ensure_future(pipe.read_exactly(40))
    for i in range(4):
        pipe.write(bytes([i]) * 10)
        await asyncio.wait_for(pipe.wait_space(), TIMEOUT)
    assert await asyncio.wait_for(reader, TIMEOUT) == b"".join(bytes([i]) * 10 for i in range(4))

    pipe.write(b"abc")
    pipe.feed_eof()
    assert await pipe.read_exactly(5) == b"abc"  # short read only at EOF
    assert await pipe.read_some(5) == b""


async def test_embedded_connect_before_start() -> None:
    with pytest.raises(BackendError):
        await EmbeddedBackend().connect()


# --------------------------------------------------------------------------
# Upstream only
# --------------------------------------------------------------------------


@needs_mosquitto
async def test_upstream_mqtt5_round_trip(upstream_backend: UpstreamBackend) -> None:
    sub = Client(await upstream_backend.connect(), version=5)
    connack = await sub.connect("sub5", properties=Properties(session_expiry_interval=0))
    assert connack.reason_code == 0
    suback = await sub.subscribe("v5/#", qos=1, no_local=True)
    assert suback.reason_codes == (1,)

    pub = Client(await upstream_backend.connect(), version=5)
    await pub.connect("pub5")
    props = Properties(user_properties=(("k", "v"),), content_type="text/plain")
    await pub.publish("v5/a", b"five", 1, properties=props)
    msg = await sub.message()
    assert (msg.topic, msg.payload, msg.qos) == ("v5/a", b"five", 1)
    assert msg.properties.user_properties == (("k", "v"),)
    assert msg.properties.content_type == "text/plain"
    await pub.send(Disconnect())
    await sub.send(Disconnect())


async def test_upstream_start_against_closed_port_fails_fast() -> None:
    backend = UpstreamBackend("127.0.0.1", free_port(), connect_timeout=TIMEOUT)
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match=r"127\.0\.0\.1:\d+") as info:
        await asyncio.wait_for(backend.start(), TIMEOUT)
    assert time.monotonic() - started < 1.0
    assert isinstance(info.value, OSError)
    with pytest.raises(BackendUnavailable):
        await asyncio.wait_for(backend.connect(), TIMEOUT)


@needs_mosquitto
async def test_upstream_broker_going_away(mosquitto: tuple[str, int]) -> None:
    backend = UpstreamBackend(*mosquitto, connect_timeout=TIMEOUT)
    c = await client(backend, "dev")
    await c.ping()
    # A second connection with the same client id takes the session over:
    # mosquitto closes the first one, which must read as EOF.
    await client(backend, "dev")
    assert await asyncio.wait_for(c.conn.read(), TIMEOUT) == b""
    await backend.stop()


# --------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------


def test_make_backend() -> None:
    embedded = make_backend("embedded", host="ignored", port=0, connect_timeout=1.0)
    assert isinstance(embedded, EmbeddedBackend)
    assert embedded.name == "embedded"
    upstream = make_backend("upstream", host="127.0.0.1", port=1883, connect_timeout=2.5)
    assert isinstance(upstream, UpstreamBackend)
    assert (upstream.name, upstream.host, upstream.port) == ("upstream", "127.0.0.1", 1883)
    assert upstream.connect_timeout == 2.5
    with pytest.raises(ValueError):
        make_backend("nope", host="", port=0, connect_timeout=1.0)  # type: ignore[arg-type]
