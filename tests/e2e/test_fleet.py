"""``mtls-gateway fleet pki|register|run`` against the daemon in a subprocess:
what the fleet tool reports must match what the gateway recorded (device users,
provisioned certificates, rejected handshakes)."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.store.sqlite import SqliteStore
from tests.daemon import EPHEMERAL_LISTENERS, Daemon
from tests.helpers import run

pytestmark = pytest.mark.slow

TENANT = "acme"
DEVICES = 50
BAD = 5  # --bad-ratio 0.1

# The shipped event loop (uvloop when installed): paced arrivals once exposed a
# ClientHello race in the acceptor, so this test keeps that path covered.
CONFIG = (
    EPHEMERAL_LISTENERS
    + """
[tls]
server_cert = "{fleet}/server.pem"
server_key = "{fleet}/server.key"
[limits]
handshake_rate = 100000.0
handshake_burst = 100000
"""
)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "gateway", *args]


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[tuple[Path, Path, Daemon]]:
    fleet_dir, data = tmp_path / "fleet", tmp_path / "data"
    pki = await run(
        cli(
            "fleet",
            "pki",
            "--devices",
            str(DEVICES),
            "--bad-ratio",
            "0.1",
            "--intermediate",
            "--out",
            str(fleet_dir),
            "--json",
        ),
        timeout=60,
    )
    assert pki.returncode == 0, pki.stderr
    assert json.loads(pki.stdout)["bad"] == BAD
    reg = await run(
        cli(
            "fleet",
            "register",
            "--dir",
            str(fleet_dir),
            "--tenant",
            TENANT,
            "--data-dir",
            str(data),
            "--json",
        ),
        timeout=60,
    )
    assert reg.returncode == 0, reg.stderr
    assert json.loads(reg.stdout)["caUploaded"] is True
    daemon = Daemon(tmp_path, CONFIG.format(fleet=fleet_dir), data=data, args=["--no-demo"])
    try:
        await daemon.start()
        yield fleet_dir, data, daemon
    finally:
        await daemon.stop()
        await daemon.close()


async def fleet_run(fleet_dir: Path, protocol: str, port: int, pid: int) -> dict[str, Any]:
    result = await run(
        cli(
            "fleet",
            "run",
            "--dir",
            str(fleet_dir),
            "--protocol",
            protocol,
            "--port",
            str(port),
            "--devices",
            str(DEVICES),
            "--rate",
            "100",
            "--duration",
            "3",
            "--json",
            "--gateway-pid",
            str(pid),
        ),
        timeout=60,
    )
    assert result.stdout, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    assert result.returncode == (0 if report["ok"] else 1), result.stderr
    return report


def check_report(report: dict[str, Any]) -> None:
    good = DEVICES - BAD
    assert report["connects"]["attempts"] == DEVICES
    assert report["connects"]["succeeded"] == good
    assert report["badDevices"] == {
        "expectedRejected": BAD,
        "rejected": BAD,
        "unexpectedAccepts": 0,
    }
    assert report["goodDevicesFailed"] == 0
    assert report["ok"] is True
    assert report["latencyMs"]["tls"]["count"] == good
    assert report["latencyMs"]["connack"]["p50"] > 0
    assert report["messages"]["sent"] > 0
    assert report["gateway"]["rssStartKb"] > 0


async def test_fleet_counts_match_the_gateway(fleet: tuple[Path, Path, Daemon]) -> None:
    fleet_dir, data, daemon = fleet
    manifest = json.loads((fleet_dir / "manifest.json").read_text())
    good = {d["id"]: d for d in manifest["devices"] if not d["bad"]}
    bad = {d["id"] for d in manifest["devices"] if d["bad"]}
    assert len(good) == DEVICES - BAD and len(bad) == BAD
    assert daemon.proc is not None
    pid = daemon.proc.pid

    # core listener: first-connect registration of exactly the good devices
    report = await fleet_run(fleet_dir, "mqtt", daemon.ports["mqtt"], pid)
    check_report(report)
    untrusted = r"handshake failed listener=mqtt peer=\S+ reason=untrusted"
    assert await daemon.wait_count(untrusted, BAD) == BAD
    opened = r"mqtt session open listener=mqtt tenant=acme "
    assert await daemon.wait_count(opened, len(good)) == len(good)
    assert daemon.count(r"handshake failed listener=mqtt ") == BAD

    store = SqliteStore(data / "gateway.db")
    await store.open()
    try:
        users = {u.device_id: u for u in await store.list_devices(TENANT)}
        assert set(users) == set(good)
        assert {u.registered_via for u in users.values()} == {"auto"}
        for device_id, row in good.items():
            provisioned = await store.list_provisioned_certificates(TENANT, device_id)
            assert [format(p.serial, "x") for p in provisioned] == [row["serial"]]
            assert provisioned[0].fingerprint == row["fingerprint"]
        for device_id in bad:
            assert await store.list_provisioned_certificates(TENANT, device_id) == []
    finally:
        await store.close()

    # service listener: username = tenant (taken from fleet register's record)
    report = await fleet_run(fleet_dir, "mqtt-service", daemon.ports["mqtt_service"], pid)
    check_report(report)
    assert report["settings"]["tenant"] == TENANT
    untrusted = r"handshake failed listener=mqtt-service peer=\S+ reason=untrusted"
    assert await daemon.wait_count(untrusted, BAD) == BAD
    opened = r"mqtt session open listener=mqtt-service tenant=acme "
    assert await daemon.wait_count(opened, len(good)) == len(good)
