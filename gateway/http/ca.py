"""Tenant certificate authority routes: the feature toggle, create and renew.

Spec: "Prerequisites" (``/features/certificate-authority``), "Creating a CA
certificate via REST", "Auto-renewal of CA certificates". Access follows the
management API (:mod:`gateway.http.mgmt`): 401 without valid credentials,
403 for another tenant or a missing role, 404 for an unknown tenant. The
work is :class:`gateway.ca_service.CaService`'s.

* ``GET /features/certificate-authority`` — any user of the tenant.
* ``PUT /features/certificate-authority/by-tenant`` — ``ROLE_TENANT_ADMIN``
  or ``ROLE_TENANT_MANAGEMENT_ADMIN`` of the tenant (``{"active": bool}``).
* ``PUT /features/certificate-authority/by-tenant/{tenantId}`` — an operator
  (``ROLE_TENANT_MANAGEMENT_ADMIN`` of the management tenant).
* ``POST /certificate-authority`` — 201, the CA as a trusted certificate
  (``tenantCertificateAuthority: true``); 409 when the tenant has one.
* ``POST /certificate-authority/renew`` — 200 with the renewed CA; 409 while
  24 months or more remain.

The tenant acted on is the user's own, or ``?tenantId=`` for an operator.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from aiohttp import web

from gateway.ca_service import FEATURE_KEY, CaExists, CaService, ca_service_for
from gateway.http import jsonmodel as jm
from gateway.http.auth import Principal
from gateway.http.server import ApiError, HttpContext, base_url, json_response, read_json
from gateway.secrets import SecretError
from trust.ca import CaError, RenewalNotAllowed, platform_subject
from trust.certs import load_certificate
from trust.model import TrustedCertificate, valid_tenant_id

__all__ = ["FEATURE_PHASE", "register_routes"]

AREA = "certificate-authority"
FEATURE_PHASE = "GENERALLY_AVAILABLE"
"""The spec's example shows ``PUBLIC_PREVIEW``; its caution note announces the
move to general availability, which is what this implementation provides."""

_ERROR_CODES = {403: "forbidden", 404: "not_found", 409: "conflict", 500: "internal_error"}


def register_routes(app: web.Application, ctx: HttpContext) -> None:
    """Add the CA routes (also served on the plain management listener)."""
    api = CaApi(ctx)
    feature = "/features/certificate-authority"
    app.router.add_get(feature, api.get_feature)
    app.router.add_put(feature + "/by-tenant", api.put_feature)
    app.router.add_put(feature + "/by-tenant/{tenantId}", api.put_feature_for)
    app.router.add_post("/certificate-authority", api.create)
    app.router.add_post("/certificate-authority/renew", api.renew)


class CaApi:
    """Handlers over one :class:`HttpContext` and its :class:`CaService`."""

    def __init__(self, ctx: HttpContext) -> None:
        self.ctx = ctx
        self.service: CaService = ca_service_for(ctx)

    async def _access(
        self,
        request: web.Request,
        *,
        write: bool,
        operator: bool = False,
        tenant: str | None = None,
    ) -> tuple[Principal, str]:
        principal: Principal = await self.ctx.auth.authenticate(request)
        if tenant is None:
            tenant = request.query.get("tenantId") or principal.tenant
        if not valid_tenant_id(tenant):
            raise ApiError(404, "tenant/not_found", f"tenant {tenant[:80]!r} not found")
        if not principal.may_access(tenant):
            raise ApiError(
                403,
                "security/forbidden",
                f"user {principal.username} of tenant {principal.tenant} may not access"
                f" tenant {tenant}",
            )
        if operator and not principal.is_operator:
            raise ApiError(
                403,
                "security/forbidden",
                "this requires ROLE_TENANT_MANAGEMENT_ADMIN in the management tenant",
            )
        if write and not principal.can_write:
            raise ApiError(
                403,
                "security/forbidden",
                "this requires ROLE_TENANT_ADMIN or ROLE_TENANT_MANAGEMENT_ADMIN",
            )
        if not await self.ctx.store.tenant_exists(tenant):
            raise ApiError(404, "tenant/not_found", f"tenant {tenant} not found")
        return principal, tenant

    # feature toggle -------------------------------------------------------------
    @staticmethod
    def _feature_json(active: bool) -> dict[str, Any]:
        return {"key": FEATURE_KEY, "active": active, "phase": FEATURE_PHASE, "strategy": "TENANT"}

    async def get_feature(self, request: web.Request) -> web.Response:
        _, tenant = await self._access(request, write=False)
        return json_response(self._feature_json(await self.service.feature_active(tenant)))

    async def put_feature(self, request: web.Request) -> web.Response:
        principal, tenant = await self._access(request, write=True)
        return await self._set_feature(request, principal, tenant)

    async def put_feature_for(self, request: web.Request) -> web.Response:
        principal, tenant = await self._access(
            request, write=True, operator=True, tenant=request.match_info["tenantId"]
        )
        return await self._set_feature(request, principal, tenant)

    async def _set_feature(
        self, request: web.Request, principal: Principal, tenant: str
    ) -> web.Response:
        body = await read_json(request)
        if "active" not in body:
            raise ApiError(422, f"{AREA}/invalid", 'expected {"active": true} or {"active": false}')
        try:
            active = jm.parse_bool(body["active"], "active")
        except jm.InputError as exc:
            raise ApiError(422, f"{AREA}/invalid", exc.message) from None
        active = await self.service.set_feature(
            tenant, active, self.ctx.now(), principal.actor(tenant)
        )
        return json_response(self._feature_json(active))

    # the CA ----------------------------------------------------------------------
    async def _require_feature(self, tenant: str) -> None:
        if not await self.service.feature_active(tenant):
            raise ApiError(
                403,
                f"{AREA}/feature_disabled",
                f"the certificate-authority feature is disabled for tenant {tenant}: enable it"
                " with PUT /features/certificate-authority/by-tenant",
            )

    async def create(self, request: web.Request) -> web.Response:
        principal, tenant = await self._access(request, write=True)
        await read_json(request)  # no fields; still bounded and well-formed
        await self._require_feature(tenant)
        now = self.ctx.now()
        try:
            record = await self.service.create(tenant, now, principal.actor(tenant))
        except CaError as exc:
            raise _api_error(exc) from None
        body = _ca_json(record, request, now)
        return json_response(body, 201, {"Location": body["self"]})

    async def renew(self, request: web.Request) -> web.Response:
        principal, tenant = await self._access(request, write=True)
        await read_json(request)
        await self._require_feature(tenant)
        now = self.ctx.now()
        try:
            record = await self.service.renew(tenant, now, principal.actor(tenant))
        except CaError as exc:
            raise _api_error(exc) from None
        except SecretError as exc:  # pragma: no cover - load() maps key problems to CaError
            raise ApiError(500, f"{AREA}/internal_error", str(exc)) from None
        return json_response(_ca_json(record, request, now))


def _ca_json(record: TrustedCertificate, request: web.Request, now: datetime) -> dict[str, Any]:
    """The trusted-certificate JSON, subject and issuer spelt as the spec's CA
    example (``"CN=t1, O=mtls-gateway"``: RFC 4514 order, ", " between RDNs)."""
    body = jm.trusted_certificate_json(record, base_url(request), now)
    cert = load_certificate(record.pem)
    body["subject"] = platform_subject(cert.subject)
    body["issuer"] = platform_subject(cert.issuer)
    return body


def _api_error(exc: CaError) -> ApiError:
    if isinstance(exc, CaExists):
        code = "exists"
    elif isinstance(exc, RenewalNotAllowed):
        code = "renewal_not_due"
    else:
        code = _ERROR_CODES.get(exc.status, "invalid")
    return ApiError(exc.status, f"{AREA}/{code}", exc.message)
