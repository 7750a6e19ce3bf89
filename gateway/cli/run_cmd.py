"""``mtls-gateway run``: the daemon."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path

from gateway.app import Gateway
from gateway.config import Config, ConfigError, load_config
from gateway.logs import setup_logging

log = logging.getLogger("mtls_gateway")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run",
        help="start the gateway daemon",
        description="Start the gateway. On first start with the default data directory a "
        "demo tenant and PKI are created (see `mtls-gateway init`).",
    )
    p.add_argument("--config", type=Path, help="TOML configuration file")
    p.add_argument("--data-dir", type=Path, help="data directory (default ./var)")
    p.add_argument("--store", help="store URL (sqlite:///path.db or redis://host:port/db)")
    p.add_argument(
        "--no-demo", action="store_true", help="do not create the demo PKI on first start"
    )
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, data_dir=args.data_dir, store_url=args.store)
    except ConfigError as exc:
        print(f"mtls-gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.logging.level, config.logging.format)
    _install_loop(config)
    try:
        return asyncio.run(_serve(config, demo=not args.no_demo))
    except KeyboardInterrupt:
        return 0


def _install_loop(config: Config) -> None:
    if config.event_loop == "asyncio":
        return
    try:
        import uvloop
    except ImportError:
        if config.event_loop == "uvloop":
            raise SystemExit("event_loop = uvloop but uvloop is not installed") from None
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _serve(config: Config, *, demo: bool) -> int:
    from gateway.store import open_store

    config.data_dir.mkdir(parents=True, exist_ok=True)
    store = open_store(config.store_url)
    await store.open()
    if demo and not config.server_cert_path.exists():
        from gateway.demo import ensure_demo

        report = await ensure_demo(config.data_dir, store, datetime.now(UTC))
        log.info("demo PKI ready in %s", config.data_dir / "demo")
        del report
    gateway = Gateway(config, store=store)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await gateway.start()
        ports = ", ".join(f"{n}={gateway.port(n)}" for n in gateway.listeners)
        log.info("mtls-gateway ready (%s); store %s", ports, config.store_url)
        await stop.wait()
        log.info("stopping")
        await gateway.stop()
    finally:
        await store.close()
    return 0
