"""The aiohttp application behind the HTTPS listener, and how it is served.

* :class:`HttpContext` — what every route module receives (store, trust
  state, session registry, metrics, config, secrets, authenticator). Add a
  field with a default when your routes need something new.
* :data:`ROUTE_MODULES` — modules whose ``register_routes(app, ctx)`` adds
  routes to the HTTPS application, in order. Device routes (``/identity``,
  ``/topics/...``, EST, ``/certificate-authority``, ``/features/...``) are
  added by appending their module here; routes are registered explicitly,
  never discovered.
* :func:`error_middleware` — every response body is JSON, errors included:
  ``{"error": "<area>/<code>", "message": "..."}``, also for aiohttp's own
  404/405/413 and for unexpected exceptions (500, logged, no details leaked).
* Body helpers: :func:`read_json` (bounded; an empty body is ``{}``),
  :func:`read_multipart_file` (bounded; part ``file``, chunked or not),
  :func:`accepts` (lenient ``Accept`` parsing: vendor types, trailing ``;``).
* :class:`HttpServer` — one ``AppRunner`` + ``TCPSite``; ``bound_port``
  reports the real port when configured with port 0.

TLS: the HTTPS site uses ``TrustState.server_context(Listener.HTTPS)``, whose
client certificate is optional (the management API authenticates with HTTP
Basic; device routes check the peer chain per route with
:func:`peer_chain`).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import BodyPartReader, web
from yarl import URL

from gateway.config import Config, ListenerConfig
from gateway.metrics import GatewayMetrics
from gateway.secrets import SecretBox
from gateway.sessions import SessionRegistry
from gateway.store.base import Store, StoreUnavailable
from gateway.trust_state import TrustState, peer_chain_der
from trust.model import Listener

if TYPE_CHECKING:  # auth imports this module (ApiError)
    from gateway.http.auth import Authenticator

__all__ = [
    "CTX",
    "MANAGEMENT_ROUTE_MODULES",
    "MAX_JSON_BYTES",
    "ROUTE_MODULES",
    "ApiError",
    "HttpContext",
    "HttpServer",
    "accepts",
    "base_url",
    "build_app",
    "json_response",
    "peer_chain",
    "read_body",
    "read_json",
    "read_multipart_file",
    "start_http_servers",
]

log = logging.getLogger("mtls_gateway.http")
access_log = logging.getLogger("mtls_gateway.http.access")

ROUTE_MODULES: tuple[str, ...] = (
    "gateway.http.mgmt",
    "gateway.http.ca",
    "gateway.http.est",
    "gateway.http.device",  # /identity, /topics/... (issue 5)
    "gateway.http.lwm2m",  # /lwm2m/... server-initiated device management (issue 7)
    "gateway.http.proxy",  # [[http.proxy]] prefixes (issue 5)
)
"""Route modules of the HTTPS listener (each defines ``register_routes(app, ctx)``)."""
MANAGEMENT_ROUTE_MODULES: tuple[str, ...] = (
    "gateway.http.mgmt",
    "gateway.http.ca",
    "gateway.http.lwm2m",
)
"""Route modules of the optional plain management listener (no device routes)."""

MAX_JSON_BYTES = 4 << 20
"""Largest JSON request body (a bulk upload of many PEM certificates fits)."""
MAX_REQUEST_BYTES = 8 << 20
"""aiohttp's own cap for anything read with ``request.read()``."""
MAX_MULTIPART_PARTS = 16

JSON_CONTENT_TYPE = "application/json"


@dataclass
class HttpContext:
    """Everything route handlers may use. Extend with defaulted fields."""

    store: Store
    trust: TrustState
    registry: SessionRegistry
    metrics: GatewayMetrics
    config: Config
    secrets: SecretBox
    auth: Authenticator
    """Basic credentials → :class:`gateway.http.auth.Principal` (with login limits)."""
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    tenant_ca_signer: Callable[[str], Awaitable[Any]] | None = None
    """Hook of the tenant-CA feature: ``await hook(tenant)`` returns the tenant CA
    ``(certificate, private key)`` or None; CRLs are then signed by the tenant CA
    instead of the gateway's per-tenant CRL-signing key."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free slot for route modules that need shared state before they get a field."""

    def now(self) -> datetime:
        return self.clock()


CTX = web.AppKey("mtls_gateway_http_context", HttpContext)
_OPENAPI = web.AppKey("mtls_gateway_openapi", dict[str, bytes])


