"""``gateway.tls.TlsTransport`` over real sockets on 127.0.0.1, on uvloop and on
the stdlib asyncio loop.

A :class:`~gateway.tls.TlsListener` with a real :class:`~gateway.trust_state.TrustState`
(SQLite store, one tenant trusting the test root) hands authenticated
connections to a recording protocol. The clients are real TLS stacks: the
loop's own TLS streams (``asyncio.open_connection(ssl=...)``), a sans-IO client
(``ssl.SSLObject`` over a plain non-blocking socket) for byte-exact control of
what goes on the wire (records coalesced with the last handshake flight, no
close_notify, garbage, nothing read), and ``openssl s_client`` for a non-Python
stack with renegotiation and key updates.

Every test runs under a hard timeout, installs an exception handler on its loop
and wraps the TLS transport's callbacks, and fails if anything reached that
handler or was raised out of a callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
import uvloop

from gateway import operations
from gateway import tls as gtls
from gateway.metrics import GatewayMetrics
from gateway.pki import make_ca
from gateway.store.sqlite import SqliteStore
from gateway.trust_state import TrustState
from tests.helpers import Pki
from trust.model import DeviceIdentity, Listener, Reason, Registration, Rejection, Status
from trust.policy import DecisionPolicy

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": uvloop.new_event_loop,
    "asyncio": asyncio.SelectorEventLoop,  # the stdlib loop, whatever the policy
}
TLS12, TLS13 = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3
VERSIONS = pytest.mark.parametrize("version", [TLS12, TLS13], ids=["tls12", "tls13"])
SLICE = gtls.RECORD_SLICE
WAIT = 5.0
"""Upper bound of any single wait (every test also has an overall bound)."""

_TlsTransport = gtls.TlsTransport  # the class under test (tests swap in a watched subclass)


# material ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Material:
    pki: Pki
    device: tuple[Path, Path]
    """A device of the trusted root (auto-registration on): accepted as ``dev-1``."""
    stranger: tuple[Path, Path]
    """A device of a CA nobody trusts."""
    expired: tuple[Path, Path]
    """A device of the trusted root whose certificate expired yesterday."""
    disabled: tuple[Path, Path]
    """A device of the trusted root whose device user is disabled (``dev-off``)."""

    @property
    def cafile(self) -> str:
        return str(self.pki.dir / "server-ca.pem")


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> Material:
    pki = Pki.create(tmp_path_factory.mktemp("tls-pki"))
    now = datetime.now(UTC)
    device = pki.device("dev-1")
    stranger = pki.device("stranger", issuer=make_ca("Stranger CA"))
    expired = pki.device(
        "old", not_before=now - timedelta(days=30), not_after=now - timedelta(days=1)
    )
    disabled = pki.device("dev-off")
    return Material(pki, device[:2], stranger[:2], expired[:2], disabled[:2])


def client_context(
    material: Material,
    cert: tuple[Path, Path] | None,
    version: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    """A client context that verifies the gateway (server CA, 127.0.0.1/localhost)."""
    ctx = ssl.create_default_context(cafile=material.cafile)
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    return ctx


# the front-end's protocol -------------------------------------------------------------


class App(asyncio.Protocol):
    """Records every callback the TLS transport makes."""

    def __init__(self, peer: gtls.TlsPeer) -> None:
        self.peer = peer
        self.transport: gtls.TlsTransport | None = None
        self.events: list[str] = []
        self.data = bytearray()
        self.reads = 0
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.on_made: Callable[[App], None] | None = None
        self.on_data: Callable[[App, bytes], None] | None = None

    @property
    def t(self) -> gtls.TlsTransport:
        assert self.transport is not None
        return self.transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(gtls.TlsTransport, transport)
        self.events.append("made")
        if self.on_made is not None:
            self.on_made(self)

    def data_received(self, data: bytes) -> None:
        assert "lost" not in self.events
        if not self.events or self.events[-1] != "data":
            self.events.append("data")
        self.data += data
        self.reads += 1
        if self.on_data is not None:
            self.on_data(self, data)

    def eof_received(self) -> bool:
        self.events.append("eof")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")
        assert not self.lost.done(), "connection_lost twice"
        self.lost.set_result(exc)

    def pause_writing(self) -> None:
        self.events.append("pause_writing")

    def resume_writing(self) -> None:
        self.events.append("resume_writing")

    async def received(self, n: int, timeout: float = WAIT) -> bytes:
        await until(lambda: len(self.data) >= n, timeout, f"{n} bytes (have {len(self.data)})")
        return bytes(self.data)

    async def lost_within(self, timeout: float = 2.0) -> Exception | None:
        return await asyncio.wait_for(asyncio.shield(self.lost), timeout)


async def until(pred: Callable[[], bool], timeout: float = WAIT, what: str = "") -> None:
    async def poll() -> None:
        while not pred():
            await asyncio.sleep(0.005)

    try:
        await asyncio.wait_for(poll(), timeout)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout} s waiting for {what or pred}") from None


# clients -------------------------------------------------------------------------------


class MemClient:
    """A TLS client as bytes: ``ssl.SSLObject`` and two memory BIOs over a plain
    non-blocking socket, so the test decides what goes on the wire and when."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext | None) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.inc = ssl.MemoryBIO()
        self.out = ssl.MemoryBIO()
        self.obj = (
            ctx.wrap_bio(self.inc, self.out, server_hostname="localhost")
            if ctx is not None
            else None
        )
        self.plain = bytearray()
        self.ended: str | None = None
        """How the server's side ended as seen so far: close_notify, eof or reset."""

    @property
    def tls(self) -> ssl.SSLObject:
        assert self.obj is not None
        return self.obj

    async def send_raw(self, data: bytes) -> None:
        await asyncio.wait_for(self.loop.sock_sendall(self.sock, data), WAIT)

    async def recv_raw(self, timeout: float = WAIT) -> bytes:
        return await asyncio.wait_for(self.loop.sock_recv(self.sock, 1 << 18), timeout)

    def client_hello(self) -> bytes:
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.do_handshake()
        return self.out.read()

    async def handshake(self, *, flush_last: bool = True) -> None:
        """Run the handshake; with ``flush_last=False`` the client's last flight
        stays in the outgoing BIO (it goes with the next :meth:`send`)."""

        async def go() -> None:
            while True:
                try:
                    self.tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    pass
                if self.out.pending:
                    await self.send_raw(self.out.read())
                data = await self.recv_raw()
                if not data:
                    raise ConnectionResetError("EOF during the handshake")
                self.inc.write(data)
            if flush_last and self.out.pending:
                await self.send_raw(self.out.read())

        await asyncio.wait_for(go(), WAIT)

    def seal(self, *records: bytes) -> bytes:
        """Each argument as its own TLS record(s): the ciphertext (with anything
        still pending in the outgoing BIO before it), not sent."""
        for record in records:
            self.tls.write(record)
        return self.out.read()

    async def send(self, *records: bytes) -> None:
        await self.send_raw(self.seal(*records))

    def _decrypt(self) -> None:
        while self.ended is None:
            try:
                chunk = self.tls.read(1 << 16)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLZeroReturnError:
                chunk = b""
            if not chunk:
                self.ended = "close_notify"
                return
            self.plain += chunk

    async def _feed(self, timeout: float) -> None:
        try:
            raw = await self.recv_raw(timeout)
        except ConnectionResetError:
            self.ended = "reset"
            return
        if not raw:
            self.ended = "eof"
            return
        self.inc.write(raw)
        self._decrypt()

    async def read(self, n: int, timeout: float = WAIT) -> bytes:
        """Exactly ``n`` bytes of plaintext."""

        async def go() -> None:
            while len(self.plain) < n:
                if self.ended is not None:
                    raise EOFError(f"{self.ended} after {len(self.plain)} of {n} bytes")
                await self._feed(WAIT)

        await asyncio.wait_for(go(), timeout)
        data = bytes(self.plain[:n])
        del self.plain[:n]
        return data

    async def read_to_end(self, timeout: float = WAIT) -> bytes:
        """Plaintext until the server's side ends (close_notify, or TCP EOF/RST)."""

        async def go() -> None:
            while self.ended is None:
                await self._feed(WAIT)

        await asyncio.wait_for(go(), timeout)
        data = bytes(self.plain)
        self.plain.clear()
        return data

    async def tcp_end(self, timeout: float = WAIT) -> str:
        """Wait for the TCP connection's end: ``eof`` or ``reset``."""

        async def go() -> str:
            while True:
                try:
                    raw = await self.recv_raw(WAIT)
                except ConnectionResetError:
                    return "reset"
                if not raw:
                    return "eof"
                if self.obj is not None and self.ended is None:
                    self.inc.write(raw)
                    self._decrypt()

        return await asyncio.wait_for(go(), timeout)

    async def still_open(self, period: float = 0.1) -> bool:
        """True if the server neither sent nor closed anything for ``period``."""
        try:
            raw = await self.recv_raw(period)
        except TimeoutError:
            return True
        except ConnectionResetError:
            return False
        if not raw:
            self.ended = "eof"
        elif self.obj is not None:
            self.inc.write(raw)
            self._decrypt()
        return False

    async def close_notify(self) -> None:
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.unwrap()
        await self.send_raw(self.out.read())

    def reset(self) -> None:
        """Close with a TCP RST (SO_LINGER 0)."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


# the listener under test ------------------------------------------------------------------


class Gate:
    """A TlsListener on 127.0.0.1:0 over a real TrustState, recording its protocols."""

    def __init__(self, material: Material, tmp: Path, handshake_timeout: float) -> None:
        self.material = material
        self.tmp = tmp
        self.handshake_timeout = handshake_timeout
        self.apps: list[App] = []
        self.on_made: Callable[[App], None] | None = None
        self.on_data: Callable[[App, bytes], None] | None = None
        self.metrics = GatewayMetrics()
        self.limiter = gtls.ConnectionLimiter(100)
        self._cleanup: list[Callable[[], None]] = []

    async def start(self) -> None:
        self.store = SqliteStore(self.tmp / "gateway.db")
        await self.store.open()
        await self.store.create_tenant("t1")
        root = self.material.pki.root.cert_pem().decode()
        now = datetime.now(UTC)
        await operations.add_trusted_certificate(
            self.store, "t1", root, "root", Status.ENABLED, True, now, "test"
        )
        await self.store.register_device("t1", "dev-off", "test", now)
        await self.store.set_device_enabled("t1", "dev-off", False)
        pki = self.material.pki
        self.trust = TrustState(
            self.store,
            DecisionPolicy(),
            server_cert=pki.dir / "server.pem",
            server_key=pki.dir / "server.key",
        )
        await self.trust.start()
        self.listener = gtls.TlsListener(
            Listener.MQTT_CORE,
            "127.0.0.1",
            0,
            self.trust,
            self._factory,
            metrics=self.metrics,
            limiter=self.limiter,
            rate=gtls.HandshakeRateLimiter(1e9, 1_000_000),
            handshake_timeout=self.handshake_timeout,
        )
        await self.listener.start()

    async def stop(self) -> None:
        for cleanup in self._cleanup:
            with contextlib.suppress(Exception):
                cleanup()
        await self.listener.stop()
        await self.trust.stop()
        await self.store.close()

    def _factory(self, peer: gtls.TlsPeer) -> asyncio.Protocol:
        app = App(peer)
        app.on_made, app.on_data = self.on_made, self.on_data
        self.apps.append(app)
        return app

    @property
    def port(self) -> int:
        return self.listener.bound_port

    def handshakes(self) -> dict[tuple[str, ...], float]:
        return dict(self.metrics.handshakes._values)

    async def app(self, index: int = 0) -> App:
        await until(lambda: len(self.apps) > index, WAIT, "the protocol factory")
        return self.apps[index]

    async def released(self) -> None:
        await until(lambda: self.limiter.active == 0, WAIT, "the connection slots")

    def context(self, cert: str | None, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
        """A client context with ``cert`` (a :class:`Material` field name) or none."""
        paths = cast(tuple[Path, Path], getattr(self.material, cert)) if cert else None
        return client_context(self.material, paths, version)

    async def mem_client(
        self,
        cert: str | None = "device",
        version: ssl.TLSVersion | None = None,
        *,
        tls: bool = True,
        rcvbuf: int | None = None,
    ) -> MemClient:
        sock = socket.socket()
        sock.setblocking(False)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self._cleanup.append(sock.close)
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", self.port)), WAIT)
        return MemClient(sock, self.context(cert, version) if tls else None)

    async def stream_client(
        self, version: ssl.TLSVersion | None = None, cert: str = "device"
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The loop's own TLS client (asyncio streams)."""
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", self.port, ssl=self.context(cert, version)),
            WAIT,
        )
        self._cleanup.append(writer.transport.abort)
        return reader, writer


