"""Management operations against a real SQLite store."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from gateway import operations as ops
from gateway.pki import Issued, make_ca
from gateway.store.base import AuditQuery, Page
from gateway.store.sqlite import SqliteStore
from trust.anchors import UploadError
from trust.certs import fingerprint
from trust.model import AuditRecord, Status
from trust.revocation import MAX_BULK_ENTRIES

ACTOR = "test-operator"
PASSWORD = "correct horse battery staple"


@dataclass
class Env:
    store: SqliteStore
    now: datetime
    tmp: Path


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    store = SqliteStore(tmp_path / "gateway.db")
    await store.open()
    await store.create_tenant("t1")
    await store.create_tenant("t2")
    try:
        yield Env(store, datetime.now(UTC), tmp_path)
    finally:
        await store.close()


def pem(issued: Issued | x509.Certificate) -> str:
    cert = issued.cert if isinstance(issued, Issued) else issued
    return cert.public_bytes(Encoding.PEM).decode()


async def upload(env: Env, ca: Issued, tenant: str = "t1", name: str = "ca") -> str:
    record = await ops.add_trusted_certificate(
        env.store, tenant, pem(ca), name, Status.ENABLED, True, env.now, ACTOR
    )
    return record.fingerprint


async def audit(env: Env, tenant: str | None = None) -> list[AuditRecord]:
    records, _ = await env.store.list_audit(AuditQuery(tenant=tenant), Page(page_size=10000))
    return records


def openssl_sign(key_pem: bytes, code: str, tmp: Path, newline: bool = False) -> str:
    """The spec's command: openssl dgst -sha256 -sign key code.txt | openssl base64 -A."""
    key_file, code_file = tmp / "pop.key", tmp / "code.txt"
    key_file.write_bytes(key_pem)
    code_file.write_text(code + ("\n" if newline else ""))
    sig = subprocess.run(
        ["openssl", "dgst", "-sha256", "-sign", str(key_file), str(code_file)],
        check=True,
        capture_output=True,
    ).stdout
    out = subprocess.run(
        ["openssl", "base64", "-A"], input=sig, check=True, capture_output=True
    ).stdout
    return out.decode().strip()


def openssl_v1_ca(tmp: Path) -> x509.Certificate:
    """A self-signed certificate without extensions: OpenSSL makes it X.509 v1."""
    key, csr, crt = tmp / "v1.key", tmp / "v1.csr", tmp / "v1.pem"
    run = ["openssl"]
    subprocess.run(
        [*run, "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key)], check=True
    )
    subprocess.run(
        [*run, "req", "-new", "-key", str(key), "-subj", "/CN=v1 CA", "-out", str(csr)],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *run,
            "x509",
            "-req",
            "-in",
            str(csr),
            "-signkey",
            str(key),
            "-days",
            "30",
            "-out",
            str(crt),
        ],
        check=True,
        capture_output=True,
    )
    return x509.load_pem_x509_certificate(crt.read_bytes())


# upload rules ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "not a certificate",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        "",
    ],
)
async def test_upload_rejects_unparsable_pem(env: Env, text: str) -> None:
    with pytest.raises(UploadError) as err:
        await ops.add_trusted_certificate(
            env.store, "t1", text, "x", Status.ENABLED, True, env.now, ACTOR
        )
    assert err.value.rule == "pem"
    assert await env.store.list_trusted_certificates("t1") == []


async def test_upload_rejects_v1_certificate(env: Env) -> None:
    cert = openssl_v1_ca(env.tmp)
    assert cert.version is x509.Version.v1
    with pytest.raises(UploadError) as err:
        await ops.add_trusted_certificate(
            env.store, "t1", pem(cert), "v1", Status.ENABLED, True, env.now, ACTOR
        )
    assert err.value.rule == "version"


@pytest.mark.parametrize(("ca", "basic_constraints"), [(False, True), (True, False)])
async def test_upload_rejects_non_ca(env: Env, ca: bool, basic_constraints: bool) -> None:
    cert = make_ca("leafish", now=env.now, ca=ca, basic_constraints=basic_constraints)
    with pytest.raises(UploadError) as err:
        await upload(env, cert)
    assert err.value.rule == "not_ca"


async def test_upload_rejects_expired(env: Env) -> None:
    old = make_ca(
        "old", not_before=env.now - timedelta(days=30), not_after=env.now - timedelta(seconds=1)
    )
    with pytest.raises(UploadError) as err:
        await upload(env, old)
    assert err.value.rule == "expired"


