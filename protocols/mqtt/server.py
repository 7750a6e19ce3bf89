"""Asyncio glue of the MQTT front-end: moves bytes between the device's TLS
stream, :class:`~protocols.mqtt.session.MqttFrontend` and the backend.

One coroutine per connection: wait for CONNECT (bounded by the handshake
timeout), admit the device, open the backend, then pump both directions
until either side closes or the session registry kills the session. A token
request (``s/uat``, core MQTT) is answered inline through ``issue_token``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable

from gateway.admission import Admission
from gateway.metrics import GatewayMetrics
from gateway.sessions import Session, SessionRegistry
from gateway.tls import TlsConnection
from protocols.mqtt.backend import Backend, BackendConnection
from protocols.mqtt.codec import ReasonCode
from protocols.mqtt.session import (
    Authorize,
    Close,
    Event,
    MqttFrontend,
    Published,
    SendBackend,
    SendDevice,
    TokenRequested,
)
from trust.model import DeviceIdentity, Listener, Rejection

log = logging.getLogger("mtls_gateway.mqtt")

READ_SIZE = 65536

IssueToken = Callable[[DeviceIdentity], Awaitable[bytes]]
"""Returns the ``s/dat`` answer (``71,<token>``) for an admitted device; raises
:class:`TokenUnavailable` when the device may not have a token or none can be issued."""


class TokenUnavailable(Exception):
    """No token for this request (refused by the live rules, keys unavailable)."""


class _Closed(Exception):
    """The connection is over (normal end of the pumps)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class MqttServer:
    """Serves authenticated TLS connections of one MQTT listener."""

    def __init__(
        self,
        backend: Backend,
        admission: Admission,
        registry: SessionRegistry,
        metrics: GatewayMetrics,
        *,
        max_packet_size: int,
        connect_timeout: float,
        backend_timeout: float,
        upstream_username: str = "",
        upstream_password: str = "",
        issue_token: IssueToken | None = None,
    ) -> None:
        self.backend = backend
        self.admission = admission
        self.registry = registry
        self.metrics = metrics
        self.max_packet_size = max_packet_size
        self.connect_timeout = connect_timeout
        self.backend_timeout = backend_timeout
        self.upstream_username = upstream_username or None
        self.upstream_password = upstream_password.encode() if upstream_password else None
        self.issue_token = issue_token

    async def handle(self, conn: TlsConnection) -> None:
        """Serve one device connection to the end; never raises for peer behaviour."""
        fe = MqttFrontend(
            conn.decision,
            conn.listener,
            max_packet_size=self.max_packet_size,
            allow_v5=self.backend.name != "embedded",
            # the device access token API belongs to core MQTT (8883)
            token_topics=self.issue_token is not None and conn.listener is Listener.MQTT_CORE,
        )
        link = _Link(conn, fe, self)
        try:
            await link.run()
        except _Closed as closed:
            link.log_close(closed.code, closed.message)
        finally:
            await link.cleanup()


