"""End-to-end: the real gateway on ephemeral ports, real mosquitto clients.

Each test starts an in-process gateway (real TLS sockets, real SQLite store)
and drives it with ``mosquitto_pub`` / ``mosquitto_sub`` using certificates.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway import operations
from gateway.store.base import NotFound
from tests.helpers import (
    Mosquitto,
    Pki,
    RunningGateway,
    Subscriber,
    mqtt_pub,
    run,
    start_gateway,
    stop_gateway,
    wait_until,
)
from trust.model import PendingRegistration, Status

pytestmark = pytest.mark.slow


def now() -> datetime:
    # not a module constant: a long run must not leave it minutes behind fresh certificates
    return datetime.now(UTC)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.create(tmp_path / "pki")


@pytest.fixture
async def gw(tmp_path: Path, pki: Pki):  # type: ignore[no-untyped-def]
    rg = await start_gateway(tmp_path, pki, tenants=("t1", "t2"))
    yield rg
    await stop_gateway(rg)


def refused(result) -> bool:  # type: ignore[no-untyped-def]
    return result.returncode != 0


async def device_exists(rg: RunningGateway, tenant: str, device: str) -> bool:
    try:
        await rg.store.get_device(tenant, device)
        return True
    except NotFound:
        return False


async def test_publish_subscribe_and_first_connect_registration(
    gw: RunningGateway, pki: Pki
) -> None:
    cert1, key1, _ = pki.device("device-0001")
    cert2, key2, _ = pki.device("device-0002")
    assert not await device_exists(gw, "t1", "device-0001")
    sub = await Subscriber.start(gw.mqtt_port, gw.cafile, cert1, key1, "device-0001", "sensors/#")
    try:
        assert await wait_until(lambda: device_exists(gw, "t1", "device-0001"))
        await asyncio.sleep(0.3)  # let SUBACK settle at the broker
        r = await mqtt_pub(
            gw.mqtt_port, gw.cafile, cert2, key2, "device-0002", "sensors/temp", "21.5"
        )
        assert r.returncode == 0, r.stderr
        assert await sub.next_line() == "sensors/temp 21.5"
    finally:
        await sub.stop()
    user = await gw.store.get_device("t1", "device-0001")
    assert user.enabled and user.registered_via == "auto"
    provisioned = await gw.store.list_provisioned_certificates("t1", "device-0001")
    assert len(provisioned) == 1
    records, _ = await gw.store.list_audit(
        __import__("gateway.store.base", fromlist=["AuditQuery"]).AuditQuery(tenant="t1"),
        __import__("gateway.store.base", fromlist=["Page"]).Page(100, 1),
    )
    assert any("device_device-0001" in r.text for r in records)


async def test_wrong_client_id_is_not_authorized(gw: RunningGateway, pki: Pki) -> None:
    cert, key, _ = pki.device("dev-a")
    r = await mqtt_pub(gw.mqtt_port, gw.cafile, cert, key, "someone-else", "x", "1")
    assert refused(r)
    assert "not authori" in r.stderr.lower()
    r5 = await mqtt_pub(
        gw.mqtt_port, gw.cafile, cert, key, "someone-else", "x", "1", version="mqttv5"
    )
    assert refused(r5)
    assert "not authori" in r5.stderr.lower()
    assert not await device_exists(gw, "t1", "dev-a")


async def test_no_client_certificate_is_refused(gw: RunningGateway) -> None:
    r = await mqtt_pub(gw.mqtt_port, gw.cafile, None, None, "dev", "x", "1")
    assert refused(r)


async def test_untrusted_ca_is_refused(gw: RunningGateway, pki: Pki, tmp_path: Path) -> None:
    other = Pki.create(tmp_path / "other", name="Other")
    cert, key, _ = other.device("intruder")
    r = await mqtt_pub(gw.mqtt_port, gw.cafile, cert, key, "intruder", "x", "1")
    assert refused(r)
    assert not await device_exists(gw, "t1", "intruder")


async def test_expired_device_certificate_is_refused(gw: RunningGateway, pki: Pki) -> None:
    cert, key, _ = pki.device(
        "old", not_before=now() - timedelta(days=30), not_after=now() - timedelta(days=1)
    )
    r = await mqtt_pub(gw.mqtt_port, gw.cafile, cert, key, "old", "x", "1")
    assert refused(r)
    assert not await device_exists(gw, "t1", "old")


async def test_revoked_device_and_revoked_intermediate(gw: RunningGateway, pki: Pki) -> None:
    cert, key, dev = pki.device("rev-dev")
    await operations.set_revocation_settings(gw.store, "t1", now(), "test", offline=True)
    await operations.add_revocations(
        gw.store, "t1", [(f"{dev.cert.serial_number:x}", None)], now(), "test"
    )
    await gw.wait_refreshed()
    r = await mqtt_pub(gw.mqtt_port, gw.cafile, cert, key, "rev-dev", "x", "1")
    assert refused(r) and "not authori" in r.stderr.lower()

    cert2, key2, _ = pki.device("fine-dev")
    r = await mqtt_pub(gw.mqtt_port, gw.cafile, cert2, key2, "fine-dev", "x", "1")
    assert r.returncode == 0, r.stderr
    await operations.add_revocations(
        gw.store, "t1", [(f"{pki.inter.cert.serial_number:x}", None)], now(), "test"
    )
    await gw.wait_refreshed()
    r = await mqtt_pub(gw.mqtt_port, gw.cafile, cert2, key2, "fine-dev", "x", "1")
    assert refused(r)


async def test_disabled_anchor_refuses(gw: RunningGateway, pki: Pki) -> None:
    cert, key, _ = pki.device("dev-dis")
    fp = (await gw.store.list_trusted_certificates("t1"))[0].fingerprint
    await operations.update_trusted_certificate(
        gw.store, "t1", fp, now(), "test", status=Status.DISABLED
    )
    await gw.wait_refreshed()
    r = await mqtt_pub(gw.mqtt_port, gw.cafile, cert, key, "dev-dis", "x", "1")
    assert refused(r)
    await operations.update_trusted_certificate(
        gw.store, "t1", fp, now(), "test", status=Status.ENABLED
    )
    await gw.wait_refreshed()
    r = await mqtt_pub(gw.mqtt_port, gw.cafile, cert, key, "dev-dis", "x", "1")
    assert r.returncode == 0, r.stderr


async def test_auto_registration_off_requires_bulk_registration(tmp_path: Path, pki: Pki) -> None:
    rg = await start_gateway(tmp_path, pki, auto_registration=False)
    try:
        cert, key, _ = pki.device("unreg")
        r = await mqtt_pub(rg.mqtt_port, rg.cafile, cert, key, "unreg", "x", "1")
        assert refused(r) and "not authori" in r.stderr.lower()
        assert not await device_exists(rg, "t1", "unreg")

        cert2, key2, _ = pki.device("bulk-dev")
        await rg.store.add_pending_registration(
            PendingRegistration("t1", "bulk-dev", created=now())
        )
        await rg.wait_refreshed()
        r = await mqtt_pub(rg.mqtt_port, rg.cafile, cert2, key2, "bulk-dev", "x", "1")
        assert r.returncode == 0, r.stderr
        user = await rg.store.get_device("t1", "bulk-dev")
        assert user.registered_via == "bulk"
    finally:
        await stop_gateway(rg)


async def test_service_port_requires_tenant_username_and_registers_nobody(
    gw: RunningGateway, pki: Pki
) -> None:
    cert, key, _ = pki.device("svc-dev")
    ok = await mqtt_pub(gw.service_port, gw.cafile, cert, key, "any-client", "x", "1", "-u", "t1")
    assert ok.returncode == 0, ok.stderr
    bad = await mqtt_pub(gw.service_port, gw.cafile, cert, key, "any-client", "x", "1", "-u", "t2")
    assert refused(bad) and "not authori" in bad.stderr.lower()
    none = await mqtt_pub(gw.service_port, gw.cafile, cert, key, "any-client", "x", "1")
    assert refused(none)
    assert not await device_exists(gw, "t1", "svc-dev")


async def test_cross_tenant_isolation(tmp_path: Path, pki: Pki) -> None:
    rg = await start_gateway(tmp_path, pki, tenants=("t1", "t2"))
    try:
        other = Pki.create(tmp_path / "t2pki", name="Tenant2")
        await operations.add_trusted_certificate(
            rg.store,
            "t2",
            other.root.cert_pem().decode(),
            "t2 root",
            Status.ENABLED,
            True,
            now(),
            "test",
        )
        await rg.wait_refreshed()
        a_cert, a_key, _ = pki.device("alice")
        b_cert, b_key, _ = other.device("bob")
        b2_cert, b2_key, _ = other.device("bob2")
        sub_a = await Subscriber.start(rg.mqtt_port, rg.cafile, a_cert, a_key, "alice", "#")
        sub_b = await Subscriber.start(rg.mqtt_port, rg.cafile, b_cert, b_key, "bob", "#")
        try:
            assert await wait_until(lambda: device_exists(rg, "t2", "bob"))
            assert await wait_until(lambda: device_exists(rg, "t1", "alice"))
            await asyncio.sleep(0.3)
            r = await mqtt_pub(
                rg.mqtt_port, rg.cafile, b2_cert, b2_key, "bob2", "shared/topic", "from-t2"
            )
            assert r.returncode == 0, r.stderr
            assert await sub_b.next_line() == "shared/topic from-t2"
            with pytest.raises(TimeoutError):
                await sub_a.next_line(timeout=1.0)
            # system topics are not reachable from a device
            r = await mqtt_pub(rg.mqtt_port, rg.cafile, b2_cert, b2_key, "bob2", "$SYS/x", "nope")
            with pytest.raises(TimeoutError):
                await sub_a.next_line(timeout=0.5)
        finally:
            await sub_a.stop()
            await sub_b.stop()
    finally:
        await stop_gateway(rg)


async def _live_session_closed_by(gw: RunningGateway, pki: Pki, cn: str, action) -> float:  # type: ignore[no-untyped-def]
    cert, key, dev = pki.device(cn)
    sub = await Subscriber.start(gw.mqtt_port, gw.cafile, cert, key, cn, "t/#")
    try:
        assert await wait_until(
            lambda: len(gw.gateway.registry) >= 1 and device_exists(gw, "t1", cn)
        )
        await asyncio.sleep(0.2)
        loop = asyncio.get_running_loop()
        start = loop.time()
        await action(dev)
        # the gateway's own poll of the change feed notices; no explicit refresh here
        assert await wait_until(lambda: len(gw.gateway.registry) == 0, timeout=3, interval=0.01)
        elapsed = loop.time() - start
        await sub.exit(timeout=5)  # the real client sees the close
        print(f"client exit after {loop.time() - start:.2f}s")
        return elapsed
    finally:
        await sub.stop()


async def test_live_session_closed_after_revocation(gw: RunningGateway, pki: Pki) -> None:
    await operations.set_revocation_settings(gw.store, "t1", now(), "test", offline=True)

    async def revoke(dev) -> None:  # type: ignore[no-untyped-def]
        await operations.add_revocations(
            gw.store, "t1", [(f"{dev.cert.serial_number:x}", None)], now(), "test"
        )

    elapsed = await _live_session_closed_by(gw, pki, "live-rev", revoke)
    assert elapsed < 1.0


async def test_live_session_closed_after_device_disabled(gw: RunningGateway, pki: Pki) -> None:
    async def disable(dev) -> None:  # type: ignore[no-untyped-def]
        await operations.set_device_enabled(gw.store, "t1", "live-dis", False, now(), "test")

    elapsed = await _live_session_closed_by(gw, pki, "live-dis", disable)
    assert elapsed < 1.0
    cert, key, _ = pki.device("live-dis")
    r = await mqtt_pub(gw.mqtt_port, gw.cafile, cert, key, "live-dis", "x", "1")
    assert refused(r)


async def test_anchor_added_by_cli_while_running(tmp_path: Path, pki: Pki) -> None:
    rg = await start_gateway(tmp_path, pki, tenants=("t1",), upload_root=False)
    try:
        cert, key, _ = pki.device("late")
        r = await mqtt_pub(rg.mqtt_port, rg.cafile, cert, key, "late", "x", "1")
        assert refused(r)
        res = await run(
            [
                sys.executable,
                "-m",
                "gateway",
                "anchors",
                "add",
                str(pki.dir / "root.pem"),
                "--tenant",
                "t1",
                "--data-dir",
                str(tmp_path),
                "--store",
                rg.config.store_url,
            ],
            timeout=30,
        )
        assert res.returncode == 0, res.stderr

        # no explicit refresh: the running gateway follows the change feed by itself
        async def accepted() -> bool:
            return (
                await mqtt_pub(rg.mqtt_port, rg.cafile, cert, key, "late", "x", "1")
            ).returncode == 0

        assert await wait_until(accepted, timeout=3, interval=0.2)
    finally:
        await stop_gateway(rg)


@pytest.mark.parametrize("backend", ["embedded", "upstream"])
async def test_qos_retained_and_will(tmp_path: Path, pki: Pki, backend: str) -> None:
    broker = None
    kwargs = {}
    if backend == "upstream":
        broker = Mosquitto(tmp_path)
        broker.start()
        kwargs = {"mqtt_backend": "upstream", "upstream_port": broker.port}
    rg = await start_gateway(tmp_path, pki, **kwargs)  # type: ignore[arg-type]
    versions = ["mqttv311"] + (["mqttv5"] if backend == "upstream" else [])
    try:
        for version in versions:
            s_cert, s_key, _ = pki.device(f"sub-{version}")
            p_cert, p_key, _ = pki.device(f"pub-{version}")
            # retained message first, then a late subscriber receives it
            r = await mqtt_pub(
                rg.mqtt_port,
                rg.cafile,
                p_cert,
                p_key,
                f"pub-{version}",
                f"r/{version}",
                "kept",
                "-r",
                "-q",
                "1",
                version=version,
            )
            assert r.returncode == 0, r.stderr
            sub = await Subscriber.start(
                rg.mqtt_port,
                rg.cafile,
                s_cert,
                s_key,
                f"sub-{version}",
                f"r/{version}",
                "-t",
                "q/#",
                "-t",
                "status/#",
                "-q",
                "2",
                version=version,
            )
            try:
                assert await sub.next_line() == f"r/{version} kept"
                for qos in ("0", "1", "2"):
                    r = await mqtt_pub(
                        rg.mqtt_port,
                        rg.cafile,
                        p_cert,
                        p_key,
                        f"pub-{version}",
                        f"q/{qos}",
                        f"m{qos}",
                        "-q",
                        qos,
                        version=version,
                    )
                    assert r.returncode == 0, r.stderr
                    assert await sub.next_line() == f"q/{qos} m{qos}"
                # last will: a client killed without DISCONNECT
                w_cert, w_key, _ = pki.device(f"will-{version}")
                will_client = await Subscriber.start(
                    rg.mqtt_port,
                    rg.cafile,
                    w_cert,
                    w_key,
                    f"will-{version}",
                    "nothing",
                    "--will-topic",
                    "status/will",
                    "--will-payload",
                    "gone",
                    "-k",
                    "5",
                    version=version,
                )
                will_id = f"will-{version}"
                assert await wait_until(lambda w=will_id: device_exists(rg, "t1", w))
                await asyncio.sleep(0.3)
                will_client.proc.kill()
                await will_client.proc.wait()
                assert await sub.next_line(timeout=10) == "status/will gone"
            finally:
                await sub.stop()
    finally:
        await stop_gateway(rg)
        if broker is not None:
            broker.stop()


async def test_connection_flood_is_refused_cleanly(tmp_path: Path, pki: Pki) -> None:
    from dataclasses import replace

    from gateway.config import load_config

    base = load_config(env={})
    cfg = replace(base, limits=replace(base.limits, max_connections=3))
    rg = await start_gateway(tmp_path, pki, config=cfg)
    try:
        cert, key, _ = pki.device("keeper")
        sub = await Subscriber.start(rg.mqtt_port, rg.cafile, cert, key, "keeper", "k/#")
        try:
            assert await wait_until(lambda: len(rg.gateway.registry) == 1)
            # flood: many raw TCP connections that never handshake
            socks = []
            for _ in range(20):
                with contextlib.suppress(OSError):
                    socks.append(
                        await asyncio.wait_for(
                            asyncio.open_connection("127.0.0.1", rg.mqtt_port), 2
                        )
                    )
            await asyncio.sleep(0.3)
            assert rg.gateway.metrics.refused.value("mqtt", "max_connections") >= 10
            for _, w in socks:
                w.close()
            await asyncio.sleep(0.3)
            # the existing session still works
            p_cert, p_key, _ = pki.device("pusher")
            r = await mqtt_pub(rg.mqtt_port, rg.cafile, p_cert, p_key, "pusher", "k/1", "alive")
            assert r.returncode == 0, r.stderr
            assert await sub.next_line() == "k/1 alive"
        finally:
            await sub.stop()
    finally:
        await stop_gateway(rg)


@pytest.mark.parametrize("version", ["3.1.1", "5"])
async def test_paho_client_over_8883(tmp_path: Path, pki: Pki, version: str) -> None:
    """A second real client library (paho-mqtt), MQTT 3.1.1 and 5.0 (upstream broker)."""
    import ssl

    import paho.mqtt.client as paho

    broker = Mosquitto(tmp_path)
    broker.start()
    rg = await start_gateway(tmp_path, pki, mqtt_backend="upstream", upstream_port=broker.port)
    try:
        cert, key, _ = pki.device("paho-dev")
        protocol = paho.MQTTv5 if version == "5" else paho.MQTTv311
        loop = asyncio.get_running_loop()
        got: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        connected: asyncio.Future[object] = loop.create_future()

        def on_connect(client, userdata, flags, reason, properties=None):  # type: ignore[no-untyped-def]
            loop.call_soon_threadsafe(lambda: connected.done() or connected.set_result(reason))

        def on_message(client, userdata, msg):  # type: ignore[no-untyped-def]
            loop.call_soon_threadsafe(got.put_nowait, (msg.topic, msg.payload))

        client = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id="paho-dev", protocol=protocol
        )
        client.tls_set(ca_certs=rg.cafile, certfile=str(cert), keyfile=str(key))
        client.tls_insecure_set(False)
        client.on_connect = on_connect
        client.on_message = on_message
        # paho handshakes synchronously: off the loop that serves the gateway
        await asyncio.to_thread(client.connect, "localhost", rg.mqtt_port, 30)
        client.loop_start()
        try:
            reason = await asyncio.wait_for(connected, 10)
            assert str(reason) == "Success"
            client.subscribe("paho/#", qos=1)
            await asyncio.sleep(0.3)
            client.publish("paho/t", b"hello", qos=1).wait_for_publish(5)
            assert await asyncio.wait_for(got.get(), 10) == ("paho/t", b"hello")
        finally:
            client.loop_stop()
            client.disconnect()
        # the same certificate with another ClientId is refused
        bad = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="other", protocol=protocol)
        bad.tls_set(
            ca_certs=rg.cafile, certfile=str(cert), keyfile=str(key), cert_reqs=ssl.CERT_REQUIRED
        )
        refused: asyncio.Future[object] = loop.create_future()
        bad.on_connect = lambda c, u, f, reason, p=None: loop.call_soon_threadsafe(
            lambda: refused.done() or refused.set_result(reason)
        )
        await asyncio.to_thread(bad.connect, "localhost", rg.mqtt_port, 30)
        bad.loop_start()
        try:
            reason = await asyncio.wait_for(refused, 10)
            assert "not authori" in str(reason).lower()
        finally:
            bad.loop_stop()
            bad.disconnect()
    finally:
        await stop_gateway(rg)
        broker.stop()
