"""What a fleet run measured: per-worker statistics, their merge, the report.

Workers fill a :class:`WorkerStats` each and send it to the parent as a plain
dict; :func:`merge` adds them up exactly (latency samples are kept raw, so the
percentiles of the merged run are the percentiles of all samples, not an
average of per-worker percentiles). Percentiles use the nearest-rank method:
``p`` is the smallest sample with at least ``p`` % of the samples at or below it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = [
    "FleetReport",
    "LatencySummary",
    "WorkerStats",
    "build_report",
    "merge",
    "percentile",
    "render_table",
    "summarize",
]

PERCENTILES = (50.0, 90.0, 99.0)


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values (``nan`` when empty)."""
    if not sorted_values:
        return math.nan
    if not 0 < p <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {p}")
    rank = math.ceil(p / 100.0 * len(sorted_values))
    return sorted_values[max(rank, 1) - 1]


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """Percentiles of one latency, in milliseconds."""

    count: int
    p50: float
    p90: float
    p99: float
    max: float

    def as_json(self) -> dict[str, float | int | None]:
        def num(v: float) -> float | None:
            return None if math.isnan(v) else round(v, 3)

        return {
            "count": self.count,
            "p50": num(self.p50),
            "p90": num(self.p90),
            "p99": num(self.p99),
            "max": num(self.max),
        }


def summarize(seconds: Iterable[float]) -> LatencySummary:
    """Percentiles (ms) of latencies given in seconds."""
    ms = sorted(v * 1000.0 for v in seconds)
    p50, p90, p99 = (percentile(ms, p) for p in PERCENTILES)
    return LatencySummary(len(ms), p50, p90, p99, ms[-1] if ms else math.nan)


@dataclass(slots=True)
class WorkerStats:
    """Everything one worker measured. Times are wall-clock (``time.time()``)."""

    attempts: int = 0
    """Connect attempts (initial connects and storm reconnects)."""
    connected: int = 0
    """Attempts that ended with the gateway's positive answer."""
    failures: dict[str, int] = field(default_factory=dict)
    """Failed attempts by reason label (see :mod:`gateway.fleet.driver`)."""
    drops: dict[str, int] = field(default_factory=dict)
    """Established sessions that ended before the run did, by reason."""
    tcp: list[float] = field(default_factory=list)
    tls: list[float] = field(default_factory=list)
    accept: list[float] = field(default_factory=list)
    """Latency samples in seconds (successful connects only)."""
    messages: int = 0
    acked: int = 0
    ack_latency: list[float] = field(default_factory=list)
    bad_attempted: int = 0
    """Connect attempts by devices the manifest marks as bad."""
    bad_rejected: int = 0
    """... refused by the gateway (TLS failure or protocol refusal)."""
    unexpected_accepts: int = 0
    """... accepted although they should not be."""
    good_failed: int = 0
    """Attempts by good devices that failed."""
    storm_attempts: int = 0
    storm_connected: int = 0
    first_attempt: float = math.inf
    last_connect: float = 0.0
    """Window of the initial ramp (connects/s)."""
    storm_start: float = math.inf
    storm_end: float = 0.0
    """From the storm's disconnect until its last reconnect."""
    send_start: float = math.inf
    send_end: float = 0.0
    """Window in which messages were sent (messages/s)."""
    live_at_end: int = 0
    """Sessions still up when the run ended."""

    def add_failure(self, reason: str) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + 1

    def add_drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("first_attempt", "storm_start", "send_start"):
            if math.isinf(out[key]):
                out[key] = None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkerStats:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for key in ("first_attempt", "storm_start", "send_start"):
            if values.get(key) is None:
                values[key] = math.inf
        return cls(**values)


def merge(parts: Iterable[WorkerStats]) -> WorkerStats:
    """Exact sum of several workers' statistics."""
    total = WorkerStats()
    failures: Counter[str] = Counter()
    drops: Counter[str] = Counter()
    for s in parts:
        for name in (
            "attempts",
            "connected",
            "messages",
            "acked",
            "bad_attempted",
            "bad_rejected",
            "unexpected_accepts",
            "good_failed",
            "storm_attempts",
            "storm_connected",
            "live_at_end",
        ):
            setattr(total, name, getattr(total, name) + getattr(s, name))
        for name in ("tcp", "tls", "accept", "ack_latency"):
            getattr(total, name).extend(getattr(s, name))
        failures.update(s.failures)
        drops.update(s.drops)
        total.first_attempt = min(total.first_attempt, s.first_attempt)
        total.last_connect = max(total.last_connect, s.last_connect)
        total.storm_start = min(total.storm_start, s.storm_start)
        total.storm_end = max(total.storm_end, s.storm_end)
        total.send_start = min(total.send_start, s.send_start)
        total.send_end = max(total.send_end, s.send_end)
    total.failures = dict(failures)
    total.drops = dict(drops)
    return total


def _rate(count: int, start: float, end: float) -> float:
    span = end - start
    if count <= 0 or not math.isfinite(span) or span <= 0:
        return 0.0
    return count / span