async def test_upload_rejects_duplicate_in_same_tenant(env: Env) -> None:
    ca = make_ca("dup", now=env.now)
    await upload(env, ca)
    with pytest.raises(UploadError) as err:
        await upload(env, ca, name="again")
    assert err.value.rule == "duplicate"
    assert len(await env.store.list_trusted_certificates("t1")) == 1


async def test_upload_to_other_tenant_allowed_until_possession_is_proven(env: Env) -> None:
    ca = make_ca("shared", now=env.now)
    fp = await upload(env, ca, "t1")
    await upload(env, ca, "t2")  # nobody proved possession yet: both may hold it
    await ops.delete_trusted_certificate(env.store, "t2", fp, env.now, ACTOR)
    code = (await ops.create_pop_code(env.store, "t1", fp, env.now)).pop_code
    assert code is not None
    signature = openssl_sign(ca.key_pem(), code, env.tmp)
    await ops.verify_pop(env.store, "t1", fp, signature, env.now, ACTOR)
    with pytest.raises(UploadError) as err:
        await upload(env, ca, "t2")
    assert err.value.rule == "owned_elsewhere"


async def test_upload_defaults_name_and_unknown_tenant(env: Env) -> None:
    record = await ops.add_trusted_certificate(
        env.store,
        "t1",
        pem(make_ca("Named CA", now=env.now)),
        "",
        Status.DISABLED,
        False,
        env.now,
        ACTOR,
    )
    assert (record.name, record.status, record.auto_registration) == (
        "Named CA",
        Status.DISABLED,
        False,
    )
    with pytest.raises(ops.OperationError) as err:
        await upload(env, make_ca("x", now=env.now), tenant="nope")
    assert err.value.code == "not_found"


# editing --------------------------------------------------------------------------


async def test_update_and_delete(env: Env) -> None:
    fp = await upload(env, make_ca("edit", now=env.now))
    new = await ops.update_trusted_certificate(
        env.store, "t1", fp.upper(), env.now, ACTOR, status=Status.DISABLED, name="renamed"
    )
    assert (new.status, new.name, new.auto_registration) == (Status.DISABLED, "renamed", True)
    before = len(await audit(env, "t1"))
    same = await ops.update_trusted_certificate(env.store, "t1", fp, env.now, ACTOR, name="renamed")
    assert same == new
    assert len(await audit(env, "t1")) == before  # nothing changed, nothing audited
    await ops.delete_trusted_certificate(env.store, "t1", fp, env.now, ACTOR)
    with pytest.raises(ops.OperationError) as err:
        await ops.get_trusted_certificate(env.store, "t1", fp)
    assert err.value.code == "not_found"
    with pytest.raises(ops.OperationError) as err:
        await ops.delete_trusted_certificate(env.store, "t1", "zz", env.now, ACTOR)
    assert err.value.code == "invalid"


# proof of possession ----------------------------------------------------------------


@pytest.mark.parametrize("key_type", ["ec", "rsa"])
async def test_pop_with_openssl_signature(env: Env, key_type: str) -> None:
    ca = make_ca(f"pop-{key_type}", key_type=key_type, now=env.now)  # type: ignore[arg-type]
    fp = await upload(env, ca)
    record = await ops.create_pop_code(env.store, "t1", fp, env.now)
    assert record.pop_code and record.pop_code_until and record.pop_code_until > env.now
    again = await ops.create_pop_code(env.store, "t1", fp, env.now + timedelta(minutes=1))
    assert again.pop_code == record.pop_code  # still valid: same code
    signature = openssl_sign(ca.key_pem(), record.pop_code, env.tmp, newline=key_type == "rsa")
    done = await ops.verify_pop(env.store, "t1", fp, signature, env.now, ACTOR)
    assert done.proof_of_possession_valid
    assert done.pop_code is None and done.pop_code_until is None
    with pytest.raises(ops.OperationError) as err:  # the code works once
        await ops.verify_pop(env.store, "t1", fp, signature, env.now, ACTOR)
    assert err.value.code == "no_pop_code"


async def test_pop_wrong_signature_rejected(env: Env) -> None:
    ca = make_ca("pop", now=env.now)
    fp = await upload(env, ca)
    code = (await ops.create_pop_code(env.store, "t1", fp, env.now)).pop_code
    assert code is not None
    other = make_ca("other", now=env.now)
    for bad in (openssl_sign(other.key_pem(), code, env.tmp), "not base64!", ""):
        with pytest.raises(ops.OperationError) as err:
            await ops.verify_pop(env.store, "t1", fp, bad, env.now, ACTOR)
        assert err.value.code == "pop_failed"
    record = await env.store.get_trusted_certificate("t1", fp)
    assert not record.proof_of_possession_valid
    assert record.pop_code == code  # a failed attempt does not burn the code
    assert any(r.activity == "Proof of possession failed" for r in await audit(env, "t1"))


