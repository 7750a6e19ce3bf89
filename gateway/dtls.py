"""The DTLS 1.2 terminator for UDP listeners (LWM2M on 5684).

pyOpenSSL drives one ``SSL`` object per peer through memory BIOs; this module
owns the socket-facing rules around it:

* **Stateless cookie exchange** (RFC 6347 §4.2.1). A datagram from an address
  without a session must be a ClientHello. It is handed to one reusable
  *listen* connection whose ``DTLSv1_listen`` answers HelloVerifyRequest; the
  cookie is an HMAC-SHA256 of the peer address under a secret that rotates
  every ``cookie_lifetime`` seconds (the previous secret stays valid). Only a
  ClientHello echoing a valid cookie turns the listen connection into a
  session, so spoofed sources cost one HMAC and leave nothing behind.
  ``DTLSv1_listen`` was chosen over parsing the ClientHello ourselves because
  OpenSSL must also set its handshake sequence numbers for the cookie-bearing
  hello, which only ``DTLSv1_listen`` can do.
* **Flights and MTU.** A memory BIO returns a whole flight as one buffer, so
  outgoing bytes are split into records and packed into datagrams of at most
  ``mtu`` bytes; ``OP_NO_QUERY_MTU`` plus ``set_ciphertext_mtu`` make OpenSSL
  fragment handshake messages to fit. Application data is never fragmented:
  :meth:`DtlsServer.max_plaintext` tells the front-end how much fits.
* **Timers.** Handshake retransmission follows ``DTLSv1_get_timeout`` /
  ``DTLSv1_handle_timeout`` (OpenSSL keeps its own clock for the backoff);
  half-open handshakes die after ``handshake_timeout``, idle sessions after
  ``idle_timeout`` (a front-end may keep one longer with :meth:`extend`).
* **Bounds.** Caps on sessions and half-open handshakes, on datagram size;
  anything that is not DTLS is dropped and counted, never raised.
* **Identity.** Client certificates are required. OpenSSL verifies against the
  enabled anchors plus known intermediates (partial chains allowed, because
  constrained clients such as libcoap send only their leaf); the verified chain
  is then given to ``decide`` (normally :meth:`DtlsTrust.decide`) *inside* the
  handshake, so a rejected device gets a fatal alert instead of a session.
  OpenSSL's own refusals carry their usual alert (unknown_ca, ...); a refusal
  by the trust decision (not registered, revoked, disabled) arrives as
  internal_error, because pyOpenSSL's verify callback cannot set an X.509
  error code. The real reason is in the log and in
  ``mtls_gateway_handshakes_total{listener="lwm2m",result="rejected"}``.

:class:`DtlsServer` is sans-IO (datagrams and ``now`` in, datagrams and events
out); :class:`DtlsListener` is the thin asyncio glue that owns the socket and
one timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import hmac
import itertools
import logging
import math
import secrets
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Protocol, cast

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL, crypto

from gateway.metrics import GatewayMetrics
from gateway.trust_state import TrustState
from trust.model import Decision, DeviceIdentity, Listener, Rejection
from trust.snapshot import TrustSnapshot

log = logging.getLogger("mtls_gateway.dtls")

Address = tuple[str, int]
"""A peer's (host, port); IPv6 flow info and scope are not part of the key."""

Decide = Callable[[Sequence[x509.Certificate]], Decision]
"""The trust decision for an OpenSSL-verified chain (leaf first)."""

RECORD_HEADER = 13
"""DTLS record header: type, version (2), epoch (2), sequence (6), length (2)."""
CT_CHANGE_CIPHER_SPEC, CT_ALERT, CT_HANDSHAKE, CT_APPLICATION_DATA = 20, 21, 22, 23
HS_CLIENT_HELLO = 1
DTLS_1_2 = 0xFEFD
_HANDSHAKE_HEADER = 12  # type, length (3), message_seq (2), fragment offset (3) and length (3)
_MAX_RECV = 16384 + 2048  # largest DTLS plaintext record OpenSSL may hand back
RECEIVE_BUFFER = 4 * 1024 * 1024
"""SO_RCVBUF asked for the listener's socket (bytes)."""

# Forward-secret suites only: the AEADs, then what LwM2M names for certificate
# mode (1.0: ECDHE-ECDSA-AES128-CCM8; 1.1 adds AES128-GCM and AES128-CBC-SHA256).
# Spelled out because OpenSSL's DEFAULT drops CCM for good ("!" is permanent).
CIPHERS = (
    b"ECDHE+AESGCM:ECDHE+CHACHA20:ECDHE-ECDSA-AES128-CCM8:ECDHE-ECDSA-AES128-CCM:"
    b"ECDHE-ECDSA-AES128-SHA256:ECDHE-RSA-AES128-SHA256:!aNULL:!eNULL"
)


