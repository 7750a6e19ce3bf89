"""The daemon as users run it: ``mtls-gateway run`` in a subprocess (uvloop,
demo PKI generated on first start), real mosquitto clients, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from pathlib import Path

import pytest

from tests.helpers import Subscriber, mqtt_pub, run

pytestmark = pytest.mark.slow

CONFIG = """
[listeners.mqtt]
host = "127.0.0.1"
port = 0
[listeners.mqtt_service]
host = "127.0.0.1"
port = 0
[listeners.admin]
port = 0
[listeners.https]
host = "127.0.0.1"
port = 0
"""


async def test_run_generates_demo_and_serves_mqtt(tmp_path: Path) -> None:
    data = tmp_path / "data"
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(CONFIG)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "run",
        "--data-dir",
        str(data),
        "--config",
        str(cfg),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    ports: dict[str, int] = {}
    log: list[str] = []
    try:

        async def ready() -> None:
            while True:
                line = (await proc.stdout.readline()).decode()  # type: ignore[union-attr]
                if not line:
                    raise AssertionError("daemon exited:\n" + "".join(log))
                log.append(line)
                m = re.search(r"ready \((.*?)\)", line)
                if m:
                    for part in m.group(1).split(", "):
                        name, port = part.split("=")
                        ports[name] = int(port)
                    return

        await asyncio.wait_for(ready(), 30)
        demo = data / "demo"
        ca = str(demo / "server-ca.pem")
        sub = await Subscriber.start(
            ports["mqtt"],
            ca,
            demo / "device-0001.pem",
            demo / "device-0001.key",
            "device-0001",
            "demo/#",
        )
        try:
            await asyncio.sleep(1.0)
            r = await mqtt_pub(
                ports["mqtt"],
                ca,
                demo / "device-0002.pem",
                demo / "device-0002.key",
                "device-0002",
                "demo/hello",
                "hi",
            )
            assert r.returncode == 0, r.stderr
            assert await sub.next_line() == "demo/hello hi"
        finally:
            await sub.stop()
        listed = await run(
            [
                sys.executable,
                "-m",
                "gateway",
                "devices",
                "list",
                "--tenant",
                "demo",
                "--data-dir",
                str(data),
                "--json",
            ],
            timeout=30,
        )
        assert listed.returncode == 0, listed.stderr
        ids = {d["deviceId"] for d in json.loads(listed.stdout)}
        assert {"device-0001", "device-0002"} <= ids
        verify = await run(
            [
                sys.executable,
                "-m",
                "gateway",
                "trust",
                "verify",
                str(demo / "device-0003.pem"),
                "--tenant",
                "demo",
                "--data-dir",
                str(data),
            ],
            timeout=30,
        )
        assert verify.returncode == 0, verify.stdout + verify.stderr
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 15)
    assert code == 0, "".join(log)