async def test_pop_code_expires(env: Env) -> None:
    ca = make_ca("pop", now=env.now)
    fp = await upload(env, ca)
    code = (await ops.create_pop_code(env.store, "t1", fp, env.now)).pop_code
    assert code is not None
    signature = openssl_sign(ca.key_pem(), code, env.tmp)
    with pytest.raises(ops.OperationError) as err:
        await ops.verify_pop(env.store, "t1", fp, signature, env.now + timedelta(minutes=11), ACTOR)
    assert err.value.code == "pop_expired"
    record = await env.store.get_trusted_certificate("t1", fp)
    assert record.pop_code is None and not record.proof_of_possession_valid


async def test_pop_confirm_override(env: Env) -> None:
    fp = await upload(env, make_ca("support", now=env.now))
    assert (
        await ops.set_pop_confirmed(env.store, "t1", fp, True, env.now, ACTOR)
    ).proof_of_possession_valid
    assert not (
        await ops.set_pop_confirmed(env.store, "t1", fp, False, env.now, ACTOR)
    ).proof_of_possession_valid


# revocation ---------------------------------------------------------------------------


async def test_revocation_duplicates_keep_existing_and_future_dates_become_now(env: Env) -> None:
    past = "2024-01-17T10:48:51.000Z"
    added, kept = await ops.add_revocations(
        env.store,
        "t1",
        [("0b8a5b9dd501a88775399b9a048811a3", past), ("0A", "2999-01-01T00:00:00Z")],
        env.now,
        ACTOR,
    )
    assert (added, kept) == (2, 0)
    added, kept = await ops.add_revocations(
        env.store,
        "t1",
        [ops.RevocationRequest("0B:8A:5B:9D:D5:01:A8:87:75:39:9B:9A:04:88:11:A3")],
        env.now,
        ACTOR,
    )
    assert (added, kept) == (0, 1)
    entries = {e.serial_hex: e.revoked_at for e in await env.store.list_revocations("t1")}
    assert entries["b8a5b9dd501a88775399b9a048811a3"] == datetime(
        2024, 1, 17, 10, 48, 51, tzinfo=UTC
    )
    assert entries["a"] == env.now  # future date → the current date
    assert await env.store.list_revocations("t2") == []


@pytest.mark.parametrize("serial", ["xyz", "", "12 34 zz"])
async def test_revocation_rejects_bad_serial(env: Env, serial: str) -> None:
    with pytest.raises(ops.OperationError) as err:
        await ops.add_revocations(env.store, "t1", [(serial, None)], env.now, ACTOR)
    assert err.value.code == "invalid"
    assert await env.store.list_revocations("t1") == []


async def test_revocation_csv_good_and_bad_rows(env: Env) -> None:
    await ops.add_revocations(env.store, "t1", [("aa", None)], env.now, ACTOR)
    data = (
        b"serialNumberInHex,revocationDate\n"
        b"0b8a5b9dd501a88775399b9a048811a3,2024-01-17T10:48:51.000Z\n"
        b"not-hex,2024-01-17T10:48:51.000Z\n"
        b"AA,\n"
        b"cafe,yesterday\n"
        b"beef,2999-01-01T00:00:00Z\n"
    )
    result = await ops.import_revocation_csv(env.store, "t1", data, env.now, ACTOR)
    assert (result.added, result.kept) == (2, 1)
    assert [e.line for e in result.errors] == [3, 5]
    serials = {e.serial_hex for e in await env.store.list_revocations("t1")}
    assert serials == {"aa", "b8a5b9dd501a88775399b9a048811a3", "beef"}


async def test_revocation_csv_over_limit_refused(env: Env) -> None:
    rows = "".join(f"{i + 1:x},\n" for i in range(MAX_BULK_ENTRIES + 1))
    with pytest.raises(ops.OperationError) as err:
        await ops.import_revocation_csv(env.store, "t1", rows.encode(), env.now, ACTOR)
    assert err.value.code == "invalid" and "5000" in err.value.message
    assert await env.store.list_revocations("t1") == []
    exact = "".join(f"{i + 1:x},\n" for i in range(MAX_BULK_ENTRIES))
    result = await ops.import_revocation_csv(env.store, "t1", exact.encode(), env.now, ACTOR)
    assert result.added == MAX_BULK_ENTRIES


async def test_revocation_settings(env: Env) -> None:
    s = await ops.set_revocation_settings(env.store, "t1", env.now, ACTOR, offline=True)
    assert (s.offline, s.online) == (True, False)
    s = await ops.set_revocation_settings(env.store, "t1", env.now, ACTOR, online=True)
    assert (s.offline, s.online) == (True, True)
    assert await env.store.get_revocation_settings("t1") == s
    assert (await env.store.get_revocation_settings("t2")).offline is False


