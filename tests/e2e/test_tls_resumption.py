"""TLS session resumption policy: off by default; when enabled, a resumed
session (which carries no chain) gets the decision of its full handshake."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.config import load_config
from protocols.mqtt.codec import Connack, Connect, MqttDecoder, encode
from tests.helpers import Pki, start_gateway, stop_gateway

pytestmark = pytest.mark.slow


def _client_ctx(pki: Pki, cert: Path, key: Path, version: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.dir / "server-ca.pem"))
    ctx.load_cert_chain(str(cert), str(key))
    ctx.minimum_version = ctx.maximum_version = version
    return ctx


def _resume_sync(port: int, ctx: ssl.SSLContext, client_id: str) -> tuple[int, bool]:
    """Blocking client (ssl sockets support ``session=``): full handshake, then resume."""
    import socket

    codes = []
    session = None
    reused = False
    for _ in range(2):
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
            tls.sendall(encode(Connect(client_id), 4))
            # TLS 1.3 tickets arrive after the handshake, with the first read
            decoder = MqttDecoder(protocol_version=4, server=False)
            packets: list[object] = []
            while not packets:
                data = tls.recv(4096)
                assert data
                packets = list(decoder.feed(data))
            connack = packets[0]
            assert isinstance(connack, Connack)
            codes.append(connack.reason_code)
            reused = tls.session_reused
            session = tls.session
    assert codes[0] == 0
    return codes[1], reused


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
@pytest.mark.parametrize("tickets", [False, True])
async def test_resumption_policy(tmp_path: Path, tickets: bool, version: ssl.TLSVersion) -> None:
    pki = Pki.create(tmp_path / "pki")
    base = load_config(env={})
    cfg = replace(base, tls=replace(base.tls, session_tickets=tickets))
    rg = await start_gateway(tmp_path, pki, config=cfg)
    try:
        cert, key, _ = pki.device("resumer")
        ctx = _client_ctx(pki, cert, key, version)
        code, reused = await asyncio.to_thread(_resume_sync, rg.mqtt_port, ctx, "resumer")
        # a resumed session carries no chain; it is accepted from the decision of
        # its full handshake (TLS 1.2 may resume from OpenSSL's session-ID cache
        # even without tickets)
        assert code == 0
        if version is ssl.TLSVersion.TLSv1_3:
            assert reused is tickets
        elif tickets:
            assert reused
    finally:
        await stop_gateway(rg)
