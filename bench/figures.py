"""What every report section shares: percentiles, ratios, targets, the section dict."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

NAN = math.nan


def pct(values: Sequence[float], q: float) -> float:
    clean = sorted(v for v in values if v is not None and not math.isnan(v))
    if not clean:
        return NAN
    return clean[min(len(clean) - 1, max(0, round(q * (len(clean) - 1))))]


def div(a: float | None, b: float | None) -> float:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return NAN
    return a / b


def target(name: str, value: float, goal: str, ok: bool) -> dict[str, Any]:
    return {"name": name, "value": value, "target": goal, "met": None if math.isnan(value) else ok}


def new_section(title: str, size: str) -> dict[str, Any]:
    return {"title": title, "size": size, "tables": [], "plots": [], "targets": [], "notes": []}
