"""Certificate parsing with clean errors, fingerprints and descriptions.

Every function that takes a peer's or an operator's bytes raises only
:class:`CertificateError` on bad input, whatever ``cryptography`` would throw.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

MAX_PEM_BYTES = 1 << 20
"""Upper bound on one PEM/DER upload: a chain of ten 4096-bit certificates fits easily."""

_PEM_BLOCK = re.compile(
    rb"-----BEGIN (?:X509 |TRUSTED )?CERTIFICATE-----(.+?)"
    rb"-----END (?:X509 |TRUSTED )?CERTIFICATE-----",
    re.DOTALL,
)


class CertificateError(ValueError):
    """The input is not a usable certificate (or chain); the message says why."""


def load_certificates(data: bytes | str) -> list[x509.Certificate]:
    """Parse one or more certificates from PEM (any number of blocks) or one DER.

    Raises :class:`CertificateError` with a clear message on anything else.
    """
    raw = data.encode("utf-8", "replace") if isinstance(data, str) else bytes(data)
    if len(raw) > MAX_PEM_BYTES:
        raise CertificateError(f"input is larger than {MAX_PEM_BYTES} bytes")
    if not raw.strip():
        raise CertificateError("input is empty")
    if b"-----BEGIN" in raw:
        blocks = _PEM_BLOCK.findall(raw)
        if not blocks:
            raise CertificateError("no PEM CERTIFICATE block found")
        certs = []
        for i, m in enumerate(_PEM_BLOCK.finditer(raw), start=1):
            try:
                certs.append(x509.load_pem_x509_certificate(m.group(0)))
            except Exception as exc:  # cryptography raises ValueError or Rust panics as others
                raise CertificateError(
                    f"certificate {i} in PEM is malformed: {_short(exc)}"
                ) from None
        return certs
    try:
        return [x509.load_der_x509_certificate(raw)]
    except Exception as exc:
        raise CertificateError(f"not a PEM or DER certificate: {_short(exc)}") from None


def load_certificate(data: bytes | str) -> x509.Certificate:
    """Parse exactly one certificate (PEM or DER)."""
    certs = load_certificates(data)
    if len(certs) != 1:
        raise CertificateError(f"expected exactly one certificate, found {len(certs)}")
    return certs[0]


def load_der_chain(ders: list[bytes]) -> list[x509.Certificate]:
    """Parse a chain of DER certificates as a TLS stack hands it to us."""
    out = []
    for i, der in enumerate(ders, start=1):
        try:
            out.append(x509.load_der_x509_certificate(der))
        except Exception as exc:
            raise CertificateError(
                f"certificate {i} of the chain is malformed: {_short(exc)}"
            ) from None
    return out


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-1 of the DER, lower-case hex: the platform's trusted-certificate id."""
    return cert.fingerprint(hashes.SHA1()).hex()  # noqa: S303 - an identifier, not a signature


def der_fingerprint(der: bytes) -> str:
    """SHA-1 hex of DER bytes, without parsing them."""
    return hashlib.sha1(der).hexdigest()  # noqa: S324 - an identifier, not a signature


def to_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(Encoding.PEM).decode("ascii")


def common_name(cert: x509.Certificate) -> str | None:
    """The subject's (last) CN, or None when absent or not a string."""
    try:
        attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except Exception:
        return None
    if not attrs:
        return None
    value = attrs[-1].value
    return value if isinstance(value, str) else None


def serial_hex(serial: int) -> str:
    """Canonical hex spelling of a serial number (lower case, no leading zeros)."""
    return format(serial, "x")


def parse_serial_hex(text: str) -> int:
    """Parse a hex serial (``0b8a…``, optional ``0x`` and ``:`` separators)."""
    s = text.strip().lower().replace(":", "").replace(" ", "")
    if s.startswith("0x"):
        s = s[2:]
    if not s or len(s) > 80 or not re.fullmatch(r"[0-9a-f]+", s):
        raise ValueError(f"serial number must be a hexadecimal value, got {text!r}")
    return int(s, 16)


def is_ca(cert: x509.Certificate) -> bool:
    """True when BasicConstraints says CA:true."""
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    except Exception:
        return False
    return bool(bc.ca)


def not_before(cert: x509.Certificate) -> datetime:
    return cert.not_valid_before_utc


def not_after(cert: x509.Certificate) -> datetime:
    return cert.not_valid_after_utc


def algorithm_name(cert: x509.Certificate) -> str:
    """Platform-style algorithm name, e.g. ``RSA`` or ``EC``, with the key size."""
    try:
        key = cert.public_key()
    except Exception:
        return "unknown"
    if isinstance(key, rsa.RSAPublicKey):
        return "RSA"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "EC"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(key, ed448.Ed448PublicKey):
        return "Ed448"
    if isinstance(key, dsa.DSAPublicKey):
        return "DSA"
    return type(key).__name__


@dataclass(frozen=True, slots=True)
class CertificateInfo:
    """Read-only description of a certificate (the platform's read-only fields)."""

    fingerprint: str
    subject: str
    issuer: str
    serial_number: str
    not_before: datetime
    not_after: datetime
    algorithm_name: str
    version: int


def describe(cert: x509.Certificate) -> CertificateInfo:
    """Extract the platform's read-only trusted-certificate fields."""
    return CertificateInfo(
        fingerprint=fingerprint(cert),
        subject=display_name(cert.subject),
        issuer=display_name(cert.issuer),
        serial_number=serial_hex(cert.serial_number),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        algorithm_name=algorithm_name(cert),
        version=cert.version.value + 1,
    )


def display_name(name: x509.Name) -> str:
    """A name as the platform shows it: RFC 4514 order with ``", "`` between RDNs
    (``"CN=t1, O=mtls-gateway"``)."""
    return ", ".join(rdn.rfc4514_string() for rdn in reversed(name.rdns))


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]
