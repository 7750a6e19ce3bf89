"""Objects ↔ the platform's JSON, and collection paging.

Pure functions: values and a base URL in, ``dict`` out (or validated input
values out of a request body). Times are ISO-8601 UTC with milliseconds and
``Z`` (``yyyy-MM-dd'T'HH:mm:ss.SSS'Z'``). Field names follow the spec
exactly (``autoRegistrationEnabled``, ``certInPemFormat``, …).

Updates follow the platform's clients: a PUT body is often the whole object
as last read, so read-only fields are ignored, unknown fields are ignored,
``null`` means "not given", and an omitted field keeps its value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from yarl import URL

from gateway.store.base import Page
from trust.certs import CertificateError, describe, load_certificate
from trust.model import (
    AuditRecord,
    DeviceUser,
    PendingRegistration,
    ProvisionedCertificate,
    RevocationEntry,
    RevocationSettings,
    Status,
    TrustedCertificate,
)

T = TypeVar("T")

DEFAULT_PAGE_SIZE = 5
MAX_PAGE_SIZE = 2000

TRUSTED_CERTIFICATE_EDITABLE = ("name", "status", "autoRegistrationEnabled")
"""The only fields a PUT changes (spec: "To edit a trusted certificate")."""


class InputError(ValueError):
    """A request value is unusable; ``field`` names it, the message says why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def iso(value: datetime | None) -> str | None:
    """``2024-01-17T10:48:51.000Z`` (None stays None)."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str, field: str) -> datetime:
    """ISO-8601 date or date-time; no zone means UTC."""
    raw = text.strip()
    if raw.endswith(("Z", "z")):
        raw = raw[:-1] + "+00:00"
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise InputError(
            field, f"{field} must be an ISO-8601 date or time, e.g. 2024-01-17T10:48:51.000Z"
        ) from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# input fields ------------------------------------------------------------------


def parse_bool(value: Any, field: str) -> bool:
    """JSON ``true``/``false`` or the strings ``"true"``/``"false"`` (the spec's
    upload example sends ``"autoRegistrationEnabled": "true"``)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise InputError(field, f"{field} must be true or false")


def parse_status(value: Any) -> Status:
    if isinstance(value, str) and value.strip().upper() in Status.__members__:
        return Status(value.strip().upper())
    raise InputError("status", "status must be ENABLED or DISABLED")


def parse_text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise InputError(field, f"{field} must be a string")
    return value


@dataclass(frozen=True, slots=True)
class TrustedCertificateInput:
    """The editable fields found in a body (None: not given)."""

    name: str | None = None
    status: Status | None = None
    auto_registration: bool | None = None
    pem: str | None = None


def trusted_certificate_input(body: Mapping[str, Any], *, create: bool) -> TrustedCertificateInput:
    """Read ``name``, ``status``, ``autoRegistrationEnabled`` (and on create the
    required ``certInPemFormat``); everything else in the body is ignored."""
    name = body.get("name")
    status = body.get("status")
    auto = body.get("autoRegistrationEnabled")
    pem = body.get("certInPemFormat")
    if create and (pem is None or (isinstance(pem, str) and not pem.strip())):
        raise InputError("certInPemFormat", "certInPemFormat is required (the PEM certificate)")
    return TrustedCertificateInput(
        name=None if name is None else parse_text(name, "name"),
        status=None if status is None else parse_status(status),
        auto_registration=None if auto is None else parse_bool(auto, "autoRegistrationEnabled"),
        pem=None if pem is None or not create else parse_text(pem, "certInPemFormat"),
    )


# objects --------------------------------------------------------------------------


def trusted_certificate_fields(record: TrustedCertificate) -> dict[str, Any]:
    """The platform's trusted-certificate fields (shared by the API and the CLI)."""
    out: dict[str, Any] = {
        "name": record.name,
        "status": record.status.value,
        "autoRegistrationEnabled": record.auto_registration,
        "certInPemFormat": record.pem,
        "fingerprint": record.fingerprint,
        "proofOfPossessionValid": record.proof_of_possession_valid,
        "tenantCertificateAuthority": record.tenant_ca,
        "creationTime": iso(record.created),
    }
    try:
        info = describe(load_certificate(record.pem))
    except CertificateError:
        return out
    out.update(
        subject=info.subject,
        issuer=info.issuer,
        serialNumber=info.serial_number,
        notBefore=iso(info.not_before),
        notAfter=iso(info.not_after),
        algorithmName=info.algorithm_name,
        version=info.version,
    )
    return out


def trusted_certificate_json(
    record: TrustedCertificate, base: URL, now: datetime
) -> dict[str, Any]:
    """A trusted certificate as the platform shows it. The proof-of-possession
    code appears while it is pending and still usable."""
    out = trusted_certificate_fields(record)
    if record.pop_code and record.pop_code_until and record.pop_code_until > now:
        out["proofOfPossessionUnsignedVerificationCode"] = record.pop_code
        out["proofOfPossessionVerificationCodeUsableUntil"] = iso(record.pop_code_until)
    out["self"] = str(
        base.with_path(f"/tenant/tenants/{record.tenant}/trusted-certificates/{record.fingerprint}")
    )
    return out


