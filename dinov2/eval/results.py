"""Evaluation results on disk: one results.json per output folder and its Markdown rendering.

Several evaluations (k-NN, linear, log-regression, the comparison suite) often share an output
folder, so results.json maps each evaluation's name to its payload and a new run replaces only
its own entry; results.md is always regenerated from the whole JSON so the two never disagree.
Upstream's own files (`results_eval_knn.json` ...) are JSON lines appended per run; they are kept
for tools that read them.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from dinov2.utils.io import atomic_write_text

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"

Row = Mapping[str, Any]


def format_cell(value: Any) -> str:
    """Numbers with two decimals (3 significant digits when tiny or huge, e.g. C = 1e-06),
    {"mean", "std"} pairs as "mean ± std", None/NaN as "-"."""
    if value is None:
        return "-"
    if isinstance(value, Mapping) and {"mean", "std"} <= value.keys():
        return f"{format_cell(value['mean'])} ± {format_cell(value['std'])}"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        small_or_large = value != 0 and not 0.01 <= abs(value) < 1e5
        return f"{value:.3g}" if small_or_large else f"{value:.2f}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: Sequence[Row], columns: Sequence[str] | None = None) -> str:
    """A GitHub Markdown table; columns default to every key, in order of first appearance."""
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = [
        "| " + " | ".join(columns) + " |",
        "| " + " | ".join("---" for _ in columns) + " |",
    ]
    lines += ["| " + " | ".join(format_cell(row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def render_markdown(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Every evaluation in results.json as a section: its main table, extra tables, then its notes."""
    parts = []
    for name, payload in results.items():
        parts.append(f"## {name}\n\n" + markdown_table(payload.get("rows", [])))
        for title, rows in payload.get("details", {}).items():
            parts.append(f"### {title}\n\n" + markdown_table(rows))
        info = payload.get("info", {})
        if info:
            parts.append("\n".join(f"- {key}: {format_cell(value)}" for key, value in info.items()) + "\n")
    return "# Evaluation results\n\n" + "\n".join(parts)


def _load_results(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return {}  # written atomically by us, so only a foreign file can be broken: start afresh
    return loaded if isinstance(loaded, dict) else {}


def write_results(
    output_dir: str | os.PathLike,
    name: str,
    rows: Sequence[Row],
    *,
    details: Mapping[str, Sequence[Row]] | None = None,
    info: Mapping[str, Any] | None = None,
    echo: bool = True,
) -> tuple[Path, Path]:
    """Store evaluation `name` in output_dir/results.json and re-render results.md.

    `rows` is the main table, `details` extra named tables (e.g. per-label metrics), `info`
    scalar notes (weights file, datasets, skipped labels). With `echo` the section is printed.
    """
    output_dir = Path(output_dir)
    json_path, md_path = output_dir / RESULTS_JSON, output_dir / RESULTS_MD
    payload: dict[str, Any] = {"rows": [dict(row) for row in rows]}
    if details:
        payload["details"] = {title: [dict(row) for row in table] for title, table in details.items()}
    if info:
        payload["info"] = dict(info)
    results = _load_results(json_path)
    results[name] = payload
    atomic_write_text(json_path, json.dumps(results, indent=2, allow_nan=True) + "\n")
    atomic_write_text(md_path, render_markdown(results))
    if echo:
        print(render_markdown({name: payload}).split("\n", 2)[2], flush=True)
    return json_path, md_path


def append_json_lines(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> None:
    """Upstream's results_eval_*.json: one JSON object per line, appended run after run."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(dict(record)) + "\n")