# devices and users ----------------------------------------------------------------------


async def test_device_enable_disable(env: Env) -> None:
    user, created = await ops.register_device(env.store, "t1", "dev-1", "manual", env.now, ACTOR)
    assert created and user.enabled
    assert not (
        await ops.set_device_enabled(env.store, "t1", "dev-1", False, env.now, ACTOR)
    ).enabled
    assert not (await env.store.get_device("t1", "dev-1")).enabled
    assert (await ops.set_device_enabled(env.store, "t1", "dev-1", True, env.now, ACTOR)).enabled
    with pytest.raises(ops.OperationError) as err:
        await ops.set_device_enabled(env.store, "t1", "ghost", False, env.now, ACTOR)
    assert err.value.code == "not_found"
    with pytest.raises(ops.OperationError) as err:
        await ops.set_device_enabled(env.store, "t2", "dev-1", False, env.now, ACTOR)
    assert err.value.code == "not_found"


async def test_admin_user_password(env: Env) -> None:
    roles = ["ROLE_TENANT_ADMIN", "ROLE_TENANT_MANAGEMENT_ADMIN"]
    user = await ops.create_admin_user(env.store, "t1", "admin", PASSWORD, roles)
    assert user.password_hash.startswith("$argon2id$")
    assert PASSWORD not in user.password_hash
    stored = await env.store.get_admin_user("t1", "admin")
    assert stored.roles == frozenset(roles)
    assert ops.verify_admin_password(stored, PASSWORD)
    assert not ops.verify_admin_password(stored, PASSWORD + "x")
    assert not ops.verify_admin_password(stored, "")
    corrupt = type(stored)(tenant="t1", username="admin", password_hash="garbage")
    assert not ops.verify_admin_password(corrupt, PASSWORD)
    with pytest.raises(ops.OperationError) as err:
        await ops.create_admin_user(env.store, "t1", "admin", PASSWORD, roles)
    assert err.value.code == "conflict"
    with pytest.raises(ops.OperationError):
        await ops.create_admin_user(env.store, "t1", "short", "1234567", roles)


# audit --------------------------------------------------------------------------------------


async def test_every_change_is_audited_without_secrets(env: Env) -> None:
    ca = make_ca("audited", key_type="rsa", now=env.now)
    fp = await upload(env, ca)
    await ops.update_trusted_certificate(
        env.store, "t1", fp, env.now, ACTOR, auto_registration=False
    )
    code = (await ops.create_pop_code(env.store, "t1", fp, env.now)).pop_code
    assert code is not None
    await ops.verify_pop(
        env.store, "t1", fp, openssl_sign(ca.key_pem(), code, env.tmp), env.now, ACTOR
    )
    await ops.set_pop_confirmed(env.store, "t1", fp, False, env.now, ACTOR)
    await ops.add_revocations(env.store, "t1", [("01", None)], env.now, ACTOR)
    await ops.import_revocation_csv(env.store, "t1", b"02,\n", env.now, ACTOR)
    await ops.set_revocation_settings(env.store, "t1", env.now, ACTOR, offline=True)
    await ops.register_device(env.store, "t1", "d1", "manual", env.now, ACTOR)
    await ops.set_device_enabled(env.store, "t1", "d1", False, env.now, ACTOR)
    user = await ops.create_admin_user(
        env.store, "t1", "admin", PASSWORD, ["ROLE_TENANT_ADMIN"], now=env.now, actor=ACTOR
    )
    await ops.delete_trusted_certificate(env.store, "t1", fp, env.now, ACTOR)
    assert await ops.create_tenant(env.store, "t3", env.now, ACTOR)

    records = await audit(env)
    activities = [r.activity for r in reversed(records)]
    assert activities == [
        "Trusted certificate added",
        "Trusted certificate updated",
        "Proof of possession completed",
        "Proof of possession withdrawn",
        "Revoked certificates added",
        "Revocation list imported",
        "CRL settings updated",
        "Device user registered",
        "Device user disabled",
        "User created",
        "Trusted certificate deleted",
        "Tenant created",
    ]
    assert all(r.user == ACTOR for r in records)
    assert all(r.text and r.type for r in records)
    for r in records:
        blob = f"{r.type} {r.activity} {r.text} {r.source}"
        assert "PRIVATE KEY" not in blob
        assert PASSWORD not in blob
        assert user.password_hash not in blob
        assert "$argon2" not in blob
    added = records[-1]
    assert fp in added.text and added.source == fp and added.tenant == "t1"
    assert fingerprint(ca.cert) == fp
