"""A small Prometheus metrics registry (text exposition format 0.0.4).

Counters, gauges and histograms with labels; no dependency, no background
thread. ``REGISTRY`` is the process-wide default the gateway renders on the
admin listener's ``/metrics``.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Sequence

LabelValues = tuple[str, ...]


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.labels = tuple(labels)
        self._lock = threading.Lock()

    def _key(self, values: Sequence[str]) -> LabelValues:
        if len(values) != len(self.labels):
            raise ValueError(f"{self.name}: expected labels {self.labels}, got {tuple(values)}")
        return tuple(str(v) for v in values)

    def _fmt_labels(self, key: LabelValues, extra: tuple[tuple[str, str], ...] = ()) -> str:
        pairs = list(zip(self.labels, key, strict=True)) + list(extra)
        if not pairs:
            return ""
        inner = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs)
        return "{" + inner + "}"

    def render(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self._values: dict[LabelValues, float] = {}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, *labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        return [
            f"{self.name}{self._fmt_labels(k)} {_num(v)}" for k, v in sorted(self._values.items())
        ]


class Gauge(_Metric):
    kind = "gauge"

    def __init__(
        self,
        name: str,
        help_text: str,
        labels: Sequence[str] = (),
        collect: Callable[[], dict[LabelValues, float]] | None = None,
    ) -> None:
        super().__init__(name, help_text, labels)
        self._values: dict[LabelValues, float] = {}
        self._collect = collect

    def set(self, value: float, *labels: str) -> None:
        self._values[self._key(labels)] = value

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def dec(self, *labels: str, amount: float = 1.0) -> None:
        self.inc(*labels, amount=-amount)

    def value(self, *labels: str) -> float:
        if self._collect is not None:
            return self._collect().get(self._key(labels), 0.0)
        return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        values = self._collect() if self._collect is not None else self._values
        return [f"{self.name}{self._fmt_labels(k)} {_num(v)}" for k, v in sorted(values.items())]


DEFAULT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram(_Metric):
    kind = "histogram"

    def __init__(
        self,
        name: str,
        help_text: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        super().__init__(name, help_text, labels)
        self.buckets = tuple(sorted(buckets))
        self._counts: dict[LabelValues, list[int]] = {}
        self._sums: dict[LabelValues, float] = {}

    def observe(self, value: float, *labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            counts = self._counts.setdefault(key, [0] * (len(self.buckets) + 1))
            counts[bisect.bisect_left(self.buckets, value)] += 1
            self._sums[key] = self._sums.get(key, 0.0) + value

    def count(self, *labels: str) -> int:
        return sum(self._counts.get(self._key(labels), []))

    def render(self) -> list[str]:
        out = []
        for key in sorted(self._counts):
            running = 0
            counts = self._counts[key]
            for bound, c in zip((*self.buckets, math.inf), counts, strict=True):
                running += c
                le = "+Inf" if bound == math.inf else _num(bound)
                out.append(f"{self.name}_bucket{self._fmt_labels(key, (('le', le),))} {running}")
            out.append(f"{self.name}_sum{self._fmt_labels(key)} {_num(self._sums[key])}")
            out.append(f"{self.name}_count{self._fmt_labels(key)} {running}")
        return out


class Registry:
    """Holds metrics by name; ``render()`` gives the exposition text."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def register(self, metric: _Metric) -> None:
        self._metrics[metric.name] = metric

    def counter(self, name: str, help_text: str, labels: Sequence[str] = ()) -> Counter:
        existing = self._metrics.get(name)
        if isinstance(existing, Counter):
            return existing
        m = Counter(name, help_text, labels)
        self.register(m)
        return m

    def gauge(
        self,
        name: str,
        help_text: str,
        labels: Sequence[str] = (),
        collect: Callable[[], dict[LabelValues, float]] | None = None,
    ) -> Gauge:
        m = Gauge(name, help_text, labels, collect)
        self.register(m)
        return m

    def histogram(
        self,
        name: str,
        help_text: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> Histogram:
        existing = self._metrics.get(name)
        if isinstance(existing, Histogram):
            return existing
        m = Histogram(name, help_text, labels, buckets)
        self.register(m)
        return m

    def render(self) -> str:
        lines: list[str] = []
        for m in self._metrics.values():
            lines.append(f"# HELP {m.name} {m.help}")
            lines.append(f"# TYPE {m.name} {m.kind}")
            lines.extend(m.render())
        return "\n".join(lines) + "\n"


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v: float) -> str:
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


class GatewayMetrics:
    """The gateway's metric set (one per process, shared by all listeners)."""

    def __init__(self, registry: Registry | None = None) -> None:
        self.registry = registry or Registry()
        r = self.registry
        self.handshakes = r.counter(
            "mtls_gateway_handshakes_total",
            "TLS/DTLS handshakes and connection decisions by listener, result and reason.",
            ("listener", "result", "reason"),
        )
        self.refused = r.counter(
            "mtls_gateway_connections_refused_total",
            "Connections refused before the handshake (limits).",
            ("listener", "reason"),
        )
        self.registrations = r.counter(
            "mtls_gateway_registrations_total",
            "Device users created on first connect.",
            ("tenant", "via"),
        )
        self.handshake_seconds = r.histogram(
            "mtls_gateway_handshake_seconds",
            "Time from accept to a decided TLS handshake.",
            ("listener",),
        )
        self.messages = r.counter(
            "mtls_gateway_mqtt_messages_total",
            "MQTT PUBLISH packets forwarded, by direction.",
            ("listener", "direction"),
        )
        self.sessions_closed = r.counter(
            "mtls_gateway_sessions_closed_by_trust_total",
            "Live sessions closed because of a trust change.",
            ("reason",),
        )
        self.malformed = r.counter(
            "mtls_gateway_protocol_errors_total",
            "Peers disconnected for malformed or forbidden protocol input.",
            ("listener", "reason"),
        )
        self.connect_refused = r.counter(
            "mtls_gateway_mqtt_connect_refused_total",
            "MQTT connections that ended before a session opened (CONNECT refused, "
            "timed out, malformed or dropped), by reason code.",
            ("listener", "reason"),
        )
