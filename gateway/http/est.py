"""EST (RFC 7030) on the HTTPS listener: the tenant CA issues device certificates.

Spec: "Simple device enrollment", "Enroll a device certificate", "Re-enroll a
device certificate", "What to do when the enrollment process has been
compromised". The request logic is the sans-IO :mod:`trust.est` and
:mod:`trust.ca`; the CA comes from :class:`gateway.ca_service.CaService`.

Routes (each also under ``/.well-known/est/<tenantId>/…``, the RFC 7030
§3.2.2 label naming the tenant):

* ``GET /.well-known/est/cacerts`` — the tenant CA, certs-only PKCS#7
  (base64). No authentication (RFC 7030 §4.1.1); the tenant comes from the
  label, ``?tenantId=``, a Basic ``<tenant>/…`` user or a client certificate.
* ``POST /.well-known/est/simpleenroll`` — Basic ``<tenant>/<device id>:<OTP>``
  (or ``<device id>:<OTP>`` with the tenant in the label or ``?tenantId=``),
  body a base64 PKCS#10 CSR whose CN is the device id. The OTP is the bulk
  registration's ``ENROLLMENT_OTP``; it works once: the pending request is
  consumed atomically, and only when a certificate is issued (a refused CSR
  leaves it usable). 201 with the certificate as certs-only PKCS#7, or PEM
  with ``Accept: application/pkcs10``. The device user is registered
  (``registeredVia: est``), an audit record names the serial, and the
  certificate is listed among the device's provisioned certificates.
* ``POST /.well-known/est/simplereenroll`` — the same CN, authenticated by,
  in this order: the device's current certificate (TLS client certificate
  accepted by the trust policy, so revoked or disabled devices are refused),
  a device access token (``Authorization: Bearer``, through the hook
  :data:`TOKEN_AUTH_HOOK`), or Basic credentials. Device users have no
  password in this gateway (devices authenticate with certificates), so the
  spec's "password" is the one credential a device can hold before it has a
  certificate: the OTP of its pending request, which is then consumed as
  for ``/simpleenroll``. The old certificate stays valid until it expires or
  is revoked.

Refusals: 401 with the spec's "No newDeviceRequest found …" for an unknown
device, a wrong or used OTP (one answer for all, so device ids cannot be
probed); 400 for an unusable CSR; 403 when the CN is another device's, when
auto-registration is off on the tenant CA (the spec's way to stop
enrollments at once) or the feature is off; 409 "Tenant CA certificate is
either missing, expired, or has a validity of less than one year"; 500
"Failed to retrieve tenant keypair". Failed authentications are limited per
source address (``[ca] est_auth_failures`` per ``est_auth_window``, then 429
with ``Retry-After``). OTPs and keys are never logged.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

from aiohttp import web
from cryptography import x509

from gateway.ca_service import CaService, SigningCa, ca_service_for
from gateway.http.auth import REALM, FailureLimiter, parse_basic
from gateway.http.server import ApiError, HttpContext, peer_chain, read_body
from gateway.store.base import NotFound, StoreError
from trust import est
from trust.ca import CaError, ca_usable_for_enrollment, sign_device_certificate
from trust.certs import fingerprint
from trust.model import (
    AuditRecord,
    DeviceIdentity,
    Listener,
    PendingRegistration,
    ProvisionedCertificate,
    Registration,
    Status,
    device_username,
    valid_tenant_id,
)

__all__ = ["TOKEN_AUTH_HOOK", "EstApi", "TokenAuth", "register_routes"]

log = logging.getLogger("mtls_gateway.est")

AREA = "est"
TOKEN_AUTH_HOOK = "est.device_token_auth"  # noqa: S105 - a dictionary key, not a secret
"""Key in :attr:`HttpContext.extra` of the device-access-token check for
``/simplereenroll``: ``await hook(request, token)`` returns ``(tenant,
device_id)`` of a valid token or raises :class:`ApiError` (401). Installed by
the device API module; without it a Bearer token is refused with 401."""

TokenAuth = Callable[[web.Request, str], Awaitable[tuple[str, str]]]

_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 409: "conflict"}


def register_routes(app: web.Application, ctx: HttpContext) -> None:
    """Add the EST routes, plain and with the tenant as RFC 7030 label."""
    api = EstApi(ctx)
    for prefix in ("/.well-known/est", "/.well-known/est/{label}"):
        app.router.add_get(prefix + "/cacerts", api.cacerts)
        app.router.add_post(prefix + "/simpleenroll", api.simpleenroll)
        app.router.add_post(prefix + "/simplereenroll", api.simplereenroll)


@dataclass(frozen=True, slots=True)
class _Requester:
    """Who asked for a certificate, once authenticated."""

    tenant: str
    device_id: str
    method: str
    """``otp``, ``certificate`` or ``token`` (audit text)."""
    pending: PendingRegistration | None = None
    """The pending request whose OTP was presented: consumed when a certificate is issued."""
    registration: Registration = Registration.EXISTING
    """For ``certificate``: whether the device user is still to be created."""


def _error(exc: CaError) -> ApiError:
    """A refusal of :mod:`trust.est` / :mod:`trust.ca` as a JSON error."""
    headers = {}
    if exc.status == 401:
        headers["WWW-Authenticate"] = f'Basic realm="{REALM}", charset="UTF-8"'
    code = _CODES.get(exc.status, "error")
    return ApiError(exc.status, f"{AREA}/{code}", exc.message, headers)


class EstApi:
    """The EST handlers over one :class:`HttpContext`."""

    def __init__(self, ctx: HttpContext, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.ctx = ctx
        self.service: CaService = ca_service_for(ctx)
        cfg = ctx.config.ca
        self.failures = FailureLimiter(cfg.est_auth_failures, cfg.est_auth_window)
        self._monotonic = monotonic

    # /cacerts ---------------------------------------------------------------------
    async def cacerts(self, request: web.Request) -> web.Response:
        tenant = self._tenant_hint(request)
        if tenant is None:
            chain = _client_chain(request)
            decision = self.ctx.trust.decide_der(chain, Listener.HTTPS, self.ctx.now())
            if isinstance(decision, DeviceIdentity):
                tenant = decision.tenant
        if tenant is None:
            raise ApiError(
                400,
                f"{AREA}/bad_request",
                "name the tenant: GET /.well-known/est/<tenantId>/cacerts or ?tenantId=<tenantId>",
            )
        records = []
        if valid_tenant_id(tenant):
            records = [
                r for r in await self.service.ca_records(tenant) if r.status is Status.ENABLED
            ]
        if not records:
            raise ApiError(
                404, f"{AREA}/not_found", f"tenant {tenant} has no certificate authority"
            )
        certs = [x509.load_pem_x509_certificate(r.pem.encode("ascii")) for r in records]
        return _pkcs7_response(est.cacerts_response(certs), 200)

    # /simpleenroll ------------------------------------------------------------------
    async def simpleenroll(self, request: web.Request) -> web.Response:
        address = self._admit(request)
        header = request.headers.get("Authorization", "")
        if not header.lower().startswith("basic "):
            raise _unauthorized(
                "authenticate with HTTP Basic <tenant>/<device id>:<enrollment OTP>"
            )
        requester = await self._otp_requester(request, header, address)
        return await self._enroll(request, requester, address)

    # /simplereenroll ----------------------------------------------------------------
    async def simplereenroll(self, request: web.Request) -> web.Response:
        address = self._admit(request)
        header = request.headers.get("Authorization", "")
        scheme = header.split(" ", 1)[0].lower()
        chain = _client_chain(request)
        if chain:
            requester = self._certificate_requester(chain, address)
        elif scheme == "bearer":
            requester = await self._token_requester(request, header, address)
        elif scheme == "basic":
            requester = await self._otp_requester(request, header, address)
        else:
            raise _unauthorized(
                "re-enrollment needs the device's current certificate (TLS client"
                " certificate), its access token (Bearer) or Basic"
                " <tenant>/<device id>:<enrollment OTP>"
            )
        return await self._enroll(request, requester, address)

    # authentication -----------------------------------------------------------------
    def _admit(self, request: web.Request) -> str:
        """429 while the source address is over its failure limit."""
        address = request.remote or "unknown"
        if self.failures.retry_after(address, self._monotonic()) > 0:
            raise self._too_many(address)
        return address

    def _too_many(self, address: str) -> ApiError:
        wait = self.failures.retry_after(address, self._monotonic())
        return ApiError(
            429,
            "general/too_many_requests",
            "too many failed EST authentications from this address; try again later",
            {"Retry-After": str(max(1, math.ceil(wait)))},
        )

    def _failed(self, address: str) -> None:
        if self.failures.failure(address, self._monotonic()):
            log.warning("EST authentication failures from %s reached the limit", address)

    def _tenant_hint(self, request: web.Request) -> str | None:
        """The tenant named by the label or ``?tenantId=`` (None when neither)."""
        label = request.match_info.get("label") or None
        query = request.query.get("tenantId") or None
        if label and query and label != query:
            raise ApiError(
                400, f"{AREA}/bad_request", "the path label and tenantId name different tenants"
            )
        return label or query

    async def _otp_requester(self, request: web.Request, header: str, address: str) -> _Requester:
        creds = parse_basic(header)  # 401 on malformed credentials
        hint = self._tenant_hint(request)
        if creds.tenant is not None and hint is not None and creds.tenant != hint:
            raise ApiError(
                400, f"{AREA}/bad_request", "the credentials and the URL name different tenants"
            )
        tenant = creds.tenant or hint
        if tenant is None:
            raise _unauthorized(
                "name the tenant: Basic <tenant>/<device id>:<OTP>, or"
                " /.well-known/est/<tenantId>/simpleenroll with <device id>:<OTP>"
            )
        device_id = creds.username
        pending = await self._pending(tenant, device_id)
        # Re-checked after the await above; from here to the count below nothing
        # interleaves (the OTP check is an HMAC, microseconds), so parallel
        # guesses cannot slip past the limit, while parallel *valid*
        # enrollments from one address (a factory line) are never counted.
        if self.failures.retry_after(address, self._monotonic()) > 0:
            raise self._too_many(address)
        key = self.service.otp_key
        if not est.verify_otp(pending.otp_hash if pending else None, creds.password, key):
            self._failed(address)
            log.info("EST enrollment refused for %s/%s from %s: no request or wrong OTP",
                     tenant[:64], device_id[:64], address)  # fmt: skip
            raise _error(est.no_request())
        return _Requester(tenant, device_id, "otp", pending=pending)

    async def _pending(self, tenant: str, device_id: str) -> PendingRegistration | None:
        """The pending request, from the trust snapshot or (just registered) the store."""
        if not valid_tenant_id(tenant) or not device_id or len(device_id) > 256:
            return None
        pending = self.ctx.trust.snapshot.pending_registration(tenant, device_id)
        if pending is not None:
            return pending
        try:
            return await self.ctx.store.get_pending_registration(tenant, device_id)
        except NotFound:
            return None

    def _certificate_requester(self, chain: list[bytes], address: str) -> _Requester:
        decision = self.ctx.trust.decide_der(chain, Listener.HTTPS, self.ctx.now())
        if not isinstance(decision, DeviceIdentity):
            self._failed(address)
            raise ApiError(
                401,
                f"{AREA}/unauthorized",
                f"the client certificate is not accepted ({decision.reason.value}):"
                f" {decision.message}",
            )
        return _Requester(
            decision.tenant,
            decision.device_id,
            "certificate",
            registration=decision.registration,
        )

    async def _token_requester(self, request: web.Request, header: str, address: str) -> _Requester:
        hook = self.ctx.extra.get(TOKEN_AUTH_HOOK)
        if hook is None:
            self._failed(address)
            raise ApiError(
                401,
                f"{AREA}/unauthorized",
                "device access tokens are not accepted by this gateway; re-enroll with the"
                " device's current certificate",
            )
        token = header.split(" ", 1)[1].strip() if " " in header else ""
        try:
            tenant, device_id = await hook(request, token)
        except ApiError:
            self._failed(address)
            raise
        return _Requester(tenant, device_id, "token")

    # issuing ------------------------------------------------------------------------
    async def _enroll(
        self, request: web.Request, requester: _Requester, address: str
    ) -> web.Response:
        body = await read_body(request, est.MAX_CSR_BYTES)
        try:
            csr = est.decode_csr(body, request.headers.get("Content-Transfer-Encoding"))
        except CaError as exc:
            raise _error(exc) from None
        now = self.ctx.now()
        ca = await self._signing_ca(requester)
        try:
            # Checks the CSR (key, proof of possession, CN == device id: 400/403)
            # before signing; its signature is verified once, here.
            cert = sign_device_certificate(csr, ca.certificate, ca.key, requester.device_id, now)
        except CaError as exc:
            raise _error(exc) from None
        await self._commit(requester, cert, now, address)
        response = est.enroll_response(cert, request.headers.get("Accept"))
        if response.content_transfer_encoding is None:
            return web.Response(
                status=201, body=response.body, headers={"Content-Type": response.content_type}
            )
        return _pkcs7_response(response.body, 201)

    async def _signing_ca(self, requester: _Requester) -> SigningCa:
        tenant = requester.tenant
        if not await self.service.feature_active(tenant, cached=True):
            raise ApiError(
                403,
                f"{AREA}/feature_disabled",
                f"the certificate-authority feature is disabled for tenant {tenant}",
            )
        try:
            ca = await self.service.signing_ca(tenant)
        except CaError as exc:
            raise _error(exc) from None
        if not ca_usable_for_enrollment(ca.certificate, self.ctx.now()):
            raise _error(est.ca_unavailable())
        if ca.record.status is not Status.ENABLED:
            raise ApiError(
                409,
                f"{AREA}/conflict",
                f"{est.CA_UNAVAILABLE}: the tenant CA certificate is disabled",
            )
        new_device = (
            requester.pending is not None or requester.registration is not Registration.EXISTING
        )
        # Spec ("enrollment process has been compromised"): turning off
        # auto-registration on the tenant CA stops new registrations at once.
        if new_device and not ca.record.auto_registration:
            raise ApiError(
                403,
                f"{AREA}/registration_disabled",
                "enrollment of new devices is suspended: auto-registration is off on the"
                " tenant CA certificate",
            )
        return ca

    async def _commit(
        self, requester: _Requester, cert: x509.Certificate, now: datetime, address: str
    ) -> None:
        """Register (spending the OTP), audit, record; the certificate is then sent.

        ``register_device`` creates the device user and deletes its pending
        request in one transaction: ``created`` is the atomic gate that lets
        exactly one of several concurrent requests with the same OTP through
        (a pending request and its device user never coexist). A refused
        request, or a store failure here, leaves the OTP usable.
        """
        tenant, device_id = requester.tenant, requester.device_id
        store = self.ctx.store
        registered = ""
        if requester.pending is not None or requester.registration is not Registration.EXISTING:
            via = "est" if requester.pending is not None else requester.registration.value
            user, created = await store.register_device(tenant, device_id, via, now)
            if requester.pending is not None and not created:
                raise _error(est.no_request())  # spent by a concurrent request a moment ago
            if not user.enabled:
                raise ApiError(403, f"{AREA}/forbidden", f"device user {user.username} is disabled")
            registered = f"; device user {user.username} registered ({via})" if created else ""
        activity, kind, text = est.enrollment_audit(device_id, cert.serial_number)
        how = {"otp": "enrollment OTP", "certificate": "current certificate", "token": "token"}
        text += f" (authenticated by {how[requester.method]}, from {address}){registered}"
        try:
            # One record per certificate (spec: "What to do when the enrollment
            # process has been compromised"); it also tells of the registration.
            await store.add_audit(
                AuditRecord(
                    tenant=tenant,
                    type=kind,
                    activity=activity,
                    text=text,
                    time=now,
                    user=device_username(device_id),
                    source=device_id,
                )
            )
            await store.record_provisioned_certificate(
                ProvisionedCertificate(
                    tenant=tenant,
                    device_id=device_id,
                    serial=cert.serial_number,
                    not_before=cert.not_valid_before_utc,
                    not_after=cert.not_valid_after_utc,
                    fingerprint=fingerprint(cert),
                    first_seen=now,
                    last_seen=now,
                )
            )
        except StoreError as exc:
            # The OTP is spent and the device registered: refusing now would lock
            # it out. The certificate is issued; the missing record is logged.
            log.error("EST: could not record certificate %x of %s/%s: %s",
                      cert.serial_number, tenant, device_id, exc)  # fmt: skip
        log.info("EST: issued certificate %x to %s/%s (%s, from %s)",
                 cert.serial_number, tenant, device_id, requester.method, address)  # fmt: skip


def _client_chain(request: web.Request) -> list[bytes] | None:
    """The TLS client certificate chain, None when the client sent none.

    Checked with ``getpeercert`` first: without a client certificate,
    Python 3.11's ``get_unverified_chain()`` returns ``[None]``, which
    :func:`gateway.http.server.peer_chain` does not expect.
    """
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None or not ssl_object.getpeercert(binary_form=True):
        return None
    return peer_chain(request)


def _unauthorized(message: str) -> ApiError:
    return ApiError(
        401,
        f"{AREA}/unauthorized",
        message,
        {"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'},
    )


def _pkcs7_response(body: bytes, status: int) -> web.Response:
    return web.Response(
        status=status,
        body=body,
        headers={"Content-Type": est.CONTENT_TYPE_PKCS7, "Content-Transfer-Encoding": "base64"},
    )
