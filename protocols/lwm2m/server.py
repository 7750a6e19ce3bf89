"""The LWM2M front-end: DTLS sessions → CoAP → registration interface, and the
device-management API the gateway's management layer calls.

:class:`Lwm2mServer` is the thin asyncio glue around the sans-IO pieces. It
receives :mod:`gateway.dtls` events, runs one :class:`~protocols.lwm2m.coap.CoapPeer`
per DTLS session, answers Register/Update/De-register with
:class:`~protocols.lwm2m.registration.RegistrationRegistry`, registers every
session in the :class:`~gateway.sessions.SessionRegistry` (revoking or disabling
a device closes its DTLS session and forgets its registration) and keeps one
timer for CoAP retransmissions and registration expiry.

Management API (for the HTTP routes)::

    server.endpoints(tenant=None) -> list[EndpointInfo]
    server.endpoint(tenant, endpoint) -> EndpointInfo            # EndpointNotFound
    await server.read(tenant, endpoint, "/3/0/0", accept=None, request_timeout=None)
        -> Lwm2mResponse
    await server.write(tenant, endpoint, "/1/0/1", b"300", content_format=TEXT_PLAIN,
                       request_timeout=None) -> Lwm2mResponse
    await server.execute(tenant, endpoint, "/3/0/4", arguments=b"", request_timeout=None)
        -> Lwm2mResponse

Every failure is an :class:`Lwm2mError` whose ``http_status`` is what the HTTP
layer should answer; a device's own CoAP error (e.g. 4.04) is *not* raised but
returned as a response whose ``http_status`` maps it (RFC 8075 §7).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from aiocoap import Message
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import BlockOption

from gateway.admission import Admission
from gateway.dtls import (
    Address,
    Closed,
    DataReceived,
    DtlsEvent,
    DtlsListener,
    DtlsSendError,
    Established,
)
from gateway.metrics import GatewayMetrics
from gateway.sessions import Session, SessionRegistry
from protocols.lwm2m.coap import (
    CoapError,
    CoapEvent,
    CoapPeer,
    Dropped,
    IncomingRequest,
    MessageTooLarge,
    QueueFull,
    RequestFailed,
    ResponseReceived,
    TransmissionParameters,
)
from protocols.lwm2m.links import format_object_links
from protocols.lwm2m.registration import (
    Client,
    Deregistered,
    Outcome,
    Registered,
    Registration,
    RegistrationRegistry,
    Updated,
)
from trust.model import DeviceIdentity, Rejection

log = logging.getLogger("mtls_gateway.lwm2m")

TEXT_PLAIN = 0
"""CoAP Content-Format text/plain;charset=utf-8 (LwM2M plain-text values)."""
SESSION_GRACE = 60.0
"""Seconds a registered device's DTLS session is kept past its lifetime."""
_MAX_ID = 65535


# errors -----------------------------------------------------------------------------


class Lwm2mError(Exception):
    """A management request that could not be carried out."""

    http_status = 500


class InvalidRequest(Lwm2mError):
    """The path or arguments are not valid LWM2M."""

    http_status = 400


class EndpointNotFound(Lwm2mError):
    """No registration for this endpoint in this tenant."""

    http_status = 404


class PayloadTooLarge(Lwm2mError):
    """The request does not fit one datagram, or the response exceeds the limit."""

    http_status = 413


class DeviceUnreachable(Lwm2mError):
    """Registered, but its DTLS session is gone (or it reset our request)."""

    http_status = 503


class DeviceTimeout(Lwm2mError):
    """The device did not answer within the timeout."""

    http_status = 504


class DeviceProtocolError(Lwm2mError):
    """The device answered something that is not a valid answer."""

    http_status = 502


# values -----------------------------------------------------------------------------

# RFC 8075 §7 (CoAP → HTTP) for the codes an LWM2M client answers with
_HTTP_STATUS = {
    "2.01": 201,
    "2.02": 200,
    "2.03": 200,
    "2.04": 200,
    "2.05": 200,
    "4.00": 400,
    "4.01": 403,
    "4.02": 400,
    "4.03": 403,
    "4.04": 404,
    "4.05": 405,
    "4.06": 406,
    "4.08": 400,
    "4.12": 412,
    "4.13": 413,
    "4.15": 415,
    "5.00": 502,
    "5.01": 502,
    "5.03": 503,
    "5.04": 504,
}


