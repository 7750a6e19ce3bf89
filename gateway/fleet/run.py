"""``fleet run``: many devices, several worker processes, one merged report.

The parent splits the devices round-robin over ``workers`` processes (spawned,
one event loop each, uvloop when installed), releases them together, samples
the gateway's RSS, shows progress and merges their :class:`WorkerStats`.
Device ``g`` (0-based, over the whole run) starts at ``g / rate`` seconds, so
the arrival rate is the requested one whatever the worker count. A connected
device publishes every ``publish_interval`` seconds (0: only keep-alives)
until ``duration`` has passed, then disconnects. With a reconnect storm every
live session is dropped at half time and reconnects at once, unpaced.

Bounded: workers stop themselves after ``duration`` plus the connect timeout
plus a grace period; the parent terminates any worker still alive after
``hard_timeout`` and reports what it has.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing as mp
import os
import queue
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any, TextIO

from gateway.fleet.driver import (
    ConnectFailure,
    Device,
    DeviceSession,
    Driver,
    DriverOptions,
    classify,
    load_driver,
)
from gateway.fleet.report import FleetReport, WorkerStats, build_report

__all__ = ["RunOptions", "default_workers", "read_rss_kb", "run_fleet"]

GRACE = 10.0
"""Seconds workers get beyond duration + connect timeout to close sessions."""
PROGRESS_INTERVAL = 0.5
REJECTION_CATEGORIES = frozenset({"tls", "connack", "http", "coap", "reset", "closed"})
"""Failure categories that count as the gateway refusing a (bad) device."""


@dataclass(frozen=True, slots=True)
class RunOptions:
    """One ``fleet run``."""

    protocol: str
    """Driver name (see :data:`gateway.fleet.driver.DRIVERS`)."""
    driver: DriverOptions
    devices: int
    """How many devices of the manifest to use (the first N)."""
    rate: float
    """New connections per second during the ramp."""
    duration: float
    """Seconds from the first arrival until devices disconnect."""
    publish_interval: float = 1.0
    """Seconds between a device's messages; 0 sends none (keep-alives only)."""
    workers: int = 1
    reconnect_storm: bool = False
    """Drop every session at half time and reconnect all at once."""
    hard_timeout: float | None = None
    """Parent's limit in seconds (default: duration + connect timeout + 2 x grace)."""
    gateway_pid: int | None = None
    """Sample this process's RSS from ``/proc/PID/status``."""
    seed: int = 1
    extra_notes: tuple[str, ...] = field(default=())

    @property
    def limit(self) -> float:
        if self.hard_timeout is not None:
            return self.hard_timeout
        return self.duration + self.driver.connect_timeout + 2 * GRACE

    def settings(self) -> dict[str, Any]:
        d = self.driver
        return {
            "protocol": self.protocol,
            "host": d.host,
            "port": d.port,
            "devices": self.devices,
            "rate": self.rate,
            "duration": self.duration,
            "publishInterval": self.publish_interval,
            "qos": d.qos,
            "workers": self.workers,
            "reconnectStorm": self.reconnect_storm,
            "tenant": d.tenant,
        }