@contextlib.contextmanager
def _recording(escaped: list[BaseException]) -> Iterator[None]:
    try:
        yield
    except BaseException as exc:
        escaped.append(exc)
        raise


def _watched(escaped: list[BaseException]) -> type[gtls.TlsTransport]:
    """TlsTransport with every callback the TCP transport makes recording what it
    raises (a loop swallows OSError subclasses such as ssl.SSLError silently)."""

    class Watched(_TlsTransport):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            with _recording(escaped):
                super().connection_made(transport)

        def data_received(self, data: bytes) -> None:
            with _recording(escaped):
                super().data_received(data)

        def eof_received(self) -> bool:
            with _recording(escaped):
                return super().eof_received()

        def connection_lost(self, exc: Exception | None) -> None:
            with _recording(escaped):
                super().connection_lost(exc)

        def pause_writing(self) -> None:
            with _recording(escaped):
                super().pause_writing()

        def resume_writing(self) -> None:
            with _recording(escaped):
                super().resume_writing()

    return Watched


class Env:
    def __init__(
        self, loop_name: str, material: Material, tmp: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        self.loop_name = loop_name
        self.material = material
        self.tmp = tmp
        self.monkeypatch = monkeypatch

    def run(
        self,
        main: Callable[[Gate], Awaitable[None]],
        *,
        handshake_timeout: float = 5.0,
        limit: float = 10.0,
    ) -> None:
        """Run ``main(gate)`` on the test's loop under ``limit`` seconds; fail on
        anything that reached the loop's exception handler or escaped a callback."""
        handled: list[dict[str, Any]] = []
        escaped: list[BaseException] = []
        self.monkeypatch.setattr(gtls, "TlsTransport", _watched(escaped))

        async def body() -> None:
            gate = Gate(self.material, self.tmp, handshake_timeout)
            await gate.start()
            try:
                await asyncio.wait_for(main(gate), limit)
            finally:
                await gate.stop()

        with asyncio.Runner(loop_factory=LOOPS[self.loop_name]) as runner:
            runner.get_loop().set_exception_handler(lambda _loop, ctx: handled.append(ctx))
            runner.run(body())
        assert not handled, handled
        assert not escaped, escaped


@pytest.fixture(params=sorted(LOOPS))
def env(
    request: pytest.FixtureRequest,
    material: Material,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Env:
    return Env(request.param, material, tmp_path, monkeypatch)


# handshake ---------------------------------------------------------------------------------


@VERSIONS
def test_handshake_hands_over_peer_and_decision(env: Env, version: ssl.TLSVersion) -> None:
    """The factory gets the peer and the trust decision, then connection_made with
    the TLS transport; the connection outlives the handshake timeout."""

    async def main(gate: Gate) -> None:
        reader, writer = await gate.stream_client(version)
        app = await gate.app()
        port = writer.get_extra_info("sockname")[1]
        assert app.peer.peer == f"127.0.0.1:{port}"
        assert app.peer.listener is Listener.MQTT_CORE
        decision = app.peer.decision
        assert isinstance(decision, DeviceIdentity), decision
        assert (decision.tenant, decision.device_id) == ("t1", "dev-1")
        assert decision.registration is Registration.AUTO
        assert app.events == ["made"]
        t = app.t
        assert not t.is_closing() and t.is_reading()
        sslobj = t.get_extra_info("ssl_object")
        assert isinstance(sslobj, ssl.SSLObject)
        assert sslobj.version() == {TLS12: "TLSv1.2", TLS13: "TLSv1.3"}[version]
        subject = dict(rdn[0] for rdn in t.get_extra_info("peercert")["subject"])
        assert subject["commonName"] == "dev-1"
        assert t.get_extra_info("peername")[1] == port
        assert t.get_extra_info("cipher") is not None
        assert t.get_write_buffer_limits() == (gtls.WRITE_HIGH_WATER // 4, gtls.WRITE_HIGH_WATER)
        assert gate.handshakes() == {("mqtt", "accepted", "ok"): 1}
        assert gate.metrics.handshake_seconds.count("mqtt") == 1
        assert gate.limiter.active == 1
        # the handshake timer was cancelled: the connection lives on past it
        await asyncio.sleep(gate.handshake_timeout * 1.5)
        writer.write(b"ping")
        assert await app.received(4) == b"ping"
        t.write(b"pong")
        assert await asyncio.wait_for(reader.readexactly(4), WAIT) == b"pong"
        assert not t.is_closing() and app.events == ["made", "data"]
        assert gate.handshakes() == {("mqtt", "accepted", "ok"): 1}

    env.run(main, handshake_timeout=0.25)


def test_rejected_decision_is_handed_over_too(env: Env) -> None:
    """A chain OpenSSL accepts but the policy refuses (a disabled device): the
    protocol still gets the connection, with the Rejection to answer (an MQTT
    CONNACK refusal); the handshake is counted with the rejection's reason."""

    async def main(gate: Gate) -> None:
        reader, writer = await gate.stream_client(cert="disabled")
        app = await gate.app()
        decision = app.peer.decision
        assert isinstance(decision, Rejection), decision
        assert decision.reason is Reason.DEVICE_DISABLED and decision.device_id == "dev-off"
        assert gate.handshakes() == {("mqtt", "rejected", "device_disabled"): 1}
        assert app.events == ["made"] and not app.t.is_closing()
        app.t.write(b"refused")
        app.t.close()
        assert await asyncio.wait_for(reader.read(), WAIT) == b"refused"
        writer.close()
        assert await app.lost_within() is None

    env.run(main)


@pytest.mark.parametrize("paused", [False, True], ids=["reading", "paused"])
def test_data_with_the_last_handshake_flight(env: Env, paused: bool) -> None:
    """TLS 1.3: application data in the same TCP segment as the client's Finished
    (an MQTT CONNECT, typically) is delivered right after connection_made, or on
    resume_reading when the protocol paused reading in connection_made."""

    async def main(gate: Gate) -> None:
        if paused:
            gate.on_made = lambda app: app.t.pause_reading()
        client = await gate.mem_client(version=TLS13)
        await client.handshake(flush_last=False)
        await client.send(b"CONNECT")  # Finished + one application record, one send
        app = await gate.app()
        if paused:
            assert await client.still_open(0.1)
            assert app.data == b"" and not app.t.is_reading()
            app.t.resume_reading()
        assert await app.received(7, 2.0) == b"CONNECT"
        assert app.events == ["made", "data"]

    env.run(main)


def test_stalled_handshakes_are_cut_at_the_timeout(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer that says nothing, one that stops inside its ClientHello and one that
    stops after the server's flight are all cut once the handshake timeout expires,
    counted and logged as ``timeout``."""
    caplog.set_level("INFO", logger="mtls_gateway.tls")
    timeout = 0.3

    async def main(gate: Gate) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        silent = await gate.mem_client(tls=False)
        partial = await gate.mem_client()
        hello = partial.client_hello()
        await partial.send_raw(hello[: len(hello) // 2])
        stalled = await gate.mem_client()
        await stalled.send_raw(stalled.client_hello())
        assert await stalled.recv_raw()  # the server's flight; then nothing from us
        ends = await asyncio.gather(*(c.tcp_end(timeout + 2.0) for c in (silent, partial, stalled)))
        elapsed = loop.time() - start
        assert set(ends) <= {"eof", "reset"}
        assert timeout * 0.9 <= elapsed < timeout + 1.5, elapsed
        assert gate.handshakes() == {("mqtt", "rejected", "timeout"): 3}
        assert not gate.apps
        await gate.released()

    env.run(main, handshake_timeout=timeout)
    assert caplog.text.count("reason=timeout") == 3, caplog.text


FAILURES = [
    ("garbage", "tls_error"),
    ("eof_mid_hello", "connection_lost"),
    ("rst_mid_hello", "connection_lost"),
    ("no_cert_tls12", "no_certificate"),
    ("no_cert_tls13", "no_certificate"),
    ("untrusted_tls12", "untrusted"),
    ("untrusted_tls13", "untrusted"),
    ("expired_tls13", "expired"),
]


@pytest.mark.parametrize(("case", "reason"), FAILURES, ids=[c for c, _ in FAILURES])
def test_failed_handshakes_have_clear_reasons(
    env: Env, caplog: pytest.LogCaptureFixture, case: str, reason: str
) -> None:
    """Each failure is cut at once (well before the 5 s handshake timeout), counted
    and logged with its reason, and never reaches a protocol or the loop's handler."""
    caplog.set_level("INFO", logger="mtls_gateway.tls")

    async def main(gate: Gate) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        if case == "garbage":
            client = await gate.mem_client(tls=False)
            await client.send_raw(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n" * 4)
            assert await client.tcp_end(3.0) in ("eof", "reset")
        elif case.endswith("_mid_hello"):
            client = await gate.mem_client()
            hello = client.client_hello()
            await client.send_raw(hello[:20])
            await until(lambda: gate.limiter.active == 1)
            await asyncio.sleep(0.05)  # the partial record is in
            if case.startswith("eof"):
                client.sock.shutdown(socket.SHUT_WR)
                assert await client.tcp_end(3.0) in ("eof", "reset")
            else:
                client.reset()
        else:
            what, _, tls = case.rpartition("_")
            cert = {"no_cert": None, "untrusted": "stranger", "expired": "expired"}[what]
            client = await gate.mem_client(cert, TLS12 if tls == "tls12" else TLS13)
            try:
                await client.handshake()
            except (ssl.SSLError, OSError):
                assert tls == "tls12"  # the server's Finished never came
            else:
                assert tls == "tls13"  # the client is done before the server decides
            assert await client.tcp_end(3.0) in ("eof", "reset")
            assert client.ended is None  # no close_notify: the server cut the connection
        await until(lambda: bool(gate.handshakes()), 3.0, "the failure to be counted")
        assert loop.time() - start < 3.0
        await gate.released()
        assert gate.handshakes() == {("mqtt", "rejected", reason): 1}
        assert not gate.apps

    env.run(main)
    assert f"reason={reason}" in caplog.text, caplog.text


# application data --------------------------------------------------------------------------


@VERSIONS
def test_large_writes_both_ways(env: Env, version: ssl.TLSVersion) -> None:
    """Writes of one record and of many (> 16 KiB, in one write call), bytes,
    bytearray and memoryview, arrive whole and in order in both directions."""

    async def main(gate: Gate) -> None:
        reader, writer = await gate.stream_client(version)
        app = await gate.app()
        up = os.urandom(3 * 1024 * 1024 + 7)
        writer.write(up)
        assert await app.received(len(up)) == up
        sizes = [1, SLICE - 1, SLICE, SLICE + 1, 3 * SLICE - 1, 1_000_003]
        down = [os.urandom(n) for n in sizes]
        app.t.write(down[0])
        app.t.write(bytearray(down[1]))
        app.t.write(memoryview(b"\0" + down[2])[1:])
        for blob in down[3:]:
            app.t.write(blob)
        app.t.writelines([b"line-", b"s"])
        want = b"".join(down) + b"line-s"
        assert await asyncio.wait_for(reader.readexactly(len(want)), WAIT) == want
        assert app.t.get_write_buffer_size() == 0

    env.run(main)


def test_many_tiny_records_both_ways(env: Env) -> None:
    """Thousands of tiny records: all delivered in order; a TCP read full of records
    is one data_received call, not one per record."""

    async def main(gate: Gate) -> None:
        client = await gate.mem_client()
        await client.handshake()
        app = await gate.app()
        msgs = [b"%d," % i for i in range(3000)]
        want = b"".join(msgs)
        await client.send(*msgs)  # 3000 records in one sendall
        assert await app.received(len(want)) == want
        assert app.reads <= 50, app.reads
        for msg in msgs:
            app.t.write(msg)
        assert await client.read(len(want)) == want

    env.run(main)


# closing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("answer", ["close_notify", "fin", "none"])
def test_close_sends_close_notify(env: Env, monkeypatch: pytest.MonkeyPatch, answer: str) -> None:
    """close(): queued data, then close_notify; what is written afterwards is
    dropped. The TCP connection ends as soon as the peer answers (its close_notify
    or a bare FIN), else after SHUTDOWN_TIMEOUT with connection_lost(TimeoutError)."""
    monkeypatch.setattr(gtls, "SHUTDOWN_TIMEOUT", 0.5)

    async def main(gate: Gate) -> None:
        client = await gate.mem_client()
        await client.handshake()
        app = await gate.app()
        app.t.write(b"bye")
        app.t.close()
        assert app.t.is_closing()
        app.t.write(b"dropped")
        app.t.close()  # a second close is harmless
        assert await client.read_to_end() == b"bye"
        assert client.ended == "close_notify"
        assert not app.lost.done()  # waiting for the peer's answer
        if answer == "close_notify":
            await client.close_notify()
        elif answer == "fin":
            client.sock.shutdown(socket.SHUT_WR)
        assert await client.tcp_end(2.0) in ("eof", "reset")
        exc = await app.lost_within(2.0)
        if answer == "none":
            assert isinstance(exc, TimeoutError), exc
        else:
            assert exc is None
        assert app.events == ["made", "lost"]
        await gate.released()

    env.run(main)


def test_close_while_reading_is_paused(env: Env) -> None:
    """close() on a transport whose protocol paused reading still reads: what the
    peer had sent is skipped, its close_notify ends the connection at once (not
    after SHUTDOWN_TIMEOUT)."""

    async def main(gate: Gate) -> None:
        client = await gate.mem_client()
        await client.handshake()
        app = await gate.app()
        app.t.pause_reading()
        await client.send(b"held back")
        assert await client.still_open(0.05)
        app.t.close()
        assert await client.read_to_end() == b""
        assert client.ended == "close_notify"
        await client.close_notify()
        assert await client.tcp_end(2.0) == "eof"
        assert await app.lost_within(2.0) is None
        assert app.data == b"" and app.events == ["made", "lost"]
        await gate.released()

    env.run(main)


@pytest.mark.parametrize("when", ["in_connection_made", "while_paused"])
def test_close_with_records_still_unread(env: Env, when: str) -> None:
    """TLS 1.3: records that came with the client's Finished and were not read yet
    (the protocol closes in connection_made, or paused reading there) are skipped
    by close(): close_notify goes out and the peer's ends the connection."""

    async def main(gate: Gate) -> None:
        if when == "in_connection_made":
            gate.on_made = lambda app: app.t.close()
        else:
            gate.on_made = lambda app: app.t.pause_reading()
        client = await gate.mem_client(version=TLS13)
        await client.handshake(flush_last=False)
        await client.send(b"CONNECT", b"PUBLISH")  # Finished + two records, one send
        app = await gate.app()
        if when == "while_paused":
            assert await client.still_open(0.05)
            app.t.close()
        assert await client.read_to_end() == b""
        assert client.ended == "close_notify"
        await client.close_notify()
        assert await client.tcp_end(2.0) == "eof"
        assert await app.lost_within(2.0) is None
        assert app.data == b"" and app.events == ["made", "lost"]

    env.run(main)


def test_abort_cuts_at_once(env: Env) -> None:
    """abort(): no close_notify, the TCP connection ends, connection_lost(None);
    writes afterwards are dropped."""

    async def main(gate: Gate) -> None:
        client = await gate.mem_client()
        await client.handshake()
        app = await gate.app()
        app.t.abort()
        assert app.t.is_closing()
        app.t.write(b"dropped")
        app.t.close()
        assert await client.read_to_end() == b""
        assert client.ended in ("eof", "reset")
        assert await app.lost_within() is None
        assert app.events == ["made", "lost"]
        await gate.released()

    env.run(main)


@VERSIONS
def test_peer_close_notify_is_an_orderly_end(env: Env, version: ssl.TLSVersion) -> None:
    """The peer's close_notify: data before it, eof_received, our close_notify in
    answer, then the TCP end and connection_lost(None)."""

    async def main(gate: Gate) -> None:
        client = await gate.mem_client(version=version)
        await client.handshake()
        app = await gate.app()
        await client.send(b"last words")
        await client.close_notify()
        assert await app.lost_within() is None
        assert app.data == b"last words"
        assert app.events == ["made", "data", "eof", "lost"]
        assert await client.read_to_end() == b""
        assert client.ended == "close_notify"
        assert await client.tcp_end() == "eof"
        await gate.released()

    env.run(main)


@pytest.mark.parametrize("how", ["fin", "rst"])
def test_peer_ending_tcp_without_close_notify(env: Env, how: str) -> None:
    """A TCP end without close_notify is a lost connection, not an orderly end: no
    eof_received; connection_lost(None) on a FIN (as uvloop's TLS), with the
    error on a RST."""

    async def main(gate: Gate) -> None:
        client = await gate.mem_client()
        await client.handshake()
        app = await gate.app()
        await client.send(b"x")
        await app.received(1)
        if how == "fin":
            client.sock.shutdown(socket.SHUT_WR)
        else:
            client.reset()
        exc = await app.lost_within()
        assert app.events == ["made", "data", "lost"]
        if how == "fin":
            assert exc is None
            assert await client.tcp_end() == "eof"
            assert client.ended is None  # and no close_notify back
        else:
            assert isinstance(exc, ConnectionError), exc
        await gate.released()

    env.run(main)


def test_data_arriving_after_close_is_discarded(env: Env) -> None:
    """Records the peer sends after our close() (before it saw our close_notify)
    never reach the protocol; its close_notify still ends the connection."""

    async def main(gate: Gate) -> None:
        client = await gate.mem_client()
        await client.handshake()
        app = await gate.app()
        await client.send(b"before")
        await app.received(6)
        app.t.close()
        await client.send(*(os.urandom(SLICE) for _ in range(20)), b"tail")
        assert await client.read_to_end() == b""
        assert client.ended == "close_notify"
        await client.close_notify()
        assert await client.tcp_end(2.0) == "eof"
        assert await app.lost_within() is None
        assert app.data == b"before"
        assert app.events == ["made", "data", "lost"]

    env.run(main)


def test_bad_record_is_fatal(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """A record that does not decrypt: connection_lost with the SSL error, logged,
    nothing delivered, nothing raised into the loop."""
    caplog.set_level("INFO", logger="mtls_gateway.tls")

    async def main(gate: Gate) -> None:
        client = await gate.mem_client()
        await client.handshake()
        app = await gate.app()
        await client.send_raw(b"\x17\x03\x03\x00\x20" + os.urandom(32))
        exc = await app.lost_within()
        assert isinstance(exc, ssl.SSLError), exc
        assert app.events == ["made", "lost"]
        assert await client.tcp_end() in ("eof", "reset")
        await gate.released()

    env.run(main)
    assert "TLS error listener=mqtt" in caplog.text


def test_stop_aborts_handshaking_and_live_connections(env: Env) -> None:
    async def main(gate: Gate) -> None:
        handshaking = await gate.mem_client(tls=False)
        live = await gate.mem_client()
        await live.handshake()
        app = await gate.app()
        await until(lambda: gate.limiter.active == 2)
        await gate.listener.stop()
        assert await app.lost_within() is None
        assert await handshaking.tcp_end() in ("eof", "reset")
        assert await live.tcp_end() in ("eof", "reset")
        await gate.released()
        # stopping is not the peers' fault: nothing counted as a failed handshake
        assert gate.handshakes() == {("mqtt", "accepted", "ok"): 1}

    env.run(main)


# flow control ------------------------------------------------------------------------------


def test_write_backpressure_pauses_and_resumes_the_protocol(env: Env) -> None:
    """A peer that does not read: pause_writing once the TCP buffer passes the high
    water mark, resume_writing once the peer has drained it; nothing lost."""

    async def main(gate: Gate) -> None:
        client = await gate.mem_client(rcvbuf=32 * 1024)
        await client.handshake()
        app = await gate.app()
        app.t.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        chunk = os.urandom(256 * 1024)
        sent = 0
        while "pause_writing" not in app.events:
            assert sent < 64 * 1024 * 1024, "never paused"
            app.t.write(chunk)
            sent += len(chunk)
            await asyncio.sleep(0)
        assert app.t.get_write_buffer_size() > gtls.WRITE_HIGH_WATER
        await asyncio.sleep(0.05)
        assert app.events == ["made", "pause_writing"]
        got = await client.read(sent)
        assert got == chunk * (sent // len(chunk))
        await until(lambda: "resume_writing" in app.events, 2.0, "resume_writing")
        assert app.events == ["made", "pause_writing", "resume_writing"]
        assert app.t.get_write_buffer_size() <= gtls.WRITE_HIGH_WATER // 4
        app.t.write(b"more")
        assert await client.read(4) == b"more"

    env.run(main)


def test_pause_reading_holds_data_then_delivers_it_in_order(env: Env) -> None:
    """pause_reading: nothing delivered and the peer is held back (TCP flow
    control, not a buffer in the gateway); resume_reading: everything, in order."""

    async def main(gate: Gate) -> None:
        client = await gate.mem_client()
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        await client.handshake()
        app = await gate.app()
        app.t.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        await client.send(b"a")
        await app.received(1)
        app.t.pause_reading()
        app.t.pause_reading()
        assert not app.t.is_reading()
        records = [os.urandom(SLICE) for _ in range(512)]  # 8 MiB
        records[0] = b"b" * 10
        sending = asyncio.ensure_future(client.send(*records))
        await asyncio.sleep(0.3)
        assert bytes(app.data) == b"a"
        assert not sending.done(), "the gateway buffered instead of pausing the peer"
        app.t.resume_reading()
        app.t.resume_reading()
        assert app.t.is_reading()
        want = b"a" + b"".join(records)
        assert await app.received(len(want)) == want
        await asyncio.wait_for(sending, WAIT)
        await client.send(b"z")
        assert await app.received(len(want) + 1) == want + b"z"

    env.run(main)


def test_peer_dropping_during_a_large_write(env: Env) -> None:
    """The peer resets in the middle of a large write: connection_lost with the
    error, later writes are dropped, nothing reaches the loop's handler."""

    async def main(gate: Gate) -> None:
        client = await gate.mem_client(rcvbuf=32 * 1024)
        await client.handshake()
        app = await gate.app()
        app.t.write(os.urandom(8 * 1024 * 1024))
        assert app.events == ["made", "pause_writing"]
        await client.read(100_000)
        client.reset()
        exc = await app.lost_within()
        assert isinstance(exc, ConnectionError), exc
        assert app.t.is_closing()
        app.t.write(b"x" * 100_000)
        app.t.close()
        assert app.events == ["made", "pause_writing", "lost"]
        await gate.released()

    env.run(main)


# openssl s_client ------------------------------------------------------------------------

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


class SClient:
    """``openssl s_client`` with the device certificate, its stdout merged with
    stderr (``-msg`` shows every TLS message)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.out = bytearray()

    @classmethod
    async def start(cls, gate: Gate, flag: str) -> SClient:
        cert, key = gate.material.device
        proc = await asyncio.create_subprocess_exec(
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{gate.port}",
            flag,
            "-cert",
            str(cert),
            "-key",
            str(key),
            "-cert_chain",
            str(gate.material.pki.dir / "inter.pem"),
            "-CAfile",
            gate.material.cafile,
            "-verify_return_error",
            "-msg",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        client = cls(proc)
        gate._cleanup.append(client.kill)
        return client

    def send(self, line: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + b"\n")

    async def expect(self, text: bytes) -> int:
        """Read until ``text`` appears; its position in the output."""
        assert self.proc.stdout is not None
        while text not in self.out:
            chunk = await asyncio.wait_for(self.proc.stdout.read(4096), WAIT)
            assert chunk, f"no {text!r} in: {self.out.decode(errors='replace')}"
            self.out.extend(chunk)
        return self.out.index(text)

    async def exit_code(self) -> int:
        return await asyncio.wait_for(self.proc.wait(), WAIT)

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


def _echo_upper(app: App, data: bytes) -> None:
    app.t.write(data.upper())


@pytest.mark.slow
@needs_openssl
def test_openssl_s_client_key_update(env: Env) -> None:
    """OpenSSL's client, TLS 1.3: data both ways around a KeyUpdate asking for ours
    (it comes before our next data), then its close_notify on Q."""

    async def main(gate: Gate) -> None:
        gate.on_data = _echo_upper
        client = await SClient.start(gate, "-tls1_3")
        client.send(b"hello one")
        await client.expect(b"HELLO ONE")
        app = await gate.app()
        client.send(b"K")  # a KeyUpdate with update_requested
        await client.expect(b"KEYUPDATE")
        for i in range(3):
            client.send(b"after %d" % i)
            await client.expect(b"AFTER %d" % i)
        ours = await client.expect(b"<<< TLS 1.3, Handshake [length 0005], KeyUpdate")
        assert ours < client.out.index(b"AFTER 0")
        client.send(b"Q")
        assert await client.exit_code() == 0
        assert await app.lost_within() is None
        assert app.events == ["made", "data", "eof", "lost"]
        assert app.data == b"hello one\nafter 0\nafter 1\nafter 2\n"
        await gate.released()

    env.run(main)


@pytest.mark.slow
@needs_openssl
def test_openssl_s_client_renegotiation_is_refused(env: Env) -> None:
    """OpenSSL's client, TLS 1.2, asks to renegotiate: the server's OpenSSL refuses
    at once with a no_renegotiation alert (flushed by the read, nothing written by
    the protocol), the client gives up with a fatal alert, connection_lost(SSLError)."""

    async def main(gate: Gate) -> None:
        gate.on_data = _echo_upper
        client = await SClient.start(gate, "-tls1_2")
        client.send(b"hello one")
        await client.expect(b"HELLO ONE")
        app = await gate.app()
        client.send(b"R")
        await client.expect(b"RENEGOTIATING")
        await client.expect(b"no renegotiation")
        assert await client.exit_code() != 0
        exc = await app.lost_within()
        assert isinstance(exc, ssl.SSLError), exc
        assert app.events == ["made", "data", "lost"]
        assert app.data == b"hello one\n"
        await gate.released()

    env.run(main)
