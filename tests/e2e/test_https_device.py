"""End-to-end: the HTTPS device front-end on 8443 and the device access token.

A real in-process gateway on ephemeral ports, driven by ``curl --cert/--key``,
aiohttp's client, ``mosquitto_rr``/``mosquitto_sub``/``mosquitto_pub`` over
8883, and (for the proxy) a small aiohttp server started by the test.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from gateway import operations
from gateway.config import HttpConfig, ProxyRoute, TokenConfig, load_config
from gateway.device_tokens import KEYS_OPTION
from gateway.pki import Issued
from gateway.secrets import SecretBox
from tests.helpers import (
    Mosquitto,
    Pki,
    RunningGateway,
    Subscriber,
    free_port,
    mqtt_pub,
    run,
    start_gateway,
    stop_gateway,
    wait_until,
)
from trust.model import Status

pytestmark = pytest.mark.slow

PW = "correct-horse-1"
Creds = tuple[Path, Path]


# plumbing ---------------------------------------------------------------------


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.create(tmp_path / "pki")


async def trust_second_tenant(rg: RunningGateway, tmp_path: Path) -> Pki:
    """A second PKI whose root is a trusted certificate of tenant t2."""
    other = Pki.create(tmp_path / "t2pki", name="Tenant2")
    await operations.add_trusted_certificate(
        rg.store,
        "t2",
        other.root.cert_pem().decode(),
        "t2 root",
        Status.ENABLED,
        True,
        datetime.now(UTC),
        "test",
    )
    await rg.wait_refreshed()
    return other


@pytest.fixture
async def gw(tmp_path: Path, pki: Pki) -> AsyncIterator[RunningGateway]:
    rg = await start_gateway(tmp_path, pki, tenants=("t1", "t2"))
    yield rg
    await stop_gateway(rg)


def url(rg: RunningGateway, path: str) -> str:
    return f"https://127.0.0.1:{rg.https_port}{path}"


async def curl(
    rg: RunningGateway,
    path: str,
    *args: str,
    cert: Creds | None = None,
    bearer: str | None = None,
) -> tuple[int, Any, dict[str, str]]:
    """Run curl; returns (status, parsed JSON or text, lower-cased headers)."""
    cmd = ["curl", "-sS", "--noproxy", "*", "--max-time", "20", "--cacert", rg.cafile, "-i"]
    if cert is not None:
        cmd += ["--cert", str(cert[0]), "--key", str(cert[1])]
    if bearer is not None:
        cmd += ["-H", f"Authorization: Bearer {bearer}"]
    result = await run([*cmd, *args, url(rg, path)], timeout=30)
    assert result.returncode == 0, result.stderr
    head, _, body = result.stdout.partition("\r\n\r\n")
    lines = head.split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    parsed: Any = json.loads(body) if body.startswith(("{", "[")) else body
    return status, parsed, headers


def client_context(rg: RunningGateway, cert: Creds | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=rg.cafile)
    if cert is not None:
        ctx.load_cert_chain(cert[0], cert[1])
    return ctx


def device(pki: Pki, cn: str) -> tuple[Creds, Issued]:
    cert, key, dev = pki.device(cn)
    return (cert, key), dev


async def get_token(
    rg: RunningGateway, creds: Creds, client_id: str, *, version: str = "mqttv311"
) -> str:
    """Ask for a token over 8883 with mosquitto_rr: one connection subscribes to
    s/dat, publishes to s/uat and prints the answer."""
    result = await run(
        [
            "mosquitto_rr",
            "-h",
            "127.0.0.1",
            "-p",
            str(rg.mqtt_port),
            "--cafile",
            rg.cafile,
            "--cert",
            str(creds[0]),
            "--key",
            str(creds[1]),
            "-i",
            client_id,
            "-V",
            version,
            "-q",
            "1",
            "-t",
            "s/uat",
            "-e",
            "s/dat",
            "-m",
            "",
            "-W",
            "10",
        ],
        timeout=20,
    )
    assert result.returncode == 0, result.stderr
    answer = result.stdout.strip()
    assert answer.startswith("71,"), answer
    return answer[3:]


async def revoke(rg: RunningGateway, tenant: str, serial: int) -> None:
    now = datetime.now(UTC)
    await operations.set_revocation_settings(rg.store, tenant, now, "test", offline=True)
    await operations.add_revocations(rg.store, tenant, [(f"{serial:x}", None)], now, "test")


# direct mTLS ------------------------------------------------------------------


async def test_direct_mtls_identity_with_curl_registers_the_device(
    gw: RunningGateway, pki: Pki
) -> None:
    creds, dev = device(pki, "http-dev-1")
    status, body, _ = await curl(gw, "/identity", cert=creds)
    assert status == 200, body
    assert body["tenant"] == "t1"
    assert body["deviceId"] == "http-dev-1"
    assert body["user"] == "device_http-dev-1"
    assert body["authentication"] == "certificate"
    assert body["registration"] == "auto"  # this request registered it
    assert body["registeredVia"] == "auto"
    assert body["certificate"]["serialNumber"] == f"{dev.cert.serial_number:x}"
    not_after = dev.cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%S")
    assert body["certificate"]["notAfter"].startswith(not_after)
    user = await gw.store.get_device("t1", "http-dev-1")
    assert user.enabled and user.registered_via == "auto"
    assert await gw.store.list_provisioned_certificates("t1", "http-dev-1")
    await gw.wait_refreshed()
    status, body, _ = await curl(gw, "/identity", cert=creds)
    assert (status, body["registration"], body["registeredVia"]) == (200, "existing", "auto")


async def test_no_certificate_is_401_and_management_credentials_do_not_count(
    gw: RunningGateway,
) -> None:
    status, body, headers = await curl(gw, "/identity")
    assert status == 401
    assert body["error"] == "security/unauthorized"
    assert headers["www-authenticate"].startswith("Bearer")
    await operations.create_admin_user(gw.store, "t1", "admin", PW, ["ROLE_TENANT_ADMIN"])
    status, body, _ = await curl(gw, "/identity", "-u", f"t1/admin:{PW}")
    assert status == 401
    status, body, _ = await curl(gw, "/topics/x", "-d", "1", "-u", f"t1/admin:{PW}")
    assert status == 401


async def test_untrusted_and_unregistered_certificates(
    gw: RunningGateway, pki: Pki, tmp_path: Path
) -> None:
    # OpenSSL accepts leaf + intermediate (partial chains are allowed), but the
    # spec's rule wants the trusted certificate in the chain: untrusted, 401
    cert, key, _ = pki.device("no-root", chain=[pki.inter])
    status, body, headers = await curl(gw, "/identity", cert=(cert, key))
    assert (status, body["error"]) == (401, "security/untrusted")
    assert headers["www-authenticate"].startswith("Bearer")

    # trusted, but auto-registration is off and nobody bulk-registered it: 403
    other = Pki.create(tmp_path / "t2pki", name="Tenant2")
    await operations.add_trusted_certificate(
        gw.store,
        "t2",
        other.root.cert_pem().decode(),
        "t2 root",
        Status.ENABLED,
        False,
        datetime.now(UTC),
        "test",
    )
    await gw.wait_refreshed()
    creds, _ = device(other, "not-registered")
    status, body, _ = await curl(gw, "/identity", cert=creds)
    assert (status, body["error"]) == (403, "security/not_registered")
    fp = (await gw.store.list_trusted_certificates("t2"))[0].fingerprint
    await operations.update_trusted_certificate(
        gw.store, "t2", fp, datetime.now(UTC), "test", status=Status.DISABLED
    )
    await gw.wait_refreshed()
    # a disabled anchor leaves the TLS trust store: the handshake itself fails
    cmd = ["curl", "-sS", "--noproxy", "*", "--max-time", "10", "--cacert", gw.cafile]
    result = await run(
        [*cmd, "--cert", str(creds[0]), "--key", str(creds[1]), url(gw, "/identity")]
    )
    assert result.returncode != 0


async def test_revocation_closes_the_keep_alive_connection(gw: RunningGateway, pki: Pki) -> None:
    creds, dev = device(pki, "ka-dev")
    ctx = client_context(gw, creds)
    created: list[int] = []
    reused: list[int] = []

    async def on_create(*_: object) -> None:
        created.append(1)

    async def on_reuse(*_: object) -> None:
        reused.append(1)

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(on_create)
    trace.on_connection_reuseconn.append(on_reuse)
    # a raw keep-alive connection too, to time the server's close exactly
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", gw.https_port, ssl=ctx, server_hostname="localhost"
    )
    writer.write(b"GET /identity HTTP/1.1\r\nHost: localhost\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    await reader.readexactly(length)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=ctx), trace_configs=[trace]
    ) as session:
        for _ in range(2):
            async with session.get(url(gw, "/identity")) as r:
                assert r.status == 200
        assert (len(created), len(reused)) == (1, 1)  # one kept-alive connection
        await revoke(gw, "t1", dev.cert.serial_number)
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the gateway
        assert loop.time() - start < 1.5
        async with session.get(url(gw, "/identity")) as r:
            assert r.status == 401
            assert (await r.json())["error"] == "security/revoked"
        # the old connection was closed: the request needed a new one
        assert (len(created), len(reused)) == (2, 1)
    writer.close()


async def test_disabled_device_is_403_and_its_connection_is_closed(
    gw: RunningGateway, pki: Pki
) -> None:
    creds, _ = device(pki, "dis-dev")
    ctx = client_context(gw, creds)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", gw.https_port, ssl=ctx, server_hostname="localhost"
    )
    writer.write(b"GET /identity HTTP/1.1\r\nHost: localhost\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200")
    await operations.set_device_enabled(gw.store, "t1", "dis-dev", False, datetime.now(UTC), "t")
    loop = asyncio.get_running_loop()
    start = loop.time()
    rest = await asyncio.wait_for(reader.read(), 5)  # the body, then EOF
    assert not rest.startswith(b"HTTP/")
    assert loop.time() - start < 1.5
    writer.close()
    status, body, _ = await curl(gw, "/identity", cert=creds)
    assert (status, body["error"]) == (403, "security/device_disabled")


# device access token ------------------------------------------------------------


async def test_token_over_mqtt_then_bearer_with_curl(gw: RunningGateway, pki: Pki) -> None:
    creds, dev = device(pki, "tok-dev")
    spy_creds, _ = device(pki, "spy-dev")
    # a device of the same tenant listening everywhere: s/uat must not reach the broker
    spy = await Subscriber.start(
        gw.mqtt_port, gw.cafile, spy_creds[0], spy_creds[1], "spy-dev", "#"
    )
    try:
        assert await wait_until(lambda: device_registered(gw, "spy-dev"))
        await asyncio.sleep(0.3)  # let SUBACK settle at the broker
        token = await get_token(gw, creds, "tok-dev")
        claims = jwt.decode(token, options={"verify_signature": False})
        assert (claims["tenant"], claims["device"]) == ("t1", "tok-dev")
        assert claims["serial"] == f"{dev.cert.serial_number:x}"
        assert jwt.get_unverified_header(token)["alg"] == "ES256"
        status, body, _ = await curl(gw, "/identity", bearer=token)
        assert status == 200, body
        assert body["authentication"] == "token"
        assert body["deviceId"] == "tok-dev" and body["tenant"] == "t1"
        assert body["certificate"]["serialNumber"] == f"{dev.cert.serial_number:x}"
        # the spy saw nothing of the exchange; a fence message proves it was listening
        ok = await mqtt_pub(gw.mqtt_port, gw.cafile, creds[0], creds[1], "tok-dev", "fence", "f")
        assert ok.returncode == 0, ok.stderr
        assert await spy.next_line() == "fence f"
    finally:
        await spy.stop()
    # the key is stored sealed, never as PEM
    stored = await gw.store.get_option("t1", KEYS_OPTION)
    assert stored is not None and "PRIVATE KEY" not in stored and "mgk1:" in stored


async def device_registered(rg: RunningGateway, device_id: str) -> bool:
    try:
        await rg.store.get_device("t1", device_id)
        return True
    except Exception:
        return False


async def test_token_with_mqtt5_on_an_upstream_mosquitto(tmp_path: Path, pki: Pki) -> None:
    (tmp_path / "mosquitto").mkdir()
    broker = Mosquitto(tmp_path / "mosquitto")
    broker.start()
    try:
        rg = await start_gateway(tmp_path, pki, mqtt_backend="upstream", upstream_port=broker.port)
        try:
            creds, _ = device(pki, "tok5-dev")
            token = await get_token(rg, creds, "tok5-dev", version="mqttv5")
            status, body, _ = await curl(rg, "/identity", bearer=token)
            assert (status, body["deviceId"]) == (200, "tok5-dev")
        finally:
            await stop_gateway(rg)
    finally:
        broker.stop()


async def test_token_dies_with_the_device_user_and_the_certificate(
    gw: RunningGateway, pki: Pki
) -> None:
    creds, dev = device(pki, "life-dev")
    token = await get_token(gw, creds, "life-dev")
    assert (await curl(gw, "/identity", bearer=token))[0] == 200
    now = datetime.now(UTC)
    await operations.set_device_enabled(gw.store, "t1", "life-dev", False, now, "test")
    await gw.wait_refreshed()
    status, body, _ = await curl(gw, "/identity", bearer=token)
    assert (status, body["error"]) == (403, "security/device_disabled")
    await operations.set_device_enabled(gw.store, "t1", "life-dev", True, now, "test")
    await gw.wait_refreshed()
    assert (await curl(gw, "/identity", bearer=token))[0] == 200
    await revoke(gw, "t1", dev.cert.serial_number)
    await gw.wait_refreshed()
    status, body, headers = await curl(gw, "/identity", bearer=token)
    assert (status, body["error"]) == (401, "security/revoked")
    assert 'error="invalid_token"' in headers["www-authenticate"]


async def test_expired_tampered_and_wrong_tenant_tokens_are_refused(
    tmp_path: Path, pki: Pki
) -> None:
    config = replace(load_config(env={}), tokens=TokenConfig(lifetime=2.0, leeway=0.0))
    rg = await start_gateway(tmp_path, pki, tenants=("t1", "t2"), config=config)
    try:
        other = await trust_second_tenant(rg, tmp_path)
        creds, _ = device(pki, "short-dev")
        token = await get_token(rg, creds, "short-dev")
        claims = jwt.decode(token, options={"verify_signature": False})
        assert claims["exp"] - claims["iat"] == 2
        assert (await curl(rg, "/identity", bearer=token))[0] == 200

        # tampered: another device's name under the same signature
        header, _, signature = token.split(".")
        forged = dict(claims, device="someone-else", sub="device_someone-else")
        body64 = base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=").decode()
        status, body, _ = await curl(rg, "/identity", bearer=f"{header}.{body64}.{signature}")
        assert (status, body["error"]) == (401, "security/invalid_token")
        status, _, _ = await curl(rg, "/identity", bearer=token[:-4] + "AAAA")
        assert status == 401

        # wrong tenant: t2 has a device of that name, but the token is signed with t1's key
        t2_creds, _ = device(other, "short-dev")
        t2_token = await get_token(rg, t2_creds, "short-dev")
        status, body, _ = await curl(rg, "/identity", bearer=t2_token)
        assert (status, body["tenant"]) == (200, "t2")
        t1_key = await t1_signing_key(rg)
        as_t2 = jwt.encode(
            dict(claims, tenant="t2"),
            t1_key[1],
            algorithm="ES256",
            headers={"kid": t1_key[0]},
        )
        status, body, _ = await curl(rg, "/identity", bearer=as_t2)
        assert (status, body["error"]) == (401, "security/invalid_token")
        assert "kid" in body["message"]

        await asyncio.sleep(2.2)  # the lifetime is 2 s
        status, body, _ = await curl(rg, "/identity", bearer=token)
        assert (status, body["error"]) == (401, "security/invalid_token")
        assert "expired" in body["message"]
    finally:
        await stop_gateway(rg)


async def t1_signing_key(rg: RunningGateway) -> tuple[str, Any]:
    """Tenant t1's current token-signing key, opened as the gateway does."""
    stored = json.loads(await rg.store.get_option("t1", KEYS_OPTION) or "{}")
    kid = stored["current"]
    sealed = next(k["key"] for k in stored["keys"] if k["kid"] == kid)
    box = SecretBox.load_or_create(rg.config.data_dir)
    return kid, box.open_private_key(sealed, f"device-token:t1:{kid}")


