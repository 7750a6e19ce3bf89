"""TLS from the gateway to the upstream broker (``mqtt.upstream_tls``): a real
mosquitto with a TLS listener that requires the gateway's client certificate,
devices publishing through the gateway with ``mosquitto_pub``, and a backend
application reading the broker's plain listener with ``mosquitto_sub``."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.config import ConfigError, MqttConfig, load_config
from gateway.pki import make_device, pem_chain, write_private
from protocols.mqtt.backends import BackendUnavailable
from tests.helpers import Mosquitto, Pki, free_port, mqtt_pub, start_gateway, stop_gateway

pytestmark = pytest.mark.slow


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.create(tmp_path / "pki")


def tls_broker(tmp: Path, pki: Pki) -> tuple[Mosquitto, int]:
    """mosquitto: plain listener (backend apps) + TLS listener requiring a client
    certificate issued by the test server CA (the gateway's)."""
    tls_port = free_port()
    broker = Mosquitto(
        tmp,
        f"listener {tls_port} 127.0.0.1\n"
        f"cafile {pki.dir / 'server-ca.pem'}\n"
        f"certfile {pki.dir / 'server.pem'}\n"
        f"keyfile {pki.dir / 'server.key'}\n"
        "require_certificate true\n"
        # the key is 0600: do not drop to the mosquitto user when run as root
        "user root\n",
    )
    return broker, tls_port


def upstream_config(pki: Pki, tls_port: int, **mqtt: object) -> object:
    client = make_device("gateway-upstream", pki.server_ca)
    (pki.dir / "gw-upstream.pem").write_bytes(pem_chain(client))
    write_private(pki.dir / "gw-upstream.key", client.key_pem())
    base = load_config(env={})
    settings: dict[str, object] = {
        "backend": "upstream",
        "upstream_port": tls_port,
        "upstream_tls": True,
        "upstream_ca_file": str(pki.dir / "server-ca.pem"),
        "upstream_cert_file": str(pki.dir / "gw-upstream.pem"),
        "upstream_key_file": str(pki.dir / "gw-upstream.key"),
        **mqtt,
    }
    return replace(base, mqtt=replace(base.mqtt, **settings))  # type: ignore[arg-type]


async def test_devices_reach_a_backend_app_through_tls_upstream(tmp_path: Path, pki: Pki) -> None:
    broker, tls_port = tls_broker(tmp_path, pki)
    broker.start()
    rg = None
    sub = None
    try:
        cfg = upstream_config(pki, tls_port)
        rg = await start_gateway(
            tmp_path,
            pki,
            mqtt_backend="upstream",
            upstream_port=tls_port,
            config=cfg,  # type: ignore[arg-type]
        )
        sub = await asyncio.create_subprocess_exec(
            "mosquitto_sub",
            "-h",
            "127.0.0.1",
            "-p",
            str(broker.port),
            "-t",
            "t1/#",
            "-v",
            "-C",
            "2",
            "-W",
            "15",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        cert, key, _ = pki.device("dev-up")
        got = b""
        for version in ("mqttv311", "mqttv5"):
            for _ in range(30):  # until the backend app's subscription is in place
                r = await mqtt_pub(
                    rg.mqtt_port,
                    rg.cafile,
                    cert,
                    key,
                    "dev-up",
                    f"tele/{version}",
                    "42",
                    version=version,
                )
                assert r.returncode == 0, r.stderr
                assert sub.stdout is not None
                try:
                    got += await asyncio.wait_for(sub.stdout.readline(), 0.3)
                    break
                except TimeoutError:
                    continue
        await asyncio.wait_for(sub.wait(), 10)
        lines = got.decode().split("\n")
        assert lines[0].startswith("t1/tele/mqttv311 42")
        assert lines[1].startswith("t1/tele/mqttv5 42")
        assert rg.gateway.backend is not None
    finally:
        if sub is not None and sub.returncode is None:
            sub.kill()
        if rg is not None:
            await stop_gateway(rg)
        broker.stop()


async def test_an_upstream_with_an_unknown_certificate_is_refused(tmp_path: Path, pki: Pki) -> None:
    broker, tls_port = tls_broker(tmp_path, pki)
    broker.start()
    try:
        # the broker's certificate is checked against the device root: not its issuer
        cfg = upstream_config(pki, tls_port, upstream_ca_file=str(pki.dir / "root.pem"))
        with pytest.raises(BackendUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            await start_gateway(
                tmp_path,
                pki,
                mqtt_backend="upstream",
                upstream_port=tls_port,
                config=cfg,  # type: ignore[arg-type]
            )
        # and a name the certificate does not carry
        (tmp_path / "b").mkdir()
        cfg = upstream_config(pki, tls_port, upstream_server_name="broker.example")
        with pytest.raises(BackendUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            await start_gateway(
                tmp_path / "b",
                pki,
                mqtt_backend="upstream",
                upstream_port=tls_port,
                config=cfg,  # type: ignore[arg-type]
            )
    finally:
        broker.stop()


def test_upstream_tls_settings_are_checked(tmp_path: Path) -> None:
    cfg = tmp_path / "gateway.toml"
    cfg.write_text('[mqtt]\nupstream_tls = true\nupstream_cert_file = "a.pem"\n')
    with pytest.raises(ConfigError, match="go together"):
        load_config(cfg, env={})
    cfg.write_text('[mqtt]\nupstream_ca_file = "ca.pem"\n')
    with pytest.raises(ConfigError, match="upstream_tls = false"):
        load_config(cfg, env={})
    cfg.write_text('[mqtt]\nbackend = "upstream"\nupstream_tls = true\n')
    assert load_config(cfg, env={}).mqtt.upstream_tls is True
    assert MqttConfig().upstream_tls is False
