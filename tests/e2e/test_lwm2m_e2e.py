"""End-to-end: LWM2M over CoAP/DTLS on a real UDP socket.

Real clients: Debian's libcoap ``coap-client-openssl`` (sends only its leaf
certificate), ``openssl s_client -dtls1_2``, and a small LWM2M client of our
own (aiocoap codec over a pyOpenSSL DTLS client) for server-initiated
requests, load and packet-level tests. The gateway runs in-process on an
ephemeral port; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shlex
import sys
from collections.abc import Callable
from dataclasses import fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiocoap.numbers.codes import Code
from OpenSSL import SSL

from gateway import operations
from gateway.app import Gateway
from gateway.config import Config, load_config
from gateway.dtls import DtlsStats, split_records
from protocols.lwm2m.client import DtlsClient, DtlsHandshakeError, Lwm2mClient, client_context
from protocols.lwm2m.server import (
    DeviceTimeout,
    EndpointNotFound,
    InvalidRequest,
    Lwm2mServer,
)
from tests.helpers import (
    Pki,
    ProcResult,
    RunningGateway,
    run,
    start_gateway,
    stop_gateway,
    wait_until,
)
from trust.model import Status

pytestmark = pytest.mark.slow


def now() -> datetime:
    # not a module constant: a long run must not leave it minutes behind fresh certificates
    return datetime.now(UTC)


EP = "lwm2m-0001"
OTHER = "lwm2m-0002"


def lwm2m_config(pki: Pki, **lwm2m: Any) -> Config:
    base = load_config(env={})
    # the test PKI's intermediate is not uploaded: the leaf-only clients need it known
    return replace(
        base, lwm2m=replace(base.lwm2m, intermediates=str(pki.dir / "inter.pem"), **lwm2m)
    )


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.create(tmp_path / "pki")


@pytest.fixture
async def gw(tmp_path: Path, pki: Pki):  # type: ignore[no-untyped-def]
    rg = await start_gateway(
        tmp_path, pki, tenants=("t1", "t2"), config=lwm2m_config(pki, request_timeout=5.0)
    )
    for device in (EP, OTHER):
        await operations.register_device(rg.store, "t1", device, "manual", now(), "test")
    await rg.wait_refreshed()
    yield rg
    await stop_gateway(rg)


def lwm2m(rg: RunningGateway) -> Lwm2mServer:
    assert rg.gateway.lwm2m is not None
    return rg.gateway.lwm2m


def registered(rg: RunningGateway, tenant: str = "t1") -> list[str]:
    return [e.endpoint for e in lwm2m(rg).endpoints(tenant)]


def rejected(rg: RunningGateway, reason: str) -> float:
    return rg.gateway.metrics.handshakes.value("lwm2m", "rejected", reason)


def dropped(rg: RunningGateway, reason: str) -> float:
    counter = rg.gateway.metrics.registry.counter(
        "mtls_gateway_udp_datagrams_dropped_total", "", ("listener", "reason")
    )
    return counter.value("lwm2m", reason)


def dtls_stats(rg: RunningGateway) -> DtlsStats:
    return rg.gateway.udp_listeners["lwm2m"].server.stats()


async def coap(
    rg: RunningGateway,
    cert: Path | None,
    key: Path | None,
    method: str,
    path: str,
    payload: str | None = None,
    port: int | None = None,
) -> ProcResult:
    """libcoap's client (exit status 0 even on failure: read its output)."""
    cmd = ["coap-client-openssl", "-m", method, "-B", "5", "-R", rg.cafile]
    if cert is not None and key is not None:
        cmd += ["-c", str(cert), "-j", str(key)]
    if payload is not None:
        cmd += ["-e", payload]
    cmd.append(f"coaps://127.0.0.1:{port or rg.lwm2m_port}/{path}")
    return await run(cmd, 20)


def handshake_failed(result: ProcResult) -> bool:
    # coap-client logs OpenSSL's alert to stdout and gives up sending
    return "alert" in result.stdout and "cannot send CoAP pdu" in result.stdout


