"""Certificate revocation lists (RFC 5280 §5 and §6.3), pure and pre-indexed.

:class:`CrlIndex` validates one CRL against its issuer's certificate once and
keeps the revoked serials in a dict, so a lookup is O(1) whatever the CRL's
size. :func:`check_chain_against_crls` applies CRLs to a verified chain.

Decisions (x509-limbo ``crl::`` cases and RFC 5280; a supplied CRL that cannot
be used makes the check fail closed with ``CRL_UNAVAILABLE``, never "not
revoked"):

* the CRL's signature must verify with the issuer's key (§6.3.3(g)) and its
  issuer name must be the issuer's subject (§6.3.3(b));
* an issuer with a keyUsage extension must assert cRLSign (§6.3.3(f),
  ``crl::issuer-missing-crlsign``); no keyUsage at all is accepted
  (``crl::issuer-no-keyusage-extension``);
* CRLNumber is mandatory and non-critical (§5.2.3, ``crl::crlnumber-missing``,
  ``crl::crlnumber-critical``); unknown critical CRL or entry extensions are
  refused (§5.2, §5.3); nextUpdate is mandatory (§5.1.2.5);
* a CRL whose nextUpdate is past, or whose thisUpdate is in the future, is
  stale at ``now`` (§6.3.3(a)(2));
* indirect CRLs (§5.2.5 indirectCRL, §5.3.3 certificateIssuer) are not
  supported; an issuingDistributionPoint limited to user or CA certificates
  only covers those;
* a CRL of a different issuer never affects a certificate
  (``crl::certificate-serial-on-crl-different-issuer``); a certificate whose
  issuer has no CRL is not revoked (ad-hoc ``--crl`` mode).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import CRLEntryExtensionOID, ExtensionOID

from trust.model import Reason
from trust.verify import ChainError, VerifiedChain

__all__ = ["MAX_CRL_BYTES", "CrlError", "CrlIndex", "check_chain_against_crls", "load_crls"]

MAX_CRL_BYTES = 64 << 20
"""Upper bound on one CRL upload (a million entries fit)."""

_SHA256 = hashes.SHA256()
_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)

_KNOWN_CRL_EXTENSIONS = frozenset(
    {
        ExtensionOID.CRL_NUMBER,
        ExtensionOID.DELTA_CRL_INDICATOR,
        ExtensionOID.ISSUING_DISTRIBUTION_POINT,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
        ExtensionOID.ISSUER_ALTERNATIVE_NAME,
        ExtensionOID.FRESHEST_CRL,
        ExtensionOID.AUTHORITY_INFORMATION_ACCESS,
    }
)
_KNOWN_ENTRY_EXTENSIONS = frozenset(
    {
        CRLEntryExtensionOID.CRL_REASON,
        CRLEntryExtensionOID.INVALIDITY_DATE,
    }
)


class CrlError(ValueError):
    """The CRL is unusable (bad encoding, signature, issuer or profile); the message says why."""


def load_crls(data: bytes) -> list[x509.CertificateRevocationList]:
    """Parse CRLs from PEM (any number of ``X509 CRL`` blocks) or one DER CRL."""
    raw = bytes(data)
    if len(raw) > MAX_CRL_BYTES:
        raise CrlError(f"CRL input is larger than {MAX_CRL_BYTES} bytes")
    if not raw.strip():
        raise CrlError("CRL input is empty")
    if b"-----BEGIN" in raw:
        blocks = _PEM_CRL.findall(raw)
        if not blocks:
            raise CrlError("no PEM X509 CRL block found")
        out = []
        for i, block in enumerate(blocks, start=1):
            try:
                out.append(x509.load_pem_x509_crl(block))
            except Exception as exc:
                raise CrlError(f"CRL {i} in PEM is malformed: {_short(exc)}") from None
        return out
    try:
        return [x509.load_der_x509_crl(raw)]
    except Exception as exc:
        raise CrlError(f"not a PEM or DER CRL: {_short(exc)}") from None


class CrlIndex:
    """One CRL validated against its issuer's certificate, serials indexed.

    Raises :class:`CrlError` when the CRL is not a usable CRL of ``issuer``.
    Time is not checked here (a CRL is built once and used for a while): use
    :meth:`check_time` with the decision's ``now``.
    """

    __slots__ = (
        "_revoked",
        "crl",
        "is_delta",
        "issuer",
        "next_update",
        "number",
        "only_ca_certs",
        "only_user_certs",
        "this_update",
    )

    def __init__(self, crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> None:
        self.crl = crl
        self.issuer = issuer
        who = _name(issuer.subject)
        # §6.3.3(b): the CRL issuer is the certificate's issuer.
        if crl.issuer != issuer.subject:
            raise CrlError(f"CRL issuer {_name(crl.issuer)} is not {who}")
        # §6.3.3(f): an issuer with keyUsage must allow cRLSign.
        try:
            ku = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            ku = None
        except Exception as exc:
            raise CrlError(f"issuer {who} has unreadable extensions: {_short(exc)}") from None
        if ku is not None and not ku.crl_sign:
            raise CrlError(f"issuer {who} may not sign CRLs (keyUsage lacks cRLSign)")
        # §6.3.3(g): the signature verifies with the issuer's key.
        try:
            key = issuer.public_key()
            if not isinstance(
                key,
                rsa.RSAPublicKey
                | ec.EllipticCurvePublicKey
                | ed25519.Ed25519PublicKey
                | ed448.Ed448PublicKey
                | dsa.DSAPublicKey,
            ):
                raise CrlError(f"issuer {who} has a key that cannot sign CRLs")
            valid = crl.is_signature_valid(key)
        except CrlError:
            raise
        except Exception as exc:
            raise CrlError(f"CRL signature of {who} cannot be checked: {_short(exc)}") from None
        if not valid:
            raise CrlError(f"CRL signature does not verify with the key of {who}")
        try:
            extensions = list(crl.extensions)
        except Exception as exc:
            raise CrlError(f"CRL of {who} has malformed extensions: {_short(exc)}") from None
        number: int | None = None
        self.is_delta = False
        self.only_user_certs = False
        self.only_ca_certs = False
        for ext in extensions:
            value = ext.value
            if isinstance(value, x509.CRLNumber):
                if ext.critical:  # §5.2.3: MUST be non-critical
                    raise CrlError(f"CRL of {who}: the CRLNumber extension is critical")
                number = value.crl_number
            elif isinstance(value, x509.DeltaCRLIndicator):
                self.is_delta = True
            elif isinstance(value, x509.IssuingDistributionPoint):
                if value.indirect_crl:
                    raise CrlError(f"CRL of {who} is an indirect CRL (not supported)")
                if value.only_contains_attribute_certs:
                    raise CrlError(f"CRL of {who} only covers attribute certificates")
                self.only_user_certs = value.only_contains_user_certs
                self.only_ca_certs = value.only_contains_ca_certs
            elif isinstance(value, x509.AuthorityKeyIdentifier):
                ski = _ski(issuer)
                if value.key_identifier is not None and ski not in (None, value.key_identifier):
                    raise CrlError(f"CRL of {who}: authorityKeyIdentifier is not the issuer's key")
            elif ext.critical and ext.oid not in _KNOWN_CRL_EXTENSIONS:
                raise CrlError(
                    f"CRL of {who} has an unsupported critical extension {ext.oid.dotted_string}"
                )
        if number is None:  # §5.2.3: conforming CRL issuers MUST include it
            raise CrlError(f"CRL of {who} has no CRLNumber extension")
        self.number: int = number
        self.this_update: datetime = crl.last_update_utc
        next_update = crl.next_update_utc
        if next_update is None:  # §5.1.2.5: MUST be present
            raise CrlError(f"CRL of {who} has no nextUpdate")
        self.next_update: datetime = next_update
        self._revoked = _index(crl, who)

    def __len__(self) -> int:
        return len(self._revoked)

    def is_revoked(self, serial: int) -> datetime | None:
        """The revocation date of ``serial`` on this CRL, or None."""
        return self._revoked.get(serial)

    def covers(self, cert: x509.Certificate) -> bool:
        """Is ``cert`` in this CRL's scope (issuer and issuingDistributionPoint)?"""
        if cert.issuer != self.crl.issuer:
            return False
        if self.only_user_certs or self.only_ca_certs:
            try:
                bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
                ca = bool(bc.ca)
            except Exception:
                ca = False
            return self.only_ca_certs if ca else self.only_user_certs
        return True

    def check_time(self, now: datetime) -> None:
        """§6.3.3(a)(2): the CRL is current at ``now`` (else :class:`CrlError`)."""
        now = _utc(now)
        who = _name(self.issuer.subject)
        if now < self.this_update:
            raise CrlError(f"CRL of {who} is not yet valid (thisUpdate {self.this_update:%FT%TZ})")
        if now > self.next_update:
            raise CrlError(f"CRL of {who} is stale (nextUpdate {self.next_update:%FT%TZ})")


