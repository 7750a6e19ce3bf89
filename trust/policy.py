"""The connection decision: presented chain + snapshot + now → identity or rejection.

This is the one function every listener and ``mtls-gateway trust verify
--tenant`` call, so the operator's "would this device be accepted?" answer is
the listeners' answer. Steps (spec: "Device certificates", "Registering
devices using certificates", "Perform a proof of possession", "CRL settings"):

1. find candidate anchors: a trusted certificate *in* the presented chain, or,
   when the device presents only its own certificate, its immediate issuer;
2. verify the chain against each candidate tenant's enabled anchors;
3. map to one tenant (proof of possession breaks ties, else ambiguous);
4. offline revocation of every certificate of the verified chain;
5. the device user's state and the registration path for the listener.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509

from trust.certs import common_name, fingerprint
from trust.model import (
    Decision,
    DeviceIdentity,
    Listener,
    Reason,
    Registration,
    Rejection,
)
from trust.snapshot import Anchor, TrustSnapshot
from trust.verify import ChainError, VerifiedChain, VerifyPolicy, verify_chain

OnlineCheck = Callable[[VerifiedChain, datetime], Rejection | None]
"""Online (CRL distribution point) revocation hook: None = not revoked."""

# Rejections that say more about the chain than "untrusted": when several
# tenants were tried, report the most specific one.
_REASON_PRIORITY = {
    Reason.EXPIRED: 1,
    Reason.NOT_YET_VALID: 1,
    Reason.NOT_CA: 2,
    Reason.PATH_LENGTH: 2,
    Reason.CHAIN_TOO_LONG: 2,
    Reason.BAD_USAGE: 2,
    Reason.BAD_SIGNATURE: 3,
    Reason.MALFORMED: 3,
    Reason.UNTRUSTED: 9,
}


@dataclass(frozen=True, slots=True)
class DecisionPolicy:
    """Gateway-wide knobs of the decision (from configuration)."""

    verify: VerifyPolicy = field(default_factory=VerifyPolicy)
    require_anchor_in_chain: bool = True
    """Spec: the presented chain must contain a trusted certificate, unless the
    device presents only its own certificate and its issuer is trusted."""


def candidate_anchors(
    presented: Sequence[x509.Certificate], snap: TrustSnapshot, policy: DecisionPolicy
) -> list[Anchor]:
    """Anchors (of any tenant, enabled or not) that may validate this chain."""
    found: dict[int, Anchor] = {}
    for cert in presented:
        for a in snap.by_fingerprint.get(fingerprint(cert), ()):
            found[id(a)] = a
    if len(presented) == 1 or not policy.require_anchor_in_chain:
        issuers = presented[:1] if policy.require_anchor_in_chain else presented
        for cert in issuers:
            for a in snap.by_subject.get(cert.issuer, ()):
                found[id(a)] = a
    return list(found.values())


def decide(
    presented: Sequence[x509.Certificate],
    snap: TrustSnapshot,
    now: datetime,
    listener: Listener,
    policy: DecisionPolicy = DecisionPolicy(),
    online: OnlineCheck | None = None,
) -> Decision:
    """Decide whether the device presenting ``presented`` (leaf first) may connect."""
    if not presented:
        return Rejection(Reason.NO_CERTIFICATE, "no client certificate was presented")
    leaf = presented[0]
    cn = common_name(leaf)

    by_tenant: dict[str, list[Anchor]] = {}
    for a in candidate_anchors(presented, snap, policy):
        by_tenant.setdefault(a.tenant, []).append(a)
    if listener is Listener.LWM2M:
        # Spec (LWM2M): the endpoint id (CN) identifies the tenant where the
        # device is registered; no auto-registration.
        registered = set(snap.device_tenants.get(cn or "", ()))
        if not registered:
            return Rejection(
                Reason.NOT_REGISTERED,
                f"LWM2M endpoint {cn!r} is not registered in any tenant",
                device_id=cn,
            )
        by_tenant = {t: v for t, v in by_tenant.items() if t in registered}
    if not by_tenant:
        return Rejection(
            Reason.UNTRUSTED,
            "no trusted certificate in the presented chain "
            "(nor its issuer, for a lone certificate)",
            device_id=cn,
        )

    validated: list[tuple[str, VerifiedChain, Anchor]] = []
    failures: list[ChainError] = []
    disabled_only: list[str] = []
    for tenant in sorted(by_tenant):
        anchors = by_tenant[tenant]
        enabled = [a for a in anchors if a.enabled]
        if not enabled:
            disabled_only.append(tenant)
            continue
        try:
            chain = verify_chain(presented, [a.cert for a in enabled], now, policy.verify)
        except ChainError as exc:
            failures.append(exc)
            continue
        anchor_fp = fingerprint(chain.anchor)
        anchor = next((a for a in enabled if a.fingerprint == anchor_fp), enabled[0])
        validated.append((tenant, chain, anchor))

    if not validated:
        if failures:
            worst = min(failures, key=lambda e: _REASON_PRIORITY.get(e.reason, 5))
            return Rejection(worst.reason, worst.message, device_id=cn)
        if disabled_only:
            return Rejection(
                Reason.ANCHOR_DISABLED,
                "the trusted certificate for this chain is disabled",
                tenant=disabled_only[0] if len(disabled_only) == 1 else None,
                device_id=cn,
            )
        return Rejection(
            Reason.UNTRUSTED, "chain does not lead to a trusted certificate", device_id=cn
        )

    if len(validated) > 1:
        # Spec ("Perform a proof of possession"): prefer the tenant whose anchor's
        # possession is proven; if that does not single one out, refuse all.
        proven = [v for v in validated if v[2].record.proof_of_possession_valid]
        if len(proven) != 1:
            return Rejection(
                Reason.AMBIGUOUS_TENANT,
                f"chain is trusted by {len(validated)} tenants and proof of possession "
                "does not single one out",
                device_id=cn,
            )
        validated = proven
    tenant, chain, anchor = validated[0]

    trust = snap.tenant(tenant)
    if trust.settings.offline and trust.revoked:
        for position, cert in enumerate(chain.certificates):
            if cert.serial_number in trust.revoked:
                role = _role(position, len(chain.certificates))
                return Rejection(
                    Reason.REVOKED,
                    f"{role} certificate serial {cert.serial_number:x} "
                    f"is revoked in tenant {tenant}",
                    tenant=tenant,
                    device_id=cn,
                )
    if trust.settings.online and online is not None:
        rejected = online(chain, now)
        if rejected is not None:
            return Rejection(rejected.reason, rejected.message, tenant=tenant, device_id=cn)

    if not cn:
        return Rejection(
            Reason.NO_COMMON_NAME,
            "the device certificate has no Common Name (it is the device id)",
            tenant=tenant,
        )
    registration = _registration(listener, snap, tenant, cn, anchor)
    if isinstance(registration, Rejection):
        return registration
    leaf_fingerprint = fingerprint(leaf)
    # Identities are kept per live session: the CA certificates' fingerprints are
    # the same for every device under them, so they are shared strings.
    ca_fingerprints = tuple(sys.intern(fingerprint(c)) for c in chain.certificates[1:])
    return DeviceIdentity(
        tenant=tenant,
        device_id=cn,
        listener=listener,
        registration=registration,
        anchor_fingerprint=anchor.fingerprint,
        leaf_fingerprint=leaf_fingerprint,
        leaf_serial=leaf.serial_number,
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        chain_serials=tuple(c.serial_number for c in chain.certificates),
        chain_fingerprints=(leaf_fingerprint, *ca_fingerprints),
    )


def _registration(
    listener: Listener, snap: TrustSnapshot, tenant: str, cn: str, anchor: Anchor
) -> Registration | Rejection:
    user = snap.device(tenant, cn)
    if user is not None:
        if not user.enabled:
            return Rejection(
                Reason.DEVICE_DISABLED,
                f"device user device_{cn} is disabled in tenant {tenant}",
                tenant=tenant,
                device_id=cn,
            )
        return Registration.EXISTING
    if listener is Listener.MQTT_SERVICE:
        return (
            Registration.NONE
        )  # spec: "Device registration does not occur when using the MQTT Service"
    if listener is Listener.LWM2M:
        return Rejection(
            Reason.NOT_REGISTERED,
            f"LWM2M endpoint {cn} is not registered",
            tenant=tenant,
            device_id=cn,
        )
    if snap.pending_registration(tenant, cn) is not None:
        return Registration.BULK
    if anchor.record.auto_registration:
        return Registration.AUTO
    return Rejection(
        Reason.NOT_REGISTERED,
        f"device {cn} is not registered in tenant {tenant} and the trusted certificate "
        "does not allow auto-registration (use bulk registration)",
        tenant=tenant,
        device_id=cn,
    )


def _role(position: int, length: int) -> str:
    if position == 0:
        return "device"
    if position == length - 1:
        return "trusted CA"
    return "intermediate"
