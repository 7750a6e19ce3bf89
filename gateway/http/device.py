"""HTTPS device routes: who am I, publish into the tenant's MQTT bus, read retained state.

Routes (documented in ``gateway/openapi.yaml``): ``GET /identity``,
``POST /topics/{topic}`` (``?qos=0|1&retain=true``) and ``GET /topics/{topic}``.
The upstream proxy (:mod:`gateway.http.proxy`) authenticates with the same
:class:`DeviceAuthenticator`.

**Authentication.** The TLS layer only *offers* client certificates on 8443
(management users and EST need none), so each device route requires one of:

1. a client certificate: decided like core MQTT on 8883
   (``TrustState.decide_der(chain, Listener.HTTPS)``; a resumed TLS session
   reuses its full handshake's decision), then ``Admission.admit``
   (first-connect registration, provisioned-certificate records). The
   connection is registered once in the session registry: revoking a
   certificate of the chain, disabling the device user or the anchor closes it
   (TLS close, cut after 1 s). Every request on it is decided again (a cache
   hit), so nothing is served between a trust change and the close. A
   presented certificate decides alone: when it is refused, a bearer token on
   the same request is not tried;
2. else ``Authorization: Bearer <token>``, a device access token
   (:mod:`gateway.device_tokens`), checked against the live rules per request
   (it is also EST's check for ``/simplereenroll``, through
   ``gateway.http.est.TOKEN_AUTH_HOOK``);
3. else 401. Management (Basic) credentials are never accepted here.

Certificate decisions are counted in ``mtls_gateway_handshakes_total{listener="https"}``
(once per accepted connection, once per refused request).

**Refusals** (``{"error": "security/<reason>", ...}``), by status:

* 401: no certificate and no bearer token (``unauthorized``); a certificate
  refused by the chain rules (``untrusted``, ``revoked``, ``expired``,
  ``not_yet_valid``, ``anchor_disabled``, ``malformed``, ...); a bad token
  (``invalid_token``: signature, expiry, unknown key, another tenant's key
  included, malformed), or the token of a deleted device user
  (``not_registered``); a request on a connection whose session the registry
  just closed (``session_closed``).
* 403: ``device_disabled`` (certificate or token); ``not_registered`` for a
  certificate (auto-registration off and no bulk registration).
* 503: ``crl_unavailable``, ``store_unavailable`` (with ``Retry-After``).

401 means "these credentials do not authenticate anyone" (with
``WWW-Authenticate: Bearer``); 403 means "we know who you are, and that
device may not connect".

**Retained state.** ``GET /topics/{topic}`` asks the broker itself
(:func:`protocols.mqtt.bus.read_retained`): it sees retained messages of MQTT
and HTTP devices alike, on every gateway instance, with no cache to keep
consistent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web

from gateway.admission import Admission
from gateway.device_tokens import DeviceTokens, TokenRefused
from gateway.http import jsonmodel as jm
from gateway.http.est import TOKEN_AUTH_HOOK
from gateway.http.server import ApiError, HttpContext, json_response, read_body
from gateway.sessions import CloseFn, Session
from gateway.trust_state import peer_chain_der
from protocols.mqtt import bus, topics
from protocols.mqtt.backend import Backend
from protocols.mqtt.session import TOKEN_REQUEST_TOPIC, TOKEN_RESPONSE_TOPIC
from trust.model import (
    DeviceIdentity,
    Listener,
    Reason,
    Registration,
    Rejection,
    device_username,
)
from trust.tokens import MAX_TOKEN_CHARS, TokenClaims, TokenError

__all__ = [
    "DEVICE_SERVICES",
    "DeviceAuthenticator",
    "DevicePrincipal",
    "DeviceServices",
    "device_auth",
    "register_routes",
]

log = logging.getLogger("mtls_gateway.http.device")

DEVICE_SERVICES = "device"
"""``HttpContext.extra`` key of the :class:`DeviceServices` the daemon shares."""
REALM = "mtls-gateway-devices"
SWEEP_INTERVAL = 1.0
"""Seconds between checks for closed connections (their sessions leave the registry)."""
ABORT_AFTER = 1.0
"""Seconds a killed connection gets for a clean TLS close before it is cut."""

_STATUS = {
    Reason.DEVICE_DISABLED: 403,
    Reason.NOT_REGISTERED: 403,
    Reason.CRL_UNAVAILABLE: 503,
    Reason.STORE_UNAVAILABLE: 503,
}


@dataclass(frozen=True, slots=True)
class DeviceServices:
    """What device routes need beyond :class:`HttpContext` (given by the daemon)."""

    admission: Admission
    backend: Backend | None = None
    """The MQTT backend (the daemon's, so the embedded broker is the same one)."""
    tokens: DeviceTokens | None = None
    """Device access tokens; None when ``tokens.enabled`` is off."""


@dataclass(frozen=True, slots=True)
class DevicePrincipal:
    """The device a request authenticated as."""

    tenant: str
    device_id: str
    serial: int
    """Serial of the device certificate (presented, or the one the token was issued for)."""
    method: Literal["certificate", "token"]
    identity: DeviceIdentity | None = None
    """Certificate requests: the trust decision."""
    claims: TokenClaims | None = None
    """Token requests: the verified token."""
    chain: tuple[bytes, ...] = ()
    """Certificate requests: the presented chain (DER, leaf first)."""

    @property
    def leaf_sha256(self) -> str | None:
        return hashlib.sha256(self.chain[0]).hexdigest() if self.chain else None


@dataclass(slots=True)
class _Conn:
    key: tuple[str, str, int]
    session: Session


def _unauthorized(error: str, message: str, token_error: bool = False) -> ApiError:
    challenge = f'Bearer realm="{REALM}"'
    if token_error:
        challenge += ', error="invalid_token"'  # RFC 6750 §3.1
    return ApiError(401, error, message, headers={"WWW-Authenticate": challenge})


def refusal(rejection: Rejection, *, token: bool) -> ApiError:
    """The HTTP answer to a refused certificate or token (table in the module doc)."""
    reason = rejection.reason
    status = _STATUS.get(reason, 401)
    if token and reason is Reason.NOT_REGISTERED:
        status = 401  # the device user was deleted: the token names nobody
    error = f"security/{reason.value}"
    if status == 401:
        return _unauthorized(error, rejection.message, token_error=token)
    headers = {"Retry-After": "5"} if status == 503 else None
    return ApiError(status, error, rejection.message, headers=headers)


class DeviceAuthenticator:
    """Authenticates device requests and owns their per-connection sessions."""

    def __init__(self, ctx: HttpContext, services: DeviceServices) -> None:
        self.ctx = ctx
        self.admission = services.admission
        self.tokens = services.tokens
        self._conns: dict[asyncio.Transport, _Conn] = {}
        self._sweeper: asyncio.Task[None] | None = None

    # lifecycle (app signals) ----------------------------------------------------
    async def on_startup(self, _app: web.Application) -> None:
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="https-device-sweep")

    async def on_cleanup(self, _app: web.Application) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None
        for conn in self._conns.values():
            self.ctx.registry.remove(conn.session)
        self._conns.clear()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self.sweep()

    def sweep(self) -> None:
        """Forget closed connections (aiohttp has no per-connection close hook)."""
        for transport, conn in list(self._conns.items()):
            if transport.is_closing():
                del self._conns[transport]
                self.ctx.registry.remove(conn.session)

    # authentication -------------------------------------------------------------
    async def authenticate(self, request: web.Request) -> DevicePrincipal:
        """The device of this request, or :class:`ApiError` 401/403/503."""
        transport = request.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        leaf = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if transport is not None and ssl_object is not None and leaf:
            return await self._by_certificate(request, transport, ssl_object, leaf)
        scheme, _, value = request.headers.get("Authorization", "").strip().partition(" ")
        if scheme.lower() == "bearer" and self.tokens is not None:
            return await self.authenticate_token(value.strip())
        raise _unauthorized(
            "security/unauthorized",
            "device routes need a client certificate"
            + (" or an Authorization: Bearer device access token" if self.tokens else ""),
        )

    async def _by_certificate(
        self, request: web.Request, transport: asyncio.Transport, ssl_object: Any, leaf: bytes
    ) -> DevicePrincipal:
        trust, now = self.ctx.trust, self.ctx.now()
        if ssl_object.session_reused:
            # a resumed session carries no chain: reuse its full handshake's decision
            chain: list[bytes] = [leaf]
            decision = trust.decide_resumed(leaf, Listener.HTTPS, now)
        else:
            chain = peer_chain_der(ssl_object) or [leaf]
            decision = trust.decide_der(chain, Listener.HTTPS, now)
        if isinstance(decision, Rejection):
            self.ctx.metrics.handshakes.inc(Listener.HTTPS.value, "rejected", decision.reason.value)
            log.info(
                "https device refused tenant=%s device=%s peer=%s reason=%s: %s",
                decision.tenant,
                decision.device_id,
                request.remote,
                decision.reason.value,
                decision.message,
            )
            raise refusal(decision, token=False)
        key = (decision.tenant, decision.device_id, decision.leaf_serial)
        conn = self._conns.get(transport)
        if conn is not None and conn.session.closing:
            raise _unauthorized("security/session_closed", "this connection's session was closed")
        if conn is None or conn.key != key:
            peer = _peer(transport)
            admitted = await self.admission.admit(decision, peer)
            if isinstance(admitted, Rejection):
                self.ctx.metrics.handshakes.inc(
                    Listener.HTTPS.value, "rejected", admitted.reason.value
                )
                raise refusal(admitted, token=False)
            self.ctx.metrics.handshakes.inc(Listener.HTTPS.value, "accepted", "ok")
            if conn is not None:
                self.ctx.registry.remove(conn.session)
            session = self.ctx.registry.add(admitted, peer, _closer(transport))
            self._conns[transport] = _Conn(key, session)
            log.info(
                "https device session open tenant=%s device=%s peer=%s",
                admitted.tenant,
                admitted.device_id,
                peer,
            )
        return DevicePrincipal(
            decision.tenant,
            decision.device_id,
            decision.leaf_serial,
            "certificate",
            identity=decision,
            chain=tuple(chain),
        )

    async def authenticate_token(self, token: str) -> DevicePrincipal:
        """The device of a bearer token, or :class:`ApiError` 401/403/503."""
        if self.tokens is None:
            raise _unauthorized("security/invalid_token", "device access tokens are off", True)
        if not token or len(token) > MAX_TOKEN_CHARS:
            raise _unauthorized("security/invalid_token", "malformed bearer token", True)
        try:
            claims = await self.tokens.verify(token)
        except TokenError as exc:
            # the reason only: a token is a credential and never logged
            log.info("bearer token refused: %s", exc.reason.value)
            raise _unauthorized("security/invalid_token", exc.message, True) from None
        except TokenRefused as exc:
            rejection = exc.rejection
            log.info(
                "bearer token refused tenant=%s device=%s reason=%s",
                rejection.tenant,
                rejection.device_id,
                rejection.reason.value,
            )
            raise refusal(rejection, token=True) from None
        return DevicePrincipal(
            claims.tenant, claims.device_id, claims.serial, "token", claims=claims
        )


