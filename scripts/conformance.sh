#!/usr/bin/env bash
# x509-limbo conformance of `mtls-gateway trust verify` (see docs/conformance.md).
#
#   scripts/conformance.sh [extra run.py options, e.g. -v or --now 2026-01-01T00:00:00Z]
#
# Exits 0 even when cases disagree (the figures are the result); fails when the
# harness or the CLI cannot run at all.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
limbo="$repo/../shared/conformance/x509-limbo"
cli="$repo/.venv/bin/mtls-gateway"

[ -f "$limbo/run.py" ] || { echo "conformance: harness not found at $limbo/run.py" >&2; exit 2; }
[ -x "$cli" ] || { echo "conformance: $cli missing (.venv/bin/pip install -e . --no-deps)" >&2; exit 2; }
"$cli" trust verify --help >/dev/null || { echo "conformance: $cli does not run" >&2; exit 2; }

# limbo's max_chain_depth counts intermediates; --max-chain-length counts the
# device certificate and the anchor too: offset 2.
out="$(python3 "$limbo/run.py" \
    --cmd "$cli trust verify {chain} {anchor_args} --at {time} {depth_args} {crl_args}" \
    --depth-offset 2 "$@")"
printf '%s\n' "$out"
case "$out" in
  *"harness error"*|*"limbo: 0/0 agree"*) echo "conformance: the harness did not run" >&2; exit 2 ;;
esac
