"""Management REST API routes (spec paths and JSON field names, see ``openapi.yaml``).

Every handler authenticates (HTTP Basic, :mod:`gateway.http.auth`), picks
the tenant it acts on (the path's ``{tenantId}``, else ``?tenantId=``, else
the user's own tenant), checks access in a fixed order — 401 no or bad
credentials, 403 another tenant (unless operator) or missing role, 404
unknown tenant or object — and then calls one :mod:`gateway.operations`
function, which validates, writes the store and audits. Trust changes reach
the listeners and live sessions through the store's change feed.

Paths this module chose where the spec names none (documented in the
OpenAPI file): ``…/settings/crl-check`` (online/offline checks, also as the
platform's tenant options ``crl.offline.check.enabled`` /
``crl.online.check.enabled``), ``…/settings/crl/template``,
``…/settings/crl/signer``, ``GET /devicecontrol/newDeviceRequests``,
``/devicecontrol/devices/{deviceId}/certificates`` (``deviceId`` is the
certificate CN) and ``…/certificates/{serialNumberInHex}/revoke``.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from enum import Enum
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives.serialization import Encoding

from gateway import operations as ops
from gateway.ca_service import otp_key
from gateway.http import jsonmodel as jm
from gateway.http.auth import Principal
from gateway.http.crl import CrlSigner, build_crl, crl_signer, revocations_csv
from gateway.http.server import (
    MAX_JSON_BYTES,
    ApiError,
    HttpContext,
    accepts,
    base_url,
    json_response,
    read_body,
    read_json,
    read_multipart_file,
)
from gateway.secrets import SecretBox, SecretError
from gateway.store.base import AuditQuery, Conflict, NotFound
from trust import est
from trust.anchors import UploadError, parse_upload, validate_upload
from trust.bulk import MAX_BULK_CSV_BYTES
from trust.certs import fingerprint
from trust.model import Status, TrustedCertificate, valid_tenant_id
from trust.revocation import (
    CSV_TEMPLATE,
    MAX_BULK_ENTRIES,
    MAX_CSV_BYTES,
    RevocationInputError,
    make_entry,
)

__all__ = ["ManagementApi", "enrollment_otp_hasher", "register_routes"]

TC = "trusted-certificates"
CRL = "crl"
USERS = "user"
DEVICES = "devicecontrol"
AUDIT = "audit"
TENANT = "tenant"

MAX_BULK_CERTIFICATES = 500
CRL_OPTIONS = {"crl.offline.check.enabled": "offline", "crl.online.check.enabled": "online"}


class Need(Enum):
    """What a handler requires of the user, beyond access to the tenant."""

    ANY = "any"  # authenticated
    READ = "read"
    WRITE = "write"
    OPERATOR = "operator"  # management tenant's ROLE_TENANT_MANAGEMENT_ADMIN


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def register_routes(app: web.Application, ctx: HttpContext) -> None:
    """Add the management API to ``app`` (explicit list: the OpenAPI file mirrors it)."""
    api = ManagementApi(ctx)
    tc = "/tenant/tenants/{tenantId}/trusted-certificates"
    pop = "/tenant/tenants/{tenantId}/trusted-certificates-pop/{fingerprint}"
    crl = "/tenant/trusted-certificates/settings"
    routes: list[tuple[str, str, Handler]] = [
        ("GET", "/tenant/currentTenant", api.current_tenant),
        ("GET", "/user/currentUser", api.current_user),
        ("GET", tc, api.list_certificates),
        ("POST", tc, api.add_certificate),
        ("POST", tc + "/bulk", api.add_certificates_bulk),
        ("GET", tc + "/{fingerprint}", api.get_certificate),
        ("PUT", tc + "/{fingerprint}", api.update_certificate),
        ("DELETE", tc + "/{fingerprint}", api.delete_certificate),
        ("POST", pop + "/verification-code", api.pop_code),
        ("POST", pop + "/pop", api.pop_verify),
        ("POST", pop + "/confirmed", api.pop_confirm),
        ("POST", pop + "/unconfirmed", api.pop_unconfirm),
        ("PUT", crl + "/crl", api.put_crl),
        ("GET", crl + "/crl", api.get_crl),
        ("GET", crl + "/crl/template", api.crl_template),
        ("GET", crl + "/crl/signer", api.crl_signer_certificate),
        ("GET", crl + "/crl-check", api.get_crl_check),
        ("PUT", crl + "/crl-check", api.put_crl_check),
        ("GET", "/tenant/options/configuration/{key}", api.get_option),
        ("PUT", "/tenant/options/configuration/{key}", api.put_option),
        ("GET", "/user/{tenantId}/users", api.list_users),
        ("GET", "/user/{tenantId}/users/{userName}", api.get_user),
        ("PUT", "/user/{tenantId}/users/{userName}", api.put_user),
        ("POST", "/devicecontrol/bulkNewDeviceRequests", api.bulk_register),
        ("GET", "/devicecontrol/newDeviceRequests", api.list_pending),
        ("POST", "/devicecontrol/newDeviceRequests", api.single_registration),
        ("GET", "/devicecontrol/devices/{deviceId}/certificates", api.list_provisioned),
        (
            "POST",
            "/devicecontrol/devices/{deviceId}/certificates/{serialNumberInHex}/revoke",
            api.revoke_provisioned,
        ),
        ("GET", "/audit/auditRecords", api.list_audit),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)


def enrollment_otp_hasher(box: SecretBox) -> Callable[[str], str]:
    """Hash ``ENROLLMENT_OTP`` values the way EST enrollment verifies them: a salted
    HMAC under the KEK-derived OTP key (:func:`gateway.ca_service.otp_key`)."""
    key = otp_key(box)
    return lambda otp: est.hash_otp(otp, key)


@contextlib.contextmanager
def errors(area: str) -> Iterator[None]:
    """Map business-rule failures to JSON errors of ``area``."""
    try:
        yield
    except UploadError as exc:
        # duplicates (here or owned by a tenant that proved possession) conflict
        status = 409 if exc.rule in ("duplicate", "owned_elsewhere") else 422
        raise ApiError(
            status,
            f"{TC}/{exc.rule}",
            f"{exc.message} (rule: {exc.rule})",
            details={"rule": exc.rule},
        ) from None
    except ops.OperationError as exc:
        status = {"not_found": 404, "conflict": 409}.get(exc.code, 422)
        raise ApiError(status, f"{area}/{exc.code}", exc.message) from None
    except jm.InputError as exc:
        raise ApiError(422, f"{area}/invalid", exc.message, details={"field": exc.field}) from None
    except NotFound as exc:
        raise ApiError(404, f"{area}/not_found", str(exc)) from None
    except Conflict as exc:
        raise ApiError(409, f"{area}/conflict", str(exc)) from None


class ManagementApi:
    """The management route handlers over one :class:`HttpContext`."""

    def __init__(self, ctx: HttpContext) -> None:
        self.ctx = ctx
        self.store = ctx.store

    # access ---------------------------------------------------------------------
    async def _access(
        self, request: web.Request, need: Need, tenant: str | None = None
    ) -> tuple[Principal, str]:
        principal = await self.ctx.auth.authenticate(request)
        if tenant is None:
            tenant = request.query.get("tenantId") or principal.tenant
        if not valid_tenant_id(tenant):
            raise ApiError(404, f"{TENANT}/not_found", f"tenant {tenant[:80]!r} not found")
        if not principal.may_access(tenant):
            raise ApiError(
                403,
                "security/forbidden",
                f"user {principal.username} of tenant {principal.tenant} may not access"
                f" tenant {tenant}",
            )
        allowed = {
            Need.ANY: True,
            Need.READ: principal.can_read,
            Need.WRITE: principal.can_write,
            Need.OPERATOR: principal.is_operator,
        }[need]
        if not allowed:
            required = {
                Need.READ: "ROLE_TENANT_MANAGEMENT_READ, ROLE_TENANT_MANAGEMENT_ADMIN"
                " or ROLE_TENANT_ADMIN",
                Need.WRITE: "ROLE_TENANT_MANAGEMENT_ADMIN or ROLE_TENANT_ADMIN",
                Need.OPERATOR: "ROLE_TENANT_MANAGEMENT_ADMIN in the management tenant",
            }.get(need, "")
            raise ApiError(403, "security/forbidden", f"this requires {required}")
        if not await self.store.tenant_exists(tenant):
            raise ApiError(404, f"{TENANT}/not_found", f"tenant {tenant} not found")
        return principal, tenant

    def _now(self) -> datetime:
        return self.ctx.now()

    @staticmethod
    def _fingerprint(request: web.Request) -> str:
        try:
            return ops.normalise_fingerprint(request.match_info["fingerprint"])
        except ops.OperationError:
            raise ApiError(
                404, f"{TC}/not_found", "trusted certificate not found (bad fingerprint)"
            ) from None

    def _cert(
        self, request: web.Request, record: TrustedCertificate, status: int = 200
    ) -> web.Response:
        body = jm.trusted_certificate_json(record, base_url(request), self._now())
        headers = {"Location": body["self"]} if status == 201 else None
        return json_response(body, status, headers)

    # session --------------------------------------------------------------------
    async def current_tenant(self, request: web.Request) -> web.Response:
        principal = await self.ctx.auth.authenticate(request)
        base = base_url(request)
        return json_response(
            {
                "id": principal.tenant,
                "name": principal.tenant,
                "domainName": base.host,
                "allowCreateTenants": principal.is_operator,
                "customProperties": {},
                "self": str(base.with_path("/tenant/currentTenant")),
            }
        )

    async def current_user(self, request: web.Request) -> web.Response:
        principal = await self.ctx.auth.authenticate(request)
        base = base_url(request)
        roles = sorted(principal.roles)
        return json_response(
            {
                "id": principal.username,
                "userName": principal.username,
                "enabled": True,
                "effectiveRoles": [{"id": r, "name": r} for r in roles],
                "self": str(base.with_path("/user/currentUser")),
            }
        )

    # trusted certificates ----------------------------------------------------------
    async def list_certificates(self, request: web.Request) -> web.Response:
        _, tenant = await self._access(request, Need.READ, request.match_info["tenantId"])
        with errors(TC):
            paging = jm.parse_paging(request.query)
        records = await self.store.list_trusted_certificates(tenant)
        base, now = base_url(request), self._now()
        return json_response(
            jm.collection(
                "certificates",
                jm.page_slice(records, paging.page),
                lambda r: jm.trusted_certificate_json(r, base, now),
                base.join(request.rel_url),
                paging,
                len(records),
            )
        )

    async def add_certificate(self, request: web.Request) -> web.Response:
        principal, tenant = await self._access(request, Need.WRITE, request.match_info["tenantId"])
        body = await read_json(request)
        with errors(TC):
            value = jm.trusted_certificate_input(body, create=True)
            assert value.pem is not None
            record = await ops.add_trusted_certificate(
                self.store,
                tenant,
                value.pem,
                value.name or "",
                value.status or Status.ENABLED,
                bool(value.auto_registration),
                self._now(),
                principal.actor(tenant),
            )
        return self._cert(request, record, 201)

    async def add_certificates_bulk(self, request: web.Request) -> web.Response:
        principal, tenant = await self._access(request, Need.WRITE, request.match_info["tenantId"])
        body = await read_json(request)
        items = body.get("certificates")
        if not isinstance(items, list) or not items:
            raise ApiError(422, f"{TC}/invalid", "certificates must be a non-empty list")
        if len(items) > MAX_BULK_CERTIFICATES:
            raise ApiError(
                422, f"{TC}/invalid", f"at most {MAX_BULK_CERTIFICATES} certificates at once"
            )
        now = self._now()
        values: list[jm.TrustedCertificateInput] = []
        seen: set[str] = set()
        # validate everything first, so a bad item does not leave half a batch stored
        for i, item in enumerate(items):
            try:
                with errors(TC):
                    if not isinstance(item, dict):
                        raise jm.InputError("certificates", "each item must be a JSON object")
                    value = jm.trusted_certificate_input(item, create=True)
                    assert value.pem is not None
                    fp = fingerprint(parse_upload(value.pem))
                    if fp in seen:
                        raise UploadError("duplicate", "certificate appears twice in this request")
                    seen.add(fp)
                    copies = await self.store.find_trusted_certificates(fp)
                    validate_upload(value.pem, tenant, copies, now)
            except ApiError as exc:
                exc.message = f"certificates[{i}]: {exc.message}"
                exc.details["index"] = i
                raise
            values.append(value)
        created = []
        for value in values:
            assert value.pem is not None
            with errors(TC):
                created.append(
                    await ops.add_trusted_certificate(
                        self.store,
                        tenant,
                        value.pem,
                        value.name or "",
                        value.status or Status.ENABLED,
                        bool(value.auto_registration),
                        now,
                        principal.actor(tenant),
                    )
                )
        base = base_url(request)
        return json_response(
            {"certificates": [jm.trusted_certificate_json(r, base, now) for r in created]}, 201
        )

    async def get_certificate(self, request: web.Request) -> web.Response:
        _, tenant = await self._access(request, Need.READ, request.match_info["tenantId"])
        fp = self._fingerprint(request)
        with errors(TC):
            record = await ops.get_trusted_certificate(self.store, tenant, fp)
        return self._cert(request, record)

    async def update_certificate(self, request: web.Request) -> web.Response:
        principal, tenant = await self._access(request, Need.WRITE, request.match_info["tenantId"])
        fp = self._fingerprint(request)
        body = await read_json(request)
        with errors(TC):
            value = jm.trusted_certificate_input(body, create=False)
            record = await ops.update_trusted_certificate(
                self.store,
                tenant,
                fp,
                self._now(),
                principal.actor(tenant),
                name=value.name,
                status=value.status,
                auto_registration=value.auto_registration,
            )
        return self._cert(request, record)

    async def delete_certificate(self, request: web.Request) -> web.Response:
        principal, tenant = await self._access(request, Need.WRITE, request.match_info["tenantId"])
        fp = self._fingerprint(request)
        with errors(TC):
            await ops.delete_trusted_certificate(
                self.store, tenant, fp, self._now(), principal.actor(tenant)
            )
        return web.Response(status=204)

    # proof of possession -----------------------------------------------------------
    async def pop_code(self, request: web.Request) -> web.Response:
        _, tenant = await self._access(request, Need.WRITE, request.match_info["tenantId"])
        fp = self._fingerprint(request)
        await read_body(request, MAX_JSON_BYTES)  # any body is ignored (usually empty)
        with errors(TC):
            record = await ops.create_pop_code(self.store, tenant, fp, self._now())
        return self._cert(request, record)

    async def pop_verify(self, request: web.Request) -> web.Response:
        principal, tenant = await self._access(request, Need.WRITE, request.match_info["tenantId"])
        fp = self._fingerprint(request)
        body = await read_json(request)
        signed = body.get("proofOfPossessionSignedVerificationCode")
        if not isinstance(signed, str) or not signed.strip():
            raise ApiError(
                422,
                f"{TC}/invalid",
                "proofOfPossessionSignedVerificationCode is required: the base64 signature"
                " of the verification code (openssl dgst -sha256 -sign key code.txt |"
                " openssl base64 -A)",
                details={"field": "proofOfPossessionSignedVerificationCode"},
            )
        with errors(TC):
            record = await ops.verify_pop(
                self.store, tenant, fp, signed, self._now(), principal.actor(tenant)
            )
        return self._cert(request, record)

    async def pop_confirm(self, request: web.Request) -> web.Response:
        return await self._pop_set(request, True)

    async def pop_unconfirm(self, request: web.Request) -> web.Response:
        return await self._pop_set(request, False)

    async def _pop_set(self, request: web.Request, confirmed: bool) -> web.Response:
        # Only the operator: a tenant confirming its own possession would defeat the rule.
        principal, tenant = await self._access(
            request, Need.OPERATOR, request.match_info["tenantId"]
        )
        fp = self._fingerprint(request)
        await read_body(request, MAX_JSON_BYTES)  # any body is ignored
        with errors(TC):
            record = await ops.set_pop_confirmed(
                self.store, tenant, fp, confirmed, self._now(), principal.actor(tenant)
            )
        return self._cert(request, record)

    # revocation --------------------------------------------------------------------
    async def put_crl(self, request: web.Request) -> web.Response:
        principal, tenant = await self._access(request, Need.WRITE)
        now, actor = self._now(), principal.actor(tenant)
        if request.content_type.startswith("multipart/"):
            data = await read_multipart_file(request, MAX_CSV_BYTES)
            with errors(CRL):
                result = await ops.import_revocation_csv(self.store, tenant, data, now, actor)
            errors_json = [{"line": e.line, "message": e.message} for e in result.errors]
            return json_response(
                {
                    "added": result.added,
                    "kept": result.kept,
                    "failed": len(result.errors),
                    "errors": errors_json,
                }
            )
        body = await read_json(request)
        entries = body.get("crls")
        if not isinstance(entries, list) or not entries:
            raise ApiError(
                422,
                f"{CRL}/invalid",
                'expected {"crls": [{"serialNumberInHex": "...", "revocationDate": "..."}]}'
                " or a multipart CSV file",
            )
        if len(entries) > MAX_BULK_ENTRIES:
            raise ApiError(
                422, f"{CRL}/invalid", f"at most {MAX_BULK_ENTRIES} revocation entries at once"
            )
        requests: list[ops.RevocationRequest] = []
        for i, entry in enumerate(entries):
            serial = entry.get("serialNumberInHex") if isinstance(entry, dict) else None
            date = entry.get("revocationDate") if isinstance(entry, dict) else None
            if not isinstance(serial, str) or (date is not None and not isinstance(date, str)):
                raise ApiError(
                    422,
                    f"{CRL}/invalid",
                    f"crls[{i}]: serialNumberInHex (string) is required;"
                    " revocationDate is an optional string",
                )
            try:
                make_entry(tenant, serial, date, now)  # name the bad entry before storing any
            except RevocationInputError as exc:
                raise ApiError(422, f"{CRL}/invalid", f"crls[{i}]: {exc}") from None
            requests.append(ops.RevocationRequest(serial, date))
        with errors(CRL):
            added, kept = await ops.add_revocations(self.store, tenant, requests, now, actor)
        return json_response({"added": added, "kept": kept, "failed": 0, "errors": []})

    async def get_crl(self, request: web.Request) -> web.StreamResponse:
        _, tenant = await self._access(request, Need.READ)
        entries = await self.store.list_revocations(tenant)
        fmt = request.query.get("format", "").lower()
        if fmt == "json":
            return json_response({"crls": [jm.revocation_json(e) for e in entries]})
        if fmt == "csv" or (not fmt and accepts(request, "text/csv")):
            return web.Response(
                text=revocations_csv(entries),
                content_type="text/csv",
                headers={"Content-Disposition": f'attachment; filename="{tenant}-crl.csv"'},
            )
        if fmt not in ("", "der", "pem"):
            raise ApiError(422, f"{CRL}/invalid", "format must be der, pem, csv or json")
        now = self._now()
        signer = await self._signer(tenant)
        der = build_crl(entries, signer, now, int(now.timestamp() * 1000))
        if fmt == "pem":
            b64 = base64.encodebytes(der).decode("ascii")
            pem = f"-----BEGIN X509 CRL-----\n{b64}-----END X509 CRL-----\n"
            return web.Response(text=pem, content_type="application/x-pem-file")
        return web.Response(
            body=der,
            content_type="application/pkix-crl",
            headers={"Content-Disposition": f'attachment; filename="{tenant}.crl"'},
        )

    async def _signer(self, tenant: str) -> CrlSigner:
        try:
            return await crl_signer(
                self.store, self.ctx.secrets, tenant, self._now(), self.ctx.tenant_ca_signer
            )
        except SecretError as exc:
            raise ApiError(500, f"{CRL}/signer_unavailable", str(exc)) from None

    async def crl_template(self, request: web.Request) -> web.Response:
        await self._access(request, Need.READ)
        return web.Response(
            text=CSV_TEMPLATE,
            content_type="text/csv",
            headers={"Content-Disposition": 'attachment; filename="crl-template.csv"'},
        )

    async def crl_signer_certificate(self, request: web.Request) -> web.Response:
        _, tenant = await self._access(request, Need.READ)
        cert, _key = await self._signer(tenant)
        if request.query.get("format", "").lower() == "der" or accepts(
            request, "application/pkix-cert"
        ):
            return web.Response(
                body=cert.public_bytes(Encoding.DER), content_type="application/pkix-cert"
            )
        return web.Response(
            text=cert.public_bytes(Encoding.PEM).decode("ascii"),
            content_type="application/x-pem-file",
            headers={"Content-Disposition": f'attachment; filename="{tenant}-crl-signer.pem"'},
        )

    async def get_crl_check(self, request: web.Request) -> web.Response:
        _, tenant = await self._access(request, Need.READ)
        return json_response(jm.settings_json(await self.store.get_revocation_settings(tenant)))

    async def put_crl_check(self, request: web.Request) -> web.Response:
        principal, tenant = await self._access(request, Need.WRITE)
        body = await read_json(request)
        with errors(CRL):
            offline = (
                None if body.get("offline") is None else jm.parse_bool(body["offline"], "offline")
            )
            online = None if body.get("online") is None else jm.parse_bool(body["online"], "online")
            settings = await ops.set_revocation_settings(
                self.store,
                tenant,
                self._now(),
                principal.actor(tenant),
                offline=offline,
                online=online,
            )
        return json_response(jm.settings_json(settings))

    async def get_option(self, request: web.Request) -> web.Response:
        _, tenant = await self._access(request, Need.READ)
        key = self._option_key(request)
        settings = await self.store.get_revocation_settings(tenant)
        return json_response(self._option_json(request, key, getattr(settings, CRL_OPTIONS[key])))

    async def put_option(self, request: web.Request) -> web.Response:
        principal, tenant = await self._access(request, Need.WRITE)
        key = self._option_key(request)
        body = await read_json(request)
        with errors(CRL):
            value = jm.parse_bool(body.get("value"), "value")
            settings = await ops.set_revocation_settings(
                self.store,
                tenant,
                self._now(),
                principal.actor(tenant),
                **{CRL_OPTIONS[key]: value},
            )
        return json_response(self._option_json(request, key, getattr(settings, CRL_OPTIONS[key])))

    @staticmethod
    def _option_key(request: web.Request) -> str:
        key = request.match_info["key"]
        if key not in CRL_OPTIONS:
            raise ApiError(
                404,
                f"{TENANT}/not_found",
                f"option configuration.{key[:80]} not found (supported: {', '.join(CRL_OPTIONS)})",
            )
        return key

    @staticmethod
    def _option_json(request: web.Request, key: str, value: bool) -> dict[str, Any]:
        return {
            "category": "configuration",
            "key": key,
            "value": "true" if value else "false",
            "self": str(base_url(request).with_path(f"/tenant/options/configuration/{key}")),
        }

    # device users ------------------------------------------------------------------
    async def list_users(self, request: web.Request) -> web.Response:
        _, tenant = await self._access(request, Need.READ, request.match_info["tenantId"])
        with errors(USERS):
            paging = jm.parse_paging(request.query)
        users = await self.store.list_devices(tenant)
        base = base_url(request)
        return json_response(
            jm.collection(
                "users",
                jm.page_slice(users, paging.page),
                lambda u: jm.device_user_json(u, base),
                base.join(request.rel_url),
                paging,
                len(users),
            )
        )

    @staticmethod
    def _device_id(request: web.Request) -> str:
        name = request.match_info["userName"]
        if not name.startswith("device_") or len(name) == len("device_"):
            raise ApiError(
                404, f"{USERS}/not_found", "user not found (device users are named device_<id>)"
            )
        return name[len("device_") :]

    async def get_user(self, request: web.Request) -> web.Response:
        _, tenant = await self._access(request, Need.READ, request.match_info["tenantId"])
        device_id = self._device_id(request)
        with errors(USERS):
            user = await self.store.get_device(tenant, device_id)
        return json_response(jm.device_user_json(user, base_url(request)))

    async def put_user(self, request: web.Request) -> web.Response:
        principal, tenant = await self._access(request, Need.WRITE, request.match_info["tenantId"])
        device_id = self._device_id(request)
        body = await read_json(request)
        with errors(USERS):
            user = await self.store.get_device(tenant, device_id)
            enabled = body.get("enabled")
            # only "enabled" is editable here; other fields of a whole-object PUT are ignored
            if enabled is not None and jm.parse_bool(enabled, "enabled") != user.enabled:
                user = await ops.set_device_enabled(
                    self.store,
                    tenant,
                    device_id,
                    jm.parse_bool(enabled, "enabled"),
                    self._now(),
                    principal.actor(tenant),
                )
        return json_response(jm.device_user_json(user, base_url(request)))

    # registration ------------------------------------------------------------------
    async def bulk_register(self, request: web.Request) -> web.Response:
        principal, tenant = await self._access(request, Need.WRITE)
        if request.content_type.startswith("multipart/"):
            data = await read_multipart_file(request, MAX_BULK_CSV_BYTES)
        else:  # a bare CSV body is accepted too
            data = await read_body(request, MAX_BULK_CSV_BYTES)
        with errors(DEVICES):
            result = await ops.bulk_register(
                self.store,
                tenant,
                data,
                self._now(),
                principal.actor(tenant),
                hash_otp=enrollment_otp_hasher(self.ctx.secrets),
            )
        failures = [
            {
                "line": f.line,
                "deviceId": f.device_id,
                "failureReason": f.reason,
                "bulkNewDeviceStatus": "FAILED",
            }
            for f in result.failures
        ]
        return json_response(
            {
                "numberOfAll": result.total,
                "numberOfCreated": len(result.created),
                "numberOfSuccessful": len(result.created),
                "numberOfFailed": len(result.failures),
                "credentialUpdatedList": [],
                "failedCreationList": failures,
            },
            201,
        )

    async def list_pending(self, request: web.Request) -> web.Response:
        _, tenant = await self._access(request, Need.READ)
        with errors(DEVICES):
            paging = jm.parse_paging(request.query)
        pending = await self.store.list_pending_registrations(tenant)
        base = base_url(request)
        return json_response(
            jm.collection(
                "newDeviceRequests",
                jm.page_slice(pending, paging.page),
                lambda p: jm.pending_json(p, base),
                base.join(request.rel_url),
                paging,
                len(pending),
            )
        )

    async def single_registration(self, request: web.Request) -> web.Response:
        await self._access(request, Need.WRITE)
        raise ApiError(
            422,
            f"{DEVICES}/single_registration_unsupported",
            "single registration is not supported for devices that authenticate with"
            " certificates: use bulk registration (AUTH_TYPE=CERTIFICATES) or a trusted"
            " certificate with auto-registration",
        )

    async def list_provisioned(self, request: web.Request) -> web.Response:
        _, tenant = await self._access(request, Need.READ)
        device_id = request.match_info["deviceId"]
        with errors(DEVICES):
            await self.store.get_device(tenant, device_id)
        certs = await self.store.list_provisioned_certificates(tenant, device_id)
        revoked = {e.serial for e in await self.store.list_revocations(tenant)}
        base = base_url(request)
        return json_response(
            {
                "deviceId": device_id,
                "certificates": [jm.provisioned_json(c, c.serial in revoked) for c in certs],
                "self": str(base.join(request.rel_url)),
            }
        )

    async def revoke_provisioned(self, request: web.Request) -> web.Response:
        principal, tenant = await self._access(request, Need.WRITE)
        device_id = request.match_info["deviceId"]
        await read_body(request, MAX_JSON_BYTES)  # any body is ignored
        with errors(DEVICES):
            cert, added = await ops.revoke_provisioned_certificate(
                self.store,
                tenant,
                device_id,
                request.match_info["serialNumberInHex"],
                self._now(),
                principal.actor(tenant),
            )
        settings = await self.store.get_revocation_settings(tenant)
        return json_response(
            {
                **jm.provisioned_json(cert, True),
                "deviceId": device_id,
                "newlyRevoked": added,
                # revocation only refuses devices while the tenant's offline check is on
                "offlineCheckEnabled": settings.offline,
            }
        )

    # audit -------------------------------------------------------------------------
    async def list_audit(self, request: web.Request) -> web.Response:
        _, tenant = await self._access(request, Need.READ)
        q = request.query
        with errors(AUDIT):
            paging = jm.parse_paging(q)
            query = AuditQuery(
                tenant=tenant,
                type=q.get("type") or None,
                date_from=jm.parse_time(q["dateFrom"], "dateFrom") if q.get("dateFrom") else None,
                date_to=jm.parse_time(q["dateTo"], "dateTo") if q.get("dateTo") else None,
            )
        records, total = await self.store.list_audit(query, paging.page)
        base = base_url(request)
        return json_response(
            jm.collection(
                "auditRecords",
                records,
                lambda r: jm.audit_json(r, base),
                base.join(request.rel_url),
                paging,
                total,
            )
        )
