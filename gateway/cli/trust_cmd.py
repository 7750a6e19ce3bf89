"""``mtls-gateway trust verify``: would this chain be accepted?

``trust verify CHAIN.pem --anchor A.pem [--crl C.pem] [--at TIME]`` runs the
same path validation as the listeners (:func:`trust.verify.verify_chain`) plus
the given CRLs (:func:`trust.crl.check_chain_against_crls`). ``--tenant T``
verifies against a tenant's anchors and revocations in the store.

Exit codes: 0 accepted, 1 rejected (the reason code and message are printed),
2 usage or input error (unreadable file, malformed PEM, bad time).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from gateway.cli.store_cmds import Context, common_parser, run_store_command
from gateway.crl_fetcher import CrlFetcher
from gateway.metrics import GatewayMetrics
from gateway.sessions import SessionRegistry
from gateway.trust_state import TrustState, load_snapshot
from trust.certs import CertificateError, fingerprint, load_certificates
from trust.crl import CrlError, check_chain_against_crls, load_crls
from trust.model import Decision, DeviceIdentity, Listener, Reason, Rejection
from trust.policy import DecisionPolicy, OnlineCheck, decide
from trust.snapshot import TrustSnapshot
from trust.verify import ChainError, VerifiedChain, VerifyPolicy, verify_chain

MAX_INPUT_BYTES = 64 << 20
"""Largest file ``trust verify`` reads (CRLs can be big; PEM chains are tiny)."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group = sub.add_parser(
        "trust",
        help="check device certificate chains",
        description="Check device certificate chains the way the listeners do.",
    )
    commands = group.add_subparsers(dest="trust_command", metavar="SUBCOMMAND", required=True)
    p = commands.add_parser(
        "verify",
        parents=[common_parser()],
        help="verify a device chain against anchors (and CRLs) or a tenant",
        description=(
            "Verify CHAIN.pem (the device certificate first, then its intermediates) "
            "against trust anchors given with --anchor, or against the anchors and "
            "revocations of a tenant (--tenant). Exit 0 accepted, 1 rejected, 2 input error."
        ),
    )
    p.add_argument("chain", metavar="CHAIN.pem", help="device certificate, then intermediates")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--tenant", metavar="T", help="verify against tenant T's trusted certificates"
    )
    source.add_argument(
        "--anchor",
        action="append",
        metavar="A.pem",
        help="a trust anchor (PEM or DER, repeatable; a file may hold several)",
    )
    p.add_argument(
        "--crl",
        action="append",
        default=[],
        metavar="CRL.pem",
        help="a CRL (PEM or DER, repeatable); issuers without a CRL are not checked",
    )
    p.add_argument(
        "--at",
        metavar="TIME",
        type=parse_time,
        help="validation time, ISO-8601 (e.g. 2024-03-01T00:00:00Z; default: now)",
    )
    p.add_argument(
        "--max-chain-length",
        metavar="N",
        type=_chain_length,
        default=VerifyPolicy().max_chain_length,
        help="largest number of certificates in the verified chain, device certificate and "
        "anchor included; self-issued key-rollover CA certificates are not counted "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--listener",
        choices=[x.value for x in Listener],
        default=Listener.MQTT_CORE.value,
        help="with --tenant: which listener's rules to apply (default: %(default)s)",
    )
    p.set_defaults(handler=_verify)


def parse_time(text: str) -> datetime:
    """ISO-8601 with ``Z``, an offset or none (UTC), fractional seconds allowed."""
    raw = text.strip()
    if raw[-1:] in ("Z", "z"):
        raw = raw[:-1] + "+00:00"
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO-8601 time such as 2024-03-01T00:00:00Z"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC)


