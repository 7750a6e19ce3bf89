"""Shared test helpers: PKI material on disk, an in-process gateway on
ephemeral ports, and real MQTT clients (mosquitto_pub / mosquitto_sub).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from gateway import operations
from gateway.app import Gateway
from gateway.config import Config, ListenerConfig, load_config
from gateway.pki import Issued, make_ca, make_device, make_server, pem_chain, write_private
from gateway.store.sqlite import SqliteStore
from trust.model import Status

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Pki:
    """A root → intermediate → devices PKI written to ``dir``."""

    dir: Path
    root: Issued
    inter: Issued
    server_ca: Issued
    server: Issued

    @classmethod
    def create(cls, dir: Path, key_type: str = "ec", name: str = "Test") -> Pki:
        dir.mkdir(parents=True, exist_ok=True)
        root = make_ca(f"{name} Root CA", key_type=key_type)  # type: ignore[arg-type]
        inter = make_ca(f"{name} Intermediate CA", issuer=root, key_type=key_type)  # type: ignore[arg-type]
        server_ca = make_ca("Test Server CA")
        server = make_server(server_ca, hosts=("localhost",), ips=("127.0.0.1",))
        (dir / "root.pem").write_bytes(root.cert_pem())
        (dir / "inter.pem").write_bytes(inter.cert_pem())
        (dir / "server-ca.pem").write_bytes(server_ca.cert_pem())
        (dir / "server.pem").write_bytes(server.cert_pem())
        write_private(dir / "server.key", server.key_pem())
        return cls(dir, root, inter, server_ca, server)

    def device(
        self,
        cn: str,
        *,
        issuer: Issued | None = None,
        chain: Sequence[Issued] | None = None,
        **kw: object,
    ) -> tuple[Path, Path, Issued]:
        """Issue a device certificate; writes ``<cn>.pem`` (leaf+chain) and ``<cn>.key``."""
        issuer = issuer or self.inter
        dev = make_device(cn, issuer, **kw)  # type: ignore[arg-type]
        if chain is None:
            chain = [self.inter, self.root] if issuer is self.inter else [issuer]
        cert_path = self.dir / f"{cn}-{dev.cert.serial_number:x}.pem"
        key_path = self.dir / f"{cn}-{dev.cert.serial_number:x}.key"
        cert_path.write_bytes(pem_chain(dev, *chain))
        write_private(key_path, dev.key_pem())
        return cert_path, key_path, dev


@dataclass
class RunningGateway:
    gateway: Gateway
    store: SqliteStore
    config: Config
    pki: Pki
    mqtt_port: int = 0
    service_port: int = 0
    https_port: int = 0
    """Bound port of the HTTPS listener (management API); 0 when disabled."""
    lwm2m_port: int = 0
    """Bound UDP port of the LWM2M (CoAP/DTLS) listener; 0 when disabled."""
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def cafile(self) -> str:
        return str(self.pki.dir / "server-ca.pem")

    async def wait_refreshed(self) -> None:
        """Apply pending store changes now (instead of waiting for the poll)."""
        assert self.gateway.trust is not None
        await self.gateway.trust.refresh()


async def start_gateway(
    tmp: Path,
    pki: Pki,
    *,
    tenants: Sequence[str] = ("t1",),
    auto_registration: bool = True,
    mqtt_backend: str = "embedded",
    upstream_port: int = 1883,
    config: Config | None = None,
    upload_root: bool = True,
) -> RunningGateway:
    """An in-process gateway on ephemeral ports with a fresh SQLite store."""
    store = SqliteStore(tmp / "gateway.db")
    await store.open()
    now = datetime.now(UTC)
    for t in tenants:
        await store.create_tenant(t)
    if upload_root and tenants:
        await operations.add_trusted_certificate(
            store,
            tenants[0],
            pki.root.cert_pem().decode(),
            "root",
            Status.ENABLED,
            auto_registration,
            now,
            "test",
        )
    base = config or load_config(env={})
    listeners = replace(
        base.listeners,
        mqtt=ListenerConfig(host="127.0.0.1", port=0),
        mqtt_service=ListenerConfig(host="127.0.0.1", port=0),
        admin=ListenerConfig(host="127.0.0.1", port=0),
        https=replace(base.listeners.https, host="127.0.0.1", port=0),
        lwm2m=replace(base.listeners.lwm2m, host="127.0.0.1", port=0),
    )
    cfg = replace(
        base,
        data_dir=tmp,
        listeners=listeners,
        tls=replace(
            base.tls,
            server_cert=str(pki.dir / "server.pem"),
            server_key=str(pki.dir / "server.key"),
        ),
        mqtt=replace(base.mqtt, backend=mqtt_backend, upstream_port=upstream_port),  # type: ignore[arg-type]
        trust=replace(base.trust, refresh_interval=0.1),
    )
    gw = Gateway(cfg, store=store)
    await gw.start()
    https_port = gw.port("https") if "https" in gw.http else 0
    rg = RunningGateway(gw, store, cfg, pki, gw.port("mqtt"), gw.port("mqtt_service"), https_port)
    if "lwm2m" in gw.udp_listeners:
        rg.lwm2m_port = gw.udp_port("lwm2m")
    return rg


async def stop_gateway(rg: RunningGateway) -> None:
    await rg.gateway.stop()
    await rg.store.close()


@dataclass
class ProcResult:
    returncode: int
    stdout: str
    stderr: str


async def run(cmd: Sequence[str], timeout: float = 15.0, input: bytes | None = None) -> ProcResult:
    """Run a command with a hard timeout; never hangs a test."""
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(input), timeout)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        return ProcResult(
            -9, out.decode(errors="replace"), err.decode(errors="replace") + "\n[timeout]"
        )
    assert proc.returncode is not None
    return ProcResult(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


def mosquitto_args(
    port: int,
    cafile: str,
    cert: Path | None,
    key: Path | None,
    client_id: str | None,
    version: str = "mqttv311",
) -> list[str]:
    args = ["-h", "127.0.0.1", "-p", str(port), "--cafile", cafile, "-V", version]
    if cert is not None and key is not None:
        args += ["--cert", str(cert), "--key", str(key)]
    if client_id is not None:
        args += ["-i", client_id]
    # the test server certificate is for localhost/127.0.0.1
    return args


async def mqtt_pub(
    port: int,
    cafile: str,
    cert: Path | None,
    key: Path | None,
    client_id: str | None,
    topic: str,
    message: str,
    *extra: str,
    version: str = "mqttv311",
    timeout: float = 10,
) -> ProcResult:
    return await run(
        [
            "mosquitto_pub",
            *mosquitto_args(port, cafile, cert, key, client_id, version),
            "-t",
            topic,
            "-m",
            message,
            *extra,
        ],
        timeout,
    )


class Subscriber:
    """A running ``mosquitto_sub`` collecting lines."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []

    @classmethod
    async def start(
        cls,
        port: int,
        cafile: str,
        cert: Path,
        key: Path,
        client_id: str,
        topic: str,
        *extra: str,
        version: str = "mqttv311",
    ) -> Subscriber:
        proc = await asyncio.create_subprocess_exec(
            "mosquitto_sub",
            *mosquitto_args(port, cafile, cert, key, client_id, version),
            "-t",
            topic,
            "-v",
            *extra,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    async def next_line(self, timeout: float = 10.0) -> str:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise EOFError("mosquitto_sub exited")
        text = line.decode().rstrip("\n")
        self.lines.append(text)
        return text

    async def exit(self, timeout: float = 10.0) -> int:
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def stderr(self) -> str:
        assert self.proc.stderr is not None
        try:
            data = await asyncio.wait_for(self.proc.stderr.read(), 5)
        except TimeoutError:
            return ""
        return data.decode(errors="replace")

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def wait_until(predicate, timeout: float = 5.0, interval: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    """Poll ``predicate`` (sync or async) until true or timeout; returns the final value."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return True
        if loop.time() >= end:
            return False
        await asyncio.sleep(interval)


class Mosquitto:
    """A real mosquitto broker on an ephemeral loopback port (the upstream backend)."""

    def __init__(self, tmp: Path, extra: str = "") -> None:
        self.port = free_port()
        self.tmp = tmp
        self.extra = extra
        """More configuration (e.g. a second, TLS listener) after the plain one."""
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        conf = self.tmp / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            + self.extra
        )
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for _ in range(200):
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("mosquitto exited at start") from None
                import time

                time.sleep(0.025)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def env_without_proxy() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
