#!/usr/bin/env python3
"""Benchmark: the gateway against Debian's mosquitto, side by side, in one run.

Tests (each alternates gateway / mosquitto rounds, A B A B, so drift cancels):

1. full new mTLS handshakes per second, ECDSA P-256 chain of 3 certificates
   (device, intermediate, root): connect, handshake, MQTT CONNECT, CONNACK,
   DISCONNECT, close; gateway with the complete policy (anchor, offline
   revocation on with entries, pre-registered device lookup) and an upstream
   mosquitto backend, versus mosquitto with ``require_certificate true``,
   ``use_identity_as_username true`` and the same CA;
2. the same with RSA 2048;
3. idle connections held and RSS per connection at 2,000 and 10,000;
4. QoS 0 publish throughput device -> subscriber, through the gateway
   (upstream mosquitto) versus mosquitto directly: the subscriber a device
   (through the same server: both hops through the gateway) or a backend
   application on the broker over plain TCP (the upstream mosquitto, or a
   plain listener of the direct mosquitto: one hop through the gateway); both
   again with the gateway speaking TLS to its upstream mosquitto;
5. EST enrollments per second: ``POST /.well-known/est/simpleenroll`` with
   Basic ``tenant/device:OTP`` and a pre-generated ECDSA P-256 CSR, over a pool
   of keep-alive HTTPS connections, against a tenant with an ECDSA P-256 CA
   and bulk-registered pending devices (no C peer: the ratio is to 500/s).

The servers (the gateway *and* its upstream broker, or mosquitto alone) are
pinned to the first CPU, the load generators (Python, one process per
remaining CPU, the same client for both servers) to the others. Prints
medians, min/max and gateway/mosquitto ratios; writes
``var/bench/result-<timestamp>.json``. ``--quick`` takes about a minute.
No assertions: the benchmark prints, people judge (docs/performance.md).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import multiprocessing as mp
import os
import platform
import queue
import random
import resource
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway import operations as ops  # noqa: E402
from gateway.ca_service import CaService  # noqa: E402
from gateway.config import CaConfig  # noqa: E402
from gateway.fleet.driver import ConnectFailure, Device, DriverOptions, client_context  # noqa: E402
from gateway.fleet.mqtt_client import MqttConnection, open_mqtt  # noqa: E402
from gateway.fleet.pki import Manifest, generate_fleet, load_manifest  # noqa: E402
from gateway.fleet.register import StoreRegistrar, register_fleet  # noqa: E402
from gateway.fleet.run import install_fast_loop, read_rss_kb  # noqa: E402
from gateway.http.mgmt import enrollment_otp_hasher  # noqa: E402
from gateway.secrets import SecretBox  # noqa: E402
from gateway.store.sqlite import SqliteStore  # noqa: E402
from protocols.mqtt.codec import Disconnect, Publish, encode  # noqa: E402

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
DISCONNECT = encode(Disconnect(), 4)
TENANTS = {"ec": "bench", "rsa": "bench-rsa"}
REVOKED_ENTRIES = 200
EST_TENANT = "bench-est"
EST_TARGET = 500.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Profile:
    """Sizes and durations of one benchmark run."""

    name: str
    ec_devices: int
    rsa_devices: int
    rounds: int
    handshake_seconds: float
    idle_steps: tuple[int, ...]
    idle_rounds: tuple[int, ...]
    """Rounds per idle step (the largest step runs once to stay in time)."""
    qos0_seconds: float
    handshake_devices: int = 2_000
    """ECDSA devices cycled through by the handshake test."""
    concurrency: int = 128
    warmup: float = 1.0
    est_devices: int = 3_000
    """EST enrollments per round (each round spends its own pending devices)."""
    est_concurrency: int = 32
    """Keep-alive HTTPS connections enrolling at once (split over the load processes)."""


FULL = Profile("full", 10_000, 300, 3, 8.0, (2_000, 10_000), (3, 1), 6.0)
QUICK = Profile(
    "quick",
    1_000,
    60,
    3,
    2.0,
    (1_000,),
    (1,),
    2.0,
    handshake_devices=500,
    warmup=0.5,
    est_devices=400,
)


# ----------------------------------------------------------------------------------
# small helpers


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cpu_ticks(pids: Sequence[int]) -> int:
    """utime + stime of the processes (clock ticks)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total


def busy_ticks() -> int:
    """Non-idle CPU ticks of the whole machine (``/proc/stat``)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)


def plan_cpus() -> tuple[set[int], set[int], str]:
    """(server CPUs, load CPUs, note)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return set(), set(), "no CPU affinity on this platform: nothing pinned"
    if len(cpus) < 2:
        return set(), set(), "one CPU: servers and load share it (nothing pinned)"
    return {cpus[0]}, set(cpus[1:]), f"servers on CPU {cpus[0]}, load on CPUs {cpus[1:]}"


def pin(cpus: set[int]) -> None:
    if cpus:
        with contextlib.suppress(OSError, AttributeError):
            os.sched_setaffinity(0, cpus)


def raise_nofile() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (inherited by children)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def summary(values: Sequence[float]) -> dict[str, Any]:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "rounds": list(values)}
    return {
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
        "rounds": [round(v, 3) for v in vals],
    }


# ----------------------------------------------------------------------------------
# servers


class Server:
    """A server process (or two: the gateway and its upstream broker)."""

    def __init__(
        self,
        name: str,
        procs: list[subprocess.Popen[bytes]],
        port: int,
        backend_port: int | None = None,
        backend_prefix: str = "",
    ) -> None:
        self.name = name
        self.procs = procs
        self.port = port
        self.backend_port = backend_port
        """Plain-TCP MQTT port of the broker where backend applications subscribe."""
        self.backend_prefix = backend_prefix
        """What that broker's topics carry in front of the devices' (the tenant mount)."""

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def rss_kb(self) -> list[int]:
        return [read_rss_kb(pid) or 0 for pid in self.pids]

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def _popen(cmd: list[str], logfile: Path, cpus: set[int]) -> subprocess.Popen[bytes]:
    out = logfile.open("ab")
    try:
        return subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=(lambda: pin(cpus)) if cpus else None,
            cwd=str(logfile.parent),
        )
    finally:
        out.close()


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited at start (code {proc.returncode})")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout}s")


def start_mosquitto_upstream(work: Path, cpus: set[int], tls: Manifest | None = None) -> Server:
    """The gateway's upstream broker: ``port`` is where the gateway connects (a
    TLS listener with ``tls``'s server certificate, or plain TCP),
    ``backend_port`` the plain listener for backend applications."""
    plain = free_port()
    conf = work / f"upstream-{plain}.conf"
    text = (
        f"listener {plain} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "user root\nmax_queued_messages 100000\n"
    )
    port = plain
    if tls is not None:
        port = free_port()
        text += (
            f"listener {port} 127.0.0.1\n"
            f"certfile {tls.dir / 'server.pem'}\nkeyfile {tls.dir / 'server.key'}\n"
        )
    conf.write_text(text)
    proc = _popen([MOSQUITTO, "-c", str(conf)], work / "upstream.log", cpus)
    _wait_port(plain, proc, "upstream mosquitto")
    _wait_port(port, proc, "upstream mosquitto (TLS listener)")
    return Server("upstream", [proc], port, backend_port=plain)


