"""``mtls-gateway fleet pki|register|run`` against the daemon in a subprocess:
what the fleet tool reports must match what the gateway recorded (device users,
provisioned certificates, rejected handshakes)."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.store.sqlite import SqliteStore
from tests.helpers import run

pytestmark = pytest.mark.slow

TENANT = "acme"
DEVICES = 50
BAD = 5  # --bad-ratio 0.1

# The shipped event loop (uvloop when installed): paced arrivals once exposed a
# ClientHello race in the acceptor, so this test keeps that path covered.
CONFIG = """
[listeners.mqtt]
host = "127.0.0.1"
port = 0
[listeners.mqtt_service]
host = "127.0.0.1"
port = 0
[listeners.https]
host = "127.0.0.1"
port = 0
[listeners.lwm2m]
host = "127.0.0.1"
port = 0
[listeners.admin]
host = "127.0.0.1"
port = 0
[tls]
server_cert = "{fleet}/server.pem"
server_key = "{fleet}/server.key"
[limits]
handshake_rate = 100000.0
handshake_burst = 100000
"""


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "gateway", *args]


@dataclass
class Daemon:
    proc: asyncio.subprocess.Process
    ports: dict[str, int] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    def count(self, pattern: str) -> int:
        rx = re.compile(pattern)
        return sum(1 for line in self.lines if rx.search(line))

    async def wait_count(self, pattern: str, expected: int, timeout: float = 10.0) -> int:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while self.count(pattern) < expected and loop.time() < end:
            await asyncio.sleep(0.05)
        return self.count(pattern)


async def _drain(daemon: Daemon, ready: asyncio.Future[None]) -> None:
    assert daemon.proc.stdout is not None
    while True:
        raw = await daemon.proc.stdout.readline()
        if not raw:
            if not ready.done():
                ready.set_exception(AssertionError("daemon exited:\n" + "".join(daemon.lines)))
            return
        line = raw.decode(errors="replace")
        daemon.lines.append(line)
        m = re.search(r"mtls-gateway ready \((.*?)\)", line)
        if m and not ready.done():
            for part in m.group(1).split(", "):
                name, port = part.split("=")
                daemon.ports[name] = int(port)
            ready.set_result(None)


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
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(CONFIG.format(fleet=fleet_dir))
    proc = await asyncio.create_subprocess_exec(
        *cli("run", "--config", str(cfg), "--data-dir", str(data), "--no-demo"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    daemon = Daemon(proc)
    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    daemon.reader = asyncio.create_task(_drain(daemon, ready))
    try:
        await asyncio.wait_for(ready, 30)
        yield fleet_dir, data, daemon
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        await asyncio.wait_for(daemon.reader, 5)


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
