"""End-to-end: the management REST API over real HTTPS on an ephemeral port.

Driven with ``curl`` (as the spec's examples do) and with aiohttp's client,
against an in-process gateway with a real SQLite store; certificates are
signed with ``openssl``, devices are real ``mosquitto_sub``/``mosquitto_pub``.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway import ca_service
from gateway import operations as ops
from gateway.http.server import HttpServer, build_app
from gateway.pki import make_ca, write_private
from tests.helpers import (
    Pki,
    RunningGateway,
    Subscriber,
    mqtt_pub,
    run,
    start_gateway,
    stop_gateway,
    wait_until,
)
from trust import est
from trust.certs import fingerprint

pytestmark = pytest.mark.slow

PW = "correct-horse-1"
ADMIN = ["ROLE_TENANT_ADMIN"]
MGMT_ADMIN = ["ROLE_TENANT_MANAGEMENT_ADMIN"]
READER = ["ROLE_TENANT_MANAGEMENT_READ"]
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
TC = "/tenant/tenants/{}/trusted-certificates"
POP = "/tenant/tenants/{}/trusted-certificates-pop/{}"
CRL = "/tenant/trusted-certificates/settings/crl"


# plumbing ---------------------------------------------------------------------


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.create(tmp_path / "pki")


@pytest.fixture
async def gw(tmp_path: Path, pki: Pki) -> AsyncIterator[RunningGateway]:
    rg = await start_gateway(
        tmp_path, pki, tenants=("t1", "t2", "t3", "management"), upload_root=False
    )
    yield rg
    await stop_gateway(rg)


async def add_user(rg: RunningGateway, tenant: str, name: str, roles: list[str]) -> None:
    await ops.create_admin_user(rg.store, tenant, name, PW, roles)


def url(rg: RunningGateway, path: str) -> str:
    return f"https://127.0.0.1:{rg.https_port}{path}"


async def curl(
    rg: RunningGateway, *args: str, user: str | None = f"t1/admin:{PW}"
) -> tuple[int, Any]:
    """Run curl; returns (HTTP status, parsed JSON or text)."""
    cmd = ["curl", "-sS", "--noproxy", "*", "--max-time", "20", "--cacert", rg.cafile]
    cmd += ["-w", "\n%{http_code}"]
    if user is not None:
        cmd += ["-u", user]
    result = await run([*cmd, *args], timeout=30)
    assert result.returncode == 0, result.stderr
    body, _, code = result.stdout.rpartition("\n")
    parsed: Any = json.loads(body) if body.startswith(("{", "[")) else body
    return int(code), parsed


class Api:
    """aiohttp's client logged in as one user."""

    def __init__(self, rg: RunningGateway, login: str | None, password: str = PW) -> None:
        ctx = ssl.create_default_context(cafile=rg.cafile)
        headers = {"Authorization": aiohttp.encode_basic_auth(login, password)} if login else {}
        self.rg = rg
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ctx),
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=30),
        )

    async def __aenter__(self) -> Api:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()

    async def call(
        self, method: str, path: str, **kw: Any
    ) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
        target = path if path.startswith("https://") else url(self.rg, path)
        async with self.session.request(method, target, **kw) as r:
            raw = await r.read()
            body: Any = raw
            if r.content_type == "application/json":
                body = json.loads(raw)  # every JSON answer must parse
            return r.status, body, r.headers

    async def get(self, path: str, **kw: Any) -> tuple[int, Any]:
        status, body, _ = await self.call("GET", path, **kw)
        return status, body

    async def post(self, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        status, body, _ = await self.call("POST", path, json=body, **kw)
        return status, body

    async def put(self, path: str, body: Any, **kw: Any) -> tuple[int, Any]:
        status, body, _ = await self.call("PUT", path, json=body, **kw)
        return status, body


def upload_body(pem: bytes | str, name: str = "", auto: Any = True) -> dict[str, Any]:
    text = pem.decode() if isinstance(pem, bytes) else pem
    return {
        "name": name,
        "status": "ENABLED",
        "autoRegistrationEnabled": auto,
        "certInPemFormat": text,
    }


async def audit(api: Api, **query: str) -> list[dict[str, Any]]:
    status, body = await api.get("/audit/auditRecords", params={"pageSize": "500", **query})
    assert status == 200, body
    records: list[dict[str, Any]] = body["auditRecords"]
    return records


async def sign_code(tmp: Path, key_pem: bytes, code: str) -> str:
    """``openssl dgst -sha256 -sign key code.txt | openssl base64 -A`` (spec)."""
    tmp.mkdir(parents=True, exist_ok=True)
    key, txt = tmp / "ca.key", tmp / "code.txt"
    write_private(key, key_pem)
    txt.write_text(code)
    r = await run(
        ["sh", "-c", f"openssl dgst -sha256 -sign {key} {txt} | openssl base64 -A"], timeout=20
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


async def registered(rg: RunningGateway, tenant: str, device: str) -> bool:
    return any(d.device_id == device for d in await rg.store.list_devices(tenant))


# trusted certificates ---------------------------------------------------------------


async def test_certificate_lifecycle_upload_list_edit_disable_delete(
    gw: RunningGateway, pki: Pki
) -> None:
    await add_user(gw, "t1", "admin", ADMIN)
    # the spec's REST example: PEM with its newlines removed, "true" as a string
    one_line = pki.root.cert_pem().decode().replace("\n", "")
    status, cert = await curl(
        gw,
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "-d",
        json.dumps(upload_body(one_line, "certificateName", "true")),
        url(gw, TC.format("t1")),
    )
    assert status == 201, cert
    fp = fingerprint(pki.root.cert)
    assert cert["fingerprint"] == fp
    assert cert["name"] == "certificateName" and cert["status"] == "ENABLED"
    assert cert["autoRegistrationEnabled"] is True
    assert cert["certInPemFormat"].startswith("-----BEGIN CERTIFICATE-----")
    assert cert["subject"] == cert["issuer"] == "CN=Test Root CA"
    assert cert["serialNumber"] == format(pki.root.cert.serial_number, "x")
    assert ISO_Z.match(cert["notBefore"]) and ISO_Z.match(cert["notAfter"])
    assert cert["algorithmName"] == "EC" and cert["version"] == 3
    assert cert["proofOfPossessionValid"] is False
    assert cert["tenantCertificateAuthority"] is False
    assert cert["self"] == url(gw, f"{TC.format('t1')}/{fp}")

    async with Api(gw, "t1/admin") as api:
        for i in range(2):
            other = make_ca(f"Other CA {i}")
            status, _ = await api.post(TC.format("t1"), upload_body(other.cert_pem(), f"o{i}"))
            assert status == 201
        # paging, statistics and links
        status, page1 = await api.get(
            TC.format("t1"), params={"pageSize": "2", "withTotalPages": "true"}
        )
        assert status == 200
        assert len(page1["certificates"]) == 2
        assert page1["statistics"] == {"currentPage": 1, "pageSize": 2, "totalPages": 2}
        assert "currentPage=1" in page1["self"] and "prev" not in page1
        assert "currentPage=2" in page1["next"]
        status, page2 = await api.get(page1["next"])
        assert status == 200 and len(page2["certificates"]) == 1
        assert "currentPage=1" in page2["prev"]
        status, page3 = await api.get(page2["next"])
        assert status == 200 and page3["certificates"] == []

        # edit: PUT the whole object as read, read-only fields changed and ignored
        status, current = await api.get(f"{TC.format('t1')}/{fp}")
        assert status == 200
        forged = dict(
            current,
            name="renamed",
            fingerprint="0" * 40,
            subject="CN=forged",
            proofOfPossessionValid=True,
            tenantCertificateAuthority=True,
            certInPemFormat=make_ca("Swap").cert_pem().decode(),
        )
        status, edited = await api.put(f"{TC.format('t1')}/{fp}", forged)
        assert status == 200, edited
        assert edited["name"] == "renamed" and edited["fingerprint"] == fp
        assert edited["subject"] == "CN=Test Root CA" and edited["proofOfPossessionValid"] is False
        # a partial PUT keeps the fields it leaves out
        status, edited = await api.put(
            f"{TC.format('t1')}/{fp}", {"autoRegistrationEnabled": "false"}
        )
        assert status == 200
        assert edited["name"] == "renamed" and edited["autoRegistrationEnabled"] is False
        status, _ = await api.put(f"{TC.format('t1')}/{fp}", {"autoRegistrationEnabled": True})
        assert status == 200

        # disable: a connected device is dropped within a second
        await gw.wait_refreshed()
        cert_path, key_path, _ = pki.device("life-dev")
        sub = await Subscriber.start(
            gw.mqtt_port, gw.cafile, cert_path, key_path, "life-dev", "t/#"
        )
        try:
            assert await wait_until(
                lambda: len(gw.gateway.registry) == 1 and registered(gw, "t1", "life-dev")
            )
            loop = asyncio.get_running_loop()
            start = loop.time()
            status, _ = await curl(
                gw, "-X", "PUT", "-H", "Content-Type: application/json",
                "-d", '{"status": "DISABLED"}', url(gw, f"{TC.format('t1')}/{fp}"),
            )  # fmt: skip
            assert status == 200
            assert await wait_until(lambda: len(gw.gateway.registry) == 0, 1.0, 0.01)
            assert loop.time() - start < 1.5
            await sub.exit(5)
        finally:
            await sub.stop()
        r = await mqtt_pub(gw.mqtt_port, gw.cafile, cert_path, key_path, "life-dev", "t/x", "1")
        assert r.returncode != 0

        # delete, then the object is gone (JSON 404)
        status, body = await curl(gw, "-X", "DELETE", url(gw, f"{TC.format('t1')}/{fp}"))
        assert status == 204 and body == ""
        status, body = await api.get(f"{TC.format('t1')}/{fp}")
        assert status == 404 and body["error"] == "trusted-certificates/not_found"

        activities = {r["activity"] for r in await audit(api, type="TrustedCertificate")}
        assert {
            "Trusted certificate added",
            "Trusted certificate updated",
            "Trusted certificate deleted",
        } <= activities
        texts = [r["text"] for r in await audit(api, type="TrustedCertificate")]
        assert any("status ENABLED -> DISABLED" in t for t in texts)
        assert await audit(api, type="DeviceRegistration")


async def test_upload_validation_errors(gw: RunningGateway, pki: Pki, tmp_path: Path) -> None:
    await add_user(gw, "t1", "admin", ADMIN)
    now = datetime.now(UTC)
    v1 = tmp_path / "v1"
    v1.mkdir()
    for cmd in (
        f"openssl ecparam -genkey -name prime256v1 -out {v1}/k.pem",
        f"openssl req -new -key {v1}/k.pem -subj /CN=v1ca -out {v1}/r.csr",
        f"openssl x509 -req -in {v1}/r.csr -signkey {v1}/k.pem -days 10 -out {v1}/v1.pem",
    ):
        assert (await run(["sh", "-c", cmd])).returncode == 0
    _, _, device = pki.device("not-a-ca")
    cases = [
        ("this is not PEM", "pem"),
        ("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "pem"),
        ((v1 / "v1.pem").read_text(), "version"),
        (device.cert_pem().decode(), "not_ca"),
        (
            make_ca("Old", not_before=now - timedelta(days=20), not_after=now - timedelta(days=1))
            .cert_pem()
            .decode(),
            "expired",
        ),
        (
            make_ca("Future", not_before=now + timedelta(days=1), not_after=now + timedelta(days=9))
            .cert_pem()
            .decode(),
            "not_yet_valid",
        ),
    ]
    async with Api(gw, "t1/admin") as api:
        for pem, rule in cases:
            status, body = await api.post(TC.format("t1"), upload_body(pem))
            assert status == 422, (rule, body)
            assert body["error"] == f"trusted-certificates/{rule}", body
            assert f"rule: {rule}" in body["message"]
        assert (await api.post(TC.format("t1"), upload_body(pki.root.cert_pem())))[0] == 201
        status, body = await api.post(TC.format("t1"), upload_body(pki.root.cert_pem()))
        assert status == 409 and body["error"] == "trusted-certificates/duplicate"

        other = make_ca("Field checks").cert_pem().decode()
        for bad, field in (
            ({"name": "x"}, "certInPemFormat"),
            (dict(upload_body(other), status="MAYBE"), "status"),
            (dict(upload_body(other), autoRegistrationEnabled="yes"), "autoRegistrationEnabled"),
            (dict(upload_body(other), name=7), "name"),
        ):
            status, body = await api.post(TC.format("t1"), bad)
            assert status == 422 and body["field"] == field, body
        status, body = await api.post(TC.format("t1"), upload_body(other, "n" * 300))
        assert status == 422 and "name" in body["message"]
        # malformed bodies are 400 with a JSON error, never a 500
        for raw in (b"{not json", b"[1, 2]", b"[" * 100_000, b"\xff\xfe"):
            status, body, _ = await api.call(
                "POST", TC.format("t1"), data=raw, headers={"Content-Type": "application/json"}
            )
            assert status == 400 and body["error"] == "general/bad_request", body
        status, body, _ = await api.call(
            "POST",
            TC.format("t1"),
            data=b"x" * (5 << 20),
            headers={"Content-Type": "application/json"},
        )
        assert status == 413 and body["error"] == "general/request_too_large"

        # bulk: all or nothing, the bad item named by index
        a, b, c = (make_ca(f"Bulk {i}").cert_pem().decode() for i in range(3))
        status, body = await api.post(
            TC.format("t1") + "/bulk", {"certificates": [upload_body(a), upload_body(b)]}
        )
        assert status == 201 and len(body["certificates"]) == 2
        status, body = await api.post(
            TC.format("t1") + "/bulk",
            {"certificates": [upload_body(c), upload_body(device.cert_pem())]},
        )
        assert status == 422 and body["index"] == 1 and "certificates[1]" in body["message"]
        status, body = await api.get(TC.format("t1"), params={"pageSize": "100"})
        names = {x["subject"] for x in body["certificates"]}
        assert "CN=Bulk 2" not in names and {"CN=Bulk 0", "CN=Bulk 1"} <= names


@pytest.mark.parametrize("key_type", ["ec", "rsa"])
async def test_proof_of_possession_with_openssl(
    gw: RunningGateway, tmp_path: Path, key_type: str
) -> None:
    await add_user(gw, "t1", "admin", ADMIN)
    pki = Pki.create(tmp_path / f"pop-{key_type}", key_type=key_type, name=key_type.upper())
    fp = fingerprint(pki.root.cert)
    async with Api(gw, "t1/admin") as api:
        assert (await api.post(TC.format("t1"), upload_body(pki.root.cert_pem())))[0] == 201
        status, body = await api.post(POP.format("t1", fp) + "/pop", {})
        assert status == 422 and body["field"] == "proofOfPossessionSignedVerificationCode"
        status, body = await api.post(
            POP.format("t1", fp) + "/pop", {"proofOfPossessionSignedVerificationCode": "AAAA"}
        )
        assert status == 422 and body["error"] == "trusted-certificates/no_pop_code"
    # empty POST with Content-Type: application/json, as the platform's clients send it
    status, cert = await curl(
        gw, "-X", "POST", "-H", "Content-Type: application/json", "-d", "",
        url(gw, POP.format("t1", fp) + "/verification-code"),
    )  # fmt: skip
    assert status == 200, cert
    code = cert["proofOfPossessionUnsignedVerificationCode"]
    assert code and ISO_Z.match(cert["proofOfPossessionVerificationCodeUsableUntil"])
    wrong = await sign_code(
        tmp_path / "wrong", make_ca("Impostor", key_type=key_type).key_pem(), code
    )  # type: ignore[arg-type]
    right = await sign_code(tmp_path / "right", pki.root.key_pem(), code)
    async with Api(gw, "t1/admin") as api:
        status, body = await api.post(
            POP.format("t1", fp) + "/pop", {"proofOfPossessionSignedVerificationCode": wrong}
        )
        assert status == 422 and body["error"] == "trusted-certificates/pop_failed", body
        status, body = await api.get(f"{TC.format('t1')}/{fp}")
        assert body["proofOfPossessionValid"] is False
        status, body = await api.post(
            POP.format("t1", fp) + "/pop", {"proofOfPossessionSignedVerificationCode": right}
        )
        assert status == 200, body
        assert body["proofOfPossessionValid"] is True
        assert "proofOfPossessionUnsignedVerificationCode" not in body
        activities = [r["activity"] for r in await audit(api, type="TrustedCertificate")]
        assert "Proof of possession completed" in activities
        assert "Proof of possession failed" in activities


async def test_dos_scenario_proof_of_possession_decides_the_tenant(
    gw: RunningGateway, pki: Pki, tmp_path: Path
) -> None:
    for tenant in ("t1", "t2", "t3"):
        await add_user(gw, tenant, "admin", ADMIN)
    fp = fingerprint(pki.root.cert)
    t1, t2, t3 = Api(gw, "t1/admin"), Api(gw, "t2/admin"), Api(gw, "t3/admin")
    async with t1, t2, t3:
        # before anyone proves possession, both uploads are accepted...
        assert (await t1.post(TC.format("t1"), upload_body(pki.root.cert_pem())))[0] == 201
        assert (await t2.post(TC.format("t2"), upload_body(pki.root.cert_pem())))[0] == 201
        await gw.wait_refreshed()
        # ...and a device under that CA is refused as ambiguous
        cert, key, _ = pki.device("dos-dev")
        r = await mqtt_pub(gw.mqtt_port, gw.cafile, cert, key, "dos-dev", "x", "1")
        assert r.returncode != 0
        assert not await registered(gw, "t1", "dos-dev")
        assert not await registered(gw, "t2", "dos-dev")
        # t1 proves possession: the device now belongs to t1
        status, body = await t1.post(POP.format("t1", fp) + "/verification-code")
        signed = await sign_code(
            tmp_path / "t1pop",
            pki.root.key_pem(),
            body["proofOfPossessionUnsignedVerificationCode"],
        )
        status, body = await t1.post(
            POP.format("t1", fp) + "/pop", {"proofOfPossessionSignedVerificationCode": signed}
        )
        assert status == 200 and body["proofOfPossessionValid"] is True
        await gw.wait_refreshed()
        r = await mqtt_pub(gw.mqtt_port, gw.cafile, cert, key, "dos-dev", "x", "1")
        assert r.returncode == 0, r.stderr
        assert await registered(gw, "t1", "dos-dev")
        assert not await registered(gw, "t2", "dos-dev")
        # a later upload elsewhere is refused
        status, body = await t3.post(TC.format("t3"), upload_body(pki.root.cert_pem()))
        assert status == 409 and body["error"] == "trusted-certificates/owned_elsewhere", body
        status, _, _ = await t2.call("DELETE", f"{TC.format('t2')}/{fp}")
        assert status == 204
        status, body = await t2.post(TC.format("t2"), upload_body(pki.root.cert_pem()))
        assert status == 409 and "rule: owned_elsewhere" in body["message"]


# revocation -------------------------------------------------------------------------


async def test_revocation_single_bulk_and_signed_crl(
    gw: RunningGateway, pki: Pki, tmp_path: Path
) -> None:
    await add_user(gw, "t1", "admin", ADMIN)
    async with Api(gw, "t1/admin") as api:
        status, body = await api.get(CRL + "-check")
        assert status == 200 and body == {"offline": False, "online": False}
        status, body = await api.put(CRL + "-check", {"offline": True})
        assert status == 200 and body == {"offline": True, "online": False}
        # the platform's tenant-option spelling of the same settings
        opt = "/tenant/options/configuration/crl.online.check.enabled"
        status, body = await api.put(opt, {"value": "true"})
        assert status == 200 and body["value"] == "true"
        status, body = await api.get("/tenant/options/configuration/crl.offline.check.enabled")
        assert status == 200 and body["value"] == "true"
        assert (await api.put(opt, {"value": False}))[1]["value"] == "false"

        single = "0B8A5B9DD501A88775399B9A048811A3"
        entry = {"serialNumberInHex": single, "revocationDate": "2099-01-01T00:00:00.000Z"}
        status, body = await api.put(CRL, {"crls": [entry]})
        assert status == 200 and body["added"] == 1, body
        status, body = await api.put(CRL, {"crls": [entry]})
        assert status == 200 and (body["added"], body["kept"]) == (0, 1)
        status, body = await api.put(CRL, {"crls": [entry, {"serialNumberInHex": "xyz"}]})
        assert status == 422 and "crls[1]" in body["message"]
        status, body = await api.get(CRL, params={"format": "json"})
        (stored,) = body["crls"]
        # a future date becomes the upload time
        assert stored["serialNumberInHex"] == format(int(single, 16), "x")  # canonical
        assert datetime.fromisoformat(
            stored["revocationDate"].replace("Z", "+00:00")
        ) <= datetime.now(UTC)

    # bulk CSV: 5000 entries with duplicates, a future date and bad rows
    rows = [f"{0x1000 + i:x},2024-01-17T10:48:51.000Z" for i in range(4992)]
    rows += [rows[0], f"{single},", "1234abcd,2999-01-01T00:00:00.000Z"]
    rows += ["not-hex,", "beef,yesterday", ",2024-01-01T00:00:00.000Z", "zz,", "12 34,x"]
    assert len(rows) == 5000
    csv_file = tmp_path / "revoked.csv"
    csv_file.write_text("serialNumberInHex,revocationDate\n" + "\n".join(rows) + "\n")
    status, body = await curl(
        gw, "-X", "PUT", "-F", f"file=@{csv_file};type=text/csv", url(gw, CRL)
    )
    assert status == 200, body
    assert body["added"] == 4993 and body["kept"] == 2 and body["failed"] == 5, body
    assert sorted(e["line"] for e in body["errors"]) == [4997, 4998, 4999, 5000, 5001]
    too_many = tmp_path / "too-many.csv"
    too_many.write_text("\n".join(f"{0x900000 + i:x}," for i in range(5001)))
    status, body = await curl(gw, "-X", "PUT", "-F", f"file=@{too_many}", url(gw, CRL))
    assert status == 422 and "5000" in body["message"]
    status, body = await curl(gw, "-X", "PUT", "-F", f"other=@{csv_file}", url(gw, CRL))
    assert status == 400 and "'file' is missing" in body["message"]
    huge = tmp_path / "huge.csv"
    huge.write_bytes(b"a," * (2 << 20))
    status, body = await curl(
        gw, "-X", "PUT", "-H", "Transfer-Encoding: chunked", "-F", f"file=@{huge}", url(gw, CRL)
    )
    assert status == 413 and body["error"] == "general/request_too_large"

    # a chunked multipart upload, no filename, application/octet-stream
    boundary = "b0undary"
    payload = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"\r\n'
        "Content-Type: application/octet-stream\r\n\r\nabc123;\r\nabc124;\r\n"
        f"\r\n--{boundary}--\r\n"
    ).encode()

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 7):
            yield payload[i : i + 7]

    async with Api(gw, "t1/admin") as api:
        status, body, _ = await api.call(
            "PUT", CRL, data=chunks(),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )  # fmt: skip
        assert status == 200 and body["added"] == 2, body

        status, template, _ = await api.call("GET", CRL + "/template")
        assert status == 200 and template.startswith(b"serialNumberInHex,revocationDate")
        status, csv_export, _ = await api.call("GET", CRL, headers={"Accept": "text/csv"})
        assert status == 200 and len(csv_export.splitlines()) == 1 + 1 + 4993 + 2
        activities = {r["activity"] for r in await audit(api, type="CRL")}
        assert {
            "Revoked certificates added",
            "Revocation list imported",
            "CRL settings updated",
        } <= activities

    # the DER CRL, parsed and verified by openssl against the downloadable signer
    crl_file, signer = tmp_path / "t1.crl", tmp_path / "signer.pem"
    status, _ = await curl(gw, "-o", str(crl_file), url(gw, CRL))
    assert status == 200
    status, _ = await curl(gw, "-o", str(signer), url(gw, CRL + "/signer"))
    assert status == 200
    text = await run(["openssl", "crl", "-inform", "DER", "-in", str(crl_file), "-noout", "-text"])
    assert text.returncode == 0, text.stderr
    assert text.stdout.count("Serial Number:") == 1 + 4993 + 2
    assert f"Serial Number: {single}" in text.stdout
    ok = await run(
        ["openssl", "crl", "-inform", "DER", "-in", str(crl_file), "-CAfile", str(signer), "-noout"]
    )
    assert ok.returncode == 0 and "verify OK" in ok.stdout + ok.stderr
    bad = await run(
        ["openssl", "crl", "-inform", "DER", "-in", str(crl_file), "-CAfile", gw.cafile, "-noout"]
    )
    assert "verify OK" not in bad.stdout + bad.stderr


# registration and device users --------------------------------------------------------


async def test_bulk_registration_device_users_and_provisioned_certificates(
    gw: RunningGateway, pki: Pki, tmp_path: Path
) -> None:
    await add_user(gw, "t1", "admin", ADMIN)
    csv_file = tmp_path / "devices.csv"
    csv_file.write_text(
        "ID;TYPE;NAME;AUTH_TYPE;CREDENTIALS;ENROLLMENT_OTP\n"
        "bulk-1;c8y_Device;One;CERTIFICATES;;\n"
        "bulk-2;c8y_Device;Two;CERTIFICATES;;otp-secret-123\n"
        "pw-dev;c8y_Device;PW;CERTIFICATES;hunter2;\n"
        "basic-dev;c8y_Device;Basic;BASIC;;\n"
        "bulk-1;c8y_Device;Again;CERTIFICATES;;\n"
    )
    async with Api(gw, "t1/admin") as api:
        status, _ = await api.post(TC.format("t1"), upload_body(pki.root.cert_pem(), auto=False))
        assert status == 201
        status, body = await curl(
            gw,
            "-X",
            "POST",
            "-F",
            f"file=@{csv_file}",
            url(gw, "/devicecontrol/bulkNewDeviceRequests"),
        )
        assert status == 201, body
        assert (body["numberOfAll"], body["numberOfCreated"], body["numberOfFailed"]) == (5, 2, 3)
        failed = {f["line"]: f for f in body["failedCreationList"]}
        assert failed[4]["deviceId"] == "pw-dev" and "CREDENTIALS" in failed[4]["failureReason"]
        assert "AUTH_TYPE" in failed[5]["failureReason"]
        assert "duplicate" in failed[6]["failureReason"]
        assert "hunter2" not in json.dumps(body)
        # comma-separated, multipart part without filename, octet-stream
        form = aiohttp.FormData()
        form.add_field("file", "ID,AUTH_TYPE\nbulk-3,CERTIFICATES\nbulk-1,CERTIFICATES\n",
                       content_type="application/octet-stream")  # fmt: skip
        status, body, _ = await api.call("POST", "/devicecontrol/bulkNewDeviceRequests", data=form)
        assert status == 201 and body["numberOfCreated"] == 1 and body["numberOfFailed"] == 1
        assert "pending" in body["failedCreationList"][0]["failureReason"]
        status, body = await api.get("/devicecontrol/newDeviceRequests", params={"pageSize": "10"})
        pending = {p["id"]: p for p in body["newDeviceRequests"]}
        assert set(pending) == {"bulk-1", "bulk-2", "bulk-3"}
        assert pending["bulk-2"]["enrollmentOtp"] is True and "otp-secret" not in json.dumps(body)
        stored = await gw.store.get_pending_registration("t1", "bulk-2")
        assert gw.gateway.http_context is not None
        otp_key = ca_service.otp_key(gw.gateway.http_context.secrets)  # what EST checks with
        assert stored.otp_hash and est.verify_otp(stored.otp_hash, "otp-secret-123", otp_key)
        assert not est.verify_otp(stored.otp_hash, "otp-secret-124", otp_key)
        status, body = await api.post("/devicecontrol/newDeviceRequests", {"id": "single"})
        assert status == 422 and body["error"] == "devicecontrol/single_registration_unsupported"
        status, body, _ = await api.call(
            "POST", "/devicecontrol/bulkNewDeviceRequests", data=b"NAME\nx\n",
            headers={"Content-Type": "text/csv"},
        )  # fmt: skip
        assert status == 422 and "ID column" in body["message"]

        # auto-registration is off: only the bulk-registered device gets in
        await gw.wait_refreshed()
        s_cert, s_key, _ = pki.device("stranger")
        r = await mqtt_pub(gw.mqtt_port, gw.cafile, s_cert, s_key, "stranger", "x", "1")
        assert r.returncode != 0
        cert, key, dev = pki.device("bulk-1")
        sub = await Subscriber.start(gw.mqtt_port, gw.cafile, cert, key, "bulk-1", "t/#")
        try:
            assert await wait_until(
                lambda: len(gw.gateway.registry) == 1 and registered(gw, "t1", "bulk-1")
            )
            status, body = await api.get("/user/t1/users")
            (user,) = body["users"]
            assert user["userName"] == "device_bulk-1" and user["enabled"] is True
            assert user["registeredVia"] == "bulk" and ISO_Z.match(user["lastConnect"])
            # disable the device user: its live session is closed
            status, body = await api.put(
                "/user/t1/users/device_bulk-1",
                {"enabled": False, "userName": "ignored", "id": "ignored"},
            )
            assert status == 200 and body["enabled"] is False and body["id"] == "device_bulk-1"
            assert await wait_until(lambda: len(gw.gateway.registry) == 0, 1.0, 0.01)
            await sub.exit(5)
        finally:
            await sub.stop()
        r = await mqtt_pub(gw.mqtt_port, gw.cafile, cert, key, "bulk-1", "x", "1")
        assert r.returncode != 0
        status, body = await curl(
            gw, "-X", "PUT", "-H", "Content-Type: application/json", "-d", '{"enabled": true}',
            url(gw, "/user/t1/users/device_bulk-1"),
        )  # fmt: skip
        assert status == 200 and body["enabled"] is True
        await gw.wait_refreshed()
        r = await mqtt_pub(gw.mqtt_port, gw.cafile, cert, key, "bulk-1", "x", "1")
        assert r.returncode == 0, r.stderr

        # provisioned certificates: list, revoke one, the device is then refused
        path = "/devicecontrol/devices/bulk-1/certificates"
        status, body = await api.get(path)
        (prov,) = body["certificates"]
        assert prov["serialNumberInHex"] == format(dev.cert.serial_number, "x")
        assert ISO_Z.match(prov["notBefore"]) and prov["revoked"] is False
        status, body = await api.post(f"{path}/{prov['serialNumberInHex']}/revoke")
        assert status == 200 and body["revoked"] is True and body["newlyRevoked"] is True
        assert body["offlineCheckEnabled"] is False
        assert (await api.post(f"{path}/abcdef/revoke"))[0] == 404
        assert (await api.get("/devicecontrol/devices/nobody/certificates"))[0] == 404
        status, body = await api.get(path)
        assert body["certificates"][0]["revoked"] is True
        status, body = await api.get(CRL, params={"format": "json"})
        assert prov["serialNumberInHex"] in {e["serialNumberInHex"] for e in body["crls"]}
        assert (await api.put(CRL + "-check", {"offline": True}))[0] == 200
        await gw.wait_refreshed()
        r = await mqtt_pub(gw.mqtt_port, gw.cafile, cert, key, "bulk-1", "x", "1")
        assert r.returncode != 0

        status, body = await api.get("/user/t1/users/admin")
        assert status == 404
        types = {r["type"] for r in await audit(api)}
        assert {"BulkDeviceRegistration", "Device", "DeviceRegistration", "CRL"} <= types
        activities = {r["activity"] for r in await audit(api, type="Device")}
        assert {"Device user disabled", "Device user enabled"} <= activities


# who may do what ----------------------------------------------------------------------


async def test_roles_tenants_and_authentication(gw: RunningGateway, pki: Pki) -> None:
    await add_user(gw, "t1", "admin", ADMIN)
    await add_user(gw, "t1", "reader", READER)
    await add_user(gw, "t1", "nobody", [])
    await add_user(gw, "t2", "admin", MGMT_ADMIN)
    await add_user(gw, "management", "ops", MGMT_ADMIN)
    fp = fingerprint(pki.root.cert)
    t1_list = TC.format("t1")

    # 401 without or with wrong credentials, always with a challenge
    async with Api(gw, None) as anon:
        status, body, headers = await anon.call("GET", t1_list)
        assert status == 401 and body["error"] == "security/unauthorized"
        assert headers["WWW-Authenticate"].startswith("Basic")
        for bad in ("Bearer abc", "Basic !!!", "Basic " + "QQ==", "Basic dDEvYWRtaW4="):
            status, body, _ = await anon.call("GET", t1_list, headers={"Authorization": bad})
            assert status == 401, bad
    status, body = await curl(gw, url(gw, t1_list), user="t1/admin:wrong-password")
    assert status == 401 and body["message"] == "invalid credentials"

    async with Api(gw, "t1/admin") as admin:
        assert (await admin.post(t1_list, upload_body(pki.root.cert_pem())))[0] == 201
        # the clients' login calls: UseXBasic and a vendor Accept with a trailing ';'
        status, body = await admin.get(
            "/user/currentUser",
            headers={
                "UseXBasic": "true",
                "Accept": "application/vnd.com.nsn.cumulocity.user+json;",
            },
        )
        assert status == 200 and body["userName"] == "admin"
        assert [r["id"] for r in body["effectiveRoles"]] == ADMIN
        status, body = await admin.get("/tenant/currentTenant", headers={"UseXBasic": "true"})
        assert status == 200 and body["name"] == "t1"
        # another tenant's path: 403; another tenant's object in one's own tenant: 404
        status, body = await admin.get(TC.format("t2"))
        assert status == 403 and body["error"] == "security/forbidden"
        assert (await admin.get("/tenant/tenants/t2/trusted-certificates/" + fp))[0] == 403
        assert (await admin.get(CRL + "-check", params={"tenantId": "t2"}))[0] == 403
        assert (await admin.post(POP.format("t1", fp) + "/confirmed"))[0] == 403

    async with Api(gw, "t2/admin") as t2:
        status, body = await t2.get(f"{TC.format('t2')}/{fp}")
        assert status == 404 and body["error"] == "trusted-certificates/not_found"
        assert (await t2.get(t1_list))[0] == 403
        assert (await t2.get("/user/t2/users/device_whatever"))[0] == 404

    # read-only role reads but may not change; no role may not even read
    async with Api(gw, "reader") as reader:  # bare user name: unique, so accepted
        assert (await reader.get(t1_list))[0] == 200
        assert (await reader.get("/audit/auditRecords"))[0] == 200
        status, body = await reader.put(f"{t1_list}/{fp}", {"name": "x"})
        assert status == 403 and "ROLE_TENANT_ADMIN" in body["message"]
        assert (await reader.put(CRL, {"crls": [{"serialNumberInHex": "01"}]}))[0] == 403
    async with Api(gw, "t1/nobody") as nobody:
        assert (await nobody.get(t1_list))[0] == 403
        assert (await nobody.get("/tenant/currentTenant"))[0] == 200
    async with Api(gw, "admin") as ambiguous:  # admin exists in t1 and t2
        assert (await ambiguous.get("/tenant/currentTenant"))[0] == 401

    # the management tenant's management admin acts on any tenant
    async with Api(gw, "management/ops") as ops_api:
        status, body = await ops_api.get(t1_list)
        assert status == 200 and len(body["certificates"]) == 1
        status, body = await ops_api.post(POP.format("t1", fp) + "/confirmed")
        assert status == 200 and body["proofOfPossessionValid"] is True
        status, body = await ops_api.post(POP.format("t1", fp) + "/unconfirmed")
        assert status == 200 and body["proofOfPossessionValid"] is False
        other = make_ca("Operator upload").cert_pem()
        assert (await ops_api.post(TC.format("t2"), upload_body(other)))[0] == 201
        assert (await ops_api.get(CRL + "-check", params={"tenantId": "t3"}))[0] == 200
        assert (await ops_api.get(TC.format("nope")))[0] == 404
        records = await audit(ops_api, tenantId="t1", type="TrustedCertificate")
        assert any(r["user"] == "management/ops" for r in records)
    async with Api(gw, "t1/admin") as admin:
        activities = {r["activity"] for r in await audit(admin)}
        assert {"Proof of possession confirmed", "Proof of possession withdrawn"} <= activities


async def test_failed_logins_are_rate_limited(gw: RunningGateway) -> None:
    await add_user(gw, "t1", "admin", ADMIN)
    await add_user(gw, "t1", "victim", ADMIN)
    await add_user(gw, "t1", "late", ADMIN)
    async with Api(gw, "t1/admin") as admin:
        assert (await admin.get("/tenant/currentTenant"))[0] == 200  # proven before the storm
        async with Api(gw, "t1/victim", "guess") as guesser:
            statuses = [(await guesser.get("/tenant/currentTenant"))[0] for _ in range(6)]
            assert statuses == [401] * 5 + [429]
            status, body, headers = await guesser.call("GET", "/tenant/currentTenant")
            assert status == 429 and body["error"] == "security/too_many_requests"
            assert 0 < int(headers["Retry-After"]) <= 60
        async with Api(gw, "t1/victim") as victim:  # the right password does not help now
            assert (await victim.get("/tenant/currentTenant"))[0] == 429
        # guessing across users: the source address gets blocked too
        async with Api(gw, None) as anon:
            for i in range(20):
                auth = {"Authorization": aiohttp.encode_basic_auth(f"t1/u{i}", "x")}
                status, _ = await anon.get("/tenant/currentTenant", headers=auth)
                if status == 429:
                    break
        assert status == 429
        status, body = await curl(gw, url(gw, "/tenant/currentTenant"), user="t1/u0:x")
        assert status == 429 and body["error"] == "security/too_many_requests"
        async with Api(gw, "t1/late") as late:
            assert (await late.get("/tenant/currentTenant"))[0] == 429
        # a session proven before the block keeps working
        assert (await admin.get("/tenant/currentTenant"))[0] == 200
        records = await audit(admin, type="User")
        assert any(r["activity"] == "Login blocked" and "victim" in r["text"] for r in records)


# protocol details -------------------------------------------------------------------


async def test_json_errors_openapi_and_internal_errors(gw: RunningGateway) -> None:
    await add_user(gw, "t1", "admin", ADMIN)
    async with Api(gw, "t1/admin") as api:
        status, body = await api.get("/no/such/path")
        assert status == 404 and body["error"] == "general/not_found"
        status, body, headers = await api.call("PATCH", "/tenant/currentTenant")
        assert status == 405 and body["error"] == "general/method_not_allowed"
        assert "GET" in headers["Allow"]
        status, body = await api.get(TC.format("t1"), params={"pageSize": "zero"})
        assert status == 422 and body["field"] == "pageSize"
        status, body = await api.get("/audit/auditRecords", params={"dateFrom": "last week"})
        assert status == 422 and body["field"] == "dateFrom"
        status, body = await api.get(
            "/audit/auditRecords", params={"dateFrom": "2000-01-01", "dateTo": "2000-01-02"}
        )
        assert status == 200 and body["auditRecords"] == []
        status, spec, headers = await api.call("GET", "/openapi.yaml")
        assert status == 200 and "yaml" in headers["Content-Type"]

    # every route of the application is documented (and nothing else)
    document = yaml.safe_load(spec)
    assert document["openapi"].startswith("3.1")
    documented = {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method in ("get", "put", "post", "delete")
    }
    app = gw.gateway.http["https"].app
    served = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method in ("GET", "PUT", "POST", "DELETE") and route.resource is not None
    }
    undocumented, stale = sorted(served - documented), sorted(documented - served)
    assert not undocumented, f"routes missing from gateway/openapi.yaml: {undocumented}"
    assert not stale, f"gateway/openapi.yaml documents routes nobody serves: {stale}"
    in_repo = Path(__file__).parents[2] / "gateway" / "openapi.yaml"
    assert in_repo.read_bytes() == spec

    # an unexpected exception is a JSON 500 without details
    assert gw.gateway.http_context is not None
    app2 = build_app(gw.gateway.http_context, modules=())

    async def broken(_request: Any) -> Any:
        raise RuntimeError("secret internal detail")

    app2.router.add_get("/boom", broken)
    server = HttpServer(app2, "test")
    await server.start("127.0.0.1", 0, None)
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{server.bound_port}/boom") as r,
        ):
            body = await r.json()
            assert r.status == 500 and body["error"] == "general/internal_error"
            assert "secret" not in json.dumps(body)
    finally:
        await server.stop()


