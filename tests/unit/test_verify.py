"""Path validation (trust.verify) and ``mtls-gateway trust verify`` exit codes."""

from __future__ import annotations

import ipaddress
import itertools
import json
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway import pki
from gateway.pki import Issued, KeyType, PrivateKey
from trust.model import Reason
from trust.verify import AnchorSet, ChainError, VerifiedChain, VerifyPolicy, verify_chain

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
REPO = Path(__file__).resolve().parents[2]

# Key generation dominates (RSA 2048 especially): draw keys from a small pool.
_POOL_SIZE = 14
_POOLS: dict[str, list[PrivateKey]] = {}


def _pool(key_type: KeyType) -> list[PrivateKey]:
    if key_type not in _POOLS:
        _POOLS[key_type] = [pki.new_key(key_type) for _ in range(_POOL_SIZE)]
    return _POOLS[key_type]


class Pki:
    """Issue test certificates of one key type with distinct pooled keys."""

    def __init__(self, key_type: KeyType) -> None:
        self.key_type = key_type
        self._keys: Iterator[PrivateKey] = itertools.cycle(_pool(key_type))

    def key(self) -> PrivateKey:
        return next(self._keys)

    def ca(self, cn: str, issuer: Issued | None = None, **kw: Any) -> Issued:
        return pki.make_ca(cn, issuer=issuer, key=self.key(), now=NOW, **kw)

    def device(self, cn: str | None, issuer: Issued, **kw: Any) -> Issued:
        return pki.make_device(cn, issuer, key=self.key(), now=NOW, **kw)


@pytest.fixture(params=["ec", "rsa"])
def p(request: pytest.FixtureRequest) -> Pki:
    return Pki(request.param)


def _reason(
    presented: Sequence[Issued | x509.Certificate], anchors: Sequence[Issued], **kw: Any
) -> Reason:
    with pytest.raises(ChainError) as info:
        verify_chain(_certs(presented), _certs(anchors), kw.pop("now", NOW), **kw)
    assert info.value.message
    return info.value.reason


def _certs(items: Sequence[Issued | x509.Certificate]) -> list[x509.Certificate]:
    return [i.cert if isinstance(i, Issued) else i for i in items]


def _ok(
    presented: Sequence[Issued | x509.Certificate], anchors: Sequence[Issued], **kw: Any
) -> VerifiedChain:
    return verify_chain(_certs(presented), _certs(anchors), kw.pop("now", NOW), **kw)


def _ca_chain(p: Pki, root: Issued, n: int, pathlen: int | None = None) -> list[Issued]:
    """``n`` intermediates below ``root``, top first."""
    out: list[Issued] = []
    issuer = root
    for i in range(n):
        issuer = p.ca(f"ICA {i}", issuer, pathlen=pathlen)
        out.append(issuer)
    return out


def custom_cert(
    subject: x509.Name,
    issuer: Issued | None,
    key: PrivateKey,
    extensions: Sequence[tuple[x509.ExtensionType, bool]],
    *,
    signer: PrivateKey | None = None,
    aki_from: PrivateKey | None = None,
    serial: int | None = None,
) -> Issued:
    """A certificate with exactly the given extensions (plus SKI and AKI)."""
    issuer_key = issuer.key if issuer else key
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(serial or pki.random_serial())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=30))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(
                (aki_from or issuer_key).public_key()
            ),
            critical=False,
        )
    )
    for ext, critical in extensions:
        b = b.add_extension(ext, critical=critical)
    sign_with = signer or issuer_key
    return Issued(b.sign(sign_with, hashes.SHA256()), key)


