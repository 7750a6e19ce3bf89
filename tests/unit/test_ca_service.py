"""Tenant CA storage, renewal and auto-renewal (gateway.ca_service) on a real SQLite store.

Time is injected everywhere: the CA is created "now", renewal and the yearly
auto-renewal are driven with later ``now`` values instead of waiting.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from gateway.ca_service import (
    CaAutoRenewal,
    CaExists,
    CaService,
    NoCa,
    otp_key,
    previous_auto_renewal,
)
from gateway.config import CaConfig, ConfigError, parse_auto_renew
from gateway.secrets import SecretBox
from gateway.store.base import AuditQuery, Page
from gateway.store.sqlite import SqliteStore
from trust import ca, est
from trust.certs import fingerprint, load_certificate
from trust.model import AuditRecord, Status
from trust.verify import verify_chain

T0 = datetime(2026, 3, 15, 10, 30, tzinfo=UTC)
"""When the CA is created: 2 October 2026 is then too early to renew, 2027 is not."""


@dataclass
class Env:
    store: SqliteStore
    box: SecretBox
    service: CaService
    tmp: Path


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    store = SqliteStore(tmp_path / "gateway.db")
    await store.open()
    for tenant in ("t1", "t2"):
        await store.create_tenant(tenant)
    box = SecretBox.load_or_create(tmp_path)
    try:
        yield Env(store, box, CaService(store, box, CaConfig()), tmp_path)
    finally:
        await store.close()


async def audit(env: Env, tenant: str = "t1") -> list[AuditRecord]:
    records, _ = await env.store.list_audit(AuditQuery(tenant=tenant), Page(page_size=1000))
    return records


def csr(cn: str = "dev1") -> x509.CertificateSigningRequest:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    return x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())


# create and load -------------------------------------------------------------------


async def test_create_stores_a_sealed_key_and_a_tenant_ca_anchor(env: Env) -> None:
    record = await env.service.create("t1", T0, "admin")
    assert record.tenant_ca and record.auto_registration and record.status is Status.ENABLED
    cert = load_certificate(record.pem)
    assert ca.platform_subject(cert.subject) == "CN=t1, O=mtls-gateway"
    assert cert.not_valid_after_utc - T0 == ca.CA_VALIDITY
    (stored,) = await env.store.list_trusted_certificates("t1")
    assert stored == record
    sealed = await env.store.get_option("t1", f"ca-key:{record.fingerprint}")
    assert sealed is not None and sealed.startswith("mgk1:") and "PRIVATE" not in sealed
    # a fresh service (another process) opens it with the same KEK
    other = CaService(env.store, SecretBox.load_or_create(env.tmp), CaConfig())
    loaded = await other.load("t1")
    assert loaded is not None and loaded.record == record
    assert loaded.key.public_key() == cert.public_key()
    (created,) = await audit(env)
    assert created.type == "TenantCertificateAuthority" and "created" in created.activity


async def test_one_ca_per_tenant(env: Env) -> None:
    first = await env.service.create("t1", T0, "admin")
    with pytest.raises(CaExists) as info:
        await env.service.create("t1", T0, "admin")
    assert info.value.status == 409 and first.fingerprint in info.value.message
    await env.service.create("t2", T0, "admin")  # other tenants are independent


async def test_rsa_and_organisation_from_config(env: Env) -> None:
    service = CaService(env.store, env.box, CaConfig(organisation="Example Corp", key_type="rsa"))
    record = await service.create("t1", T0, "admin")
    cert = load_certificate(record.pem)
    assert isinstance(cert.public_key(), rsa.RSAPublicKey)
    assert ca.platform_subject(cert.subject) == "CN=t1, O=Example Corp"


async def test_missing_or_foreign_key_is_failed_to_retrieve_keypair(env: Env) -> None:
    record = await env.service.create("t1", T0, "admin")
    # another KEK (a gateway instance without the shared secrets/kek)
    stranger = CaService(env.store, SecretBox(os.urandom(32)), CaConfig())
    with pytest.raises(est.EstError) as info:
        await stranger.signing_ca("t1")
    assert (info.value.status, info.value.message) == (500, est.KEYPAIR_MISSING)
    # the key option gone while the certificate stays
    await env.store.delete_option("t1", f"ca-key:{record.fingerprint}")
    fresh = CaService(env.store, env.box, CaConfig())
    with pytest.raises(est.EstError) as info:
        await fresh.signing_ca("t1")
    assert (info.value.status, info.value.message) == (500, est.KEYPAIR_MISSING)


async def test_no_ca_is_ca_unavailable(env: Env) -> None:
    with pytest.raises(est.EstError) as info:
        await env.service.signing_ca("t1")
    assert (info.value.status, info.value.message) == (409, est.CA_UNAVAILABLE)
    assert await env.service.load("t1") is None
    assert await env.service.signer("t1") is None


async def test_deleting_the_certificate_deletes_the_key(env: Env) -> None:
    record = await env.service.create("t1", T0, "admin")
    await env.store.delete_trusted_certificate("t1", record.fingerprint)
    assert await env.store.get_option("t1", f"ca-key:{record.fingerprint}") is None
    assert await env.service.load("t1") is None
    await env.service.create("t1", T0, "admin")  # a new CA with a new key pair


# renewal ---------------------------------------------------------------------------


async def test_renew_only_when_less_than_24_months_remain(env: Env) -> None:
    with pytest.raises(NoCa):
        await env.service.renew("t1", T0, "admin")
    old = await env.store.update_trusted_certificate(
        "t1",
        (await env.service.create("t1", T0, "admin")).fingerprint,
        name="our CA",
        proof_of_possession_valid=True,
    )
    old_cert = load_certificate(old.pem)
    loaded = await env.service.load("t1")
    assert loaded is not None
    device = ca.sign_device_certificate(csr(), old_cert, loaded.key, "dev1", T0 + timedelta(300))
    with pytest.raises(ca.RenewalNotAllowed) as info:
        await env.service.renew("t1", T0 + timedelta(days=300), "admin")
    assert info.value.status == 409 and "24 months" in info.value.message

    later = T0 + timedelta(days=400)  # 13 months on: 23 months remain
    new = await env.service.renew("t1", later, "admin")
    new_cert = load_certificate(new.pem)
    assert new.fingerprint != old.fingerprint
    assert (new.name, new.status, new.auto_registration) == ("our CA", Status.ENABLED, True)
    assert new.proof_of_possession_valid and new.tenant_ca and new.created == old.created
    assert new_cert.subject == old_cert.subject
    assert new_cert.public_key() == old_cert.public_key()
    assert new_cert.not_valid_after_utc - later == ca.CA_VALIDITY
    assert [r.fingerprint for r in await env.store.list_trusted_certificates("t1")] == [
        new.fingerprint
    ]
    assert await env.store.get_option("t1", f"ca-key:{old.fingerprint}") is None
    assert await env.store.get_option("t1", f"ca-key:{new.fingerprint}") is not None
    # a device issued by the old certificate verifies against the renewed one
    assert verify_chain([device], [new_cert], later).leaf == device
    signing = await env.service.signing_ca("t1")
    assert signing.record.fingerprint == new.fingerprint


async def test_two_ca_records_after_an_interrupted_renewal_pick_the_longest(env: Env) -> None:
    record = await env.service.create("t1", T0, "admin")
    loaded = await env.service.load("t1")
    assert loaded is not None
    later = T0 + timedelta(days=400)
    renewed = ca.renew_tenant_ca(loaded.certificate, loaded.key, later)
    # the crash case: new record and key stored, old one not yet deleted
    pem = renewed.public_bytes(Encoding.PEM).decode()
    new = replace(record, fingerprint=fingerprint(renewed), pem=pem)
    await env.store.set_option(
        "t1", f"ca-key:{new.fingerprint}", env.box.seal_private_key(loaded.key, "tenant-ca:t1")
    )
    await env.store.add_trusted_certificate(new)
    assert (await env.service.current("t1")) == new


# auto-renewal ----------------------------------------------------------------------


async def test_auto_renewal_audits_not_required_then_renews(env: Env) -> None:
    await env.service.create("t1", T0, "admin")
    scheduler = CaAutoRenewal(env.service, "10-02 02:00")
    assert scheduler.prime(T0) == datetime(2025, 10, 2, 2, 0, tzinfo=UTC)  # catch-up occasion
    assert await scheduler.tick(T0) == []  # the CA did not exist yet on 2 October 2025
    assert scheduler.next_run == datetime(2026, 10, 2, 2, 0, tzinfo=UTC)
    assert await scheduler.tick(datetime(2026, 10, 2, 1, 59, tzinfo=UTC)) is None
    assert scheduler.seconds_until_next(datetime(2026, 10, 2, 1, 59, tzinfo=UTC)) == 60

    first = datetime(2026, 10, 2, 2, 0, 1, tzinfo=UTC)  # ~29 months remain
    (outcome,) = await scheduler.tick(first) or []
    assert outcome.action == "not_required"
    records = await audit(env)
    assert records[0].activity == "Tenant certificate authority (CA) renewal not yet required"
    assert records[0].type == "TenantCertificateAuthority" and records[0].user == "auto-renewal"
    assert await scheduler.tick(first) is None  # the next occasion is a year later
    # a suspended process waking up a year late runs the latest occasion, once
    late = CaAutoRenewal(CaService(env.store, env.box, CaConfig()), "10-02 02:00")
    late.next_run = datetime(2025, 10, 2, 2, 0, tzinfo=UTC)
    assert await late.tick(first) == []  # = the 2026 occasion, which t1 ran already

    second = datetime(2027, 10, 2, 2, 0, 5, tzinfo=UTC)  # ~17 months remain
    (outcome,) = await scheduler.tick(second) or []
    assert outcome.action == "renewed" and outcome.record is not None
    assert load_certificate(outcome.record.pem).not_valid_after_utc - second > timedelta(days=1094)
    assert (await audit(env))[
        0
    ].activity == "Tenant certificate authority (CA) renewed automatically"

    # another instance sharing the store skips the occasion it already ran
    other = CaAutoRenewal(CaService(env.store, env.box, CaConfig()), "10-02 02:00")
    other.prime(second + timedelta(hours=1))
    count = len(await audit(env))
    assert await other.tick(second + timedelta(hours=1)) == []
    assert len(await audit(env)) == count


async def test_auto_renewal_failure_is_audited_and_retried(env: Env) -> None:
    record = await env.service.create("t1", T0, "admin")
    await env.service.create("t2", T0, "admin")
    await env.store.delete_option("t1", f"ca-key:{record.fingerprint}")
    service = CaService(env.store, env.box, CaConfig())  # no cached key
    when = datetime(2027, 10, 2, 2, 0, tzinfo=UTC)
    outcomes = {o.tenant: o for o in await service.auto_renew(when, when)}
    assert outcomes["t1"].action == "failed" and est.KEYPAIR_MISSING in outcomes["t1"].message
    assert outcomes["t2"].action == "renewed"  # one tenant does not stop the others
    failed = (await audit(env))[0]
    assert failed.severity == "warning" and "failed" in failed.activity
    # not marked as done: a restart tries again
    assert [o.tenant for o in await service.auto_renew(when, when)] == ["t1"]


async def test_auto_renewal_off_and_schedule_parsing() -> None:
    assert parse_auto_renew("") is None
    assert parse_auto_renew("10-02 02:00") == (10, 2, 2, 0)
    assert parse_auto_renew(" 02-29 23:59 ") == (2, 29, 23, 59)
    for bad in ("10-32 02:00", "13-01 00:00", "10-02 24:00", "10-02", "yearly", "10-02 2"):
        with pytest.raises(ConfigError):
            parse_auto_renew(bad)
    assert previous_auto_renewal(datetime(2027, 3, 1, tzinfo=UTC), 2, 29, 0, 0) == datetime(
        2024, 2, 29, tzinfo=UTC
    )
    assert previous_auto_renewal(datetime(2026, 10, 2, 2, 0, tzinfo=UTC), 10, 2, 2, 0) == (
        datetime(2026, 10, 2, 2, 0, tzinfo=UTC)
    )


async def test_scheduler_off_starts_no_task(env: Env) -> None:
    scheduler = CaAutoRenewal(env.service, "")
    await scheduler.start()
    assert scheduler.next_run is None and await scheduler.tick(T0) is None
    await scheduler.stop()


async def test_scheduler_task_runs_a_due_occasion(env: Env) -> None:
    await env.service.create("t1", T0, "admin")
    # started just after the occasion (e.g. the gateway was down at 02:00): caught up
    now = datetime(2026, 10, 2, 2, 0, 1, tzinfo=UTC)
    scheduler = CaAutoRenewal(env.service, "10-02 02:00", clock=lambda: now, max_sleep=0.01)
    await scheduler.start()
    try:
        for _ in range(500):  # bounded: at most ~5 s
            if any("not yet required" in r.activity for r in await audit(env)):
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail("the scheduler never ran the due occasion")
    finally:
        await scheduler.stop()


# feature toggle and keys ----------------------------------------------------------


async def test_feature_toggle(env: Env) -> None:
    assert await env.service.feature_active("t1") is True
    assert await env.service.set_feature("t1", False, T0, "admin") is False
    assert await env.service.feature_active("t1") is False
    assert await env.service.feature_active("t2") is True
    await env.service.set_feature("t1", False, T0, "admin")  # no change: no audit
    assert [r.activity for r in await audit(env)] == ["Certificate authority feature disabled"]
    off = CaService(env.store, env.box, CaConfig(feature_default=False))
    assert await off.feature_active("t2") is False


def test_otp_key_is_derived_from_the_kek(tmp_path: Path) -> None:
    box = SecretBox.load_or_create(tmp_path)
    again = SecretBox.load_or_create(tmp_path)
    assert otp_key(box) == otp_key(again) and len(otp_key(box)) == 32
    assert otp_key(box) != otp_key(SecretBox(os.urandom(32)))
    assert otp_key(box) != box.derive_key("something else")
    stored = est.hash_otp("otp", otp_key(box))
    assert est.verify_otp(stored, "otp", otp_key(again))
    assert not est.verify_otp(stored, "otp", otp_key(SecretBox(os.urandom(32))))
