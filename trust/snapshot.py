"""An immutable in-memory view of everything a trust decision reads.

The gateway builds a :class:`TrustSnapshot` from the store at start and
derives a new one for every batch of changes from the store's change feed
(:meth:`TrustSnapshot.with_changes`). Decisions read only the snapshot, so the
hot path never touches the store and a decision is a pure function of
(chain, snapshot, now).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from cryptography import x509

from trust.certs import CertificateError, load_certificate
from trust.model import (
    DeviceUser,
    PendingRegistration,
    RevocationEntry,
    RevocationSettings,
    Status,
    TrustedCertificate,
)

DeviceKey = tuple[str, str]  # (tenant, device id)


@dataclass(frozen=True, slots=True, eq=False)
class Anchor:
    """A trusted certificate with its parsed certificate (decoded once, at load)."""

    record: TrustedCertificate
    cert: x509.Certificate

    @property
    def tenant(self) -> str:
        return self.record.tenant

    @property
    def fingerprint(self) -> str:
        return self.record.fingerprint

    @property
    def enabled(self) -> bool:
        return self.record.status is Status.ENABLED


@dataclass(frozen=True, slots=True)
class TenantTrust:
    """One tenant's anchors, offline revocations and CRL settings."""

    tenant: str
    anchors: tuple[Anchor, ...] = ()
    revoked: frozenset[int] = frozenset()
    settings: RevocationSettings = field(default_factory=RevocationSettings)


@dataclass(frozen=True, slots=True)
class TrustSnapshot:
    """Everything :func:`trust.policy.decide` reads, as of change-feed ``seq``."""

    seq: int = 0
    tenants: Mapping[str, TenantTrust] = field(default_factory=dict)
    devices: Mapping[DeviceKey, DeviceUser] = field(default_factory=dict)
    pending: Mapping[DeviceKey, PendingRegistration] = field(default_factory=dict)
    by_subject: Mapping[x509.Name, tuple[Anchor, ...]] = field(default_factory=dict)
    by_fingerprint: Mapping[str, tuple[Anchor, ...]] = field(default_factory=dict)
    device_tenants: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    # construction --------------------------------------------------------------
    @classmethod
    def build(
        cls,
        *,
        seq: int = 0,
        tenants: Iterable[str] = (),
        certificates: Iterable[TrustedCertificate] = (),
        revocations: Iterable[RevocationEntry] = (),
        settings: Mapping[str, RevocationSettings] | None = None,
        devices: Iterable[DeviceUser] = (),
        pending: Iterable[PendingRegistration] = (),
    ) -> TrustSnapshot:
        """Build from plain records (each certificate PEM decoded exactly once)."""
        anchors: dict[str, list[Anchor]] = {t: [] for t in tenants}
        for rec in certificates:
            anchor = parse_anchor(rec)
            if anchor is not None:
                anchors.setdefault(rec.tenant, []).append(anchor)
        revoked: dict[str, set[int]] = {}
        for entry in revocations:
            revoked.setdefault(entry.tenant, set()).add(entry.serial)
        settings = settings or {}
        names = set(anchors) | set(revoked) | set(settings)
        tenant_map = {
            t: TenantTrust(
                tenant=t,
                anchors=tuple(anchors.get(t, ())),
                revoked=frozenset(revoked.get(t, ())),
                settings=settings.get(t, RevocationSettings()),
            )
            for t in names
        }
        dev = {(d.tenant, d.device_id): d for d in devices}
        pend = {(p.tenant, p.device_id): p for p in pending}
        return cls(
            seq=seq, devices=dev, pending=pend, device_tenants=_device_index(dev)
        ).with_tenants(tenant_map)

    def with_tenants(self, tenants: Mapping[str, TenantTrust]) -> TrustSnapshot:
        """A copy with tenant trust replaced (and the anchor indexes rebuilt)."""
        by_subject: dict[x509.Name, list[Anchor]] = {}
        by_fp: dict[str, list[Anchor]] = {}
        for tt in tenants.values():
            for a in tt.anchors:
                by_subject.setdefault(a.cert.subject, []).append(a)
                by_fp.setdefault(a.fingerprint, []).append(a)
        return replace(
            self,
            tenants=MappingProxyType(dict(tenants)),
            by_subject=MappingProxyType({k: tuple(v) for k, v in by_subject.items()}),
            by_fingerprint=MappingProxyType({k: tuple(v) for k, v in by_fp.items()}),
        )

    def with_tenant(self, trust: TenantTrust) -> TrustSnapshot:
        merged = dict(self.tenants)
        merged[trust.tenant] = trust
        return self.with_tenants(merged)

    def without_tenant(self, tenant: str) -> TrustSnapshot:
        merged = dict(self.tenants)
        merged.pop(tenant, None)
        return self.with_tenants(merged)

    def with_device(self, key: DeviceKey, user: DeviceUser | None) -> TrustSnapshot:
        return self.with_devices({key: user})

    def with_devices(self, updates: Mapping[DeviceKey, DeviceUser | None]) -> TrustSnapshot:
        """A copy with device users set (None removes); one copy for the whole batch."""
        devices = dict(self.devices)
        idx = dict(self.device_tenants)
        for key, user in updates.items():
            if user is None:
                devices.pop(key, None)
            else:
                devices[key] = user
            tenants = {t for t in idx.get(key[1], ()) if t != key[0]}
            if user is not None:
                tenants.add(key[0])
            if tenants:
                idx[key[1]] = tuple(sorted(tenants))
            else:
                idx.pop(key[1], None)
        return replace(
            self,
            devices=MappingProxyType(devices),
            device_tenants=MappingProxyType(idx),
        )

    def with_pending(self, key: DeviceKey, pending: PendingRegistration | None) -> TrustSnapshot:
        return self.with_pendings({key: pending})

    def with_pendings(
        self, updates: Mapping[DeviceKey, PendingRegistration | None]
    ) -> TrustSnapshot:
        """A copy with pending registrations set (None removes), in one copy."""
        items = dict(self.pending)
        for key, pending in updates.items():
            if pending is None:
                items.pop(key, None)
            else:
                items[key] = pending
        return replace(self, pending=MappingProxyType(items))

    # reads ---------------------------------------------------------------------
    def tenant(self, tenant: str) -> TenantTrust:
        return self.tenants.get(tenant) or TenantTrust(tenant=tenant)

    def device(self, tenant: str, device_id: str) -> DeviceUser | None:
        return self.devices.get((tenant, device_id))

    def pending_registration(self, tenant: str, device_id: str) -> PendingRegistration | None:
        return self.pending.get((tenant, device_id))

    def enabled_anchor_certificates(self) -> list[x509.Certificate]:
        """The union of enabled anchors (what OpenSSL is given), deduplicated."""
        seen: dict[str, x509.Certificate] = {}
        for fp, anchors in self.by_fingerprint.items():
            if any(a.enabled for a in anchors):
                seen[fp] = anchors[0].cert
        return list(seen.values())


def parse_anchor(record: TrustedCertificate) -> Anchor | None:
    """Decode a stored anchor; a record that no longer parses is skipped, not fatal."""
    try:
        return Anchor(record=record, cert=load_certificate(record.pem))
    except CertificateError:
        return None


def _device_index(devices: Mapping[DeviceKey, DeviceUser]) -> dict[str, tuple[str, ...]]:
    idx: dict[str, list[str]] = {}
    for tenant, device_id in devices:
        idx.setdefault(device_id, []).append(tenant)
    return {k: tuple(sorted(v)) for k, v in idx.items()}