def _chain_length(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


class _InputError(Exception):
    pass


def _read(path: str, what: str) -> bytes:
    try:
        with Path(path).open("rb") as f:
            data = f.read(MAX_INPUT_BYTES + 1)
    except OSError as exc:
        raise _InputError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_INPUT_BYTES:
        raise _InputError(f"{what} {path} is larger than {MAX_INPUT_BYTES} bytes")
    return data


def _certificates(path: str, what: str) -> list[x509.Certificate]:
    data = _read(path, what)
    try:
        with warnings.catch_warnings():
            # e.g. cryptography's deprecation warning on a negative serial: the
            # verifier reports such certificates itself.
            warnings.simplefilter("ignore")
            return load_certificates(data)
    except CertificateError as exc:
        raise _InputError(f"{what} {path}: {exc}") from None


def _crls(path: str) -> list[x509.CertificateRevocationList]:
    data = _read(path, "CRL")
    try:
        return load_crls(data)
    except CrlError as exc:
        raise _InputError(f"CRL {path}: {exc}") from None


def _fail(message: str, code: int = 2) -> int:
    print(f"mtls-gateway: error: {' '.join(message.split())}", file=sys.stderr)
    return code


def _verify(args: argparse.Namespace) -> int:
    if args.tenant is not None:
        return _verify_against_tenant(args)
    try:
        presented = _certificates(args.chain, "chain")
        anchors = [c for path in args.anchor for c in _certificates(path, "anchor")]
        crls = [c for path in args.crl for c in _crls(path)]
    except _InputError as exc:
        return _fail(str(exc))
    now: datetime = args.at or datetime.now(UTC)
    policy = VerifyPolicy(max_chain_length=args.max_chain_length)
    try:
        chain = verify_chain(presented, anchors, now, policy)
        check_chain_against_crls(chain, crls, now, issuers=anchors)
    except ChainError as exc:
        return _report(args, None, exc)
    return _report(args, chain, None)


def _verify_against_tenant(args: argparse.Namespace) -> int:
    """``--tenant``: decide exactly as a listener would, from the store's trust state.

    The whole snapshot is used (a chain trusted by several tenants is ambiguous
    here too); the answer is "accepted" only when the chain maps to ``--tenant``.
    """
    try:
        presented = _certificates(args.chain, "chain")
    except _InputError as exc:
        return _fail(str(exc))
    if not presented:
        return _fail("chain file holds no certificate")
    now: datetime = args.at or datetime.now(UTC)
    listener = Listener(args.listener)

    async def action(ctx: Context) -> int:
        if not await ctx.store.tenant_exists(args.tenant):
            return _fail(f"tenant {args.tenant!r} does not exist")
        snap = await load_snapshot(ctx.store)
        policy = DecisionPolicy(
            verify=VerifyPolicy(max_chain_length=args.max_chain_length),
            require_anchor_in_chain=ctx.config.trust.require_anchor_in_chain,
        )
        online = await _online_check(ctx, snap, presented, now, listener, policy)
        decision = decide(presented, snap, now, listener, policy, online)
        if isinstance(decision, DeviceIdentity) and decision.tenant != args.tenant:
            decision = Rejection(
                Reason.UNTRUSTED,
                f"chain is trusted by tenant {decision.tenant}, not {args.tenant}",
                tenant=decision.tenant,
                device_id=decision.device_id,
            )
        return _report_decision(args, decision)

    return run_store_command(args, action)


async def _online_check(
    ctx: Context,
    snap: TrustSnapshot,
    presented: list[x509.Certificate],
    now: datetime,
    listener: Listener,
    policy: DecisionPolicy,
) -> OnlineCheck | None:
    """For tenants with the online CRL check on: fetch the chain's distribution
    points once, as the daemon would have, and check against them."""
    if not any(t.settings.online for t in snap.tenants.values()):
        return None
    trust = TrustState(ctx.store, policy, server_cert=Path("-"), server_key=Path("-"))
    fetcher = CrlFetcher.from_config(
        ctx.config.crl,
        trust=trust,
        registry=SessionRegistry(),
        metrics=GatewayMetrics(),
        status_path=None,
    )
    decide(presented, snap, now, listener, policy, fetcher.cache.check)  # registers the DPs
    due = fetcher.cache.due(now)
    if due:
        await fetcher.fetch_now(due)
    return fetcher.cache.check


def _report_decision(args: argparse.Namespace, decision: Decision) -> int:
    accepted = isinstance(decision, DeviceIdentity)
    if args.json:
        doc: dict[str, Any] = {"accepted": accepted}
        if isinstance(decision, DeviceIdentity):
            doc.update(
                tenant=decision.tenant,
                device=decision.device_id,
                user=decision.username,
                registration=decision.registration.value,
                anchor=decision.anchor_fingerprint,
                serial=decision.serial_hex,
                notAfter=decision.not_after.isoformat(),
                reason=None,
            )
        else:
            doc.update(
                reason=decision.reason.value, message=decision.message, tenant=decision.tenant
            )
        print(json.dumps(doc, indent=2))
    elif isinstance(decision, DeviceIdentity):
        print(
            f"accepted: device {decision.device_id} (user {decision.username}) in tenant "
            f"{decision.tenant}; registration: {decision.registration.value}; "
            f"trusted certificate {decision.anchor_fingerprint}"
        )
    else:
        print(f"rejected: {decision.reason.value}: {decision.message}")
    return 0 if accepted else 1


def _report(args: argparse.Namespace, chain: VerifiedChain | None, error: ChainError | None) -> int:
    if args.json:
        doc: dict[str, Any] = {
            "accepted": chain is not None,
            "reason": error.reason.value if error is not None else None,
            "message": error.message if error is not None else "chain verified",
            "chain": [_describe(c) for c in chain.certificates] if chain is not None else [],
        }
        print(json.dumps(doc, indent=2))
    elif chain is not None:
        print(f"accepted: chain of {len(chain.certificates)} certificate(s)")
        for i, cert in enumerate(chain.certificates):
            d = _describe(cert)
            role = "device" if i == 0 else "anchor" if i == len(chain.certificates) - 1 else "ca"
            print(f"  {role:6s} {d['subject']}  serial {d['serial']}  sha1 {d['fingerprint']}")
    elif error is not None:
        print(f"rejected: {error.reason.value}: {error.message}")
    return 0 if chain is not None else 1


def _describe(cert: x509.Certificate) -> dict[str, str]:
    try:
        subject = cert.subject.rfc4514_string()
    except Exception:
        subject = "<unreadable>"
    return {
        "subject": subject,
        "serial": format(cert.serial_number, "x"),
        "fingerprint": fingerprint(cert),
    }