# records ------------------------------------------------------------------------


def split_records(data: bytes) -> list[bytes] | None:
    """Split a buffer into DTLS records; None if it does not parse exactly."""
    records: list[bytes] = []
    i, n = 0, len(data)
    while i < n:
        if n - i < RECORD_HEADER:
            return None
        end = i + RECORD_HEADER + int.from_bytes(data[i + 11 : i + 13], "big")
        if end > n:
            return None
        records.append(data[i:end])
        i = end
    return records


def plausible_record(record: bytes) -> bool:
    """A known content type and a DTLS version (major byte 0xFE)."""
    return (
        len(record) >= RECORD_HEADER
        and CT_CHANGE_CIPHER_SPEC <= record[0] <= CT_APPLICATION_DATA
        and record[1] == 0xFE
    )


@dataclass(frozen=True, slots=True)
class ClientHello:
    """The two fields of an epoch-0 ClientHello the terminator looks at."""

    random: bytes
    cookie: bytes


def parse_client_hello(record: bytes) -> ClientHello | None:
    """The random and cookie of an epoch-0 ClientHello record; None if the record
    is not the first fragment of one."""
    if (
        len(record) < RECORD_HEADER + _HANDSHAKE_HEADER
        or record[0] != CT_HANDSHAKE
        or record[3:5] != b"\0\0"
        or record[RECORD_HEADER] != HS_CLIENT_HELLO
        or record[19:22] != b"\0\0\0"  # fragment offset 0
    ):
        return None
    body = record[RECORD_HEADER + _HANDSHAKE_HEADER :]
    pos = 2 + 32  # client_version, random
    if len(body) < pos + 1:
        return None
    sid_len = body[pos]
    pos += 1 + sid_len
    if sid_len > 32 or len(body) < pos + 1:
        return None
    cookie_len = body[pos]
    pos += 1
    if len(body) < pos + cookie_len:
        return None
    return ClientHello(random=body[2:34], cookie=body[pos : pos + cookie_len])


def pack_datagrams(records: Iterable[bytes], mtu: int) -> list[bytes]:
    """Pack whole records into datagrams of at most ``mtu`` bytes (a record larger
    than the MTU travels alone)."""
    out: list[bytes] = []
    current = bytearray()
    for record in records:
        if current and len(current) + len(record) > mtu:
            out.append(bytes(current))
            current = bytearray()
        current += record
    if current:
        out.append(bytes(current))
    return out


# cookies ------------------------------------------------------------------------


class CookieJar:
    """HelloVerifyRequest cookies: HMAC-SHA256(secret, peer address), 16 bytes.

    The secret rotates every ``lifetime`` seconds and the previous one is still
    accepted, so a cookie is valid for one to two lifetimes; that bounds how long
    a captured ClientHello can be replayed from the same address.
    """

    SIZE = 16

    def __init__(self, lifetime: float, now: float) -> None:
        self.lifetime = lifetime
        self._secrets = [secrets.token_bytes(32), secrets.token_bytes(32)]
        self._rotated = now

    def rotate(self, now: float) -> None:
        if now - self._rotated >= self.lifetime:
            # after a long silence both secrets are stale: replace both
            stale = now - self._rotated >= 2 * self.lifetime
            self._secrets = [
                secrets.token_bytes(32),
                secrets.token_bytes(32) if stale else self._secrets[0],
            ]
            self._rotated = now

    def make(self, peer: Address) -> bytes:
        return self._mac(self._secrets[0], peer)

    def check(self, peer: Address, cookie: bytes) -> bool:
        return any(hmac.compare_digest(cookie, self._mac(s, peer)) for s in self._secrets)

    @classmethod
    def _mac(cls, secret: bytes, peer: Address) -> bytes:
        text = f"{peer[0]}|{peer[1]}".encode()
        return hmac.new(secret, text, hashlib.sha256).digest()[: cls.SIZE]


# chain completion ---------------------------------------------------------------


def index_by_subject(
    certificates: Iterable[x509.Certificate],
) -> dict[x509.Name, list[x509.Certificate]]:
    index: dict[x509.Name, list[x509.Certificate]] = {}
    seen: set[bytes] = set()
    for cert in certificates:
        der = cert.public_bytes(Encoding.DER)
        if der not in seen:
            seen.add(der)
            index.setdefault(cert.subject, []).append(cert)
    return index


