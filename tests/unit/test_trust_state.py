"""TrustState: the snapshot follows the store, decisions are cached and
invalidated by the changes that affect them."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

from gateway import operations
from gateway.pki import make_ca, make_device, make_server, write_private
from gateway.store.sqlite import SqliteStore
from gateway.trust_state import TrustState
from trust.model import DeviceIdentity, Listener, Reason, Registration, Rejection, Status
from trust.policy import DecisionPolicy


def now() -> datetime:
    # not a module constant: a long run must not leave it minutes behind fresh certificates
    return datetime.now(UTC)


async def _state(tmp_path: Path) -> tuple[TrustState, SqliteStore, list[bytes], list[bytes]]:
    store = SqliteStore(tmp_path / "g.db")
    await store.open()
    await store.create_tenant("t1")
    root = make_ca("Root")
    srv = make_server(make_ca("Srv CA"))
    (tmp_path / "s.pem").write_bytes(srv.cert_pem())
    write_private(tmp_path / "s.key", srv.key_pem())
    await operations.add_trusted_certificate(
        store, "t1", root.cert_pem().decode(), "root", Status.ENABLED, True, now(), "test"
    )
    a = make_device("dev-a", root)
    b = make_device("dev-b", root)
    ts = TrustState(
        store, DecisionPolicy(), server_cert=tmp_path / "s.pem", server_key=tmp_path / "s.key"
    )
    await ts.start()
    chain_a = [a.cert.public_bytes(Encoding.DER), root.cert.public_bytes(Encoding.DER)]
    chain_b = [b.cert.public_bytes(Encoding.DER), root.cert.public_bytes(Encoding.DER)]
    return ts, store, chain_a, chain_b


async def test_decisions_follow_store_changes(tmp_path: Path) -> None:
    ts, store, chain_a, chain_b = await _state(tmp_path)
    try:
        d = ts.decide_der(chain_a, Listener.MQTT_CORE)
        assert isinstance(d, DeviceIdentity) and d.registration is Registration.AUTO
        assert ts.decide_der(chain_a, Listener.MQTT_CORE) is d  # cached
        await store.register_device("t1", "dev-a", "auto", now())
        await ts.refresh()  # (the poll loop may have applied it already)
        d2 = ts.decide_der(chain_a, Listener.MQTT_CORE)
        assert isinstance(d2, DeviceIdentity) and d2.registration is Registration.EXISTING
        await operations.set_device_enabled(store, "t1", "dev-a", False, now(), "test")
        await ts.refresh()
        r = ts.decide_der(chain_a, Listener.MQTT_CORE)
        assert isinstance(r, Rejection) and r.reason is Reason.DEVICE_DISABLED
        # the other device is unaffected
        assert isinstance(ts.decide_der(chain_b, Listener.MQTT_CORE), DeviceIdentity)
        fp = (await store.list_trusted_certificates("t1"))[0].fingerprint
        await operations.update_trusted_certificate(
            store, "t1", fp, now(), "test", status=Status.DISABLED
        )
        await ts.refresh()
        r = ts.decide_der(chain_b, Listener.MQTT_CORE)
        assert isinstance(r, Rejection) and r.reason is Reason.ANCHOR_DISABLED
    finally:
        await ts.stop()
        await store.close()


async def test_malformed_and_missing_chains(tmp_path: Path) -> None:
    ts, store, chain_a, _ = await _state(tmp_path)
    try:
        r = ts.decide_der([], Listener.MQTT_CORE)
        assert isinstance(r, Rejection) and r.reason is Reason.NO_CERTIFICATE
        r = ts.decide_der([b"\x30\x03junk"], Listener.MQTT_CORE)
        assert isinstance(r, Rejection) and r.reason is Reason.MALFORMED
        # a listener is part of the cache key: the same chain decides per listener
        assert isinstance(ts.decide_der(chain_a, Listener.MQTT_SERVICE), DeviceIdentity)
        r = ts.decide_der(chain_a, Listener.LWM2M)
        assert isinstance(r, Rejection) and r.reason is Reason.NOT_REGISTERED
    finally:
        await ts.stop()
        await store.close()
