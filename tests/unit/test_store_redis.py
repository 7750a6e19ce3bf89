"""RedisStore: the shared contract plus what only a shared server adds (several
instances, notifications, losing and regaining Redis), all against a real redis-server.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis.asyncio

from gateway.store import open_store
from gateway.store.base import StoreError, StoreUnavailable
from gateway.store.redis import RedisStore
from gateway.trust_state import TrustState
from tests.helpers import Pki, free_port
from tests.redis_server import RedisServer
from tests.unit.store_suite import FP1, T0, StoreContract, anchor
from trust.model import ChangeKind, PendingRegistration
from trust.policy import DecisionPolicy


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of this test alone (it gets killed or frozen), with persistence."""
    with RedisServer(tmp_path / "redis", persistent=True) as server:
        yield server


def fresh_namespace() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


class TestRedisStore(StoreContract):
    @pytest.fixture
    async def store(self, redis_server: RedisServer) -> AsyncIterator[RedisStore]:
        s = RedisStore(redis_server.url, namespace=fresh_namespace())
        await s.open()
        yield s
        await s.close()


@pytest.fixture
async def pair(redis_server: RedisServer) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    """Two stores on one namespace: what two gateway instances see."""
    namespace = fresh_namespace()
    a = RedisStore(redis_server.url, namespace=namespace)
    b = RedisStore(redis_server.url, namespace=namespace)
    await a.open()
    await b.open()
    yield a, b
    await a.close()
    await b.close()


async def drain(store: RedisStore) -> None:
    """Consume notifications already received (the first call also subscribes)."""
    assert await store.wait_for_change(5.0)  # the subscription itself counts as a change
    while await store.wait_for_change(0.1):
        pass


# --- several instances ---------------------------------------------------------


async def test_instances_see_each_others_changes(pair: tuple[RedisStore, RedisStore]) -> None:
    a, b = pair
    await a.create_tenant("t1")
    await b.add_trusted_certificate(anchor("t1"))
    assert await a.change_seq() == await b.change_seq() == 2
    expected = [(ChangeKind.TENANT, "t1", ""), (ChangeKind.ANCHOR, "t1", FP1)]
    for s in (a, b):
        assert [(c.kind, c.tenant, c.key) for c in await s.changes_since(0)] == expected
    assert await a.get_trusted_certificate("t1", FP1) == anchor("t1")


async def test_wait_for_change_wakes_other_instance(pair: tuple[RedisStore, RedisStore]) -> None:
    a, b = pair
    await drain(b)
    assert not await b.wait_for_change(0.3)  # nothing happened: times out
    waiter = asyncio.create_task(b.wait_for_change(5.0))
    start = time.monotonic()
    await a.create_tenant("t1")
    assert await asyncio.wait_for(waiter, 2.0) is True
    assert time.monotonic() - start < 1.0
    assert [c.tenant for c in await b.changes_since(0)] == ["t1"]
    # a write that changes nothing publishes nothing
    await a.create_tenant("t1")
    await a.set_option("t1", "k", "v")
    assert not await b.wait_for_change(0.3)


async def test_namespaces_are_isolated(redis_server: RedisServer) -> None:
    one = RedisStore(redis_server.url, namespace=fresh_namespace())
    two = RedisStore(redis_server.url, namespace=fresh_namespace())
    await one.open()
    await two.open()
    try:
        await drain(two)
        await one.create_tenant("t1")
        assert await two.list_tenants() == []
        assert await two.change_seq() == 0
        assert not await two.wait_for_change(0.3)
        raw = redis.asyncio.Redis.from_url(redis_server.url, decode_responses=True)
        try:
            keys = [k async for k in raw.scan_iter(match=f"*{one.namespace}*")]
        finally:
            await raw.aclose()
        assert keys and all(k.startswith(f"{{{one.namespace}}}:") for k in keys)
    finally:
        await one.close()
        await two.close()


async def test_register_device_race_across_instances(
    pair: tuple[RedisStore, RedisStore],
) -> None:
    a, b = pair
    await a.create_tenant("t1")
    await a.add_pending_registration(PendingRegistration("t1", "dev"))
    calls = [s.register_device("t1", "dev", f"via-{i}", T0) for s in (a, b) for i in range(20)]
    results = await asyncio.gather(*calls)
    assert sum(created for _, created in results) == 1
    (winner,) = [u for u, created in results if created]
    assert all(u == winner for u, _ in results)
    kinds = [c.kind for c in await b.changes_since(0)]
    assert kinds.count(ChangeKind.DEVICE) == 1
    assert kinds.count(ChangeKind.PENDING) == 2  # added once, consumed once
    assert await b.list_pending_registrations("t1") == []


async def test_trust_state_refreshes_on_notification(
    pair: tuple[RedisStore, RedisStore], tmp_path: Path
) -> None:
    a, b = pair
    pki = Pki.create(tmp_path / "pki")
    state = TrustState(
        b,
        DecisionPolicy(),
        server_cert=pki.dir / "server.pem",
        server_key=pki.dir / "server.key",
        refresh_interval=30.0,  # polling alone would not see the change during this test
    )
    await state.start()

    async def seen(tenant: str) -> bool:
        deadline = time.monotonic() + 1.0
        while tenant not in state.snapshot.tenants and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return tenant in state.snapshot.tenants

    try:
        await a.create_tenant("t1")
        assert await seen("t1")  # woken by the subscription or by the notification
        await a.create_tenant("t2")
        assert await seen("t2")  # subscribed by now: only the notification can wake it
    finally:
        await state.stop()


