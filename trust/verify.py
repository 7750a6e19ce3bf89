"""Path validation of a device's certificate chain (RFC 5280 §6 for TLS clients).

``verify_chain(presented, anchors, now)`` returns the verified chain (leaf
first, anchor last) or raises :class:`ChainError` with a stable
:class:`~trust.model.Reason`. It is pure: no I/O, and the clock is ``now``.

How a decision is made:

1. **Bounds first.** More than ``max_presented`` certificates is refused
   before any work; duplicates (by fingerprint) are dropped; a path never holds
   two certificates with the same subject and key, so certificate "cycles" and
   the same-subject-same-key flood of x509-limbo cannot make the search, or
   pyca, explode. The search is depth-first with a fixed budget of expansions
   and of evaluated paths.
2. **Our own structural checks** on each candidate path (leaf → … → anchor):
   every rule of RFC 5280 (and of the device-certificate spec) that pyca does
   not enforce, or whose failure we want to name precisely. Each rule cites its
   section. The first broken rule of a path gives that path's reason.
3. **pyca/cryptography is the final authority** on signatures and on its
   web-PKI profile: the path that passed step 2 is handed to a
   ``cryptography.x509.verification`` client verifier that can only build that
   very path (its store holds the path's anchor alone, the intermediates are
   exactly the path's). If pyca refuses it, the reason comes from checking the
   path's signatures ourselves (``BAD_SIGNATURE``), else it is ``UNTRUSTED``
   with pyca's message; pyca's error text never selects a reason.

Self-issued intermediates (RFC 5280 §6.1.4(l)) are not counted by pathLen nor
by ``max_chain_length``. pyca counts them for pathLen, so a path that only
satisfies pathLen thanks to that rule is handed to pyca in segments split at
those certificates (each segment anchored at the self-issued certificate above
it); the rules across segments are ours. Signature algorithms (SHA-256 or
better, no SHA-1/MD5) are pyca's web-PKI list.
"""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import (
    ExtendedKeyUsageOID,
    ExtensionOID,
    NameOID,
    SignatureAlgorithmOID,
)
from cryptography.x509.verification import (
    ClientVerifier,
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from trust.model import Reason

__all__ = [
    "AnchorSet",
    "ChainError",
    "VerifiedChain",
    "VerifyPolicy",
    "verify_chain",
]


@dataclass(frozen=True, slots=True)
class VerifyPolicy:
    """Limits of path validation (gateway configuration)."""

    max_chain_length: int = 10
    """Largest number of certificates in the verified chain, leaf and anchor
    included. Self-issued intermediates (key rollover, RFC 5280 §6.1.4(l)) are
    not counted, as for pathLen."""
    max_presented: int = 16
    """More presented certificates than this is refused (``CHAIN_TOO_LONG``)
    before any path building: a bound on the work a peer can cause."""


@dataclass(frozen=True, slots=True)
class VerifiedChain:
    """A validated path: the device certificate first, the trust anchor last."""

    certificates: tuple[x509.Certificate, ...]

    @property
    def leaf(self) -> x509.Certificate:
        return self.certificates[0]

    @property
    def anchor(self) -> x509.Certificate:
        return self.certificates[-1]


class ChainError(Exception):
    """The chain is refused: a stable ``reason`` code and a human ``message``."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.message = message


# ---------------------------------------------------------------------------
# Bounds
# ---------------------------------------------------------------------------

_MAX_EXPANSIONS = 256
"""Issuer candidates the search may consider for one call (no exponential blow-up)."""
_MAX_PATHS = 8
"""Complete candidate paths evaluated (each may cost a pyca verification)."""
_MAX_NAME_CHECKS = 16384
"""Name-vs-constraint comparisons for one path (x509-limbo ``nc-dos-*``)."""
_MAX_PYCA_DEPTH = 255

# ---------------------------------------------------------------------------
# A little DER: fields pyca does not expose (inner signature algorithm, raw
# serial bytes, SPKI algorithm parameters).
# ---------------------------------------------------------------------------


class _DerError(ValueError):
    pass


def _tlv(buf: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the TLV at ``pos``."""
    if pos + 2 > end:
        raise _DerError("truncated")
    tag = buf[pos]
    if tag & 0x1F == 0x1F:
        raise _DerError("high tag number")
    length = buf[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 4 or pos + n > end:
            raise _DerError("bad length")
        length = int.from_bytes(buf[pos : pos + n], "big")
        pos += n
    if pos + length > end:
        raise _DerError("truncated")
    return tag, pos, pos + length


@dataclass(frozen=True, slots=True)
class _Raw:
    outer_alg: bytes
    inner_alg: bytes
    serial: bytes
    issuer: bytes
    subject: bytes
    spki_alg_oid: bytes
    spki_params: bytes  # full TLV of the parameters, b"" when absent
    spki: bytes


def _parse_raw(der: bytes) -> _Raw:
    tag, s, e = _tlv(der, 0, len(der))
    if tag != 0x30:
        raise _DerError("not a SEQUENCE")
    tag, ts, te = _tlv(der, s, e)  # tbsCertificate
    if tag != 0x30:
        raise _DerError("bad tbsCertificate")
    tag, _, ae = _tlv(der, te, e)  # signatureAlgorithm
    outer_alg = der[te:ae]
    pos = ts
    tag, cs, ce = _tlv(der, pos, te)
    if tag == 0xA0:  # [0] EXPLICIT version
        pos = ce
        tag, cs, ce = _tlv(der, pos, te)
    if tag != 0x02:
        raise _DerError("bad serialNumber")
    serial = der[cs:ce]
    pos = ce
    tag, cs, ce = _tlv(der, pos, te)  # signature
    inner_alg = der[pos:ce]
    pos = ce
    tag, cs, ce = _tlv(der, pos, te)  # issuer
    issuer = der[pos:ce]
    pos = ce
    tag, cs, ce = _tlv(der, pos, te)  # validity
    pos = ce
    tag, cs, ce = _tlv(der, pos, te)  # subject
    subject = der[pos:ce]
    pos = ce
    tag, ks, ke = _tlv(der, pos, te)  # subjectPublicKeyInfo
    spki = der[pos:ke]
    tag, als, ale = _tlv(der, ks, ke)  # AlgorithmIdentifier
    tag, os_, oe = _tlv(der, als, ale)
    oid = der[os_:oe]
    params = der[oe:ale]
    return _Raw(outer_alg, inner_alg, serial, issuer, subject, oid, params, spki)


_OID_EC_PUBLIC_KEY = bytes.fromhex("2a8648ce3d0201")


# ---------------------------------------------------------------------------
# Certificates as the search sees them
# ---------------------------------------------------------------------------


class _Node:
    """A certificate with the fields path building reads, computed once."""

    __slots__ = (
        "_by_oid",
        "_exts",
        "_self_signed",
        "aki",
        "cert",
        "fp",
        "is_anchor",
        "issuer",
        "key_id",
        "raw",
        "ski",
        "subject",
    )

    def __init__(self, cert: x509.Certificate, is_anchor: bool) -> None:
        self.cert = cert
        der = cert.public_bytes(Encoding.DER)
        self.fp = hashlib.sha256(der).digest()
        self.is_anchor = is_anchor
        self._exts: x509.Extensions | ChainError | None = None
        self._by_oid: dict[x509.ObjectIdentifier, x509.Extension[Any]] | None = None
        self._self_signed: bool | None = None
        try:
            self.raw: _Raw | None = _parse_raw(der)
        except _DerError:
            self.raw = None
        if self.raw is not None:
            self.subject = self.raw.subject
            self.issuer = self.raw.issuer
            self.key_id = self.raw.subject + self.raw.spki
        else:  # pragma: no cover - cryptography parsed it, so the DER is sound
            self.subject = cert.subject.public_bytes()
            self.issuer = cert.issuer.public_bytes()
            self.key_id = self.subject + self.fp
        self.ski: bytes | None = None
        self.aki: bytes | None = None
        exts = self.extensions_or_none()
        if exts is not None:
            for ext in exts:
                if isinstance(ext.value, x509.SubjectKeyIdentifier):
                    self.ski = ext.value.digest
                elif isinstance(ext.value, x509.AuthorityKeyIdentifier):
                    self.aki = ext.value.key_identifier

    @property
    def self_issued(self) -> bool:
        """RFC 5280 §6.1: subject and issuer are the same name."""
        return self.subject == self.issuer

    @property
    def self_signed(self) -> bool:
        """Self-issued and its own key verifies its signature."""
        if self._self_signed is None:
            self._self_signed = self.self_issued and _signed_by(self.cert, self.cert)
        return self._self_signed

    def extensions_or_none(self) -> x509.Extensions | None:
        try:
            return self.extensions()
        except ChainError:
            return None

    def extensions(self) -> x509.Extensions:
        """The parsed extensions; ``MALFORMED`` when they do not parse (RFC 5280 §4.2)."""
        if self._exts is None:
            try:
                self._exts = self.cert.extensions
            except Exception as exc:
                self._exts = ChainError(
                    Reason.MALFORMED,
                    f"{_describe(self.cert)}: extensions do not parse: {_short(exc)}",
                )
        if isinstance(self._exts, ChainError):
            raise self._exts
        return self._exts

    def ext(self, oid: x509.ObjectIdentifier) -> x509.Extension[Any] | None:
        by_oid = self._by_oid
        if by_oid is None:
            by_oid = self._by_oid = {e.oid: e for e in self.extensions()}
        return by_oid.get(oid)


def _signed_by(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    except Exception:  # an exotic key or algorithm pyca cannot handle
        return False
    return True


# ---------------------------------------------------------------------------
# Anchors
# ---------------------------------------------------------------------------


class AnchorSet:
    """Trust anchors prepared once: subject index, fingerprints, pyca stores.

    Build one per tenant snapshot and pass it to :func:`verify_chain` instead
    of a list; the per-anchor pyca ``Store`` objects are created on first use
    and reused by every later call.
    """

    __slots__ = ("_by_fp", "_by_subject", "_nodes", "_store", "_stores")

    def __init__(self, anchors: Sequence[x509.Certificate]) -> None:
        nodes: list[_Node] = []
        by_fp: dict[bytes, _Node] = {}
        for cert in anchors:
            node = _Node(cert, is_anchor=True)
            if node.fp in by_fp:
                continue
            by_fp[node.fp] = node
            nodes.append(node)
        self._nodes = tuple(nodes)
        self._by_fp = by_fp
        by_subject: dict[bytes, list[_Node]] = {}
        for node in nodes:
            by_subject.setdefault(node.subject, []).append(node)
        self._by_subject = by_subject
        self._stores: dict[bytes, Store] = {}
        self._store: Store | None = None

    def __len__(self) -> int:
        return len(self._nodes)

    @property
    def certificates(self) -> tuple[x509.Certificate, ...]:
        return tuple(n.cert for n in self._nodes)

    @property
    def store(self) -> Store:
        """A pyca ``Store`` of all anchors (for callers that want pyca directly)."""
        if self._store is None:
            self._store = Store([n.cert for n in self._nodes])
        return self._store

    def _store_for(self, node: _Node) -> Store:
        store = self._stores.get(node.fp)
        if store is None:
            store = Store([node.cert])
            self._stores[node.fp] = store
        return store


# ---------------------------------------------------------------------------
# pyca verifiers
# ---------------------------------------------------------------------------


def _ca_key_usage(policy: Policy, cert: x509.Certificate, ku: x509.KeyUsage | None) -> None:
    # RFC 5280 §4.2.1.3 / §6.1.4(n): keyUsage is optional in a CA (x509-limbo
    # crl::issuer-no-keyusage-extension), but when present it must allow keyCertSign.
    if ku is not None and not ku.key_cert_sign:
        raise ValueError("keyUsage of a CA certificate does not assert keyCertSign")


def _make_policies() -> tuple[ExtensionPolicy, ExtensionPolicy]:
    ca = ExtensionPolicy.webpki_defaults_ca().may_be_present(
        x509.KeyUsage, Criticality.AGNOSTIC, _ca_key_usage
    )
    # Device certificates are often CN-only: a missing SAN is fine (its
    # RFC 5280 §4.2.1.6 criticality rules are checked by us).
    ee = ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.SubjectAlternativeName, Criticality.AGNOSTIC, None
    )
    return ca, ee


_CA_POLICY, _EE_POLICY = _make_policies()


def _verifier(store: Store, now: datetime, depth: int, leaf_is_ca: bool) -> ClientVerifier:
    return (
        PolicyBuilder()
        .store(store)
        .time(now)
        .max_chain_depth(min(max(depth, 0), _MAX_PYCA_DEPTH))
        .extension_policies(
            ca_policy=_CA_POLICY, ee_policy=_CA_POLICY if leaf_is_ca else _EE_POLICY
        )
        .build_client_verifier()
    )


# ---------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------


def verify_chain(
    presented: Sequence[x509.Certificate],
    anchors: Sequence[x509.Certificate] | AnchorSet,
    now: datetime,
    policy: VerifyPolicy = VerifyPolicy(),
) -> VerifiedChain:
    """Validate ``presented`` (device certificate first, then untrusted
    intermediates in any order) against ``anchors`` at ``now``.

    Any anchor is a trust anchor, intermediates included (partial chains).
    Raises :class:`ChainError` only.
    """
    if not presented:
        raise ChainError(Reason.NO_CERTIFICATE, "no certificate was presented")
    if len(presented) > policy.max_presented:
        raise ChainError(
            Reason.CHAIN_TOO_LONG,
            f"{len(presented)} certificates presented, at most {policy.max_presented} are accepted",
        )
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    # RFC 5280 §4.1.2.5: validity has a resolution of one second; compare the
    # floor of ``now`` (x509-limbo notbefore-/notafter-fractional).
    now = now.astimezone(UTC).replace(microsecond=0)
    try:
        anchor_set = anchors if isinstance(anchors, AnchorSet) else AnchorSet(anchors)
        if not len(anchor_set):
            raise ChainError(Reason.UNTRUSTED, "no trust anchors to verify against")
        return _Verification(presented, anchor_set, now, policy).run()
    except ChainError:
        raise
    except Exception as exc:  # defensive: a parser corner we did not foresee
        raise ChainError(Reason.MALFORMED, f"chain could not be processed: {_short(exc)}") from None


class _Verification:
    """One call's state: the candidate pool, the budget and the first failure."""

    def __init__(
        self,
        presented: Sequence[x509.Certificate],
        anchors: AnchorSet,
        now: datetime,
        policy: VerifyPolicy,
    ) -> None:
        self.anchors = anchors
        self.now = now
        self.policy = policy
        self.leaf = _Node(presented[0], is_anchor=False)
        pool: dict[bytes, list[_Node]] = {}
        seen = {self.leaf.fp}
        for cert in presented[1:]:
            node = _Node(cert, is_anchor=False)
            if node.fp in seen or node.fp in anchors._by_fp:
                continue  # duplicates and presented anchors: the anchor copy is used
            seen.add(node.fp)
            pool.setdefault(node.subject, []).append(node)
        self.pool = pool
        self.expansions = 0
        self.paths = 0
        self.failure: ChainError | None = None

    # -- search ------------------------------------------------------------

    def run(self) -> VerifiedChain:
        leaf = self.leaf
        if leaf.fp in self.anchors._by_fp:
            raise ChainError(
                Reason.UNTRUSTED, "the device certificate is itself a trust anchor, not a device"
            )
        if leaf.self_issued and leaf.self_signed:
            raise ChainError(
                Reason.UNTRUSTED, "the device certificate is self-signed; it needs a trusted issuer"
            )
        # Path-independent defects of the device certificate come first: they
        # say more than "no path" would.
        _check_encoding(leaf, role="device")
        for path in self._paths([leaf], {leaf.key_id}):
            self.paths += 1
            try:
                return self._accept(path)
            except ChainError as exc:
                if self.failure is None:
                    self.failure = exc
            if self.paths >= _MAX_PATHS:
                break
        if self.failure is not None:
            raise self.failure
        raise ChainError(
            Reason.UNTRUSTED,
            f"no path from {_describe(leaf.cert)} to a trust anchor "
            f"(issuer {_name(leaf.cert.issuer)} is neither trusted nor presented)",
        )

    def _candidates(self, node: _Node) -> list[_Node]:
        anchors = self.anchors._by_subject.get(node.issuer, [])
        inters = self.pool.get(node.issuer, [])
        out: list[_Node] = []
        for group in (anchors, inters):
            # Candidates whose SKI matches the AKI first (RFC 5280 §4.2.1.1; a
            # mismatch is reported by _check_issuer), then currently valid ones
            # ("chain of pain", x509-limbo multiple-chains-expired-intermediate).
            out.extend(
                sorted(
                    group,
                    key=lambda c: (not _aki_matches(node, c), not _valid_at(c.cert, self.now)),
                )
            )
        return out

    def _paths(self, path: list[_Node], keys: set[bytes]) -> Iterator[list[_Node]]:
        if len(path) > self.policy.max_presented + 1:
            return
        for cand in self._candidates(path[-1]):
            if self.expansions >= _MAX_EXPANSIONS or self.paths >= _MAX_PATHS:
                return
            self.expansions += 1
            # One certificate per (subject, key) in a path: no cycles, and a
            # flood of same-subject-same-key certificates cannot multiply paths.
            if cand.key_id in keys:
                continue
            if cand.is_anchor:
                yield [*path, cand]
            else:
                keys.add(cand.key_id)
                yield from self._paths([*path, cand], keys)
                keys.discard(cand.key_id)

    # -- one candidate path -------------------------------------------------

    def _accept(self, path: list[_Node]) -> VerifiedChain:
        _check_path(path, self.now, self.policy)
        self._pyca(path)
        return VerifiedChain(tuple(n.cert for n in path))

    def _pyca(self, path: list[_Node]) -> None:
        """pyca has the last word on the path (signatures, its web-PKI profile)."""
        # pyca counts self-issued intermediates for pathLen (RFC 5280 does not):
        # when that matters, split the path at them, each piece anchored at the
        # self-issued certificate above it.
        cuts = [0, len(path) - 1]
        if not _path_length_ok(path, count_self_issued=True):
            inner = [i for i in range(1, len(path) - 1) if path[i].self_issued]
            cuts = [0, *inner, len(path) - 1]
        for k in range(len(cuts) - 1):
            lo, hi = cuts[k], cuts[k + 1]
            top = path[hi]
            store = self.anchors._store_for(top) if top.is_anchor else Store([top.cert])
            verifier = _verifier(store, self.now, hi - lo - 1, leaf_is_ca=lo > 0)
            try:
                verifier.verify(path[lo].cert, [n.cert for n in path[lo + 1 : hi]])
            except VerificationError as exc:
                self._diagnose(path, exc)
            except Exception as exc:  # pyca refuses some inputs with ValueError
                self._diagnose(path, exc)

    def _diagnose(self, path: list[_Node], exc: BaseException) -> None:
        for child, parent in itertools.pairwise(path):
            if not _signed_by(child.cert, parent.cert):
                raise ChainError(
                    Reason.BAD_SIGNATURE,
                    f"the signature of {_describe(child.cert)} does not verify with the key of "
                    f"{_describe(parent.cert)}",
                )
        raise ChainError(Reason.UNTRUSTED, f"path validation failed: {_short(exc)}")


def _aki_matches(child: _Node, parent: _Node) -> bool:
    """RFC 5280 §4.2.1.1/§4.2.1.2: AKI keyIdentifier names the issuer's SKI."""
    return child.aki is None or parent.ski is None or child.aki == parent.ski


def _valid_at(cert: x509.Certificate, now: datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


# ---------------------------------------------------------------------------
# Structural rules of one path (leaf first, anchor last)
# ---------------------------------------------------------------------------

_KNOWN_CRITICAL = frozenset(
    {
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.EXTENDED_KEY_USAGE,
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
        ExtensionOID.NAME_CONSTRAINTS,
        ExtensionOID.POLICY_CONSTRAINTS,
        ExtensionOID.CERTIFICATE_POLICIES,
        ExtensionOID.POLICY_MAPPINGS,
        ExtensionOID.INHIBIT_ANY_POLICY,
        ExtensionOID.ISSUER_ALTERNATIVE_NAME,
    }
)
_MUST_BE_NON_CRITICAL = {
    ExtensionOID.AUTHORITY_KEY_IDENTIFIER: "4.2.1.1",
    ExtensionOID.SUBJECT_KEY_IDENTIFIER: "4.2.1.2",
    ExtensionOID.AUTHORITY_INFORMATION_ACCESS: "4.2.2.1",
    ExtensionOID.FRESHEST_CRL: "4.2.1.15",
}
_MUST_BE_CRITICAL = {
    ExtensionOID.POLICY_CONSTRAINTS: "4.2.1.11",
    ExtensionOID.INHIBIT_ANY_POLICY: "4.2.1.14",
}
_ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
_ALLOWED_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)
_EDDSA_SIGNATURES = frozenset({SignatureAlgorithmOID.ED25519, SignatureAlgorithmOID.ED448})


def _check_path(path: list[_Node], now: datetime, policy: VerifyPolicy) -> None:
    """Raise the first broken rule of ``path`` as a :class:`ChainError`."""
    n = len(path)
    counted = n - sum(1 for node in path[1:-1] if node.self_issued)
    if counted > policy.max_chain_length:
        raise ChainError(
            Reason.CHAIN_TOO_LONG,
            f"the chain has {counted} certificates, at most {policy.max_chain_length} are accepted",
        )
    for i in range(1, n):  # the device certificate was checked before the search
        _check_encoding(path[i], role=_role(i, n))
    for i, node in enumerate(path):
        _check_validity(node.cert, now, _role(i, n))
    for i in range(1, n):
        _check_issuer(path[i - 1], path[i], _role(i, n))
    _check_leaf(path[0])
    _check_path_length(path)
    _check_name_constraints(path)
    _check_policies(path)


def _role(i: int, n: int) -> str:
    if i == 0:
        return "device"
    return "anchor" if i == n - 1 else "intermediate"


def _check_encoding(node: _Node, role: str) -> None:
    """Per-certificate form: RFC 5280 §4.1 and §4.2, plus the spec's key sizes."""
    cert = node.cert
    what = _What(role, cert)
    # §4.1.2.1 and spec ("uploaded as X.509 version 3 certificates"): v3 only.
    if cert.version is not x509.Version.v3:
        raise ChainError(Reason.MALFORMED, f"{what} is not an X.509 v3 certificate")
    raw = node.raw
    if raw is None:  # pragma: no cover - see _Node
        raise ChainError(Reason.MALFORMED, f"{what} has an unreadable encoding")
    # §4.1.2.2: the serial is a positive integer of at most 20 octets.
    if raw.serial and raw.serial[0] & 0x80:
        raise ChainError(Reason.MALFORMED, f"{what} has a negative serial number")
    if not raw.serial.strip(b"\x00"):
        raise ChainError(Reason.MALFORMED, f"{what} has serial number zero")
    if len(raw.serial) > 20:
        raise ChainError(Reason.MALFORMED, f"{what} has a serial number longer than 20 octets")
    # §4.1.1.2: signatureAlgorithm must equal tbsCertificate.signature.
    if raw.outer_alg != raw.inner_alg:
        raise ChainError(
            Reason.MALFORMED, f"{what} has mismatching inner and outer signature algorithms"
        )
    # Signatures made with SHA-1 or MD5 are forgeable (RFC 6194, RFC 6151);
    # the anchor's own signature is not relied upon.
    if not node.is_anchor:
        _check_signature_algorithm(cert, what)
    # §4.1.2.4: the issuer is a non-empty name.
    if len(cert.issuer) == 0:
        raise ChainError(Reason.MALFORMED, f"{what} has an empty issuer name")
    exts = node.extensions()  # §4.2: duplicates / unparsable extensions → MALFORMED
    for ext in exts:
        if ext.critical and ext.oid not in _KNOWN_CRITICAL:
            section = _MUST_BE_NON_CRITICAL.get(ext.oid)
            if section:
                raise ChainError(
                    Reason.MALFORMED,
                    f"{what}: extension {_oid_name(ext.oid)} must be non-critical "
                    f"(RFC 5280 §{section})",
                )
            raise ChainError(
                Reason.MALFORMED,
                f"{what} has an unsupported critical extension {_oid_name(ext.oid)} "
                "(RFC 5280 §4.2)",
            )
        if not ext.critical and ext.oid in _MUST_BE_CRITICAL:
            raise ChainError(
                Reason.MALFORMED,
                f"{what}: extension {_oid_name(ext.oid)} must be critical "
                f"(RFC 5280 §{_MUST_BE_CRITICAL[ext.oid]})",
            )
    aki = node.ext(ExtensionOID.AUTHORITY_KEY_IDENTIFIER)
    if aki is not None:
        value: x509.AuthorityKeyIdentifier = aki.value
        # §4.2.1.1: the keyIdentifier field MUST be included.
        if value.key_identifier is None:
            raise ChainError(
                Reason.MALFORMED, f"{what}: authorityKeyIdentifier has no keyIdentifier"
            )
    elif not node.is_anchor and not (node.self_issued and node.self_signed):
        # §4.2.1.1: AKI is mandatory except in a self-signed certificate. Not
        # required of the trust anchor: §6.1.1(d) takes only its name and key
        # as input (x509-limbo cve::cve-2024-0567 trusts a cross-signed root
        # without AKI).
        raise ChainError(
            Reason.MALFORMED, f"{what} has no authorityKeyIdentifier (RFC 5280 §4.2.1.1)"
        )
    pc = node.ext(ExtensionOID.POLICY_CONSTRAINTS)
    if pc is not None:
        pcv: x509.PolicyConstraints = pc.value
        if pcv.require_explicit_policy is None and pcv.inhibit_policy_mapping is None:
            raise ChainError(Reason.MALFORMED, f"{what}: policyConstraints is empty (§4.2.1.11)")
    _check_key(node, what)


def _check_signature_algorithm(cert: x509.Certificate, what: _What) -> None:
    try:
        algorithm = cert.signature_hash_algorithm
    except Exception:
        algorithm = None
        name = cert.signature_algorithm_oid.dotted_string
    else:
        name = algorithm.name if algorithm is not None else ""
    if algorithm is None:
        if cert.signature_algorithm_oid in _EDDSA_SIGNATURES:
            return
    elif isinstance(algorithm, _ALLOWED_HASHES):
        return
    raise ChainError(
        Reason.BAD_SIGNATURE, f"{what} is signed with an unaccepted algorithm ({name or 'unknown'})"
    )


def _check_key(node: _Node, what: _What) -> None:
    """Acceptable keys. Spec ("Introduction to X.509"): RSA of 1024 bits or less
    is not safe; CA/B BR §6.1.5: RSA ≥ 2048 and a multiple of 8; ECDSA on
    P-256/P-384/P-521 with a named curve (RFC 5480 §2.1.1); Ed25519/Ed448. DSA
    and everything else are refused."""
    raw = node.raw
    if (
        raw is not None
        and raw.spki_alg_oid == _OID_EC_PUBLIC_KEY
        and (not raw.spki_params or raw.spki_params[0] != 0x06)
    ):
        raise ChainError(
            Reason.MALFORMED, f"{what}: EC key without a named curve (RFC 5480 §2.1.1)"
        )
    try:
        key = node.cert.public_key()
    except Exception as exc:
        raise ChainError(
            Reason.MALFORMED, f"{what}: public key does not parse: {_short(exc)}"
        ) from None
    if isinstance(key, rsa.RSAPublicKey):
        bits = key.key_size
        if bits < 2048 or bits % 8:
            raise ChainError(
                Reason.MALFORMED,
                f"{what}: RSA key of {bits} bits is not accepted (2048 or more, multiple of 8)",
            )
        return
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _ALLOWED_CURVES):
            raise ChainError(Reason.MALFORMED, f"{what}: EC curve {key.curve.name} is not accepted")
        return
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return
    raise ChainError(Reason.MALFORMED, f"{what}: {type(key).__name__} keys are not accepted")


def _check_validity(cert: x509.Certificate, now: datetime, role: str) -> None:
    """RFC 5280 §4.1.2.5 / §6.1.3(a)(2): notBefore ≤ now ≤ notAfter, inclusive."""
    if now < cert.not_valid_before_utc:
        raise ChainError(
            Reason.NOT_YET_VALID,
            f"{role} certificate {_describe(cert)} is not valid before "
            f"{cert.not_valid_before_utc.isoformat()}",
        )
    if now > cert.not_valid_after_utc:
        raise ChainError(
            Reason.EXPIRED,
            f"{role} certificate {_describe(cert)} expired at "
            f"{cert.not_valid_after_utc.isoformat()}",
        )


def _check_issuer(child: _Node, parent: _Node, role: str) -> None:
    """Rules for a certificate that signs another one (intermediates and the anchor)."""
    cert = parent.cert
    what = _What(role, cert)
    bc_ext = parent.ext(ExtensionOID.BASIC_CONSTRAINTS)
    # §4.2.1.9, §6.1.4(k); spec: "every certificate which is used to sign
    # another certificate must contain the extension CA:TRUE".
    if bc_ext is None:
        raise ChainError(Reason.NOT_CA, f"{what} signs certificates but has no basicConstraints")
    bc: x509.BasicConstraints = bc_ext.value
    if not bc.ca:
        raise ChainError(Reason.NOT_CA, f"{what} signs certificates but is not a CA (CA:false)")
    # §4.2.1.9: conforming CAs MUST mark basicConstraints critical.
    if not bc_ext.critical:
        raise ChainError(Reason.MALFORMED, f"{what}: basicConstraints must be critical")
    # §4.2.1.3, §6.1.4(n): keyUsage, when present, must assert keyCertSign.
    ku_ext = parent.ext(ExtensionOID.KEY_USAGE)
    if ku_ext is not None and not ku_ext.value.key_cert_sign:
        raise ChainError(Reason.BAD_USAGE, f"{what}: keyUsage does not allow keyCertSign")
    # §4.2.1.2: a CA certificate MUST carry a subjectKeyIdentifier.
    if parent.ski is None:
        raise ChainError(
            Reason.MALFORMED, f"{what} has no subjectKeyIdentifier (RFC 5280 §4.2.1.2)"
        )
    # §4.1.2.6: a CA's subject is a non-empty name.
    if len(cert.subject) == 0:
        raise ChainError(Reason.MALFORMED, f"{what} has an empty subject")
    # §4.2.1.12 as applied by OpenSSL, Windows and pyca: an EKU in a CA
    # restricts the certificates below it.
    _check_eku(parent, what, leaf=False)
    # §4.2.1.1: the child's AKI identifies this issuer (keyIdentifier = SKI;
    # authorityCertIssuer + authorityCertSerialNumber = this certificate).
    _check_aki_link(child, parent, what)
    if parent.is_anchor and parent.self_issued:
        _check_aki_link(parent, parent, what)


def _check_aki_link(child: _Node, parent: _Node, what: _What) -> None:
    aki_ext = child.ext(ExtensionOID.AUTHORITY_KEY_IDENTIFIER)
    if aki_ext is None:
        return
    aki: x509.AuthorityKeyIdentifier = aki_ext.value
    if aki.key_identifier is not None and parent.ski not in (None, aki.key_identifier):
        if not _signed_by(child.cert, parent.cert):
            raise ChainError(
                Reason.BAD_SIGNATURE,
                f"{_describe(child.cert)} is not signed by the key of {what} "
                "(its authorityKeyIdentifier names another key)",
            )
        raise ChainError(
            Reason.MALFORMED,
            f"{what}: authorityKeyIdentifier of {_describe(child.cert)} does not match "
            "the issuer's subjectKeyIdentifier",
        )
    if aki.authority_cert_issuer is not None:
        names = [g.value for g in aki.authority_cert_issuer if isinstance(g, x509.DirectoryName)]
        if (
            parent.cert.issuer not in names
            or aki.authority_cert_serial_number != parent.cert.serial_number
        ):
            raise ChainError(
                Reason.MALFORMED,
                f"{what}: authorityCertIssuer/authorityCertSerialNumber of "
                f"{_describe(child.cert)} do not identify its issuer",
            )


def _check_eku(node: _Node, what: _What, leaf: bool) -> None:
    ext = node.ext(ExtensionOID.EXTENDED_KEY_USAGE)
    if ext is None:
        return  # §4.2.1.12: no EKU = no restriction
    if leaf and ext.critical:
        # CA/B BR §7.1.2.7.6 and pyca's profile: EKU is non-critical.
        raise ChainError(Reason.MALFORMED, f"{what}: extKeyUsage must not be critical")
    usages = set(ext.value)
    if not usages & {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE}:
        raise ChainError(
            Reason.BAD_USAGE,
            f"{what}: extKeyUsage does not allow TLS client authentication (RFC 5280 §4.2.1.12)",
        )


def _check_leaf(node: _Node) -> None:
    """The device certificate: an end entity able to sign a TLS handshake."""
    cert = node.cert
    what = _What("device", cert)
    bc_ext = node.ext(ExtensionOID.BASIC_CONSTRAINTS)
    bc: x509.BasicConstraints | None = bc_ext.value if bc_ext is not None else None
    if bc is not None and not bc.ca and bc.path_length is not None:
        # §4.2.1.9: pathLenConstraint only with cA.
        raise ChainError(Reason.MALFORMED, f"{what}: pathLenConstraint without CA:true")
    if bc is not None and bc.ca:
        # RFC 5280 would allow a CA certificate as the last certificate of a
        # path; a device is an end entity (spec: devices present certificates
        # *signed by* the uploaded CA; CA/B BR §7.1.2.7.8; pyca's profile).
        raise ChainError(Reason.BAD_USAGE, f"{what} is a CA certificate, not a device certificate")
    ku_ext = node.ext(ExtensionOID.KEY_USAGE)
    if ku_ext is not None:
        ku: x509.KeyUsage = ku_ext.value
        # §4.2.1.9: keyCertSign only with cA.
        if ku.key_cert_sign:
            raise ChainError(Reason.BAD_USAGE, f"{what}: keyCertSign asserted without CA:true")
        # §4.2.1.3 + RFC 8446 §4.4.2.2: the key signs the TLS handshake, so a
        # keyUsage must allow digitalSignature.
        if not ku.digital_signature:
            raise ChainError(Reason.BAD_USAGE, f"{what}: keyUsage does not allow digitalSignature")
    _check_eku(node, what, leaf=True)
    san_ext = node.ext(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    if len(cert.subject) == 0:
        # §4.1.2.6 / §4.2.1.6: an empty subject needs a critical SAN.
        if san_ext is None or not san_ext.critical:
            raise ChainError(
                Reason.MALFORMED, f"{what}: empty subject requires a critical subjectAltName"
            )
    elif san_ext is not None and san_ext.critical:
        # §4.2.1.6 (SHOULD), CA/B BR §7.1.2.7.12 and pyca's profile (MUST NOT).
        raise ChainError(
            Reason.MALFORMED,
            f"{what}: subjectAltName must not be critical with a non-empty subject",
        )
    if node.ext(ExtensionOID.NAME_CONSTRAINTS) is not None:
        # §4.2.1.10: name constraints MUST be used only in a CA certificate.
        raise ChainError(Reason.MALFORMED, f"{what} carries nameConstraints")


def _path_length_violation(
    path: list[_Node], count_self_issued: bool
) -> tuple[_Node, int, int] | None:
    below = 0
    for i in range(1, len(path)):
        node = path[i]
        bc_ext = node.ext(ExtensionOID.BASIC_CONSTRAINTS)
        limit = bc_ext.value.path_length if bc_ext is not None else None
        if limit is not None and below > limit:
            return node, limit, below
        if i < len(path) - 1 and (count_self_issued or not node.self_issued):
            below += 1
    return None


def _path_length_ok(path: list[_Node], count_self_issued: bool) -> bool:
    return _path_length_violation(path, count_self_issued) is None


def _check_path_length(path: list[_Node]) -> None:
    """RFC 5280 §4.2.1.9 and §6.1.4(l)(m): a CA's pathLenConstraint bounds the
    non-self-issued intermediates below it; the leaf never counts."""
    found = _path_length_violation(path, count_self_issued=False)
    if found is not None:
        node, limit, below = found
        raise ChainError(
            Reason.PATH_LENGTH,
            f"{_describe(node.cert)} allows {limit} intermediate CA certificate(s) below it "
            f"(pathlen:{limit}), the chain has {below}",
        )


# -- name constraints (RFC 5280 §4.2.1.10, §6.1.3(b)(c), §6.1.4(g)) ---------

_DNS_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")


def _valid_dns(name: str, wildcard_ok: bool) -> bool:
    if not name or len(name) > 253 or not name.isascii():
        return False
    labels = name.lower().split(".")
    if wildcard_ok and labels[0] == "*" and len(labels) > 2:
        labels = labels[1:]
    return all(_DNS_LABEL.match(label) for label in labels)


def _valid_mailbox(name: str) -> bool:
    local, at, domain = name.rpartition("@")
    return bool(at) and bool(local) and "@" not in local and _valid_dns(domain, False)


def _dns_within(name: str, base: str) -> bool:
    return base == "" or name == base or name.endswith("." + base)


_NameValue = str | ipaddress.IPv4Address | ipaddress.IPv6Address | x509.Name


def _names_of(node: _Node) -> list[tuple[str, _NameValue]]:
    """The names a constraint applies to: subject DN, its emailAddress when
    there is no SAN (§4.2.1.10), and every SAN entry."""
    cert = node.cert
    names: list[tuple[str, _NameValue]] = []
    if len(cert.subject) > 0:
        names.append(("dn", cert.subject))
    san_ext = node.ext(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    if san_ext is None:
        for attr in cert.subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS):
            if isinstance(attr.value, str):
                names.append(("email", attr.value))
        return names
    for gn in san_ext.value:
        names.append(_general_name(gn, constraint=False))
    return names


def _general_name(gn: x509.GeneralName, constraint: bool) -> tuple[str, Any]:
    if isinstance(gn, x509.DNSName):
        return "dns", gn.value
    if isinstance(gn, x509.IPAddress):
        return "ip", gn.value
    if isinstance(gn, x509.RFC822Name):
        return "email", gn.value
    if isinstance(gn, x509.DirectoryName):
        return "dn", gn.value
    if isinstance(gn, x509.UniformResourceIdentifier):
        return "uri", gn.value
    if isinstance(gn, x509.OtherName):
        return "other", gn.type_id.dotted_string
    if isinstance(gn, x509.RegisteredID):
        return "rid", gn.value.dotted_string
    return "unsupported", repr(gn)


def _rdn_key(rdn: x509.RelativeDistinguishedName) -> frozenset[tuple[str, str]]:
    out = set()
    for attr in rdn:
        value = attr.value if isinstance(attr.value, str) else attr.value.hex()
        out.add((attr.oid.dotted_string, " ".join(value.split()).casefold()))
    return frozenset(out)


def _dn_within(name: x509.Name, base: x509.Name) -> bool:
    """§7.1: ``base`` is a prefix of ``name`` (RDN by RDN, caseless)."""
    base_rdns = base.rdns
    name_rdns = name.rdns
    if len(base_rdns) > len(name_rdns):
        return False
    return all(_rdn_key(a) == _rdn_key(b) for a, b in zip(base_rdns, name_rdns, strict=False))


def _matches(kind: str, name: Any, base: Any) -> bool:
    """Does ``name`` lie in the subtree ``base`` (both of form ``kind``)?"""
    if kind == "dns":
        n = name.lower()
        b = base.lower()
        if n.startswith("*."):
            # A wildcard SAN stands for every name one label below its base:
            # inside the subtree only if that base is inside it.
            return _dns_within(n[2:], b)
        return _dns_within(n, b)
    if kind == "ip":
        if isinstance(base, ipaddress.IPv4Network | ipaddress.IPv6Network):
            return bool(name.version == base.version and name in base)
        return False
    if kind == "email":
        local, _, domain = name.rpartition("@")
        if "@" in base:
            b_local, _, b_domain = base.rpartition("@")
            return bool(local == b_local and domain.lower() == b_domain.lower())
        if base.startswith("."):
            return bool(domain.lower().endswith(base.lower()))
        return bool(domain.lower() == base.lower())
    if kind == "dn":
        return _dn_within(name, base)
    if kind == "uri":
        host = urlsplit(name).hostname or ""
        if not host:
            return False
        if base.startswith("."):
            return bool(host.endswith(base.lower()))
        return bool(host == base.lower())
    return False


def _excluded_hit(kind: str, name: Any, base: Any) -> bool:
    """Could ``name`` denote something inside the excluded subtree ``base``?"""
    if _matches(kind, name, base):
        return True
    if kind == "dns" and name.lower().startswith("*."):
        # Defensive (x509-limbo cve-2025-61727): ``*.example.com`` could match
        # the excluded ``bar.example.com``.
        return _dns_within(base.lower(), name.lower()[2:])
    return False


def _check_constraint_syntax(kind: str, base: Any, where: _What) -> None:
    bad = False
    if kind == "dns":
        # §4.2.1.10: DNS constraints are host names (no leading period, no '*').
        bad = base != "" and not _valid_dns(base, wildcard_ok=False)
    elif kind == "email":
        if "@" in base:
            bad = not _valid_mailbox(base)
        else:
            bad = not _valid_dns(base[1:] if base.startswith(".") else base, False)
    if bad:
        raise ChainError(Reason.MALFORMED, f"{where}: malformed name constraint {base!r}")


def _check_name_syntax(kind: str, name: Any, where: _What) -> None:
    bad = False
    if kind == "dns":
        bad = not _valid_dns(name, wildcard_ok=True)
    elif kind == "email":
        bad = not _valid_mailbox(name)
    elif kind == "ip":
        bad = not isinstance(name, ipaddress.IPv4Address | ipaddress.IPv6Address)
    if bad:
        raise ChainError(Reason.MALFORMED, f"{where}: malformed {kind} name {name!r}")


def _check_name_constraints(path: list[_Node]) -> None:
    permitted: list[list[tuple[str, Any]]] = []  # one list per constraining CA
    excluded: list[tuple[str, Any]] = []
    for i in range(len(path) - 1, -1, -1):
        node = path[i]
        is_leaf = i == 0
        if (permitted or excluded) and (is_leaf or not node.self_issued):
            # §6.1.3(b)(c); names of self-issued intermediates are exempt.
            where = _What(_role(i, len(path)), node.cert)
            names = _names_of(node)
            # Bounded work (x509-limbo pathological::nc-dos-*): every subject
            # attribute and SAN entry against every constraint in effect.
            weight = len(names) + len(node.cert.subject)
            constraints = len(excluded) + sum(len(g) for g in permitted)
            if weight * constraints > _MAX_NAME_CHECKS:
                raise ChainError(
                    Reason.MALFORMED,
                    f"{where}: too many names ({weight}) for the name constraints in effect "
                    f"({constraints}) to check",
                )
            for kind, name in names:
                constrained = [b for k, b in excluded if k == kind]
                for group in permitted:
                    constrained.extend(b for k, b in group if k == kind)
                if not constrained:
                    continue
                if kind not in ("dns", "ip", "email", "dn", "uri"):
                    # §4.2.1.10: a constraint on a name form we cannot
                    # process, with such a name present, rejects the chain.
                    raise ChainError(
                        Reason.UNTRUSTED,
                        f"{where}: cannot process the name constraints on its {kind} name",
                    )
                _check_name_syntax(kind, name, where)
                for k, base in excluded:
                    if k == kind and _excluded_hit(kind, name, base):
                        raise ChainError(
                            Reason.UNTRUSTED,
                            f"{where}: name {_show(name)} is excluded by a name constraint",
                        )
                for group in permitted:
                    bases = [b for k, b in group if k == kind]
                    if bases and not any(_matches(kind, name, b) for b in bases):
                        raise ChainError(
                            Reason.UNTRUSTED,
                            f"{where}: name {_show(name)} is outside the permitted "
                            "name constraints",
                        )
        if is_leaf:
            break
        nc_ext = node.ext(ExtensionOID.NAME_CONSTRAINTS)
        if nc_ext is None:
            continue
        nc: x509.NameConstraints = nc_ext.value
        where = _What(_role(i, len(path)), node.cert)
        if nc.permitted_subtrees is not None:
            group = [_general_name(g, constraint=True) for g in nc.permitted_subtrees]
            for kind, base in group:
                _check_constraint_syntax(kind, base, where)
            permitted.append(group)
        if nc.excluded_subtrees is not None:
            for g in nc.excluded_subtrees:
                kind, base = _general_name(g, constraint=True)
                _check_constraint_syntax(kind, base, where)
                excluded.append((kind, base))


# -- certificate policies (RFC 5280 §6.1.3(d)(f), §6.1.4(h)(i)(j), §6.1.5) --

_ANY_POLICY = x509.ObjectIdentifier("2.5.29.32.0")


def _check_policies(path: list[_Node]) -> None:
    """A reduced §6.1 policy check, enough for policyConstraints: when a
    requireExplicitPolicy takes effect, the certificates below the anchor must
    share a policy (anyPolicy matches all unless inhibitAnyPolicy applies).
    Policy mapping is not supported: a path that would need it is refused."""
    n = len(path) - 1  # certificates below the anchor
    explicit = n + 1
    inhibit_any = n + 1
    valid: set[x509.ObjectIdentifier] | None = None  # None: still "any policy"
    null = False
    mapped = False

    def prepare(node: _Node) -> None:
        nonlocal explicit, inhibit_any
        pc_ext = node.ext(ExtensionOID.POLICY_CONSTRAINTS)
        if pc_ext is not None and pc_ext.value.require_explicit_policy is not None:
            explicit = min(explicit, pc_ext.value.require_explicit_policy)  # §6.1.4(i)
        iap_ext = node.ext(ExtensionOID.INHIBIT_ANY_POLICY)
        if iap_ext is not None:
            inhibit_any = min(inhibit_any, iap_ext.value.skip_certs)  # §6.1.4(j)

    prepare(path[n])  # the anchor's constraints apply too (defensive)
    for k in range(1, n + 1):
        node = path[n - k]
        is_leaf = k == n
        cp_ext = node.ext(ExtensionOID.CERTIFICATE_POLICIES)
        if cp_ext is None:
            null = True  # §6.1.3(e)
        elif not null:
            oids = {p.policy_identifier for p in cp_ext.value}
            any_ok = _ANY_POLICY in oids and (inhibit_any > 0 or (not is_leaf and node.self_issued))
            if not any_ok:
                concrete = oids - {_ANY_POLICY}
                valid = concrete if valid is None else valid & concrete
                null = not valid
        if is_leaf:
            explicit = max(explicit - 1, 0)  # §6.1.5(a)(b)
            pc_ext = node.ext(ExtensionOID.POLICY_CONSTRAINTS)
            if pc_ext is not None and pc_ext.value.require_explicit_policy == 0:
                explicit = 0
        else:
            if node.ext(ExtensionOID.POLICY_MAPPINGS) is not None:
                mapped = True
            if not node.self_issued:  # §6.1.4(h)
                explicit = max(explicit - 1, 0)
                inhibit_any = max(inhibit_any - 1, 0)
            prepare(node)
    # §6.1.3(f) / §6.1.5(g): explicit_policy > 0 or a non-empty policy set.
    if explicit <= 0 and (null or mapped):
        raise ChainError(
            Reason.UNTRUSTED,
            "the chain requires an explicit certificate policy (policyConstraints) and its "
            "certificates do not share one"
            + (" (policy mapping is not supported)" if mapped and not null else ""),
        )


# ---------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------


class _What:
    """ "<role> certificate '<subject>' (serial …)", formatted only for a message."""

    __slots__ = ("cert", "role")

    def __init__(self, role: str, cert: x509.Certificate) -> None:
        self.role = role
        self.cert = cert

    def __str__(self) -> str:
        return f"{self.role} certificate {_describe(self.cert)}"


def _name(name: x509.Name) -> str:
    try:
        text = name.rfc4514_string()
    except Exception:
        return "<unreadable name>"
    return text or "<empty name>"


def _describe(cert: x509.Certificate) -> str:
    try:
        serial = format(cert.serial_number, "x")
    except Exception:  # pragma: no cover
        serial = "?"
    return f"'{_name(cert.subject)}' (serial {serial})"


def _show(name: Any) -> str:
    if isinstance(name, x509.Name):
        return repr(_name(name))
    return repr(str(name))


def _oid_name(oid: x509.ObjectIdentifier) -> str:
    name = getattr(oid, "_name", None)
    if isinstance(name, str) and not name.startswith("Unknown"):
        return f"{name} ({oid.dotted_string})"
    return oid.dotted_string


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:300]
