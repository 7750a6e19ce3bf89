"""Behavioural contract of :class:`gateway.store.base.Store`, shared by every backend.

A concrete test module subclasses :class:`StoreContract` and provides an async
fixture ``store`` yielding an opened, empty store::

    class TestSqliteStore(StoreContract):
        @pytest.fixture
        async def store(self, tmp_path):
            ...

Where the interface leaves an order unspecified the tests compare sorted
values, so any backend can pass.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from gateway.store.base import (
    PROVISIONED_KEEP,
    AuditQuery,
    Conflict,
    NotFound,
    Page,
    Store,
    StoreError,
)
from trust.model import (
    AdminUser,
    AuditRecord,
    Change,
    ChangeKind,
    DeviceUser,
    PendingRegistration,
    ProvisionedCertificate,
    RevocationEntry,
    RevocationSettings,
    Status,
    TrustedCertificate,
)

T0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
CET = timezone(timedelta(hours=2))
FP1 = "a1" * 20
FP2 = "b2" * 20
PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def anchor(tenant: str = "t1", fingerprint: str = FP1, **kw: object) -> TrustedCertificate:
    fields: dict[str, object] = {
        "tenant": tenant,
        "fingerprint": fingerprint,
        "name": "root",
        "status": Status.ENABLED,
        "auto_registration": True,
        "pem": PEM,
        **kw,
    }
    return TrustedCertificate(**fields)  # type: ignore[arg-type]


def provisioned(serial: int, not_before: datetime, device: str = "d1") -> ProvisionedCertificate:
    return ProvisionedCertificate(
        tenant="t1",
        device_id=device,
        serial=serial,
        not_before=not_before,
        not_after=not_before + timedelta(days=365),
        fingerprint=f"{serial:040x}",
        first_seen=T0,
        last_seen=T0,
    )


def audit(i: int, tenant: str = "t1", type_: str = "Login", **kw: object) -> AuditRecord:
    fields: dict[str, object] = {
        "tenant": tenant,
        "type": type_,
        "activity": f"activity {i}",
        "text": f"text {i}",
        "time": T0 + timedelta(minutes=i),
        **kw,
    }
    return AuditRecord(**fields)  # type: ignore[arg-type]


def is_utc(value: datetime | None) -> bool:
    return value is not None and value.utcoffset() == timedelta(0)


async def feed(store: Store, since: int) -> list[tuple[ChangeKind, str, str]]:
    return [(c.kind, c.tenant, c.key) for c in await store.changes_since(since)]


class StoreContract:
    """Every test gets a fresh, opened, empty ``store``."""

    # lifecycle and tenants -----------------------------------------------------
    async def test_ping(self, store: Store) -> None:
        await store.ping()

    async def test_empty_store(self, store: Store) -> None:
        assert await store.list_tenants() == []
        assert await store.change_seq() == 0
        assert await store.changes_since(0) == []
        assert await store.list_trusted_certificates() == []

    async def test_create_tenant(self, store: Store) -> None:
        assert await store.create_tenant("t1") is True
        assert await store.create_tenant("t1") is False
        assert await store.create_tenant("other-2_X") is True
        assert sorted(await store.list_tenants()) == ["other-2_X", "t1"]
        assert await store.tenant_exists("t1")
        assert not await store.tenant_exists("t3")

    @pytest.mark.parametrize("bad", ["", "a b", "t/1", "x" * 65, "t1\n", "tenant.1"])
    async def test_create_tenant_rejects_invalid_id(self, store: Store, bad: str) -> None:
        with pytest.raises(StoreError, match="invalid tenant"):
            await store.create_tenant(bad)
        assert await store.list_tenants() == []

    # trusted certificates ------------------------------------------------------
    async def test_trusted_certificate_round_trip_every_field(self, store: Store) -> None:
        await store.create_tenant("t1")
        cert = anchor(
            name="Device CA",
            status=Status.DISABLED,
            auto_registration=False,
            proof_of_possession_valid=True,
            tenant_ca=True,
            pop_code="code-123",
            pop_code_until=datetime(2024, 5, 2, 14, 0, 0, 500, tzinfo=CET),
            created=T0,
        )
        await store.add_trusted_certificate(cert)
        got = await store.get_trusted_certificate("t1", FP1)
        assert got == cert
        assert is_utc(got.pop_code_until) and is_utc(got.created)
        assert got.pop_code_until == datetime(2024, 5, 2, 12, 0, 0, 500, tzinfo=UTC)
        assert await store.list_trusted_certificates("t1") == [cert]
        assert await store.find_trusted_certificates(FP1) == [cert]

    async def test_trusted_certificate_round_trip_defaults(self, store: Store) -> None:
        await store.create_tenant("t1")
        cert = anchor()
        await store.add_trusted_certificate(cert)
        got = await store.get_trusted_certificate("t1", FP1)
        assert got == cert
        assert got.pop_code is None and got.pop_code_until is None and got.created is None
        assert got.tenant_ca is False and got.proof_of_possession_valid is False

    async def test_duplicate_certificate_conflicts_in_same_tenant_only(self, store: Store) -> None:
        await store.create_tenant("t1")
        await store.create_tenant("t2")
        await store.add_trusted_certificate(anchor("t1"))
        with pytest.raises(Conflict, match=f"{FP1}.*t1"):
            await store.add_trusted_certificate(anchor("t1", name="again"))
        assert (await store.get_trusted_certificate("t1", FP1)).name == "root"
        await store.add_trusted_certificate(anchor("t2", name="copy"))
        found = await store.find_trusted_certificates(FP1)
        assert sorted((c.tenant, c.name) for c in found) == [("t1", "root"), ("t2", "copy")]
        assert await store.find_trusted_certificates(FP2) == []

    async def test_trusted_certificate_not_found(self, store: Store) -> None:
        with pytest.raises(NotFound, match="t1"):
            await store.add_trusted_certificate(anchor("t1"))
        await store.create_tenant("t1")
        with pytest.raises(NotFound, match=f"trusted certificate {FP1} not found in tenant t1"):
            await store.get_trusted_certificate("t1", FP1)
        with pytest.raises(NotFound):
            await store.get_trusted_certificate("nope", FP1)
        with pytest.raises(NotFound, match=FP1):
            await store.update_trusted_certificate("t1", FP1, name="x")
        with pytest.raises(NotFound, match=FP1):
            await store.delete_trusted_certificate("t1", FP1)
        assert await store.list_trusted_certificates("nope") == []

    async def test_list_trusted_certificates_oldest_first(self, store: Store) -> None:
        await store.create_tenant("t1")
        await store.create_tenant("t2")
        fps = [f"{i:02x}" * 20 for i in (9, 3, 7, 1)]
        for i, fp in enumerate(fps):
            tenant = "t1" if i % 2 == 0 else "t2"
            await store.add_trusted_certificate(
                anchor(tenant, fp, created=T0 + timedelta(seconds=i))
            )
        assert [c.fingerprint for c in await store.list_trusted_certificates()] == fps
        assert [c.fingerprint for c in await store.list_trusted_certificates("t1")] == fps[::2]
        assert [c.fingerprint for c in await store.list_trusted_certificates("t2")] == fps[1::2]

    async def test_update_changes_given_fields_only(self, store: Store) -> None:
        await store.create_tenant("t1")
        cert = anchor(created=T0, pop_code="c1", pop_code_until=T0)
        await store.add_trusted_certificate(cert)
        steps: list[tuple[dict[str, Any], TrustedCertificate]] = []
        cur = cert
        updates: list[dict[str, Any]] = [
            {"name": "renamed"},
            {"status": Status.DISABLED},
            {"auto_registration": False},
            {"proof_of_possession_valid": True},
            {"pop_code": "c2"},
            {"pop_code_until": T0 + timedelta(hours=1)},
            {"pem": PEM.replace("MIIB", "MIIC")},
        ]
        for kw in updates:
            cur = replace(cur, **kw)
            steps.append((kw, cur))
        for kw, expected in steps:
            got = await store.update_trusted_certificate("t1", FP1, **kw)
            assert got == expected
            assert await store.get_trusted_certificate("t1", FP1) == expected
        unchanged = await store.update_trusted_certificate("t1", FP1)
        assert unchanged == steps[-1][1]

    async def test_update_sets_and_clears_pop_code(self, store: Store) -> None:
        await store.create_tenant("t1")
        await store.add_trusted_certificate(anchor())
        until = datetime(2030, 1, 1, 1, 0, tzinfo=CET)
        got = await store.update_trusted_certificate(
            "t1", FP1, pop_code="abc", pop_code_until=until
        )
        assert (got.pop_code, got.pop_code_until) == ("abc", until)
        assert is_utc((await store.get_trusted_certificate("t1", FP1)).pop_code_until)
        got = await store.update_trusted_certificate(
            "t1", FP1, clear_pop_code=True, proof_of_possession_valid=True
        )
        assert (got.pop_code, got.pop_code_until, got.proof_of_possession_valid) == (
            None,
            None,
            True,
        )
        assert await store.get_trusted_certificate("t1", FP1) == got

    async def test_update_affects_one_tenant_only(self, store: Store) -> None:
        for t in ("t1", "t2"):
            await store.create_tenant(t)
            await store.add_trusted_certificate(anchor(t))
        await store.update_trusted_certificate("t1", FP1, status=Status.DISABLED)
        assert (await store.get_trusted_certificate("t2", FP1)).status is Status.ENABLED

    async def test_delete_removes_certificate_and_its_ca_key(self, store: Store) -> None:
        for t in ("t1", "t2"):
            await store.create_tenant(t)
            await store.add_trusted_certificate(anchor(t))
            await store.set_option(t, f"ca-key:{FP1}", f"key of {t}")
        await store.set_option("t1", f"ca-key:{FP2}", "other key")
        await store.set_option("t1", "feature", "on")
        await store.delete_trusted_certificate("t1", FP1)
        with pytest.raises(NotFound):
            await store.get_trusted_certificate("t1", FP1)
        assert await store.get_option("t1", f"ca-key:{FP1}") is None
        assert await store.get_option("t1", f"ca-key:{FP2}") == "other key"
        assert await store.get_option("t1", "feature") == "on"
        assert await store.get_option("t2", f"ca-key:{FP1}") == "key of t2"
        assert [c.tenant for c in await store.find_trusted_certificates(FP1)] == ["t2"]
        # deleting frees the fingerprint for a new upload
        await store.add_trusted_certificate(anchor("t1"))

    # revocation ----------------------------------------------------------------
    async def test_revocations_duplicates_keep_original(self, store: Store) -> None:
        await store.create_tenant("t1")
        await store.create_tenant("t2")
        first = [RevocationEntry("t1", s, T0) for s in (1, 0xABC, 2**159 + 7)]
        assert await store.add_revocations(first) == (3, 0)
        later = T0 + timedelta(days=3)
        again = [
            RevocationEntry("t1", 0xABC, later),
            RevocationEntry("t1", 5, later),
            RevocationEntry("t1", 5, later + timedelta(days=1)),  # duplicate within a batch
            RevocationEntry("t2", 1, later),  # same serial, other tenant
        ]
        assert await store.add_revocations(again) == (2, 2)
        t1 = {e.serial: e for e in await store.list_revocations("t1")}
        assert set(t1) == {1, 0xABC, 2**159 + 7, 5}
        assert t1[0xABC].revoked_at == T0
        assert t1[5].revoked_at == later
        assert all(is_utc(e.revoked_at) and e.tenant == "t1" for e in t1.values())
        assert await store.list_revocations("t2") == [RevocationEntry("t2", 1, later)]
        assert await store.add_revocations([]) == (0, 0)
        assert await store.list_revocations("nope") == []

    async def test_revocations_are_irreversible(self, store: Store) -> None:
        api = [n for n in dir(Store) if "revocation" in n]
        assert not [n for n in api if any(w in n for w in ("delete", "remove", "clear"))]
        await store.create_tenant("t1")
        await store.add_revocations([RevocationEntry("t1", 42, T0)])
        await store.set_revocation_settings("t1", RevocationSettings())
        assert [e.serial for e in await store.list_revocations("t1")] == [42]

    async def test_revocations_unknown_tenant_writes_nothing(self, store: Store) -> None:
        await store.create_tenant("t1")
        seq = await store.change_seq()
        batch = [RevocationEntry("t1", 1, T0), RevocationEntry("nope", 2, T0)]
        with pytest.raises(NotFound, match="nope"):
            await store.add_revocations(batch)
        assert await store.list_revocations("t1") == []
        assert await store.changes_since(seq) == []

    async def test_revocation_settings(self, store: Store) -> None:
        await store.create_tenant("t1")
        await store.create_tenant("t2")
        assert await store.get_revocation_settings("t1") == RevocationSettings(False, False)
        await store.set_revocation_settings("t1", RevocationSettings(offline=True))
        assert await store.get_revocation_settings("t1") == RevocationSettings(True, False)
        await store.set_revocation_settings("t1", RevocationSettings(offline=False, online=True))
        assert await store.get_revocation_settings("t1") == RevocationSettings(False, True)
        assert await store.get_revocation_settings("t2") == RevocationSettings()
        with pytest.raises(NotFound):
            await store.set_revocation_settings("nope", RevocationSettings(True, True))
        with pytest.raises(NotFound):
            await store.get_revocation_settings("nope")

    # device users --------------------------------------------------------------
    async def test_register_device_created_once(self, store: Store) -> None:
        await store.create_tenant("t1")
        user, created = await store.register_device("t1", "dev-1", "auto", T0)
        assert created is True
        assert user == DeviceUser("t1", "dev-1", enabled=True, registered_via="auto", created=T0)
        assert user.last_connect is None and is_utc(user.created)
        again, created = await store.register_device("t1", "dev-1", "bulk", T0 + timedelta(1))
        assert created is False
        assert again == user
        assert await store.get_device("t1", "dev-1") == user
        with pytest.raises(NotFound, match="t2"):
            await store.register_device("t2", "dev-1", "auto", T0)

    async def test_register_device_concurrently(self, store: Store) -> None:
        await store.create_tenant("t1")
        results = await asyncio.gather(
            *(store.register_device("t1", "dev-1", f"via{i}", T0) for i in range(20))
        )
        assert sum(created for _, created in results) == 1
        (winner,) = [u for u, created in results if created]
        assert all(u == winner for u, _ in results)
        assert await store.list_devices("t1") == [winner]
        kinds = [k for k, _, _ in await feed(store, 0)]
        assert kinds.count(ChangeKind.DEVICE) == 1

    async def test_devices_list_find_get(self, store: Store) -> None:
        for t in ("t1", "t2", "t3"):
            await store.create_tenant(t)
        await store.register_device("t1", "a", "auto", T0)
        await store.register_device("t1", "b", "auto", T0)
        await store.register_device("t3", "a", "bulk", T0)
        assert sorted(d.device_id for d in await store.list_devices("t1")) == ["a", "b"]
        assert await store.list_devices("t2") == []
        assert await store.list_devices("nope") == []
        assert sorted(await store.find_device_tenants("a")) == ["t1", "t3"]
        assert await store.find_device_tenants("b") == ["t1"]
        assert await store.find_device_tenants("zz") == []
        with pytest.raises(NotFound, match="device b not found in tenant t3"):
            await store.get_device("t3", "b")

    async def test_set_device_enabled_and_touch(self, store: Store) -> None:
        await store.create_tenant("t1")
        await store.register_device("t1", "d", "auto", T0)
        off = await store.set_device_enabled("t1", "d", False)
        assert off.enabled is False
        assert (await store.get_device("t1", "d")).enabled is False
        assert (await store.set_device_enabled("t1", "d", True)).enabled is True
        seen = datetime(2024, 6, 1, 8, 30, tzinfo=CET)
        await store.touch_device("t1", "d", seen)
        got = await store.get_device("t1", "d")
        assert got.last_connect == seen and is_utc(got.last_connect)
        assert got.created == T0 and got.enabled
        with pytest.raises(NotFound):
            await store.set_device_enabled("t1", "x", False)
        with pytest.raises(NotFound):
            await store.touch_device("t1", "x", T0)
        with pytest.raises(NotFound):
            await store.touch_device("nope", "d", T0)

    # pending registrations -----------------------------------------------------
    async def test_pending_round_trip(self, store: Store) -> None:
        await store.create_tenant("t1")
        pending = PendingRegistration(
            "t1",
            "dev-9",
            otp_hash="$argon2id$v=19$abc",
            attributes=(("TYPE", "c8y_Meter"), ("NAME", 'Meter "9", ü'), ("ICCID", "")),
            created=T0,
        )
        bare = PendingRegistration("t1", "dev-1")
        await store.add_pending_registration(pending)
        await store.add_pending_registration(bare)
        got = await store.get_pending_registration("t1", "dev-9")
        assert got == pending and is_utc(got.created)
        assert isinstance(got.attributes, tuple) and isinstance(got.attributes[0], tuple)
        assert await store.get_pending_registration("t1", "dev-1") == bare
        listed = await store.list_pending_registrations("t1")
        assert sorted(listed, key=lambda p: p.device_id) == [bare, pending]
        assert await store.list_pending_registrations("nope") == []

    async def test_pending_conflicts_and_not_found(self, store: Store) -> None:
        await store.create_tenant("t1")
        await store.create_tenant("t2")
        await store.add_pending_registration(PendingRegistration("t1", "d"))
        with pytest.raises(Conflict, match="d"):
            await store.add_pending_registration(PendingRegistration("t1", "d", otp_hash="x"))
        assert (await store.get_pending_registration("t1", "d")).otp_hash is None
        await store.register_device("t1", "e", "auto", T0)
        with pytest.raises(Conflict, match="e"):
            await store.add_pending_registration(PendingRegistration("t1", "e"))
        await store.add_pending_registration(PendingRegistration("t2", "d"))  # other tenant
        with pytest.raises(NotFound):
            await store.add_pending_registration(PendingRegistration("nope", "d"))
        with pytest.raises(NotFound, match="x"):
            await store.get_pending_registration("t1", "x")
        with pytest.raises(NotFound):
            await store.consume_pending_registration("t1", "x")

    async def test_consume_pending_works_once(self, store: Store) -> None:
        await store.create_tenant("t1")
        pending = PendingRegistration("t1", "d", otp_hash="h", attributes=(("a", "b"),))
        await store.add_pending_registration(pending)
        results = await asyncio.gather(
            *(store.consume_pending_registration("t1", "d") for _ in range(10)),
            return_exceptions=True,
        )
        assert [r for r in results if not isinstance(r, NotFound)] == [pending]
        assert await store.list_pending_registrations("t1") == []

    async def test_register_device_consumes_pending(self, store: Store) -> None:
        await store.create_tenant("t1")
        await store.add_pending_registration(PendingRegistration("t1", "d"))
        await store.add_pending_registration(PendingRegistration("t1", "other"))
        _, created = await store.register_device("t1", "d", "bulk", T0)
        assert created
        with pytest.raises(NotFound):
            await store.get_pending_registration("t1", "d")
        assert [p.device_id for p in await store.list_pending_registrations("t1")] == ["other"]
        assert (await store.get_device("t1", "d")).registered_via == "bulk"

    # provisioned certificates --------------------------------------------------
    async def test_provisioned_keeps_newest_by_not_before(self, store: Store) -> None:
        await store.create_tenant("t1")
        certs = [provisioned(100 + i, T0 + timedelta(days=i)) for i in range(PROVISIONED_KEEP + 2)]
        shuffled = certs[:]
        random.Random(7).shuffle(shuffled)
        assert shuffled != certs
        for cert in shuffled:
            await store.record_provisioned_certificate(cert)
        got = await store.list_provisioned_certificates("t1", "d1")
        assert got == sorted(certs, key=lambda c: c.not_before, reverse=True)[:PROVISIONED_KEEP]
        # an older certificate seen late is dropped at once
        await store.record_provisioned_certificate(provisioned(5, T0 - timedelta(days=30)))
        assert await store.list_provisioned_certificates("t1", "d1") == got

    async def test_provisioned_upsert_keeps_first_seen(self, store: Store) -> None:
        await store.create_tenant("t1")
        cert = provisioned(2**130 + 1, T0)
        await store.record_provisioned_certificate(cert)
        later = T0 + timedelta(hours=5)
        await store.record_provisioned_certificate(replace(cert, first_seen=later, last_seen=later))
        (got,) = await store.list_provisioned_certificates("t1", "d1")
        assert got == replace(cert, last_seen=later)
        assert got.serial == 2**130 + 1
        assert all(is_utc(v) for v in (got.not_before, got.not_after, got.first_seen))

    async def test_provisioned_is_per_device(self, store: Store) -> None:
        await store.create_tenant("t1")
        for i in range(PROVISIONED_KEEP):
            await store.record_provisioned_certificate(provisioned(i + 1, T0 + timedelta(i), "a"))
        for i in range(PROVISIONED_KEEP):
            await store.record_provisioned_certificate(provisioned(i + 1, T0 + timedelta(i), "b"))
        assert len(await store.list_provisioned_certificates("t1", "a")) == PROVISIONED_KEEP
        assert len(await store.list_provisioned_certificates("t1", "b")) == PROVISIONED_KEEP
        assert await store.list_provisioned_certificates("t1", "c") == []
        with pytest.raises(NotFound):
            await store.record_provisioned_certificate(replace(provisioned(1, T0), tenant="x"))

    # admin users ---------------------------------------------------------------
    async def test_admin_users(self, store: Store) -> None:
        await store.create_tenant("management")
        await store.create_tenant("t1")
        admin = AdminUser("management", "alice", "$argon2id$h1", frozenset({"admin", "read"}))
        await store.put_admin_user(admin)
        got = await store.get_admin_user("management", "alice")
        assert got == admin and isinstance(got.roles, frozenset)
        replaced = replace(admin, password_hash="$argon2id$h2", roles=frozenset(), enabled=False)
        await store.put_admin_user(replaced)
        assert await store.get_admin_user("management", "alice") == replaced
        other = AdminUser("t1", "alice", "$argon2id$h3", frozenset({"tenant-admin"}))
        await store.put_admin_user(other)
        found = await store.find_admin_users("alice")
        assert sorted(found, key=lambda u: u.tenant) == [replaced, other]
        assert await store.find_admin_users("bob") == []
        with pytest.raises(NotFound, match="bob"):
            await store.get_admin_user("t1", "bob")
        with pytest.raises(NotFound):
            await store.put_admin_user(replace(other, tenant="nope"))
        bob = AdminUser("t1", "bob", "$argon2id$h4")
        await store.put_admin_user(bob)
        assert [u.username for u in await store.list_admin_users("t1")] == ["alice", "bob"]
        assert await store.list_admin_users("nope") == []

    # options -------------------------------------------------------------------
    async def test_options(self, store: Store) -> None:
        await store.create_tenant("t1")
        await store.create_tenant("t2")
        assert await store.get_option("t1", "k") is None
        await store.set_option("t1", "k", "v1")
        await store.set_option("t1", "k", "v2")
        assert await store.get_option("t1", "k") == "v2"
        assert await store.get_option("t2", "k") is None
        assert await store.get_option("nope", "k") is None
        await store.delete_option("t1", "k")
        assert await store.get_option("t1", "k") is None
        await store.delete_option("t1", "k")  # idempotent
        with pytest.raises(NotFound):
            await store.set_option("nope", "k", "v")

    # audit ---------------------------------------------------------------------
    async def test_audit_round_trip(self, store: Store) -> None:
        record = audit(
            1, user="alice", source="10.0.0.1", severity="warning", time=T0.astimezone(CET)
        )
        first = await store.add_audit(record)
        second = await store.add_audit(audit(2, tenant="not-created"))
        assert second > first
        records, total = await store.list_audit(AuditQuery(), Page(page_size=10))
        assert total == 2
        assert records[1] == replace(record, id=first)
        assert is_utc(records[1].time)
        assert records[0].id == second and records[0].tenant == "not-created"

    async def test_audit_newest_first_and_paging(self, store: Store) -> None:
        order = list(range(12))
        random.Random(3).shuffle(order)
        for i in order:
            await store.add_audit(audit(i))
        newest_first = [f"activity {i}" for i in range(11, -1, -1)]
        seen: list[str] = []
        for page in (1, 2, 3):
            records, total = await store.list_audit(AuditQuery(), Page(5, page))
            assert total == 12
            assert len(records) == (5 if page < 3 else 2)
            seen += [r.activity for r in records]
        assert seen == newest_first
        records, total = await store.list_audit(AuditQuery(), Page(5, 4))
        assert (records, total) == ([], 12)
        default, _ = await store.list_audit(AuditQuery(), Page())
        assert [r.activity for r in default] == newest_first[:5]
        with pytest.raises(StoreError):
            await store.list_audit(AuditQuery(), Page(5, 0))
        with pytest.raises(StoreError):
            await store.list_audit(AuditQuery(), Page(0, 1))

    async def test_audit_filters(self, store: Store) -> None:
        for i in range(10):
            await store.add_audit(
                audit(i, tenant="t1" if i % 2 else "t2", type_="Login" if i < 5 else "Anchor")
            )

        async def ids(query: AuditQuery, size: int = 100) -> tuple[list[int], int]:
            records, total = await store.list_audit(query, Page(size, 1))
            return [int(r.activity.split()[1]) for r in records], total

        assert await ids(AuditQuery(tenant="t1")) == ([9, 7, 5, 3, 1], 5)
        assert await ids(AuditQuery(type="Login")) == ([4, 3, 2, 1, 0], 5)
        assert await ids(AuditQuery(tenant="t2", type="Anchor")) == ([8, 6], 2)
        date_from, date_to = T0 + timedelta(minutes=3), T0 + timedelta(minutes=6)
        assert await ids(AuditQuery(date_from=date_from, date_to=date_to)) == ([6, 5, 4, 3], 4)
        assert await ids(AuditQuery(date_from=date_from.astimezone(CET))) == (
            [9, 8, 7, 6, 5, 4, 3],
            7,
        )
        assert await ids(AuditQuery(date_to=date_to), size=2) == ([6, 5], 7)
        assert await ids(AuditQuery(tenant="t1", type="Login", date_to=date_to)) == ([3, 1], 2)
        assert await ids(AuditQuery(tenant="t3")) == ([], 0)

    # change feed ---------------------------------------------------------------
    async def test_change_feed_records_each_change(self, store: Store) -> None:
        T, A, R, S, D, P = (
            ChangeKind.TENANT,
            ChangeKind.ANCHOR,
            ChangeKind.REVOCATION,
            ChangeKind.SETTINGS,
            ChangeKind.DEVICE,
            ChangeKind.PENDING,
        )
        await store.create_tenant("t1")
        await store.add_trusted_certificate(anchor())
        await store.update_trusted_certificate("t1", FP1, name="n")
        await store.add_revocations([RevocationEntry("t1", 0xFF, T0), RevocationEntry("t1", 1, T0)])
        await store.set_revocation_settings("t1", RevocationSettings(online=True))
        await store.register_device("t1", "d1", "auto", T0)
        await store.set_device_enabled("t1", "d1", False)
        await store.add_pending_registration(PendingRegistration("t1", "d2"))
        await store.consume_pending_registration("t1", "d2")
        await store.add_pending_registration(PendingRegistration("t1", "d3"))
        await store.register_device("t1", "d3", "bulk", T0)
        await store.delete_trusted_certificate("t1", FP1)
        expected = [
            (T, "t1", ""),
            (A, "t1", FP1),
            (A, "t1", FP1),
            (R, "t1", "ff"),
            (R, "t1", "1"),
            (S, "t1", ""),
            (D, "t1", "d1"),
            (D, "t1", "d1"),
            (P, "t1", "d2"),
            (P, "t1", "d2"),
            (P, "t1", "d3"),
        ]
        got = await feed(store, 0)
        assert got[: len(expected)] == expected
        # registering a bulk device both creates the user and consumes the pending entry
        assert sorted(got[len(expected) : -1]) == sorted([(D, "t1", "d3"), (P, "t1", "d3")])
        assert got[-1] == (A, "t1", FP1)
        assert len(got) == len(expected) + 3

    async def test_no_change_for_unchanged_or_untracked_writes(self, store: Store) -> None:
        await store.create_tenant("t1")
        await store.add_trusted_certificate(anchor())
        await store.add_revocations([RevocationEntry("t1", 1, T0)])
        await store.register_device("t1", "d", "auto", T0)
        seq = await store.change_seq()
        assert seq > 0
        await store.create_tenant("t1")  # exists already
        await store.register_device("t1", "d", "auto", T0)  # exists already
        await store.add_revocations([RevocationEntry("t1", 1, T0)])  # duplicate
        with pytest.raises(Conflict):
            await store.add_trusted_certificate(anchor())
        with pytest.raises(NotFound):
            await store.update_trusted_certificate("t1", FP2, name="x")
        await store.touch_device("t1", "d", T0)
        await store.record_provisioned_certificate(provisioned(1, T0))
        await store.put_admin_user(AdminUser("t1", "u", "h"))
        await store.set_option("t1", "k", "v")
        await store.delete_option("t1", "k")
        await store.add_audit(audit(1))
        with pytest.raises(StoreError):
            await store.create_tenant("bad id")
        assert await store.change_seq() == seq
        assert await store.changes_since(seq) == []

    async def test_changes_since_order_and_limit(self, store: Store) -> None:
        for i in range(10):
            await store.create_tenant(f"t{i}")
        changes = await store.changes_since(0)
        assert [c.tenant for c in changes] == [f"t{i}" for i in range(10)]
        seqs = [c.seq for c in changes]
        assert seqs == sorted(set(seqs)) and seqs[0] > 0
        assert await store.change_seq() == seqs[-1]
        assert all(isinstance(c, Change) and c.kind is ChangeKind.TENANT for c in changes)
        assert await store.changes_since(0, limit=3) == changes[:3]
        assert await store.changes_since(seqs[3]) == changes[4:]
        assert await store.changes_since(seqs[3], limit=2) == changes[4:6]
        assert await store.changes_since(seqs[-1]) == []

    # datetimes -----------------------------------------------------------------
    async def test_naive_datetime_refused(self, store: Store) -> None:
        await store.create_tenant("t1")
        naive = datetime(2024, 1, 1)
        with pytest.raises(StoreError, match="naive"):
            await store.register_device("t1", "d", "auto", naive)
        with pytest.raises(StoreError, match="naive"):
            await store.add_audit(audit(1, time=naive))
        assert await store.list_devices("t1") == []
