"""The connection decision (trust.policy.decide) over generated PKIs, in memory."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.pki import Issued, make_ca, make_device
from trust.anchors import new_trusted_certificate
from trust.model import (
    DeviceIdentity,
    DeviceUser,
    Listener,
    PendingRegistration,
    Reason,
    Registration,
    Rejection,
    RevocationEntry,
    RevocationSettings,
    Status,
    TrustedCertificate,
)
from trust.policy import DecisionPolicy, decide
from trust.snapshot import TrustSnapshot
from trust.verify import VerifyPolicy

NOW = datetime(2026, 6, 1, tzinfo=UTC)
KEY_TYPES = ["ec", "rsa"]


@pytest.fixture(scope="module", params=KEY_TYPES)
def pki(request: pytest.FixtureRequest) -> dict[str, Issued]:
    kt = request.param
    root = make_ca("Root", key_type=kt, now=NOW)
    inter = make_ca("Inter", issuer=root, key_type=kt, now=NOW)
    dev = make_device("dev-1", inter, key_type=kt, now=NOW)
    return {"root": root, "inter": inter, "dev": dev}


def anchor(cert: Issued, tenant: str = "t1", **kw: object) -> TrustedCertificate:
    rec = new_trusted_certificate(
        cert.cert, tenant, name="a", status=Status.ENABLED, auto_registration=True, now=NOW
    )
    return replace(rec, **kw)  # type: ignore[arg-type]


def snap(*certs: TrustedCertificate, **kw: object) -> TrustSnapshot:
    tenants = {c.tenant for c in certs} | set(kw.pop("tenants", ()))  # type: ignore[call-overload]
    return TrustSnapshot.build(tenants=tenants, certificates=certs, **kw)  # type: ignore[arg-type]


def chain(p: dict[str, Issued], *names: str) -> list:  # type: ignore[type-arg]
    return [p[n].cert for n in names]


def reason(decision: object) -> Reason:
    assert isinstance(decision, Rejection), decision
    return decision.reason


def test_accepts_full_chain_with_auto_registration(pki: dict[str, Issued]) -> None:
    d = decide(
        chain(pki, "dev", "inter", "root"), snap(anchor(pki["root"])), NOW, Listener.MQTT_CORE
    )
    assert isinstance(d, DeviceIdentity)
    assert (d.tenant, d.device_id, d.registration) == ("t1", "dev-1", Registration.AUTO)
    assert d.username == "device_dev-1"
    assert d.chain_serials[0] == pki["dev"].cert.serial_number
    assert d.chain_serials[-1] == pki["root"].cert.serial_number


def test_no_certificate() -> None:
    assert reason(decide([], snap(), NOW, Listener.MQTT_CORE)) is Reason.NO_CERTIFICATE


def test_untrusted_when_anchor_not_presented(pki: dict[str, Issued]) -> None:
    # spec: the presented chain must contain the trusted certificate
    s = snap(anchor(pki["root"]))
    assert (
        reason(decide(chain(pki, "dev", "inter"), s, NOW, Listener.MQTT_CORE)) is Reason.UNTRUSTED
    )
    relaxed = DecisionPolicy(require_anchor_in_chain=False)
    d = decide(chain(pki, "dev", "inter"), s, NOW, Listener.MQTT_CORE, relaxed)
    assert isinstance(d, DeviceIdentity)


def test_lone_leaf_needs_its_issuer_trusted(pki: dict[str, Issued]) -> None:
    assert reason(
        decide(chain(pki, "dev"), snap(anchor(pki["root"])), NOW, Listener.MQTT_CORE)
    ) is (Reason.UNTRUSTED)
    d = decide(chain(pki, "dev"), snap(anchor(pki["inter"])), NOW, Listener.MQTT_CORE)
    assert isinstance(d, DeviceIdentity)
    assert d.anchor_fingerprint == anchor(pki["inter"]).fingerprint


def test_intermediate_as_anchor_partial_chain(pki: dict[str, Issued]) -> None:
    d = decide(chain(pki, "dev", "inter"), snap(anchor(pki["inter"])), NOW, Listener.MQTT_CORE)
    assert isinstance(d, DeviceIdentity)
    assert len(d.chain_serials) == 2


def test_disabled_anchor(pki: dict[str, Issued]) -> None:
    s = snap(anchor(pki["root"], status=Status.DISABLED))
    assert reason(decide(chain(pki, "dev", "inter", "root"), s, NOW, Listener.MQTT_CORE)) is (
        Reason.ANCHOR_DISABLED
    )


def test_expired_device(pki: dict[str, Issued]) -> None:
    later = NOW + timedelta(days=400)
    r = decide(
        chain(pki, "dev", "inter", "root"), snap(anchor(pki["root"])), later, Listener.MQTT_CORE
    )
    assert reason(r) is Reason.EXPIRED


def test_not_ca_intermediate(pki: dict[str, Issued]) -> None:
    bad = make_ca("NotCA", issuer=pki["root"], ca=False, now=NOW)
    dev = make_device("dev-x", bad, now=NOW)
    r = decide(
        [dev.cert, bad.cert, pki["root"].cert], snap(anchor(pki["root"])), NOW, Listener.MQTT_CORE
    )
    assert reason(r) is Reason.NOT_CA


def test_path_length(pki: dict[str, Issued]) -> None:
    root = make_ca("PL Root", pathlen=0, now=NOW)
    inter = make_ca("PL Inter", issuer=root, now=NOW)
    dev = make_device("dev-pl", inter, now=NOW)
    r = decide([dev.cert, inter.cert, root.cert], snap(anchor(root)), NOW, Listener.MQTT_CORE)
    assert reason(r) is Reason.PATH_LENGTH


def test_chain_too_long_and_configurable() -> None:
    # 11 certificates: root + 9 intermediates + device
    root = make_ca("L0", now=NOW)
    cas = [root]
    for i in range(1, 10):
        cas.append(make_ca(f"L{i}", issuer=cas[-1], now=NOW))
    dev = make_device("deep", cas[-1], now=NOW)
    presented = [dev.cert, *[c.cert for c in reversed(cas)]]
    assert len(presented) == 11
    s = snap(anchor(root))
    assert reason(decide(presented, s, NOW, Listener.MQTT_CORE)) is Reason.CHAIN_TOO_LONG
    eleven = DecisionPolicy(verify=VerifyPolicy(max_chain_length=11))
    assert isinstance(decide(presented, s, NOW, Listener.MQTT_CORE, eleven), DeviceIdentity)


def test_bad_usage_server_only_eku(pki: dict[str, Issued]) -> None:
    dev = make_device("srv", pki["inter"], eku=("serverAuth",), now=NOW)
    r = decide(
        [dev.cert, pki["inter"].cert, pki["root"].cert],
        snap(anchor(pki["root"])),
        NOW,
        Listener.MQTT_CORE,
    )
    assert reason(r) is Reason.BAD_USAGE


@pytest.mark.parametrize("revoked", ["dev", "inter", "root"])
def test_offline_revocation_of_every_certificate(pki: dict[str, Issued], revoked: str) -> None:
    entry = RevocationEntry("t1", pki[revoked].cert.serial_number, NOW)
    presented = chain(pki, "dev", "inter", "root")
    off = snap(anchor(pki["root"]), revocations=[entry])
    assert isinstance(decide(presented, off, NOW, Listener.MQTT_CORE), DeviceIdentity)  # check off
    on = snap(
        anchor(pki["root"]),
        revocations=[entry],
        settings={"t1": RevocationSettings(offline=True)},
    )
    assert reason(decide(presented, on, NOW, Listener.MQTT_CORE)) is Reason.REVOKED


def test_revocation_of_other_tenant_does_not_apply(pki: dict[str, Issued]) -> None:
    entry = RevocationEntry("t2", pki["dev"].cert.serial_number, NOW)
    s = snap(
        anchor(pki["root"]),
        tenants=["t2"],
        revocations=[entry],
        settings={"t1": RevocationSettings(offline=True), "t2": RevocationSettings(offline=True)},
    )
    assert isinstance(
        decide(chain(pki, "dev", "inter", "root"), s, NOW, Listener.MQTT_CORE), DeviceIdentity
    )


def test_ambiguous_tenant_resolved_by_proof_of_possession(pki: dict[str, Issued]) -> None:
    presented = chain(pki, "dev", "inter", "root")
    both = snap(anchor(pki["root"], tenant="t1"), anchor(pki["root"], tenant="t2"))
    assert reason(decide(presented, both, NOW, Listener.MQTT_CORE)) is Reason.AMBIGUOUS_TENANT
    proven = snap(
        anchor(pki["root"], tenant="t1"),
        anchor(pki["root"], tenant="t2", proof_of_possession_valid=True),
    )
    d = decide(presented, proven, NOW, Listener.MQTT_CORE)
    assert isinstance(d, DeviceIdentity) and d.tenant == "t2"
    both_proven = snap(
        anchor(pki["root"], tenant="t1", proof_of_possession_valid=True),
        anchor(pki["root"], tenant="t2", proof_of_possession_valid=True),
    )
    assert (
        reason(decide(presented, both_proven, NOW, Listener.MQTT_CORE)) is Reason.AMBIGUOUS_TENANT
    )


def test_device_user_states(pki: dict[str, Issued]) -> None:
    presented = chain(pki, "dev", "inter", "root")
    enabled = snap(anchor(pki["root"]), devices=[DeviceUser("t1", "dev-1")])
    d = decide(presented, enabled, NOW, Listener.MQTT_CORE)
    assert isinstance(d, DeviceIdentity) and d.registration is Registration.EXISTING
    disabled = snap(anchor(pki["root"]), devices=[DeviceUser("t1", "dev-1", enabled=False)])
    for listener in Listener:
        r = decide(presented, disabled, NOW, listener)
        assert reason(r) is Reason.DEVICE_DISABLED


def test_registration_paths(pki: dict[str, Issued]) -> None:
    presented = chain(pki, "dev", "inter", "root")
    no_auto = snap(anchor(pki["root"], auto_registration=False))
    assert reason(decide(presented, no_auto, NOW, Listener.MQTT_CORE)) is Reason.NOT_REGISTERED
    assert reason(decide(presented, no_auto, NOW, Listener.HTTPS)) is Reason.NOT_REGISTERED
    pending = snap(
        anchor(pki["root"], auto_registration=False),
        pending=[PendingRegistration("t1", "dev-1")],
    )
    d = decide(presented, pending, NOW, Listener.MQTT_CORE)
    assert isinstance(d, DeviceIdentity) and d.registration is Registration.BULK
    # the MQTT service never registers, and needs no device user
    d = decide(presented, no_auto, NOW, Listener.MQTT_SERVICE)
    assert isinstance(d, DeviceIdentity) and d.registration is Registration.NONE


def test_lwm2m_takes_tenant_from_registered_device(pki: dict[str, Issued]) -> None:
    presented = chain(pki, "dev", "inter", "root")
    s = snap(anchor(pki["root"]))
    assert reason(decide(presented, s, NOW, Listener.LWM2M)) is Reason.NOT_REGISTERED
    registered = snap(anchor(pki["root"]), devices=[DeviceUser("t1", "dev-1")])
    d = decide(presented, registered, NOW, Listener.LWM2M)
    assert isinstance(d, DeviceIdentity) and d.tenant == "t1"
    # a device registered in another tenant than the one trusting its chain is refused
    elsewhere = snap(anchor(pki["root"]), tenants=["t2"], devices=[DeviceUser("t2", "dev-1")])
    assert reason(decide(presented, elsewhere, NOW, Listener.LWM2M)) is Reason.UNTRUSTED


def test_no_common_name(pki: dict[str, Issued]) -> None:
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "no cn")])
    dev = make_device(None, pki["inter"], now=NOW, subject=subject)
    r = decide(
        [dev.cert, pki["inter"].cert, pki["root"].cert],
        snap(anchor(pki["root"])),
        NOW,
        Listener.MQTT_CORE,
    )
    assert reason(r) is Reason.NO_COMMON_NAME


def test_snapshot_change_helpers(pki: dict[str, Issued]) -> None:
    s = snap(anchor(pki["root"]))
    s2 = s.with_device(("t1", "dev-1"), DeviceUser("t1", "dev-1", enabled=False))
    assert s.device("t1", "dev-1") is None
    assert s2.device_tenants["dev-1"] == ("t1",)
    s3 = s2.with_device(("t1", "dev-1"), None)
    assert "dev-1" not in s3.device_tenants
    assert s.without_tenant("t1").by_fingerprint == {}
    assert [c.subject for c in s.enabled_anchor_certificates()] == [pki["root"].cert.subject]


@settings(max_examples=50, deadline=None)
@given(st.sampled_from(list(Listener)), st.booleans(), st.booleans(), st.booleans())
def test_decision_is_total_and_consistent(
    listener: Listener, auto: bool, enabled: bool, offline: bool
) -> None:
    """Whatever the state, decide returns exactly one value and never raises;
    an accepted device's tenant always owns the anchor that validated it."""
    root = _ROOT
    dev = _DEV
    entry = RevocationEntry("t1", dev.cert.serial_number, NOW)
    s = snap(
        anchor(root, auto_registration=auto),
        devices=[DeviceUser("t1", "dev-h", enabled=enabled)]
        if listener is Listener.LWM2M or not auto
        else [],
        revocations=[entry],
        settings={"t1": RevocationSettings(offline=offline)},
    )
    d = decide([dev.cert, root.cert], s, NOW, listener)
    if offline:
        assert reason(d) is Reason.REVOKED
    elif isinstance(d, DeviceIdentity):
        assert d.tenant == "t1" and d.anchor_fingerprint == anchor(root).fingerprint


_ROOT = make_ca("H Root", now=NOW)
_DEV = make_device("dev-h", _ROOT, now=NOW)
