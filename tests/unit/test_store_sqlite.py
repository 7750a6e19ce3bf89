"""SqliteStore: the shared contract plus SQLite-only behaviour (files, processes, schema)."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.store.base import NotFound, StoreError, StoreUnavailable
from gateway.store.migrations import MIGRATIONS, migrate, schema_version
from gateway.store.sqlite import SqliteStore, decode_time, encode_time, from_url
from tests.unit.store_suite import FP1, T0, StoreContract, anchor
from trust.model import ChangeKind, RevocationEntry, RevocationSettings, Status

ROOT = Path(__file__).resolve().parents[2]


class TestSqliteStore(StoreContract):
    @pytest.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[SqliteStore]:
        s = SqliteStore(tmp_path / "store.db")
        await s.open()
        yield s
        await s.close()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "store.db")
    await s.open()
    yield s
    await s.close()


def raw(path: str | Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def run_python(script: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 30) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return out


# --- durability and file settings ----------------------------------------------


async def test_data_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    s = SqliteStore(path)
    await s.open()
    await s.create_tenant("t1")
    cert = anchor(status=Status.DISABLED, created=T0, pop_code="p", pop_code_until=T0)
    await s.add_trusted_certificate(cert)
    await s.add_revocations([RevocationEntry("t1", 77, T0)])
    await s.set_revocation_settings("t1", RevocationSettings(offline=True))
    await s.register_device("t1", "d", "auto", T0)
    seq = await s.change_seq()
    await s.close()

    again = SqliteStore(str(path))
    await again.open()
    try:
        assert await again.list_tenants() == ["t1"]
        assert await again.get_trusted_certificate("t1", FP1) == cert
        assert await again.list_revocations("t1") == [RevocationEntry("t1", 77, T0)]
        assert await again.get_revocation_settings("t1") == RevocationSettings(offline=True)
        assert (await again.get_device("t1", "d")).created == T0
        assert await again.change_seq() == seq
        assert len(await again.changes_since(0)) == seq
    finally:
        await again.close()


async def test_file_is_wal_with_latest_schema(store: SqliteStore) -> None:
    conn = raw(store.path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert schema_version(conn) == len(MIGRATIONS) >= 1
    finally:
        conn.close()


async def test_connection_pragmas(store: SqliteStore) -> None:
    def pragmas(conn: sqlite3.Connection) -> list[int]:
        names = ("synchronous", "foreign_keys", "busy_timeout")
        return [conn.execute(f"PRAGMA {p}").fetchone()[0] for p in names]

    assert await store._read(pragmas) == [1, 1, 5000]  # NORMAL, on, 5 s


async def test_open_twice_close_twice_reopen(store: SqliteStore) -> None:
    with pytest.raises(StoreError, match="already open"):
        await store.open()
    await store.create_tenant("t1")
    await store.close()
    await store.close()
    with pytest.raises(StoreUnavailable):
        await store.ping()
    with pytest.raises(StoreUnavailable):
        await store.list_tenants()
    await store.open()
    assert await store.list_tenants() == ["t1"]


async def test_open_unreachable_path_is_unavailable(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "missing-dir" / "store.db")
    with pytest.raises(StoreUnavailable, match="missing-dir"):
        await s.open()
    with pytest.raises(StoreUnavailable):
        await s.ping()


async def test_not_a_database_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not a database file at all" * 200)
    s = SqliteStore(path)
    with pytest.raises(StoreError) as info:
        await s.open()
    assert not isinstance(info.value, sqlite3.Error)
    assert str(path) in str(info.value)


# --- several processes ---------------------------------------------------------

WRITER = """
import asyncio, sys
from datetime import UTC, datetime
from gateway.store.sqlite import SqliteStore
from trust.model import Status, TrustedCertificate

async def main(path):
    s = SqliteStore(path)
    await s.open()
    await s.create_tenant("t2")
    await s.add_trusted_certificate(TrustedCertificate(
        "t2", "cc" * 20, "from cli", Status.ENABLED, False, "PEM", created=datetime.now(UTC)))
    await s.register_device("t1", "cli-dev", "api", datetime.now(UTC))
    await s.close()

