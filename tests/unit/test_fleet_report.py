"""Percentiles, the exact merge of worker statistics and the fleet report."""

from __future__ import annotations

import json
import math
import random

import pytest

from gateway.fleet.report import (
    FleetReport,
    WorkerStats,
    build_report,
    merge,
    percentile,
    render_table,
    summarize,
)


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 11)]
    assert percentile(values, 50) == 5.0
    assert percentile(values, 90) == 9.0
    assert percentile(values, 99) == 10.0
    assert percentile(values, 100) == 10.0
    assert percentile(values, 10) == 1.0
    assert percentile(values, 0.1) == 1.0
    assert percentile([7.0], 50) == 7.0
    assert math.isnan(percentile([], 50))
    for bad in (0, -1, 101):
        with pytest.raises(ValueError):
            percentile(values, bad)


def test_percentile_matches_the_definition() -> None:
    rng = random.Random(9)
    for n in (1, 2, 3, 99, 100, 101, 1000):
        values = sorted(rng.random() for _ in range(n))
        for p in (50.0, 90.0, 99.0):
            v = percentile(values, p)
            at_or_below = sum(1 for x in values if x <= v)
            below = sum(1 for x in values if x < v)
            assert at_or_below / n >= p / 100  # at least p % at or below
            assert below / n < p / 100  # and it is the smallest such sample


def test_summarize_in_milliseconds() -> None:
    lat = summarize([0.004, 0.001, 0.003, 0.002])
    assert (lat.count, lat.p50, lat.p90, lat.p99, lat.max) == (4, 2.0, 4.0, 4.0, 4.0)
    empty = summarize([])
    assert empty.count == 0 and math.isnan(empty.p50)
    assert empty.as_json() == {"count": 0, "p50": None, "p90": None, "p99": None, "max": None}


def _worker(samples: list[float], **kw: object) -> WorkerStats:
    s = WorkerStats(tls=list(samples), accept=list(samples), **kw)  # type: ignore[arg-type]
    return s


def test_merge_is_exact() -> None:
    a = _worker(
        [0.001] * 90,
        attempts=100,
        connected=90,
        failures={"tls:tlsv1_alert_unknown_ca": 10},
        first_attempt=100.0,
        last_connect=101.0,
        send_start=100.5,
        send_end=110.0,
        messages=900,
    )
    b = _worker(
        [0.1] * 10,
        attempts=10,
        connected=10,
        failures={"tls:tlsv1_alert_unknown_ca": 1, "timeout": 2},
        first_attempt=100.2,
        last_connect=102.0,
        send_start=100.7,
        send_end=111.0,
        messages=100,
    )
    total = merge([a, b])
    assert total.attempts == 110 and total.connected == 100 and total.messages == 1000
    assert total.failures == {"tls:tlsv1_alert_unknown_ca": 11, "timeout": 2}
    assert (total.first_attempt, total.last_connect) == (100.0, 102.0)
    assert (total.send_start, total.send_end) == (100.5, 111.0)
    # percentiles of all samples, not the mean of per-worker percentiles
    merged = summarize(total.tls)
    assert merged.p50 == pytest.approx(1.0)
    assert merged.p90 == pytest.approx(1.0)
    assert merged.p99 == pytest.approx(100.0)
    assert summarize(a.tls).p99 == pytest.approx(1.0)
    # the inputs are left alone
    assert len(a.tls) == 90 and a.failures == {"tls:tlsv1_alert_unknown_ca": 10}


def test_merge_of_nothing_and_of_an_idle_worker() -> None:
    empty = merge([])
    assert empty.attempts == 0 and math.isinf(empty.first_attempt)
    one = merge([WorkerStats(attempts=3, connected=3, first_attempt=5.0), WorkerStats()])
    assert one.first_attempt == 5.0 and one.attempts == 3


def test_dict_round_trip_through_json() -> None:
    s = WorkerStats(attempts=2, connected=1, tls=[0.5], failures={"timeout": 1})
    s.add_failure("timeout")
    s.add_drop("reset")
    data = json.loads(json.dumps(s.to_dict()))  # workers send plain JSON-able dicts
    assert data["first_attempt"] is None
    back = WorkerStats.from_dict(data)
    assert back == s
    assert WorkerStats.from_dict({"attempts": 1, "unknown": 3}).attempts == 1


def test_report_rates_and_outcome() -> None:
    parts = [
        WorkerStats(
            attempts=60,
            connected=55,
            storm_attempts=10,
            storm_connected=10,
            bad_attempted=5,
            bad_rejected=5,
            failures={"tls:tlsv1_alert_unknown_ca": 3, "reset": 2},
            first_attempt=10.0,
            last_connect=10.5,
            send_start=10.0,
            send_end=12.0,
            messages=200,
            storm_start=11.0,
            storm_end=11.25,
        )
    ]
    report = build_report({"protocol": "mqtt", "devices": 50}, parts, 3.0)
    assert report.initial_connects == 45
    assert report.connects_per_second == pytest.approx(90.0)
    assert report.messages_per_second == pytest.approx(100.0)
    assert report.ok
    assert report.errors_by_category() == {"reset": 2, "tls": 3}
    data = report.as_json()
    assert data["storm"] == {"attempts": 10, "reconnected": 10, "seconds": 0.25}
    assert data["badDevices"] == {"expectedRejected": 5, "rejected": 5, "unexpectedAccepts": 0}
    json.dumps(data)  # serialisable
    text = render_table(report)
    assert "5/5 rejected as expected" in text and "result: OK" in text


@pytest.mark.parametrize(
    "change",
    [{"unexpected_accepts": 1}, {"good_failed": 1}, {"bad_rejected": 4}],
)
def test_report_not_ok(change: dict[str, int]) -> None:
    base = {"bad_attempted": 5, "bad_rejected": 5}
    report = FleetReport({}, WorkerStats(**{**base, **change}), 1.0)  # type: ignore[arg-type]
    assert not report.ok
    assert "UNEXPECTED OUTCOMES" in render_table(report)


def test_rates_without_a_window_are_zero() -> None:
    report = build_report({}, [WorkerStats(connected=3)], 1.0)
    assert report.connects_per_second == 0.0
    assert report.messages_per_second == 0.0
