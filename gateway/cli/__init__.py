"""``mtls-gateway`` command line.

Each subcommand group lives in its own module exposing
``register(subparsers)``; handlers return the process exit code
(0 success/accepted, 1 rejected/failed check, 2 usage or input error).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

Handler = Callable[[argparse.Namespace], int]

_GROUPS = (
    "gateway.cli.init_cmd",
    "gateway.cli.run_cmd",
    "gateway.cli.trust_cmd",
    "gateway.cli.store_cmds",
    "gateway.cli.api_cmds",  # admin-users, bulk-register
    "gateway.cli.crl_cmd",  # adds `crl status` to store_cmds' `crl` group
    "gateway.cli.config_cmd",
    "gateway.cli.fleet_cmd",
    "gateway.cli.token_cmd",  # tokens rotate-key, tokens keys
    "gateway.cli.ca_audit_cmd",  # ca create|renew|show, audit list
)


def build_parser() -> argparse.ArgumentParser:
    """The full parser (used by ``main`` and by the docs/tests)."""
    parser = argparse.ArgumentParser(
        prog="mtls-gateway",
        description="Self-hosted mTLS gateway for IoT devices.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _GROUPS:
        module = importlib.import_module(name)
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mtls-gateway`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
