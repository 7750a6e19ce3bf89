"""``mtls-gateway fleet pki|register|run``: simulated device fleets (load tests).

Exit codes: 0 done (``run``: every good device connected and every bad one was
refused), 1 unexpected outcomes or a failed step, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from gateway.cli.store_cmds import (
    Context,
    SubParsers,
    common_parser,
    fail,
    print_json,
    run_store_command,
)
from gateway.fleet.driver import DRIVERS, DriverOptions
from gateway.fleet.pki import ManifestError, generate_fleet, load_manifest
from gateway.fleet.register import StoreRegistrar, register_fleet
from gateway.fleet.report import render_table
from gateway.fleet.run import RunOptions, default_workers, run_fleet

DEFAULT_PORTS = {"mqtt": 8883, "mqtt-service": 9883, "https": 8443, "lwm2m": 5684}
REGISTRATION_FILE = "registration.json"


def register(sub: SubParsers) -> None:
    parser = sub.add_parser(
        "fleet",
        help="simulated device fleets: certificates, registration, load runs",
        description="Simulated device fleets for load tests: `fleet pki` makes the "
        "certificates, `fleet register` puts them into a tenant, `fleet run` connects them.",
    )
    commands = parser.add_subparsers(dest="fleet_command", metavar="COMMAND", required=True)
    _pki_parser(commands)
    _register_parser(commands)
    _run_parser(commands)


# pki ------------------------------------------------------------------------------


def _pki_parser(commands: SubParsers) -> None:
    p = commands.add_parser(
        "pki",
        help="create a CA and N device certificates plus manifest.json",
        description="Create a fleet directory: root CA (and intermediate), N device "
        "keys and chain files, a loopback server certificate and manifest.json.",
    )
    p.add_argument("--devices", type=int, required=True, metavar="N", help="number of devices")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="fleet directory")
    p.add_argument(
        "--key-type", choices=("ec", "rsa"), default="ec", help="ECDSA P-256 or RSA 2048"
    )
    p.add_argument(
        "--intermediate", action="store_true", help="issue devices from an intermediate CA"
    )
    p.add_argument("--prefix", default="dev-", help="device id prefix (default dev-)")
    p.add_argument(
        "--bad-ratio",
        type=float,
        default=0.0,
        metavar="R",
        help="share of devices signed by an untrusted CA (0..1)",
    )
    p.add_argument("--workers", type=int, help="processes generating keys (default: CPUs)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(handler=_pki)


def _pki(args: argparse.Namespace) -> int:
    started = time.monotonic()
    try:
        manifest = generate_fleet(
            args.out,
            args.devices,
            key_type=args.key_type,
            intermediate=args.intermediate,
            prefix=args.prefix,
            bad_ratio=args.bad_ratio,
            workers=args.workers,
        )
    except (ValueError, FileExistsError) as exc:
        return fail(str(exc))
    except OSError as exc:
        return fail(f"cannot write {args.out}: {exc.strerror or exc}", 1)
    elapsed = time.monotonic() - started
    counts = manifest["counts"]
    summary = {
        "directory": str(args.out),
        "devices": counts["devices"],
        "bad": counts["bad"],
        "keyType": manifest["keyType"],
        "intermediate": manifest["ca"]["intermediate"] is not None,
        "caFingerprint": manifest["ca"]["root"]["fingerprint"],
        "seconds": round(elapsed, 2),
    }
    if args.json:
        print_json(summary)
    else:
        print(
            f"{counts['devices']} {manifest['keyType'].upper()} devices ({counts['bad']} bad)"
            f" in {args.out} in {elapsed:.1f}s; root CA {summary['caFingerprint']}"
        )
    return 0


# register -----------------------------------------------------------------------------


def _register_parser(commands: SubParsers) -> None:
    p = commands.add_parser(
        "register",
        parents=[common_parser()],
        help="upload the fleet CA and/or bulk-register its devices in a tenant",
        description="Register a fleet in a tenant (created if missing) directly in the "
        "store: upload the root CA as trusted certificate and/or add pending bulk "
        "registrations for the good devices.",
    )
    p.add_argument("--dir", type=Path, required=True, metavar="DIR", help="fleet directory")
    p.add_argument("--tenant", required=True, metavar="T", help="tenant id")
    p.add_argument("--bulk", action="store_true", help="add a pending registration per good device")
    p.add_argument(
        "--no-auto-registration",
        action="store_true",
        help="upload the CA with auto-registration off",
    )
    p.add_argument("--no-ca", action="store_true", help="do not upload the CA")
    p.add_argument(
        "--preregister",
        action="store_true",
        help="create the good devices' users now (as if they had connected before)",
    )
    p.set_defaults(handler=_register)


def _register(args: argparse.Namespace) -> int:
    try:
        manifest = load_manifest(args.dir)
    except ManifestError as exc:
        return fail(str(exc))

    async def action(ctx: Context) -> int:
        result = await register_fleet(
            StoreRegistrar(ctx.store, ctx.now, ctx.actor),
            manifest,
            args.tenant,
            upload_ca=not args.no_ca,
            auto_registration=not args.no_auto_registration,
            bulk=args.bulk,
            preregister=args.preregister,
        )
        data = result.as_json()
        (args.dir / REGISTRATION_FILE).write_text(json.dumps(data, indent=1) + "\n", "utf-8")
        if ctx.json:
            print_json(data)
            return 0
        ca = {True: "uploaded", False: "already trusted", None: "not uploaded"}[result.ca_uploaded]
        auto = "on" if result.auto_registration else "off"
        print(
            f"tenant {result.tenant}: fleet root CA {result.ca_fingerprint} {ca}"
            f" (auto-registration {auto})"
        )
        if result.pending is not None:
            print(f"  bulk registration: {result.pending[0]} added, {result.pending[1]} existing")
        if result.registered is not None:
            print(
                f"  device users: {result.registered[0]} created, {result.registered[1]} existing"
            )
        if result.bad_skipped:
            print(f"  {result.bad_skipped} bad devices left out")
        return 0

    return run_store_command(args, action, create=True)


# run ----------------------------------------------------------------------------------


def _run_parser(commands: SubParsers) -> None:
    p = commands.add_parser(
        "run",
        help="connect the fleet's devices to a gateway and report what happened",
        description="Open N device connections with their own certificates at the given "
        "arrival rate, keep them publishing for the duration, and report connects/s, "
        "latency percentiles, messages/s and errors. Loopback by default.",
    )
    p.add_argument("--dir", type=Path, required=True, metavar="DIR", help="fleet directory")
    p.add_argument("--protocol", choices=sorted(DRIVERS), default="mqtt")
    p.add_argument("--host", default="127.0.0.1", help="gateway address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="gateway port (default: the protocol's standard port)")
    p.add_argument("--devices", type=int, metavar="N", help="devices to use (default: all)")
    p.add_argument("--rate", type=float, default=100.0, metavar="R", help="new connections/s")
    p.add_argument("--duration", type=float, default=30.0, metavar="S", help="seconds")
    p.add_argument(
        "--publish-interval",
        type=float,
        default=1.0,
        metavar="SEC",
        help="seconds between a device's messages (0: keep-alives only)",
    )
    p.add_argument("--qos", type=int, choices=(0, 1), default=0)
    p.add_argument("--payload-size", type=int, default=64, metavar="BYTES")
    p.add_argument("--keepalive", type=int, default=60, metavar="SEC")
    p.add_argument("--connect-timeout", type=float, default=10.0, metavar="SEC")
    p.add_argument("--workers", type=int, help="worker processes (default: CPUs)")
    p.add_argument(
        "--reconnect-storm",
        action="store_true",
        help="at half time every device disconnects and reconnects at once",
    )
    p.add_argument("--tenant", help="tenant id (mqtt-service username; default: fleet register's)")
    p.add_argument(
        "--cafile",
        type=Path,
        help="CA of the gateway's server certificate (default DIR/server-ca.pem)",
    )
    p.add_argument("--server-name", help="server certificate name to check (default: --host)")
    p.add_argument("--insecure", action="store_true", help="do not verify the server certificate")
    p.add_argument("--gateway-pid", type=int, metavar="PID", help="report this process's RSS")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        manifest = load_manifest(args.dir)
    except ManifestError as exc:
        return fail(str(exc))
    tenant = args.tenant or _registered_tenant(args.dir)
    cafile: Path | None = None
    if not args.insecure:
        cafile = args.cafile or manifest.server_ca
        if not cafile.exists():
            return fail(f"server CA {cafile} not found: pass --cafile or --insecure")
    driver = DriverOptions(
        host=args.host,
        port=args.port or DEFAULT_PORTS.get(args.protocol, 8883),
        cafile=cafile,
        server_name=args.server_name,
        tenant=tenant,
        qos=args.qos,
        connect_timeout=args.connect_timeout,
        keepalive=args.keepalive,
        payload_size=args.payload_size,
    )
    options = RunOptions(
        protocol=args.protocol,
        driver=driver,
        devices=args.devices or len(manifest.devices),
        rate=args.rate,
        duration=args.duration,
        publish_interval=args.publish_interval,
        workers=args.workers or default_workers(),
        reconnect_storm=args.reconnect_storm,
        gateway_pid=args.gateway_pid,
    )
    try:
        report = run_fleet(options, manifest.devices)
    except ValueError as exc:
        return fail(str(exc))
    except RuntimeError as exc:
        return fail(str(exc), 1)
    if args.json:
        print_json(report.as_json())
    else:
        print(render_table(report))
    sys.stdout.flush()
    return 0 if report.ok else 1


def _registered_tenant(directory: Path) -> str | None:
    try:
        data = json.loads((directory / REGISTRATION_FILE).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    tenant = data.get("tenant") if isinstance(data, dict) else None
    return tenant if isinstance(tenant, str) else None