@dataclass(frozen=True, slots=True)
class Lwm2mResponse:
    """A device's answer to a read, write or execute."""

    code: str
    """CoAP response code, dotted (``2.05``)."""
    content_format: int | None
    payload: bytes
    """The whole payload (Block2 transfers reassembled)."""

    @property
    def success(self) -> bool:
        return self.code.startswith("2.")

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS.get(self.code, 502)

    def text(self) -> str:
        return self.payload.decode("utf-8", errors="replace")


@dataclass(frozen=True, slots=True)
class EndpointInfo:
    """A registered endpoint as the management API lists it."""

    endpoint: str
    tenant: str
    registration_id: str
    lwm2m_version: str
    binding: str
    queue_mode: bool
    lifetime: int
    objects: tuple[str, ...]
    """Object and instance paths, e.g. ``("/1/0", "/3/0")``."""
    object_links: str
    """The object list as link format (with attributes)."""
    registered_at: datetime
    last_update: datetime
    expires_at: datetime
    online: bool
    """Its DTLS session is open (server-initiated requests can reach it)."""


@dataclass(eq=False, slots=True)
class _Peer:
    address: Address
    identity: DeviceIdentity
    coap: CoapPeer
    session: Session | None = None
    waiters: dict[bytes, asyncio.Future[Message]] = field(default_factory=dict)
    killed: bool = False


