"""Asyncio glue of the MQTT front-end: moves bytes between the device's TLS
transport, :class:`~protocols.mqtt.session.MqttFrontend` and the backend.

Callback-driven: the device's TLS transport and the backend's TCP transport
each drive a protocol whose ``data_received`` feeds the front-end and writes
the resulting events to the other transport (one write per batch); a full
destination pauses reading of the source. No streams and no long-lived task
per session: the CONNECT phase (admission, backend connect) and a token
request (``s/uat``, core MQTT, answered through ``issue_token``) each run in
one short-lived task while the device's reading is paused. The CONNECT wait is
bounded by the handshake timeout (``loop.call_later``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, cast

from gateway.admission import Admission
from gateway.metrics import GatewayMetrics
from gateway.sessions import Session, SessionRegistry
from gateway.tls import TlsPeer
from protocols.mqtt.backend import Backend, BackendConnection, BackendLink, BackendPeer
from protocols.mqtt.backends import UpstreamBackend
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

CLOSE_GRACE = 2.0
"""Seconds a closing device connection may take (TLS close_notify) before it is cut."""

IssueToken = Callable[[DeviceIdentity], Awaitable[bytes]]
"""Returns the ``s/dat`` answer (``71,<token>``) for an admitted device; raises
:class:`TokenUnavailable` when the device may not have a token or none can be issued."""


class TokenUnavailable(Exception):
    """No token for this request (refused by the live rules, keys unavailable)."""


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

    def protocol(self, info: TlsPeer) -> asyncio.Protocol:
        """The protocol serving one authenticated TLS connection (``TlsListener``
        hands the transport over)."""
        fe = MqttFrontend(
            info.decision,
            info.listener,
            max_packet_size=self.max_packet_size,
            allow_v5=self.backend.name != "embedded",
            # the device access token API belongs to core MQTT (8883)
            token_topics=self.issue_token is not None and info.listener is Listener.MQTT_CORE,
        )
        return _MqttLink(info, fe, self)


class _StreamLink:
    """A :class:`BackendLink` over a stream-style :class:`BackendConnection` (the
    embedded broker's in-memory pipes): one read task, a drain task while a write waits."""

    def __init__(self, conn: BackendConnection, peer: BackendPeer) -> None:
        self._conn = conn
        self._peer = peer
        self._closed = False
        self._readable = asyncio.Event()
        self._readable.set()
        self._peer_paused = False
        self._drainer: asyncio.Task[None] | None = None
        self._reader = asyncio.create_task(self._read_loop(), name="mqtt-embedded-read")

    async def _read_loop(self) -> None:
        try:
            while not self._closed:
                if not self._readable.is_set():
                    await self._readable.wait()
                data = await self._conn.read()
                if self.closed:  # closed while reading
                    return
                if not data:
                    break
                self._peer.backend_data(data)
        except (ConnectionError, OSError):
            pass
        if not self._closed:
            self._closed = True
            self._conn.close()
            self._peer.backend_lost()

    @property
    def closed(self) -> bool:
        return self._closed

    async def _drain(self) -> None:
        try:
            await self._conn.drain()
        except (ConnectionError, OSError):
            return  # the read loop sees the end
        finally:
            self._drainer = None
        if self._peer_paused and not self._closed:
            self._peer_paused = False
            self._peer.backend_resume_writing()

    def write(self, data: bytes) -> None:
        if self._closed:
            return
        self._conn.write(data)
        if self._drainer is None:
            self._drainer = asyncio.create_task(self._drain(), name="mqtt-embedded-drain")
        elif not self._peer_paused:
            # the previous write still waits for space: stop the source
            self._peer_paused = True
            self._peer.backend_pause_writing()

    def pause_reading(self) -> None:
        self._readable.clear()

    def resume_reading(self) -> None:
        self._readable.set()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._conn.close()
        current = asyncio.current_task()
        for task in (self._reader, self._drainer):
            if task is not None and task is not current:
                task.cancel()


class _MqttLink(asyncio.Protocol):
    """One proxied connection: the device TLS transport's protocol and the
    backend link's peer (device transport <-> backend link).

    Slotted, and nothing that only the CONNECT phase needs outlives it (the
    timer, the step task, held bytes): one of these per idle session."""

    __slots__ = (
        "_abort_timer",
        "_backend_full",
        "_device_full",
        "_device_paused",
        "_finished",
        "_held",
        "_lost",
        "_task",
        "_timer",
        "backend",
        "fe",
        "identity",
        "info",
        "lname",
        "server",
        "session",
        "transport",
    )

    def __init__(self, info: TlsPeer, fe: MqttFrontend, server: MqttServer) -> None:
        self.info = info
        self.fe = fe
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.backend: BackendLink | None = None
        self.session: Session | None = None
        self.identity: DeviceIdentity | None = None
        self.lname = info.listener.value
        self._timer: asyncio.TimerHandle | None = None
        self._abort_timer: asyncio.TimerHandle | None = None
        # the CONNECT phase or a token request; the device is not read meanwhile
        self._task: asyncio.Task[None] | None = None
        self._held: bytearray | None = None  # device bytes that arrived while _task ran
        self._backend_full = False  # the backend link cannot take more
        self._device_full = False  # the device transport cannot take more
        self._device_paused = False
        self._finished = False
        self._lost = False  # the device connection is gone

    @property
    def finished(self) -> bool:
        """True once the link ended (a method read: mypy does not narrow it)."""
        return self._finished

    def _busy(self) -> bool:
        """A step task runs (read through a method: mypy does not narrow it)."""
        return self._task is not None

    # device transport ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses
        self.transport = cast(asyncio.Transport, transport)
        self._timer = asyncio.get_running_loop().call_later(
            self.server.connect_timeout, self._connect_timeout
        )

    def data_received(self, data: bytes) -> None:
        if self._finished:
            return
        if self._task is not None:
            if self._held is None:
                self._held = bytearray(data)
            else:
                self._held += data
            return
        try:
            self._apply(self.fe.device_data(data))
        except Exception as exc:
            self._crashed(exc)

    def eof_received(self) -> bool:
        return False  # no half-close under TLS

    def connection_lost(self, exc: Exception | None) -> None:
        if self._abort_timer is not None:
            self._abort_timer.cancel()
            self._abort_timer = None
        self._lost = True
        if not self._finished:
            if self.identity is not None:
                self._finish("device_closed", "device closed the connection")
            elif exc is None:
                self._finish("connection_lost", "device closed before CONNECT")
            else:
                self._finish("connection_lost", "device dropped before CONNECT")

    def pause_writing(self) -> None:
        self._device_full = True
        if self.backend is not None:
            self.backend.pause_reading()

    def resume_writing(self) -> None:
        self._device_full = False
        if self.backend is not None:
            self.backend.resume_reading()

    def _connect_timeout(self) -> None:
        self._timer = None
        if self.backend is None and self._task is None:
            self._finish("connect_timeout", "no MQTT CONNECT within the handshake timeout")

    def _update_device_reading(self) -> None:
        pause = self._task is not None or self._backend_full
        t = self.transport
        if pause is self._device_paused or t is None or t.is_closing():
            return
        self._device_paused = pause
        if pause:
            t.pause_reading()
        else:
            t.resume_reading()

    # backend link (BackendPeer) ----------------------------------------------------
    def backend_data(self, data: bytes) -> None:
        if self._finished:
            return
        try:
            self._apply(self.fe.backend_data(data))
        except Exception as exc:
            self._crashed(exc)

    def backend_lost(self) -> None:
        if not self._finished:
            self._finish("backend_closed", "broker closed the connection")

    def backend_pause_writing(self) -> None:
        self._backend_full = True
        self._update_device_reading()

    def backend_resume_writing(self) -> None:
        self._backend_full = False
        self._update_device_reading()

    # events --------------------------------------------------------------------
    def _apply(self, events: Sequence[Event]) -> None:
        # One write per direction per batch: the data of consecutive sends is
        # joined, and written before anything that waits or ends the link.
        to_device: list[bytes] = []
        to_backend: list[bytes] = []
        for i, ev in enumerate(events):
            if isinstance(ev, SendBackend):
                if self.backend is not None:
                    to_backend.append(ev.data)
            elif isinstance(ev, SendDevice):
                to_device.append(ev.data)
            elif isinstance(ev, Published):
                self.server.metrics.messages.inc(self.lname, ev.direction, amount=ev.count)
            elif isinstance(ev, Authorize):
                self._send(to_device, to_backend)
                if self._timer is not None:  # admission and backend have their own bounds
                    self._timer.cancel()
                    self._timer = None
                self._step(self._authorize(ev), events[i + 1 :])
                return
            elif isinstance(ev, TokenRequested):
                self._send(to_device, to_backend)  # the PUBACK goes first
                self._step(self._answer_token(), events[i + 1 :])
                return
            elif isinstance(ev, Close):
                self._send(to_device, to_backend)
                self._finish(ev.code, ev.message)
                return
        self._send(to_device, to_backend)

    def _send(self, to_device: list[bytes], to_backend: list[bytes]) -> None:
        t = self.transport
        if to_device and t is not None and not t.is_closing():
            t.write(to_device[0] if len(to_device) == 1 else b"".join(to_device))
        if to_backend and self.backend is not None:
            self.backend.write(to_backend[0] if len(to_backend) == 1 else b"".join(to_backend))

    def _step(self, work: Coroutine[Any, Any, None], rest: Sequence[Event]) -> None:
        """Run ``work`` in a short-lived task, then the rest of the batch; the
        device is not read meanwhile (its bytes are held, in order)."""
        self._task = asyncio.create_task(self._run_step(work, rest), name="mqtt-step")
        self._update_device_reading()

    async def _run_step(self, work: Coroutine[Any, Any, None], rest: Sequence[Event]) -> None:
        me = asyncio.current_task()
        try:
            await work
        except Exception as exc:
            if self._task is me:
                self._task = None
            self._crashed(exc)
            return
        if self._task is me:
            self._task = None
        if self.finished or self._task is not None:
            return
        try:
            self._apply(rest)
            if self.finished or self._busy():
                return
            self._update_device_reading()
            if self._held is not None:
                held, self._held = self._held, None
                self._apply(self.fe.device_data(bytes(held)))
        except Exception as exc:
            self._crashed(exc)

    def _crashed(self, exc: BaseException) -> None:
        log.error("mqtt pump failed", exc_info=exc)
        self._finish("internal_error", str(exc))

    async def _authorize(self, ev: Authorize) -> None:
        admitted = await self.server.admission.admit(ev.identity, self.info.peer)
        if isinstance(admitted, Rejection):
            self._apply(
                self.fe.refuse(ReasonCode.NOT_AUTHORIZED, admitted.reason.value, admitted.message)
            )
            return
        backend = self.server.backend
        try:
            if isinstance(backend, UpstreamBackend):
                async with asyncio.timeout(self.server.backend_timeout):  # no extra task
                    link = await backend.connect_link(self)
            else:
                conn = await asyncio.wait_for(backend.connect(), self.server.backend_timeout)
                link = _StreamLink(conn, self)
        except (OSError, TimeoutError) as exc:
            log.error("backend %s unavailable: %s", backend.name, exc)
            self._apply(
                self.fe.refuse(
                    ReasonCode.SERVER_UNAVAILABLE, "backend_unavailable", "broker unavailable"
                )
            )
            return
        self.backend = link
        if self._device_full:
            link.pause_reading()
        self.identity = admitted
        self.session = self.server.registry.add(admitted, self.info.peer, self._kill)
        log.info(
            "mqtt session open listener=%s tenant=%s device=%s client_id=%s peer=%s reason=ok",
            self.lname,
            admitted.tenant,
            admitted.device_id,
            self.fe.client_id,
            self.info.peer,
        )
        self._apply(
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
        self._apply(self.fe.token_answer(answer))

    async def _kill(self, code: str, message: str) -> None:
        """Called by the session registry: end this session promptly (v5: DISCONNECT first)."""
        if not self._finished:
            self._apply(self.fe.kick(code, message))
            if not self._finished:
                self._finish(code, message)

    # teardown ------------------------------------------------------------------
    def _finish(self, code: str, message: str) -> None:
        """The end, whoever noticed it first: log, unregister, close both sides."""
        if self._finished:
            return
        self._finished = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        self._held = None
        self.log_close(code, message)
        if self.session is not None:
            self.server.registry.remove(self.session)
        if self.backend is not None:
            self.backend.close()
        t = self.transport
        if t is not None and not t.is_closing():
            t.close()  # after what is queued (CONNACK refusal, DISCONNECT)
            if not self._lost:
                self._abort_timer = asyncio.get_running_loop().call_later(CLOSE_GRACE, t.abort)

    def log_close(self, code: str, message: str) -> None:
        ident = self.identity
        if ident is None:
            decision = self.info.decision
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
                self.info.peer,
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