# HTTP -> MQTT ----------------------------------------------------------------------


async def test_http_publish_reaches_mqtt_subscribers_of_the_same_tenant_only(
    gw: RunningGateway, pki: Pki, tmp_path: Path
) -> None:
    other = await trust_second_tenant(gw, tmp_path)
    sub1_creds, _ = device(pki, "sub-t1")
    sub2_creds, _ = device(other, "sub-t2")
    pub2_creds, _ = device(other, "pub-t2")
    http_creds, _ = device(pki, "http-pub")
    sub1 = await Subscriber.start(
        gw.mqtt_port, gw.cafile, sub1_creds[0], sub1_creds[1], "sub-t1", "sensors/#"
    )
    sub2 = await Subscriber.start(
        gw.mqtt_port, gw.cafile, sub2_creds[0], sub2_creds[1], "sub-t2", "sensors/#"
    )
    try:
        assert await wait_until(lambda: device_registered(gw, "sub-t1"))
        await asyncio.sleep(0.5)  # both SUBACKs settle at the broker
        status, body, _ = await curl(
            gw, "/topics/sensors/temp?qos=1", "-d", "21.5", cert=http_creds
        )
        assert (status, body) == (
            200,
            {"topic": "sensors/temp", "qos": 1, "retain": False, "size": 4},
        )
        assert await sub1.next_line() == "sensors/temp 21.5"
        # t2's subscriber gets its own tenant's fence next, never t1's message
        status, _, _ = await curl(gw, "/topics/sensors/fence", "-d", "t2", cert=pub2_creds)
        assert status == 200
        assert await sub2.next_line() == "sensors/fence t2"
        assert sub2.lines == ["sensors/fence t2"]
    finally:
        await sub1.stop()
        await sub2.stop()