def revocation_json(entry: RevocationEntry) -> dict[str, Any]:
    return {"serialNumberInHex": entry.serial_hex, "revocationDate": iso(entry.revoked_at)}


def settings_json(settings: RevocationSettings) -> dict[str, Any]:
    return {"offline": settings.offline, "online": settings.online}


def device_user_json(user: DeviceUser, base: URL) -> dict[str, Any]:
    return {
        "id": user.username,
        "userName": user.username,
        "enabled": user.enabled,
        "deviceId": user.device_id,
        "registeredVia": user.registered_via,
        "creationTime": iso(user.created),
        "lastConnect": iso(user.last_connect),
        "self": str(base.with_path(f"/user/{user.tenant}/users/{user.username}")),
    }


def pending_json(pending: PendingRegistration, base: URL) -> dict[str, Any]:
    return {
        "id": pending.device_id,
        "status": "ACCEPTED",
        "authType": "CERTIFICATES",
        "enrollmentOtp": pending.otp_hash is not None,
        "attributes": dict(pending.attributes),
        "creationTime": iso(pending.created),
        "self": str(base.with_path(f"/devicecontrol/newDeviceRequests/{pending.device_id}")),
    }


def provisioned_json(cert: ProvisionedCertificate, revoked: bool) -> dict[str, Any]:
    return {
        "serialNumberInHex": cert.serial_hex,
        "notBefore": iso(cert.not_before),
        "notAfter": iso(cert.not_after),
        "fingerprint": cert.fingerprint,
        "firstSeen": iso(cert.first_seen),
        "lastSeen": iso(cert.last_seen),
        "revoked": revoked,
    }


def audit_json(record: AuditRecord, base: URL) -> dict[str, Any]:
    rid = "" if record.id is None else str(record.id)
    return {
        "id": rid,
        "type": record.type,
        "activity": record.activity,
        "text": record.text,
        "time": iso(record.time),
        "creationTime": iso(record.time),
        "user": record.user,
        "severity": record.severity,
        "application": "mtls-gateway",
        "source": {"id": record.source},
        "tenantId": record.tenant,
        "self": str(base.with_path(f"/audit/auditRecords/{rid}")),
    }


# paging ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Paging:
    """A page request plus which statistics the client asked for."""

    page: Page
    with_total_pages: bool = False
    with_total_elements: bool = False


def parse_paging(query: Mapping[str, str]) -> Paging:
    """``pageSize`` (1..2000, default 5; larger is capped like the platform),
    ``currentPage`` (from 1), ``withTotalPages``, ``withTotalElements``."""
    size = _positive_int(query.get("pageSize"), "pageSize", DEFAULT_PAGE_SIZE)
    current = _positive_int(query.get("currentPage"), "currentPage", 1)
    if current > 10_000_000:
        raise InputError("currentPage", "currentPage is too large")
    return Paging(
        Page(min(size, MAX_PAGE_SIZE), current),
        _flag(query.get("withTotalPages"), "withTotalPages"),
        _flag(query.get("withTotalElements"), "withTotalElements"),
    )


def _positive_int(text: str | None, field: str, default: int) -> int:
    if text is None or not text.strip():
        return default
    raw = text.strip()
    if not raw.isdigit() or len(raw) > 9 or int(raw) < 1:
        raise InputError(field, f"{field} must be a whole number of at least 1")
    return int(raw)


def _flag(text: str | None, field: str) -> bool:
    return False if text is None or not text.strip() else parse_bool(text, field)


def page_slice(items: Sequence[T], page: Page) -> list[T]:
    start = (page.current_page - 1) * page.page_size
    return list(items[start : start + page.page_size])


def collection(
    key: str,
    items: Sequence[T],
    render: Callable[[T], dict[str, Any]],
    url: URL,
    paging: Paging,
    total: int,
) -> dict[str, Any]:
    """A platform collection: items under ``key``, ``statistics`` and
    ``self``/``next``/``prev`` links carrying ``currentPage``. ``items`` is the
    page already; ``total`` counts every match. ``next`` is always present (the
    platform's clients read pages until one comes back empty)."""
    page = paging.page
    stats: dict[str, Any] = {"currentPage": page.current_page, "pageSize": page.page_size}
    if paging.with_total_pages:
        stats["totalPages"] = max(1, math.ceil(total / page.page_size))
    if paging.with_total_elements:
        stats["totalElements"] = total
    out: dict[str, Any] = {
        key: [render(i) for i in items],
        "statistics": stats,
        "self": _page_link(url, page, page.current_page),
        "next": _page_link(url, page, page.current_page + 1),
    }
    if page.current_page > 1:
        out["prev"] = _page_link(url, page, page.current_page - 1)
    return out


def _page_link(url: URL, page: Page, number: int) -> str:
    return str(url.update_query(pageSize=str(page.page_size), currentPage=str(number)))
