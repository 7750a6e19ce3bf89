"""HTTP on the 8443 listener: the management REST API now, device routes later.

One aiohttp application (:func:`gateway.http.server.build_app`) served with
the gateway's TLS context, whose client certificate is optional: management
users authenticate with HTTP Basic (:mod:`gateway.http.auth`), device routes
will check the TLS peer chain per route. Every response body is JSON, errors
included (``{"error": "<area>/<code>", "message": ...}``).

Modules:

* :mod:`~gateway.http.server` — ``HttpContext``, the app factory, the JSON
  error middleware, bounded body readers, ``HttpServer`` (runner + site).
* :mod:`~gateway.http.auth` — Basic credentials, argon2 verification with a
  short-lived cache, failed-login limits (429), roles and tenant access.
* :mod:`~gateway.http.mgmt` — the management routes; each calls one
  :mod:`gateway.operations` function (validation + store + audit).
* :mod:`~gateway.http.jsonmodel` — objects ↔ the platform's JSON, paging.
* :mod:`~gateway.http.crl` — the tenant's revocations as a signed DER CRL.
* :mod:`~gateway.http.device` — device routes (``/identity``, ``/topics/...``):
  client certificate or device access token per request, never Basic.
* :mod:`~gateway.http.proxy` — ``[[http.proxy]]`` prefixes forwarded upstream
  for authenticated devices, with trusted identity headers.

To add routes (``/identity``, EST, ``/certificate-authority``, …) write a
module with ``register_routes(app, ctx)`` and append it to
``server.ROUTE_MODULES``; document every route in ``gateway/openapi.yaml``.
"""

from gateway.http.server import (
    ROUTE_MODULES,
    ApiError,
    HttpContext,
    HttpServer,
    build_app,
    start_http_servers,
)

__all__ = [
    "ROUTE_MODULES",
    "ApiError",
    "HttpContext",
    "HttpServer",
    "build_app",
    "start_http_servers",
]