async def connect(
    rg: RunningGateway, cert: Path, key: Path, port: int | None = None, **kw: Any
) -> DtlsClient:
    return await DtlsClient.connect(
        "127.0.0.1", port or rg.lwm2m_port, cert=cert, key=key, cafile=Path(rg.cafile), **kw
    )


REGISTER = f"rd?ep={EP}&lt=300&lwm2m=1.1&b=U"


# registration with libcoap --------------------------------------------------------------


async def test_coap_client_registers_and_is_listed(gw: RunningGateway, pki: Pki) -> None:
    cert, key, _ = pki.device(EP)
    r = await coap(gw, cert, key, "post", REGISTER, "</1/0>,</3/0>;ver=1.1")
    assert not handshake_failed(r) and "4." not in r.stderr, r.stdout + r.stderr
    info = lwm2m(gw).endpoint("t1", EP)
    assert info.objects == ("/1/0", "/3/0")
    assert (info.lifetime, info.lwm2m_version, info.binding) == (300, "1.1", "U")
    assert info.last_update <= datetime.now(UTC) < info.expires_at
    assert registered(gw) == [EP] and registered(gw, "t2") == []
    assert gw.gateway.metrics.handshakes.value("lwm2m", "accepted", "ok") == 1
    # admission recorded the certificate the device used
    assert await wait_until(lambda: gw.store.list_provisioned_certificates("t1", EP))


async def test_wrong_endpoint_name_is_forbidden(gw: RunningGateway, pki: Pki) -> None:
    cert, key, _ = pki.device(EP)
    r = await coap(gw, cert, key, "post", f"rd?ep={OTHER}&lt=300&lwm2m=1.1", "</1/0>")
    assert "4.03" in r.stderr, r.stdout + r.stderr
    assert registered(gw) == []


async def test_unregistered_device_is_refused(gw: RunningGateway, pki: Pki) -> None:
    cert, key, _ = pki.device("lwm2m-9999")
    r = await coap(gw, cert, key, "post", "rd?ep=lwm2m-9999&lt=300", "</1/0>")
    assert handshake_failed(r), r.stdout + r.stderr
    assert registered(gw) == []
    assert rejected(gw, "not_registered") == 1


async def test_no_certificate_untrusted_ca_and_revoked_are_refused(
    gw: RunningGateway, pki: Pki, tmp_path: Path
) -> None:
    r = await coap(gw, None, None, "post", REGISTER, "</1/0>")
    assert handshake_failed(r)
    assert rejected(gw, "no_certificate") == 1

    other = Pki.create(tmp_path / "other", name="Other")
    cert, key, _ = other.device(EP)  # right name, wrong CA
    r = await coap(gw, cert, key, "post", REGISTER, "</1/0>")
    assert handshake_failed(r)
    assert rejected(gw, "untrusted") == 1

    cert, key, dev = pki.device(EP)
    await operations.set_revocation_settings(gw.store, "t1", now(), "test", offline=True)
    await operations.add_revocations(
        gw.store, "t1", [(f"{dev.cert.serial_number:x}", None)], now(), "test"
    )
    await gw.wait_refreshed()
    r = await coap(gw, cert, key, "post", REGISTER, "</1/0>")
    assert handshake_failed(r)
    assert rejected(gw, "revoked") == 1
    assert registered(gw) == []
    # a fresh certificate for the same device is still fine
    cert2, key2, _ = pki.device(EP)
    r = await coap(gw, cert2, key2, "post", REGISTER, "</1/0>")
    assert registered(gw) == [EP], r.stdout + r.stderr


async def test_openssl_s_client_dtls12(gw: RunningGateway, pki: Pki) -> None:
    cert, key, _ = pki.device(EP)
    base = ["openssl", "s_client", "-dtls1_2", "-connect", f"127.0.0.1:{gw.lwm2m_port}"]
    base += ["-CAfile", gw.cafile]
    ok = await run([*base, "-cert", str(cert), "-key", str(key)], 15, input=b"")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "Protocol  : DTLSv1.2" in ok.stdout and "Cipher is ECDHE-" in ok.stdout
    assert await wait_until(
        lambda: gw.gateway.metrics.handshakes.value("lwm2m", "accepted", "ok") == 1
    )
    refused = await run(base, 15, input=b"")
    assert refused.returncode != 0
    assert "alert handshake failure" in refused.stdout + refused.stderr
    assert rejected(gw, "no_certificate") == 1