def _peer(transport: asyncio.Transport) -> str:
    peername = transport.get_extra_info("peername")
    if isinstance(peername, tuple) and len(peername) >= 2:
        return f"{peername[0]}:{peername[1]}"
    return "unknown"


def _closer(transport: asyncio.Transport) -> CloseFn:
    """How the session registry ends a certificate-authenticated connection."""

    async def close(code: str, message: str) -> None:
        transport.close()  # TLS close_notify after what is queued
        # a peer that does not read must not hold the connection open
        asyncio.get_running_loop().call_later(ABORT_AFTER, _abort, transport)

    return close


def _abort(transport: asyncio.Transport) -> None:
    with contextlib.suppress(Exception):  # already closed cleanly is fine
        transport.abort()


_AUTH = web.AppKey("mtls_gateway_device_auth", DeviceAuthenticator)


def services_of(ctx: HttpContext) -> DeviceServices:
    """The daemon's shared services, or defaults (no MQTT backend) for a bare app."""
    found = ctx.extra.get(DEVICE_SERVICES)
    if isinstance(found, DeviceServices):
        return found
    tokens = (
        DeviceTokens(ctx.store, ctx.secrets, ctx.trust, ctx.config.tokens)
        if ctx.config.tokens.enabled
        else None
    )
    services = DeviceServices(Admission(ctx.store, ctx.metrics), None, tokens)
    ctx.extra[DEVICE_SERVICES] = services
    return services


