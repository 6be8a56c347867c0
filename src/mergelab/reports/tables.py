"""Paper-style result tables (markdown, CSV) and bar charts."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mergelab.io.atomic import atomic_save_figure, atomic_write_text

# rows: name -> {"scores": {task: {"acc", ...}}, "avg_acc": float, "avg_<metric>": ..., "avg_norm_acc": float | None,
#                "params": {}}
Rows = Mapping[str, Mapping[str, Any]]


HEADERS = {"avg_acc": "Avg acc", "avg_f1": "Avg F1"}


def average_columns(rows: Rows) -> list[str]:
    """The per-metric averages the rows carry (``avg_acc``, then the suite's other metrics, e.g. ``avg_f1``)."""
    return list(dict.fromkeys(k for r in rows.values() for k in r if k.startswith("avg_") and k != "avg_norm_acc"))


def percent(value: Any) -> float | None:
    """A score in % rounded to 2 decimals; None (printed '-') for a missing or non-finite score, never NaN."""
    if value is None or not math.isfinite(float(value)):
        return None
    return round(100 * float(value), 2)


def report_value(value: Any) -> str:
    """A method-report value in a table cell: floats to 3 decimals, anything else (a split name) as it is."""
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def table_records(rows: Rows, tasks: Sequence[str]) -> tuple[list[str], list[list[Any]]]:
    """Columns and values (accuracies in %) of the comparison table."""
    averages = average_columns(rows)
    columns = ["method", *tasks, *averages, "norm_acc", "params"]
    data = []
    for name, row in rows.items():
        scores = row["scores"]
        norm = row.get("avg_norm_acc")
        params = ", ".join(f"{k}={v}" for k, v in (row.get("params") or {}).items())
        computed = ", ".join(f"{k}={report_value(v)}" for k, v in (row.get("method_report") or {}).items())
        params = "; ".join(x for x in (params, computed) if x)
        data.append(
            [
                name,
                *[percent(scores[t]["acc"]) for t in tasks],
                *[percent(row.get(a)) for a in averages],
                percent(norm),
                params,
            ]
        )
    return columns, data


def markdown_table(rows: Rows, tasks: Sequence[str], title: str = "") -> str:
    """A markdown table: accuracy (%) per task, the average of each metric (accuracy, macro-F1...), normalized acc."""
    _columns, data = table_records(rows, tasks)
    averages = [HEADERS.get(a, "Avg " + a.removeprefix("avg_")) for a in average_columns(rows)]
    header = ["Method", *tasks, *averages, "Norm acc", "Chosen"]
    lines = [f"## {title}\n" if title else "", "| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 2) + ["---"]) + "|")
    for rec in data:
        cells = [rec[0]] + ["-" if v is None else f"{v:.2f}" for v in rec[1:-1]] + [rec[-1] or ""]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(x for x in lines if x) + "\n"


def csv_table(rows: Rows, tasks: Sequence[str]) -> str:
    """The same table as CSV."""
    columns, data = table_records(rows, tasks)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(columns)
    w.writerows(data)
    return buf.getvalue()


def subset_note(examples: float | None) -> str:
    """How a title says that a subset of each task was scored (the suite's ``max_eval_examples``, or lm-eval's
    ``limit``: a count, or a fraction < 1); empty when every example was."""
    if examples is None:
        return ""
    if examples < 1:
        return f" (first {100 * examples:g}% of each task's examples)"
    return f" (first {examples:g} examples per task)"


def bar_chart(rows: Rows, tasks: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Grouped bars: accuracy per task and on average, one bar per method, each labelled with its value ("n/a":
    no score). ``path`` without a suffix: in the :func:`~mergelab.io.atomic.figure_format` in force. Returns the
    path written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [*tasks, "average"]
    n = len(rows)
    width = 0.8 / max(n, 1)
    fig, ax = plt.subplots(figsize=(max(8, 1.4 * len(groups) + 0.25 * n), 4.5))
    cmap = plt.get_cmap("tab10")
    for i, (name, row) in enumerate(rows.items()):
        vals = [percent(row["scores"][t]["acc"]) for t in tasks] + [percent(row.get("avg_acc"))]
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, [v or 0.0 for v in vals], width=width, label=name, color=cmap(i % 10))
        # Upright labels while they fit beside each other, else turned (many methods make narrow bars).
        labels = ["n/a" if v is None else f"{v:.1f}" for v in vals]
        ax.bar_label(bars, labels, padding=2, fontsize=7 if n <= 3 else 6, rotation=0 if n <= 3 else 90)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=20, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 112)  # room above a 100 % bar for its label
    ax.set_yticks(range(0, 101, 20))
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=min(n, 4), loc="upper center", bbox_to_anchor=(0.5, -0.22))
    ax.grid(axis="y", alpha=0.3)
    written = atomic_save_figure(fig, path)
    plt.close(fig)
    return written


def write_reports(
    rows: Rows, tasks: Sequence[str], out_dir: str | Path, title: str, chart: bool, subset: float | None = None
) -> None:
    """results.md, results.csv and (optionally) the chart ``results.<figure format>`` in ``out_dir``; ``subset``:
    the examples scored per task when not all were (see :func:`subset_note`), stated in the title."""
    out = Path(out_dir)
    title += subset_note(subset)
    atomic_write_text(out / "results.md", markdown_table(rows, tasks, title))
    atomic_write_text(out / "results.csv", csv_table(rows, tasks))
    if chart:
        bar_chart(rows, tasks, out / "results", title)