def default_workers() -> int:
    """One worker per CPU this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def read_rss_kb(pid: int) -> int | None:
    """``VmRSS`` of a process in KiB (None if it is gone or unreadable)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def install_fast_loop() -> str:
    """Use uvloop for the next ``asyncio.run`` when installed; returns the loop name."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


# worker process ------------------------------------------------------------------


class _Worker:
    """The devices of one worker process."""

    def __init__(
        self,
        options: RunOptions,
        devices: Sequence[tuple[int, Device]],
        report: Callable[[dict[str, int]], None],
    ) -> None:
        self.options = options
        self.devices = devices
        self.report = report
        self.stats = WorkerStats()
        self.live = 0
        self.driver: Driver = load_driver(options.protocol, options.driver)
        self.rng = random.Random(options.seed)
        self.t0 = self.t_end = 0.0
        self.storm_at = math.inf

    def counters(self) -> dict[str, int]:
        s = self.stats
        return {
            "attempts": s.attempts,
            "connected": s.connected,
            "failed": s.attempts - s.connected,
            "live": self.live,
            "messages": s.messages,
        }

    async def run(self) -> WorkerStats:
        loop = asyncio.get_running_loop()
        o = self.options
        self.t0 = loop.time()
        self.t_end = self.t0 + o.duration
        self.storm_at = self.t0 + o.duration / 2 if o.reconnect_storm else math.inf
        progress = asyncio.create_task(self._progress())
        tasks: set[asyncio.Task[None]] = set()
        deadline = self.t_end + o.driver.connect_timeout + GRACE
        try:
            for g, device in self.devices:
                at = self.t0 + g / o.rate
                if at >= self.t_end:
                    break
                delay = at - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.add(asyncio.create_task(self._life(device)))
            if tasks:
                _, pending = await asyncio.wait(tasks, timeout=max(deadline - loop.time(), 0))
                for t in pending:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            progress.cancel()
            await asyncio.gather(progress, return_exceptions=True)
        self.report(self.counters())
        return self.stats

    async def _progress(self) -> None:
        while True:
            self.report(self.counters())
            await asyncio.sleep(PROGRESS_INTERVAL)

    async def _attempt(self, device: Device, storm: bool) -> DeviceSession | None:
        s = self.stats
        s.attempts += 1
        if storm:
            s.storm_attempts += 1
        else:
            s.first_attempt = min(s.first_attempt, time.time())
        if device.bad:
            s.bad_attempted += 1
        try:
            session = await self.driver.connect(device)
        except Exception as exc:  # a driver bug must not end the run: count it
            reason = exc.reason if isinstance(exc, ConnectFailure) else classify(exc)
            s.add_failure(reason)
            if not device.bad:
                s.good_failed += 1
            elif reason.split(":", 1)[0] in REJECTION_CATEGORIES:
                s.bad_rejected += 1
            return None
        now = time.time()
        s.connected += 1
        s.tcp.append(session.timings.tcp)
        s.tls.append(session.timings.tls)
        s.accept.append(session.timings.accept)
        if storm:
            s.storm_connected += 1
            s.storm_end = max(s.storm_end, now)
        else:
            s.last_connect = max(s.last_connect, now)
        if device.bad:
            s.unexpected_accepts += 1
        return session

    async def _life(self, device: Device) -> None:
        loop = asyncio.get_running_loop()
        o = self.options
        s = self.stats
        session = await self._attempt(device, storm=False)
        if session is None:
            return
        self.live += 1
        try:
            if device.bad:
                return
            interval = o.publish_interval
            ping_every = max(o.driver.keepalive * 0.5, 0.5)
            now = loop.time()
            next_pub = now + (self.rng.uniform(0, interval) if interval > 0 else math.inf)
            last_sent = now
            stormed = not o.reconnect_storm
            seq = 0
            while True:
                now = loop.time()
                if now >= self.t_end:
                    break
                if session.failure is not None:
                    s.add_drop(session.failure)
                    self._collect(session)
                    self.live -= 1
                    return
                wake = min(self.t_end, next_pub, last_sent + ping_every)
                if not stormed:
                    wake = min(wake, self.storm_at)
                if wake > now:
                    await asyncio.sleep(wake - now)
                    continue
                if not stormed and now >= self.storm_at:
                    stormed = True
                    s.storm_start = min(s.storm_start, time.time())
                    self._collect(session)
                    session.abort()
                    self.live -= 1
                    reconnected = await self._attempt(device, storm=True)
                    if reconnected is None:
                        return
                    session = reconnected
                    self.live += 1
                    last_sent = loop.time()
                    continue
                try:
                    if now >= next_pub:
                        seq += 1
                        await session.send(seq)
                        s.messages += 1
                        wall = time.time()
                        s.send_start = min(s.send_start, wall)
                        s.send_end = max(s.send_end, wall)
                        next_pub = max(next_pub + interval, now)
                    else:
                        await session.keepalive()
                except (ConnectFailure, OSError) as exc:
                    if session.failure is None:  # not seen by the transport: end it here
                        session.abort()
                        s.add_drop(classify(exc))
                        self._collect(session)
                        self.live -= 1
                        return
                    continue  # counted as a drop at the top of the loop
                last_sent = loop.time()
            s.live_at_end += 1
            self._collect(session)
        finally:
            if session.failure is None:
                await session.close()
                self.live -= 1

    def _collect(self, session: DeviceSession) -> None:
        """Add a finished session's acknowledgements (called once per session)."""
        self.stats.acked += session.acked
        self.stats.ack_latency.extend(session.take_ack_latencies())


def _worker_main(
    index: int,
    options: RunOptions,
    devices: list[tuple[int, Device]],
    out: Any,
    go: Any,
) -> None:
    """Entry point of a worker process."""
    install_fast_loop()
    out.put(("ready", index, None))
    if not go.wait(60):
        out.put(("error", index, "never released by the parent"))
        return
    limit = options.duration + options.driver.connect_timeout + 2 * GRACE

    def report(counters: dict[str, int]) -> None:
        out.put(("progress", index, counters))

    async def main() -> WorkerStats:
        worker = _Worker(options, devices, report)
        return await asyncio.wait_for(worker.run(), limit)

    try:
        stats = asyncio.run(main())
    except Exception as exc:  # report, do not hang the parent
        out.put(("error", index, f"{exc.__class__.__name__}: {exc}"))
        return
    out.put(("result", index, stats.to_dict()))


# parent ---------------------------------------------------------------------------