# --- losing Redis ----------------------------------------------------------------


async def test_loss_of_redis_and_recovery(own_server: RedisServer) -> None:
    a = RedisStore(own_server.url, namespace="gw")
    b = RedisStore(own_server.url, namespace="gw")
    await a.open()
    await b.open()
    try:
        await a.create_tenant("t1")
        await a.add_trusted_certificate(anchor("t1"))
        seq = await a.change_seq()
        await drain(b)

        own_server.kill()
        for call in (a.ping, a.list_tenants, lambda: a.create_tenant("t2"), b.change_seq):
            start = time.monotonic()
            with pytest.raises(StoreUnavailable, match=r"Redis store .* unavailable") as info:
                await call()
            assert time.monotonic() - start < 3.0
            assert not isinstance(info.value, redis.RedisError)
        assert not await b.wait_for_change(0.3)  # no notification, and no exception

        own_server.start(same_port=True)
        await a.ping()  # the very first call after the restart succeeds
        assert await a.list_tenants() == ["t1"]  # written before the crash, kept by the AOF
        assert await a.get_trusted_certificate("t1", FP1) == anchor("t1")
        assert await b.change_seq() == seq
        assert await a.create_tenant("t2") is True
        # the subscriber came back by itself: the resubscription counts as a change
        assert await b.wait_for_change(5.0)
        while await b.wait_for_change(0.1):
            pass
        await a.create_tenant("t3")
        assert await b.wait_for_change(1.0)
        assert [c.tenant for c in await b.changes_since(seq)] == ["t2", "t3"]
    finally:
        await a.close()
        await b.close()


async def test_unresponsive_redis_times_out(own_server: RedisServer) -> None:
    s = RedisStore(own_server.url, namespace="gw", timeout=1.0)
    await s.open()
    try:
        await s.create_tenant("t1")
        own_server.freeze()
        try:
            start = time.monotonic()
            with pytest.raises(StoreUnavailable, match="unavailable"):
                await s.list_tenants()
            assert time.monotonic() - start < 3.0
        finally:
            own_server.thaw()
        assert await s.list_tenants() == ["t1"]
    finally:
        await s.close()


async def test_unreachable_redis_at_open(tmp_path: Path) -> None:
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"  # nothing listens there
    s = RedisStore(url)
    start = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        await s.open()
    assert time.monotonic() - start < 3.0
    assert "127.0.0.1" in str(info.value) and "s3cret" not in str(info.value)
    with pytest.raises(StoreUnavailable, match="not open"):
        await s.ping()
    with pytest.raises(StoreUnavailable, match="not open"):
        await s.wait_for_change(0.1)


# --- lifecycle, URL, layout --------------------------------------------------------


async def test_open_store_url(redis_server: RedisServer) -> None:
    store = open_store(f"redis://127.0.0.1:{redis_server.port}/0")
    assert isinstance(store, RedisStore) and store.namespace == "mtlsgw"
    await store.open()
    try:
        tenant = f"t-{uuid.uuid4().hex[:8]}"
        assert await store.create_tenant(tenant) is True
        assert tenant in await store.list_tenants()
    finally:
        await store.close()


async def test_data_survives_reopen_and_close_is_idempotent(redis_server: RedisServer) -> None:
    s = RedisStore(redis_server.url, namespace=fresh_namespace())
    await s.open()
    with pytest.raises(StoreError, match="already open"):
        await s.open()
    await s.create_tenant("t1")
    await s.close()
    await s.close()
    with pytest.raises(StoreUnavailable):
        await s.list_tenants()
    await s.open()
    try:
        assert await s.list_tenants() == ["t1"]
        assert await s.change_seq() == 1
    finally:
        await s.close()


async def test_newer_layout_is_refused(redis_server: RedisServer) -> None:
    namespace = fresh_namespace()
    raw = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        await raw.set(f"{{{namespace}}}:schema", 99)
    finally:
        await raw.aclose()
    s = RedisStore(redis_server.url, namespace=namespace)
    with pytest.raises(StoreError, match=r"layout version 99.*upgrade") as info:
        await s.open()
    assert not isinstance(info.value, StoreUnavailable)


def test_bad_namespace_and_url() -> None:
    for bad in ("", "a b", "{x}", "x" * 65):
        with pytest.raises(StoreError, match="namespace"):
            RedisStore("redis://127.0.0.1/0", namespace=bad)
    with pytest.raises(StoreError, match="unsupported store URL"):
        open_store("redis+sentinel://host/0")


async def test_bad_url_scheme_at_open() -> None:
    with pytest.raises(StoreError, match="bad store URL"):
        await RedisStore("http://127.0.0.1/0").open()


async def test_trim_keeps_recent_and_newest(redis_server: RedisServer) -> None:
    namespace = fresh_namespace()
    s = RedisStore(redis_server.url, namespace=namespace, change_keep_rows=3)
    await s.open()
    for i in range(6):
        await s.create_tenant(f"t{i}")
    assert await s.trim_changes() == 0  # all recent: nothing trimmed
    await s.close()

    aged = RedisStore(
        redis_server.url,
        namespace=namespace,
        change_keep_rows=3,
        change_retention=timedelta(seconds=-5),  # everything counts as old
    )
    await aged.open()  # trims at open
    try:
        assert [c.seq for c in await aged.changes_since(0)] == [4, 5, 6]
        assert await aged.change_seq() == 6
        await aged.create_tenant("t9")
        assert (await aged.changes_since(6))[0].seq == 7  # seqs are never reused
    finally:
        await aged.close()
