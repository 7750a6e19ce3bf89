"""Management operations shared by the CLI and the management API.

Each write operation validates its input with the ``trust`` functions, writes
the store and appends an audit record, in that order. Business-rule failures
raise :class:`OperationError` (a stable ``code`` plus a message safe to show);
trusted-certificate uploads raise :class:`trust.anchors.UploadError` whose
``rule`` names the upload rule that failed. Audit text never contains a
private key, a password or a password hash.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NamedTuple

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from cryptography import x509

from gateway.store.base import Conflict, NotFound, Store
from trust.anchors import UploadError, new_trusted_certificate, parse_upload, validate_upload
from trust.bulk import BulkCsvError, BulkFailure, parse_bulk_csv
from trust.certs import (
    CertificateError,
    common_name,
    fingerprint,
    load_certificate,
    parse_serial_hex,
)
from trust.model import (
    AdminUser,
    AuditRecord,
    DeviceUser,
    PendingRegistration,
    ProvisionedCertificate,
    RevocationEntry,
    RevocationSettings,
    Status,
    TrustedCertificate,
    valid_tenant_id,
)
from trust.pop import new_verification_code, verify_signed_code
from trust.revocation import (
    MAX_BULK_ENTRIES,
    RevocationInputError,
    RowError,
    make_entry,
    parse_csv,
)

__all__ = [
    "AUDIT_BULK",
    "AUDIT_CRL",
    "AUDIT_DEVICE",
    "AUDIT_TENANT",
    "AUDIT_TRUSTED_CERTIFICATE",
    "AUDIT_USER",
    "BulkRegistrationResult",
    "CsvImportResult",
    "OperationError",
    "RevocationRequest",
    "UploadError",
    "add_revocations",
    "add_trusted_certificate",
    "bulk_register",
    "create_admin_user",
    "create_pop_code",
    "create_tenant",
    "delete_trusted_certificate",
    "get_trusted_certificate",
    "hash_password",
    "import_revocation_csv",
    "normalise_fingerprint",
    "register_device",
    "require_tenant",
    "revoke_provisioned_certificate",
    "set_device_enabled",
    "set_pop_confirmed",
    "set_revocation_settings",
    "update_trusted_certificate",
    "verify_admin_password",
    "verify_pop",
]

AUDIT_TENANT = "Tenant"
AUDIT_TRUSTED_CERTIFICATE = "TrustedCertificate"
AUDIT_CRL = "CRL"
AUDIT_DEVICE = "Device"
AUDIT_USER = "User"
AUDIT_BULK = "BulkDeviceRegistration"

MAX_NAME_LENGTH = 256
MIN_PASSWORD_LENGTH = 8
_USERNAME_RE = re.compile(r"^[A-Za-z0-9._@+-]{1,128}$")
_ROLE_RE = re.compile(r"^[A-Z0-9_]{1,128}$")
_FINGERPRINT_RE = re.compile(r"^[0-9a-f]{40}$")
_AUDIT_SERIALS = 20
"""Serial numbers named in one revocation audit record; the rest are counted."""

_HASHER = PasswordHasher()  # argon2id with the library's RFC 9106 defaults


class OperationError(Exception):
    """A business rule refused the operation.

    ``code`` is stable: ``not_found``, ``invalid``, ``conflict``,
    ``no_pop_code``, ``pop_expired`` or ``pop_failed``.
    """

    def __init__(self, message: str, code: str = "invalid") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class RevocationRequest(NamedTuple):
    """One offline revocation as an operator typed it (hex serial, optional date)."""

    serial_hex: str
    date: str | None = None


@dataclass(frozen=True, slots=True)
class CsvImportResult:
    """Outcome of a revocation CSV upload: valid rows are stored, bad rows reported."""

    added: int
    kept: int
    errors: tuple[RowError, ...]


# helpers ---------------------------------------------------------------------


@contextmanager
def _not_found(what: str) -> Iterator[None]:
    """Turn the store's :class:`NotFound` into ``OperationError(code="not_found")``."""
    try:
        yield
    except NotFound:
        raise OperationError(f"{what} not found", "not_found") from None