class _Progress:
    """One self-rewriting status line on a terminal."""

    def __init__(self, stream: TextIO, total: int, duration: float, enabled: bool) -> None:
        self.stream = stream
        self.total = total
        self.duration = duration
        self.enabled = enabled
        self._shown = False

    def show(self, elapsed: float, c: dict[str, int], rss_kb: int | None) -> None:
        if not self.enabled:
            return
        done = min(elapsed / self.duration, 1.0) if self.duration > 0 else 1.0
        bar = "#" * int(done * 20)
        rss = f"  gw {rss_kb / 1024:.0f} MB" if rss_kb else ""
        line = (
            f"\r[{bar:<20}] {elapsed:5.1f}s  connected {c.get('connected', 0)}/{self.total}"
            f"  live {c.get('live', 0)}  failed {c.get('failed', 0)}"
            f"  msgs {c.get('messages', 0)}{rss}"
        )
        self.stream.write(line + "\x1b[K")
        self.stream.flush()
        self._shown = True

    def end(self) -> None:
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()


def run_fleet(
    options: RunOptions,
    devices: Sequence[Device],
    *,
    progress: TextIO | None = None,
) -> FleetReport:
    """Run the fleet and return the merged report (blocks; bounded by ``options.limit``)."""
    if options.rate <= 0 or options.duration <= 0:
        raise ValueError("rate and duration must be greater than 0")
    if not 1 <= options.devices <= len(devices):
        raise ValueError(f"--devices must be between 1 and {len(devices)} (the manifest's size)")
    if options.protocol == "mqtt-service" and not options.driver.tenant:
        raise ValueError("protocol mqtt-service needs --tenant")
    chosen = list(enumerate(devices[: options.devices]))
    nworkers = max(1, min(options.workers, len(chosen)))
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    go = ctx.Event()
    procs: list[BaseProcess] = []
    for w in range(nworkers):
        mine = chosen[w::nworkers]
        p = ctx.Process(
            target=_worker_main,
            args=(w, options, mine, out, go),
            name=f"fleet-worker-{w}",
            daemon=True,
        )
        p.start()
        procs.append(p)
    notes = list(options.extra_notes)
    bar = _Progress(
        progress or sys.stderr,
        options.devices,
        options.duration,
        enabled=progress is not None or sys.stderr.isatty(),
    )
    results: dict[int, WorkerStats] = {}
    counters: dict[int, dict[str, int]] = {}
    rss: dict[str, Any] | None = None
    try:
        ready = 0
        start_deadline = time.monotonic() + 60
        while ready < nworkers:
            left = start_deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError("fleet workers did not start within 60 s")
            kind, index, payload = _get(out, min(left, 1.0)) or ("", -1, None)
            if kind == "ready":
                ready += 1
            elif kind == "error":
                raise RuntimeError(f"fleet worker {index}: {payload}")
            elif not any(p.is_alive() for p in procs):
                raise RuntimeError("fleet workers exited before starting")
        if options.gateway_pid is not None:
            start_rss = read_rss_kb(options.gateway_pid)
            rss = {"pid": options.gateway_pid, "rssStartKb": start_rss, "rssPeakKb": start_rss}
        go.set()
        t0 = time.monotonic()
        next_sample = t0
        while len(results) < nworkers:
            now = time.monotonic()
            if now - t0 > options.limit:
                missing = sorted(set(range(nworkers)) - set(results))
                notes.append(f"hard timeout: workers {missing} were stopped, their data is lost")
                break
            if now >= next_sample:
                next_sample = now + PROGRESS_INTERVAL
                sample = read_rss_kb(options.gateway_pid) if options.gateway_pid else None
                if rss is not None and sample is not None:
                    rss["rssPeakKb"] = max(rss["rssPeakKb"] or 0, sample)
                total = _sum_counters(counters.values())
                bar.show(now - t0, total, sample)
            msg = _get(out, 0.1)
            if msg is None:
                if not any(p.is_alive() for p in procs) and out.empty():
                    notes.append("workers exited without a result")
                    break
                continue
            kind, index, payload = msg
            if kind == "progress":
                counters[index] = payload
            elif kind == "result":
                results[index] = WorkerStats.from_dict(payload)
            elif kind == "error":
                notes.append(f"worker {index} failed: {payload}")
                results[index] = WorkerStats()
        elapsed = time.monotonic() - t0
    finally:
        bar.end()
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        out.close()
    if rss is not None and options.gateway_pid is not None:
        rss["rssEndKb"] = read_rss_kb(options.gateway_pid)
    settings = options.settings()
    settings["workers"] = nworkers
    settings["eventLoop"] = "uvloop" if _has_uvloop() else "asyncio"
    return build_report(settings, results.values(), elapsed, rss, notes)


def _get(q: Any, timeout: float) -> tuple[str, int, Any] | None:
    try:
        msg: tuple[str, int, Any] = q.get(timeout=max(timeout, 0.0))
    except queue.Empty:
        return None
    return msg


def _sum_counters(parts: Any) -> dict[str, int]:
    total: dict[str, int] = {}
    for c in parts:
        for k, v in c.items():
            total[k] = total.get(k, 0) + v
    return total


def _has_uvloop() -> bool:
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: F401

        return True
    return False
