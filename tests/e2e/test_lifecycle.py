"""The daemon as an unattended edge service: ``mtls-gateway run`` in a subprocess
on ephemeral ports (admin listener included), driven with signals, real
mosquitto clients, ``openssl s_client`` and ``curl``.

Covers: an invalid configuration fails fast; SIGHUP serves a rotated server
certificate to new connections while an established session keeps working;
SIGTERM closes sessions cleanly (MQTT 5 DISCONNECT 0x8B, TLS close_notify)
and exits 0 within the grace period; /metrics counts what happened; /healthz
fails when the store goes away; the logs hold no key material or password.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import signal
import socket
import ssl
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.pki import Issued, load_private_key, make_server, write_private
from tests.daemon import EPHEMERAL_LISTENERS, Daemon
from tests.helpers import (
    Mosquitto,
    Pki,
    Subscriber,
    mqtt_pub,
    run,
    wait_until,
)

pytestmark = pytest.mark.slow

UPSTREAM_SECRET = "upstream-Secret-0f9c2e"  # a canary the logs must not contain

BASE_CONFIG = EPHEMERAL_LISTENERS


@pytest.fixture
async def daemons():  # type: ignore[no-untyped-def]
    started: list[Daemon] = []
    yield started
    for d in started:
        await d.close()


# The daemon runs on its default loop (uvloop when installed), as in production.
LOOP = ""


async def _start(daemons: list[Daemon], tmp: Path, extra: str = "", top: str = "") -> Daemon:
    """A daemon on ``top`` (top-level keys) + the ephemeral listeners + ``extra`` tables."""
    daemon = Daemon(
        tmp,
        LOOP + top + BASE_CONFIG + extra,
        env={"MTLS_GATEWAY_MQTT_UPSTREAM_PASSWORD": UPSTREAM_SECRET},
    )
    daemons.append(daemon)
    await daemon.start()
    return daemon


def _fingerprint_pem(pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(pem)
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


async def served_fingerprint(d: Daemon, *, sni: bool, listener: str = "mqtt") -> str:
    """SHA-256 of the certificate a new connection is served (``openssl s_client``)."""
    cert, key = d.device(2)
    name = ["-servername", "localhost"] if sni else ["-noservername"]
    r = await run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{d.ports[listener]}",
            *name,
            "-cert",
            str(cert),
            "-key",
            str(key),
        ],
        timeout=15,
        input=b"",
    )
    m = re.search(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", r.stdout, re.S)
    assert m is not None, r.stdout + r.stderr
    return _fingerprint_pem(m.group(0).encode())


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text → {'name{labels}': value} (labels as rendered)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


# -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("[listeners.mqtt]\nport = 70000\n", "listeners.mqtt.port: 70000 is not a port number"),
        ("[tls]\nserver_certificate = 'x.pem'\n", "tls.server_certificate: unknown key"),
        ("[lifecycle]\nshutdown_grace = -1.0\n", "lifecycle.shutdown_grace: must be 0 or more"),
        ("[limits]\nhandshake_timeout = 'soon'\n", "limits.handshake_timeout: expected a number"),
        ("store = 'mysql://db'\n", "store: 'mysql://db' is not a sqlite:/// or redis:// URL"),
    ],
)
async def test_invalid_config_fails_fast_with_the_key_named(
    tmp_path: Path, config: str, message: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(config)
    started = time.monotonic()
    data = tmp_path / "data"
    r = await run(
        [sys.executable, "-m", "gateway", "run", "--config", str(path), "--data-dir", str(data)],
        timeout=30,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr
    assert time.monotonic() - started < 15
    assert not data.exists()  # nothing was created before failing
    check = await run([sys.executable, "-m", "gateway", "config", "check", str(path)])
    assert check.returncode == 2
    assert message in check.stderr


async def test_sighup_serves_the_new_certificate_and_keeps_sessions(
    daemons: list[Daemon], tmp_path: Path
) -> None:
    d = await _start(daemons, tmp_path)
    old_fp = _fingerprint_pem((d.demo / "server.pem").read_bytes())
    assert await served_fingerprint(d, sni=True) == old_fp

    # an established session: proven live by receiving a retained message
    cert1, key1 = d.device(1)
    cert2, key2 = d.device(2)
    r = await mqtt_pub(
        d.ports["mqtt"], d.cafile, cert2, key2, "device-0002", "demo/rot", "before", "-r"
    )
    assert r.returncode == 0, r.stderr
    sub = await Subscriber.start(d.ports["mqtt"], d.cafile, cert1, key1, "device-0001", "demo/#")
    try:
        assert await sub.next_line() == "demo/rot before"

        # rotate: a new certificate and key from the same server CA, written over the files
        ca_key = load_private_key((d.demo / "server-ca.key").read_bytes())
        ca_cert = x509.load_pem_x509_certificate((d.demo / "server-ca.pem").read_bytes())
        new = make_server(Issued(ca_cert, ca_key), hosts=("localhost",), ips=("127.0.0.1",))
        (d.demo / "server.pem").write_bytes(new.cert_pem())
        write_private(d.demo / "server.key", new.key_pem())
        new_fp = _fingerprint_pem(new.cert_pem())
        # and settings that cannot change at runtime, next to one that can
        store = tmp_path / "elsewhere.db"
        d.config_path.write_text(
            LOOP
            + f"store = 'sqlite:///{store}'\n"
            + BASE_CONFIG.replace(
                '[listeners.mqtt_service]\nhost = "127.0.0.1"\nport = 0',
                '[listeners.mqtt_service]\nhost = "127.0.0.1"\nport = 1884',
            )
            + "[lifecycle]\nshutdown_grace = 3.0\n"
        )
        mark = len(d.lines)
        d.send(signal.SIGHUP)
        await d.wait_for_log(r"SIGHUP: server certificate reloaded", start=mark)
        restart = await d.wait_for_log(r"only after a restart", start=mark)
        assert restart.rstrip().endswith("restart: listeners.mqtt_service.port, store"), restart
        applied = await d.wait_for_log(r"SIGHUP: configuration reloaded", start=mark)
        assert "lifecycle.shutdown_grace" in applied

        assert await served_fingerprint(d, sni=True) == new_fp
        assert await served_fingerprint(d, sni=False) == new_fp
        assert await served_fingerprint(d, sni=True, listener="https") == new_fp
        status = await d.status()
        assert status["serverCertificate"]["sha256"] == new_fp  # type: ignore[index]

        # the old session still works, and new clients verify the new certificate
        r = await mqtt_pub(
            d.ports["mqtt"], d.cafile, cert2, key2, "device-0002", "demo/rot", "after"
        )
        assert r.returncode == 0, r.stderr
        assert await sub.next_line() == "demo/rot after"
        assert sub.proc.returncode is None
        assert not re.search(r"session closed .*device=device-0001", d.log), d.log

        # a broken key on disk: the reload is refused, the working certificate stays
        (d.demo / "server.key").write_text("not a key\n")
        mark = len(d.lines)
        d.send(signal.SIGHUP)
        await d.wait_for_log(r"server certificate .* not loaded", start=mark)
        assert await served_fingerprint(d, sni=False) == new_fp
    finally:
        await sub.stop()
    d.send(signal.SIGTERM)
    assert await d.wait(20) == 0, d.log


def _mqtt311_session_until_closed(port: int, cafile: str, cert: Path, key: Path) -> bytes:
    """CONNECT as an MQTT 3.1.1 client, then read until the server closes.

    Returns what was read after CONNACK; raises ``ssl.SSLEOFError`` when the
    connection ends without a TLS close_notify (an unclean close).
    """
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.load_cert_chain(str(cert), str(key))
    client_id = b"device-0003"
    variable = b"\x00\x04MQTT\x04\x02\x00\x3c"
    payload = len(client_id).to_bytes(2, "big") + client_id
    body = variable + payload
    connect = bytes([0x10, len(body)]) + body
    with (
        socket.create_connection(("127.0.0.1", port), timeout=20) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost", suppress_ragged_eofs=False) as tls,
    ):
        tls.sendall(connect)
        connack = tls.recv(4)
        assert connack == b"\x20\x02\x00\x00", connack
        rest = b""
        while chunk := tls.recv(4096):
            rest += chunk
        return rest


async def test_sigterm_disconnects_clients_and_exits_zero_within_grace(
    daemons: list[Daemon], tmp_path: Path
) -> None:
    broker = Mosquitto(tmp_path)
    broker.start()
    try:
        grace = 8.0
        d = await _start(
            daemons,
            tmp_path,
            f'[mqtt]\nbackend = "upstream"\nupstream_port = {broker.port}\n'
            f"[lifecycle]\nshutdown_grace = {grace}\n",
        )
        cert1, key1 = d.device(1)
        v5 = await Subscriber.start(
            d.ports["mqtt"], d.cafile, cert1, key1, "device-0001", "demo/#", "-d",
            version="mqttv5",
        )  # fmt: skip
        cert3, key3 = d.device(3)
        v311 = asyncio.create_task(
            asyncio.to_thread(_mqtt311_session_until_closed, d.ports["mqtt"], d.cafile, cert3, key3)
        )
        try:
            assert await wait_until(lambda: _sessions_are(d, 2), timeout=15), d.log
            started = time.monotonic()
            d.send(signal.SIGTERM)
            code = await d.wait(grace + 5)
            elapsed = time.monotonic() - started
            assert code == 0, d.log
            assert elapsed < grace, f"took {elapsed:.1f}s"
            # MQTT 5: DISCONNECT with reason 0x8B (server shutting down); the client exits
            await v5.exit(10)
            assert v5.proc.stdout is not None
            out = (await v5.proc.stdout.read()).decode() + await v5.stderr()
            assert "Received DISCONNECT (139)" in out, out
            # MQTT 3.1.1 has no server DISCONNECT: a TLS close_notify, no ragged EOF
            assert await asyncio.wait_for(v311, 10) == b""
            assert d.log.count("reason=shutdown: gateway shutting down") >= 2, d.log
        finally:
            await v5.stop()
            if not v311.done():
                await asyncio.wait_for(asyncio.gather(v311, return_exceptions=True), 30)
    finally:
        broker.stop()


async def _sessions_are(d: Daemon, n: int) -> bool:
    return await d.live_sessions() == n


async def test_metrics_health_status_and_log_hygiene(
    daemons: list[Daemon], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    d = await _start(
        daemons,
        tmp_path,
        '[logging]\nformat = "json"\n',
        top=f'store = "sqlite:///{store_dir}/gateway.db"\n',
    )
    port, ca = d.ports["mqtt"], d.cafile
    for path in ("/healthz", "/readyz"):
        code, body = await d.http(path)
        assert code == 200, (path, body)

    cert1, key1 = d.device(1)
    sub = await Subscriber.start(port, ca, cert1, key1, "device-0001", "demo/#")
    try:
        assert await wait_until(lambda: _sessions_are(d, 1), timeout=15), d.log
        for n in (2, 3):  # two accepted devices that publish and leave
            cert, key = d.device(n)
            r = await mqtt_pub(port, ca, cert, key, f"device-000{n}", "demo/m", "x")
            assert r.returncode == 0, r.stderr
        rogue = Pki.create(tmp_path / "rogue", name="Rogue")
        rcert, rkey, _ = rogue.device("device-0009")
        assert (await mqtt_pub(port, ca, rcert, rkey, "device-0009", "demo/m", "x")).returncode
        cert2, key2 = d.device(2)
        assert (await mqtt_pub(port, ca, cert2, key2, "not-the-cn", "demo/m", "x")).returncode
        assert (await mqtt_pub(port, ca, None, None, "anonymous", "demo/m", "x")).returncode

        expected = {
            'mtls_gateway_handshakes_total{listener="mqtt",result="accepted",reason="ok"}': 4,
            'mtls_gateway_handshakes_total{listener="mqtt",result="rejected",'
            'reason="untrusted"}': 1,
            'mtls_gateway_handshakes_total{listener="mqtt",result="rejected",'
            'reason="no_certificate"}': 1,
            'mtls_gateway_mqtt_connect_refused_total{listener="mqtt",'
            'reason="client_id_mismatch"}': 1,
            'mtls_gateway_registrations_total{tenant="demo",via="auto"}': 3,
            'mtls_gateway_live_sessions{listener="mqtt",tenant="demo"}': 1,
            "mtls_gateway_store_up": 1,
            "mtls_gateway_ready": 1,
        }

        async def metrics() -> dict[str, float]:
            code, body = await d.http("/metrics")
            assert code == 200
            return parse_metrics(body)

        async def counted() -> bool:
            m = await metrics()
            return all(m.get(k) == v for k, v in expected.items())

        # the rejected clients may exit before the gateway has counted them
        await wait_until(counted, timeout=10)
        m = await metrics()
        assert {k: m.get(k) for k in expected} == expected, d.log
        handshakes = {k: v for k, v in m.items() if k.startswith("mtls_gateway_handshakes_total")}
        assert sum(handshakes.values()) == 6, handshakes  # nothing counted twice
        assert any(k.startswith("mtls_gateway_build_info{") for k in m)

        # one log line per connection decision, with the reason code
        assert len(re.findall(r"handshake failed listener=mqtt .*reason=untrusted", d.log)) == 1
        refused = re.findall(r"mqtt connection refused listener=mqtt .*", d.log)
        assert len([x for x in refused if "reason=client_id_mismatch" in x]) == 1
        assert any("tenant=demo device=device-0002" in x for x in refused), refused
        for line in d.lines:  # json logging: every line is one object
            if line.startswith("{"):
                json.loads(line)

        status = await d.cli("status", "--admin", d.admin_url)
        assert status.returncode == 0, status.stdout + status.stderr
        assert "live sessions: 1" in status.stdout
        assert re.search(rf"mqtt\s+mqtt\s+127\.0\.0\.1:{port}\b", status.stdout), status.stdout
        monkeypatch.setenv("MTLS_GATEWAY_MQTT_UPSTREAM_PASSWORD", UPSTREAM_SECRET)
        shown = await d.cli("config", "show", "--config", str(d.config_path), "--json")
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["mqtt"]["upstream_password"] == "********"
        assert UPSTREAM_SECRET not in shown.stdout

        # the store goes away: /healthz fails, status says so, /readyz is unaffected
        store_dir.rename(tmp_path / "store.moved")
        code, body = await d.http("/healthz")
        assert code == 503, body
        assert "store" in json.loads(body)
        assert parse_metrics((await d.http("/metrics"))[1])["mtls_gateway_store_up"] == 0
        down = await d.cli("status", "--admin", d.admin_url)
        assert down.returncode == 1
        assert "UNAVAILABLE" in down.stdout
        (tmp_path / "store.moved").rename(store_dir)
        assert (await d.http("/healthz"))[0] == 200
    finally:
        await sub.stop()
    d.send(signal.SIGTERM)
    assert await d.wait(20) == 0, d.log
    _assert_no_secrets(d.log, [(d.demo / "admin-password").read_text().strip(), UPSTREAM_SECRET])


def _assert_no_secrets(log: str, secrets: Sequence[str]) -> None:
    assert "PRIVATE KEY" not in log
    assert "BEGIN CERTIFICATE" not in log
    for secret in secrets:
        assert secret and secret not in log
