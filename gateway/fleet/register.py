"""``fleet register``: put a fleet into a gateway's tenant.

Three independent steps, each optional:

* upload the fleet's root CA as a trusted certificate (auto-registration on
  unless told otherwise) -- devices then register on first connect;
* ``bulk``: a pending (bulk) registration per good device, so devices register
  on first connect even with auto-registration off; the same list is written
  to ``DIR/bulk.csv`` in the bulk-registration CSV format for other paths;
* ``preregister``: create the device users now (as if every device had
  connected before; the benchmark uses it so each handshake does a device lookup).

Everything goes through a :class:`Registrar`. :class:`StoreRegistrar` writes
the store directly with :mod:`gateway.operations`; a registrar speaking the
management REST API can implement the same four methods and be passed to
:func:`register_fleet` unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from gateway import operations as ops
from gateway.fleet.pki import Manifest
from gateway.store.base import Conflict, Store
from trust.anchors import UploadError
from trust.model import PendingRegistration, Status

__all__ = ["RegisterResult", "Registrar", "StoreRegistrar", "register_fleet", "write_bulk_csv"]


class Registrar(Protocol):
    """Where a fleet is registered (the store now; the management API later)."""

    async def ensure_tenant(self, tenant: str) -> bool:
        """Create the tenant if needed; True if it was created."""
        ...

    async def upload_ca(self, tenant: str, pem: str, name: str, auto_registration: bool) -> bool:
        """Add an enabled trusted certificate; False if the tenant already had it."""
        ...

    async def add_pending(self, tenant: str, device_ids: Sequence[str]) -> tuple[int, int]:
        """Bulk-register devices; returns (added, already registered or pending)."""
        ...

    async def register_devices(self, tenant: str, device_ids: Sequence[str]) -> tuple[int, int]:
        """Create device users; returns (created, existing)."""
        ...


class StoreRegistrar:
    """A :class:`Registrar` writing an open store through :mod:`gateway.operations`."""

    def __init__(self, store: Store, now: datetime, actor: str = "fleet") -> None:
        self.store = store
        self.now = now
        self.actor = actor

    async def ensure_tenant(self, tenant: str) -> bool:
        return await ops.create_tenant(self.store, tenant, self.now, self.actor)

    async def upload_ca(self, tenant: str, pem: str, name: str, auto_registration: bool) -> bool:
        try:
            await ops.add_trusted_certificate(
                self.store,
                tenant,
                pem,
                name,
                Status.ENABLED,
                auto_registration,
                self.now,
                self.actor,
            )
        except UploadError as exc:
            if exc.rule == "duplicate":
                return False
            raise
        return True

    async def add_pending(self, tenant: str, device_ids: Sequence[str]) -> tuple[int, int]:
        await ops.require_tenant(self.store, tenant)
        added = existing = 0
        for device_id in device_ids:
            try:
                await self.store.add_pending_registration(
                    PendingRegistration(tenant=tenant, device_id=device_id, created=self.now)
                )
            except Conflict:
                existing += 1
            else:
                added += 1
        return added, existing

    async def register_devices(self, tenant: str, device_ids: Sequence[str]) -> tuple[int, int]:
        created = 0
        for device_id in device_ids:
            _, new = await ops.register_device(
                self.store, tenant, device_id, "fleet", self.now, self.actor
            )
            created += new
        return created, len(device_ids) - created


@dataclass(frozen=True, slots=True)
class RegisterResult:
    """What :func:`register_fleet` did."""

    tenant: str
    tenant_created: bool
    ca_fingerprint: str
    ca_uploaded: bool | None
    """True uploaded, False already present, None not asked for."""
    auto_registration: bool
    pending: tuple[int, int] | None
    """(added, existing) pending registrations, None when not asked for."""
    registered: tuple[int, int] | None
    """(created, existing) device users, None when not asked for."""
    bad_skipped: int
    """Bad devices left out of bulk and pre-registration."""

    def as_json(self) -> dict[str, object]:
        def pair(v: tuple[int, int] | None, a: str, b: str) -> dict[str, int] | None:
            return None if v is None else {a: v[0], b: v[1]}

        return {
            "tenant": self.tenant,
            "tenantCreated": self.tenant_created,
            "caFingerprint": self.ca_fingerprint,
            "caUploaded": self.ca_uploaded,
            "autoRegistration": self.auto_registration,
            "pending": pair(self.pending, "added", "existing"),
            "registered": pair(self.registered, "created", "existing"),
            "badSkipped": self.bad_skipped,
        }


def write_bulk_csv(manifest: Manifest, device_ids: Sequence[str]) -> None:
    """``DIR/bulk.csv``: the devices in the bulk-registration CSV format."""
    lines = ["ID;AUTH_TYPE;TYPE"] + [f"{d};CERTIFICATES;fleet-device" for d in device_ids]
    (manifest.dir / "bulk.csv").write_text("\n".join(lines) + "\n", "utf-8")


async def register_fleet(
    registrar: Registrar,
    manifest: Manifest,
    tenant: str,
    *,
    upload_ca: bool = True,
    auto_registration: bool = True,
    bulk: bool = False,
    preregister: bool = False,
) -> RegisterResult:
    """Register a fleet in ``tenant`` (created if missing) as asked."""
    created = await registrar.ensure_tenant(tenant)
    ca_pem = manifest.root_cert.read_text("ascii")
    uploaded = None
    if upload_ca:
        uploaded = await registrar.upload_ca(tenant, ca_pem, "fleet root CA", auto_registration)
    good = [d.device_id for d in manifest.good]
    pending = None
    if bulk:
        write_bulk_csv(manifest, good)
        pending = await registrar.add_pending(tenant, good)
    registered = None
    if preregister:
        registered = await registrar.register_devices(tenant, good)
    return RegisterResult(
        tenant=tenant,
        tenant_created=created,
        ca_fingerprint=str(manifest.data["ca"]["root"]["fingerprint"]),
        ca_uploaded=uploaded,
        auto_registration=auto_registration,
        pending=pending,
        registered=registered,
        bad_skipped=len(manifest.bad) if (bulk or preregister) else 0,
    )