async def test_update_and_deregister_with_coap_client(gw: RunningGateway, pki: Pki) -> None:
    cert, key, _ = pki.device(EP)
    await coap(gw, cert, key, "post", REGISTER, "</1/0>,</3/0>")
    first = lwm2m(gw).endpoint("t1", EP)
    reg = first.registration_id
    r = await coap(gw, cert, key, "post", f"rd/{reg}?lt=600", "</3/0>,</5/0>")
    assert "4." not in r.stderr, r.stdout + r.stderr
    updated = lwm2m(gw).endpoint("t1", EP)
    assert updated.registration_id == reg and updated.lifetime == 600
    assert updated.objects == ("/3/0", "/5/0") and updated.last_update > first.last_update

    # another device may not touch this registration
    cert2, key2, _ = pki.device(OTHER)
    r = await coap(gw, cert2, key2, "delete", f"rd/{reg}")
    assert "4.04" in r.stderr
    assert registered(gw) == [EP]

    r = await coap(gw, cert, key, "delete", f"rd/{reg}")
    assert "4." not in r.stderr
    assert registered(gw) == []
    with pytest.raises(EndpointNotFound):
        lwm2m(gw).endpoint("t1", EP)


async def test_an_uploaded_intermediate_is_found_for_a_leaf_only_client(
    tmp_path: Path, pki: Pki
) -> None:
    rg = await start_gateway(tmp_path, pki, config=load_config(env={}))  # no intermediates
    try:
        await operations.register_device(rg.store, "t1", EP, "manual", now(), "test")
        await rg.wait_refreshed()
        cert, key, _ = pki.device(EP)
        r = await coap(rg, cert, key, "post", REGISTER, "</1/0>")
        assert handshake_failed(r)  # coap-client sends its leaf only: issuer unknown
        assert rejected(rg, "untrusted") == 1
        pem = pki.inter.cert_pem().decode()
        await operations.add_trusted_certificate(
            rg.store, "t1", pem, "intermediate", Status.ENABLED, False, now(), "test"
        )
        await rg.wait_refreshed()  # the DTLS verify store is rebuilt on the change
        r = await coap(rg, cert, key, "post", REGISTER, "</1/0>")
        assert registered(rg) == [EP], r.stdout + r.stderr
    finally:
        await stop_gateway(rg)


# server-initiated requests ------------------------------------------------------------------


async def test_server_initiated_read_write_execute(gw: RunningGateway, pki: Pki) -> None:
    cert, key, _ = pki.device(EP)
    dtls = await connect(gw, cert, key)
    big = bytes(range(256)) * 12  # 3 KiB: needs Block2
    device = Lwm2mClient(dtls, EP, {"/3/0/0": b"Open Mobile Alliance", "/3/0/99": big})
    try:
        response = await device.register(lifetime=120, objects="</1/0>,</3/0>")
        assert response.code == Code.CREATED
        server = lwm2m(gw)
        assert server.endpoint("t1", EP).online

        value = await server.read("t1", EP, "/3/0/0")
        assert (value.code, value.text(), value.http_status) == (
            "2.05",
            "Open Mobile Alliance",
            200,
        )
        assert value.content_format == 0
        assert [tuple(m.opt.uri_path) for m in device.requests] == [("3", "0", "0")]

        blocks = await server.read("t1", EP, "/3/0/99")
        assert blocks.payload == big
        assert len(device.requests) == 1 + len(big) // 512  # one GET per 512-byte block

        written = await server.write("t1", EP, "/1/0/1", b"600")
        assert written.code == "2.04" and device.resources["/1/0/1"] == b"600"
        executed = await server.execute("t1", EP, "/3/0/4")
        assert executed.success and device.executed == [("/3/0/4", b"")]

        missing = await server.read("t1", EP, "/5/0/1")
        assert (missing.code, missing.http_status) == ("4.04", 404)
        with pytest.raises(EndpointNotFound):
            await server.read("t2", EP, "/3/0/0")  # registered in t1, not t2
        with pytest.raises(InvalidRequest):
            await server.read("t1", EP, "/device/0")

        # the device vanishes without a word: the read times out (bounded)
        dtls.abort()
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(DeviceTimeout):
            await server.read("t1", EP, "/3/0/0", request_timeout=1.0)
        assert loop.time() - started < 3
    finally:
        dtls.abort()