def device_auth(app: web.Application, ctx: HttpContext) -> DeviceAuthenticator:
    """The application's one :class:`DeviceAuthenticator` (created on first use)."""
    if _AUTH not in app:
        auth = DeviceAuthenticator(ctx, services_of(ctx))
        app[_AUTH] = auth
        app.on_startup.append(auth.on_startup)
        app.on_cleanup.append(auth.on_cleanup)
    return app[_AUTH]


def register_routes(app: web.Application, ctx: HttpContext) -> None:
    """Add the device routes (explicit list: the OpenAPI file mirrors it) and
    lend EST's ``/simplereenroll`` the bearer-token check."""
    auth = device_auth(app, ctx)
    api = DeviceApi(ctx, services_of(ctx), auth)
    if auth.tokens is not None:

        async def est_token_auth(_request: web.Request, token: str) -> tuple[str, str]:
            principal = await auth.authenticate_token(token)
            return principal.tenant, principal.device_id

        ctx.extra[TOKEN_AUTH_HOOK] = est_token_auth
    routes: list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]] = [
        ("GET", "/identity", api.identity),
        ("POST", "/topics/{topic:.+}", api.publish),
        ("GET", "/topics/{topic:.+}", api.read_retained),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)


class DeviceApi:
    """The device route handlers."""

    def __init__(
        self, ctx: HttpContext, services: DeviceServices, auth: DeviceAuthenticator
    ) -> None:
        self.ctx = ctx
        self.services = services
        self.auth = auth

    async def identity(self, request: web.Request) -> web.Response:
        p = await self.auth.authenticate(request)
        user = self.ctx.trust.snapshot.device(p.tenant, p.device_id)
        certificate: dict[str, Any] = {"serialNumber": format(p.serial, "x")}
        body: dict[str, Any] = {
            "tenant": p.tenant,
            "deviceId": p.device_id,
            "user": device_username(p.device_id),
            "authentication": p.method,
            "certificate": certificate,
            "registeredVia": user.registered_via if user else None,
        }
        if p.identity is not None:
            ident = p.identity
            certificate.update(
                notBefore=jm.iso(ident.not_before),
                notAfter=jm.iso(ident.not_after),
                fingerprint=ident.leaf_fingerprint,
                trustedCertificate=ident.anchor_fingerprint,
            )
            # existing, or auto/bulk while this connection registered the device
            body["registration"] = ident.registration.value
            if user is None and ident.registration in (Registration.AUTO, Registration.BULK):
                body["registeredVia"] = ident.registration.value  # not in the snapshot yet
        if p.claims is not None:
            certificate["trustedCertificate"] = p.claims.anchor_fingerprint
            body["registration"] = "existing"
            body["token"] = {
                "issuedAt": jm.iso(p.claims.issued_at),
                "expiresAt": jm.iso(p.claims.expires_at),
            }
        return json_response(body)

    # topics --------------------------------------------------------------------
    async def publish(self, request: web.Request) -> web.Response:
        p = await self.auth.authenticate(request)
        topic = request.match_info["topic"]
        if self.services.tokens is not None and topic in (
            TOKEN_REQUEST_TOPIC,
            TOKEN_RESPONSE_TOPIC,
        ):
            raise ApiError(
                403, "topics/reserved", f"{topic} belongs to the device access token API"
            )
        mounted = self._mount(p, topic)
        qos = _qos(request.query.get("qos", "0"))
        retain = _flag(request.query.get("retain", "false"), "retain")
        # the PUBLISH must fit the packet size MQTT devices are held to
        limit = self.ctx.config.limits.max_packet_size - len(mounted.encode()) - 16
        payload = await read_body(request, max(limit, 0))
        await self._bus(
            bus.publish(self._backend(), self._session(p), mounted, payload, qos=qos, retain=retain)
        )
        self.ctx.metrics.messages.inc(Listener.HTTPS.value, "device")
        return json_response({"topic": topic, "qos": qos, "retain": retain, "size": len(payload)})

    async def read_retained(self, request: web.Request) -> web.Response:
        p = await self.auth.authenticate(request)
        topic = request.match_info["topic"]
        mounted = self._mount(p, topic)
        message = await self._bus(bus.read_retained(self._backend(), self._session(p), mounted))
        if message is None:
            raise ApiError(404, "topics/not_found", f"no retained message on topic {topic!r}")
        return web.Response(
            body=message.payload,
            content_type="application/octet-stream",
            headers={"X-MQTT-QoS": str(message.qos), "X-MQTT-Retain": "true"},
        )

    # helpers ---------------------------------------------------------------------
    @staticmethod
    def _mount(p: DevicePrincipal, topic: str) -> str:
        try:
            return topics.to_backend_topic(p.tenant, topic)
        except ValueError as exc:
            raise ApiError(400, "topics/invalid_topic", str(exc)) from None

    def _backend(self) -> Backend:
        if self.services.backend is None:
            raise ApiError(503, "topics/unavailable", "no MQTT backend on this listener")
        return self.services.backend

    def _session(self, p: DevicePrincipal) -> bus.BusSession:
        mqtt = self.ctx.config.mqtt
        # unique per call: two calls never take over each other's broker session
        client_id = f"http-{p.device_id}-{secrets.token_hex(4)}"
        return bus.BusSession(
            client_id=topics.to_backend_client_id(p.tenant, client_id),
            username=mqtt.upstream_username or None,
            password=mqtt.upstream_password.encode() if mqtt.upstream_password else None,
            max_packet_size=self.ctx.config.limits.max_packet_size,
        )

    async def _bus(
        self, call: Coroutine[Any, Any, bus.RetainedMessage | None]
    ) -> bus.RetainedMessage | None:
        try:
            async with asyncio.timeout(self.ctx.config.mqtt.connect_timeout):
                return await call
        except TimeoutError:
            raise ApiError(
                504, "topics/backend_timeout", "the MQTT broker did not answer in time"
            ) from None
        except OSError as exc:
            log.warning("MQTT backend call failed: %s", exc)
            raise ApiError(
                502, "topics/backend_unavailable", "the MQTT broker is unavailable"
            ) from None


def _qos(text: str) -> int:
    if text not in ("0", "1"):
        raise ApiError(400, "topics/invalid_qos", "qos must be 0 or 1")
    return int(text)


def _flag(text: str, name: str) -> bool:
    value = text.strip().lower()
    if value not in ("true", "false", "1", "0", ""):
        raise ApiError(400, f"topics/invalid_{name}", f"{name} must be true or false")
    return value in ("true", "1")