def start_mosquitto_tls(work: Path, cafile: Path, fleet: Manifest, cpus: set[int]) -> Server:
    port = free_port()
    plain = free_port()
    conf = work / f"mosquitto-{port}.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\n"
        f"cafile {cafile}\n"
        f"certfile {fleet.dir / 'server.pem'}\n"
        f"keyfile {fleet.dir / 'server.key'}\n"
        "require_certificate true\n"
        "use_identity_as_username true\n"
        # where backend applications subscribe (the QoS 0 backend-subscriber test)
        f"listener {plain} 127.0.0.1\n"
        "allow_anonymous true\n"
        "persistence false\n"
        # keys are 0600 root-owned: do not drop to the mosquitto user
        "user root\n"
        "max_queued_messages 100000\n"
    )
    proc = _popen([MOSQUITTO, "-c", str(conf)], work / "mosquitto.log", cpus)
    _wait_port(port, proc, "mosquitto")
    _wait_port(plain, proc, "mosquitto (plain listener)")
    return Server("mosquitto", [proc], port, backend_port=plain)


def extra_mqtt(config: str, lines: str) -> str:
    """``config`` with ``lines`` added to its ``[mqtt]`` table (the last one)."""
    return config.rstrip("\n") + "\n" + lines if lines else config


GATEWAY_CONFIG = """\
event_loop = "{loop}"
[listeners.mqtt]
host = "127.0.0.1"
port = 0
[listeners.mqtt_service]
enabled = false
[listeners.https]
enabled = {https}
host = "127.0.0.1"
port = 0
[listeners.lwm2m]
enabled = false
[listeners.admin]
host = "127.0.0.1"
port = 0
[tls]
server_cert = "{cert}"
server_key = "{key}"
[limits]
max_connections = 1000000
handshake_rate = 1000000.0
handshake_burst = 1000000
[mqtt]
backend = "upstream"
upstream_host = "127.0.0.1"
upstream_port = {upstream}
"""