def _index(crl: x509.CertificateRevocationList, who: str) -> dict[int, datetime]:
    revoked: dict[int, datetime] = {}
    try:
        for entry in crl:
            exts = entry.extensions
            if len(exts) and not _entry_revokes(exts, who):
                continue
            revoked.setdefault(entry.serial_number, entry.revocation_date_utc)
    except CrlError:
        raise
    except Exception as exc:
        raise CrlError(f"CRL of {who} has malformed entries: {_short(exc)}") from None
    return revoked


def _entry_revokes(exts: x509.Extensions, who: str) -> bool:
    """§5.3: entry extensions; False for removeFromCRL (a delta CRL un-revoking)."""
    revokes = True
    for ext in exts:
        if ext.oid == CRLEntryExtensionOID.CERTIFICATE_ISSUER:
            raise CrlError(f"CRL of {who} names other certificate issuers (indirect CRL)")
        if ext.critical and ext.oid not in _KNOWN_ENTRY_EXTENSIONS:
            raise CrlError(
                f"CRL of {who} has an entry with an unsupported critical extension "
                f"{ext.oid.dotted_string}"
            )
        if isinstance(ext.value, x509.CRLReason):
            revokes = ext.value.reason is not x509.ReasonFlags.remove_from_crl
    return revokes


