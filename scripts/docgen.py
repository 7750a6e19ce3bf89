"""Shared tail of the doc generators: write the rendered file, or with
``--check`` report whether the committed one is stale."""

from __future__ import annotations

import sys
from pathlib import Path


def write_or_check(output: Path, text: str, *, check: bool, script: str) -> int:
    """Exit status: 0 written/up to date, 1 stale (``check``)."""
    if check:
        current = output.read_text("utf-8") if output.exists() else ""
        if current != text:
            print(f"{output} is out of date: run `python scripts/{script}`", file=sys.stderr)
            return 1
        return 0
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text, "utf-8")
    print(f"wrote {output}")
    return 0
