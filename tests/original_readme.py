"""The original project's README (a copy in tests/data): its fenced blocks, for the tests that hold the toolkit
to what that README promises."""
from __future__ import annotations

import re
from pathlib import Path

ORIGINAL_README = Path(__file__).resolve().parent / "data" / "original-README.md"
OPENING = re.compile(r"^ {0,3}(`{3,})\s*(\w*)")


def fenced_blocks(lang: str | None = None, text: str | None = None) -> list[tuple[int, str]]:
    """(line number, body) of every fenced block, optionally only those tagged `lang`, in order.

    Read as GitHub renders it (CommonMark): a block closes only at a line of backticks alone, as long as the
    opening one and indented at most 3 spaces, so "```bash" inside an open block is text of that block."""
    text = ORIGINAL_README.read_text() if text is None else text
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = OPENING.match(lines[i])
        i += 1
        if not opening:
            continue
        start, closing = i, re.compile(rf"^ {{0,3}}`{{{len(opening.group(1))},}}\s*$")
        while i < len(lines) and not closing.match(lines[i]):
            i += 1
        if lang is None or opening.group(2) == lang:
            blocks.append((start, "\n".join(lines[start:i]) + "\n"))
        i += 1
    return blocks


def original_config_yaml() -> str:
    """The config.yaml its Configuration section shows (models table, dataset, monitoring, performance)."""
    return next(body for _, body in fenced_blocks("yaml") if "mlflow_tracking_uri" in body)