class ApiError(Exception):
    """An HTTP error answered as ``{"error": "<area>/<code>", "message": ...}``."""

    def __init__(
        self,
        status: int,
        error: str,
        message: str,
        headers: dict[str, str] | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.headers = headers or {}
        self.details = details or {}

    def response(self) -> web.Response:
        body = {"error": self.error, "message": self.message, **self.details}
        return json_response(body, status=self.status, headers=self.headers)


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """A compact JSON response (``application/json; charset=utf-8``)."""
    body = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return web.Response(
        body=body, status=status, headers=headers, content_type=JSON_CONTENT_TYPE, charset="utf-8"
    )


# errors ------------------------------------------------------------------------

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    411: "length_required",
    413: "request_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    422: "invalid",
    429: "too_many_requests",
}


def _error_from_http(exc: web.HTTPException) -> web.Response:
    code = _STATUS_CODES.get(exc.status, "error")
    message = exc.reason
    if exc.status == 404:
        message = "no such resource (see /openapi.yaml)"
    elif exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        message = f"method not allowed here; allowed: {allowed}" if allowed else message
    elif exc.status == 413:
        message = "request body is too large"
    headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
    return ApiError(exc.status, f"general/{code}", message, headers).response()


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """JSON errors for everything, and headers every API response carries."""
    try:
        response = await handler(request)
    except ApiError as exc:
        response = exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _error_from_http(exc)
    except StoreUnavailable as exc:
        log.error("store unavailable serving %s %s: %s", request.method, request.path, exc)
        response = ApiError(
            503, "general/store_unavailable", "the store is unavailable; try again later"
        ).response()
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error serving %s %s", request.method, request.path)
        response = ApiError(500, "general/internal_error", "internal server error").response()
    if not response.prepared:
        # management answers are per user and may contain certificates: never cache
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Server", "mtls-gateway")  # no library versions
    return response


# request helpers -------------------------------------------------------------------


def accepts(request: web.Request, *media_types: str) -> bool:
    """True when the ``Accept`` header explicitly names one of ``media_types``.

    Lenient on purpose: parameters, q-values, vendor types and a trailing ``;``
    are tolerated; a missing or malformed header names nothing. Never 406.
    """
    wanted = {m.lower() for m in media_types}
    for item in request.headers.getall("Accept", []):
        for part in item.split(","):
            media = part.split(";", 1)[0].strip().lower()
            if media in wanted:
                return True
    return False


