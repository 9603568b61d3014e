"""Plain-text pieces the terminal views share: tables, ages, progress bars."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any


def table_lines(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """Plain columns, left-aligned, two spaces apart; None shows as '-'."""
    cells = [list(headers)] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    ]


def span(seconds: float) -> str:
    """A duration the way a person says it: 45s, 12m, 3h, 2d."""
    seconds = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}" if seconds >= 2 * size else f"{seconds:.0f}s"
    return f"{seconds:.0f}s"


def age(moment: datetime | None, now: datetime) -> str | None:
    """'12s ago', or 'in 3m' for a moment still to come."""
    if moment is None:
        return None
    delta = (now - moment).total_seconds()
    return f"{span(delta)} ago" if delta >= 0 else f"in {span(delta)}"


def progress_bar(percent: float | None, width: int = 20) -> str:
    """[█████░░░░░]  50%"""
    percent = max(0.0, min(100.0, float(percent or 0.0)))
    filled = round(width * percent / 100)
    return "█" * filled + "░" * (width - filled) + f" {percent:3.0f}%"
