"""The benchmark report: Markdown + JSON + PNG plots from the sections' results.

Every section (bench/sections.py) returns a plain dict of this shape, JSON all the way down:

    {
      "title": "...",
      "size": "full" | "quick",
      "tables": [{"title": "...", "columns": [...], "rows": [[...], ...]}],
      "plots": [{"name": "file-stem", "title": "...", "kind": "line" | "bar",
                 "x": [...], "series": {"label": [y, ...]}, "xlabel": "...", "ylabel": "..."}],
      "targets": [{"name": "...", "value": 1.2, "target": "<= 1.3", "met": true}],
      "notes": ["..."],
      "data": {...}            # raw figures other sections (and readers) may use
    }

``write_report(results, folder)`` writes ``report.md``, ``report.json`` and one PNG per plot
into ``folder`` and returns the paths written. Nothing here measures anything.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def fmt(value: Any) -> str:
    """One table cell: floats to 3 significant-ish digits, NaN / None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return "-"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3f}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(str(c) for c in columns) + " |"]
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        lines.append("| " + " | ".join(fmt(v).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines)


def _clean(value: Any) -> Any:
    """JSON-safe: NaN / inf become null (strict JSON readers reject them)."""
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def plot(spec: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    x = list(spec.get("x", []))
    series: Mapping[str, Sequence[Any]] = spec.get("series", {})
    if spec.get("kind") == "bar":
        width = 0.8 / max(1, len(series))
        for i, (label, ys) in enumerate(series.items()):
            positions = [j + i * width for j in range(len(x))]
            ax.bar(positions, [_num(y) for y in ys], width, label=label)
        ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(x))])
        ax.set_xticklabels([str(v) for v in x])
    else:
        for label, ys in series.items():
            ax.plot(x, [_num(y) for y in ys], marker="o", label=label)
    for marker in spec.get("vlines", []):
        ax.axvline(marker["x"], linestyle="--", color="red")
        ax.annotate(marker.get("label", ""), (marker["x"], 0), rotation=90, fontsize=8)
    ax.set_title(spec.get("title", ""))
    ax.set_xlabel(spec.get("xlabel", ""))
    ax.set_ylabel(spec.get("ylabel", ""))
    if series:
        ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)


def render_markdown(results: Mapping[str, Mapping[str, Any]], meta: Mapping[str, Any]) -> str:
    out = ["# agentmesh benchmark report", ""]
    for key, value in meta.items():
        out.append(f"- {key}: {fmt(value)}")
    targets = [(name, t) for name, s in results.items() for t in s.get("targets", [])]
    if targets:
        out += ["", "## Targets", ""]
        out.append(
            markdown_table(
                ["section", "target", "measured", "goal", "met"],
                [
                    [name, t["name"], t.get("value"), t.get("target", ""), t.get("met")]
                    for name, t in targets
                ],
            )
        )
    for name, section in results.items():
        out += ["", f"## {section.get('title', name)}", ""]
        if section.get("size"):
            out.append(f"_size: {section['size']}_")
            out.append("")
        if section.get("error"):
            out += [f"**section failed:** {section['error']}", ""]
        for table in section.get("tables", []):
            if table.get("title"):
                out += [f"**{table['title']}**", ""]
            out += [markdown_table(table["columns"], table["rows"]), ""]
        for spec in section.get("plots", []):
            out += [f"![{spec.get('title', spec['name'])}]({spec['name']}.png)", ""]
        for note in section.get("notes", []):
            out.append(f"- {note}")
    return "\n".join(out).rstrip() + "\n"


def write_report(
    results: Mapping[str, Mapping[str, Any]],
    folder: Path,
    meta: Mapping[str, Any] | None = None,
) -> list[Path]:
    """report.md, report.json and the PNGs of every section's plots, in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    written: list[Path] = []
    for section in results.values():
        for spec in section.get("plots", []):
            path = folder / f"{spec['name']}.png"
            plot(spec, path)
            written.append(path)
    md = folder / "report.md"
    md.write_text(render_markdown(results, meta))
    js = folder / "report.json"
    js.write_text(json.dumps(_clean({"meta": meta, "sections": results}), indent=2))
    return [md, js, *written]
