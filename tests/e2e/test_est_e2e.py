"""End-to-end: the tenant CA and EST enrollment over real HTTPS.

The spec's "Simple device enrollment" with the tools a device maker would use:
``curl`` creates the CA and uploads the bulk CSV, ``openssl req`` makes the
key and CSR, ``curl --data-binary`` enrolls, ``openssl pkcs7 -print_certs``
unpacks the answer and ``mosquitto_pub`` connects with the new certificate.
The gateway runs in-process on ephemeral ports with a real SQLite store;
the PKI and device files live outside its data directory, so the data
directory can be searched for private keys.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway import operations as ops
from gateway.ca_service import ca_service_for
from gateway.config import load_config
from gateway.http.device import services_of
from tests.helpers import Pki, RunningGateway, mqtt_pub, run, start_gateway, stop_gateway
from trust.certs import fingerprint
from trust.est import CA_UNAVAILABLE, NO_REQUEST
from trust.model import DeviceIdentity, Listener

HTTPS = Listener.HTTPS

pytestmark = pytest.mark.slow

PW = "correct-horse-1"
OTP1 = "somePassword@123"
OTP2 = "password@345"
EST = "/.well-known/est"


# plumbing ---------------------------------------------------------------------


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.create(tmp_path / "pki")


async def _start(tmp_path: Path, pki: Pki, **ca: Any) -> RunningGateway:
    base = load_config(env={})
    cfg = replace(base, ca=replace(base.ca, **ca))
    (tmp_path / "data").mkdir()
    rg = await start_gateway(
        tmp_path / "data", pki, tenants=("t1", "t2", "management"), upload_root=False, config=cfg
    )
    await ops.create_admin_user(rg.store, "t1", "admin", PW, ["ROLE_TENANT_ADMIN"])
    await ops.create_admin_user(rg.store, "t1", "reader", PW, ["ROLE_TENANT_MANAGEMENT_READ"])
    await ops.create_admin_user(rg.store, "t2", "admin", PW, ["ROLE_TENANT_ADMIN"])
    await ops.create_admin_user(rg.store, "management", "ops", PW, ["ROLE_TENANT_MANAGEMENT_ADMIN"])
    return rg


@pytest.fixture
async def gw(tmp_path: Path, pki: Pki) -> AsyncIterator[RunningGateway]:
    rg = await _start(tmp_path, pki)
    yield rg
    await stop_gateway(rg)


def url(rg: RunningGateway, path: str) -> str:
    return f"https://127.0.0.1:{rg.https_port}{path}"


class Reply:
    """One curl exchange: status, headers (lower-case names) and body bytes."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"Reply({self.status}, {self.body[:300]!r})"