def _cn(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ku(**bits: bool) -> x509.KeyUsage:
    names = (
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
        "encipher_only",
        "decipher_only",
    )
    return x509.KeyUsage(**{n: bits.get(n, False) for n in names})


CA_EXTS: list[tuple[x509.ExtensionType, bool]] = [
    (x509.BasicConstraints(ca=True, path_length=None), True),
    (_ku(key_cert_sign=True, crl_sign=True), True),
]
LEAF_EXTS: list[tuple[x509.ExtensionType, bool]] = [
    (x509.BasicConstraints(ca=False, path_length=None), True),
    (_ku(digital_signature=True), True),
    (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False),
]


# -- accepted chains -----------------------------------------------------------


def test_root_intermediate_device_chain(p: Pki) -> None:
    root = p.ca("Root")
    inter = p.ca("Issuing CA", root)
    dev = p.device("device-1", inter)
    chain = _ok([dev, inter, root], [root])
    assert chain.certificates == (dev.cert, inter.cert, root.cert)
    assert chain.leaf == dev.cert
    assert chain.anchor == root.cert


def test_anchor_set_is_reusable_and_equivalent(p: Pki) -> None:
    root = p.ca("Root")
    inter = p.ca("Issuing CA", root)
    anchors = AnchorSet([root.cert, root.cert])
    assert len(anchors) == 1
    for cn in ("a", "b"):
        dev = p.device(cn, inter)
        assert verify_chain([dev.cert, inter.cert], anchors, NOW).certificates[-1] == root.cert
    stranger = p.device("x", p.ca("Other Root"))
    with pytest.raises(ChainError) as info:
        verify_chain([stranger.cert], anchors, NOW)
    assert info.value.reason is Reason.UNTRUSTED


def test_intermediate_as_anchor_partial_chain(p: Pki) -> None:
    root = p.ca("Root")
    inter = p.ca("Issuing CA", root)
    dev = p.device("device-1", inter)
    chain = _ok([dev, inter, root], [inter])
    assert chain.certificates == (dev.cert, inter.cert)


def test_only_leaf_presented_with_its_issuer_as_anchor(p: Pki) -> None:
    root = p.ca("Root")
    inter = p.ca("Issuing CA", root)
    dev = p.device("device-1", inter)
    assert _ok([dev], [inter]).certificates == (dev.cert, inter.cert)
    assert _reason([dev], [root]) is Reason.UNTRUSTED  # the intermediate is missing


def test_cn_only_leaf_without_san_is_accepted(p: Pki) -> None:
    root = p.ca("Root")
    dev = p.device("device-cn-only", root)
    assert dev.cert.extensions.get_extension_for_class(x509.BasicConstraints)
    with pytest.raises(x509.ExtensionNotFound):
        dev.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    _ok([dev], [root])


def test_leaf_without_eku_is_accepted(p: Pki) -> None:
    root = p.ca("Root")
    _ok([p.device("no-eku", root, eku=None)], [root])


def test_junk_and_duplicates_in_presented_list_are_ignored(p: Pki) -> None:
    root = p.ca("Root")
    inter = p.ca("Issuing CA", root)
    dev = p.device("device-1", inter)
    other_root = p.ca("Unrelated Root")
    other_inter = p.ca("Issuing CA", other_root)  # same name, other key: junk
    presented = [dev, other_root, inter, inter, other_inter, root, root, dev]
    chain = _ok(presented, [root])
    assert chain.certificates == (dev.cert, inter.cert, root.cert)


def test_intermediates_in_any_order(p: Pki) -> None:
    root = p.ca("Root")
    cas = _ca_chain(p, root, 3)
    dev = p.device("d", cas[-1])
    chain = _ok([dev, cas[0], cas[2], root, cas[1]], [root])
    assert chain.certificates == (dev.cert, cas[2].cert, cas[1].cert, cas[0].cert, root.cert)


def test_validity_bounds_are_inclusive_and_floor_fractions(p: Pki) -> None:
    root = p.ca("Root")
    nb = NOW - timedelta(minutes=1)  # the root is valid from NOW - 5 min
    na = NOW + timedelta(days=1)
    dev = p.device("d", root, not_before=nb, not_after=na)
    _ok([dev], [root], now=nb)
    _ok([dev], [root], now=na)
    _ok([dev], [root], now=na + timedelta(milliseconds=5))  # RFC 5280: 1 s resolution
    assert _reason([dev], [root], now=na + timedelta(seconds=1)) is Reason.EXPIRED
    assert _reason([dev], [root], now=nb - timedelta(milliseconds=1)) is Reason.NOT_YET_VALID
    _ok([dev], [root], now=NOW.replace(tzinfo=None))  # naive = UTC


# -- reasons -------------------------------------------------------------------


def test_expired_intermediate(p: Pki) -> None:
    root = p.ca("Root")
    inter = p.ca(
        "Issuing CA",
        root,
        not_before=NOW - timedelta(days=30),
        not_after=NOW - timedelta(seconds=1),
    )
    dev = p.device("d", inter)
    assert _reason([dev, inter], [root]) is Reason.EXPIRED


def test_expired_leaf(p: Pki) -> None:
    root = p.ca("Root")
    dev = p.device(
        "d", root, not_before=NOW - timedelta(days=30), not_after=NOW - timedelta(days=1)
    )
    assert _reason([dev], [root]) is Reason.EXPIRED


def test_not_yet_valid_leaf(p: Pki) -> None:
    root = p.ca("Root")
    dev = p.device(
        "d", root, not_before=NOW + timedelta(hours=1), not_after=NOW + timedelta(days=1)
    )
    assert _reason([dev], [root]) is Reason.NOT_YET_VALID


@pytest.mark.parametrize("pathlen", [0, 1, 2])
def test_pathlen_at_limit_and_one_over(p: Pki, pathlen: int) -> None:
    root = p.ca("Root", pathlen=pathlen)
    at_limit = _ca_chain(p, root, pathlen)
    dev = p.device("d", at_limit[-1] if at_limit else root)
    _ok([dev, *at_limit], [root])
    over = _ca_chain(p, root, pathlen + 1)
    dev2 = p.device("d2", over[-1])
    assert _reason([dev2, *over], [root]) is Reason.PATH_LENGTH


def test_pathlen_of_intermediate(p: Pki) -> None:
    root = p.ca("Root")
    ica0 = p.ca("ICA pl0", root, pathlen=0)
    ica1 = p.ca("ICA below", ica0)
    dev = p.device("d", ica1)
    assert _reason([dev, ica1, ica0], [root]) is Reason.PATH_LENGTH
    _ok([p.device("ok", ica0), ica0], [root])  # the leaf is not counted


def test_self_issued_intermediate_not_counted_for_pathlen(p: Pki) -> None:
    # RFC 5280 §4.2.1.9 (x509-limbo pathlen::self-issued-certs-pathlen): key
    # rollover certificate "ICA" → "ICA" (new key) does not count.
    root = p.ca("Root")
    ica_old = p.ca("ICA", root, pathlen=1)
    ica_new = p.ca("ICA", ica_old, pathlen=1)  # self-issued: same name, new key
    ica2 = p.ca("ICA2", ica_new, pathlen=0)
    dev = p.device("d", ica2)
    chain = _ok([dev, ica2, ica_new, ica_old], [root])
    assert len(chain.certificates) == 5
    # ... and not by max_chain_length either.
    _ok([dev, ica2, ica_new, ica_old], [root], policy=VerifyPolicy(max_chain_length=4))
    assert (
        _reason([dev, ica2, ica_new, ica_old], [root], policy=VerifyPolicy(max_chain_length=3))
        is Reason.CHAIN_TOO_LONG
    )


def test_chain_of_eleven_certificates_and_max_chain_length(p: Pki) -> None:
    root = p.ca("Root")
    cas = _ca_chain(p, root, 9)
    dev = p.device("d", cas[-1])
    presented = [dev, *reversed(cas)]
    assert (
        _reason(presented, [root], policy=VerifyPolicy(max_chain_length=10))
        is Reason.CHAIN_TOO_LONG
    )
    assert _reason(presented, [root]) is Reason.CHAIN_TOO_LONG  # default is 10
    chain = _ok(presented, [root], policy=VerifyPolicy(max_chain_length=11))
    assert len(chain.certificates) == 11


def test_too_many_presented_certificates(p: Pki) -> None:
    root = p.ca("Root")
    dev = p.device("d", root)
    junk = [root.cert] * 16
    assert _reason([dev, *junk], [root]) is Reason.CHAIN_TOO_LONG
    _ok([dev, *junk[:15]], [root])


def test_intermediate_with_ca_false(p: Pki) -> None:
    root = p.ca("Root")
    inter = p.ca("Not a CA", root, ca=False)
    dev = p.device("d", inter)
    assert _reason([dev, inter], [root]) is Reason.NOT_CA


def test_intermediate_without_basic_constraints(p: Pki) -> None:
    root = p.ca("Root")
    inter = p.ca("No BC", root, basic_constraints=False)
    dev = p.device("d", inter)
    assert _reason([dev, inter], [root]) is Reason.NOT_CA


def test_anchor_without_ca_flag(p: Pki) -> None:
    root = p.ca("Root", ca=False)
    dev = p.device("d", root)
    assert _reason([dev], [root]) is Reason.NOT_CA


def test_leaf_with_server_auth_only_eku(p: Pki) -> None:
    root = p.ca("Root")
    dev = p.device("server", root, eku=("serverAuth",))
    assert _reason([dev], [root]) is Reason.BAD_USAGE


def test_ca_keyusage_without_keycertsign(p: Pki) -> None:
    root = p.ca("Root")
    exts = [
        (x509.BasicConstraints(ca=True, path_length=None), True),
        (_ku(digital_signature=True, crl_sign=True), True),
    ]
    inter = custom_cert(_cn("No keyCertSign"), root, p.key(), exts)
    dev = p.device("d", inter)
    assert _reason([dev, inter], [root]) is Reason.BAD_USAGE


def test_leaf_keyusage_rules(p: Pki) -> None:
    root = p.ca("Root")
    cert_sign = custom_cert(
        _cn("d"),
        root,
        p.key(),
        [*LEAF_EXTS[::2], (_ku(digital_signature=True, key_cert_sign=True), True)],
    )
    assert _reason([cert_sign], [root]) is Reason.BAD_USAGE
    no_sig = custom_cert(
        _cn("d"), root, p.key(), [*LEAF_EXTS[::2], (_ku(key_encipherment=True), True)]
    )
    assert _reason([no_sig], [root]) is Reason.BAD_USAGE


def test_ca_certificate_as_device_is_refused(p: Pki) -> None:
    root = p.ca("Root")
    inter = p.ca("Issuing CA", root)
    assert _reason([inter], [root]) is Reason.BAD_USAGE


def test_bad_signature_other_key(p: Pki) -> None:
    root = p.ca("Root")
    impostor = Issued(root.cert, p.key())  # the root's name, another key
    dev = p.device("d", impostor)
    assert _reason([dev], [root]) is Reason.BAD_SIGNATURE


def test_bad_signature_with_matching_key_identifier(p: Pki) -> None:
    root = p.ca("Root")
    forged = custom_cert(_cn("d"), root, p.key(), LEAF_EXTS, signer=p.key(), aki_from=root.key)
    assert _reason([forged], [root]) is Reason.BAD_SIGNATURE


def test_untrusted_root(p: Pki) -> None:
    root = p.ca("Root")
    other = p.ca("Other Root")
    inter = p.ca("Issuing CA", other)
    dev = p.device("d", inter)
    assert _reason([dev, inter, other], [root]) is Reason.UNTRUSTED


def test_no_certificate() -> None:
    with pytest.raises(ChainError) as info:
        verify_chain([], [], NOW)
    assert info.value.reason is Reason.NO_CERTIFICATE


def test_malformed_unknown_critical_extension(p: Pki) -> None:
    root = p.ca("Root")
    odd = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.55738.666.1"), b"\x05\x00")
    dev = custom_cert(_cn("d"), root, p.key(), [*LEAF_EXTS, (odd, True)])
    assert _reason([dev], [root]) is Reason.MALFORMED
    fine = custom_cert(_cn("d"), root, p.key(), [*LEAF_EXTS, (odd, False)])
    _ok([fine], [root])


def test_malformed_weak_rsa_key(p: Pki) -> None:
    root = p.ca("Root")
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    dev = pki.make_device("weak", root, key=weak, now=NOW)
    assert _reason([dev], [root]) is Reason.MALFORMED


def test_malformed_serial_zero_and_missing_aki(p: Pki) -> None:
    root = p.ca("Root")
    b = (
        x509.CertificateBuilder()
        .subject_name(_cn("d"))
        .issuer_name(root.cert.subject)
        .public_key(p.key().public_key())
        .serial_number(12345)
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=1))
    )
    no_aki = b.sign(root.key, hashes.SHA256())
    assert _reason([no_aki], [root]) is Reason.MALFORMED