async def _audit(
    store: Store,
    tenant: str,
    type_: str,
    activity: str,
    text: str,
    now: datetime,
    actor: str,
    source: str = "",
    severity: str = "information",
) -> None:
    record = AuditRecord(
        tenant=tenant,
        type=type_,
        activity=activity,
        text=text,
        time=now,
        user=actor,
        source=source,
        severity=severity,
    )
    await store.add_audit(record)


async def _audit_anchor(
    store: Store,
    record: TrustedCertificate,
    activity: str,
    text: str,
    now: datetime,
    actor: str,
    severity: str = "information",
) -> None:
    await _audit(
        store,
        record.tenant,
        AUDIT_TRUSTED_CERTIFICATE,
        activity,
        text,
        now,
        actor,
        record.fingerprint,
        severity,
    )


def _on_off(value: bool) -> str:
    return "on" if value else "off"


def _clean_name(name: str) -> str:
    text = name.strip()
    if len(text) > MAX_NAME_LENGTH:
        raise OperationError(f"name is longer than {MAX_NAME_LENGTH} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise OperationError("name must not contain control characters")
    return text


def normalise_fingerprint(text: str) -> str:
    """Lower-case SHA-1 hex without separators (``AB:CD:…`` is accepted)."""
    fp = text.strip().lower().replace(":", "").replace(" ", "")
    if not _FINGERPRINT_RE.match(fp):
        raise OperationError(
            f"fingerprint must be 40 hexadecimal digits (SHA-1), got {text!r}", "invalid"
        )
    return fp


def _certificate(record: TrustedCertificate) -> x509.Certificate:
    try:
        return load_certificate(record.pem)
    except CertificateError as exc:
        raise OperationError(
            f"stored certificate {record.fingerprint} is unreadable: {exc}"
        ) from None


# tenants ---------------------------------------------------------------------


async def require_tenant(store: Store, tenant: str) -> None:
    """``OperationError(code="not_found")`` unless the tenant exists."""
    if not valid_tenant_id(tenant) or not await store.tenant_exists(tenant):
        raise OperationError(f"tenant {tenant!r} not found", "not_found")


async def create_tenant(store: Store, tenant: str, now: datetime, actor: str) -> bool:
    """Create a tenant; False (and no audit record) when it existed already."""
    if not valid_tenant_id(tenant):
        raise OperationError(f"invalid tenant id {tenant!r}: use 1-64 of A-Z a-z 0-9 _ -")
    created = await store.create_tenant(tenant)
    if created:
        await _audit(
            store,
            tenant,
            AUDIT_TENANT,
            "Tenant created",
            f"Tenant {tenant} created",
            now,
            actor,
            tenant,
        )
    return created


# trusted certificates -----------------------------------------------------------


async def add_trusted_certificate(
    store: Store,
    tenant: str,
    pem: str,
    name: str,
    status: Status,
    auto_registration: bool,
    now: datetime,
    actor: str,
) -> TrustedCertificate:
    """Validate an upload (spec: "To add a certificate") and store it.

    Raises :class:`UploadError` naming the broken rule; an empty ``name``
    defaults to the certificate's common name.
    """
    await require_tenant(store, tenant)
    label = _clean_name(name)
    fp = fingerprint(parse_upload(pem))
    copies = await store.find_trusted_certificates(fp)
    cert = validate_upload(pem, tenant, copies, now)
    label = label or common_name(cert) or cert.subject.rfc4514_string() or fp
    record = new_trusted_certificate(
        cert, tenant, name=label, status=status, auto_registration=auto_registration, now=now
    )
    try:
        await store.add_trusted_certificate(record)
    except Conflict:  # uploaded concurrently by another request
        raise UploadError("duplicate", "certificate is already uploaded in this tenant") from None
    text = (
        f"Trusted certificate '{label}' ({fp}, subject {cert.subject.rfc4514_string()}) added"
        f" with status {status.value}, auto-registration {_on_off(auto_registration)}"
    )
    await _audit_anchor(store, record, "Trusted certificate added", text, now, actor)
    return record


async def get_trusted_certificate(store: Store, tenant: str, fp: str) -> TrustedCertificate:
    fp = normalise_fingerprint(fp)
    await require_tenant(store, tenant)
    with _not_found(f"trusted certificate {fp} in tenant {tenant}"):
        return await store.get_trusted_certificate(tenant, fp)


async def update_trusted_certificate(
    store: Store,
    tenant: str,
    fp: str,
    now: datetime,
    actor: str,
    *,
    name: str | None = None,
    status: Status | None = None,
    auto_registration: bool | None = None,
) -> TrustedCertificate:
    """Change the editable fields (name, status, auto-registration); others stay.

    Nothing is written (and nothing audited) when no value actually changes.
    """
    old = await get_trusted_certificate(store, tenant, fp)
    label = _clean_name(name) if name is not None else None
    if label == "":
        raise OperationError("name must not be empty")
    changes = []
    if label is not None and label != old.name:
        changes.append(f"name '{old.name}' -> '{label}'")
    if status is not None and status != old.status:
        changes.append(f"status {old.status.value} -> {status.value}")
    if auto_registration is not None and auto_registration != old.auto_registration:
        changes.append(f"auto-registration {_on_off(auto_registration)}")
    if not changes:
        return old
    with _not_found(f"trusted certificate {old.fingerprint} in tenant {tenant}"):
        new = await store.update_trusted_certificate(
            tenant, old.fingerprint, name=label, status=status, auto_registration=auto_registration
        )
    text = f"Trusted certificate '{new.name}' ({new.fingerprint}) updated: " + ", ".join(changes)
    await _audit_anchor(store, new, "Trusted certificate updated", text, now, actor)
    return new


async def delete_trusted_certificate(
    store: Store, tenant: str, fp: str, now: datetime, actor: str
) -> TrustedCertificate:
    """Delete permanently; returns what was deleted."""
    old = await get_trusted_certificate(store, tenant, fp)
    with _not_found(f"trusted certificate {old.fingerprint} in tenant {tenant}"):
        await store.delete_trusted_certificate(tenant, old.fingerprint)
    text = f"Trusted certificate '{old.name}' ({old.fingerprint}) deleted"
    await _audit_anchor(store, old, "Trusted certificate deleted", text, now, actor)
    return old


# proof of possession ------------------------------------------------------------


async def create_pop_code(store: Store, tenant: str, fp: str, now: datetime) -> TrustedCertificate:
    """Hand out the verification code to sign (``pop_code``, valid until ``pop_code_until``).

    A code that is still valid is handed out again, so asking twice does not
    invalidate a signature being prepared.
    """
    record = await get_trusted_certificate(store, tenant, fp)
    if record.pop_code and record.pop_code_until and record.pop_code_until > now:
        return record
    code, until = new_verification_code(now)
    with _not_found(f"trusted certificate {record.fingerprint} in tenant {tenant}"):
        return await store.update_trusted_certificate(
            tenant, record.fingerprint, pop_code=code, pop_code_until=until
        )


async def verify_pop(
    store: Store, tenant: str, fp: str, signed_b64: str, now: datetime, actor: str = ""
) -> TrustedCertificate:
    """Check the signed verification code; on success the code is cleared and
    ``proof_of_possession_valid`` set. Failures raise ``no_pop_code``,
    ``pop_expired`` or ``pop_failed``."""
    record = await get_trusted_certificate(store, tenant, fp)
    key = record.fingerprint
    if not record.pop_code or record.pop_code_until is None:
        raise OperationError(
            "no verification code is pending for this certificate: request one first", "no_pop_code"
        )
    if record.pop_code_until <= now:
        await store.update_trusted_certificate(tenant, key, clear_pop_code=True)
        raise OperationError(
            f"the verification code expired at {record.pop_code_until.isoformat()}:"
            " request a new one",
            "pop_expired",
        )
    if not verify_signed_code(_certificate(record), record.pop_code, signed_b64):
        text = f"Proof of possession of '{record.name}' ({key}) failed: signature does not match"
        await _audit_anchor(
            store, record, "Proof of possession failed", text, now, actor, "warning"
        )
        raise OperationError(
            "the signed verification code does not match this certificate's public key",
            "pop_failed",
        )
    new = await store.update_trusted_certificate(
        tenant, key, proof_of_possession_valid=True, clear_pop_code=True
    )
    text = (
        f"Proof of possession of '{record.name}' ({key}) completed with a signed verification code"
    )
    await _audit_anchor(store, record, "Proof of possession completed", text, now, actor)
    return new


async def set_pop_confirmed(
    store: Store, tenant: str, fp: str, confirmed: bool, now: datetime, actor: str
) -> TrustedCertificate:
    """Support override (spec: completed "through a back end API upon reasonable verification")."""
    record = await get_trusted_certificate(store, tenant, fp)
    new = await store.update_trusted_certificate(
        tenant, record.fingerprint, proof_of_possession_valid=confirmed, clear_pop_code=True
    )
    state = "confirmed" if confirmed else "withdrawn"
    text = f"Proof of possession of '{record.name}' ({record.fingerprint}) {state} by an operator"
    await _audit_anchor(store, record, f"Proof of possession {state}", text, now, actor)
    return new


# offline revocation -------------------------------------------------------------


def _serial_summary(entries: Sequence[RevocationEntry]) -> str:
    shown = ", ".join(e.serial_hex for e in entries[:_AUDIT_SERIALS])
    more = len(entries) - _AUDIT_SERIALS
    return shown + (f" and {more} more" if more > 0 else "")


async def add_revocations(
    store: Store,
    tenant: str,
    entries: Sequence[RevocationRequest | tuple[str, str | None]],
    now: datetime,
    actor: str,
) -> tuple[int, int]:
    """Revoke serials (empty or future date → now; a duplicate keeps the existing entry).

    All entries are validated before any is stored. Returns (added, kept).
    """
    await require_tenant(store, tenant)
    if not entries:
        raise OperationError("no revocation entries given")
    if len(entries) > MAX_BULK_ENTRIES:
        raise OperationError(f"at most {MAX_BULK_ENTRIES} revocation entries are allowed at once")
    parsed: list[RevocationEntry] = []
    for serial_hex, date in entries:
        try:
            parsed.append(make_entry(tenant, serial_hex, date, now))
        except RevocationInputError as exc:
            raise OperationError(str(exc)) from None
    added, kept = await store.add_revocations(parsed)
    text = (
        f"Offline revocation: {added} added, {kept} already present (kept);"
        f" serials {_serial_summary(parsed)}"
    )
    await _audit(store, tenant, AUDIT_CRL, "Revoked certificates added", text, now, actor)
    return added, kept


async def import_revocation_csv(
    store: Store, tenant: str, data: bytes, now: datetime, actor: str
) -> CsvImportResult:
    """Bulk upload (at most 5000 entries): valid rows are stored, bad rows reported."""
    await require_tenant(store, tenant)
    try:
        entries, errors = parse_csv(data, tenant, now)
    except RevocationInputError as exc:
        raise OperationError(str(exc)) from None
    added, kept = await store.add_revocations(entries) if entries else (0, 0)
    result = CsvImportResult(added=added, kept=kept, errors=tuple(errors))
    text = (
        f"Offline revocation CSV import: {added} added, {kept} already present (kept),"
        f" {len(errors)} rows rejected"
    )
    if entries:
        text += f"; serials {_serial_summary(entries)}"
    await _audit(store, tenant, AUDIT_CRL, "Revocation list imported", text, now, actor)
    return result


async def set_revocation_settings(
    store: Store,
    tenant: str,
    now: datetime,
    actor: str,
    *,
    offline: bool | None = None,
    online: bool | None = None,
) -> RevocationSettings:
    """Change the given CRL checks; returns the new settings."""
    await require_tenant(store, tenant)
    old = await store.get_revocation_settings(tenant)
    new = RevocationSettings(
        offline=old.offline if offline is None else offline,
        online=old.online if online is None else online,
    )
    if new == old:
        return old
    await store.set_revocation_settings(tenant, new)
    text = (
        f"CRL settings changed: offline check {_on_off(new.offline)},"
        f" online check {_on_off(new.online)}"
    )
    await _audit(store, tenant, AUDIT_CRL, "CRL settings updated", text, now, actor)
    return new


# device users --------------------------------------------------------------------


async def set_device_enabled(
    store: Store, tenant: str, device_id: str, enabled: bool, now: datetime, actor: str
) -> DeviceUser:
    """Enable or disable a device user (disabling disconnects the device)."""
    await require_tenant(store, tenant)
    with _not_found(f"device {device_id!r} in tenant {tenant}"):
        user = await store.set_device_enabled(tenant, device_id, enabled)
    state = "enabled" if enabled else "disabled"
    text = f"Device user {user.username} {state}"
    await _audit(store, tenant, AUDIT_DEVICE, f"Device user {state}", text, now, actor, device_id)
    return user


async def register_device(
    store: Store, tenant: str, device_id: str, via: str, now: datetime, actor: str
) -> tuple[DeviceUser, bool]:
    """Create a device user if absent; returns (user, created)."""
    await require_tenant(store, tenant)
    if not device_id or len(device_id) > 256 or any(ord(c) < 32 for c in device_id):
        raise OperationError(f"invalid device id {device_id!r}")
    user, created = await store.register_device(tenant, device_id, via, now)
    if created:
        text = f"Device user {user.username} registered ({via})"
        await _audit(
            store, tenant, AUDIT_DEVICE, "Device user registered", text, now, actor, device_id
        )
    return user, created


# admin users ---------------------------------------------------------------------


def hash_password(password: str) -> str:
    """An argon2id hash (PHC string) of the password."""
    return _HASHER.hash(password)


async def create_admin_user(
    store: Store,
    tenant: str,
    username: str,
    password: str,
    roles: Sequence[str],
    *,
    now: datetime | None = None,
    actor: str = "",
) -> AdminUser:
    """Create a management user (``conflict`` if it exists); the password is stored hashed."""
    await require_tenant(store, tenant)
    if not _USERNAME_RE.match(username):
        raise OperationError("user name must be 1-128 of A-Z a-z 0-9 . _ @ + -")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise OperationError(f"password must have at least {MIN_PASSWORD_LENGTH} characters")
    bad = [r for r in roles if not _ROLE_RE.match(r)]
    if bad:
        raise OperationError(f"invalid role names: {', '.join(map(repr, bad))}")
    try:
        await store.get_admin_user(tenant, username)
    except NotFound:
        pass
    else:
        raise OperationError(f"user {username!r} already exists in tenant {tenant}", "conflict")
    user = AdminUser(
        tenant=tenant,
        username=username,
        password_hash=hash_password(password),
        roles=frozenset(roles),
    )
    await store.put_admin_user(user)
    text = f"User {username} created with roles {', '.join(sorted(user.roles)) or '(none)'}"
    await _audit(
        store, tenant, AUDIT_USER, "User created", text, now or datetime.now(UTC), actor, username
    )
    return user


def verify_admin_password(user: AdminUser, password: str) -> bool:
    """True when ``password`` matches the user's hash (whether the user is enabled is
    the caller's check). Never raises on a wrong password or a corrupt hash."""
    try:
        return _HASHER.verify(user.password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


# bulk registration and provisioned certificates (management API, issue 4) --------


@dataclass(frozen=True, slots=True)
class BulkRegistrationResult:
    """Outcome of a bulk-registration CSV: rows in the file, pending registrations
    created, and the refused rows (file line, device id, reason)."""

    total: int
    created: tuple[str, ...]
    failures: tuple[BulkFailure, ...]


async def bulk_register(
    store: Store,
    tenant: str,
    data: bytes,
    now: datetime,
    actor: str,
    *,
    hash_otp: Callable[[str], str],
) -> BulkRegistrationResult:
    """Register certificate devices from a bulk CSV (spec: "Bulk registration").

    Valid rows become pending registrations (the device user is created on
    its first connect); refused rows are reported, never half-stored.
    ``hash_otp`` turns an ``ENROLLMENT_OTP`` into ``PendingRegistration.otp_hash``
    in the form EST enrollment verifies (``trust.est.hash_otp`` under the
    KEK-derived key); OTPs are never logged or audited.
    """
    await require_tenant(store, tenant)
    try:
        parsed = parse_bulk_csv(data)
    except BulkCsvError as exc:
        raise OperationError(str(exc)) from None
    failures = list(parsed.failures)
    todo = []
    for row in parsed.rows:
        reason = await _registration_conflict(store, tenant, row.device_id)
        if reason:
            failures.append(BulkFailure(row.line, row.device_id, reason))
        else:
            todo.append(row)
    created: list[str] = []
    for row in todo:
        pending = PendingRegistration(
            tenant=tenant,
            device_id=row.device_id,
            otp_hash=None if row.otp is None else hash_otp(row.otp),
            attributes=row.attributes,
            created=now,
        )
        try:
            await store.add_pending_registration(pending)
        except Conflict as exc:  # registered concurrently
            failures.append(BulkFailure(row.line, row.device_id, str(exc)))
        else:
            created.append(row.device_id)
    failures.sort(key=lambda f: f.line)
    shown = ", ".join(created[:_AUDIT_SERIALS])
    more = len(created) - _AUDIT_SERIALS
    text = (
        f"Bulk registration: {parsed.total} rows, {len(created)} devices accepted,"
        f" {len(failures)} refused"
        + (f"; devices {shown}" if created else "")
        + (f" and {more} more" if more > 0 else "")
    )
    await _audit(store, tenant, AUDIT_BULK, "Bulk registration imported", text, now, actor)
    return BulkRegistrationResult(parsed.total, tuple(created), tuple(failures))


async def _registration_conflict(store: Store, tenant: str, device_id: str) -> str | None:
    try:
        await store.get_device(tenant, device_id)
        return f"device {device_id} is already registered"
    except NotFound:
        pass
    try:
        await store.get_pending_registration(tenant, device_id)
        return f"device {device_id} already has a pending registration"
    except NotFound:
        return None


async def revoke_provisioned_certificate(
    store: Store, tenant: str, device_id: str, serial: str, now: datetime, actor: str
) -> tuple[ProvisionedCertificate, bool]:
    """Revoke one of a device's provisioned certificates (adds it to the tenant's
    offline revocations, irreversibly). Returns (certificate, newly revoked)."""
    await require_tenant(store, tenant)
    try:
        number = parse_serial_hex(serial)
    except ValueError as exc:
        raise OperationError(str(exc)) from None
    certs = await store.list_provisioned_certificates(tenant, device_id)
    cert = next((c for c in certs if c.serial == number), None)
    if cert is None:
        raise OperationError(
            f"certificate {number:x} is not a provisioned certificate of device"
            f" {device_id!r} in tenant {tenant}",
            "not_found",
        )
    added, _ = await store.add_revocations([RevocationEntry(tenant, number, now)])
    text = (
        f"Provisioned certificate serial {cert.serial_hex} of device {device_id} revoked"
        if added
        else f"Provisioned certificate serial {cert.serial_hex} of device {device_id}"
        " was already revoked (entry kept)"
    )
    await _audit(
        store, tenant, AUDIT_CRL, "Provisioned certificate revoked", text, now, actor, device_id
    )
    return cert, bool(added)