class _Link:
    """State of one proxied connection (device stream ↔ backend connection)."""

    def __init__(self, conn: TlsConnection, fe: MqttFrontend, server: MqttServer) -> None:
        self.conn = conn
        self.fe = fe
        self.server = server
        self.backend: BackendConnection | None = None
        self.session: Session | None = None
        self.identity: DeviceIdentity | None = None
        # a plain future, not a task waiting on an Event: one task less per session
        self.killed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.kill_reason: tuple[str, str] | None = None
        self.lname = conn.listener.value

    # main flow -----------------------------------------------------------------
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.server.connect_timeout
        while self.backend is None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise _Closed("connect_timeout", "no MQTT CONNECT within the handshake timeout")
            try:
                data = await asyncio.wait_for(self.conn.reader.read(READ_SIZE), remaining)
            except TimeoutError:
                raise _Closed(
                    "connect_timeout", "no MQTT CONNECT within the handshake timeout"
                ) from None
            except (ConnectionError, OSError):
                raise _Closed("connection_lost", "device dropped before CONNECT") from None
            if not data:
                raise _Closed("connection_lost", "device closed before CONNECT")
            await self._apply(self.fe.device_data(data))
        await self._pump()

    async def _pump(self) -> None:
        assert self.backend is not None
        device = asyncio.create_task(self._device_loop(), name="mqtt-device")
        backend = asyncio.create_task(self._backend_loop(), name="mqtt-backend")
        killed = self.killed
        tasks: set[asyncio.Future[None]] = {device, backend, killed}
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if killed in done and self.kill_reason is not None:
            code, message = self.kill_reason
            await self._apply(self.fe.kick(code, message), final=True)
            raise _Closed(code, message)
        for t in done:
            exc = t.exception()
            if isinstance(exc, _Closed):
                raise exc
            if exc is not None:
                log.error("mqtt pump failed", exc_info=exc)
                raise _Closed("internal_error", str(exc))
        raise _Closed("closed", "connection ended")

    async def _device_loop(self) -> None:
        reader = self.conn.reader
        while True:
            try:
                data = await reader.read(READ_SIZE)
            except (ConnectionError, OSError):
                data = b""
            if not data:
                raise _Closed("device_closed", "device closed the connection")
            await self._apply(self.fe.device_data(data))

    async def _backend_loop(self) -> None:
        assert self.backend is not None
        while True:
            data = await self.backend.read()
            if not data:
                raise _Closed("backend_closed", "broker closed the connection")
            await self._apply(self.fe.backend_data(data))

    # events --------------------------------------------------------------------
    async def _apply(self, events: Iterable[Event], *, final: bool = False) -> None:
        # One write per direction per batch: the data of consecutive sends is
        # joined, and written before anything that awaits or ends the link.
        to_device: list[bytes] = []
        to_backend: list[bytes] = []
        for ev in events:
            if isinstance(ev, SendBackend):
                if self.backend is not None:
                    to_backend.append(ev.data)
            elif isinstance(ev, SendDevice):
                to_device.append(ev.data)
            elif isinstance(ev, Published):
                self.server.metrics.messages.inc(self.lname, ev.direction, amount=ev.count)
            elif isinstance(ev, Authorize):
                await self._send(to_device, to_backend)
                to_device, to_backend = [], []
                await self._authorize(ev)
            elif isinstance(ev, TokenRequested):
                await self._send(to_device, to_backend)  # the PUBACK goes first
                to_device, to_backend = [], []
                await self._answer_token()
            elif isinstance(ev, Close):
                await self._send(to_device, to_backend)
                if not final:
                    raise _Closed(ev.code, ev.message)
                return
        await self._send(to_device, to_backend)

    async def _send(self, to_device: list[bytes], to_backend: list[bytes]) -> None:
        if to_device:
            self.conn.writer.write(to_device[0] if len(to_device) == 1 else b"".join(to_device))
        if to_backend and self.backend is not None:
            self.backend.write(to_backend[0] if len(to_backend) == 1 else b"".join(to_backend))
        await self._flush(bool(to_device), bool(to_backend))

    async def _flush(self, to_device: bool, to_backend: bool) -> None:
        try:
            if to_device:
                await self.conn.writer.drain()
            if to_backend and self.backend is not None:
                await self.backend.drain()
        except (ConnectionError, OSError):
            raise _Closed("connection_lost", "peer went away while sending") from None

    async def _authorize(self, ev: Authorize) -> None:
        admitted = await self.server.admission.admit(ev.identity, self.conn.peer)
        if isinstance(admitted, Rejection):
            await self._apply(
                self.fe.refuse(ReasonCode.NOT_AUTHORIZED, admitted.reason.value, admitted.message)
            )
            return
        try:
            self.backend = await asyncio.wait_for(
                self.server.backend.connect(), self.server.backend_timeout
            )
        except (OSError, TimeoutError) as exc:
            log.error("backend %s unavailable: %s", self.server.backend.name, exc)
            await self._apply(
                self.fe.refuse(
                    ReasonCode.SERVER_UNAVAILABLE, "backend_unavailable", "broker unavailable"
                )
            )
            return
        self.identity = admitted
        self.session = self.server.registry.add(admitted, self.conn.peer, self._kill)
        log.info(
            "mqtt session open listener=%s tenant=%s device=%s client_id=%s peer=%s reason=ok",
            self.lname,
            admitted.tenant,
            admitted.device_id,
            self.fe.client_id,
            self.conn.peer,
        )
        await self._apply(
            self.fe.backend_ready(
                username=self.server.upstream_username, password=self.server.upstream_password
            )
        )

    async def _answer_token(self) -> None:
        ident, issue = self.identity, self.server.issue_token
        if ident is None or issue is None:
            return
        # Without a token there is no answer on s/dat: the device times out and may retry.
        try:
            answer = await issue(ident)
        except TokenUnavailable as exc:
            log.warning(
                "token request refused tenant=%s device=%s: %s", ident.tenant, ident.device_id, exc
            )
            return
        except Exception:
            log.exception("token request failed tenant=%s device=%s", ident.tenant, ident.device_id)
            return
        log.info("token issued tenant=%s device=%s", ident.tenant, ident.device_id)
        await self._apply(self.fe.token_answer(answer))

    async def _kill(self, code: str, message: str) -> None:
        """Called by the session registry: end this session promptly."""
        self.kill_reason = (code, message)
        if not self.killed.done():
            self.killed.set_result(None)

    # teardown ------------------------------------------------------------------
    def log_close(self, code: str, message: str) -> None:
        ident = self.identity
        if ident is None:
            decision = self.conn.decision
            tenant = getattr(decision, "tenant", None)
            device = getattr(decision, "device_id", None)
            if isinstance(decision, Rejection) and code in ("connection_lost", "connect_timeout"):
                # the device left before CONNECT: the decision is the real reason
                code, message = decision.reason.value, f"{decision.message} ({code})"
            log.info(
                "mqtt connection refused listener=%s tenant=%s device=%s peer=%s reason=%s: %s",
                self.lname,
                tenant,
                device,
                self.conn.peer,
                code,
                message,
            )
            self.server.metrics.connect_refused.inc(self.lname, code)
            if code == "malformed":
                self.server.metrics.malformed.inc(self.lname, code)
            return
        log.info(
            "mqtt session closed listener=%s tenant=%s device=%s reason=%s: %s",
            self.lname,
            ident.tenant,
            ident.device_id,
            code,
            message,
        )

    async def cleanup(self) -> None:
        if self.session is not None:
            self.server.registry.remove(self.session)
        if self.backend is not None:
            self.backend.close()
        writer = self.conn.writer
        if not writer.is_closing():
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2)