def test_self_signed_leaf_is_not_a_device(p: Pki) -> None:
    root = p.ca("Root")
    # the anchor itself presented as the device certificate
    assert _reason([root], [root]) is Reason.UNTRUSTED
    assert _reason([root, root], [root]) is Reason.UNTRUSTED
    # a self-signed end-entity certificate
    key = p.key()
    selfie = custom_cert(_cn("selfie"), None, key, LEAF_EXTS)
    assert _reason([selfie], [root]) is Reason.UNTRUSTED
    assert _reason([selfie], [root, selfie]) is Reason.UNTRUSTED


def test_name_constraints(p: Pki) -> None:
    nc = x509.NameConstraints(
        permitted_subtrees=[x509.DNSName("devices.example.com")],
        excluded_subtrees=[x509.IPAddress(ipaddress.ip_network("10.0.0.0/8"))],
    )
    root = custom_cert(_cn("Constrained Root"), None, p.key(), [*CA_EXTS, (nc, True)])
    ok = p.device("d", root, san_dns=["a.devices.example.com"])
    _ok([ok], [root])
    _ok([p.device("cn-only", root)], [root])  # no DNS name to constrain
    outside = p.device("d", root, san_dns=["evil.example.org"])
    wildcard = p.device("d", root, san_dns=["*.example.com"])  # could cover anything
    excluded_ip = p.device("d", root, san_dns=["x.devices.example.com"], san_ips=["10.1.2.3"])
    for dev, phrase in (
        (outside, "outside the permitted name constraints"),
        (wildcard, "outside the permitted name constraints"),
        (excluded_ip, "excluded by a name constraint"),
    ):
        with pytest.raises(ChainError) as info:
            verify_chain([dev.cert], [root.cert], NOW)
        assert info.value.reason is Reason.UNTRUSTED
        assert phrase in info.value.message  # our RFC 5280 check, not only pyca's