def complete_chain(
    chain: Sequence[x509.Certificate],
    known: Mapping[x509.Name, Sequence[x509.Certificate]],
    max_length: int,
) -> list[x509.Certificate]:
    """Append issuers from ``known`` (matched by name *and* signature) until the
    chain reaches a self-issued certificate, an unknown issuer or ``max_length``.

    Completion only adds candidates: the trust decision still verifies the result
    against the tenant's anchors, so a known certificate grants nothing by itself.
    """
    out = list(chain)
    while out and len(out) < max_length:
        last = out[-1]
        if last.issuer == last.subject:
            break
        issuer = next(
            (c for c in known.get(last.issuer, ()) if c not in out and _issued_by(last, c)),
            None,
        )
        if issuer is None:
            break
        out.append(issuer)
    return out


def _issued_by(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(issuer)
    except Exception:  # InvalidSignature, ValueError or TypeError (key types)
        return False
    return True


# events -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Established:
    """A handshake completed and the device was accepted."""

    peer: Address
    identity: DeviceIdentity


@dataclass(frozen=True, slots=True)
class DataReceived:
    """One decrypted application-data record."""

    peer: Address
    data: bytes


@dataclass(frozen=True, slots=True)
class Closed:
    """An established session ended (``reason``: peer_closed, idle, replaced,
    tls_error, shutdown or the code given to :meth:`DtlsServer.close`)."""

    peer: Address
    reason: str


DtlsEvent = Established | DataReceived | Closed


class DtlsSendError(Exception):
    """:meth:`DtlsServer.send` could not send: no open session, or too large."""


# settings -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DtlsSettings:
    """Bounds and timers of one DTLS listener (from ``[lwm2m]``)."""

    mtu: int = 1280
    """Largest UDP payload the gateway sends; records are packed/fragmented to fit."""
    max_datagram: int = 4096
    """Incoming datagrams larger than this are dropped (and counted)."""
    max_sessions: int = 10000
    """Sessions (open and half-open) at once; more ClientHellos are refused."""
    max_handshakes: int = 1000
    """Half-open handshakes (cookie verified, not finished) at once."""
    handshake_timeout: float = 15.0
    """Seconds from a verified cookie to a finished handshake."""
    idle_timeout: float = 900.0
    """Seconds without a datagram from the peer before a session is closed."""
    cookie_lifetime: float = 60.0
    """Seconds between rotations of the cookie secret."""
    max_chain_length: int = 10
    """Verify depth given to OpenSSL (certificates, device and anchor included)."""


class _State(Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSED = "closed"


@dataclass(eq=False, slots=True)
class _Session:
    conn: SSL.Connection
    peer: Address
    created: float
    last_activity: float
    hello_random: bytes
    state: _State = _State.HANDSHAKE
    keep_until: float = 0.0
    retransmit_at: float | None = None
    scheduled: float = math.inf
    flight_sent: bool = False
    chain: dict[int, x509.Certificate] = field(default_factory=dict)
    decision: Decision | None = None
    reject_reason: str | None = None

    def due(self, settings: DtlsSettings) -> float:
        if self.state is _State.HANDSHAKE:
            deadline = self.created + settings.handshake_timeout
        else:
            deadline = max(self.last_activity + settings.idle_timeout, self.keep_until)
        if self.retransmit_at is not None:
            return min(deadline, self.retransmit_at)
        return deadline


@dataclass(frozen=True, slots=True)
class DtlsStats:
    sessions: int
    """Established sessions."""
    handshakes: int
    """Half-open handshakes (cookie verified, not finished)."""


# X.509 verify error codes (OpenSSL x509_vfy.h) → our reason labels
_VERIFY_REASONS = {
    9: "not_yet_valid",
    10: "expired",
    2: "untrusted",
    18: "untrusted",
    19: "untrusted",
    20: "untrusted",
    21: "untrusted",
    24: "not_ca",
    25: "path_length",
    26: "bad_usage",
    7: "bad_signature",
    22: "chain_too_long",
}


class DtlsServer:
    """Sans-IO DTLS server: ``datagram_received``/``handle_timer`` in; then
    ``take_datagrams`` and ``take_events`` out."""

    def __init__(
        self,
        settings: DtlsSettings,
        *,
        cert_file: Path,
        key_file: Path,
        decide: Decide,
        metrics: GatewayMetrics,
        now: float,
        listener: Listener = Listener.LWM2M,
        verify_certificates: Sequence[x509.Certificate] = (),
    ) -> None:
        self.settings = settings
        self.cert_file = cert_file
        self.key_file = key_file
        self.decide = decide
        self.metrics = metrics
        self.listener = listener
        self._name = listener.value
        self._cookies = CookieJar(settings.cookie_lifetime, now)
        self._sessions: dict[Address, _Session] = {}
        self._handshaking = 0
        self._timers: list[tuple[float, int, _Session]] = []
        self._tie = itertools.count()
        self._out: list[tuple[bytes, Address]] = []
        self._events: list[DtlsEvent] = []
        self._listen_conn: SSL.Connection | None = None
        self._listen_peer: Address | None = None
        reg = metrics.registry
        self._dropped = reg.counter(
            "mtls_gateway_udp_datagrams_dropped_total",
            "UDP datagrams dropped before reaching a DTLS session, by reason.",
            ("listener", "reason"),
        )
        self._hello_verify = reg.counter(
            "mtls_gateway_dtls_hello_verify_total",
            "HelloVerifyRequests sent (stateless cookie exchange).",
            ("listener",),
        )
        reg.gauge(
            "mtls_gateway_dtls_sessions",
            "DTLS sessions by state (open, handshake).",
            ("listener", "state"),
            collect=lambda: {
                (self._name, "open"): float(len(self._sessions) - self._handshaking),
                (self._name, "handshake"): float(self._handshaking),
            },
        )
        self._context = self._new_context(verify_certificates)

    # configuration ---------------------------------------------------------------
    def set_trust(self, verify_certificates: Sequence[x509.Certificate]) -> None:
        """New handshakes verify against these certificates (anchors and known
        intermediates); established sessions are not affected."""
        self._context = self._new_context(verify_certificates)
        self._listen_conn = None

    def set_server_certificate(self, cert_file: Path, key_file: Path) -> None:
        """Serve a new certificate to new handshakes (raises if it does not load,
        keeping the current one)."""
        old = self.cert_file, self.key_file
        self.cert_file, self.key_file = cert_file, key_file
        try:
            self._context = self._new_context(self._verify_certificates)
        except Exception:
            self.cert_file, self.key_file = old
            raise
        self._listen_conn = None

    def _new_context(self, verify_certificates: Sequence[x509.Certificate]) -> SSL.Context:
        self._verify_certificates = list(verify_certificates)
        ctx = SSL.Context(SSL.DTLS_SERVER_METHOD)
        ctx.set_min_proto_version(DTLS_1_2)
        # No MTU discovery on a memory BIO; no tickets or resumption (a resumed
        # session carries no chain); no renegotiation (it could swap the client
        # certificate under an established identity).
        no_reneg: int = SSL.OP_NO_RENEGOTIATION  # type: ignore[attr-defined]  # not in the stubs
        ctx.set_options(SSL.OP_NO_QUERY_MTU | SSL.OP_NO_TICKET | no_reneg)
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        ctx.set_cipher_list(CIPHERS)
        ctx.use_certificate_chain_file(str(self.cert_file))
        ctx.use_privatekey_file(str(self.key_file))
        ctx.check_privatekey()
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verify)
        ctx.set_verify_depth(self.settings.max_chain_length)
        store = ctx.get_cert_store()
        assert store is not None
        for cert in verify_certificates:
            store.add_cert(crypto.X509.from_cryptography(cert))
        # an intermediate may be the end of the verified path (its root is
        # checked by the trust decision, after chain completion)
        store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)
        ctx.set_cookie_generate_callback(self._cookie_generate)
        ctx.set_cookie_verify_callback(self._cookie_verify)
        return ctx

    # inputs ------------------------------------------------------------------------
    def datagram_received(self, data: bytes, addr: tuple[Any, ...], now: float) -> None:
        """One UDP datagram from ``addr``."""
        self._cookies.rotate(now)
        peer: Address = (str(addr[0]), int(addr[1]))
        if len(data) > self.settings.max_datagram:
            self._drop("oversize")
            return
        records = split_records(data)
        if not records or not all(plausible_record(r) for r in records):
            self._drop("malformed")
            return
        session = self._sessions.get(peer)
        hello = parse_client_hello(records[0])
        if session is not None:
            # Records and retransmitted ClientHellos (same random) belong to the
            # session. Any other ClientHello means the peer restarted (RFC 6347
            # §4.2.8): it goes through the cookie exchange and, once its cookie
            # is valid, replaces the session.
            if hello is None or (
                hello.random == session.hello_random and session.state is _State.HANDSHAKE
            ):
                self._feed(session, data, now)
                return
            if hello.random == session.hello_random:
                self._drop("stale_hello")  # a late duplicate of the finished handshake's
                return
        elif hello is None:
            self._drop("no_session")
            return
        self._listen(data, peer, now, replacing=session, hello_random=hello.random)

    def handle_timer(self, now: float) -> None:
        """Run whatever is due at ``now`` (retransmissions, timeouts, idle expiry)."""
        self._cookies.rotate(now)
        due: list[_Session] = []
        while self._timers and self._timers[0][0] <= now:
            when, _, session = heapq.heappop(self._timers)
            if session.state is not _State.CLOSED and when == session.scheduled:
                session.scheduled = math.inf
                due.append(session)
        # handled after collecting, so an entry re-armed for ``now`` waits for the
        # next call instead of spinning here
        for session in due:
            if session.state is not _State.CLOSED:
                self._on_timer(session, now)

    def next_timer(self) -> float | None:
        """When :meth:`handle_timer` should run next (None: nothing scheduled)."""
        while self._timers and (
            self._timers[0][2].state is _State.CLOSED
            or self._timers[0][0] != self._timers[0][2].scheduled
        ):
            heapq.heappop(self._timers)
        return self._timers[0][0] if self._timers else None

    def send(self, peer: Address, data: bytes, now: float) -> None:
        """Send one application-data record (raises :class:`DtlsSendError`)."""
        session = self._sessions.get(peer)
        if session is None or session.state is not _State.OPEN:
            raise DtlsSendError(f"no open DTLS session with {peer[0]}:{peer[1]}")
        if len(data) > self.max_plaintext(peer):
            raise DtlsSendError(
                f"{len(data)} bytes exceed the {self.max_plaintext(peer)}-byte record limit"
            )
        try:
            session.conn.send(data)
        except SSL.Error as exc:
            self._fail(session, "tls_error", exc)
            raise DtlsSendError(f"DTLS session with {peer[0]}:{peer[1]} failed") from None
        self._flush(session)

    def close(self, peer: Address, reason: str, now: float) -> None:
        """Close a session (close_notify when established)."""
        session = self._sessions.get(peer)
        if session is not None:
            self._close(session, reason, notify=True)

    def close_all(self, reason: str, now: float) -> None:
        for session in list(self._sessions.values()):
            self._close(session, reason, notify=True)

    def extend(self, peer: Address, until: float) -> None:
        """Keep an established session at least until ``until`` (e.g. an LWM2M
        registration's lifetime), even without traffic."""
        session = self._sessions.get(peer)
        if session is not None and session.state is _State.OPEN:
            session.keep_until = max(session.keep_until, until)

    # outputs -----------------------------------------------------------------------
    def take_datagrams(self) -> list[tuple[bytes, Address]]:
        out, self._out = self._out, []
        return out

    def take_events(self) -> list[DtlsEvent]:
        events, self._events = self._events, []
        return events

    def max_plaintext(self, peer: Address) -> int:
        """Largest application-data write that fits one datagram (0: no session)."""
        session = self._sessions.get(peer)
        if session is None or session.state is not _State.OPEN:
            return 0
        return int(session.conn.get_cleartext_mtu())

    def stats(self) -> DtlsStats:
        return DtlsStats(len(self._sessions) - self._handshaking, self._handshaking)

    # cookie exchange -------------------------------------------------------------
    def _listen(
        self,
        data: bytes,
        peer: Address,
        now: float,
        *,
        replacing: _Session | None,
        hello_random: bytes,
    ) -> None:
        conn = self._listen_conn
        if conn is None:
            conn = self._listen_conn = SSL.Connection(self._context, None)
            conn.set_accept_state()
            conn.set_ciphertext_mtu(self.settings.mtu)
        self._listen_peer = peer
        try:
            conn.bio_write(data)
            conn.DTLSv1_listen()
        except SSL.WantReadError:
            # no valid cookie: HelloVerifyRequest written (or the datagram ignored)
            reply = _drain(conn)
            if reply:
                self._hello_verify.inc(self._name)
                self._queue(reply, peer)
            else:
                self._drop("bad_hello")
            return
        except SSL.Error:
            self._listen_conn = None  # unknown state: start over with a fresh one
            self._drop("bad_hello")
            return
        finally:
            self._listen_peer = None
        # A valid cookie: this connection now belongs to the peer.
        self._listen_conn = None
        if self._handshaking >= self.settings.max_handshakes:
            self.metrics.refused.inc(self._name, "max_handshakes")
            return
        if replacing is None and len(self._sessions) >= self.settings.max_sessions:
            self.metrics.refused.inc(self._name, "max_sessions")
            return
        if replacing is not None:
            # The peer lost its state; its old keys are gone, so no close_notify.
            self._close(replacing, "replaced", notify=False)
        session = _Session(conn, peer, created=now, last_activity=now, hello_random=hello_random)
        conn.set_app_data(session)
        self._sessions[peer] = session
        self._handshaking += 1
        self._step(session, now)

    def _cookie_peer(self, conn: SSL.Connection) -> Address | None:
        owner = conn.get_app_data()
        return owner.peer if isinstance(owner, _Session) else self._listen_peer

    def _cookie_generate(self, conn: SSL.Connection) -> bytes:
        peer = self._cookie_peer(conn)
        if peer is None:
            raise ValueError("cookie requested outside a datagram")
        return self._cookies.make(peer)

    def _cookie_verify(self, conn: SSL.Connection, cookie: bytes) -> bool:
        peer = self._cookie_peer(conn)
        return peer is not None and self._cookies.check(peer, cookie)

    # verification ------------------------------------------------------------------
    def _verify(
        self, conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int
    ) -> bool:
        session = conn.get_app_data()
        if not isinstance(session, _Session):
            return False
        if not ok:
            session.reject_reason = _VERIFY_REASONS.get(errno, f"verify_{errno}")
            return False
        try:
            session.chain[depth] = cert.to_cryptography()
            if depth != 0:
                return True
            chain = [session.chain[d] for d in sorted(session.chain)]
            decision = self.decide(chain)
        except Exception:
            # never let a bug in the decision crash the datagram path: refuse
            log.exception("DTLS trust decision failed for %s", _fmt(session.peer))
            session.reject_reason = "internal_error"
            return False
        session.decision = decision
        if isinstance(decision, Rejection):
            session.reject_reason = decision.reason.value
            log.info(
                "handshake refused listener=%s peer=%s reason=%s: %s",
                self._name,
                _fmt(session.peer),
                decision.reason.value,
                decision.message,
            )
            return False
        return True

    # sessions ----------------------------------------------------------------------
    def _feed(self, session: _Session, data: bytes, now: float) -> None:
        session.last_activity = now
        try:
            session.conn.bio_write(data)
        except SSL.Error as exc:
            self._fail(session, "tls_error", exc)
            return
        self._step(session, now)

    def _step(self, session: _Session, now: float) -> None:
        """Advance the handshake and read application data; flush; re-arm."""
        conn = session.conn
        if session.state is _State.HANDSHAKE:
            try:
                conn.do_handshake()
            except SSL.WantReadError:
                pass
            except SSL.Error as exc:
                reason = self._failure_reason(session)
                self._flush(session)  # the fatal alert
                self._fail(session, reason, exc)
                return
            else:
                if not self._established(session, now):
                    return
        if session.state is _State.OPEN:
            while True:
                try:
                    data = conn.recv(_MAX_RECV)
                except SSL.WantReadError:
                    break
                except SSL.ZeroReturnError:
                    self._close(session, "peer_closed", notify=True)
                    return
                except SSL.Error as exc:
                    self._flush(session)
                    self._fail(session, "tls_error", exc)
                    return
                if data:
                    self._events.append(DataReceived(session.peer, data))
        self._flush(session)
        self._schedule(session, now)

    def _established(self, session: _Session, now: float) -> bool:
        decision = session.decision
        if not isinstance(decision, DeviceIdentity):  # pragma: no cover - verify ran
            self._fail(session, "no_identity", None)
            return False
        self._handshaking -= 1
        session.state = _State.OPEN
        self.metrics.handshakes.inc(self._name, "accepted", "ok")
        self.metrics.handshake_seconds.observe(now - session.created, self._name)
        log.info(
            "DTLS session open listener=%s peer=%s tenant=%s device=%s",
            self._name,
            _fmt(session.peer),
            decision.tenant,
            decision.device_id,
        )
        session.chain.clear()
        self._events.append(Established(session.peer, decision))
        return True

    def _failure_reason(self, session: _Session) -> str:
        if session.reject_reason:
            return session.reject_reason
        # Our flight with the CertificateRequest went out and no certificate was
        # verified: the client sent none (FAIL_IF_NO_PEER_CERT). Before that it
        # is some other protocol failure.
        return "no_certificate" if session.flight_sent and not session.chain else "tls_error"

    def _on_timer(self, session: _Session, now: float) -> None:
        s = self.settings
        if session.state is _State.HANDSHAKE and now >= session.created + s.handshake_timeout:
            self._fail(session, "timeout", None)
            return
        if session.state is _State.OPEN and now >= max(
            session.last_activity + s.idle_timeout, session.keep_until
        ):
            self._close(session, "idle", notify=True)
            return
        if session.retransmit_at is not None and now >= session.retransmit_at:
            try:
                session.conn.DTLSv1_handle_timeout()
            except SSL.Error as exc:
                reason = self._failure_reason(session)
                self._flush(session)
                self._fail(session, reason, exc)
                return
            self._flush(session)
        self._schedule(session, now)

    def _schedule(self, session: _Session, now: float) -> None:
        timeout = session.conn.DTLSv1_get_timeout()
        # OpenSSL keeps its own clock; an already-expired timer is retried 1 ms later
        session.retransmit_at = None if timeout is None else now + max(timeout, 0.001)
        due = session.due(self.settings)
        # Only an earlier deadline needs a new heap entry; a later one is found
        # when the current entry pops (lazy re-arming keeps the heap small).
        if due < session.scheduled:
            session.scheduled = due
            heapq.heappush(self._timers, (due, next(self._tie), session))

    def _flush(self, session: _Session) -> None:
        data = _drain(session.conn)
        if data:
            if session.state is _State.HANDSHAKE:
                session.flight_sent = True
            self._queue(data, session.peer)

    def _queue(self, data: bytes, peer: Address) -> None:
        records = split_records(data)
        if records is None:  # pragma: no cover - OpenSSL writes whole records
            self._out.append((data, peer))
            return
        for datagram in pack_datagrams(records, self.settings.mtu):
            self._out.append((datagram, peer))

    def _fail(self, session: _Session, reason: str, exc: BaseException | None) -> None:
        """A handshake or session died without a clean close."""
        if session.state is _State.HANDSHAKE:
            self.metrics.handshakes.inc(self._name, "rejected", reason)
            if session.decision is None:
                log.info(
                    "handshake failed listener=%s peer=%s reason=%s%s",
                    self._name,
                    _fmt(session.peer),
                    reason,
                    f" ({_ssl_error_text(exc)})" if exc is not None else "",
                )
        self._remove(session, reason)

    def _close(self, session: _Session, reason: str, *, notify: bool) -> None:
        if session.state is _State.OPEN and notify:
            with contextlib.suppress(SSL.Error):
                session.conn.shutdown()
            self._flush(session)
        self._remove(session, reason)

    def _remove(self, session: _Session, reason: str) -> None:
        if session.state is _State.CLOSED:
            return
        was_open = session.state is _State.OPEN
        if session.state is _State.HANDSHAKE:
            self._handshaking -= 1
        session.state = _State.CLOSED
        session.conn.set_app_data(None)
        if self._sessions.get(session.peer) is session:
            del self._sessions[session.peer]
        if was_open:
            self._events.append(Closed(session.peer, reason))

    def _drop(self, reason: str) -> None:
        self._dropped.inc(self._name, reason)


