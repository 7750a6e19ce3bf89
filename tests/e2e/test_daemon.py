"""The daemon as users run it: ``mtls-gateway run`` in a subprocess (uvloop,
demo PKI generated on first start), real mosquitto clients, SIGTERM."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tests.daemon import EPHEMERAL_LISTENERS, Daemon
from tests.helpers import Subscriber, mqtt_pub

pytestmark = pytest.mark.slow


async def test_run_generates_demo_and_serves_mqtt(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path, EPHEMERAL_LISTENERS)
    try:
        await daemon.start()
        ca, port = daemon.cafile, daemon.ports["mqtt"]
        cert1, key1 = daemon.device(1)
        sub = await Subscriber.start(port, ca, cert1, key1, "device-0001", "demo/#")
        try:
            await asyncio.sleep(1.0)
            cert2, key2 = daemon.device(2)
            r = await mqtt_pub(port, ca, cert2, key2, "device-0002", "demo/hello", "hi")
            assert r.returncode == 0, r.stderr
            assert await sub.next_line() == "demo/hello hi"
        finally:
            await sub.stop()
        listed = await daemon.cli(
            "devices", "list", "--tenant", "demo", "--data-dir", str(daemon.data), "--json"
        )
        assert listed.returncode == 0, listed.stderr
        ids = {d["deviceId"] for d in json.loads(listed.stdout)}
        assert {"device-0001", "device-0002"} <= ids
        verify = await daemon.cli(
            "trust",
            "verify",
            str(daemon.demo / "device-0003.pem"),
            "--tenant",
            "demo",
            "--data-dir",
            str(daemon.data),
        )
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert await daemon.stop() == 0, daemon.log
    finally:
        await daemon.close()