def start_gateway(
    work: Path,
    data: Path,
    fleet: Manifest,
    loop: str,
    cpus: set[int],
    launcher: Path | None,
    listener: str = "mqtt",
    upstream_tls: bool = False,
) -> Server:
    """The gateway and its upstream mosquitto; ``port`` is that of ``listener``
    (``mqtt``, or ``https``: the HTTPS listener is enabled only then); with
    ``upstream_tls`` the gateway speaks TLS to the broker."""
    upstream = start_mosquitto_upstream(work, cpus, fleet if upstream_tls else None)
    cfg = work / "gateway.toml"
    extra = ""
    if upstream_tls:
        extra = f'upstream_tls = true\nupstream_ca_file = "{fleet.dir / "server-ca.pem"}"\n'
    cfg.write_text(
        extra_mqtt(GATEWAY_CONFIG, extra).format(
            loop=loop,
            cert=fleet.dir / "server.pem",
            key=fleet.dir / "server.key",
            upstream=upstream.port,
            https="true" if listener == "https" else "false",
        )
    )
    logfile = work / "gateway.log"
    start = logfile.stat().st_size if logfile.exists() else 0
    entry = [str(launcher)] if launcher else ["-m", "gateway"]
    cmd = [sys.executable, *entry, "run", "--config", str(cfg)]
    cmd += ["--data-dir", str(data), "--no-demo"]
    proc = _popen(cmd, logfile, cpus)
    end = time.monotonic() + 60
    while time.monotonic() < end:
        if proc.poll() is not None:
            upstream.stop()
            raise RuntimeError(f"gateway exited at start; see {logfile}")
        with logfile.open("rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
        for line in text.splitlines():
            if "mtls-gateway ready (" in line:
                ports = line.split("ready (", 1)[1].split(")", 1)[0]
                port = int(dict(p.split("=") for p in ports.split(", "))[listener])
                return Server(
                    "gateway",
                    [proc, *upstream.procs],
                    port,
                    backend_port=upstream.backend_port,
                    backend_prefix=TENANTS["ec"] + "/",
                )
        time.sleep(0.1)
    proc.kill()
    upstream.stop()
    raise RuntimeError(f"gateway not ready within 60 s; see {logfile}")


# ----------------------------------------------------------------------------------
# load generator: persistent processes pinned to the load CPUs, one command at a time


def _device_contexts(devices: Sequence[Device]) -> list[tuple[str, ssl.SSLContext]]:
    # server verification is left out: it costs the client, not the server under test
    opts = DriverOptions(cafile=None)
    return [(d.device_id, client_context(d, opts)) for d in devices]


async def _churn(
    contexts: list[tuple[str, ssl.SSLContext]],
    port: int,
    concurrency: int,
    warmup: float,
    seconds: float,
    once: bool = False,
) -> dict[str, Any]:
    """Closed-loop handshakes: connect, TLS, CONNECT, CONNACK, DISCONNECT, close.

    ``once``: every device connects once (within ``seconds`` at most) -- the first
    connect of each device, before anything about it is cached.
    """
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    start, end = (t0, t0 + seconds) if once else (t0 + warmup, t0 + warmup + seconds)
    done = 0
    failures: dict[str, int] = {}
    latency: list[float] = []
    cpu0 = time.process_time()

    async def cycle(j: int) -> None:
        nonlocal done
        i, n = j, len(contexts)
        while loop.time() < end and not (once and i >= n):
            device_id, ctx = contexts[i % n]
            i += concurrency  # each loop owns its devices: no client id is used twice at once
            try:
                conn = await open_mqtt(
                    "127.0.0.1", port, ctx, client_id=device_id, connect_timeout=5.0
                )
            except ConnectFailure as exc:
                if start <= loop.time() < end:
                    failures[exc.reason] = failures.get(exc.reason, 0) + 1
                continue
            conn.write(DISCONNECT)
            conn.transport.close()
            if start <= loop.time() < end:
                done += 1
                t = conn.timings
                latency.append(t.tcp + t.tls + t.accept)

    await asyncio.gather(*(cycle(j) for j in range(min(concurrency, len(contexts)))))
    elapsed = loop.time() - t0
    cpu = time.process_time() - cpu0
    await asyncio.sleep(0.5)  # let the closes go out
    return {
        "done": done,
        "failures": failures,
        "latency": latency,
        "cpu": cpu,
        "elapsed": elapsed,
    }


async def _hold(
    index: int,
    devices: list[Device],
    port: int,
    concurrency: int,
    limit: float,
    cmds: Any,
    out: Any,
) -> dict[str, Any]:
    """One idle connection per device (a failure is retried once); hold until told.

    Source addresses 127.<index+1>.0.<1 + j // 20,000>: one loopback address has
    ~28,000 ephemeral ports, so 100,000 sessions (the full-size run by hand)
    need several."""
    conns: list[MqttConnection] = []
    failures: dict[str, int] = {}
    sem = asyncio.Semaphore(concurrency)
    opts = DriverOptions(cafile=None, keepalive=600)

    async def one(j: int, d: Device) -> None:
        source = (f"127.{index + 1}.0.{1 + j // 20_000}", 0)
        async with sem:
            ctx = client_context(d, opts)
            for _ in range(2):
                try:
                    conn = await open_mqtt(
                        "127.0.0.1",
                        port,
                        ctx,
                        client_id=d.device_id,
                        keepalive=600,
                        connect_timeout=3.0,
                        local_addr=source,
                    )
                except ConnectFailure as exc:
                    failures[exc.reason] = failures.get(exc.reason, 0) + 1
                else:
                    conns.append(conn)
                    return

    t0 = time.monotonic()
    tasks = [asyncio.create_task(one(j, d)) for j, d in enumerate(devices)]
    _, pending = await asyncio.wait(tasks, timeout=limit)
    for t in pending:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    out.put(
        (
            "held",
            index,
            {
                "connected": len(conns),
                "failures": failures,
                "seconds": round(time.monotonic() - t0, 2),
            },
        )
    )
    with contextlib.suppress(queue.Empty):
        await asyncio.to_thread(cmds.get, True, limit)  # ("release",)
    alive = sum(1 for c in conns if c.failure is None)
    for c in conns:
        c.abort()
    return {"aliveAtRelease": alive}


async def _pubsub(
    index: int,
    devices: list[Device],
    port: int,
    topic: str,
    warmup: float,
    seconds: float,
    window: int,
    backend: tuple[int, str] | None,
    cmds: Any,
    out: Any,
) -> dict[str, Any]:
    """devices[0] subscribes, the others publish QoS 0 (pre-encoded batches) as fast as
    the subscriber receives: at most ``window`` messages are in flight end to end, so
    the result is the throughput sustained without loss (an overloaded broker drops
    QoS 0 messages, which would measure the drops instead). With ``backend``
    (plain-TCP port, topic prefix) the subscriber is a backend application on
    the broker instead of a device."""
    loop = asyncio.get_running_loop()
    room = asyncio.Event()
    room.set()
    state = {"sent": 0, "lost": 0}

    def on_publish(_: Publish) -> None:
        if not room.is_set() and state["sent"] - sub.received - state["lost"] < window // 2:
            room.set()

    contexts = _device_contexts(devices)
    sub_port, sub_prefix = backend if backend is not None else (port, "")
    sub = await open_mqtt(
        "127.0.0.1",
        sub_port,
        None if backend is not None else contexts[0][1],
        client_id="bench-backend-subscriber" if backend is not None else contexts[0][0],
        connect_timeout=10.0,
        on_publish=on_publish,
    )
    pubs = [
        await open_mqtt("127.0.0.1", port, ctx, client_id=did, connect_timeout=10.0)
        for did, ctx in contexts[1:]
    ]
    await sub.subscribe(sub_prefix + topic + "/#")
    out.put(("ready", index, None))
    await asyncio.to_thread(cmds.get, True, 60)  # ("go",)
    t0 = loop.time()
    start, end = t0 + warmup, t0 + warmup + seconds
    per_batch = 32
    batch = encode(Publish(topic + "/data", b"x" * 64), 4) * per_batch
    stalls = 0

    async def publish(conn: MqttConnection) -> None:
        nonlocal stalls
        while loop.time() < end and conn.failure is None:
            if state["sent"] - sub.received - state["lost"] >= window:
                room.clear()
                try:
                    await asyncio.wait_for(room.wait(), 0.5)
                except TimeoutError:  # messages were dropped: forget them and go on
                    stalls += 1
                    state["lost"] = state["sent"] - sub.received
                continue
            conn.write(batch)
            state["sent"] += per_batch
            try:
                await conn.drain()
            except ConnectFailure:
                return

    async def count() -> tuple[int, int]:
        await asyncio.sleep(start - loop.time())
        n0, s0 = sub.received, state["sent"]
        await asyncio.sleep(end - loop.time())
        return sub.received - n0, state["sent"] - s0

    (received, sent), *_ = await asyncio.gather(count(), *(publish(c) for c in pubs))
    failure = sub.failure
    for conn in (sub, *pubs):
        await conn.disconnect()
    return {
        "received": received,
        "sent": sent,
        "stalls": stalls,
        "lost": state["lost"],
        "subscriberLost": failure,
    }


async def _est(
    index: int,
    port: int,
    tenant: str,
    items: list[tuple[str, str, str]],
    concurrency: int,
    cmds: Any,
    out: Any,
) -> dict[str, Any]:
    """EST ``/simpleenroll`` of ``items`` (device id, OTP, base64 CSR), ``concurrency``
    at a time over as many keep-alive HTTPS connections, opened before ``go``."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False  # server verification costs the client, not the server
    ctx.verify_mode = ssl.CERT_NONE
    base = f"https://127.0.0.1:{port}/.well-known/est"
    statuses: dict[str, int] = {}
    latency: list[float] = []
    connector = aiohttp.TCPConnector(ssl=ctx, limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def warm() -> None:
            async with session.get(f"{base}/{tenant}/cacerts") as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"GET cacerts: HTTP {r.status}")

        await asyncio.gather(*(warm() for _ in range(concurrency)))
        requests = [
            (
                "Basic " + base64.b64encode(f"{tenant}/{device_id}:{otp}".encode()).decode(),
                csr.encode("ascii"),
            )
            for device_id, otp, csr in items
        ]
        todo = iter(requests)
        url = f"{base}/simpleenroll"
        out.put(("ready", index, None))
        await asyncio.to_thread(cmds.get, True, 60)  # ("go",)
        loop = asyncio.get_running_loop()

        async def worker() -> None:
            for auth, body in todo:  # one shared iterator: each CSR is sent once
                t = loop.time()
                headers = {"Authorization": auth, "Content-Type": "application/pkcs10"}
                try:
                    async with session.post(url, data=body, headers=headers) as r:
                        await r.read()
                        key = str(r.status)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    key = exc.__class__.__name__
                statuses[key] = statuses.get(key, 0) + 1
                latency.append(loop.time() - t)

        cpu0 = time.process_time()
        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        t1 = time.monotonic()
        cpu = time.process_time() - cpu0
    return {
        "ok": statuses.get("201", 0),
        "statuses": statuses,
        "t0": t0,
        "t1": t1,
        "cpu": cpu,
        "latency": latency,
    }


def load_main(index: int, cpus: set[int], cmds: Any, out: Any) -> None:
    """A load process: executes commands from ``cmds`` until ``("stop",)``."""
    pin(cpus)
    install_fast_loop()
    contexts: dict[str, list[tuple[str, ssl.SSLContext]]] = {}
    out.put(("up", index, None))
    while True:
        try:
            cmd = cmds.get(timeout=3600)
        except queue.Empty:
            return
        name, params = cmd[0], cmd[1:]
        try:
            if name == "stop":
                return
            if name == "contexts":
                key, devices = params
                contexts[key] = _device_contexts(devices)
                result: Any = len(contexts[key])
            elif name == "churn":
                key, *rest = params
                result = asyncio.run(_churn(contexts[key], *rest))
            elif name == "hold":
                result = asyncio.run(_hold(index, *params, cmds, out))
            elif name == "pubsub":
                result = asyncio.run(_pubsub(index, *params, cmds, out))
            elif name == "est":
                result = asyncio.run(_est(index, *params, cmds, out))
            else:
                raise ValueError(f"unknown command {name!r}")
        except Exception as exc:
            out.put(("error", index, f"{name}: {exc.__class__.__name__}: {exc}"))
            continue
        out.put(("result", index, result))


class LoadPool:
    """The load processes, started once for the whole benchmark."""

    def __init__(self, n: int, cpus: set[int]) -> None:
        ctx = mp.get_context("spawn")
        self.out: Any = ctx.Queue()
        self.cmds: list[Any] = [ctx.Queue() for _ in range(n)]
        self.procs = [
            ctx.Process(target=load_main, args=(i, cpus, self.cmds[i], self.out), daemon=True)
            for i in range(n)
        ]
        for p in self.procs:
            p.start()
        self.collect("up", range(n), 60)

    @property
    def size(self) -> int:
        return len(self.procs)

    def send(self, index: int, *cmd: Any) -> None:
        self.cmds[index].put(cmd)

    def collect(self, kind: str, workers: Sequence[int] | range, timeout: float) -> list[Any]:
        """The ``kind`` replies of ``workers`` (in worker order); raises on errors/timeouts."""
        got: dict[int, Any] = {}
        end = time.monotonic() + timeout
        while len(got) < len(workers):
            left = end - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"load: {len(got)}/{len(workers)} '{kind}' in {timeout:.0f}s")
            try:
                k, index, payload = self.out.get(timeout=min(left, 0.5))
            except queue.Empty:
                if not all(p.is_alive() for p in self.procs):
                    raise RuntimeError("a load process died") from None
                continue
            if k == "error":
                raise RuntimeError(f"load process {index}: {payload}")
            if k == kind:
                got[index] = payload
        return [got[i] for i in sorted(got)]

    def close(self) -> None:
        for i in range(self.size):
            with contextlib.suppress(Exception):
                self.send(i, "stop")
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
                p.join(5)


T = TypeVar("T")


def _split(items: Sequence[T], parts: int) -> list[list[T]]:
    return [list(items[i::parts]) for i in range(parts)]


# ----------------------------------------------------------------------------------
# tests


@dataclass
class Bench:
    args: argparse.Namespace
    profile: Profile
    work: Path
    server_cpus: set[int]
    load_cpus: set[int]
    pool: LoadPool
    fleets: dict[str, Manifest] = field(default_factory=dict)
    cafile: Path = Path()
    data: Path = Path()
    notes: list[str] = field(default_factory=list)
    foreign: list[float] = field(default_factory=list)

    def gateway(self, listener: str = "mqtt", upstream_tls: bool = False) -> Server:
        return start_gateway(
            self.work,
            self.data,
            self.fleets["ec"],
            self.args.gateway_loop,
            self.server_cpus,
            self.args.gateway_launcher,
            listener,
            upstream_tls,
        )

    def mosquitto(self) -> Server:
        return start_mosquitto_tls(self.work, self.cafile, self.fleets["ec"], self.server_cpus)

    def _window(self, server: Server, seconds: float) -> float:
        """Sleep through the warm-up and the window; the server's CPU seconds in it.

        Also records how much CPU other processes on the machine used meanwhile
        (``self.foreign``, percent of one CPU): the benchmark cannot control them.
        """
        time.sleep(self.profile.warmup)
        ours = [*server.pids, *(p.pid for p in self.pool.procs), os.getpid()]
        t0, b0, o0 = cpu_ticks(server.pids), busy_ticks(), cpu_ticks(ours)
        time.sleep(seconds)
        t1, b1, o1 = cpu_ticks(server.pids), busy_ticks(), cpu_ticks(ours)
        self.foreign.append(100 * max((b1 - b0) - (o1 - o0), 0) / CLK_TCK / seconds)
        return (t1 - t0) / CLK_TCK

    # 1, 2 ---------------------------------------------------------------------------
    def handshakes(self, key: str, gateway: Server, mosq: Server) -> dict[str, Any]:
        p = self.profile
        k = self.pool.size
        devices = self.fleets[key].good
        if key == "ec":
            devices = devices[: p.handshake_devices]
        for i, part in enumerate(_split(devices, k)):
            self.pool.send(i, "contexts", key, part)
        self.pool.collect("result", range(k), 300)
        names = ("gateway", "mosquitto")
        rates: dict[str, list[float]] = {n: [] for n in names}
        per_cpu: dict[str, list[float]] = {n: [] for n in names}
        cpu_pct: dict[str, list[float]] = {n: [] for n in names}
        failures: dict[str, dict[str, int]] = {n: {} for n in names}
        latency: dict[str, list[float]] = {n: [] for n in names}
        client_cpu: list[float] = []
        self.foreign = []
        conc = max(1, p.concurrency // k)
        first: dict[str, dict[str, float]] = {}
        for server in (gateway, mosq):
            # each device's first connect: nothing cached yet, first-seen store writes
            c0, w0 = cpu_ticks(server.pids), time.monotonic()
            limit = 6 * p.handshake_seconds
            for i in range(k):
                self.pool.send(i, "churn", key, server.port, conc, 0.0, limit, True)
            results = self.pool.collect("result", range(k), limit + 60)
            wall = time.monotonic() - w0
            used = (cpu_ticks(server.pids) - c0) / CLK_TCK
            done = sum(x["done"] for x in results)
            first[server.name] = {
                "devices": done,
                "perSecond": round(done / wall, 1),
                "perServerCpuSecond": round(done / used, 1) if used > 0 else 0.0,
                "failures": sum(sum(x["failures"].values()) for x in results),
                "of": len(devices),
            }
            log(
                f"  {key} first connect {server.name:9} {done}/{len(devices)} devices,"
                f" {done / wall:7.1f}/s, {first[server.name]['perServerCpuSecond']:6.1f}/CPU-s"
            )
        for r in range(p.rounds):
            for server in (gateway, mosq):
                for i in range(k):
                    self.pool.send(
                        i, "churn", key, server.port, conc, p.warmup, p.handshake_seconds
                    )
                used = self._window(server, p.handshake_seconds)
                results = self.pool.collect("result", range(k), p.handshake_seconds + 60)
                done = sum(x["done"] for x in results)
                name = server.name
                rates[name].append(done / p.handshake_seconds)
                cpu_pct[name].append(100 * used / p.handshake_seconds)
                per_cpu[name].append(done / used if used > 0 else 0.0)
                client_cpu.append(100 * sum(x["cpu"] for x in results) / p.handshake_seconds)
                for x in results:
                    latency[name] += x["latency"]
                    for reason, n in x["failures"].items():
                        failures[name][reason] = failures[name].get(reason, 0) + n
                log(
                    f"  {key} round {r + 1} {name:9} {rates[name][-1]:7.1f} handshakes/s,"
                    f" server CPU {cpu_pct[name][-1]:5.1f}%, {per_cpu[name][-1]:6.1f}/CPU-s,"
                    f" load CPU {client_cpu[-1]:5.1f}%, failures {sum(failures[name].values())}"
                )
                if not server.alive():
                    raise RuntimeError(f"{name} died during the handshake test")
        out: dict[str, Any] = {
            "unit": "handshakes/s",
            "concurrency": conc * k,
            "devices": len(devices),
            "firstConnect": first,
        }
        for name in names:
            lat = sorted(latency[name])
            out[name] = summary(rates[name])
            out[name]["perServerCpuSecond"] = summary(per_cpu[name])
            out[name]["serverCpuPercent"] = summary(cpu_pct[name])
            out[name]["failures"] = failures[name]
            out[name]["cycleMsP50"] = round(1000 * lat[len(lat) // 2], 2) if lat else None
        out["loadCpuPercent"] = summary(client_cpu)
        out["otherProcessesCpuPercent"] = summary(self.foreign)
        out["ratio"] = _ratio(out, "median")
        out["ratioPerCpu"] = _ratio_nested(out, "perServerCpuSecond")
        out["target"] = ">= 1.5"
        return out

    # 3 -----------------------------------------------------------------------------
    def idle(self, step: int, rounds: int) -> dict[str, Any]:
        devices = self.fleets["ec"].good[:step]
        if len(devices) < step:
            raise RuntimeError(f"idle step {step}: only {len(devices)} devices in the fleet")
        names = ("gateway", "mosquitto")
        per_conn: dict[str, list[float]] = {n: [] for n in names}
        gw_only: list[float] = []
        failures: dict[str, dict[str, int]] = {n: {} for n in names}
        connected: dict[str, list[int]] = {n: [] for n in names}
        for r in range(rounds):
            for name in names:
                server = self.gateway() if name == "gateway" else self.mosquitto()
                try:
                    time.sleep(0.5)
                    base = server.rss_kb()
                    held, rss = self._hold(server, devices)
                finally:
                    server.stop()
                n = sum(h["connected"] for h in held)
                connected[name].append(n)
                for h in held:
                    for reason, c in h["failures"].items():
                        failures[name][reason] = failures[name].get(reason, 0) + c
                delta = [a - b for a, b in zip(rss, base, strict=True)]
                per_conn[name].append(sum(delta) / n if n else float("nan"))
                if name == "gateway":
                    gw_only.append(delta[0] / n if n else float("nan"))
                log(
                    f"  idle {step} round {r + 1} {name:9} {n} held,"
                    f" RSS {'+'.join(str(x // 1024) for x in rss)} MB,"
                    f" {per_conn[name][-1]:.1f} KB/connection,"
                    f" failures {sum(failures[name].values())}"
                )
        out: dict[str, Any] = {"unit": "KB/connection", "connections": step}
        out["gateway"] = summary(gw_only)
        out["gatewayWithUpstream"] = summary(per_conn["gateway"])
        out["mosquitto"] = summary(per_conn["mosquitto"])
        for name in names:
            out[name]["connected"] = connected[name]
            out[name]["failures"] = failures[name]
        out["ratio"] = _ratio(out, "median")
        g = out["gatewayWithUpstream"]["median"]
        m = out["mosquitto"]["median"]
        out["ratioWithUpstream"] = round(g / m, 3) if g and m else None
        if out["gateway"]["median"]:
            out["extrapolated100kGiB"] = round(out["gateway"]["median"] * 100_000 / 1024**2, 2)
        out["target"] = "<= 1.0"
        return out

    def _hold(self, server: Server, devices: Sequence[Device]) -> tuple[list[Any], list[int]]:
        k = self.pool.size
        limit = 150.0
        parts = _split(devices, k)
        for i, part in enumerate(parts):
            self.pool.send(i, "hold", part, server.port, 128, limit)
        try:
            held = self.pool.collect("held", range(k), limit + 10)
            time.sleep(1.5)  # let both sides settle
            rss = server.rss_kb()
        finally:
            for i in range(k):
                self.pool.send(i, "release")
        self.pool.collect("result", range(k), 60)
        return held, rss

    # 4 -----------------------------------------------------------------------------
    def qos0(self, gateway: Server, mosq: Server, backend: bool = False) -> dict[str, Any]:
        """Devices publish, one subscriber counts: a device through the same server,
        or (``backend``) a backend application on the broker over plain TCP."""
        p = self.profile
        good = self.fleets["ec"].good
        devices = [good[-1], *good[-5:-1]]  # one subscriber, four publishers
        names = ("gateway", "mosquitto")
        rates: dict[str, list[float]] = {n: [] for n in names}
        cpu_pct: dict[str, list[float]] = {n: [] for n in names}
        per_cpu: dict[str, list[float]] = {n: [] for n in names}
        stalls: dict[str, int] = {n: 0 for n in names}
        self.foreign = []
        for r in range(p.rounds):
            for server in (gateway, mosq):
                topic = f"bench/q0{'b' if backend else ''}/{r}"
                sub = (server.backend_port, server.backend_prefix) if backend else None
                self.pool.send(
                    0, "pubsub", devices, server.port, topic, p.warmup, p.qos0_seconds, 2000, sub
                )
                self.pool.collect("ready", (0,), 60)
                self.pool.send(0, "go")
                used = self._window(server, p.qos0_seconds)
                (result,) = self.pool.collect("result", (0,), p.qos0_seconds + 60)
                rates[server.name].append(result["received"] / p.qos0_seconds)
                cpu_pct[server.name].append(100 * used / p.qos0_seconds)
                per_cpu[server.name].append(result["received"] / used if used > 0 else 0.0)
                stalls[server.name] += result["stalls"]
                log(
                    f"  qos0{'-backend' if backend else ''} round {r + 1} {server.name:9}"
                    f" {rates[server.name][-1]:9.0f} msg/s,"
                    f" server CPU {cpu_pct[server.name][-1]:5.1f}%, stalls {result['stalls']}"
                )
        out: dict[str, Any] = {
            "unit": "messages/s",
            "publishers": len(devices) - 1,
            "subscriber": "backend application (plain TCP)" if backend else "device",
        }
        for name in names:
            out[name] = summary(rates[name])
            out[name]["serverCpuPercent"] = summary(cpu_pct[name])
            out[name]["perServerCpuSecond"] = summary(per_cpu[name])
            out[name]["lossStalls"] = stalls[name]
        out["otherProcessesCpuPercent"] = summary(self.foreign)
        out["ratio"] = _ratio(out, "median")
        out["ratioPerCpu"] = _ratio_nested(out, "perServerCpuSecond")
        out["target"] = ">= 0.8"
        return out

    # 5 -----------------------------------------------------------------------------
    def est(self, gateway: Server, devices: Sequence[tuple[str, str, str]]) -> dict[str, Any]:
        """``rounds`` rounds of ``est_devices`` enrollments each (a device enrolls once)."""
        p = self.profile
        k = self.pool.size
        n = p.est_devices
        conc = max(1, p.est_concurrency // k)
        rates: list[float] = []
        per_cpu: list[float] = []
        cpu_pct: list[float] = []
        client_cpu: list[float] = []
        latency: list[float] = []
        statuses: dict[str, int] = {}
        self.foreign = []
        for r in range(p.rounds):
            batch = devices[r * n : (r + 1) * n]
            for i, part in enumerate(_split(batch, k)):
                self.pool.send(i, "est", gateway.port, EST_TENANT, part, conc)
            self.pool.collect("ready", range(k), 120)
            ours = [*gateway.pids, *(q.pid for q in self.pool.procs), os.getpid()]
            t0, b0, o0 = cpu_ticks(gateway.pids), busy_ticks(), cpu_ticks(ours)
            for i in range(k):
                self.pool.send(i, "go")
            results = self.pool.collect("result", range(k), 300)
            t1, b1, o1 = cpu_ticks(gateway.pids), busy_ticks(), cpu_ticks(ours)
            wall = max(x["t1"] for x in results) - min(x["t0"] for x in results)
            used = (t1 - t0) / CLK_TCK
            ok = sum(x["ok"] for x in results)
            rates.append(ok / wall)
            per_cpu.append(ok / used if used > 0 else 0.0)
            cpu_pct.append(100 * used / wall)
            client_cpu.append(100 * sum(x["cpu"] for x in results) / wall)
            self.foreign.append(100 * max((b1 - b0) - (o1 - o0), 0) / CLK_TCK / wall)
            for x in results:
                latency += x["latency"]
                for status, c in x["statuses"].items():
                    statuses[status] = statuses.get(status, 0) + c
            log(
                f"  est round {r + 1} {ok}/{len(batch)} enrolled in {wall:5.2f}s,"
                f" {rates[-1]:7.1f}/s, server CPU {cpu_pct[-1]:5.1f}%,"
                f" {per_cpu[-1]:6.1f}/CPU-s, load CPU {client_cpu[-1]:5.1f}%"
            )
            if not gateway.alive():
                raise RuntimeError("the gateway died during the EST test")
        lat = sorted(latency)
        g = summary(rates)
        g["perServerCpuSecond"] = summary(per_cpu)
        g["serverCpuPercent"] = summary(cpu_pct)
        g["statuses"] = statuses
        g["failures"] = {s: c for s, c in statuses.items() if s != "201"}
        g["latencyMsP50"] = round(1000 * lat[len(lat) // 2], 2) if lat else None
        g["latencyMsP99"] = round(1000 * lat[int(len(lat) * 0.99)], 2) if lat else None
        return {
            "unit": "enrollments/s",
            "enrollmentsPerRound": n,
            "concurrency": conc * k,
            "ca": "ECDSA P-256 tenant CA; ECDSA P-256 CSRs",
            "gateway": g,
            "peer": "none (no C EST server to run side by side): compared with the target",
            "loadCpuPercent": summary(client_cpu),
            "otherProcessesCpuPercent": summary(self.foreign),
            "ratioToTarget": round(g["median"] / EST_TARGET, 3) if g["median"] else None,
            "target": f">= {EST_TARGET:.0f}/s",
        }


def _ratio(out: dict[str, Any], key: str) -> float | None:
    g, m = out["gateway"][key], out["mosquitto"][key]
    return round(g / m, 3) if g and m else None


def _ratio_nested(out: dict[str, Any], key: str) -> float | None:
    g, m = out["gateway"][key]["median"], out["mosquitto"][key]["median"]
    return round(g / m, 3) if g and m else None


# ----------------------------------------------------------------------------------
# set-up


def fleet_dir(cache: Path, key: str, count: int) -> Manifest:
    """A cached fleet (3-certificate chains) with at least ``count`` devices."""
    d = cache / f"fleet-{key}-{count}"
    with contextlib.suppress(Exception):
        m = load_manifest(d)
        if len(m.devices) >= count:
            return m
    shutil.rmtree(d, ignore_errors=True)
    t = time.monotonic()
    generate_fleet(d, count, key_type=key, intermediate=True, prefix=f"{key}-")  # type: ignore[arg-type]
    log(f"generated {count} {key.upper()} devices in {time.monotonic() - t:.1f}s")
    return load_manifest(d)


async def prepare_store(data: Path, fleets: dict[str, Manifest]) -> None:
    """Tenants with the fleet roots, offline revocation on with entries, devices registered."""
    store = SqliteStore(data / "gateway.db")
    await store.open()
    try:
        now = datetime.now(UTC)
        rng = random.Random(7)
        for key, fleet in fleets.items():
            tenant = TENANTS[key]
            await register_fleet(
                StoreRegistrar(store, now, "bench"), fleet, tenant, preregister=True
            )
            serials = [
                (format(rng.getrandbits(120) | 1, "x"), None) for _ in range(REVOKED_ENTRIES)
            ]
            await ops.add_revocations(store, tenant, serials, now, "bench")
            await ops.set_revocation_settings(store, tenant, now, "bench", offline=True)
    finally:
        await store.close()


async def prepare_est(data: Path, count: int) -> list[tuple[str, str]]:
    """The EST tenant: an ECDSA P-256 tenant CA and ``count`` pending devices with
    an ``ENROLLMENT_OTP`` each (bulk CSV, hashed as the management API does)."""
    store = SqliteStore(data / "gateway.db")
    await store.open()
    try:
        now = datetime.now(UTC)
        box = await asyncio.to_thread(SecretBox.load_or_create, data)  # the gateway's KEK
        await ops.create_tenant(store, EST_TENANT, now, "bench")
        await CaService(store, box, CaConfig(key_type="ec")).create(EST_TENANT, now, "bench")
        devices = [(f"est-{i:06d}", os.urandom(9).hex()) for i in range(count)]
        hasher = enrollment_otp_hasher(box)
        for i in range(0, count, 2_000):  # a bulk CSV holds at most 5,000 rows
            part = devices[i : i + 2_000]
            csv = "ID;AUTH_TYPE;ENROLLMENT_OTP\n" + "".join(
                f"{device_id};CERTIFICATES;{otp}\n" for device_id, otp in part
            )
            result = await ops.bulk_register(
                store, EST_TENANT, csv.encode(), now, "bench", hash_otp=hasher
            )
            if result.failures or len(result.created) != len(part):
                raise RuntimeError(f"EST bulk registration refused rows: {result.failures[:3]}")
        return devices
    finally:
        await store.close()


def _csrs(device_ids: list[str]) -> list[str]:
    """Base64 DER PKCS#10 requests, CN = device id, fresh ECDSA P-256 keys (discarded)."""
    out = []
    for device_id in device_ids:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
        csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
        out.append(base64.b64encode(csr.public_bytes(serialization.Encoding.DER)).decode("ascii"))
    return out


def est_requests(devices: Sequence[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """(device id, OTP, CSR) per device; the keys and CSRs are made in a process pool."""
    ids = [device_id for device_id, _ in devices]
    chunks = [ids[i : i + 250] for i in range(0, len(ids), 250)]
    with ProcessPoolExecutor(os.cpu_count() or 1, mp_context=mp.get_context("spawn")) as pool:
        csrs = [csr for chunk in pool.map(_csrs, chunks) for csr in chunk]
    return [(d, otp, csr) for (d, otp), csr in zip(devices, csrs, strict=True)]


def machine() -> dict[str, Any]:
    try:
        mosq = subprocess.run(
            [MOSQUITTO, "-h"], capture_output=True, text=True, timeout=5, check=False
        ).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        mosq = "unknown"
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpuModel": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "mosquitto": mosq,
    }


# ----------------------------------------------------------------------------------
# report


def _fmt(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def _cell(s: dict[str, Any], digits: int) -> str:
    return f"{_fmt(s['median'], digits)} [{_fmt(s['min'], digits)}-{_fmt(s['max'], digits)}]"


def _failures(t: dict[str, Any]) -> str:
    g = sum(t["gateway"].get("failures", {}).values())
    m = sum(t["mosquitto"].get("failures", {}).values())
    return f"failed connects: {g} / {m}" if g or m else ""


def print_table(results: dict[str, Any]) -> None:
    rows: list[tuple[str, ...]] = []

    def add(label: str, t: dict[str, Any], key: str, digits: int, note: str = "") -> None:
        g, m = t["gateway"], t["mosquitto"]
        if key:
            g, m = g[key], m[key]
            ratio = t["ratioPerCpu"]
        else:
            ratio = t["ratio"]
        rows.append(
            (
                label,
                _cell(g, digits),
                _cell(m, digits),
                _fmt(ratio, 2) + "x",
                "" if key else t["target"],
                note,
            )
        )

    for name, label in (
        ("handshakes_ec", "mTLS handshakes, ECDSA chain (/s)"),
        ("handshakes_rsa", "mTLS handshakes, RSA 2048 (/s)"),
    ):
        t = results.get(name)
        if t:
            add(label, t, "", 0, _failures(t))
            add("  per server CPU-second", t, "perServerCpuSecond", 0)
            first = t["firstConnect"]
            g_cpu = first["gateway"]["perServerCpuSecond"]
            m_cpu = first["mosquitto"]["perServerCpuSecond"]
            rows.append(
                (
                    "  first connect, per server CPU-second",
                    f"{g_cpu:,.0f}",
                    f"{m_cpu:,.0f}",
                    _fmt(g_cpu / m_cpu if m_cpu else None, 2) + "x",
                    "",
                    f"{first['gateway']['perSecond']:,.0f} / {first['mosquitto']['perSecond']:,.0f}"
                    " per second",
                )
            )
    for t in results.get("idle", []):
        n = t["connections"]
        held = "held " + " / ".join(
            ",".join(str(c) for c in t[name]["connected"]) for name in ("gateway", "mosquitto")
        )
        add(f"idle memory, {n:,} conns (KB/conn)", t, "", 1, held)
        g = t["gatewayWithUpstream"]
        rows.append(
            (
                "  gateway + its upstream broker",
                _cell(g, 1),
                "",
                _fmt(t["ratioWithUpstream"], 2) + "x",
                "",
                f"100k idle: ~{t.get('extrapolated100kGiB', '-')} GiB (gateway)",
            )
        )
    for key, label in (
        ("qos0", "QoS 0 device->device (msg/s)"),
        ("qos0_backend", "QoS 0 device->backend app (msg/s)"),
        ("qos0_tls", "QoS 0 device->device, upstream TLS"),
        ("qos0_backend_tls", "QoS 0 device->backend app, upstream TLS"),
    ):
        t = results.get(key)
        if t:
            add(label, t, "", 0)
            add("  per server CPU-second", t, "perServerCpuSecond", 0)
    t = results.get("est")
    if t:
        g = t["gateway"]
        failed = sum(g["failures"].values())
        rows.append(
            (
                "EST enrollments, ECDSA P-256 CA (/s)",
                _cell(g, 0),
                "n/a (no C peer)",
                _fmt(t["ratioToTarget"], 2) + "x",
                t["target"],
                "ratio = gateway / 500/s" + (f"; failed enrollments: {failed}" if failed else ""),
            )
        )
        rows.append(("  per server CPU-second", _cell(g["perServerCpuSecond"], 0), "", "", "", ""))
    headers = (
        "test",
        "gateway median [min-max]",
        "mosquitto median [min-max]",
        "ratio",
        "target",
        "",
    )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print()
    for row in (headers, *rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    print()


# ----------------------------------------------------------------------------------
# main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="about one minute, small sizes")
    ap.add_argument("--rounds", type=int, help="rounds per test (at least 3 recommended)")
    ap.add_argument(
        "--only",
        default="handshakes-ec,handshakes-rsa,idle,qos0,est",
        help="comma-separated subset of handshakes-ec,handshakes-rsa,idle,qos0,est",
    )
    ap.add_argument(
        "--gateway-loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="the gateway's event_loop setting (default: auto, as shipped)",
    )
    ap.add_argument(
        "--gateway-launcher",
        type=Path,
        help="run this script instead of `-m gateway` (same arguments): A/B tests of patches",
    )
    ap.add_argument("--idle-steps", help="comma-separated idle connection counts")
    ap.add_argument("--out", type=Path, default=ROOT / "var" / "bench", help="result directory")
    ap.add_argument(
        "--keep-work", action="store_true", help="keep the work directory (configs, server logs)"
    )
    args = ap.parse_args()
    profile = QUICK if args.quick else FULL
    if args.rounds:
        profile = Profile(**{**profile.__dict__, "rounds": args.rounds})
    if args.idle_steps:
        steps = tuple(int(s) for s in args.idle_steps.split(","))
        profile = Profile(
            **{**profile.__dict__, "idle_steps": steps, "idle_rounds": tuple(1 for _ in steps)}
        )
    only = set(args.only.split(","))
    started = time.monotonic()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    server_cpus, load_cpus, cpu_note = plan_cpus()
    soft, hard = raise_nofile()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / f"work-{stamp}"
    work.mkdir()
    notes = [cpu_note]
    log(f"profile {profile.name}; {cpu_note}; RLIMIT_NOFILE {soft}/{hard}")

    # the largest idle step must fit the gateway's descriptors: device + upstream socket each
    steps: list[tuple[int, int]] = []
    if "idle" in only:
        for step, rounds in zip(profile.idle_steps, profile.idle_rounds, strict=True):
            need = 2 * step + 200
            if need > soft:
                fit = (soft - 200) // 2 // 500 * 500
                msg = (
                    f"{step:,}-connection idle step skipped: RLIMIT_NOFILE is {soft} and cannot be"
                    f" raised here, the gateway needs about {need} descriptors (a device socket"
                    f" and an upstream socket per connection)"
                )
                if fit >= 1000 and fit not in profile.idle_steps:
                    msg += f"; measuring {fit:,} connections instead"
                    steps.append((fit, rounds))
                print(msg, file=sys.stderr)
                notes.append(msg)
            else:
                steps.append((step, rounds))

    cache = args.out / "cache"
    ec_count = max([profile.ec_devices, *(s for s, _ in steps)])
    fleets = {"ec": fleet_dir(cache, "ec", ec_count)}
    if "handshakes-rsa" in only:
        fleets["rsa"] = fleet_dir(cache, "rsa", profile.rsa_devices)
    data = work / "data"
    data.mkdir()
    asyncio.run(prepare_store(data, fleets))
    log("store prepared (tenants, anchors, revocations, device users)")
    est_items: list[tuple[str, str, str]] = []
    if "est" in only:
        t = time.monotonic()
        pending = asyncio.run(prepare_est(data, profile.est_devices * profile.rounds))
        est_items = est_requests(pending)
        log(
            f"EST: tenant CA, {len(est_items)} pending devices and CSRs prepared"
            f" in {time.monotonic() - t:.1f}s"
        )

    pin(load_cpus)  # this process and the load processes stay off the servers' CPU
    nload = max(1, len(load_cpus) or (os.cpu_count() or 1))
    pool = LoadPool(nload, load_cpus)
    bench = Bench(args, profile, work, server_cpus, load_cpus, pool, fleets, notes=notes)
    bench.data = data
    bench.cafile = work / "clients-ca.pem"
    bench.cafile.write_bytes(b"".join(f.root_cert.read_bytes() for f in fleets.values()))

    results: dict[str, Any] = {}
    phases: dict[str, float] = {}
    gateway = mosq = None
    mark = time.monotonic()

    def phase(name: str) -> None:
        nonlocal mark
        now = time.monotonic()
        phases[name] = round(now - mark, 1)
        mark = now

    phase("setup")
    try:
        if only & {"handshakes-ec", "handshakes-rsa", "qos0"}:
            gateway, mosq = bench.gateway(), bench.mosquitto()
            if "handshakes-ec" in only:
                log("handshakes, ECDSA P-256 chain")
                results["handshakes_ec"] = bench.handshakes("ec", gateway, mosq)
                phase("handshakes-ec")
            if "handshakes-rsa" in only:
                log("handshakes, RSA 2048 chain")
                results["handshakes_rsa"] = bench.handshakes("rsa", gateway, mosq)
                phase("handshakes-rsa")
            if "qos0" in only:
                log("QoS 0 throughput")
                results["qos0"] = bench.qos0(gateway, mosq)
                phase("qos0")
                log("QoS 0 throughput, backend subscriber")
                results["qos0_backend"] = bench.qos0(gateway, mosq, backend=True)
                phase("qos0-backend")
                gateway.stop()
                gateway = bench.gateway(upstream_tls=True)
                log("QoS 0 throughput, gateway -> upstream over TLS")
                results["qos0_tls"] = bench.qos0(gateway, mosq)
                phase("qos0-tls")
                log("QoS 0 throughput, backend subscriber, gateway -> upstream over TLS")
                results["qos0_backend_tls"] = bench.qos0(gateway, mosq, backend=True)
                phase("qos0-backend-tls")
            gateway.stop()
            mosq.stop()
            gateway = mosq = None
        if steps:
            results["idle"] = []
            for step, rounds in steps:
                log(f"idle connections: {step}")
                results["idle"].append(bench.idle(step, rounds))
                phase(f"idle-{step}")
        if "est" in only:
            log("EST enrollments")
            gateway = bench.gateway("https")
            results["est"] = bench.est(gateway, est_items)
            gateway.stop()
            gateway = None
            phase("est")
    finally:
        for server in (gateway, mosq):
            if server is not None:
                server.stop()
        pool.close()
    elapsed = time.monotonic() - started
    foreign = [
        t["otherProcessesCpuPercent"]["median"]
        for t in (
            results.get(k)
            for k in (
                "handshakes_ec",
                "handshakes_rsa",
                "qos0",
                "qos0_backend",
                "qos0_tls",
                "qos0_backend_tls",
                "est",
            )
        )
        if t and t["otherProcessesCpuPercent"]["median"] is not None
    ]
    if foreign:
        busy = statistics.median(foreign)
        text = (
            f"other processes on this machine used {busy:.0f}% of a CPU (median) during the"
            " measurement windows"
        )
        if busy > 20:
            text = (
                "WARNING: "
                + text
                + ": the per-second throughputs and their ratios are unreliable, compare the"
                " per-server-CPU-second rows (a saturated core delivers exactly that many)"
            )
        bench.notes.append(text)
    doc = {
        "started": stamp,
        "profile": profile.__dict__,
        "gatewayLoop": args.gateway_loop,
        "gatewayLauncher": str(args.gateway_launcher) if args.gateway_launcher else None,
        "seconds": round(elapsed, 1),
        "phaseSeconds": phases,
        "machine": machine(),
        "rlimitNofile": [soft, hard],
        "notes": bench.notes,
        "results": results,
    }
    out = args.out / f"result-{stamp}.json"
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print_table(results)
    for note in bench.notes:
        print(f"note: {note}")
    print(f"total {elapsed:.0f}s; results in {out}")
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
