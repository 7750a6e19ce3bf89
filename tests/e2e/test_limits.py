"""Listener limits: handshake timeout and per-address handshake rate, each
counted in a metric (the connection-count limit is in test_mqtt_e2e)."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.config import load_config
from tests.helpers import Pki, mqtt_pub, start_gateway, stop_gateway, wait_until

pytestmark = pytest.mark.slow


async def test_silent_peer_hits_the_handshake_timeout(tmp_path: Path) -> None:
    pki = Pki.create(tmp_path / "pki")
    base = load_config(env={})
    cfg = replace(base, limits=replace(base.limits, handshake_timeout=0.5))
    rg = await start_gateway(tmp_path, pki, config=cfg)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", rg.mqtt_port)
        # say nothing: the gateway must give up on its own and close
        data = await asyncio.wait_for(reader.read(100), 5)
        assert data == b""
        writer.close()
        metrics = rg.gateway.metrics.handshakes
        assert await wait_until(lambda: metrics.value("mqtt", "rejected", "timeout") == 1)
    finally:
        await stop_gateway(rg)


async def test_per_address_handshake_rate_limit(tmp_path: Path) -> None:
    pki = Pki.create(tmp_path / "pki")
    base = load_config(env={})
    cfg = replace(base, limits=replace(base.limits, handshake_rate=0.5, handshake_burst=2))
    rg = await start_gateway(tmp_path, pki, config=cfg)
    try:
        cert, key, _ = pki.device("rated")
        ok = await mqtt_pub(rg.mqtt_port, rg.cafile, cert, key, "rated", "x", "1")
        assert ok.returncode == 0, ok.stderr
        conns = []
        for _ in range(5):
            with contextlib.suppress(OSError):
                conns.append(await asyncio.open_connection("127.0.0.1", rg.mqtt_port))
        refused = rg.gateway.metrics.refused
        assert await wait_until(lambda: refused.value("mqtt", "handshake_rate") >= 4)
        for _, w in conns:
            w.close()
        # the bucket refills at 0.5/s: a real client is refused now, accepted later
        again = await mqtt_pub(rg.mqtt_port, rg.cafile, cert, key, "rated", "x", "1")
        assert again.returncode != 0
    finally:
        await stop_gateway(rg)