async def test_retained_state_is_read_from_the_broker(
    gw: RunningGateway, pki: Pki, tmp_path: Path
) -> None:
    other = await trust_second_tenant(gw, tmp_path)
    creds, _ = device(pki, "ret-dev")
    mqtt_creds, _ = device(pki, "ret-mqtt")
    t2_creds, _ = device(other, "ret-t2")
    status, body, _ = await curl(gw, "/topics/state/led", cert=creds)
    assert (status, body["error"]) == (404, "topics/not_found")
    status, _, _ = await curl(gw, "/topics/state/led?retain=true", "-d", "on", cert=creds)
    assert status == 200
    status, body, headers = await curl(gw, "/topics/state/led", cert=creds)
    assert (status, body, headers["content-type"]) == (200, "on", "application/octet-stream")
    # retained by an MQTT device: the same state
    r = await mqtt_pub(
        gw.mqtt_port, gw.cafile, mqtt_creds[0], mqtt_creds[1], "ret-mqtt", "state/fan", "3", "-r"
    )
    assert r.returncode == 0, r.stderr
    status, body, _ = await curl(gw, "/topics/state/fan", cert=creds)
    assert (status, body) == (200, "3")
    # another tenant's namespace: nothing there
    status, _, _ = await curl(gw, "/topics/state/led", cert=t2_creds)
    assert status == 404