async def test_management_api_reads_writes_and_lists(gw: RunningGateway, pki: Pki) -> None:
    """The same operations through the HTTPS management API with curl."""
    await operations.create_admin_user(gw.store, "t1", "ops", "s3cret-pass", ["ROLE_TENANT_ADMIN"])
    cert, key, _ = pki.device(EP)
    dtls = await connect(gw, cert, key)
    device = Lwm2mClient(dtls, EP, {"/3/0/0": b"Open Mobile Alliance"})
    base = f"https://localhost:{gw.https_port}/lwm2m"
    curl = ["curl", "-sS", "--cacert", gw.cafile, "-u", "t1/ops:s3cret-pass"]
    try:
        assert (await device.register(lifetime=120, objects="</1/0>,</3/0>")).code == Code.CREATED
        listed = await run([*curl, f"{base}/endpoints"])
        doc = json.loads(listed.stdout)
        assert [e["endpoint"] for e in doc["endpoints"]] == [EP]
        assert doc["endpoints"][0]["objects"] == ["/1/0", "/3/0"]
        read = json.loads((await run([*curl, f"{base}/{EP}/3/0/0"])).stdout)
        assert (read["code"], read["value"]) == ("2.05", "Open Mobile Alliance")
        body = json.dumps({"value": "600"})
        wrote = await run(
            [
                *curl,
                "-X",
                "PUT",
                "-H",
                "Content-Type: application/json",
                "--data",
                body,
                f"{base}/{EP}/1/0/1",
            ]
        )
        assert json.loads(wrote.stdout)["code"] == "2.04"
        assert device.resources["/1/0/1"] == b"600"
        executed = await run([*curl, "-X", "POST", f"{base}/{EP}/3/0/4"])
        assert json.loads(executed.stdout)["success"] is True
        unknown = await run(
            [*curl, "-o", "/dev/null", "-w", "%{http_code}", f"{base}/nobody/3/0/0"]
        )
        assert unknown.stdout == "404"
        bad = await run([*curl, "-o", "/dev/null", "-w", "%{http_code}", f"{base}/{EP}/x/y"])
        assert bad.stdout == "422"
        anonymous = await run(
            [
                "curl",
                "-sS",
                "--cacert",
                gw.cafile,
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                f"{base}/endpoints",
            ]
        )
        assert anonymous.stdout == "401"
    finally:
        dtls.abort()


# load and packet-level behaviour ------------------------------------------------------------


async def test_200_concurrent_handshakes(gw: RunningGateway, pki: Pki) -> None:
    cert, key, _ = pki.device(EP)
    loop = asyncio.get_running_loop()
    started = loop.time()
    results = await asyncio.gather(
        *(connect(gw, cert, key, handshake_timeout=60) for _ in range(200)),
        return_exceptions=True,
    )
    elapsed = loop.time() - started
    clients = [c for c in results if isinstance(c, DtlsClient)]
    try:
        errors = [r for r in results if not isinstance(r, DtlsClient)]
        assert not errors, errors[:3]
        assert len({c.local_port for c in clients}) == 200
        assert dtls_stats(gw) == DtlsStats(sessions=200, handshakes=0)
        assert gw.gateway.metrics.handshakes.value("lwm2m", "accepted", "ok") == 200
        assert elapsed < 60
    finally:
        for c in clients:
            c.close()
    assert await wait_until(lambda: dtls_stats(gw).sessions == 0)


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, tuple[Any, ...]], None]) -> None:
        self.on_datagram = on_datagram

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.on_datagram(data, addr)