def _drain(conn: SSL.Connection) -> bytes:
    chunks: list[bytes] = []
    while True:
        try:
            chunk = conn.bio_read(65536)
        except SSL.WantReadError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _fmt(peer: Address) -> str:
    return f"[{peer[0]}]:{peer[1]}" if ":" in peer[0] else f"{peer[0]}:{peer[1]}"


def _ssl_error_text(exc: BaseException | None) -> str:
    """OpenSSL's reason strings, for the log only (never matched on)."""
    if isinstance(exc, SSL.Error) and exc.args and isinstance(exc.args[0], list):
        reasons = [str(e[2]) for e in exc.args[0] if isinstance(e, tuple) and len(e) == 3]
        if reasons:
            return ", ".join(reasons)
    return exc.__class__.__name__ if exc is not None else ""


# trust -----------------------------------------------------------------------------


class DtlsTrust:
    """Connects a :class:`DtlsServer` to the gateway's :class:`TrustState`.

    OpenSSL gets the enabled anchors plus ``intermediates`` (certificates the
    operator knows devices omit) as its verify store. Before the decision the
    verified chain is completed with every anchor of the snapshot (enabled or
    not, so a disabled anchor is reported as such) and the known intermediates,
    because the spec's lone-certificate rule would otherwise refuse a leaf whose
    issuer is an intermediate the device did not send.
    """

    def __init__(
        self,
        trust: TrustState,
        intermediates: Sequence[x509.Certificate] = (),
        listener: Listener = Listener.LWM2M,
        max_chain_length: int = 10,
    ) -> None:
        self.trust = trust
        self.intermediates = list(intermediates)
        self.listener = listener
        self.max_chain_length = max_chain_length
        self.server: DtlsServer | None = None
        self._known: dict[x509.Name, list[x509.Certificate]] = {}
        self._known_snap: TrustSnapshot | None = None
        self._verify_key = self._enabled_key(trust.snapshot)

    def verify_certificates(self) -> list[x509.Certificate]:
        return [*self.trust.snapshot.enabled_anchor_certificates(), *self.intermediates]

    def decide(self, chain: Sequence[x509.Certificate]) -> Decision:
        snap = self.trust.snapshot
        if snap is not self._known_snap:  # snapshots are immutable: index once each
            anchors = [a[0].cert for a in snap.by_fingerprint.values()]
            self._known = index_by_subject([*anchors, *self.intermediates])
            self._known_snap = snap
        full = complete_chain(chain, self._known, self.max_chain_length)
        return self.trust.decide_der([c.public_bytes(Encoding.DER) for c in full], self.listener)

    async def on_change(self, snap: TrustSnapshot, changes: object) -> None:
        """TrustState listener: rebuild OpenSSL's verify store when the set of
        enabled anchors changed."""
        key = self._enabled_key(snap)
        if key != self._verify_key:
            self._verify_key = key
            if self.server is not None:
                self.server.set_trust(self.verify_certificates())

    @staticmethod
    def _enabled_key(snap: TrustSnapshot) -> frozenset[str]:
        return frozenset(
            fp for fp, anchors in snap.by_fingerprint.items() if any(a.enabled for a in anchors)
        )


