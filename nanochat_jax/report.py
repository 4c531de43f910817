"""The training report: one markdown file per stage under <base_dir>/report/ (nanochat's format).

`log_section("Base model training", [user_config, {"Number of parameters": n}, ...])` writes
`report/base-model-training.md` with a `## Base model training` heading, a timestamp, and each
item: strings verbatim, dicts as `- key: value` lines (floats to 4 decimals, ints >= 10000 with
thousands separators), exactly like nanochat's report.log.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from pathlib import Path

from nanochat_jax.common import atomic_write_text, get_base_dir


def report_dir(base_dir: str | Path | None = None) -> Path:
    path = (Path(base_dir) if base_dir else get_base_dir()) / "report"
    path.mkdir(parents=True, exist_ok=True)
    return path


def slug(section: str) -> str:
    return section.lower().replace(" ", "-")


def _format_value(value: object) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int) and value >= 10000:
        return f"{value:,}"
    return str(value)


def render_section(section: str, items: Iterable[str | dict], now: datetime.datetime) -> str:
    lines = [f"## {section}", f"timestamp: {now:%Y-%m-%d %H:%M:%S}", ""]
    for item in items:
        if isinstance(item, dict):
            lines += [f"- {key}: {_format_value(value)}" for key, value in item.items()]
        else:
            lines.append(str(item))
        lines.append("")
    return "\n".join(lines)


def log_section(
    section: str, items: Iterable[str | dict], base_dir: str | Path | None = None
) -> Path:
    """Write (atomically) the section's markdown file; returns its path."""
    path = report_dir(base_dir) / f"{slug(section)}.md"
    atomic_write_text(path, render_section(section, items, datetime.datetime.now()))
    return path