class Lwm2mServer:
    """The LWM2M registration interface and device management over DTLS sessions."""

    def __init__(
        self,
        listener: DtlsListener,
        sessions: SessionRegistry,
        admission: Admission,
        metrics: GatewayMetrics,
        *,
        request_timeout: float = 20.0,
        max_registrations: int = 100_000,
        max_payload: int = 64 * 1024,
        params: TransmissionParameters | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.listener = listener
        self.sessions = sessions
        self.admission = admission
        self.metrics = metrics
        self.request_timeout = request_timeout
        self.max_payload = max_payload
        self.params = params or TransmissionParameters()
        self.clock = clock
        self.rd = RegistrationRegistry(max_registrations=max_registrations)
        self._peers: dict[Address, _Peer] = {}
        self._timed: set[Address] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        reg = metrics.registry
        self._operations = reg.counter(
            "mtls_gateway_lwm2m_operations_total",
            "LWM2M registration-interface operations by operation and CoAP result code.",
            ("operation", "code"),
        )
        self._coap_dropped = reg.counter(
            "mtls_gateway_coap_dropped_total",
            "CoAP messages ignored or reset (duplicates, unparsable, unexpected).",
            ("listener", "reason"),
        )
        reg.gauge(
            "mtls_gateway_lwm2m_registrations",
            "Registered LWM2M endpoints.",
            (),
            collect=lambda: {(): float(len(self.rd))},
        )
        listener.handler = self

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for peer in self._peers.values():
            self._fail_waiters(peer, DeviceUnreachable("the gateway is stopping"))

    # management API ---------------------------------------------------------------------
    def endpoints(self, tenant: str | None = None) -> list[EndpointInfo]:
        """Registered endpoints (of one tenant, or all), sorted by tenant and name."""
        self._expire()
        return [self._info(r) for r in self.rd.registrations(tenant)]

    def endpoint(self, tenant: str, endpoint: str) -> EndpointInfo:
        self._expire()
        reg = self.rd.get(tenant, endpoint)
        if reg is None:
            raise EndpointNotFound(f"endpoint {endpoint} is not registered in tenant {tenant}")
        return self._info(reg)

    async def read(
        self,
        tenant: str,
        endpoint: str,
        path: str,
        *,
        accept: int | None = None,
        request_timeout: float | None = None,
    ) -> Lwm2mResponse:
        """LWM2M Read: CoAP GET of an object, instance, resource or resource instance."""
        segments = _path(path, 1)
        message = Message(code=Code.GET, uri_path=segments)
        if accept is not None:
            message.opt.accept = accept
        return await self._request(tenant, endpoint, message, request_timeout)

    async def write(
        self,
        tenant: str,
        endpoint: str,
        path: str,
        value: bytes,
        *,
        content_format: int = TEXT_PLAIN,
        request_timeout: float | None = None,
    ) -> Lwm2mResponse:
        """LWM2M Write (replace): CoAP PUT of an instance or resource."""
        segments = _path(path, 2)
        message = Message(code=Code.PUT, uri_path=segments, payload=value)
        message.opt.content_format = content_format
        return await self._request(tenant, endpoint, message, request_timeout)

    async def execute(
        self,
        tenant: str,
        endpoint: str,
        path: str,
        arguments: bytes = b"",
        *,
        request_timeout: float | None = None,
    ) -> Lwm2mResponse:
        """LWM2M Execute: CoAP POST to a resource, with optional arguments."""
        segments = _path(path, 3)
        if len(segments) != 3:
            raise InvalidRequest("execute targets a resource: /object/instance/resource")
        message = Message(code=Code.POST, uri_path=segments, payload=arguments)
        if arguments:
            message.opt.content_format = TEXT_PLAIN
        return await self._request(tenant, endpoint, message, request_timeout)

    async def _request(
        self, tenant: str, endpoint: str, message: Message, request_timeout: float | None
    ) -> Lwm2mResponse:
        self._expire()
        reg = self.rd.get(tenant, endpoint)
        if reg is None:
            raise EndpointNotFound(f"endpoint {endpoint} is not registered in tenant {tenant}")
        peer = self._peers.get(reg.session) if isinstance(reg.session, tuple) else None
        if peer is None:
            raise DeviceUnreachable(f"endpoint {endpoint} has no open DTLS session")
        loop = asyncio.get_running_loop()
        limit = self.request_timeout if request_timeout is None else request_timeout
        deadline = loop.time() + limit
        response = await self._exchange(peer, message, deadline)
        block2 = response.opt.block2
        if block2 is None or not response.code.is_successful():
            return _response(response, response.payload)
        # Block2 (RFC 7959 §2.4): fetch the following blocks with the same options.
        payload = bytearray()
        while True:
            size = 1 << (block2.size_exponent + 4)
            if block2.block_number * size != len(payload):
                raise DeviceProtocolError("Block2 response out of sequence")
            payload += response.payload
            if len(payload) > self.max_payload:
                raise PayloadTooLarge(f"response larger than {self.max_payload} bytes")
            if not block2.more:
                return _response(response, bytes(payload))
            if len(response.payload) != size:
                raise DeviceProtocolError("Block2 block shorter than its size")
            follow = Message(code=message.code, uri_path=message.opt.uri_path)
            if message.opt.accept is not None:
                follow.opt.accept = message.opt.accept
            follow.opt.block2 = BlockOption.BlockwiseTuple(
                len(payload) // size, False, block2.size_exponent
            )
            response = await self._exchange(peer, follow, deadline)
            block2 = response.opt.block2
            if block2 is None or not response.code.is_successful():
                raise DeviceProtocolError("Block2 transfer ended without a final block")

    async def _exchange(self, peer: _Peer, message: Message, deadline: float) -> Message:
        loop = asyncio.get_running_loop()
        try:
            token = peer.coap.request(message, loop.time())
        except MessageTooLarge as exc:
            raise PayloadTooLarge(f"{exc} (one DTLS record; use a smaller value)") from None
        except QueueFull as exc:
            raise DeviceUnreachable(str(exc)) from None
        future: asyncio.Future[Message] = loop.create_future()
        peer.waiters[token] = future
        self._flush(peer)
        try:
            return await asyncio.wait_for(future, max(0.0, deadline - loop.time()))
        except TimeoutError:
            peer.coap.cancel(token, loop.time())
            self._flush(peer)
            raise DeviceTimeout(
                f"endpoint {peer.identity.device_id} did not answer in time"
            ) from None
        finally:
            peer.waiters.pop(token, None)
            self._arm()

    # DTLS events ----------------------------------------------------------------------------
    def dtls_event(self, event: DtlsEvent) -> None:
        if isinstance(event, DataReceived):
            self._on_data(event)
        elif isinstance(event, Established):
            self._on_established(event)
        elif isinstance(event, Closed):
            self._on_closed(event)

    def _on_established(self, event: Established) -> None:
        identity = event.identity
        peer = _Peer(
            event.peer,
            identity,
            CoapPeer(
                max_message_size=self.listener.max_plaintext(event.peer),
                params=self.params,
            ),
        )
        self._peers[event.peer] = peer
        peer.session = self.sessions.add(identity, _fmt(event.peer), self._closer(peer))
        self._spawn(self._admit(peer))

    async def _admit(self, peer: _Peer) -> None:
        result = await self.admission.admit(peer.identity, _fmt(peer.address))
        if isinstance(result, Rejection) and self._peers.get(peer.address) is peer:
            log.info("LWM2M session refused after admission: %s", result.message)
            self.listener.close(peer.address, result.reason.value)

    def _closer(self, peer: _Peer) -> Callable[[str, str], Awaitable[None]]:
        async def close(code: str, message: str) -> None:
            if self._peers.get(peer.address) is not peer:
                return
            if code != "shutdown":
                peer.killed = True  # revoked or disabled: forget its registration too
            self.listener.close(peer.address, code)

        return close

    def _on_closed(self, event: Closed) -> None:
        peer = self._peers.pop(event.peer, None)
        if peer is None:
            return
        self._timed.discard(event.peer)
        if peer.session is not None:
            self.sessions.remove(peer.session)
        self._fail_waiters(peer, DeviceUnreachable(f"DTLS session closed ({event.reason})"))
        ident = peer.identity
        if peer.killed:
            reg = self.rd.get(ident.tenant, ident.device_id)
            if reg is not None and reg.session in (None, event.peer):
                self.rd.remove_endpoint(ident.tenant, ident.device_id)
                self._operations.inc("revoke", "-")
                log.info(
                    "LWM2M registration removed tenant=%s endpoint=%s (session closed: %s)",
                    ident.tenant,
                    ident.device_id,
                    event.reason,
                )
        else:
            self.rd.detach(event.peer)

    def _on_data(self, event: DataReceived) -> None:
        peer = self._peers.get(event.peer)
        if peer is None:  # pragma: no cover - the DTLS server announces sessions first
            return
        now = self._now()
        self._dispatch(peer, peer.coap.receive(event.data, now), now)
        self._flush(peer)
        self._arm()

    def _dispatch(self, peer: _Peer, events: list[CoapEvent], now: float) -> None:
        for ev in events:
            if isinstance(ev, IncomingRequest):
                self._on_request(peer, ev.message, now)
            elif isinstance(ev, ResponseReceived):
                future = peer.waiters.get(ev.token)
                if future is not None and not future.done():
                    future.set_result(ev.message)
            elif isinstance(ev, RequestFailed):
                future = peer.waiters.get(ev.token)
                if future is not None and not future.done():
                    exc: Lwm2mError = (
                        DeviceTimeout("no answer after all retransmissions")
                        if ev.reason == "timeout"
                        else DeviceUnreachable("the device reset the request")
                    )
                    future.set_exception(exc)
            elif isinstance(ev, Dropped):
                self._coap_dropped.inc("lwm2m", ev.reason)

    def _on_request(self, peer: _Peer, request: Message, now: float) -> None:
        ident = peer.identity
        client = Client(ident.tenant, ident.device_id, peer.address)
        response, outcome = self.rd.handle(request, client, self.clock())
        try:
            peer.coap.respond(request, response, now)
        except CoapError:  # pragma: no cover - registration responses are tiny
            log.exception("LWM2M response too large")
        operation = _operation(request, outcome)
        self._operations.inc(operation, response.code.dotted)
        if outcome is None:
            log.info(
                "LWM2M %s refused tenant=%s endpoint=%s peer=%s: %s %s",
                operation,
                ident.tenant,
                ident.device_id,
                _fmt(peer.address),
                response.code.dotted,
                response.payload.decode("utf-8", "replace"),
            )
            return
        reg = outcome.registration
        if isinstance(outcome, Registered | Updated):
            # keep the DTLS session as long as the registration may live
            self.listener.extend(peer.address, now + reg.lifetime + SESSION_GRACE)
        log.info(
            "LWM2M %s tenant=%s endpoint=%s id=%s lifetime=%d objects=%s",
            operation,
            reg.tenant,
            reg.endpoint,
            reg.id,
            reg.lifetime,
            format_object_links(reg.objects),
        )

    # timers -----------------------------------------------------------------------------
    def _flush(self, peer: _Peer) -> None:
        for data in peer.coap.take_outgoing():
            try:
                self.listener.send(peer.address, data)
            except DtlsSendError as exc:
                log.debug("cannot send to %s: %s", _fmt(peer.address), exc)
                break
        if peer.coap.next_timer() is not None and self._peers.get(peer.address) is peer:
            self._timed.add(peer.address)

    def _arm(self) -> None:
        loop = self._loop
        if loop is None:
            return
        when: float | None = None
        for address in list(self._timed):
            peer = self._peers.get(address)
            at = peer.coap.next_timer() if peer is not None else None
            if at is None:
                self._timed.discard(address)
            elif when is None or at < when:
                when = at
        expiry = self.rd.next_expiry()
        if expiry is not None:
            at = loop.time() + max(0.0, (expiry - self.clock()).total_seconds())
            when = at if when is None else min(when, at)
        if when == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = loop.call_at(when, self._on_timer) if when is not None else None

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        now = self._now()
        for address in list(self._timed):
            peer = self._peers.get(address)
            if peer is None:
                continue
            self._dispatch(peer, peer.coap.handle_timer(now), now)
            self._flush(peer)
        self._expire()
        self._arm()

    def _expire(self) -> None:
        for reg in self.rd.expire(self.clock()):
            self._operations.inc("expire", "-")
            log.info(
                "LWM2M registration expired tenant=%s endpoint=%s id=%s",
                reg.tenant,
                reg.endpoint,
                reg.id,
            )

    # helpers ------------------------------------------------------------------------------
    def _info(self, reg: Registration) -> EndpointInfo:
        online = isinstance(reg.session, tuple) and reg.session in self._peers
        return EndpointInfo(
            endpoint=reg.endpoint,
            tenant=reg.tenant,
            registration_id=reg.id,
            lwm2m_version=reg.version,
            binding=reg.binding,
            queue_mode=reg.queue_mode,
            lifetime=reg.lifetime,
            objects=tuple(o.path for o in reg.objects),
            object_links=format_object_links(reg.objects),
            registered_at=reg.registered_at,
            last_update=reg.updated_at,
            expires_at=reg.expires_at,
            online=online,
        )

    def _fail_waiters(self, peer: _Peer, exc: Lwm2mError) -> None:
        for future in peer.waiters.values():
            if not future.done():
                future.set_exception(exc)
        peer.waiters.clear()

    def _spawn(self, coro: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("LWM2M background task failed")

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _now(self) -> float:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop.time()


def _response(message: Message, payload: bytes) -> Lwm2mResponse:
    fmt = message.opt.content_format
    return Lwm2mResponse(message.code.dotted, None if fmt is None else int(fmt), payload)


def _path(path: str, min_segments: int) -> tuple[str, ...]:
    """``/3/0/0`` → ("3", "0", "0"): 1 to 4 numeric segments (object, instance,
    resource, resource instance; LwM2M 1.1 Core §7)."""
    segments = tuple(path.strip("/").split("/")) if path.strip("/") else ()
    if not min_segments <= len(segments) <= 4 or not all(
        s.isdigit() and s.isascii() and int(s) <= _MAX_ID for s in segments
    ):
        raise InvalidRequest(f"{path!r} is not an LWM2M path like /3/0/0")
    return tuple(str(int(s)) for s in segments)


def _operation(request: Message, outcome: Outcome | None) -> str:
    if isinstance(outcome, Registered):
        return "register"
    if isinstance(outcome, Updated):
        return "update"
    if isinstance(outcome, Deregistered):
        return "deregister"
    path = tuple(request.opt.uri_path)
    if path == ("rd",):
        return "register"
    if len(path) == 2 and path[0] == "rd":
        return "deregister" if request.code == Code.DELETE else "update"
    return "other"


def _fmt(peer: Address) -> str:
    return f"[{peer[0]}]:{peer[1]}" if ":" in peer[0] else f"{peer[0]}:{peer[1]}"