# asyncio glue ----------------------------------------------------------------------


class DtlsHandler(Protocol):
    """What a front-end implements to receive the events of a :class:`DtlsListener`."""

    def dtls_event(self, event: DtlsEvent) -> None: ...


class DtlsListener(asyncio.DatagramProtocol):
    """Owns the UDP socket and one timer; moves bytes between it and the server."""

    def __init__(self, server: DtlsServer, host: str, port: int) -> None:
        self.server = server
        self.host = host
        self.port = port
        self.handler: DtlsHandler | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._pumping = False

    @property
    def bound_port(self) -> int:
        assert self._transport is not None
        port: int = self._transport.get_extra_info("sockname")[1]
        return port

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._loop.create_datagram_endpoint(lambda: self, local_addr=(self.host, self.port))
        sock = self._transport.get_extra_info("socket") if self._transport else None
        if sock is not None:
            # Bursts (handshake storms, floods) arrive faster than one loop pass
            # reads them; the kernel caps this at net.core.rmem_max.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        log.info(
            "%s listening on %s:%d (DTLS/UDP)",
            self.server.listener.value,
            self.host,
            self.bound_port,
        )

    async def stop(self) -> None:
        """close_notify to every session, then close the socket."""
        if self._loop is not None:
            self.server.close_all("shutdown", self._loop.time())
            self._pump()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    # commands from the front-end ----------------------------------------------------
    def now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def send(self, peer: Address, data: bytes) -> None:
        """Send application data (raises :class:`DtlsSendError`)."""
        try:
            self.server.send(peer, data, self.now())
        finally:
            self._pump()

    def close(self, peer: Address, reason: str) -> None:
        self.server.close(peer, reason, self.now())
        self._pump()

    def extend(self, peer: Address, until: float) -> None:
        self.server.extend(peer, until)

    def max_plaintext(self, peer: Address) -> int:
        return self.server.max_plaintext(peer)

    # asyncio.DatagramProtocol ---------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's and uvloop's UDP transports do not subclass DatagramTransport
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        try:
            self.server.datagram_received(data, addr, self.now())
        except Exception:  # a bug must not take the listener down
            log.exception("DTLS datagram from %s failed", addr)
        self._pump()

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (port unreachable) for a peer that went away: the session
        # times out on its own.
        log.debug("UDP error on %s: %s", self.server.listener.value, exc)

    # internals ----------------------------------------------------------------------
    def _pump(self) -> None:
        """Send queued datagrams and deliver events until both queues are empty
        (a handler that sends from inside ``dtls_event`` just adds to them)."""
        if self._pumping:
            return
        self._pumping = True
        try:
            while True:
                datagrams = self.server.take_datagrams()
                events = self.server.take_events()
                if not datagrams and not events:
                    break
                if self._transport is not None:
                    for data, peer in datagrams:
                        self._transport.sendto(data, peer)
                for event in events:
                    if self.handler is None:
                        continue
                    try:
                        self.handler.dtls_event(event)
                    except Exception:
                        log.exception("DTLS event handler failed for %s", event.peer)
        finally:
            self._pumping = False
        self._arm()

    def _arm(self) -> None:
        when = self.server.next_timer()
        if when == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = when
        if when is not None and self._loop is not None:
            self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        try:
            self.server.handle_timer(self.now())
        except Exception:
            log.exception("DTLS timer failed")
        self._pump()