def client_hello(pki: Pki) -> bytes:
    """The first datagram of a real DTLS client (a ClientHello without cookie)."""
    conn = SSL.Connection(client_context(None, None, pki.dir / "server-ca.pem"), None)
    conn.set_connect_state()
    conn.set_ciphertext_mtu(1200)  # OP_NO_QUERY_MTU: without an MTU nothing is written
    with contextlib.suppress(SSL.WantReadError):
        conn.do_handshake()
    return conn.bio_read(65536)


async def cookie_hello(rg: RunningGateway, pki: Pki) -> bytes:
    """A ClientHello carrying a cookie the gateway issued to another address."""
    conn = SSL.Connection(client_context(None, None, pki.dir / "server-ca.pem"), None)
    conn.set_connect_state()
    conn.set_ciphertext_mtu(1200)
    with contextlib.suppress(SSL.WantReadError):
        conn.do_handshake()
    loop = asyncio.get_running_loop()
    replies: asyncio.Queue[bytes] = asyncio.Queue()
    sock, _ = await loop.create_datagram_endpoint(
        lambda: _Udp(lambda d, a: replies.put_nowait(d)),
        local_addr=("127.0.0.200", 0),
        remote_addr=("127.0.0.1", rg.lwm2m_port),
    )
    try:
        sock.sendto(conn.bio_read(65536))
        conn.bio_write(await asyncio.wait_for(replies.get(), 5))  # HelloVerifyRequest
        with contextlib.suppress(SSL.WantReadError):
            conn.do_handshake()
        return conn.bio_read(65536)
    finally:
        sock.close()