@dataclass(frozen=True, slots=True)
class FleetReport:
    """The merged result of one ``fleet run``."""

    settings: dict[str, Any]
    stats: WorkerStats
    elapsed: float
    gateway: dict[str, Any] | None = None
    notes: tuple[str, ...] = ()

    @property
    def initial_connects(self) -> int:
        return self.stats.connected - self.stats.storm_connected

    @property
    def connects_per_second(self) -> float:
        s = self.stats
        return _rate(self.initial_connects, s.first_attempt, s.last_connect)

    @property
    def messages_per_second(self) -> float:
        s = self.stats
        return _rate(s.messages, s.send_start, s.send_end)

    @property
    def ok(self) -> bool:
        """Every good device connected and every bad one was refused."""
        s = self.stats
        return (
            s.unexpected_accepts == 0 and s.good_failed == 0 and s.bad_rejected == s.bad_attempted
        )

    def errors_by_category(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for reason, n in self.stats.failures.items():
            out[reason.split(":", 1)[0]] += n
        return dict(sorted(out.items()))

    def as_json(self) -> dict[str, Any]:
        s = self.stats
        storm = None
        if s.storm_attempts:
            storm = {
                "attempts": s.storm_attempts,
                "reconnected": s.storm_connected,
                "seconds": round(s.storm_end - s.storm_start, 3) if s.storm_end else None,
            }
        return {
            "settings": self.settings,
            "elapsedSeconds": round(self.elapsed, 3),
            "connects": {
                "attempts": s.attempts,
                "succeeded": s.connected,
                "failed": s.attempts - s.connected,
                "perSecond": round(self.connects_per_second, 1),
            },
            "latencyMs": {
                "tcp": summarize(s.tcp).as_json(),
                "tls": summarize(s.tls).as_json(),
                "connack": summarize(s.accept).as_json(),
                "ack": summarize(s.ack_latency).as_json(),
            },
            "messages": {
                "sent": s.messages,
                "acked": s.acked,
                "perSecond": round(self.messages_per_second, 1),
            },
            "errors": dict(sorted(s.failures.items())),
            "errorsByCategory": self.errors_by_category(),
            "drops": dict(sorted(s.drops.items())),
            "badDevices": {
                "expectedRejected": s.bad_attempted,
                "rejected": s.bad_rejected,
                "unexpectedAccepts": s.unexpected_accepts,
            },
            "goodDevicesFailed": s.good_failed,
            "liveAtEnd": s.live_at_end,
            "storm": storm,
            "gateway": self.gateway,
            "notes": list(self.notes),
            "ok": self.ok,
        }


def build_report(
    settings: dict[str, Any],
    parts: Iterable[WorkerStats],
    elapsed: float,
    gateway: dict[str, Any] | None = None,
    notes: Sequence[str] = (),
) -> FleetReport:
    return FleetReport(settings, merge(parts), elapsed, gateway, tuple(notes))


def _fmt_ms(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.1f}"


def render_table(report: FleetReport) -> str:
    """The human summary printed at the end of ``fleet run``."""
    s = report.stats
    st = report.settings
    lines = [
        f"fleet run: {st.get('protocol')} {st.get('host')}:{st.get('port')}, "
        f"{st.get('devices')} devices at {st.get('rate')}/s for {st.get('duration')}s, "
        f"{st.get('workers')} workers ({report.elapsed:.1f}s)",
        "",
        f"  connects      {s.connected}/{s.attempts} succeeded, "
        f"{report.connects_per_second:.1f}/s during the ramp",
        f"  messages      {s.messages} sent, {s.acked} acked, {report.messages_per_second:.1f}/s",
        f"  live at end   {s.live_at_end}",
        "",
        "  latency (ms)     count      p50      p90      p99      max",
    ]
    for label, values in (
        ("TCP connect", s.tcp),
        ("TLS handshake", s.tls),
        ("CONNACK", s.accept),
        ("PUBACK", s.ack_latency),
    ):
        lat = summarize(values)
        lines.append(
            f"  {label:<15}{lat.count:>7} {_fmt_ms(lat.p50):>8} {_fmt_ms(lat.p90):>8}"
            f" {_fmt_ms(lat.p99):>8} {_fmt_ms(lat.max):>8}"
        )
    lines += [
        "",
        f"  bad devices   {s.bad_rejected}/{s.bad_attempted} rejected as expected, "
        f"{s.unexpected_accepts} unexpectedly accepted",
        f"  good devices  {s.good_failed} failed to connect",
    ]
    if s.storm_attempts:
        secs = s.storm_end - s.storm_start if s.storm_end else math.nan
        lines.append(
            f"  storm         {s.storm_connected}/{s.storm_attempts} reconnected in "
            f"{_fmt_ms(secs * 1000.0)} ms"
        )
    if s.failures:
        lines += ["", "  connect errors by reason:"]
        for reason, n in sorted(s.failures.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"    {n:>7}  {reason}")
    if s.drops:
        lines += ["", "  sessions lost during the run:"]
        for reason, n in sorted(s.drops.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"    {n:>7}  {reason}")
    if report.gateway:
        g = report.gateway
        lines += [
            "",
            f"  gateway pid {g.get('pid')}: RSS {g.get('rssStartKb')} KB at start, "
            f"peak {g.get('rssPeakKb')} KB, {g.get('rssEndKb')} KB at end",
        ]
    for note in report.notes:
        lines.append(f"  note: {note}")
    lines.append("")
    lines.append("  result: " + ("OK" if report.ok else "UNEXPECTED OUTCOMES (see above)"))
    return "\n".join(lines)
