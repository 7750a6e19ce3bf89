"""Tenant certificate authorities at rest: create, load, renew, auto-renew.

Spec: "Certificate authority", "Creating a CA certificate via REST",
"Auto-renewal of CA certificates". The certificate work is the pure
:mod:`trust.ca`; this module adds the store, the KEK and the clock.

Storage. A tenant CA is a trusted certificate of its tenant with
``tenant_ca=True`` and auto-registration on; its private key is sealed with
the KEK (:class:`gateway.secrets.SecretBox`, purpose ``tenant-ca:<tenant>``)
in tenant option ``ca-key:<fingerprint>``, which the store deletes together
with the trusted certificate (spec: removing the CA removes its key). The key
is written before the certificate, so a CA never exists without its key.

Renewal re-signs the same key (:func:`trust.ca.renew_tenant_ca`); the new
certificate has another SHA-1 fingerprint, i.e. another trusted-certificate
id, so it is stored as a new record (name, status, auto-registration and
proof of possession carried over) before the old record and its key option
are deleted. A crash in between leaves two CA records of one tenant; every
reader picks the one valid longest, and the next renewal removes the other.

Auto-renewal (:class:`CaAutoRenewal`) runs yearly at a configured moment
(default 2 October 02:00 UTC) and writes an audit record for every tenant CA,
renewed or "not yet required". A per-tenant marker option keeps several
gateway instances sharing one store from running the same occasion twice.

Enrollment OTPs are hashed with a key derived from the KEK
(:func:`otp_key`): the store alone does not suffice to test guesses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from cryptography import x509

from gateway.config import CaConfig, parse_auto_renew
from gateway.http.server import HttpContext
from gateway.secrets import SecretBox, SecretError
from gateway.store.base import NotFound, Store, StoreError
from gateway.store.sqlite import CA_KEY_OPTION_PREFIX
from gateway.trust_state import TrustState
from trust.anchors import new_trusted_certificate
from trust.ca import (
    RENEWAL_WINDOW_MONTHS,
    CaError,
    CaKey,
    TenantCa,
    create_tenant_ca,
    next_auto_renewal,
    platform_subject,
    renew_tenant_ca,
    renewal_due,
)
from trust.certs import CertificateError, load_certificate
from trust.est import AUDIT_TYPE, EstError, ca_unavailable, keypair_missing
from trust.model import AuditRecord, Status, TrustedCertificate

__all__ = [
    "AUDIT_TYPE",
    "FEATURE_KEY",
    "FEATURE_OPTION",
    "OTP_KEY_PURPOSE",
    "CaAutoRenewal",
    "CaExists",
    "CaService",
    "NoCa",
    "RenewalOutcome",
    "SigningCa",
    "ca_service_for",
    "otp_key",
    "previous_auto_renewal",
]

log = logging.getLogger("mtls_gateway.ca")

FEATURE_KEY = "certificate-authority"
FEATURE_OPTION = "feature.certificate-authority"
"""Tenant option holding ``true``/``false``; absent: ``[ca] feature_default``."""
OTP_KEY_PURPOSE = "est-otp"
RENEW_MARKER_OPTION = "ca.auto-renew.last"
"""Tenant option: the scheduled moment (ISO) of the last auto-renewal run."""
FEATURE_CACHE_SECONDS = 1.0
"""How long a feature flag read is reused on the enrollment path; a change made
on this instance applies at once, one made on another within this."""


def otp_key(box: SecretBox) -> bytes:
    """The key of enrollment-OTP hashes (:func:`trust.est.hash_otp`)."""
    return box.derive_key(OTP_KEY_PURPOSE)


class CaExists(CaError):
    """A second CA was asked for (spec: "only one CA is allowed per tenant")."""

    status = 409


class NoCa(CaError):
    """The tenant has no CA to renew."""

    status = 404


@dataclass(frozen=True, slots=True)
class SigningCa:
    """A tenant CA ready to sign: its record, certificate and private key."""

    record: TrustedCertificate
    certificate: x509.Certificate
    key: CaKey


@dataclass(frozen=True, slots=True)
class RenewalOutcome:
    """What an auto-renewal run did for one tenant."""

    tenant: str
    action: str
    """``renewed``, ``not_required`` or ``failed``."""
    message: str
    record: TrustedCertificate | None = None


def _purpose(tenant: str) -> str:
    return f"tenant-ca:{tenant}"


def _key_option(fingerprint: str) -> str:
    return CA_KEY_OPTION_PREFIX + fingerprint


def _not_after(record: TrustedCertificate) -> datetime:
    try:
        return load_certificate(record.pem).not_valid_after_utc
    except CertificateError:
        return datetime.min.replace(tzinfo=UTC)


def _best(records: list[TrustedCertificate]) -> TrustedCertificate | None:
    """The CA record in use: enabled first, then the one valid longest."""
    if not records:
        return None
    return max(records, key=lambda r: (r.status is Status.ENABLED, _not_after(r)))


class CaService:
    """One process's access to tenant CAs (shared by the HTTP routes and the scheduler)."""

    def __init__(
        self,
        store: Store,
        box: SecretBox,
        config: CaConfig,
        trust: TrustState | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.box = box
        self.config = config
        self.trust = trust
        self.otp_key = otp_key(box)
        self._monotonic = monotonic
        self._locks: dict[str, asyncio.Lock] = {}
        # (tenant, fingerprint) → opened key: a fingerprint names one certificate,
        # whose key option never changes (only deleted with the certificate).
        self._keys: dict[tuple[str, str], CaKey] = {}
        self._features: dict[str, tuple[bool, float]] = {}

    def _lock(self, tenant: str) -> asyncio.Lock:
        return self._locks.setdefault(tenant, asyncio.Lock())

    # feature toggle ---------------------------------------------------------------
    async def feature_active(self, tenant: str, *, cached: bool = False) -> bool:
        """Spec ("Prerequisites"): whether the CA feature is on for ``tenant``."""
        now = self._monotonic()
        hit = self._features.get(tenant)
        if cached and hit is not None and now - hit[1] < FEATURE_CACHE_SECONDS:
            return hit[0]
        raw = await self.store.get_option(tenant, FEATURE_OPTION)
        active = self.config.feature_default if raw is None else raw == "true"
        if len(self._features) > 10_000:
            self._features.clear()
        self._features[tenant] = (active, now)
        return active

    async def set_feature(self, tenant: str, active: bool, now: datetime, actor: str) -> bool:
        """Turn the feature on or off for ``tenant`` (audited when it changes)."""
        before = await self.feature_active(tenant)
        await self.store.set_option(tenant, FEATURE_OPTION, "true" if active else "false")
        self._features[tenant] = (active, self._monotonic())
        if before != active:
            state = "enabled" if active else "disabled"
            await self._audit(
                tenant,
                f"Certificate authority feature {state}",
                f"Feature {FEATURE_KEY} {state} for tenant {tenant}",
                now,
                actor,
            )
        return active

    # reading ------------------------------------------------------------------------
    async def ca_records(self, tenant: str) -> list[TrustedCertificate]:
        """The tenant's CA certificates as stored (normally one)."""
        return [r for r in await self.store.list_trusted_certificates(tenant) if r.tenant_ca]

    async def current(self, tenant: str) -> TrustedCertificate | None:
        return _best(await self.ca_records(tenant))

    async def load(self, tenant: str) -> SigningCa | None:
        """The tenant CA with its key, read from the store (None without a CA).

        Raises :class:`trust.est.EstError` 500 "Failed to retrieve tenant
        keypair" when the certificate exists but its key is missing or does not
        open with this gateway's KEK.
        """
        record = await self.current(tenant)
        if record is None:
            return None
        return await self._with_key(record, load_certificate(record.pem))

    async def signing_ca(self, tenant: str) -> SigningCa:
        """The CA an enrollment signs with, from the trust snapshot when it has it.

        The snapshot lags the store by at most ``trust.refresh_interval``; on a
        miss (a CA created a moment ago) the store is asked. Raises
        :class:`trust.est.EstError`: 409 without a CA, 500 without its key.
        Usability (validity, status) is the caller's check.
        """
        anchors = []
        if self.trust is not None:
            anchors = [a for a in self.trust.snapshot.tenant(tenant).anchors if a.record.tenant_ca]
        if anchors:
            best = max(anchors, key=lambda a: (a.enabled, a.cert.not_valid_after_utc))
            return await self._with_key(best.record, best.cert)
        found = await self.load(tenant)
        if found is None:
            raise ca_unavailable()
        return found

    async def signer(self, tenant: str) -> tuple[x509.Certificate, CaKey] | None:
        """Hook for :attr:`gateway.http.server.HttpContext.tenant_ca_signer`: the
        tenant CA signs the tenant's CRL export when it has one."""
        try:
            found = await self.load(tenant)
        except EstError as exc:
            raise SecretError(f"tenant CA of {tenant}: {exc.message}") from None
        return None if found is None else (found.certificate, found.key)

    async def _with_key(self, record: TrustedCertificate, cert: x509.Certificate) -> SigningCa:
        cache_key = (record.tenant, record.fingerprint)
        key = self._keys.get(cache_key)
        if key is None:
            key = await self._open_key(record)
            if len(self._keys) > 10_000:
                self._keys.clear()
            self._keys[cache_key] = key
        return SigningCa(record, cert, key)

    async def _open_key(self, record: TrustedCertificate) -> CaKey:
        sealed = await self.store.get_option(record.tenant, _key_option(record.fingerprint))
        if sealed is None:
            log.error("tenant CA %s of %s has no stored key", record.fingerprint, record.tenant)
            raise keypair_missing()
        try:
            key = self.box.open_private_key(sealed, _purpose(record.tenant))
        except SecretError as exc:
            # the reason names the KEK mismatch or tampering; never key material
            log.error("tenant CA key of %s does not open: %s", record.tenant, exc)
            raise keypair_missing() from None
        if not isinstance(key, CaKey):
            raise keypair_missing()
        return key

    # writing ------------------------------------------------------------------------
    async def create(self, tenant: str, now: datetime, actor: str) -> TrustedCertificate:
        """A new CA for ``tenant`` (spec: "Creating a CA certificate via REST").

        :class:`CaExists` (409) when the tenant has one already.
        """
        async with self._lock(tenant):
            existing = await self.current(tenant)
            if existing is not None:
                raise CaExists(
                    f"tenant {tenant} already has a certificate authority (trusted certificate"
                    f" {existing.fingerprint}); only one CA is allowed per tenant: delete it to"
                    " create a new one"
                )
            # RSA key generation takes a noticeable time: keep the event loop free.
            ca = await asyncio.to_thread(
                create_tenant_ca,
                tenant,
                now,
                organisation=self.config.organisation,
                key_type=self.config.key_type,
            )
            record = new_trusted_certificate(
                ca.certificate,
                tenant,
                name=f"Tenant CA of {tenant}",
                status=Status.ENABLED,
                auto_registration=True,
                now=now,
                tenant_ca=True,
            )
            await self._store_new(record, ca)
            await self._audit(
                tenant,
                "Tenant certificate authority (CA) created",
                f"Tenant CA {platform_subject(ca.certificate.subject)} created"
                f" (trusted certificate {record.fingerprint}, valid until"
                f" {ca.certificate.not_valid_after_utc.isoformat()})",
                now,
                actor,
                record.fingerprint,
            )
            log.info("tenant CA created for %s: %s", tenant, record.fingerprint)
            return record

    async def renew(self, tenant: str, now: datetime, actor: str) -> TrustedCertificate:
        """Renew the tenant CA now (spec: only when less than 24 months remain).

        :class:`NoCa` (404) without a CA, :class:`trust.ca.RenewalNotAllowed`
        (409) when renewal is not due yet.
        """
        async with self._lock(tenant):
            return await self._renew(tenant, now, actor, "renewed")

    async def _renew(self, tenant: str, now: datetime, actor: str, how: str) -> TrustedCertificate:
        found = await self.load(tenant)
        if found is None:
            raise NoCa(f"tenant {tenant} has no certificate authority: create one first")
        old, key = found.record, found.key
        new_cert = renew_tenant_ca(found.certificate, key, now)  # RenewalNotAllowed
        new = replace(
            new_trusted_certificate(
                new_cert,
                tenant,
                name=old.name,
                status=old.status,
                auto_registration=old.auto_registration,
                now=now,
                tenant_ca=True,
            ),
            proof_of_possession_valid=old.proof_of_possession_valid,
            created=old.created or now,
        )
        await self._store_new(new, TenantCa(new_cert, key))
        # NotFound: removed concurrently; the new record is complete on its own.
        with contextlib.suppress(NotFound):
            await self.store.delete_trusted_certificate(tenant, old.fingerprint)
        self._keys.pop((tenant, old.fingerprint), None)
        await self._audit(
            tenant,
            f"Tenant certificate authority (CA) {how}",
            f"Tenant CA {platform_subject(new_cert.subject)} {how}: trusted certificate"
            f" {old.fingerprint} (valid until {found.certificate.not_valid_after_utc.isoformat()})"
            f" replaced by {new.fingerprint} (valid until"
            f" {new_cert.not_valid_after_utc.isoformat()}); same key pair, devices issued"
            " earlier stay valid",
            now,
            actor,
            new.fingerprint,
        )
        log.info("tenant CA of %s %s: %s -> %s", tenant, how, old.fingerprint, new.fingerprint)
        return new

    async def _store_new(self, record: TrustedCertificate, ca: TenantCa) -> None:
        """Key first, then the certificate: a CA never exists without its key."""
        sealed = self.box.seal_private_key(ca.private_key, _purpose(record.tenant))
        option = _key_option(record.fingerprint)
        await self.store.set_option(record.tenant, option, sealed)
        try:
            await self.store.add_trusted_certificate(record)
        except BaseException:
            try:
                await self.store.delete_option(record.tenant, option)
            except StoreError as exc:
                log.warning("could not remove the key of an unstored CA: %s", exc)
            raise
        self._keys[(record.tenant, record.fingerprint)] = ca.private_key

    # auto-renewal -------------------------------------------------------------------
    async def auto_renew(self, now: datetime, scheduled: datetime) -> list[RenewalOutcome]:
        """One auto-renewal run for the occasion ``scheduled`` (spec: "Auto-renewal").

        Every tenant whose CA existed at ``scheduled`` and which has not run this
        occasion yet gets its CA renewed when less than 24 months remain, and an
        audit record either way. Failures are audited (warning) and reported,
        never raised, so one tenant cannot stop the others.
        """
        outcomes = []
        for tenant in await self.store.list_tenants():
            try:
                outcome = await self._auto_renew_tenant(tenant, now, scheduled)
            except (StoreError, SecretError, CaError) as exc:
                message = getattr(exc, "message", str(exc))
                log.error("auto-renewal of the tenant CA of %s failed: %s", tenant, message)
                outcome = RenewalOutcome(tenant, "failed", message)
                await self._audit_quietly(
                    tenant,
                    "Tenant certificate authority (CA) auto-renewal failed",
                    f"Automatic renewal of the tenant CA failed: {message}",
                    now,
                    severity="warning",
                )
            if outcome is not None:
                outcomes.append(outcome)
        return outcomes

    async def _auto_renew_tenant(
        self, tenant: str, now: datetime, scheduled: datetime
    ) -> RenewalOutcome | None:
        async with self._lock(tenant):
            record = await self.current(tenant)
            if record is None or (record.created is not None and record.created > scheduled):
                return None
            marker = await self.store.get_option(tenant, RENEW_MARKER_OPTION)
            if marker is not None and _parse_iso(marker) >= scheduled:
                return None  # this occasion ran already (here or on another instance)
            # Marked before acting: a second instance reading the marker skips this
            # occasion. Unmarked again on failure, so a restart retries it.
            await self.store.set_option(tenant, RENEW_MARKER_OPTION, scheduled.isoformat())
            cert = load_certificate(record.pem)
            if renewal_due(cert, now):
                try:
                    new = await self._renew(tenant, now, "auto-renewal", "renewed automatically")
                except BaseException:
                    await self._unmark(tenant, marker)
                    raise
                return RenewalOutcome(tenant, "renewed", f"renewed as {new.fingerprint}", new)
            text = (
                f"Tenant CA {record.fingerprint} is valid until"
                f" {cert.not_valid_after_utc.isoformat()}: renewal is not yet required (it is"
                f" renewed once less than {RENEWAL_WINDOW_MONTHS} months remain)"
            )
            await self._audit(
                tenant,
                "Tenant certificate authority (CA) renewal not yet required",
                text,
                now,
                "auto-renewal",
                record.fingerprint,
            )
            return RenewalOutcome(tenant, "not_required", text, record)

    async def _unmark(self, tenant: str, previous: str | None) -> None:
        try:
            if previous is None:
                await self.store.delete_option(tenant, RENEW_MARKER_OPTION)
            else:
                await self.store.set_option(tenant, RENEW_MARKER_OPTION, previous)
        except StoreError as exc:
            log.warning("could not reset the auto-renewal marker of %s: %s", tenant, exc)

    # audit --------------------------------------------------------------------------
    async def _audit(
        self,
        tenant: str,
        activity: str,
        text: str,
        now: datetime,
        actor: str,
        source: str = "",
        severity: str = "information",
    ) -> None:
        await self.store.add_audit(
            AuditRecord(
                tenant=tenant,
                type=AUDIT_TYPE,
                activity=activity,
                text=text,
                time=now,
                user=actor,
                source=source,
                severity=severity,
            )
        )

    async def _audit_quietly(
        self, tenant: str, activity: str, text: str, now: datetime, severity: str
    ) -> None:
        try:
            await self._audit(tenant, activity, text, now, "auto-renewal", severity=severity)
        except StoreError as exc:
            log.warning("could not write audit record: %s", exc)


def _parse_iso(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def previous_auto_renewal(
    now: datetime, month: int, day: int, hour: int, minute: int
) -> datetime | None:
    """The latest scheduled moment at or before ``now`` (None if none in 9 years)."""
    now = now.astimezone(UTC)
    for year in range(now.year, now.year - 9, -1):
        try:
            moment = datetime(year, month, day, hour, minute, tzinfo=UTC)
        except ValueError:
            continue  # 29 February of a common year
        if moment <= now:
            return moment
    return None


class CaAutoRenewal:
    """The yearly auto-renewal task. ``await start()``, ``await stop()``.

    The decision when to run is :func:`trust.ca.next_auto_renewal`; tests drive
    :meth:`tick` with their own ``now`` instead of waiting for October. At
    start, a run missed while the gateway was down (the latest occasion before
    now) is caught up; tenants that ran it already are skipped by their marker.
    """

    def __init__(
        self,
        service: CaService,
        schedule: str,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        max_sleep: float = 3600.0,
    ) -> None:
        self.service = service
        self.schedule = parse_auto_renew(schedule)
        self.clock = clock
        self.max_sleep = max_sleep
        """Longest single sleep: the clock is re-read at least this often (clock jumps)."""
        self.next_run: datetime | None = None
        self._task: asyncio.Task[None] | None = None

    def prime(self, now: datetime) -> datetime | None:
        """Set the first occasion to run: the latest one at or before ``now``
        (caught up if it was missed; tenants that ran it skip it by their
        marker). None when auto-renewal is off."""
        if self.schedule is None:
            return None
        missed = previous_auto_renewal(now, *self.schedule)
        self.next_run = missed or next_auto_renewal(now, *self.schedule)
        return self.next_run

    async def start(self) -> None:
        if self.prime(self.clock()) is None:
            log.info("tenant CA auto-renewal is off ([ca] auto_renew is empty)")
            return
        self._task = asyncio.create_task(self._run(), name="ca-auto-renewal")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def tick(self, now: datetime) -> list[RenewalOutcome] | None:
        """Run the due occasion if ``now`` has reached it and schedule the next;
        None when nothing was due."""
        if self.schedule is None or self.next_run is None or now < self.next_run:
            return None
        # The latest occasion reached: after a long suspension, the most recent
        # one is run (the CA's state is what matters), not a stale one.
        scheduled = previous_auto_renewal(now, *self.schedule) or self.next_run
        self.next_run = next_auto_renewal(now, *self.schedule)
        return await self.service.auto_renew(now, scheduled)

    def seconds_until_next(self, now: datetime) -> float:
        if self.next_run is None:
            return self.max_sleep
        return max(0.0, min((self.next_run - now).total_seconds(), self.max_sleep))

    async def _run(self) -> None:
        while True:
            try:
                outcomes = await self.tick(self.clock())
                if outcomes:
                    done = ", ".join(f"{o.tenant}: {o.action}" for o in outcomes)
                    log.info("tenant CA auto-renewal: %s", done)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("tenant CA auto-renewal run failed")
            await asyncio.sleep(self.seconds_until_next(self.clock()))


def ca_service_for(ctx: HttpContext) -> CaService:
    """The one :class:`CaService` of an HTTP context (created on first use).

    Installs it as the context's ``tenant_ca_signer`` so the tenant CA signs
    the tenant's CRL export.
    """
    service = ctx.extra.get("ca_service")
    if not isinstance(service, CaService):
        service = CaService(ctx.store, ctx.secrets, ctx.config.ca, ctx.trust)
        ctx.extra["ca_service"] = service
        ctx.tenant_ca_signer = service.signer
    return service
