"""Upstream HTTP proxy for authenticated devices (``[[http.proxy]]`` in the config).

A request under a configured ``prefix`` is authenticated like every device
route (client certificate or bearer token, :class:`~gateway.http.device.DeviceAuthenticator`)
and forwarded to ``upstream`` + the rest of the path + the query. Bodies are
streamed both ways, never buffered whole; redirects are passed back, not
followed. Proxy settings from the environment (``HTTP_PROXY``) are ignored.

**Identity headers.** The upstream may trust the identity headers it receives
only because the gateway removes every client-supplied one first:

* removed: ``Authorization`` (the device's token is its credential for the
  gateway, not the backend's), ``Proxy-Authorization``, ``Forwarded``,
  ``Client-Cert``, ``Client-Cert-Chain``, ``X-Real-IP``, ``X-ARR-ClientCert``
  and every header starting with ``X-Tenant``, ``X-Device``, ``X-Client-Cert``,
  ``X-Client-Verify``, ``X-SSL-``, ``SSL-Client``, ``X-Forwarded-``,
  ``X-Auth-``, ``X-Remote-`` or ``X-Gateway-``; hop-by-hop headers (RFC 9110
  §7.6.1, and those named in ``Connection``), ``Host`` and ``Expect``.
* added: ``X-Tenant``, ``X-Device-Id``, ``X-Device-User``, ``X-Auth-Method``
  (``certificate`` or ``token``), ``X-Client-Cert-Serial`` (hex), and for
  certificate requests only ``X-Client-Cert-Fingerprint`` (SHA-256 of the DER,
  hex), ``Client-Cert`` and ``Client-Cert-Chain`` (RFC 9440: the leaf and the
  rest of the presented chain as ``:base64(DER):`` byte sequences);
  ``Forwarded`` (RFC 7239), ``X-Forwarded-For``, ``X-Forwarded-Proto`` and
  ``X-Forwarded-Host``.

**Failures.** No connection within ``connect_timeout`` or no response headers
(or next body chunk) within ``read_timeout``: 504. Refused or broken
connection: 502. Once the response has started, a failure can only cut the
connection (the device sees a truncated body, never a silent short one).
Protocol upgrades (WebSocket) are not proxied: ``Upgrade`` is hop-by-hop.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
from collections.abc import Iterable
from urllib.parse import unquote

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.config import ProxyRoute
from gateway.http.device import DeviceAuthenticator, DevicePrincipal, device_auth
from gateway.http.server import ApiError, HttpContext
from trust.model import device_username

__all__ = [
    "HOP_BY_HOP",
    "STRIPPED_HEADERS",
    "STRIPPED_PREFIXES",
    "UpstreamProxy",
    "forwarded_headers",
    "register_routes",
    "response_headers",
]

log = logging.getLogger("mtls_gateway.http.proxy")

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    }
)
"""RFC 9110 §7.6.1: meaningful for one connection only, never forwarded."""
STRIPPED_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "forwarded",
        "client-cert",
        "client-cert-chain",
        "x-real-ip",
        "x-arr-clientcert",
        "host",
        "expect",
    }
)
"""Request headers never forwarded as the client sent them."""
STRIPPED_PREFIXES = (
    "x-tenant",
    "x-device",
    "x-client-cert",
    "x-client-verify",
    "x-ssl-",
    "ssl-client",
    "x-forwarded-",
    "x-auth-",
    "x-remote-",
    "x-gateway-",
)
"""Request header name prefixes (lower case) dropped: identity claims only the gateway makes."""


def _connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    return {
        token.strip().lower()
        for value in headers.getall("Connection", [])
        for token in value.split(",")
        if token.strip()
    }


def _dropped(name: str, named_in_connection: set[str]) -> bool:
    lower = name.lower()
    return (
        lower in HOP_BY_HOP
        or lower in STRIPPED_HEADERS
        or lower in named_in_connection
        or lower.startswith(STRIPPED_PREFIXES)
    )


def _sf_binary(der: bytes) -> str:
    """An RFC 8941 byte sequence, as RFC 9440 carries certificates."""
    return ":" + base64.b64encode(der).decode("ascii") + ":"


def _forwarded_for(remote: str | None) -> str:
    if not remote:
        return "unknown"
    try:
        ip = ipaddress.ip_address(remote)
    except ValueError:
        return "unknown"
    # RFC 7239 §6: IPv6 addresses are bracketed and the value quoted
    return f'"[{ip}]"' if ip.version == 6 else str(ip)


def forwarded_headers(
    incoming: CIMultiDictProxy[str] | CIMultiDict[str],
    principal: DevicePrincipal,
    *,
    remote: str | None,
    host: str | None,
) -> CIMultiDict[str]:
    """The headers sent upstream: the client's minus identity and hop-by-hop ones,
    plus the gateway's trusted identity headers."""
    named = _connection_tokens(incoming)
    out: CIMultiDict[str] = CIMultiDict(
        (name, value) for name, value in incoming.items() if not _dropped(name, named)
    )
    out["X-Tenant"] = principal.tenant
    out["X-Device-Id"] = principal.device_id
    out["X-Device-User"] = device_username(principal.device_id)
    out["X-Auth-Method"] = principal.method
    out["X-Client-Cert-Serial"] = format(principal.serial, "x")
    if principal.chain:
        out["X-Client-Cert-Fingerprint"] = principal.leaf_sha256 or ""
        out["Client-Cert"] = _sf_binary(principal.chain[0])
        if len(principal.chain) > 1:
            out["Client-Cert-Chain"] = ", ".join(_sf_binary(c) for c in principal.chain[1:])
    forwarded = f"for={_forwarded_for(remote)};proto=https"
    if host and all(c.isprintable() and c not in '"\\' for c in host):
        forwarded += f';host="{host}"'
        out["X-Forwarded-Host"] = host
    out["Forwarded"] = forwarded
    if remote:
        out["X-Forwarded-For"] = remote
    out["X-Forwarded-Proto"] = "https"
    return out


