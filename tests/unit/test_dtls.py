"""The sans-IO DTLS server against in-memory pyOpenSSL clients (no sockets):
cookie exchange, MTU packing, trust decision in the handshake, timers, caps,
session replacement and counted drops. ``now`` is injected everywhere."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from hypothesis import given
from hypothesis import strategies as st
from OpenSSL import SSL

from gateway.dtls import (
    Closed,
    CookieJar,
    DataReceived,
    DtlsSendError,
    DtlsServer,
    DtlsSettings,
    Established,
    complete_chain,
    index_by_subject,
    pack_datagrams,
    parse_client_hello,
    split_records,
)
from gateway.metrics import GatewayMetrics
from gateway.pki import make_ca, make_device
from protocols.lwm2m.client import client_context
from tests.helpers import Pki
from trust.certs import fingerprint
from trust.model import (
    Decision,
    DeviceUser,
    Listener,
    Rejection,
    Status,
    TrustedCertificate,
)
from trust.policy import decide
from trust.snapshot import TrustSnapshot

NOW = 1000.0
PEER = ("127.0.0.1", 40000)


# pure helpers ---------------------------------------------------------------------


def record(ctype: int, body: bytes, epoch: int = 0) -> bytes:
    return (
        bytes([ctype, 0xFE, 0xFD])
        + epoch.to_bytes(2, "big")
        + (0).to_bytes(6, "big")
        + len(body).to_bytes(2, "big")
        + body
    )


@given(st.lists(st.binary(max_size=300), max_size=20), st.integers(min_value=13, max_value=2000))
def test_records_split_and_pack_to_the_mtu(bodies: list[bytes], mtu: int) -> None:
    records = [record(22, b) for b in bodies]
    assert split_records(b"".join(records)) == records
    datagrams = pack_datagrams(records, mtu)
    assert b"".join(datagrams) == b"".join(records)
    for d in datagrams:
        parts = split_records(d)
        assert parts  # whole records only
        assert len(d) <= mtu or len(parts) == 1  # only a lone oversized record exceeds it


@given(st.binary(max_size=400))
def test_split_and_hello_parsing_never_raise(data: bytes) -> None:
    split_records(data)
    parse_client_hello(data)


def test_truncated_record_does_not_split() -> None:
    assert split_records(record(23, b"abc")[:-1]) is None
    assert split_records(b"\x16\xfe\xfd") is None


def test_cookie_jar_rotates_and_accepts_the_previous_secret() -> None:
    jar = CookieJar(lifetime=60, now=0)
    cookie = jar.make(PEER)
    assert jar.check(PEER, cookie)
    assert not jar.check(("127.0.0.1", 40001), cookie)  # bound to the address
    jar.rotate(59)
    assert jar.make(PEER) == cookie
    jar.rotate(60)
    assert jar.make(PEER) != cookie and jar.check(PEER, cookie)  # previous still valid
    jar.rotate(120)
    assert not jar.check(PEER, cookie)  # two rotations: gone
    fresh = jar.make(PEER)
    jar.rotate(1000)  # long silence: both secrets replaced
    assert not jar.check(PEER, fresh)


def test_complete_chain_appends_issuers_by_signature() -> None:
    root = make_ca("Root")
    inter = make_ca("Inter", issuer=root)
    impostor = make_ca("Inter")  # same name, other key
    leaf = make_device("dev", inter)
    known = index_by_subject([impostor.cert, inter.cert, root.cert])
    full = complete_chain([leaf.cert], known, 10)
    assert full == [leaf.cert, inter.cert, root.cert]
    assert complete_chain([leaf.cert], known, 2) == [leaf.cert, inter.cert]
    assert complete_chain([leaf.cert], index_by_subject([root.cert]), 10) == [leaf.cert]


# in-memory peers --------------------------------------------------------------------


def drain(conn: SSL.Connection) -> bytes:
    out = b""
    while True:
        try:
            out += conn.bio_read(65536)
        except SSL.WantReadError:
            return out


class MemClient:
    """A pyOpenSSL DTLS client whose datagrams are handed over by the test."""

    def __init__(self, ctx: SSL.Context, addr: tuple[str, int] = PEER, mtu: int = 1200) -> None:
        self.conn = SSL.Connection(ctx, None)
        self.conn.set_connect_state()
        self.conn.set_ciphertext_mtu(mtu)
        self.addr = addr
        self.mtu = mtu
        self.done = False
        self.error: SSL.Error | None = None
        self.received: list[bytes] = []
        self.closed = False

    def step(self, incoming: Sequence[bytes] = ()) -> list[bytes]:
        for d in incoming:
            self.conn.bio_write(d)
        try:
            if not self.done:
                self.conn.do_handshake()
                self.done = True
            while True:
                self.received.append(self.conn.recv(65536))
        except SSL.WantReadError:
            pass
        except SSL.ZeroReturnError:
            self.closed = True
        except SSL.Error as exc:
            self.error = exc
        records = split_records(drain(self.conn)) or []
        return pack_datagrams(records, self.mtu)


def run(
    server: DtlsServer, clients: Sequence[MemClient], now: float = NOW, rounds: int = 20
) -> None:
    """Exchange datagrams until nobody has anything to say."""
    pending = {c.addr: c.step() for c in clients}
    by_addr = {c.addr: c for c in clients}
    for _ in range(rounds):
        for addr, datagrams in pending.items():
            for d in datagrams:
                server.datagram_received(d, addr, now)
        replies: dict[tuple[str, int], list[bytes]] = {a: [] for a in by_addr}
        for data, addr in server.take_datagrams():
            replies[addr].append(data)
        if not any(replies.values()) and not any(pending.values()):
            return
        pending = {a: by_addr[a].step(r) for a, r in replies.items()}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


def snapshot(pki: Pki, devices: Sequence[str] = ("dev-1",)) -> TrustSnapshot:
    root = TrustedCertificate(
        tenant="t1",
        fingerprint=fingerprint(pki.root.cert),
        name="root",
        status=Status.ENABLED,
        auto_registration=False,
        pem=pki.root.cert_pem().decode(),
    )
    return TrustSnapshot.build(
        tenants=["t1"],
        certificates=[root],
        devices=[DeviceUser("t1", d) for d in devices],
    )


class Harness:
    def __init__(self, pki: Pki, settings: DtlsSettings | None = None, **kw: object) -> None:
        self.pki = pki
        self.snap = snapshot(pki)
        self.known = index_by_subject([pki.root.cert, pki.inter.cert])
        self.metrics = GatewayMetrics()
        self.decisions: list[Decision] = []
        self.server = DtlsServer(
            settings or DtlsSettings(),
            cert_file=pki.dir / "server.pem",
            key_file=pki.dir / "server.key",
            decide=self.decide,
            metrics=self.metrics,
            now=NOW,
            verify_certificates=[pki.root.cert, pki.inter.cert],
        )

    def decide(self, chain: Sequence[x509.Certificate]) -> Decision:
        full = complete_chain(chain, self.known, 10)
        decision = decide(full, self.snap, datetime.now(UTC), Listener.LWM2M)
        self.decisions.append(decision)
        return decision

    def client(self, cn: str = "dev-1", addr: tuple[str, int] = PEER, **kw: object) -> MemClient:
        cert, key, _ = self.pki.device(cn)
        ctx = client_context(cert, key, self.pki.dir / "server-ca.pem")
        return MemClient(ctx, addr, **kw)  # type: ignore[arg-type]

    def dropped(self, reason: str) -> float:
        return self.metrics.registry.counter(
            "mtls_gateway_udp_datagrams_dropped_total", "", ("listener", "reason")
        ).value("lwm2m", reason)


def test_handshake_with_cookie_exchange_yields_the_identity(pki: Pki) -> None:
    h = Harness(pki)
    client = h.client()
    first = client.step()
    assert len(first) == 1 and parse_client_hello(first[0]) is not None
    assert parse_client_hello(first[0]).cookie == b""  # type: ignore[union-attr]
    h.server.datagram_received(first[0], PEER, NOW)
    (hvr, addr), *rest = h.server.take_datagrams()
    assert not rest and addr == PEER and hvr[13] == 3  # HelloVerifyRequest
    assert h.server.stats().handshakes == 0  # nothing kept before the cookie
    second = client.step([hvr])
    assert parse_client_hello(second[0]).cookie  # type: ignore[union-attr]
    h.server.datagram_received(second[0], PEER, NOW)
    assert h.server.stats().handshakes == 1
    run(h.server, [client])
    assert client.done and client.error is None
    events = h.server.take_events()
    assert [type(e) for e in events] == [Established]
    ident = events[0].identity  # type: ignore[union-attr]
    assert (ident.tenant, ident.device_id, ident.listener) == ("t1", "dev-1", Listener.LWM2M)
    # the leaf alone was sent; the chain was completed to the anchor
    assert ident.chain_fingerprints[-1] == fingerprint(pki.root.cert)
    assert h.server.stats().sessions == 1 and h.server.stats().handshakes == 0


def test_flights_are_packed_to_the_mtu(pki: Pki) -> None:
    h = Harness(pki, DtlsSettings(mtu=300))
    client = h.client(mtu=300)
    sizes: list[int] = []
    pending = client.step()
    for _ in range(10):
        for d in pending:
            h.server.datagram_received(d, PEER, NOW)
        out = h.server.take_datagrams()
        sizes += [len(d) for d, _ in out]
        pending = client.step([d for d, _ in out])
    assert client.done
    assert sizes and max(sizes) <= 300
    assert len(sizes) > 4  # the certificate flight needed several datagrams


def test_application_data_both_ways_and_record_limit(pki: Pki) -> None:
    h = Harness(pki)
    client = h.client()
    run(h.server, [client])
    h.server.take_events()
    client.conn.send(b"hello gateway")
    for d in pack_datagrams(split_records(drain(client.conn)) or [], 1200):
        h.server.datagram_received(d, PEER, NOW)
    assert h.server.take_events() == [DataReceived(PEER, b"hello gateway")]
    h.server.send(PEER, b"hello device", NOW)
    client.step([d for d, _ in h.server.take_datagrams()])
    assert client.received == [b"hello device"]
    limit = h.server.max_plaintext(PEER)
    assert 1200 < limit < DtlsSettings().mtu  # record overhead within the MTU
    with pytest.raises(DtlsSendError):
        h.server.send(PEER, b"x" * (limit + 1), NOW)
    with pytest.raises(DtlsSendError):
        h.server.send(("127.0.0.1", 1), b"x", NOW)


@pytest.mark.parametrize(
    ("cn", "reason"),
    [("dev-unknown", "not_registered"), ("dev-1", None)],
)
def test_the_trust_decision_runs_inside_the_handshake(
    pki: Pki, cn: str, reason: str | None
) -> None:
    h = Harness(pki)
    client = h.client(cn)
    run(h.server, [client])
    events = h.server.take_events()
    if reason is None:
        assert client.error is None and isinstance(events[0], Established)
        return
    assert client.error is not None  # fatal alert during the handshake
    assert events == [] and h.server.stats() == type(h.server.stats())(0, 0)
    assert isinstance(h.decisions[-1], Rejection)
    assert h.metrics.handshakes.value("lwm2m", "rejected", reason) == 1


def test_untrusted_and_certificate_less_clients_are_refused(pki: Pki, tmp_path: Path) -> None:
    h = Harness(pki)
    other = Pki.create(tmp_path / "other", name="Other")
    cert, key, _ = other.device("dev-1")
    intruder = MemClient(client_context(cert, key, pki.dir / "server-ca.pem"))
    run(h.server, [intruder])
    assert intruder.error is not None
    anonymous = MemClient(client_context(None, None, pki.dir / "server-ca.pem"), ("127.0.0.1", 2))
    run(h.server, [anonymous])
    assert anonymous.error is not None
    assert h.server.take_events() == []
    assert h.metrics.handshakes.value("lwm2m", "rejected", "untrusted") == 1
    assert h.metrics.handshakes.value("lwm2m", "rejected", "no_certificate") == 1


def test_malformed_and_stray_datagrams_are_dropped_and_counted(pki: Pki) -> None:
    h = Harness(pki, DtlsSettings(max_datagram=1500))
    h.server.datagram_received(b"\x00garbage", PEER, NOW)
    h.server.datagram_received(record(23, b"x")[:-1], PEER, NOW)  # truncated
    h.server.datagram_received(record(23, b"app data, no session"), PEER, NOW)
    h.server.datagram_received(record(22, b"y" * 1600), PEER, NOW)
    assert h.server.take_datagrams() == [] and h.server.take_events() == []
    assert h.dropped("malformed") == 2
    assert h.dropped("no_session") == 1
    assert h.dropped("oversize") == 1
    # garbage inside an open session is OpenSSL's to discard; the session survives
    client = h.client()
    run(h.server, [client])
    h.server.datagram_received(record(23, b"not encrypted", epoch=1), PEER, NOW)
    assert h.server.stats().sessions == 1


def test_half_open_cap_and_handshake_timeout(pki: Pki) -> None:
    h = Harness(pki, DtlsSettings(max_handshakes=1, handshake_timeout=5))
    a, b = h.client(addr=("127.0.0.1", 1)), h.client(addr=("127.0.0.1", 2))
    for c in (a, b):  # up to the cookie-bearing ClientHello only
        h.server.datagram_received(c.step()[0], c.addr, NOW)
        hvr = [d for d, addr in h.server.take_datagrams() if addr == c.addr]
        h.server.datagram_received(c.step(hvr)[0], c.addr, NOW)
    assert h.server.stats().handshakes == 1
    assert h.metrics.refused.value("lwm2m", "max_handshakes") == 1
    h.server.take_datagrams()
    timer = h.server.next_timer()
    assert timer is not None and timer <= NOW + 5
    h.server.handle_timer(NOW + 5)
    assert h.server.stats().handshakes == 0
    assert h.metrics.handshakes.value("lwm2m", "rejected", "timeout") == 1


def test_session_cap(pki: Pki) -> None:
    h = Harness(pki, DtlsSettings(max_sessions=1))
    a, b = h.client(addr=("127.0.0.1", 1)), h.client(addr=("127.0.0.1", 2))
    run(h.server, [a])
    run(h.server, [b])
    assert a.done and not b.done
    assert h.metrics.refused.value("lwm2m", "max_sessions") >= 1


def test_idle_expiry_sends_close_notify_unless_extended(pki: Pki) -> None:
    h = Harness(pki, DtlsSettings(idle_timeout=100))
    client = h.client()
    run(h.server, [client])
    h.server.take_events()
    h.server.extend(PEER, NOW + 500)
    h.server.handle_timer(NOW + 150)
    assert h.server.stats().sessions == 1
    h.server.handle_timer(NOW + 501)
    assert h.server.take_events() == [Closed(PEER, "idle")]
    client.step([d for d, _ in h.server.take_datagrams()])
    assert client.closed  # close_notify
    assert h.server.next_timer() is None


def test_new_handshake_from_the_same_address_replaces_the_session(pki: Pki) -> None:
    h = Harness(pki)
    old = h.client()
    run(h.server, [old])
    assert [type(e) for e in h.server.take_events()] == [Established]
    restarted = h.client()  # same address, fresh state (device rebooted)
    run(h.server, [restarted])
    events = h.server.take_events()
    assert events[0] == Closed(PEER, "replaced")
    assert isinstance(events[1], Established)
    assert h.server.stats().sessions == 1


def test_a_cookie_less_hello_alone_does_not_disturb_an_open_session(pki: Pki) -> None:
    h = Harness(pki)
    client = h.client()
    run(h.server, [client])
    h.server.take_events()
    spoof = h.client().step()[0]  # a ClientHello "from" the device's address
    h.server.datagram_received(spoof, PEER, NOW)
    assert [d[13] for d, _ in h.server.take_datagrams()] == [3]  # just a HelloVerifyRequest
    assert h.server.stats().sessions == 1 and h.server.take_events() == []


def test_close_sends_close_notify(pki: Pki) -> None:
    h = Harness(pki)
    client = h.client()
    run(h.server, [client])
    h.server.take_events()
    h.server.close(PEER, "revoked", NOW)
    assert h.server.take_events() == [Closed(PEER, "revoked")]
    client.step([d for d, _ in h.server.take_datagrams()])
    assert client.closed


def test_trust_store_changes_apply_to_new_handshakes(pki: Pki) -> None:
    h = Harness(pki)
    h.server.set_trust([pki.root.cert])  # the intermediate is no longer known
    client = h.client()
    run(h.server, [client])
    assert client.error is not None  # OpenSSL cannot build the path from the leaf
    h.server.set_trust([pki.root.cert, pki.inter.cert])
    again = h.client(addr=("127.0.0.1", 3))
    run(h.server, [again])
    assert again.done and again.error is None


def test_a_cookie_only_opens_a_session_for_its_own_address(pki: Pki) -> None:
    h = Harness(pki)
    client = h.client()
    h.server.datagram_received(client.step()[0], PEER, NOW)
    hvr = [d for d, _ in h.server.take_datagrams()]
    with_cookie = client.step(hvr)[0]
    elsewhere = ("127.0.0.9", 40000)
    h.server.datagram_received(with_cookie, elsewhere, NOW)  # replayed from another source
    assert [(d[13], a) for d, a in h.server.take_datagrams()] == [(3, elsewhere)]
    assert h.server.stats() == type(h.server.stats())(0, 0)
    h.server.datagram_received(with_cookie, PEER, NOW)  # from the address it was issued to
    assert h.server.stats().handshakes == 1
    # the secret rotated twice since: the same cookie no longer opens anything
    h2 = Harness(pki, DtlsSettings(cookie_lifetime=10))
    c2 = h2.client()
    h2.server.datagram_received(c2.step()[0], PEER, NOW)
    stale = c2.step([d for d, _ in h2.server.take_datagrams()])[0]
    h2.server.handle_timer(NOW + 10)
    h2.server.handle_timer(NOW + 20)
    h2.server.datagram_received(stale, PEER, NOW + 20)
    assert h2.server.stats().handshakes == 0