def test_directory_name_constraints_apply_to_subject(p: Pki) -> None:
    allowed = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Acme")])
    nc = x509.NameConstraints(
        permitted_subtrees=[x509.DirectoryName(allowed)], excluded_subtrees=None
    )
    root = p.ca("Root")
    inter = custom_cert(
        x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Acme"),
                x509.NameAttribute(NameOID.COMMON_NAME, "Acme CA"),
            ]
        ),
        root,
        p.key(),
        [*CA_EXTS, (nc, True)],
    )
    outsider = p.device("d", inter)  # subject CN=d only: not under O=Acme
    assert _reason([outsider, inter], [root]) is Reason.UNTRUSTED


# -- bounded work ----------------------------------------------------------------


def test_pathological_same_subject_same_key_is_fast() -> None:
    p = Pki("ec")
    key = p.key()
    cas = [pki.make_ca("Loop CA", key=key, now=NOW)]
    for _ in range(14):
        cas.append(pki.make_ca("Loop CA", key=key, issuer=cas[-1], now=NOW))
    leaf = p.device("d", cas[-1])
    presented = [leaf.cert, *(c.cert for c in reversed(cas))]
    assert len(presented) == 16
    named_like_it = p.ca("Loop CA")  # an anchor with the same name, other key
    start = time.perf_counter()
    for anchors in ([p.ca("Root").cert], [named_like_it.cert]):
        with pytest.raises(ChainError):
            verify_chain(presented, anchors, NOW)
    many = presented + [c.cert for c in cas[:2]]  # 17+: refused before any work
    with pytest.raises(ChainError) as info:
        verify_chain(many * 6, [named_like_it.cert], NOW)
    assert info.value.reason is Reason.CHAIN_TOO_LONG
    assert time.perf_counter() - start < 1.0  # < 50 ms in practice; generous for CI


