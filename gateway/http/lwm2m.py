"""Server-initiated LWM2M device management over the management API.

Routes (management credentials; the tenant is the caller's or ``?tenantId=``):

* ``GET /lwm2m/endpoints`` — registered endpoints with objects, lifetime, last update;
* ``GET /lwm2m/endpoints/{endpoint}`` — one endpoint;
* ``GET /lwm2m/{endpoint}/{object}/{instance}/{resource}`` — Read (CoAP GET);
* ``PUT /lwm2m/{endpoint}/{path}`` — Write (CoAP PUT), body ``{"value": "...",
  "contentFormat": 0}`` or raw bytes;
* ``POST /lwm2m/{endpoint}/{path}`` — Execute (CoAP POST), optional arguments body.

Requests travel over the device's DTLS session; timeouts and unreachable devices
answer 504/503 (see :class:`protocols.lwm2m.server.Lwm2mError`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import re
from collections.abc import Iterator
from typing import Any

from aiohttp import web

from gateway.http.mgmt import ManagementApi, Need
from gateway.http.server import (
    MAX_JSON_BYTES,
    ApiError,
    HttpContext,
    json_response,
    read_body,
)
from protocols.lwm2m.server import EndpointInfo, Lwm2mError, Lwm2mResponse, Lwm2mServer

LWM2M_SERVICE = "lwm2m"
"""Key of the :class:`Lwm2mServer` in :attr:`HttpContext.extra`."""
AREA = "lwm2m"
_PATH = re.compile(r"^\d{1,5}(/\d{1,5}){0,3}$")


def register_routes(app: web.Application, ctx: HttpContext) -> None:
    api = Lwm2mApi(ctx)
    app.router.add_route("GET", "/lwm2m/endpoints", api.list_endpoints)
    app.router.add_route("GET", "/lwm2m/endpoints/{endpoint}", api.get_endpoint)
    app.router.add_route("GET", "/lwm2m/{endpoint}/{path:.+}", api.read)
    app.router.add_route("PUT", "/lwm2m/{endpoint}/{path:.+}", api.write)
    app.router.add_route("POST", "/lwm2m/{endpoint}/{path:.+}", api.execute)


def endpoint_json(info: EndpointInfo) -> dict[str, Any]:
    return {
        "endpoint": info.endpoint,
        "tenant": info.tenant,
        "registrationId": info.registration_id,
        "lwm2mVersion": info.lwm2m_version,
        "binding": info.binding,
        "queueMode": info.queue_mode,
        "lifetime": info.lifetime,
        "objects": list(info.objects),
        "objectLinks": info.object_links,
        "registeredAt": info.registered_at.isoformat().replace("+00:00", "Z"),
        "lastUpdate": info.last_update.isoformat().replace("+00:00", "Z"),
        "expiresAt": info.expires_at.isoformat().replace("+00:00", "Z"),
        "online": info.online,
    }


def response_json(endpoint: str, path: str, r: Lwm2mResponse) -> dict[str, Any]:
    out: dict[str, Any] = {
        "endpoint": endpoint,
        "path": "/" + path,
        "code": r.code,
        "success": r.success,
        "contentFormat": r.content_format,
        "payloadBase64": base64.b64encode(r.payload).decode(),
    }
    try:
        out["value"] = r.payload.decode("utf-8")
    except UnicodeDecodeError:
        out["value"] = None
    return out


class Lwm2mApi:
    """Handlers; access control is the management API's."""

    def __init__(self, ctx: HttpContext) -> None:
        self.ctx = ctx
        self.mgmt = ManagementApi(ctx)

    def _server(self) -> Lwm2mServer:
        server = self.ctx.extra.get(LWM2M_SERVICE)
        if not isinstance(server, Lwm2mServer):
            raise ApiError(503, f"{AREA}/disabled", "the LWM2M listener is not enabled")
        return server

    @staticmethod
    def _path(request: web.Request) -> str:
        path = request.match_info["path"].strip("/")
        if not _PATH.match(path):
            raise ApiError(
                422, f"{AREA}/invalid_path", "path must be object[/instance[/resource]] numbers"
            )
        return path

    async def list_endpoints(self, request: web.Request) -> web.Response:
        _, tenant = await self.mgmt._access(request, Need.READ)
        items = [endpoint_json(i) for i in self._server().endpoints(tenant)]
        return json_response({"endpoints": items, "statistics": {"totalElements": len(items)}})

    async def get_endpoint(self, request: web.Request) -> web.Response:
        _, tenant = await self.mgmt._access(request, Need.READ)
        with _errors():
            info = self._server().endpoint(tenant, request.match_info["endpoint"])
        return json_response(endpoint_json(info))

    async def read(self, request: web.Request) -> web.Response:
        _, tenant = await self.mgmt._access(request, Need.READ)
        endpoint, path = request.match_info["endpoint"], self._path(request)
        with _errors():
            r = await self._server().read(tenant, endpoint, path)
        return json_response(response_json(endpoint, path, r), status=_status(r))

    async def write(self, request: web.Request) -> web.Response:
        _, tenant = await self.mgmt._access(request, Need.WRITE)
        endpoint, path = request.match_info["endpoint"], self._path(request)
        value, content_format = await _value(request)
        with _errors():
            r = await self._server().write(
                tenant, endpoint, path, value, content_format=content_format
            )
        return json_response(response_json(endpoint, path, r), status=_status(r))

    async def execute(self, request: web.Request) -> web.Response:
        _, tenant = await self.mgmt._access(request, Need.WRITE)
        endpoint, path = request.match_info["endpoint"], self._path(request)
        arguments = await read_body(request, MAX_JSON_BYTES)
        with _errors():
            r = await self._server().execute(tenant, endpoint, path, arguments)
        return json_response(response_json(endpoint, path, r), status=_status(r))


def _status(r: Lwm2mResponse) -> int:
    return 200 if r.success else r.http_status


async def _value(request: web.Request) -> tuple[bytes, int]:
    body = await read_body(request, MAX_JSON_BYTES)
    if request.content_type != "application/json":
        return body, 0  # raw bytes, text/plain
    try:
        doc = json.loads(body or b"{}")
    except ValueError:
        raise ApiError(422, f"{AREA}/invalid_json", "body is not valid JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("value", doc.get("valueBase64")), str):
        raise ApiError(
            422, f"{AREA}/invalid", 'body must be {"value": "..."} or {"valueBase64": "..."}'
        )
    fmt = doc.get("contentFormat", 0)
    if not isinstance(fmt, int) or not 0 <= fmt <= 65535:
        raise ApiError(422, f"{AREA}/invalid", "contentFormat must be a CoAP content-format number")
    if isinstance(doc.get("valueBase64"), str):
        try:
            return base64.b64decode(doc["valueBase64"], validate=True), fmt
        except (binascii.Error, ValueError):
            raise ApiError(422, f"{AREA}/invalid", "valueBase64 is not base64") from None
    return str(doc["value"]).encode(), fmt


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Map LWM2M errors to JSON errors with their HTTP status."""
    try:
        yield
    except Lwm2mError as exc:
        raise ApiError(exc.http_status, f"{AREA}/{type(exc).__name__}", str(exc)) from None
