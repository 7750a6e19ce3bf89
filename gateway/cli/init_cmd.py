"""``mtls-gateway init``: the store plus a demo tenant, PKI and admin user.

Safe to re-run: existing files, keys and users are kept, missing ones created
(see :mod:`gateway.demo`).
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from gateway.cli.store_cmds import (
    Context,
    SubParsers,
    common_parser,
    fail,
    print_json,
    run_store_command,
)
from gateway.demo import (
    DEMO_TENANT,
    DEVICE_IDS,
    LWM2M_DEVICE_ID,
    DemoError,
    DemoReport,
    ensure_demo,
)

DEFAULT_DATA_DIR = Path("var")


def register(sub: SubParsers) -> None:
    text = (
        "create the store, tenant 'demo', an admin user and a demo PKI in DIR/demo"
        " (re-running keeps what exists)"
    )
    parser = sub.add_parser("init", parents=[common_parser()], help=text, description=text)
    parser.set_defaults(handler=_init)


def _init(args: argparse.Namespace) -> int:
    async def action(ctx: Context) -> int:
        try:
            report = await ensure_demo(ctx.config.data_dir, ctx.store, ctx.now)
        except DemoError as exc:
            return fail(str(exc), 1)
        steps = next_steps(ctx.config.data_dir, default=_is_default(args))
        if ctx.json:
            print_json(_report_json(report, steps))
        else:
            _print_report(report, steps)
        return 0

    return run_store_command(args, action, create=True)


def _is_default(args: argparse.Namespace) -> bool:
    """True when ``make run`` (no options) would use the same data directory."""
    return args.config is None and args.store is None and args.data_dir in (None, DEFAULT_DATA_DIR)


def next_steps(data_dir: Path, *, default: bool) -> list[str]:
    """Commands to try next, runnable from the repository root."""
    demo = data_dir / "demo"

    def q(name: str) -> str:
        return shlex.quote(str(demo / name))

    opts = "" if default else f" --data-dir {shlex.quote(str(data_dir))}"
    sub_id, pub_id = DEVICE_IDS[0], DEVICE_IDS[1]
    tls = f"-h localhost -p 8883 --cafile {q('server-ca.pem')}"
    return [
        "make run" if default else f"mtls-gateway run{opts}",
        f"mosquitto_sub {tls} --cert {q(sub_id + '.pem')} --key {q(sub_id + '.key')}"
        f" -i {sub_id} -t '{DEMO_TENANT}/#' -v",
        f"mosquitto_pub {tls} --cert {q(pub_id + '.pem')} --key {q(pub_id + '.key')}"
        f" -i {pub_id} -t {DEMO_TENANT}/hello -m 'hello from {pub_id}'",
        f"mtls-gateway trust verify {q(sub_id + '.pem')} --tenant {DEMO_TENANT}{opts}",
        # LWM2M (issue 7): register over CoAP/DTLS with libcoap's client
        f"coap-client-openssl -m post -c {q(LWM2M_DEVICE_ID + '.pem')}"
        f" -j {q(LWM2M_DEVICE_ID + '.key')} -R {q('server-ca.pem')} -e '</1/0>,</3/0>'"
        f" 'coaps://127.0.0.1:5684/rd?ep={LWM2M_DEVICE_ID}&lt=300&lwm2m=1.1'",
    ]


def _print_report(report: DemoReport, steps: list[str]) -> None:
    for item in report.items:
        state = "created" if item.created else "kept"
        note = f"  ({item.note})" if item.note else ""
        print(f"{state:<8} {item.what}{note}")
    print()
    print(f"tenant {report.tenant}: trusted root CA {report.root_fingerprint}")
    print(
        f"admin user: {report.tenant}/{report.admin_username},"
        f" password in {report.admin_password_file}"
    )
    print()
    print("Next, from the repository root (run the gateway in one terminal):")
    for step in steps:
        print(f"  {step}")


def _report_json(report: DemoReport, steps: list[str]) -> dict[str, object]:
    return {
        "directory": str(report.directory),
        "tenant": report.tenant,
        "rootFingerprint": report.root_fingerprint,
        "adminUsername": report.admin_username,
        "adminPasswordFile": str(report.admin_password_file),
        "created": [i.what for i in report.created],
        "kept": [i.what for i in report.kept],
        "nextSteps": steps,
    }
