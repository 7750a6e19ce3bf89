"""Values shared by the trust core, the store and the front-ends.

Everything here is a frozen dataclass or an enum: the trust core takes these as
data and returns new values, so decisions are pure functions that are easy to
test exhaustively. Field names follow the platform's JSON where one exists
(``autoRegistrationEnabled`` → ``auto_registration``, …); the JSON mapping lives
in the management API, not here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

TENANT_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
MANAGEMENT_TENANT = "management"


class Status(StrEnum):
    """Trusted-certificate status (platform field ``status``)."""

    ENABLED = "ENABLED"
    DISABLED = "DISABLED"


class Listener(StrEnum):
    """Which front-end a device connected to; the policy differs per listener."""

    MQTT_CORE = "mqtt"  # 8883: ClientId == CN, registration on first connect
    MQTT_SERVICE = "mqtt-service"  # 9883: username == tenant id, no registration
    HTTPS = "https"  # 8443: same rules as core MQTT
    LWM2M = "lwm2m"  # 5684: tenant from the registered device, no registration


class Registration(StrEnum):
    """How an accepted device relates to its device user (the decision path)."""

    EXISTING = "existing"  # device user exists and is enabled
    AUTO = "auto"  # create on first connect: the anchor allows auto-registration
    BULK = "bulk"  # create on first connect: pending bulk registration
    NONE = "none"  # listener does no registration (MQTT service) and no user exists


class Reason(StrEnum):
    """Stable rejection reason codes (logs, metrics, API, CLI all use these)."""

    NO_CERTIFICATE = "no_certificate"
    MALFORMED = "malformed"
    UNTRUSTED = "untrusted"
    ANCHOR_DISABLED = "anchor_disabled"
    REVOKED = "revoked"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    PATH_LENGTH = "path_length"
    CHAIN_TOO_LONG = "chain_too_long"
    NOT_CA = "not_ca"
    BAD_USAGE = "bad_usage"
    BAD_SIGNATURE = "bad_signature"
    AMBIGUOUS_TENANT = "ambiguous_tenant"
    NO_COMMON_NAME = "no_common_name"
    DEVICE_DISABLED = "device_disabled"
    NOT_REGISTERED = "not_registered"
    CRL_UNAVAILABLE = "crl_unavailable"
    STORE_UNAVAILABLE = "store_unavailable"


@dataclass(frozen=True, slots=True)
class TrustedCertificate:
    """A trust anchor uploaded to one tenant (platform: trusted certificate).

    ``fingerprint`` is the SHA-1 of the DER, lower-case hex: the platform's id.
    Descriptive fields (subject, issuer, serial, validity, algorithm) are read
    from ``pem`` by :func:`trust.certs.describe`, never stored twice.
    """

    tenant: str
    fingerprint: str
    name: str
    status: Status
    auto_registration: bool
    pem: str
    proof_of_possession_valid: bool = False
    tenant_ca: bool = False
    pop_code: str | None = None
    """Unsigned proof-of-possession verification code, while one is pending."""
    pop_code_until: datetime | None = None
    created: datetime | None = None


@dataclass(frozen=True, slots=True)
class RevocationEntry:
    """One offline revocation: a serial number revoked in a tenant at a date."""

    tenant: str
    serial: int
    revoked_at: datetime

    @property
    def serial_hex(self) -> str:
        """Lower-case hex without leading zeros (the canonical spelling we store)."""
        return format(self.serial, "x")


@dataclass(frozen=True, slots=True)
class RevocationSettings:
    """A tenant's CRL settings; both checks are off by default (spec: CRL settings)."""

    offline: bool = False
    online: bool = False


@dataclass(frozen=True, slots=True)
class DeviceUser:
    """A device user ``device_<CN>`` in a tenant."""

    tenant: str
    device_id: str
    enabled: bool = True
    registered_via: str = "auto"
    created: datetime | None = None
    last_connect: datetime | None = None

    @property
    def username(self) -> str:
        return device_username(self.device_id)


@dataclass(frozen=True, slots=True)
class PendingRegistration:
    """A bulk-registered device (``AUTH_TYPE=CERTIFICATES``) not yet connected."""

    tenant: str
    device_id: str
    otp_hash: str | None = None
    """Hash of ``ENROLLMENT_OTP`` when the device enrolls over EST, else None."""
    attributes: tuple[tuple[str, str], ...] = ()
    """Other CSV columns (TYPE, NAME, ICCID, …) kept for the device record."""
    created: datetime | None = None


@dataclass(frozen=True, slots=True)
class ProvisionedCertificate:
    """A device certificate seen in a successful handshake (last 5 kept)."""

    tenant: str
    device_id: str
    serial: int
    not_before: datetime
    not_after: datetime
    fingerprint: str
    first_seen: datetime
    last_seen: datetime

    @property
    def serial_hex(self) -> str:
        return format(self.serial, "x")


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One audit-log entry (platform: audit record)."""

    tenant: str
    type: str
    activity: str
    text: str
    time: datetime
    user: str = ""
    source: str = ""
    severity: str = "information"
    id: int | None = None


@dataclass(frozen=True, slots=True)
class AdminUser:
    """A management-API user. ``password_hash`` is an argon2 hash, never the password."""

    tenant: str
    username: str
    password_hash: str
    roles: frozenset[str] = field(default_factory=frozenset)
    enabled: bool = True


class ChangeKind(StrEnum):
    """What a store change touched; drives snapshot refresh and session kills."""

    TENANT = "tenant"
    ANCHOR = "anchor"  # key = fingerprint
    REVOCATION = "revocation"  # key = serial hex
    SETTINGS = "settings"
    DEVICE = "device"  # key = device id
    PENDING = "pending"  # key = device id


@dataclass(frozen=True, slots=True)
class Change:
    """An entry of the store's change feed (monotonic ``seq``)."""

    seq: int
    kind: ChangeKind
    tenant: str
    key: str = ""


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """The verified identity of a connected device: what every front-end receives."""

    tenant: str
    device_id: str
    listener: Listener
    registration: Registration
    anchor_fingerprint: str
    leaf_fingerprint: str
    leaf_serial: int
    not_before: datetime
    not_after: datetime
    chain_serials: tuple[int, ...]
    """Serials of the verified chain, leaf first, anchor last."""
    chain_fingerprints: tuple[str, ...]
    """SHA-1 fingerprints of the verified chain, leaf first, anchor last."""

    @property
    def username(self) -> str:
        return device_username(self.device_id)

    @property
    def serial_hex(self) -> str:
        return format(self.leaf_serial, "x")


@dataclass(frozen=True, slots=True)
class Rejection:
    """A refused chain: a stable reason code and a human message (no secrets)."""

    reason: Reason
    message: str
    tenant: str | None = None
    device_id: str | None = None


Decision = DeviceIdentity | Rejection


def device_username(device_id: str) -> str:
    """The platform's device user name for a certificate CN."""
    return f"device_{device_id}"


def valid_tenant_id(tenant: str) -> bool:
    """Tenant ids: 1 to 64 of ``[A-Za-z0-9_-]`` (safe in topics, paths and keys)."""
    return bool(TENANT_ID_RE.fullmatch(tenant))
