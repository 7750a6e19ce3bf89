"""What happens once a device is accepted: first-connect registration,
provisioned-certificate records and last-connect times, with audit records.

Front-ends call :meth:`Admission.admit` with the identity the trust core
returned; it performs the store writes that identity asks for.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

from gateway.metrics import GatewayMetrics
from gateway.store.base import Store, StoreError
from trust.model import (
    AuditRecord,
    DeviceIdentity,
    ProvisionedCertificate,
    Reason,
    Registration,
    Rejection,
)

log = logging.getLogger("mtls_gateway.admission")

SEEN_WRITE_INTERVAL = 60.0
"""Seconds between last-seen writes for the same device certificate (one write
per handshake would make the store the bottleneck of a reconnect storm)."""


class Admission:
    """Registers devices on first connect and records provisioned certificates."""

    def __init__(self, store: Store, metrics: GatewayMetrics) -> None:
        self.store = store
        self.metrics = metrics
        self._last_seen_write: dict[tuple[str, str, int], float] = {}

    async def admit(self, identity: DeviceIdentity, peer: str) -> DeviceIdentity | Rejection:
        """Perform the registration the decision asks for; a Rejection if it cannot."""
        now = datetime.now(UTC)
        if identity.registration in (Registration.AUTO, Registration.BULK):
            via = identity.registration.value
            try:
                user, created = await self.store.register_device(
                    identity.tenant, identity.device_id, via, now
                )
            except StoreError as exc:
                log.error("cannot register %s in %s: %s", identity.device_id, identity.tenant, exc)
                return Rejection(
                    Reason.STORE_UNAVAILABLE,
                    "device registration failed: the store is unavailable",
                    tenant=identity.tenant,
                    device_id=identity.device_id,
                )
            if not user.enabled:
                return Rejection(
                    Reason.DEVICE_DISABLED,
                    f"device user {user.username} is disabled",
                    tenant=identity.tenant,
                    device_id=identity.device_id,
                )
            if created:
                self.metrics.registrations.inc(identity.tenant, via)
                log.info(
                    "registered device tenant=%s device=%s via=%s listener=%s",
                    identity.tenant,
                    identity.device_id,
                    via,
                    identity.listener.value,
                )
                await self._audit(
                    identity,
                    now,
                    "Device user created on first connect",
                    f"Device user {identity.username} created ({via} registration) from "
                    f"certificate serial {identity.serial_hex}, trusted certificate "
                    f"{identity.anchor_fingerprint}, peer {peer}",
                )
        await self._record_seen(identity, now)
        return identity

    async def _record_seen(self, identity: DeviceIdentity, now: datetime) -> None:
        key = (identity.tenant, identity.device_id, identity.leaf_serial)
        mono = time.monotonic()
        last = self._last_seen_write.get(key)
        if last is not None and mono - last < SEEN_WRITE_INTERVAL:
            return
        self._last_seen_write[key] = mono
        if len(self._last_seen_write) > 200_000:
            self._last_seen_write.clear()
        try:
            await self.store.record_provisioned_certificate(
                ProvisionedCertificate(
                    tenant=identity.tenant,
                    device_id=identity.device_id,
                    serial=identity.leaf_serial,
                    not_before=identity.not_before,
                    not_after=identity.not_after,
                    fingerprint=identity.leaf_fingerprint,
                    first_seen=now,
                    last_seen=now,
                )
            )
            if identity.registration is not Registration.NONE:
                await self.store.touch_device(identity.tenant, identity.device_id, now)
        except StoreError as exc:
            # Losing a last-seen time must not refuse a valid device.
            log.warning("could not record provisioned certificate: %s", exc)
            self._last_seen_write.pop(key, None)

    async def _audit(
        self, identity: DeviceIdentity, now: datetime, activity: str, text: str
    ) -> None:
        try:
            await self.store.add_audit(
                AuditRecord(
                    tenant=identity.tenant,
                    type="DeviceRegistration",
                    activity=activity,
                    text=text,
                    time=now,
                    user=identity.username,
                    source=identity.device_id,
                )
            )
        except StoreError as exc:
            log.warning("could not write audit record: %s", exc)