def test_pathological_same_subject_distinct_keys_is_bounded() -> None:
    p = Pki("ec")
    cas = [p.ca("Same Name")]
    for _ in range(14):
        cas.append(p.ca("Same Name", cas[-1]))
    leaf = p.device("d", cas[-1])
    presented = [leaf.cert, *(c.cert for c in cas)]
    start = time.perf_counter()
    with pytest.raises(ChainError):
        verify_chain(presented, [p.ca("Same Name").cert], NOW)
    assert time.perf_counter() - start < 1.0


# -- CLI -------------------------------------------------------------------------


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "trust", "verify", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )


def test_cli_exit_codes(tmp_path: Path) -> None:
    p = Pki("ec")
    root = p.ca("Root")
    inter = p.ca("Issuing CA", root)
    dev = p.device("device-1", inter)
    revoked = p.device("device-2", inter)
    (tmp_path / "chain.pem").write_bytes(pki.pem_chain(dev, inter, root))
    (tmp_path / "revoked.pem").write_bytes(pki.pem_chain(revoked, inter))
    (tmp_path / "root.pem").write_bytes(pki.pem_chain(root))
    (tmp_path / "other.pem").write_bytes(pki.pem_chain(p.ca("Other")))
    crl = pki.make_crl(inter, [(revoked.cert.serial_number, NOW - timedelta(days=1))], now=NOW)
    (tmp_path / "crl.pem").write_bytes(crl.public_bytes(Encoding.PEM))
    (tmp_path / "bad.pem").write_bytes(
        b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n"
    )
    at = "2026-01-01T12:00:00.999Z"

    ok = _cli(tmp_path / "chain.pem", "--anchor", tmp_path / "root.pem", "--at", at)
    assert ok.returncode == 0, ok.stderr
    assert "accepted" in ok.stdout

    js = _cli(
        tmp_path / "chain.pem",
        "--anchor",
        tmp_path / "root.pem",
        "--at",
        "2026-01-01T13:00:00+01:00",
        "--json",
    )
    assert js.returncode == 0, js.stderr
    doc = json.loads(js.stdout)
    assert doc["accepted"] is True and doc["reason"] is None
    assert [c["subject"] for c in doc["chain"]] == ["CN=device-1", "CN=Issuing CA", "CN=Root"]
    assert set(doc["chain"][0]) == {"subject", "serial", "fingerprint"}

    untrusted = _cli(
        tmp_path / "chain.pem", "--anchor", tmp_path / "other.pem", "--at", at, "--json"
    )
    assert untrusted.returncode == 1
    assert json.loads(untrusted.stdout)["reason"] == "untrusted"

    short = _cli(
        tmp_path / "chain.pem",
        "--anchor",
        tmp_path / "root.pem",
        "--at",
        at,
        "--max-chain-length",
        "2",
    )
    assert short.returncode == 1
    assert "chain_too_long" in short.stdout

    rev = _cli(
        tmp_path / "revoked.pem",
        "--anchor",
        tmp_path / "root.pem",
        "--crl",
        tmp_path / "crl.pem",
        "--at",
        at,
    )
    assert rev.returncode == 1
    assert "revoked" in rev.stdout

    for bad in (
        [tmp_path / "bad.pem", "--anchor", tmp_path / "root.pem"],
        [tmp_path / "missing.pem", "--anchor", tmp_path / "root.pem"],
        [tmp_path / "chain.pem", "--anchor", tmp_path / "root.pem", "--crl", tmp_path / "root.pem"],
        [tmp_path / "chain.pem", "--anchor", tmp_path / "root.pem", "--at", "yesterday"],
        [tmp_path / "chain.pem"],
        [tmp_path / "chain.pem", "--tenant", "demo"],
    ):
        r = _cli(*bad)
        assert r.returncode == 2, (bad, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr
        assert r.stderr.strip()
