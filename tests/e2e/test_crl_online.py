"""End-to-end online revocation: the real gateway, a real HTTP server publishing
CRLs (aiohttp on an ephemeral loopback port), ``file://`` CRLs and real
mosquitto clients.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives.serialization import Encoding

from gateway import operations
from gateway.config import Config, CrlConfig, load_config
from gateway.pki import Issued, make_ca, make_crl, new_key
from tests.helpers import (
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

pytestmark = pytest.mark.slow


@dataclass
class Served:
    """One CRL publication: what the server hands out at a path."""

    body: bytes
    number: int


@dataclass
class CrlServer:
    """A CRL distribution point: HTTP on 127.0.0.1, ETag / If-None-Match, a log of
    every request (time and the CRL number served)."""

    files: dict[str, Served] = field(default_factory=dict)
    hits: list[tuple[str, datetime, int | None]] = field(default_factory=list)
    chunked: bool = False
    not_modified: int = 0
    port: int = 0
    _runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{name}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def publish(self, name: str, issuer: Issued, revoked: list[int], **kw: Any) -> None:
        crl = make_crl(issuer, [(s, datetime.now(UTC)) for s in revoked], **kw)
        self.files[name] = Served(crl.public_bytes(Encoding.DER), kw.get("number", 1))

    def requests(self, name: str) -> list[tuple[datetime, int | None]]:
        return [(t, n) for p, t, n in self.hits if p == name]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        served = self.files.get(name)
        self.hits.append((name, datetime.now(UTC), served.number if served else None))
        if served is None:
            raise web.HTTPNotFound()
        etag = '"' + hashlib.sha256(served.body).hexdigest()[:32] + '"'
        if request.headers.get("If-None-Match") == etag:
            self.not_modified += 1
            return web.Response(status=304, headers={"ETag": etag})
        if not self.chunked:
            return web.Response(
                body=served.body, content_type="application/pkix-crl", headers={"ETag": etag}
            )
        resp = web.StreamResponse(headers={"Content-Type": "application/pkix-crl"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(0, len(served.body), 1024):
            await resp.write(served.body[i : i + 1024])
        await resp.write_eof()
        return resp


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.create(tmp_path / "pki")


@pytest.fixture
async def server() -> AsyncIterator[CrlServer]:
    srv = CrlServer()
    await srv.start()
    yield srv
    await srv.stop()


def crl_config(**kw: Any) -> Config:
    """Fast polling and retries so the tests take seconds, not minutes."""
    base = load_config(env={})
    settings: dict[str, Any] = {"poll_interval": 0.05, "retry_min": 0.2, "retry_max": 1.0}
    settings.update(kw)
    return replace(base, crl=CrlConfig(**settings))


async def gateway_with_online_check(
    tmp: Path, pki: Pki, config: Config, *, online: bool = True
) -> RunningGateway:
    rg = await start_gateway(tmp, pki, config=config)
    if online:
        await operations.set_revocation_settings(
            rg.store, "t1", datetime.now(UTC), "test", online=True
        )
        await rg.wait_refreshed()
    return rg


def point(rg: RunningGateway, url: str) -> dict[str, Any] | None:
    assert rg.gateway.crl is not None
    status = rg.gateway.crl.status()
    return next((d for d in status["distributionPoints"] if d["url"] == url), None)


def rejected(rg: RunningGateway, reason: str) -> float:
    return rg.gateway.metrics.handshakes.value("mqtt", "rejected", reason)


def fetches(rg: RunningGateway, result: str) -> float:
    return rg.gateway.metrics.registry.counter(
        "mtls_gateway_crl_fetches_total", "", ("result",)
    ).value(result)


async def pub(rg: RunningGateway, cert: Path, key: Path, cn: str) -> bool:
    r = await mqtt_pub(rg.mqtt_port, rg.cafile, cert, key, cn, "t/x", "1")
    return r.returncode == 0


async def first_contact(rg: RunningGateway, cert: Path, key: Path, cn: str, url: str) -> None:
    """A device meeting a new distribution point is refused (fail_closed) while the
    gateway fetches that CRL in the background; it is current shortly after."""
    assert not await pub(rg, cert, key, cn)
    assert rejected(rg, "crl_unavailable") >= 1
    assert await wait_until(lambda: (point(rg, url) or {}).get("state") == "current", timeout=5)


async def test_rotated_crl_refuses_the_device_and_closes_its_live_session(
    tmp_path: Path, pki: Pki, server: CrlServer
) -> None:
    url = server.url("inter.crl")
    first_next_update = datetime.now(UTC) + timedelta(seconds=8)
    server.publish("inter.crl", pki.inter, [], next_update=first_next_update, number=1)
    cert_a, key_a, dev_a = pki.device("crl-a", crl_urls=[url])
    cert_b, key_b, _ = pki.device("crl-b", crl_urls=[url])
    # refetch at half the remaining lifetime: ~4 s before the first CRL's nextUpdate
    rg = await gateway_with_online_check(tmp_path, pki, crl_config(refresh_margin=0.5))
    sub = None
    try:
        await first_contact(rg, cert_a, key_a, "crl-a", url)
        sub = await Subscriber.start(rg.mqtt_port, rg.cafile, cert_a, key_a, "crl-a", "t/#")
        assert await wait_until(lambda: len(rg.gateway.registry) == 1, timeout=5)
        assert await pub(rg, cert_b, key_b, "crl-b")

        # the CA publishes CRL 2 revoking device A; the gateway picks it up by itself
        server.publish(
            "inter.crl",
            pki.inter,
            [dev_a.cert.serial_number],
            next_update=datetime.now(UTC) + timedelta(minutes=5),
            number=2,
        )
        assert await wait_until(lambda: len(rg.gateway.registry) == 0, timeout=15, interval=0.02)
        closed_at = datetime.now(UTC)
        fetched_at = next(t for t, n in server.requests("inter.crl") if n == 2)
        assert closed_at - fetched_at < timedelta(seconds=3)
        assert fetched_at < first_next_update  # refreshed before it expired
        assert await sub.exit(timeout=5) is not None  # the real client saw the close

        assert not await pub(rg, cert_a, key_a, "crl-a")
        assert rejected(rg, "revoked") >= 1
        assert await pub(rg, cert_b, key_b, "crl-b")
        dp = point(rg, url)
        assert dp is not None and dp["crlNumber"] == 2 and dp["entries"] == 1
        assert rg.gateway.metrics.sessions_closed.value("revoked") == 1
        assert fetches(rg, "updated") >= 2
    finally:
        if sub is not None:
            await sub.stop()
        await stop_gateway(rg)


@pytest.mark.parametrize("policy", ["fail_closed", "fail_open"])
async def test_unreachable_distribution_point(tmp_path: Path, pki: Pki, policy: str) -> None:
    url = f"http://127.0.0.1:{free_port()}/gone.crl"  # nothing listens there
    cert, key, _ = pki.device("unreachable", crl_urls=[url])
    rg = await gateway_with_online_check(tmp_path, pki, crl_config(missing_policy=policy))
    try:
        first = await pub(rg, cert, key, "unreachable")
        assert await wait_until(lambda: (point(rg, url) or {}).get("failures", 0) >= 2, timeout=5)
        again = await pub(rg, cert, key, "unreachable")
        if policy == "fail_closed":
            assert not first and not again
            assert rejected(rg, "crl_unavailable") >= 2
        else:
            assert first and again
            assert rejected(rg, "crl_unavailable") == 0
        dp = point(rg, url)
        assert dp is not None and dp["state"] == "never_fetched" and dp["lastError"]
        assert fetches(rg, "failed") >= 2

        # the operator's view: `crl status` reads the status file the daemon writes
        status_file = tmp_path / "crl-status.json"

        def file_shows_failures() -> bool:
            try:
                doc = json.loads(status_file.read_text())
            except (OSError, ValueError):
                return False
            return any(d["url"] == url and d["failures"] >= 2 for d in doc["distributionPoints"])

        assert await wait_until(file_shows_failures, timeout=5)
        cli = [sys.executable, "-m", "gateway", "crl", "status", "--data-dir", str(tmp_path)]
        res = await run([*cli, "--json"], timeout=30)
        assert res.returncode == 0, res.stderr
        doc = json.loads(res.stdout)
        assert doc["missingPolicy"] == policy
        assert [d["url"] for d in doc["distributionPoints"]] == [url]
        table = await run(cli, timeout=30)
        assert table.returncode == 0 and url in table.stdout and "never_fetched" in table.stdout
    finally:
        await stop_gateway(rg)


async def test_crl_with_a_bad_signature_is_ignored_logged_and_counted(
    tmp_path: Path, pki: Pki, server: CrlServer, caplog: pytest.LogCaptureFixture
) -> None:
    url = server.url("inter.crl")
    server.publish("inter.crl", pki.inter, [], number=1)
    cert, key, _ = pki.device("sig-a", crl_urls=[url])
    cert_b, key_b, dev_b = pki.device("sig-b", crl_urls=[url])
    # max_age: ask the distribution point again every half second
    rg = await gateway_with_online_check(tmp_path, pki, crl_config(max_age=0.5))
    try:
        await first_contact(rg, cert, key, "sig-a", url)
        assert await pub(rg, cert, key, "sig-a")
        # refetched with If-None-Match: the server answers 304, the CRL stays
        assert await wait_until(lambda: fetches(rg, "unchanged") >= 1, timeout=5)
        assert server.not_modified >= 1

        # same issuer name, another key: the signature does not verify
        caplog.set_level(logging.WARNING, logger="mtls_gateway.crl")
        forger = Issued(pki.inter.cert, new_key())
        server.publish("inter.crl", forger, [dev_b.cert.serial_number], number=2)
        assert await wait_until(lambda: fetches(rg, "invalid") >= 3, timeout=15)
        dp = point(rg, url)
        assert dp is not None and "signature" in (dp["lastError"] or "")
        assert dp["crlNumber"] == 1 and dp["state"] == "current"  # the last good CRL stays
        messages = [r.getMessage() for r in caplog.records]
        assert len([m for m in messages if "ignored" in m and url in m]) == 1  # logged once
        # device B, decided now for the first time: the forged revocation does not
        # count, and the last good CRL answers (fail_closed would refuse without one)
        assert await pub(rg, cert_b, key_b, "sig-b")
        assert rejected(rg, "revoked") == 0
    finally:
        await stop_gateway(rg)


async def test_revoked_intermediate_found_through_its_issuers_file_crl(
    tmp_path: Path, pki: Pki
) -> None:
    crl_path = tmp_path / "root.crl"
    url = crl_path.as_uri()
    inter = make_ca("Doomed Intermediate", issuer=pki.root, crl_urls=[url])
    crl_path.write_bytes(
        make_crl(pki.root, [(inter.cert.serial_number, datetime.now(UTC))]).public_bytes(
            Encoding.DER
        )
    )
    cert, key, _ = pki.device("under-doomed", issuer=inter, chain=[inter, pki.root])
    healthy_cert, healthy_key, _ = pki.device("under-healthy")
    rg = await gateway_with_online_check(tmp_path, pki, crl_config(allow_file_urls=True))
    try:
        await first_contact(rg, cert, key, "under-doomed", url)
        assert not await pub(rg, cert, key, "under-doomed")
        assert rejected(rg, "revoked") == 1
        assert await pub(rg, healthy_cert, healthy_key, "under-healthy")
        dp = point(rg, url)
        assert dp is not None and dp["entries"] == 1 and dp["issuer"] == "CN=Test Root CA"
    finally:
        await stop_gateway(rg)


async def test_file_urls_are_not_read_unless_allowed(tmp_path: Path, pki: Pki) -> None:
    crl_path = tmp_path / "inter.crl"
    crl_path.write_bytes(make_crl(pki.inter, []).public_bytes(Encoding.DER))
    cert, key, _ = pki.device("file-dp", crl_urls=[crl_path.as_uri()])
    rg = await gateway_with_online_check(tmp_path, pki, crl_config())
    try:
        # no usable distribution point: not checked online, nothing tracked
        assert await pub(rg, cert, key, "file-dp")
        assert rg.gateway.crl is not None
        assert rg.gateway.crl.status()["distributionPoints"] == []
    finally:
        await stop_gateway(rg)


async def test_online_check_off_does_not_consult_crls(
    tmp_path: Path, pki: Pki, server: CrlServer
) -> None:
    url = server.url("inter.crl")
    cert, key, dev = pki.device("offline-tenant", crl_urls=[url])
    server.publish("inter.crl", pki.inter, [dev.cert.serial_number])
    rg = await gateway_with_online_check(tmp_path, pki, crl_config(), online=False)
    try:
        assert await pub(rg, cert, key, "offline-tenant")
        assert await pub(rg, cert, key, "offline-tenant")
        assert server.requests("inter.crl") == []
        assert rg.gateway.crl is not None
        assert rg.gateway.crl.status()["distributionPoints"] == []
    finally:
        await stop_gateway(rg)


async def test_oversized_crl_is_refused_while_downloading(
    tmp_path: Path, pki: Pki, server: CrlServer
) -> None:
    server.chunked = True  # no Content-Length: the limit must hold while streaming
    url = server.url("big.crl")
    server.publish("big.crl", pki.inter, list(range(1, 400)))
    cert, key, _ = pki.device("big-crl", crl_urls=[url])
    rg = await gateway_with_online_check(tmp_path, pki, crl_config(max_size=4096))
    try:
        assert not await pub(rg, cert, key, "big-crl")
        assert await wait_until(lambda: (point(rg, url) or {}).get("failures", 0) >= 1, timeout=5)
        dp = point(rg, url)
        assert dp is not None and "max_size" in (dp["lastError"] or "")
        assert len(server.files["big.crl"].body) > 4096
    finally:
        await stop_gateway(rg)