async def test_publish_input_errors(gw: RunningGateway, pki: Pki, tmp_path: Path) -> None:
    creds, _ = device(pki, "bad-pub")
    status, body, _ = await curl(gw, "/topics/a?qos=2", "-d", "x", cert=creds)
    assert (status, body["error"]) == (400, "topics/invalid_qos")
    status, body, _ = await curl(gw, "/topics/a/%2B/b", "-d", "x", cert=creds)
    assert (status, body["error"]) == (400, "topics/invalid_topic")
    status, body, _ = await curl(gw, "/topics/s/dat", "-d", "71,forged", cert=creds)
    assert (status, body["error"]) == (403, "topics/reserved")
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * (gw.config.limits.max_packet_size + 1))
    status, body, _ = await curl(gw, "/topics/a", "--data-binary", f"@{big}", cert=creds)
    assert (status, body["error"]) == (413, "general/request_too_large")


# upstream proxy --------------------------------------------------------------------


class Upstream:
    """A small real HTTP server standing for the backend."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.first_chunk = asyncio.Event()
        self.client_got_chunk = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        record = {
            "path": request.path_qs,
            "method": request.method,
            "headers": [[k, v] for k, v in request.headers.items()],
            "sha256": hashlib.sha256(body).hexdigest(),
            "size": len(body),
        }
        self.requests.append(record)
        return web.json_response(record, headers={"X-Upstream": "yes"})

    async def upload(self, request: web.Request) -> web.Response:
        # reads the first chunk and tells the test, which only then sends the rest
        first = await request.content.readany()
        self.first_chunk.set()
        rest = await request.content.read()
        return web.json_response({"size": len(first) + len(rest)})

    async def download(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first;")
        await asyncio.wait_for(self.client_got_chunk.wait(), 10)
        await response.write(b"second")
        await response.write_eof()
        return response

    async def slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(text="late")

    async def start(self) -> None:
        app = web.Application(client_max_size=16 << 20)
        app.router.add_route("*", "/api/upload", self.upload)
        app.router.add_get("/api/download", self.download)
        app.router.add_get("/api/slow", self.slow)
        app.router.add_route("*", "/api/{tail:.*}", self.echo)
        self.runner = web.AppRunner(app, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self.runner.addresses[0][1])

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server = Upstream()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def proxied(tmp_path: Path, pki: Pki, upstream: Upstream) -> AsyncIterator[RunningGateway]:
    base = load_config(env={})
    routes = (
        ProxyRoute("/backend", f"http://127.0.0.1:{upstream.port}/api", read_timeout=1.0),
        ProxyRoute("/down", f"http://127.0.0.1:{free_port()}/x", connect_timeout=2.0),
    )
    rg = await start_gateway(tmp_path, pki, config=replace(base, http=HttpConfig(proxy=routes)))
    yield rg
    await stop_gateway(rg)


SPOOFED = {
    "X-Tenant": "evil",
    "X-Tenant-Id": "evil",
    "X-Device-Id": "evil",
    "X-Device-User": "device_evil",
    "X-Client-Cert": "spoof",
    "X-Client-Cert-Serial": "1",
    "X-Client-Cert-Fingerprint": "00",
    "Client-Cert": ":AAAA:",
    "Client-Cert-Chain": ":AAAA:",
    "Forwarded": "for=6.6.6.6",
    "X-Forwarded-For": "6.6.6.6",
    "X-SSL-Client-Verify": "SUCCESS",
    "X-Auth-Method": "certificate",
}


def sf_binary(value: str) -> bytes:
    assert value.startswith(":") and value.endswith(":"), value
    return base64.b64decode(value[1:-1], validate=True)


async def test_proxy_strips_spoofed_identity_and_adds_the_gateways(
    proxied: RunningGateway, pki: Pki, upstream: Upstream
) -> None:
    creds, dev = device(pki, "proxy-dev")
    spoof = [arg for name, value in SPOOFED.items() for arg in ("-H", f"{name}: {value}")]
    status, body, headers = await curl(
        proxied, "/backend/v1/items?x=1&y=%20", *spoof, "-d", "payload", cert=creds
    )
    assert status == 200, body
    assert headers["x-upstream"] == "yes"
    assert body["path"] == "/api/v1/items?x=1&y=%20"
    assert body["sha256"] == hashlib.sha256(b"payload").hexdigest()
    got: dict[str, list[str]] = {}
    for name, value in body["headers"]:
        got.setdefault(name.lower(), []).append(value)
    assert got["x-tenant"] == ["t1"]
    assert got["x-device-id"] == ["proxy-dev"]
    assert got["x-device-user"] == ["device_proxy-dev"]
    assert got["x-auth-method"] == ["certificate"]
    assert got["x-client-cert-serial"] == [f"{dev.cert.serial_number:x}"]
    leaf_der = dev.cert.public_bytes(Encoding.DER)
    assert got["x-client-cert-fingerprint"] == [hashlib.sha256(leaf_der).hexdigest()]
    # RFC 9440: parses back to the device certificate and its chain
    assert x509.load_der_x509_certificate(sf_binary(got["client-cert"][0])) == dev.cert
    chain = [
        x509.load_der_x509_certificate(sf_binary(v.strip()))
        for v in got["client-cert-chain"][0].split(",")
    ]
    assert chain == [pki.inter.cert, pki.root.cert]
    assert got["forwarded"] == [f'for=127.0.0.1;proto=https;host="127.0.0.1:{proxied.https_port}"']
    assert got["x-forwarded-for"] == ["127.0.0.1"]
    for name in ("x-tenant-id", "x-client-cert", "x-ssl-client-verify", "authorization"):
        assert name not in got, name


async def test_proxy_with_a_token_and_without_credentials(
    proxied: RunningGateway, pki: Pki, upstream: Upstream
) -> None:
    creds, _ = device(pki, "proxy-tok")
    token = await get_token(proxied, creds, "proxy-tok")
    status, body, _ = await curl(
        proxied, "/backend/t", "-H", "Client-Cert: :AAAA:", "-H", "X-Tenant: evil", bearer=token
    )
    assert status == 200, body
    got = {name.lower(): value for name, value in body["headers"]}
    assert (got["x-tenant"], got["x-device-id"], got["x-auth-method"]) == (
        "t1",
        "proxy-tok",
        "token",
    )
    for name in ("client-cert", "client-cert-chain", "x-client-cert-fingerprint", "authorization"):
        assert name not in got, name
    seen = len(upstream.requests)
    status, body, _ = await curl(proxied, "/backend/t")
    assert (status, body["error"]) == (401, "security/unauthorized")
    assert len(upstream.requests) == seen  # never forwarded


async def test_proxy_never_forwards_dot_segments(
    proxied: RunningGateway, pki: Pki, upstream: Upstream
) -> None:
    creds, _ = device(pki, "proxy-dots")
    for path in ("/backend/%2e%2e/secret", "/backend/a/%2E/b", "/back%65nd/x"):
        status, body, _ = await curl(proxied, path, "--path-as-is", cert=creds)
        assert (status, body["error"]) == (400, "proxy/bad_path"), path
    status, _, _ = await curl(
        proxied, "/backend/../tenant/currentTenant", "--path-as-is", cert=creds
    )
    assert status != 200  # normalised away from the proxy, or refused
    assert upstream.requests == []


async def test_proxy_failures_are_502_and_504(proxied: RunningGateway, pki: Pki) -> None:
    creds, _ = device(pki, "proxy-fail")
    status, body, _ = await curl(proxied, "/down/x", cert=creds)
    assert (status, body["error"]) == (502, "proxy/upstream_unavailable")
    status, body, _ = await curl(proxied, "/backend/slow", cert=creds)  # read_timeout 1 s
    assert (status, body["error"]) == (504, "proxy/upstream_timeout")


async def test_proxy_streams_both_ways(
    proxied: RunningGateway, pki: Pki, upstream: Upstream
) -> None:
    creds, _ = device(pki, "proxy-stream")
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=client_context(proxied, creds)), timeout=timeout
    ) as session:
        # response: the first chunk arrives while the upstream still waits for us
        async with session.get(url(proxied, "/backend/download")) as r:
            assert r.status == 200
            first = await asyncio.wait_for(r.content.readuntil(b";"), 10)
            assert first == b"first;"
            upstream.client_got_chunk.set()
            assert await r.content.read() == b"second"

        # request: the upstream reads our first chunk before we send the rest
        async def body() -> AsyncIterator[bytes]:
            yield b"a" * 1000
            await asyncio.wait_for(upstream.first_chunk.wait(), 10)
            yield b"b" * 1000

        async with session.post(url(proxied, "/backend/upload"), data=body()) as r:
            assert (r.status, await r.json()) == (200, {"size": 2000})

        # a large body goes through intact
        blob = bytes(range(256)) * 12_000
        async with session.put(url(proxied, "/backend/blob"), data=blob) as r:
            answer = await r.json()
            assert (answer["size"], answer["sha256"]) == (
                len(blob),
                hashlib.sha256(blob).hexdigest(),
            )


# routing ---------------------------------------------------------------------------


async def test_each_path_family_has_its_own_authentication(gw: RunningGateway, pki: Pki) -> None:
    """Device routes take a certificate or a bearer token; the management API takes
    Basic credentials only; EST answers for itself. Nothing leaks across."""
    await operations.create_admin_user(gw.store, "t1", "admin", PW, ["ROLE_TENANT_ADMIN"])
    creds, _ = device(pki, "route-dev")
    token = await get_token(gw, creds, "route-dev")
    basic = ("-u", f"t1/admin:{PW}")

    # device family
    assert (await curl(gw, "/identity"))[0] == 401
    assert (await curl(gw, "/identity", cert=creds))[0] == 200
    assert (await curl(gw, "/identity", bearer=token))[0] == 200
    assert (await curl(gw, "/identity", *basic))[0] == 401

    # management family
    status, body, headers = await curl(gw, "/tenant/currentTenant")
    assert status == 401 and headers["www-authenticate"].startswith("Basic")
    status, body, headers = await curl(gw, "/tenant/currentTenant", cert=creds)
    assert status == 401 and headers["www-authenticate"].startswith("Basic")
    assert (await curl(gw, "/tenant/currentTenant", bearer=token))[0] == 401
    status, body, _ = await curl(gw, "/tenant/currentTenant", *basic)
    assert (status, body["name"]) == (200, "t1")

    # EST family: its own module answers (error area est/), never a device or
    # management challenge
    for extra, cert in (((), None), ((), creds), (basic, None)):
        status, body, headers = await curl(
            gw, "/.well-known/est/simplereenroll", *extra, "-d", "x", cert=cert
        )
        assert isinstance(body, dict) and body["error"].startswith("est/"), (status, body)
        assert "mtls-gateway-devices" not in headers.get("www-authenticate", "")