def check_chain_against_crls(
    chain: VerifiedChain,
    crls: Sequence[x509.CertificateRevocationList | CrlIndex],
    now: datetime,
    *,
    issuers: Iterable[x509.Certificate] = (),
) -> None:
    """Raise ``ChainError(REVOKED)`` when a certificate of ``chain`` is revoked by
    a CRL of its issuer, ``ChainError(CRL_UNAVAILABLE)`` when such a CRL is
    unusable (fail closed).

    ``crls`` may hold prepared :class:`CrlIndex` objects (no signature check
    or indexing per call) as well as raw CRLs. The leaf and the intermediates
    are checked against their issuer in the chain. The anchor is checked too
    when its issuer is among ``issuers`` (e.g. the other trust anchors) and is
    not the anchor itself: a self-signed root cannot revoke itself (RFC 5280
    §6.1: the trust anchor is an input of path validation, not part of the
    path).
    """
    certs = chain.certificates
    if not crls:
        return
    pairs: list[tuple[int, x509.Certificate, x509.Certificate]] = [
        (i, certs[i], certs[i + 1]) for i in range(len(certs) - 1)
    ]
    anchor = certs[-1]
    if anchor.issuer != anchor.subject:
        for other in issuers:
            if other.subject == anchor.issuer and _issued_by(anchor, other):
                pairs.append((len(certs) - 1, anchor, other))
                break
    cache: dict[tuple[int, bytes], CrlIndex] = {}
    for position, cert, issuer in pairs:
        for item in crls:
            crl = item.crl if isinstance(item, CrlIndex) else item
            if crl.issuer != issuer.subject:
                continue
            if not _aki_matches(crl, issuer):
                continue  # another key of a same-named CA: not this issuer's CRL
            try:
                if isinstance(item, CrlIndex) and item.issuer == issuer:
                    index = item
                else:
                    key = (id(crl), issuer.fingerprint(_SHA256))
                    index = cache.get(key) or CrlIndex(crl, issuer)
                    cache[key] = index
                index.check_time(now)
            except CrlError as exc:
                raise ChainError(Reason.CRL_UNAVAILABLE, str(exc)) from None
            if not index.covers(cert):
                continue
            when = index.is_revoked(cert.serial_number)
            if when is not None:
                role = _role(position, len(certs))
                raise ChainError(
                    Reason.REVOKED,
                    f"{role} certificate {_name(cert.subject)} (serial {cert.serial_number:x}) "
                    f"was revoked on {when:%FT%TZ} by a CRL of {_name(issuer.subject)}",
                )


def _aki_matches(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    try:
        aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except Exception:
        return True
    ski = _ski(issuer)
    return aki.key_identifier is None or ski is None or aki.key_identifier == ski


def _ski(cert: x509.Certificate) -> bytes | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except Exception:
        return None


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except Exception:
        return False
    return True


def _role(position: int, n: int) -> str:
    if position == 0:
        return "device"
    return "anchor" if position == n - 1 else "intermediate"


def _utc(when: datetime) -> datetime:
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _name(name: x509.Name) -> str:
    try:
        return name.rfc4514_string() or "<empty name>"
    except Exception:
        return "<unreadable name>"


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]
