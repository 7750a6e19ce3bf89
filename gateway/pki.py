"""Generate X.509 material: the demo PKI of ``init``, test fixtures and fleets.

Plain functions over ``cryptography``; nothing here decides trust. Each issued
certificate comes back with its key as an :class:`Issued`.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KeyType = Literal["ec", "rsa"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

EKU_NAMES = {
    "clientAuth": ExtendedKeyUsageOID.CLIENT_AUTH,
    "serverAuth": ExtendedKeyUsageOID.SERVER_AUTH,
    "codeSigning": ExtendedKeyUsageOID.CODE_SIGNING,
}


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate with its private key."""

    cert: x509.Certificate
    key: PrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self, password: bytes | None = None) -> bytes:
        enc: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password)
            if password
            else serialization.NoEncryption()
        )
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc
        )


def new_key(key_type: KeyType = "ec", rsa_bits: int = 2048) -> PrivateKey:
    """ECDSA P-256 (default) or RSA."""
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
    return ec.generate_private_key(ec.SECP256R1())


def random_serial() -> int:
    """A positive 159-bit serial (RFC 5280 §4.1.2.2: at most 20 octets, positive)."""
    return secrets.randbits(159) | 1


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = []
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def _window(
    now: datetime | None, days: float, not_before: datetime | None, not_after: datetime | None
) -> tuple[datetime, datetime]:
    start = now or datetime.now(UTC)
    nb = not_before or (start - timedelta(minutes=5))
    na = not_after or (start + timedelta(days=days))
    return nb, na


def _sign_alg(key: PrivateKey) -> hashes.SHA256:
    return hashes.SHA256()


def make_ca(
    cn: str,
    *,
    issuer: Issued | None = None,
    key: PrivateKey | None = None,
    key_type: KeyType = "ec",
    org: str | None = None,
    pathlen: int | None = None,
    ca: bool = True,
    days: float = 3650,
    now: datetime | None = None,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    serial: int | None = None,
    crl_urls: Sequence[str] = (),
    key_usage: bool = True,
    basic_constraints: bool = True,
) -> Issued:
    """A CA certificate: self-signed when ``issuer`` is None, else an intermediate.

    ``ca=False`` / ``basic_constraints=False`` build the broken CAs tests need.
    """
    key = key or new_key(key_type)
    nb, na = _window(now, days, not_before, not_after)
    subject = _name(cn, org)
    signer_key = issuer.key if issuer else key
    issuer_name = issuer.cert.subject if issuer else subject
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(serial or random_serial())
        .not_valid_before(nb)
        .not_valid_after(na)
        .add_extension(ski, critical=False)
    )
    if basic_constraints:
        b = b.add_extension(
            x509.BasicConstraints(ca=ca, path_length=pathlen if ca else None), critical=True
        )
    if key_usage:
        b = b.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if issuer is not None:
        b = b.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    else:
        b = b.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
        )
    if crl_urls:
        b = b.add_extension(_cdp(crl_urls), critical=False)
    return Issued(b.sign(signer_key, _sign_alg(signer_key)), key)


def make_device(
    cn: str | None,
    issuer: Issued,
    *,
    key: PrivateKey | None = None,
    key_type: KeyType = "ec",
    days: float = 365,
    now: datetime | None = None,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    serial: int | None = None,
    eku: Iterable[str] | None = ("clientAuth",),
    san_dns: Sequence[str] = (),
    san_ips: Sequence[str] = (),
    crl_urls: Sequence[str] = (),
    ca: bool = False,
    subject: x509.Name | None = None,
) -> Issued:
    """An end-entity certificate (device or server). ``cn=None`` omits the CN;
    ``subject`` replaces the whole subject name."""
    key = key or new_key(key_type)
    nb, na = _window(now, days, not_before, not_after)
    if subject is None:
        subject = _name(cn) if cn is not None else x509.Name([])
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(serial or random_serial())
        .not_valid_before(nb)
        .not_valid_after(na)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=isinstance(key, rsa.RSAPrivateKey),
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    )
    if eku is not None:
        b = b.add_extension(x509.ExtendedKeyUsage([EKU_NAMES[e] for e in eku]), critical=False)
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in san_dns]
    names += [x509.IPAddress(ipaddress.ip_address(i)) for i in san_ips]
    if names:
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if crl_urls:
        b = b.add_extension(_cdp(crl_urls), critical=False)
    return Issued(b.sign(issuer.key, _sign_alg(issuer.key)), key)


def make_server(
    issuer: Issued,
    hosts: Sequence[str] = ("localhost",),
    ips: Sequence[str] = ("127.0.0.1", "::1"),
    days: float = 825,
) -> Issued:
    """A TLS server certificate for the gateway's listeners."""
    return make_device(
        hosts[0] if hosts else "mtls-gateway",
        issuer,
        days=days,
        eku=("serverAuth",),
        san_dns=hosts,
        san_ips=ips,
    )


def make_crl(
    issuer: Issued,
    revoked: Iterable[tuple[int, datetime]],
    *,
    now: datetime | None = None,
    next_update: datetime | None = None,
    number: int = 1,
) -> x509.CertificateRevocationList:
    """A CRL signed by ``issuer`` listing (serial, revocation date) pairs."""
    now = now or datetime.now(UTC)
    b = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.cert.subject)
        .last_update(now - timedelta(minutes=1))
        .next_update(next_update or now + timedelta(days=7))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    )
    for serial, when in revoked:
        b = b.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    return b.sign(issuer.key, _sign_alg(issuer.key))


def _cdp(urls: Sequence[str]) -> x509.CRLDistributionPoints:
    return x509.CRLDistributionPoints(
        [
            x509.DistributionPoint(
                full_name=[x509.UniformResourceIdentifier(u)],
                relative_name=None,
                reasons=None,
                crl_issuer=None,
            )
            for u in urls
        ]
    )


def pem_chain(*items: Issued | x509.Certificate) -> bytes:
    """Concatenate certificates as PEM, in the order given."""
    out = b""
    for it in items:
        cert = it.cert if isinstance(it, Issued) else it
        out += cert.public_bytes(serialization.Encoding.PEM)
    return out


def write_private(path: Path, data: bytes) -> None:
    """Write a secret file created with mode 0600 (never world-readable, even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(path, 0o600)


def load_private_key(data: bytes, password: bytes | None = None) -> PrivateKey:
    """Load an EC or RSA private key from PEM."""
    key = serialization.load_pem_private_key(data, password=password)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError("only EC and RSA private keys are supported")
    return key