async def test_plain_management_listener_on_loopback(tmp_path: Path, pki: Pki) -> None:
    from dataclasses import replace

    from gateway.config import ConfigError, ListenerConfig, load_config, validate

    base = load_config(env={})
    on = ListenerConfig(enabled=True, host="127.0.0.1", port=0)
    with pytest.raises(ConfigError, match="loopback"):
        validate(
            replace(base, listeners=replace(base.listeners, management=replace(on, host="0.0.0.0")))
        )
    cfg = replace(base, listeners=replace(base.listeners, management=on))
    rg = await start_gateway(tmp_path, pki, config=cfg, upload_root=False)
    try:
        await add_user(rg, "t1", "admin", ADMIN)
        port = rg.gateway.port("management")
        auth = {"Authorization": aiohttp.encode_basic_auth("t1/admin", PW)}
        async with (
            aiohttp.ClientSession(headers=auth) as session,
            session.get(f"http://127.0.0.1:{port}/tenant/currentTenant") as r,
        ):
            assert r.status == 200 and (await r.json())["name"] == "t1"
    finally:
        await stop_gateway(rg)


async def test_cli_admin_users_and_bulk_register(gw: RunningGateway, tmp_path: Path) -> None:
    import sys

    store = ["--data-dir", str(tmp_path), "--store", gw.config.store_url]
    secret = tmp_path / "pw.txt"
    secret.write_text(PW + "\n")
    r = await run(
        [sys.executable, "-m", "gateway", "admin-users", "add", "ops", "--tenant", "management",
         "--role", "management-admin", "--password-file", str(secret), *store],
        timeout=30,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert PW not in r.stdout + r.stderr
    r = await run(
        [sys.executable, "-m", "gateway", "admin-users", "list", "--tenant", "management",
         "--json", *store],
        timeout=30,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [
        {"tenant": "management", "userName": "ops", "roles": MGMT_ADMIN, "enabled": True}
    ]
    devices = tmp_path / "devices.csv"
    devices.write_text("ID,AUTH_TYPE,CREDENTIALS\ncli-1,CERTIFICATES,\ncli-2,CERTIFICATES,pw\n")
    r = await run(
        [sys.executable, "-m", "gateway", "bulk-register", str(devices), "--tenant", "t1",
         "--json", *store],
        timeout=30,
    )  # fmt: skip
    assert r.returncode == 1, r.stderr  # one row refused
    result = json.loads(r.stdout)
    assert result["created"] == ["cli-1"] and result["numberOfFailed"] == 1
    # the new user works against the running gateway, on another tenant
    async with Api(gw, "management/ops") as api:
        status, body = await api.get("/devicecontrol/newDeviceRequests", params={"tenantId": "t1"})
        assert status == 200 and [p["id"] for p in body["newDeviceRequests"]] == ["cli-1"]