def base_url(request: web.Request) -> URL:
    """``scheme://host[:port]`` of this request, for ``self`` links.

    Built from the Host header, which a peer controls: a malformed one falls
    back to the listener's own address instead of failing the request.
    """
    try:
        return request.url.origin()
    except ValueError:
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        host, port = (sockname[0], sockname[1]) if sockname else ("localhost", None)
        return URL.build(scheme=request.scheme, host=host, port=port)


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole request body, refusing (413) more than ``limit`` bytes before
    reading them when Content-Length says so, and as soon as a chunked body
    goes past it."""
    length = request.content_length
    if length is not None and length > limit:
        raise ApiError(
            413, "general/request_too_large", f"request body is larger than {limit} bytes"
        )
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.read(64 * 1024)
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise ApiError(
                413, "general/request_too_large", f"request body is larger than {limit} bytes"
            )
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: web.Request, limit: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """The body as a JSON object. An empty body is ``{}`` (clients send empty
    POSTs with ``Content-Type: application/json``); any content type is tried."""
    body = await read_body(request, limit)
    if not body.strip():
        return {}
    try:
        value = json.loads(body)
    except (ValueError, RecursionError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ApiError(
            400, "general/bad_request", f"request body is not valid JSON: {reason}"
        ) from None
    if not isinstance(value, dict):
        raise ApiError(400, "general/bad_request", "request body must be a JSON object")
    return value


async def read_multipart_file(request: web.Request, limit: int, field_name: str = "file") -> bytes:
    """The content of multipart part ``field_name`` (any content type, with or
    without a filename, chunked or not), at most ``limit`` bytes."""
    if not request.content_type.startswith("multipart/"):
        raise ApiError(
            415, "general/unsupported_media_type", "expected a multipart/form-data upload"
        )
    if request.content_length is not None and request.content_length > limit + 64 * 1024:
        raise ApiError(413, "general/request_too_large", f"upload is larger than {limit} bytes")
    budget = limit + 64 * 1024  # everything read, other parts included, counts against it
    try:
        reader = await request.multipart()
        for _ in range(MAX_MULTIPART_PARTS):
            part = await reader.next()
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise ApiError(400, "general/bad_request", "nested multipart is not supported")
            wanted = part.name == field_name
            chunks: list[bytes] = []
            size = 0
            while True:
                chunk = await part.read_chunk(64 * 1024)
                if not chunk:
                    break
                budget -= len(chunk)
                size += len(chunk)
                if budget < 0 or (wanted and size > limit):
                    raise ApiError(
                        413, "general/request_too_large", f"file is larger than {limit} bytes"
                    )
                if wanted:
                    chunks.append(chunk)
            if wanted:
                return b"".join(chunks)
    except (ApiError, web.HTTPException, asyncio.CancelledError):
        raise
    except Exception as exc:  # aiohttp raises assorted types on malformed multipart
        raise ApiError(
            400, "general/bad_request", f"malformed multipart body: {str(exc)[:200]}"
        ) from None
    raise ApiError(400, "general/bad_request", f"multipart part {field_name!r} is missing")


def peer_chain(request: web.Request) -> list[bytes] | None:
    """The client certificate chain of this request's TLS connection (DER, leaf
    first), or None without TLS or without a client certificate."""
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return None
    return peer_chain_der(ssl_object)


# application ------------------------------------------------------------------------


async def _openapi(request: web.Request) -> web.Response:
    cache = request.app[_OPENAPI]  # filled on first use: no file I/O at start-up
    if "document" not in cache:
        cache["document"] = await asyncio.to_thread(
            resources.files("gateway").joinpath("openapi.yaml").read_bytes
        )
    return web.Response(body=cache["document"], content_type="application/yaml", charset="utf-8")


def build_app(ctx: HttpContext, modules: Sequence[str] = ROUTE_MODULES) -> web.Application:
    """The application with ``/openapi.yaml`` and every module's routes."""
    app = web.Application(middlewares=[error_middleware], client_max_size=MAX_REQUEST_BYTES)
    app[CTX] = ctx
    app[_OPENAPI] = {}
    app.router.add_get("/openapi.yaml", _openapi)
    for name in modules:
        module = importlib.import_module(name)
        module.register_routes(app, ctx)
    return app


class HttpServer:
    """One aiohttp application served on one TCP address (TLS or plain)."""

    def __init__(self, app: web.Application, name: str) -> None:
        self.app = app
        self.name = name
        self.bound_port = 0
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None) -> None:
        runner = web.AppRunner(
            self.app,
            handle_signals=False,
            access_log=access_log,
            shutdown_timeout=5.0,
            keepalive_timeout=75.0,
        )
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context, backlog=512)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        self.bound_port = int(runner.addresses[0][1])
        log.info(
            "%s listening on %s:%d (%s)",
            self.name,
            host,
            self.bound_port,
            "TLS" if ssl_context else "plain HTTP",
        )

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


async def start_http_servers(
    store: Store,
    trust: TrustState,
    registry: SessionRegistry,
    metrics: GatewayMetrics,
    config: Config,
    extra: dict[str, Any] | None = None,
) -> tuple[HttpContext, dict[str, HttpServer]]:
    """Start the HTTPS listener (``listeners.https``) and, when enabled, the plain
    management listener (``listeners.management``); returns them by name.
    ``extra`` seeds :attr:`HttpContext.extra` (shared daemon services)."""
    from gateway.http.auth import Authenticator

    box = await asyncio.to_thread(SecretBox.load_or_create, config.data_dir)
    ctx = HttpContext(
        store=store,
        trust=trust,
        registry=registry,
        metrics=metrics,
        config=config,
        secrets=box,
        auth=Authenticator(store),
        extra=dict(extra or {}),
    )
    servers: dict[str, HttpServer] = {}
    try:
        https: ListenerConfig = config.listeners.https
        if https.enabled:
            server = HttpServer(build_app(ctx), "https")
            await server.start(https.host, https.port, trust.server_context(Listener.HTTPS))
            servers["https"] = server
        management: ListenerConfig = config.listeners.management
        if management.enabled:
            server = HttpServer(build_app(ctx, MANAGEMENT_ROUTE_MODULES), "management")
            await server.start(management.host, management.port, None)
            servers["management"] = server
    except BaseException:
        for server in servers.values():
            await server.stop()
        raise
    return ctx, servers