asyncio.run(main(sys.argv[1]))
"""


async def test_second_process_writes_are_visible(store: SqliteStore) -> None:
    await store.create_tenant("t1")
    seq = await store.change_seq()
    await asyncio.to_thread(finish, run_python(WRITER, store.path))
    assert await store.change_seq() == seq + 3
    changes = [(c.kind, c.tenant, c.key) for c in await store.changes_since(seq)]
    assert changes == [
        (ChangeKind.TENANT, "t2", ""),
        (ChangeKind.ANCHOR, "t2", "cc" * 20),
        (ChangeKind.DEVICE, "t1", "cli-dev"),
    ]
    assert (await store.get_trusted_certificate("t2", "cc" * 20)).name == "from cli"
    assert await store.find_device_tenants("cli-dev") == ["t1"]


REGISTRAR = """
import asyncio, json, sys, time
from datetime import UTC, datetime
from gateway.store.sqlite import SqliteStore

async def main(path, start, count):
    s = SqliteStore(path)
    await s.open()
    while time.time() < start:
        await asyncio.sleep(0.002)
    created = []
    for i in range(count):
        _, new = await s.register_device("t1", f"d{i:03d}", "auto", datetime.now(UTC))
        if new:
            created.append(f"d{i:03d}")
    await s.close()
    print(json.dumps(created))