def response_headers(upstream: CIMultiDictProxy[str]) -> Iterable[tuple[str, str]]:
    """The upstream's response headers minus hop-by-hop ones."""
    named = _connection_tokens(upstream)
    for name, value in upstream.items():
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in named:
            continue
        yield name, value


class UpstreamProxy:
    """Forwards authenticated device requests to the configured upstreams."""

    def __init__(self, auth: DeviceAuthenticator) -> None:
        self.auth = auth
        self._session: aiohttp.ClientSession | None = None

    async def on_cleanup(self, _app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                auto_decompress=False,  # bytes pass through as the upstream encoded them
                trust_env=False,  # never route device traffic through an env proxy
                timeout=aiohttp.ClientTimeout(total=None),
            )
        return self._session

    async def handle(self, route: ProxyRoute, request: web.Request) -> web.StreamResponse:
        principal = await self.auth.authenticate(request)
        target = _target(route, request)
        headers = forwarded_headers(
            request.headers, principal, remote=request.remote, host=request.host
        )
        timeout = aiohttp.ClientTimeout(
            total=None, connect=route.connect_timeout, sock_read=route.read_timeout
        )
        try:
            upstream = await self._client().request(
                request.method,
                target,
                headers=headers,
                data=request.content if request.body_exists else None,
                allow_redirects=False,
                timeout=timeout,
            )
        except TimeoutError:
            log.warning(
                "upstream %s timed out (%s %s)", route.upstream, request.method, route.prefix
            )
            raise ApiError(
                504, "proxy/upstream_timeout", "the upstream did not answer in time"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            log.warning("upstream %s failed: %s", route.upstream, exc)
            raise ApiError(
                502, "proxy/upstream_unavailable", "the upstream is unavailable"
            ) from None
        try:
            return await self._relay(request, upstream)
        finally:
            upstream.release()

    async def _relay(
        self, request: web.Request, upstream: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for name, value in response_headers(upstream.headers):
            response.headers.add(name, value)
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            # the status line is gone: only cutting the connection tells the device
            log.warning("proxied response cut: %s", exc)
            if request.transport is not None:
                request.transport.abort()
        return response


def _target(route: ProxyRoute, request: web.Request) -> URL:
    raw = request.rel_url.raw_path
    if raw != route.prefix and not raw.startswith(route.prefix + "/"):
        # the prefix itself percent-encoded: the raw rest would be cut at the wrong place
        raise ApiError(400, "proxy/bad_path", "the proxy prefix must not be percent-encoded")
    rest = raw[len(route.prefix) :]
    if any(seg in (".", "..") for seg in unquote(rest).split("/")):
        raise ApiError(400, "proxy/bad_path", "dot segments are not forwarded")
    url = route.upstream.rstrip("/") + rest if rest else route.upstream
    query = request.rel_url.raw_query_string
    return URL(url + ("?" + query if query else ""), encoded=True)


def register_routes(app: web.Application, ctx: HttpContext) -> None:
    """Add one route pair per ``[[http.proxy]]`` entry: the prefix and everything below."""
    routes = ctx.config.http.proxy
    if not routes:
        return
    proxy = UpstreamProxy(device_auth(app, ctx))
    app.on_cleanup.append(proxy.on_cleanup)
    for route in routes:

        async def handler(request: web.Request, route: ProxyRoute = route) -> web.StreamResponse:
            return await proxy.handle(route, request)

        app.router.add_route("*", route.prefix, handler)
        app.router.add_route("*", route.prefix + "/{tail:.*}", handler)