async def curl(
    rg: RunningGateway, tmp: Path, *args: str, user: str | None = f"t1/admin:{PW}"
) -> Reply:
    """Run curl against the gateway; the body goes to a file (it may be binary)."""
    tmp.mkdir(parents=True, exist_ok=True)
    out, hdr = tmp / "curl.body", tmp / "curl.headers"
    cmd = ["curl", "-sS", "--noproxy", "*", "--max-time", "20", "--cacert", rg.cafile]
    cmd += ["-o", str(out), "-D", str(hdr), "-w", "%{http_code}"]
    if user is not None:
        cmd += ["-u", user]
    result = await run([*cmd, *args], timeout=30)
    assert result.returncode == 0, result.stderr
    headers: dict[str, str] = {}
    for line in hdr.read_text("latin-1").splitlines()[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return Reply(int(result.stdout.strip()), headers, out.read_bytes())


async def make_csr(tmp: Path, name: str, subject: str) -> tuple[Path, Path]:
    """``openssl req`` → ``<name>.key`` and ``<name>.b64`` (base64 DER CSR, as devices send)."""
    tmp.mkdir(parents=True, exist_ok=True)
    key, der, b64 = tmp / f"{name}.key", tmp / f"{name}.der", tmp / f"{name}.b64"
    r = await run(
        [
            "openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-keyout", str(key), "-subj", subject, "-outform", "DER", "-out", str(der),
        ],
        timeout=20,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = await run(["openssl", "base64", "-in", str(der), "-out", str(b64)], timeout=20)
    assert r.returncode == 0, r.stderr
    return key, b64


async def print_certs(tmp: Path, body: bytes) -> list[x509.Certificate]:
    """``openssl base64 -d | openssl pkcs7 -inform DER -print_certs`` on a certs-only answer."""
    (tmp / "p7.b64").write_bytes(body)
    r = await run(
        [
            "sh", "-c",
            f"openssl base64 -d -in {tmp / 'p7.b64'} | openssl pkcs7 -inform DER -print_certs",
        ],
        timeout=20,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    blocks = re.findall(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", r.stdout, re.S)
    return [x509.load_pem_x509_certificate(b.encode()) for b in blocks]


async def enroll(
    rg: RunningGateway,
    tmp: Path,
    csr: Path,
    user: str | None,
    *extra: str,
    path: str = f"{EST}/simpleenroll",
) -> Reply:
    """``curl --data-binary @csr.b64 -H 'Content-Type: application/pkcs10' -u …``."""
    return await curl(
        rg,
        tmp,
        "--data-binary",
        f"@{csr}",
        "-H",
        "Content-Type: application/pkcs10",
        *extra,
        url(rg, path),
        user=user,
    )


async def create_ca(rg: RunningGateway, tmp: Path) -> dict[str, Any]:
    reply = await curl(
        rg,
        tmp,
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        url(rg, "/certificate-authority"),
    )
    assert reply.status == 201, reply
    body: dict[str, Any] = reply.json()
    return body


async def bulk_register(rg: RunningGateway, tmp: Path, csv: str) -> dict[str, Any]:
    path = tmp / "devices.csv"
    path.write_text(csv)
    reply = await curl(
        rg,
        tmp,
        "-X",
        "POST",
        "-F",
        f"file=@{path}",
        url(rg, "/devicecontrol/bulkNewDeviceRequests"),
    )
    assert reply.status == 201, reply
    body: dict[str, Any] = reply.json()
    return body


def write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


async def audit(rg: RunningGateway, tmp: Path, type_: str) -> list[dict[str, Any]]:
    reply = await curl(rg, tmp, url(rg, f"/audit/auditRecords?pageSize=500&type={type_}"), "-G")
    assert reply.status == 200, reply
    records: list[dict[str, Any]] = reply.json()["auditRecords"]
    return records


# the spec's tutorial, end to end ---------------------------------------------------


async def test_create_ca_bulk_enroll_connect_and_reenroll(
    gw: RunningGateway, tmp_path: Path
) -> None:
    t = tmp_path / "dev"
    # the feature is on by default
    reply = await curl(gw, t, url(gw, "/features/certificate-authority"))
    assert reply.status == 200
    assert reply.json() == {
        "key": "certificate-authority",
        "active": True,
        "phase": "GENERALLY_AVAILABLE",
        "strategy": "TENANT",
    }
    # roles: a reader may not create the CA
    reply = await curl(
        gw, t, "-X", "POST", url(gw, "/certificate-authority"), user=f"t1/reader:{PW}"
    )
    assert reply.status == 403, reply
    reply = await curl(gw, t, "-X", "POST", url(gw, "/certificate-authority"), user=None)
    assert reply.status == 401

    ca = await create_ca(gw, t)
    assert ca["subject"] == "CN=t1, O=mtls-gateway"
    assert ca["tenantCertificateAuthority"] is True
    assert ca["autoRegistrationEnabled"] is True
    assert ca["status"] == "ENABLED"
    assert ca["algorithmName"] == "EC"
    not_before = datetime.fromisoformat(ca["notBefore"].replace("Z", "+00:00"))
    not_after = datetime.fromisoformat(ca["notAfter"].replace("Z", "+00:00"))
    assert not_after - not_before == timedelta(days=1095, minutes=5)  # 5 min backdated
    # one CA per tenant
    reply = await curl(gw, t, "-X", "POST", url(gw, "/certificate-authority"))
    assert reply.status == 409, reply
    assert "only one CA is allowed per tenant" in reply.json()["message"]
    # the CA is a trusted certificate of the tenant ("TENANT CA" in the list)
    reply = await curl(gw, t, url(gw, "/tenant/tenants/t1/trusted-certificates"))
    (listed,) = reply.json()["certificates"]
    assert listed["fingerprint"] == ca["fingerprint"] and listed["tenantCertificateAuthority"]

    # bulk registration with ENROLLMENT_OTP (the spec's CSV header)
    result = await bulk_register(
        gw,
        t,
        "ID;TYPE;NAME;ICCID;IDTYPE;PATH;SHELL;AUTH_TYPE;ENROLLMENT_OTP\n"
        f"dev1;c8y_Device;Sample_Device1;+491555555;c8y_Serial;bulk group;1;CERTIFICATES;{OTP1}\n"
        f"dev2;c8y_Device;Sample_Device2;+491555555;c8y_Serial;bulk group;1;CERTIFICATES;{OTP2}\n",
    )
    assert result["numberOfCreated"] == 2 and result["numberOfFailed"] == 0
    reply = await curl(gw, t, url(gw, "/devicecontrol/newDeviceRequests"))
    pending = {p["id"]: p for p in reply.json()["newDeviceRequests"]}
    assert pending["dev1"]["status"] == "ACCEPTED" and pending["dev1"]["enrollmentOtp"] is True

    # /cacerts: the tenant CA, certs-only PKCS#7
    reply = await curl(gw, t, url(gw, f"{EST}/t1/cacerts"), user=None)
    assert reply.status == 200, reply
    assert reply.headers["content-type"].startswith("application/pkcs7-mime")
    (ca_cert,) = await print_certs(t, reply.body)
    assert fingerprint(ca_cert) == ca["fingerprint"]
    ca_pem = write_cert(t / "ca.pem", ca_cert)

    key1, csr1 = await make_csr(t, "dev1", "/CN=dev1")
    # a wrong OTP and an unknown device get the same answer; neither spends the OTP
    for user in ("t1/dev1:wrong-otp", "t1/nobody:" + OTP1):
        reply = await enroll(gw, t, csr1, user)
        assert reply.status == 401, reply
        assert reply.json()["message"] == NO_REQUEST
        assert "basic" in reply.headers["www-authenticate"].lower()
    # garbage CSR: 400 with a clear message, the OTP stays usable
    garbage = t / "garbage.b64"
    garbage.write_text("this is not a certificate signing request\n")
    reply = await enroll(gw, t, garbage, f"t1/dev1:{OTP1}")
    assert reply.status == 400, reply
    assert "not a PKCS#10 certificate signing request" in reply.json()["message"]
    garbage.write_text("%%% garbage! %%%\n")
    reply = await enroll(gw, t, garbage, f"t1/dev1:{OTP1}")
    assert reply.status == 400 and "is not base64" in reply.json()["message"], reply
    garbage.write_bytes(base64.b64encode(b"\x30\x03\x02\x01\x00"))
    reply = await enroll(gw, t, garbage, f"t1/dev1:{OTP1}")
    assert reply.status == 400 and "not a PKCS#10" in reply.json()["message"], reply
    # a CSR for another device: refused, the OTP stays usable
    _, csr_other = await make_csr(t, "other", "/CN=dev2")
    reply = await enroll(gw, t, csr_other, f"t1/dev1:{OTP1}")
    assert reply.status == 403, reply
    assert "does not match the device id" in reply.json()["message"]

    # the enrollment, as the issue's example (the spec's header for the encoding too)
    reply = await enroll(gw, t, csr1, f"t1/dev1:{OTP1}", "-H", "Content-Transfer-Encoding: base64")
    assert reply.status == 201, reply
    assert reply.headers["content-type"] == "application/pkcs7-mime; smime-type=certs-only"
    assert reply.headers["content-transfer-encoding"] == "base64"
    (cert1,) = await print_certs(t, reply.body)
    assert cert1.subject.rfc4514_string() == "CN=dev1"
    assert cert1.issuer == ca_cert.subject
    assert cert1.not_valid_after_utc - cert1.not_valid_before_utc == timedelta(days=365, minutes=5)
    assert cert1.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = cert1.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    cert1_pem = write_cert(t / "dev1.pem", cert1)
    r = await run(["openssl", "verify", "-CAfile", str(ca_pem), str(cert1_pem)], timeout=20)
    assert r.returncode == 0, r.stdout + r.stderr

    # the OTP works once
    reply = await enroll(gw, t, csr1, f"t1/dev1:{OTP1}")
    assert reply.status == 401 and reply.json()["message"] == NO_REQUEST, reply

    # the device user exists, the certificate is provisioned and audited
    reply = await curl(gw, t, url(gw, "/user/t1/users/device_dev1"))
    assert reply.status == 200 and reply.json()["registeredVia"] == "est", reply
    reply = await curl(gw, t, url(gw, "/devicecontrol/devices/dev1/certificates"))
    serials = [c["serialNumberInHex"] for c in reply.json()["certificates"]]
    assert serials == [format(cert1.serial_number, "x")], reply
    records = await audit(gw, t, "TenantCertificateAuthority")
    signed = [r for r in records if r["activity"] == "Tenant certificate authority (CA) signed"
              " certificate for device"]  # fmt: skip
    assert len(signed) == 1
    assert f"Certificate serial number hex: '{cert1.serial_number:x}'" in signed[0]["text"]
    assert OTP1 not in json.dumps(records)

    # the new certificate works on 8883 at once
    await gw.wait_refreshed()
    r = await mqtt_pub(gw.mqtt_port, gw.cafile, cert1_pem, key1, "dev1", "t/1", "hello")
    assert r.returncode == 0, r.stderr

    # re-enroll over mTLS with a new key; PEM answer on request
    key1b, csr1b = await make_csr(t, "dev1b", "/CN=dev1")
    reply = await enroll(
        gw, t, csr1b, None, "--cert", str(cert1_pem), "--key", str(key1), "-H",
        "Accept: application/pkcs10", path=f"{EST}/simplereenroll",
    )  # fmt: skip
    assert reply.status == 201, reply
    assert reply.headers["content-type"] == "application/pkcs10"
    cert1b = x509.load_pem_x509_certificate(reply.body)
    assert cert1b.subject == cert1.subject and cert1b.serial_number != cert1.serial_number
    cert1b_pem = write_cert(t / "dev1b.pem", cert1b)
    # both certificates work: the old one stays valid until it expires or is revoked
    for cert, key in ((cert1b_pem, key1b), (cert1_pem, key1)):
        r = await mqtt_pub(gw.mqtt_port, gw.cafile, cert, key, "dev1", "t/1", "hello")
        assert r.returncode == 0, r.stderr
    # re-enroll for another CN: refused
    reply = await enroll(
        gw, t, csr_other, None, "--cert", str(cert1_pem), "--key", str(key1),
        path=f"{EST}/simplereenroll",
    )  # fmt: skip
    assert reply.status == 403 and "does not match" in reply.json()["message"], reply
    # re-enroll without credentials: refused
    reply = await enroll(gw, t, csr1b, None, path=f"{EST}/simplereenroll")
    assert reply.status == 401, reply
    # /cacerts finds the tenant from the client certificate too
    reply = await curl(
        gw, t, "--cert", str(cert1_pem), "--key", str(key1), url(gw, f"{EST}/cacerts"), user=None
    )
    assert reply.status == 200 and await print_certs(t, reply.body) == [ca_cert], reply
    # re-enroll with the device access token (Bearer) the device API issues
    ctx = gw.gateway.http_context
    assert ctx is not None
    tokens = services_of(ctx).tokens
    assert tokens is not None
    identity = ctx.trust.decide_der([cert1.public_bytes(serialization.Encoding.DER)], HTTPS)
    assert isinstance(identity, DeviceIdentity), identity
    token = await tokens.issue(identity)
    _, csr1c = await make_csr(t, "dev1c", "/CN=dev1")
    bearer = f"Authorization: Bearer {token}"
    reply = await enroll(gw, t, csr1c, None, "-H", bearer, path=f"{EST}/simplereenroll")
    assert reply.status == 201, reply
    (cert1c,) = await print_certs(t, reply.body)
    assert cert1c.subject == cert1.subject
    reply = await enroll(
        gw, t, csr1c, None, "-H", bearer + "x", path=f"{EST}/simplereenroll"
    )  # a forged token
    assert reply.status == 401, reply
    # every issued certificate is provisioned, each with its audit record
    reply = await curl(gw, t, url(gw, "/devicecontrol/devices/dev1/certificates"))
    assert len(reply.json()["certificates"]) == 3
    records = await audit(gw, t, "TenantCertificateAuthority")
    for cert in (cert1b, cert1c):
        assert any(f"'{cert.serial_number:x}'" in r["text"] for r in records)


async def test_concurrent_enrollments_with_one_otp_issue_one_certificate(
    gw: RunningGateway, tmp_path: Path
) -> None:
    """The OTP is spent atomically: parallel requests racing with it get one certificate."""
    t = tmp_path / "dev"
    await create_ca(gw, t)
    await bulk_register(gw, t, f"ID;AUTH_TYPE;ENROLLMENT_OTP\ndev1;CERTIFICATES;{OTP1}\n")
    await gw.wait_refreshed()  # every request then finds the pending request in the snapshot
    csrs = [(await make_csr(t / str(i), "dev1", "/CN=dev1"))[1] for i in range(8)]
    replies = await asyncio.gather(
        *(enroll(gw, t / str(i), csr, f"t1/dev1:{OTP1}") for i, csr in enumerate(csrs))
    )
    statuses = sorted(r.status for r in replies)
    assert statuses == [201] + [401] * 7, replies
    assert all(r.json()["message"] == NO_REQUEST for r in replies if r.status == 401)
    assert len(await gw.store.list_provisioned_certificates("t1", "dev1")) == 1


async def test_realm_style_credentials_and_tenant_label(gw: RunningGateway, tmp_path: Path) -> None:
    t = tmp_path / "dev"
    await create_ca(gw, t)
    await bulk_register(gw, t, f"ID;AUTH_TYPE;ENROLLMENT_OTP\ndev2;CERTIFICATES;{OTP2}\n")
    _, csr = await make_csr(t, "dev2", "/CN=dev2")
    # device:otp without the tenant: refused, the tenant cannot be guessed
    reply = await enroll(gw, t, csr, f"dev2:{OTP2}")
    assert reply.status == 401 and "name the tenant" in reply.json()["message"], reply
    # the RFC 7030 label names the tenant
    reply = await enroll(gw, t, csr, f"dev2:{OTP2}", path=f"{EST}/t1/simpleenroll")
    assert reply.status == 201, reply
    (cert,) = await print_certs(t, reply.body)
    assert cert.subject.rfc4514_string() == "CN=dev2"
    # /simplereenroll with Basic: a device without a certificate yet uses its OTP
    await bulk_register(gw, t, f"ID;AUTH_TYPE;ENROLLMENT_OTP\ndev3;CERTIFICATES;{OTP1}\n")
    _, csr3 = await make_csr(t, "dev3", "/CN=dev3")
    reply = await enroll(gw, t, csr3, f"t1/dev3:{OTP1}", path=f"{EST}/simplereenroll")
    assert reply.status == 201, reply
    reply = await enroll(gw, t, csr3, f"t1/dev3:{OTP1}", path=f"{EST}/simplereenroll")
    assert reply.status == 401 and reply.json()["message"] == NO_REQUEST, reply
    # /cacerts needs a tenant, from the label or ?tenantId=
    reply = await curl(gw, t, url(gw, f"{EST}/cacerts"), user=None)
    assert reply.status == 400, reply
    reply = await curl(gw, t, url(gw, f"{EST}/cacerts?tenantId=t1"), user=None)
    assert reply.status == 200
    reply = await curl(gw, t, url(gw, f"{EST}/t2/cacerts"), user=None)
    assert reply.status == 404, reply


async def test_renew_refused_then_accepted_with_injected_clock(
    gw: RunningGateway, tmp_path: Path
) -> None:
    t = tmp_path / "dev"
    ctx = gw.gateway.http_context
    assert ctx is not None
    real_now = datetime.now(UTC)
    # the CA was created 13 months ago: 23 months remain
    ctx.clock = lambda: real_now - timedelta(days=396)
    old = await create_ca(gw, t)
    reply = await curl(gw, t, "-X", "POST", url(gw, "/certificate-authority/renew"))
    assert reply.status == 409, reply  # at creation time 36 months remain
    assert reply.json()["error"] == "certificate-authority/renewal_not_due"
    assert "less than 24 months" in reply.json()["message"]
    ctx.clock = lambda: datetime.now(UTC)
    # a device enrolled with the old CA certificate ...
    await bulk_register(gw, t, f"ID;AUTH_TYPE;ENROLLMENT_OTP\ndev1;CERTIFICATES;{OTP1}\n")
    key, csr = await make_csr(t, "dev1", "/CN=dev1")
    reply = await enroll(gw, t, csr, f"t1/dev1:{OTP1}")
    assert reply.status == 201, reply
    (cert,) = await print_certs(t, reply.body)
    cert_pem = write_cert(t / "dev1.pem", cert)
    # ... then renewal is accepted: less than 24 months remain now
    reply = await curl(gw, t, "-X", "POST", url(gw, "/certificate-authority/renew"))
    assert reply.status == 200, reply
    new = reply.json()
    assert new["fingerprint"] != old["fingerprint"]
    assert new["subject"] == old["subject"] and new["tenantCertificateAuthority"] is True
    assert new["name"] == old["name"] and new["autoRegistrationEnabled"] is True
    not_after = datetime.fromisoformat(new["notAfter"].replace("Z", "+00:00"))
    assert abs(not_after - (real_now + timedelta(days=1095))) < timedelta(minutes=5)
    reply = await curl(gw, t, url(gw, "/tenant/tenants/t1/trusted-certificates"))
    assert [c["fingerprint"] for c in reply.json()["certificates"]] == [new["fingerprint"]]
    # the old certificate's key option went with it; the same key pair signs on
    assert await gw.store.get_option("t1", f"ca-key:{old['fingerprint']}") is None
    new_cert = x509.load_pem_x509_certificate(new["certInPemFormat"].encode())
    old_cert = x509.load_pem_x509_certificate(old["certInPemFormat"].encode())
    assert new_cert.public_key() == old_cert.public_key()
    # the device issued earlier keeps working, against the renewed CA only
    await gw.wait_refreshed()
    r = await mqtt_pub(gw.mqtt_port, gw.cafile, cert_pem, key, "dev1", "t/1", "x")
    assert r.returncode == 0, r.stderr
    records = await audit(gw, t, "TenantCertificateAuthority")
    assert any(r["activity"] == "Tenant certificate authority (CA) renewed" for r in records)


async def test_feature_toggle_and_roles(gw: RunningGateway, tmp_path: Path) -> None:
    t = tmp_path / "dev"
    feature = url(gw, "/features/certificate-authority")
    off = ["-X", "PUT", "-H", "Content-Type: application/json", "-d", '{"active": false}']
    on = ["-X", "PUT", "-H", "Content-Type: application/json", "-d", '{"active": true}']
    reply = await curl(gw, t, *off, feature + "/by-tenant", user=f"t1/reader:{PW}")
    assert reply.status == 403
    reply = await curl(gw, t, *off, feature + "/by-tenant")
    assert reply.status == 200 and reply.json()["active"] is False, reply
    reply = await curl(gw, t, feature, user=f"t1/reader:{PW}")
    assert reply.json()["active"] is False
    reply = await curl(gw, t, "-X", "POST", url(gw, "/certificate-authority"))
    assert reply.status == 403 and "feature is disabled" in reply.json()["message"], reply
    # only the management tenant's operator may switch another tenant
    reply = await curl(gw, t, *on, feature + "/by-tenant/t1")
    assert reply.status == 403, reply
    reply = await curl(gw, t, *on, feature + "/by-tenant/t1", user=f"t2/admin:{PW}")
    assert reply.status == 403, reply
    reply = await curl(gw, t, *on, feature + "/by-tenant/t1", user=f"management/ops:{PW}")
    assert reply.status == 200 and reply.json()["active"] is True, reply
    reply = await curl(gw, t, *on, feature + "/by-tenant/nope", user=f"management/ops:{PW}")
    assert reply.status == 404, reply
    reply = await curl(gw, t, "-X", "PUT", "-d", '{"active": "maybe"}', feature + "/by-tenant")
    assert reply.status == 422, reply
    await create_ca(gw, t)
    # another tenant's admin gets a CA of its own, not access to t1's
    reply = await curl(gw, t, "-X", "POST", url(gw, "/certificate-authority?tenantId=t1"),
                       user=f"t2/admin:{PW}")  # fmt: skip
    assert reply.status == 403, reply


async def test_feature_default_off_by_config(tmp_path: Path, pki: Pki) -> None:
    rg = await _start(tmp_path, pki, feature_default=False)
    try:
        reply = await curl(rg, tmp_path / "dev", url(rg, "/features/certificate-authority"))
        assert reply.json()["active"] is False
    finally:
        await stop_gateway(rg)


async def test_ca_key_is_encrypted_and_deleted_with_the_certificate(
    gw: RunningGateway, tmp_path: Path
) -> None:
    t = tmp_path / "dev"
    ca = await create_ca(gw, t)
    ctx = gw.gateway.http_context
    assert ctx is not None
    loaded = await ca_service_for(ctx).load("t1")
    assert loaded is not None
    forms = [
        loaded.key.private_bytes(serialization.Encoding.DER, fmt, serialization.NoEncryption())
        for fmt in (
            serialization.PrivateFormat.PKCS8,
            serialization.PrivateFormat.TraditionalOpenSSL,
        )
    ]
    secret = loaded.key.private_numbers().private_value.to_bytes(32, "big")  # type: ignore[union-attr]
    needles = [*forms, *(base64.b64encode(f) for f in forms), secret]
    data_dir = tmp_path / "data"
    files = [p for p in data_dir.rglob("*") if p.is_file()]
    assert any(p.name == "gateway.db" for p in files)
    r = await run(["grep", "-rl", "PRIVATE KEY", str(data_dir)], timeout=20)
    assert r.returncode == 1 and r.stdout == "", r.stdout  # grep: 1 = no match
    for path in files:
        content = path.read_bytes()
        assert not any(n in content for n in needles), path
    sealed = await gw.store.get_option("t1", f"ca-key:{ca['fingerprint']}")
    assert sealed is not None and sealed.startswith("mgk1:")
    # deleting the CA's trusted certificate deletes its key; enrollment then stops
    reply = await curl(
        gw,
        t,
        "-X",
        "DELETE",
        url(gw, f"/tenant/tenants/t1/trusted-certificates/{ca['fingerprint']}"),
    )
    assert reply.status == 204, reply
    assert await gw.store.get_option("t1", f"ca-key:{ca['fingerprint']}") is None
    await bulk_register(gw, t, f"ID;AUTH_TYPE;ENROLLMENT_OTP\ndev1;CERTIFICATES;{OTP1}\n")
    await gw.wait_refreshed()
    _, csr = await make_csr(t, "dev1", "/CN=dev1")
    reply = await enroll(gw, t, csr, f"t1/dev1:{OTP1}")
    assert reply.status == 409 and reply.json()["message"] == CA_UNAVAILABLE, reply
    # a new CA can be created now, and the OTP (not spent) enrolls with it
    await create_ca(gw, t)
    reply = await enroll(gw, t, csr, f"t1/dev1:{OTP1}")
    assert reply.status == 201, reply


async def test_auto_registration_off_suspends_enrollment(
    gw: RunningGateway, tmp_path: Path
) -> None:
    """Spec ("enrollment process has been compromised"): step 1 stops enrollments."""
    t = tmp_path / "dev"
    ca = await create_ca(gw, t)
    await bulk_register(gw, t, f"ID;AUTH_TYPE;ENROLLMENT_OTP\ndev1;CERTIFICATES;{OTP1}\n")
    reply = await curl(
        gw, t, "-X", "PUT", "-H", "Content-Type: application/json", "-d",
        '{"autoRegistrationEnabled": false}',
        url(gw, f"/tenant/tenants/t1/trusted-certificates/{ca['fingerprint']}"),
    )  # fmt: skip
    assert reply.status == 200, reply
    await gw.wait_refreshed()
    _, csr = await make_csr(t, "dev1", "/CN=dev1")
    reply = await enroll(gw, t, csr, f"t1/dev1:{OTP1}")
    assert reply.status == 403 and "auto-registration is off" in reply.json()["message"], reply
    assert await gw.store.get_pending_registration("t1", "dev1")  # OTP not spent


async def test_failed_authentications_are_rate_limited(tmp_path: Path, pki: Pki) -> None:
    rg = await _start(tmp_path, pki, est_auth_failures=3)
    try:
        t = tmp_path / "dev"
        await create_ca(rg, t)
        await bulk_register(rg, t, f"ID;AUTH_TYPE;ENROLLMENT_OTP\ndev1;CERTIFICATES;{OTP1}\n")
        _, csr = await make_csr(t, "dev1", "/CN=dev1")
        for _ in range(3):
            reply = await enroll(rg, t, csr, "t1/dev1:guess")
            assert reply.status == 401, reply
        reply = await enroll(rg, t, csr, f"t1/dev1:{OTP1}")  # even the right OTP waits
        assert reply.status == 429, reply
        assert int(reply.headers["retry-after"]) > 0
        assert await rg.store.get_pending_registration("t1", "dev1")
    finally:
        await stop_gateway(rg)