class _HelloVerifyCounter(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.hello_verify = 0
        self.other = 0

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if len(data) > 13 and data[0] == 22 and data[13] == 3:
            self.hello_verify += 1
        else:
            self.other += 1


async def test_spoofed_source_client_hello_flood_creates_no_state(
    gw: RunningGateway, pki: Pki
) -> None:
    # cookie-less hellos, and a hello whose (valid) cookie belongs to another address
    hellos = [client_hello(pki), await cookie_hello(gw, pki), client_hello(pki)]
    loop = asyncio.get_running_loop()
    sources: list[tuple[asyncio.DatagramTransport, _HelloVerifyCounter]] = []
    for host in range(2, 42):  # 40 source addresses on 127.0.0.0/8 ...
        for _ in range(5):  # ... with 5 source ports each
            transport, counter = await loop.create_datagram_endpoint(
                _HelloVerifyCounter,
                local_addr=(f"127.0.0.{host}", 0),
                remote_addr=("127.0.0.1", gw.lwm2m_port),
            )
            sources.append((transport, counter))
    try:
        # Each source retries and never completes the exchange. Sent in bursts
        # the kernel's socket buffer can hold (a real flood just overflows it).
        sent = 0
        for hello in hellos:
            for i in range(0, len(sources), 25):
                for transport, _counter in sources[i : i + 25]:
                    transport.sendto(hello)
                sent += len(sources[i : i + 25])
                assert await wait_until(
                    lambda sent=sent: sum(c.hello_verify for _, c in sources) == sent, timeout=10
                ), (sent, sum(c.hello_verify for _, c in sources))
        assert all(c.hello_verify == 3 and c.other == 0 for _, c in sources)
        assert dtls_stats(gw) == DtlsStats(sessions=0, handshakes=0)
        verify = gw.gateway.metrics.registry.counter(
            "mtls_gateway_dtls_hello_verify_total", "", ("listener",)
        )
        assert verify.value("lwm2m") == 600 + 1  # and one for cookie_hello's own exchange
        # a real device still gets through right after the flood
        cert, key, _ = pki.device(EP)
        device = await connect(gw, cert, key)
        device.close()
    finally:
        for transport, _counter in sources:
            transport.close()


class Relay:
    """A UDP relay between one client and the gateway that drops chosen
    datagrams coming from the gateway."""

    def __init__(self, target: tuple[str, int], drop: Callable[[bytes], bool]) -> None:
        self.target = target
        self.drop = drop
        self.dropped: list[bytes] = []
        self.forwarded: list[bytes] = []
        self._client: tuple[Any, ...] | None = None
        self._front: asyncio.DatagramTransport | None = None
        self._back: asyncio.DatagramTransport | None = None

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        front, _ = await loop.create_datagram_endpoint(
            lambda: _Udp(self._from_client), local_addr=("127.0.0.1", 0)
        )
        back, _ = await loop.create_datagram_endpoint(
            lambda: _Udp(self._from_gateway), remote_addr=self.target
        )
        self._front, self._back = front, back
        port: int = front.get_extra_info("sockname")[1]
        return port

    def _from_client(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self._client = addr
        assert self._back is not None
        self._back.sendto(data)

    def _from_gateway(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if self.drop(data):
            self.dropped.append(data)
            return
        self.forwarded.append(data)
        if self._front is not None and self._client is not None:
            self._front.sendto(data, self._client)

    def close(self) -> None:
        for t in (self._front, self._back):
            if t is not None:
                t.close()


def is_server_hello(data: bytes) -> bool:
    return len(data) > 13 and data[0] == 22 and data[3:5] == b"\0\0" and data[13] == 2


def first_server_hello_flight() -> Callable[[bytes], bool]:
    """Drop the gateway's first ServerHello flight (all its datagrams), once."""
    phase = ["before"]

    def drop(data: bytes) -> bool:
        if phase[0] == "before" and is_server_hello(data):
            phase[0] = "dropping"
        elif phase[0] == "dropping" and is_server_hello(data):
            phase[0] = "after"  # the retransmission goes through
        return phase[0] == "dropping"

    return drop


async def test_lost_server_flight_is_retransmitted_by_the_server(
    gw: RunningGateway, pki: Pki
) -> None:
    relay = Relay(("127.0.0.1", gw.lwm2m_port), first_server_hello_flight())
    port = await relay.start()
    cert, key, _ = pki.device(EP)
    try:
        # the client never retransmits: only the gateway's timer can recover
        device = await connect(
            gw, cert, key, port=port, retransmit=False, mtu=400, handshake_timeout=10
        )
        assert relay.dropped, "the relay should have dropped the first flight"
        assert sum(1 for d in relay.forwarded if is_server_hello(d)) == 1
        client = Lwm2mClient(device, EP)
        assert (await client.register(lifetime=60)).code == Code.CREATED
        device.close()
    finally:
        relay.close()


async def test_coap_client_recovers_a_lost_flight(gw: RunningGateway, pki: Pki) -> None:
    relay = Relay(("127.0.0.1", gw.lwm2m_port), first_server_hello_flight())
    port = await relay.start()
    cert, key, _ = pki.device(EP)
    try:
        r = await coap(gw, cert, key, "post", REGISTER, "</1/0>", port=port)
        assert relay.dropped
        assert registered(gw) == [EP], r.stdout + r.stderr
    finally:
        relay.close()


async def test_revocation_closes_a_live_session_within_a_second(
    gw: RunningGateway, pki: Pki
) -> None:
    cert, key, dev = pki.device(EP)
    dtls = await connect(gw, cert, key)
    device = Lwm2mClient(dtls, EP)
    assert (await device.register(lifetime=600)).code == Code.CREATED
    await operations.set_revocation_settings(gw.store, "t1", now(), "test", offline=True)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await operations.add_revocations(
        gw.store, "t1", [(f"{dev.cert.serial_number:x}", None)], now(), "test"
    )
    reason = await asyncio.wait_for(asyncio.shield(dtls.closed), 1.0)
    assert reason == "close_notify"
    assert loop.time() - started < 1.0
    assert registered(gw) == []  # a revoked device's registration is forgotten
    assert gw.gateway.metrics.sessions_closed.value("revoked") == 1
    dtls.abort()


async def test_disabling_the_device_user_closes_its_session(gw: RunningGateway, pki: Pki) -> None:
    cert, key, _ = pki.device(EP)
    dtls = await connect(gw, cert, key)
    assert (await Lwm2mClient(dtls, EP).register()).code == Code.CREATED
    await operations.set_device_enabled(gw.store, "t1", EP, False, now(), "test")
    assert await asyncio.wait_for(asyncio.shield(dtls.closed), 1.0) == "close_notify"
    with pytest.raises(DtlsHandshakeError):
        await connect(gw, cert, key, handshake_timeout=5)
    dtls.abort()


async def test_malformed_datagrams_are_dropped_and_counted(gw: RunningGateway, pki: Pki) -> None:
    loop = asyncio.get_running_loop()
    raw, _ = await loop.create_datagram_endpoint(
        lambda: _Udp(lambda d, a: None), remote_addr=("127.0.0.1", gw.lwm2m_port)
    )
    try:
        raw.sendto(b"\x00 not dtls at all")
        raw.sendto(b"\x16\xfe\xfd\x00")  # a truncated record header
        raw.sendto(b"\x17\xfe\xfd" + b"\x00" * 8 + b"\x00\x03abc")  # app data, no session
        raw.sendto(b"\x16\xfe\xfd" + b"\x00" * 8 + b"\x13\x88" + b"x" * 5000)  # too large
        assert await wait_until(
            lambda: (
                (dropped(gw, "malformed"), dropped(gw, "no_session"), dropped(gw, "oversize"))
                == (2, 1, 1)
            )
        )
    finally:
        raw.close()
    # garbage CoAP inside a good session is counted, and the session carries on
    cert, key, _ = pki.device(EP)
    dtls = await connect(gw, cert, key)
    try:
        dtls.send(b"\xff\xff garbage")
        coap_dropped = gw.gateway.metrics.registry.counter(
            "mtls_gateway_coap_dropped_total", "", ("listener", "reason")
        )
        assert await wait_until(lambda: coap_dropped.value("lwm2m", "unparsable") == 1)
        assert (await Lwm2mClient(dtls, EP).register()).code == Code.CREATED
    finally:
        dtls.close()


async def test_mtu_bounds_every_datagram(tmp_path: Path, pki: Pki) -> None:
    rg = await start_gateway(tmp_path, pki, config=lwm2m_config(pki, mtu=400))
    await operations.register_device(rg.store, "t1", EP, "manual", now(), "test")
    await rg.wait_refreshed()
    sizes: list[int] = []

    def record_size(data: bytes) -> bool:
        sizes.append(len(data))
        assert split_records(data) is not None  # whole records in every datagram
        return False

    relay = Relay(("127.0.0.1", rg.lwm2m_port), record_size)
    port = await relay.start()
    try:
        cert, key, _ = pki.device(EP)
        device = await connect(rg, cert, key, port=port, mtu=400)
        device.close()
        assert sizes and max(sizes) <= 400 and len(sizes) >= 4
    finally:
        relay.close()
        await stop_gateway(rg)


async def test_init_prints_a_working_coap_client_command(tmp_path: Path) -> None:
    data = tmp_path / "data"
    init = await run([sys.executable, "-m", "gateway", "init", "--data-dir", str(data)], 60)
    assert init.returncode == 0, init.stderr
    line = next(
        s.strip() for s in init.stdout.splitlines() if s.strip().startswith("coap-client-openssl")
    )
    assert "ep=lwm2m-0001" in line and ":5684/" in line
    base = load_config(env={}, data_dir=data)
    listeners = {
        f.name: replace(getattr(base.listeners, f.name), host="127.0.0.1", port=0)
        for f in fields(base.listeners)
    }
    cfg = replace(base, listeners=replace(base.listeners, **listeners))
    gateway = Gateway(cfg)
    await gateway.start()
    try:
        port = gateway.udp_port("lwm2m")
        cmd = shlex.split(line.replace(":5684/", f":{port}/"))
        r = await run([cmd[0], "-B", "5", *cmd[1:]], 20)
        assert gateway.lwm2m is not None
        info = gateway.lwm2m.endpoint("demo", "lwm2m-0001")
        assert info.objects == ("/1/0", "/3/0"), r.stdout + r.stderr
    finally:
        await gateway.stop()