asyncio.run(main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3])))
"""


async def test_two_processes_register_each_device_once(store: SqliteStore) -> None:
    await store.create_tenant("t1")
    count = 150
    start = str(time.time() + 1.0)  # both race from the same instant, in the same order
    procs = [run_python(REGISTRAR, store.path, start, str(count)) for _ in range(2)]
    outs = [await asyncio.to_thread(finish, p) for p in procs]
    a, b = (set(json.loads(o)) for o in outs)
    assert not a & b
    assert a | b == {f"d{i:03d}" for i in range(count)}
    assert len(await store.list_devices("t1")) == count
    kinds = [c.kind for c in await store.changes_since(0)]
    assert kinds.count(ChangeKind.DEVICE) == count


async def test_lock_wait_does_not_block_the_event_loop(store: SqliteStore) -> None:
    holder = raw(store.path)
    holder.execute("BEGIN IMMEDIATE")  # another "process" holds the write lock
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    tick_task = asyncio.create_task(ticker())
    write = asyncio.create_task(store.create_tenant("t1"))
    await asyncio.sleep(0.3)
    assert not write.done()
    holder.execute("ROLLBACK")
    holder.close()
    assert await asyncio.wait_for(write, 5) is True
    tick_task.cancel()
    assert ticks >= 15


async def test_lock_held_past_busy_timeout_is_unavailable(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "store.db", busy_timeout=0.2)
    await s.open()
    holder = raw(s.path)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreUnavailable, match="locked"):
            await s.create_tenant("t1")
        holder.execute("ROLLBACK")
        assert await s.create_tenant("t1") is True
        assert await s.tenant_exists("t1")
    finally:
        holder.close()
        await s.close()


async def test_failed_write_rolls_back_whole_transaction(store: SqliteStore) -> None:
    await store.create_tenant("t1")
    await store.add_revocations([RevocationEntry("t1", 1, T0)])
    seq = await store.change_seq()
    with pytest.raises(NotFound):
        await store.add_revocations([RevocationEntry("t1", 2, T0), RevocationEntry("x", 3, T0)])
    assert [e.serial for e in await store.list_revocations("t1")] == [1]
    assert await store.change_seq() == seq
    assert await store.create_tenant("t2") is True  # connection usable: no open transaction


# --- migrations ----------------------------------------------------------------


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    conn = raw(path)
    conn.execute("PRAGMA user_version = 999")
    conn.close()
    s = SqliteStore(path)
    with pytest.raises(StoreError, match=r"schema version 999.*upgrade mtls-gateway") as info:
        await s.open()
    assert not isinstance(info.value, StoreUnavailable)
    conn = raw(path)
    assert schema_version(conn) == 999  # untouched
    conn.close()


def test_migrate_applies_each_step_once_in_order(tmp_path: Path) -> None:
    conn = raw(tmp_path / "m.db")
    steps: list[tuple[str, ...]] = [
        ("CREATE TABLE log (step INTEGER)", "INSERT INTO log VALUES (1)"),
        ("INSERT INTO log VALUES (2)",),
    ]
    assert migrate(conn, steps) == 2
    assert migrate(conn, steps) == 2  # idempotent
    steps.append(("INSERT INTO log VALUES (3)",))
    assert migrate(conn, steps) == 3
    assert [r[0] for r in conn.execute("SELECT step FROM log ORDER BY rowid")] == [1, 2, 3]
    assert schema_version(conn) == 3
    conn.close()


def test_failed_migration_step_leaves_previous_version(tmp_path: Path) -> None:
    conn = raw(tmp_path / "m.db")
    steps = [
        ("CREATE TABLE a (x)",),
        ("CREATE TABLE b (x)", "THIS IS NOT SQL"),
    ]
    with pytest.raises(sqlite3.OperationalError):
        migrate(conn, steps)
    assert schema_version(conn) == 1
    assert not conn.in_transaction
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "a" in tables and "b" not in tables
    conn.close()


# --- change-feed trimming -------------------------------------------------------


async def test_trim_keeps_recent_and_newest_rows(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    s = SqliteStore(path, change_keep_rows=2)
    await s.open()
    for i in range(6):
        await s.create_tenant(f"t{i}")
    assert await s.trim_changes() == 0  # all recent: nothing trimmed
    await s.close()

    conn = raw(path)  # age the first four changes beyond retention
    conn.execute("UPDATE changes SET at = '2000-01-01T00:00:00.000000Z' WHERE seq <= 4")
    conn.close()

    s = SqliteStore(path, change_keep_rows=3)
    await s.open()  # trims at open
    try:
        assert [c.seq for c in await s.changes_since(0)] == [4, 5, 6]  # seq 4 is in newest 3
        assert await s.change_seq() == 6
        await s.create_tenant("t9")
        assert (await s.changes_since(6))[0].seq == 7  # seqs are never reused
    finally:
        await s.close()


async def test_change_seq_does_not_go_back_when_feed_emptied(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    s = SqliteStore(path, change_keep_rows=0)
    await s.open()
    await s.create_tenant("t1")
    await s.close()
    conn = raw(path)
    conn.execute("UPDATE changes SET at = '2000-01-01T00:00:00.000000Z'")
    conn.close()
    await s.open()
    try:
        assert await s.changes_since(0) == []
        assert await s.change_seq() == 1
    finally:
        await s.close()


# --- URLs and encoding ----------------------------------------------------------


def test_from_url(tmp_path: Path) -> None:
    assert from_url("sqlite:///var/lib/gw/store.db").path == "/var/lib/gw/store.db"
    assert from_url("sqlite:var/store.db").path == "var/store.db"
    assert from_url("sqlite:///tmp/my%20store.db").path == "/tmp/my store.db"
    for bad in ("sqlite://host/x.db", "redis://localhost", "sqlite:", "sqlite:///", "/x.db"):
        with pytest.raises(StoreError, match="store URL"):
            from_url(bad)


aware = st.datetimes(
    min_value=datetime(1, 1, 2),
    max_value=datetime(9999, 12, 30),
    timezones=st.sampled_from(
        [UTC, timezone(timedelta(hours=-7)), timezone(timedelta(hours=5, minutes=30))]
    ),
)


@given(aware, aware)
def test_time_encoding_round_trips_and_sorts(a: datetime, b: datetime) -> None:
    ea, eb = encode_time(a), encode_time(b)
    assert decode_time(ea) == a and decode_time(ea).utcoffset() == timedelta(0)
    assert (ea < eb) == (a < b) and (ea == eb) == (a == b)
    assert len(ea) == len(eb) == 27
