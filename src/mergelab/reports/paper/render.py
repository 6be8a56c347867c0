"""Rendering a :class:`~mergelab.reports.paper.matching.Report`: markdown, CSV and a bar chart, written atomically.

Cells read ``ours / paper`` when the table has published numbers (``*`` marks a paper value derived from its own
numbers rather than published), ``—`` where a number is missing; :func:`write_report` writes ``report.md``,
``report.csv`` and ``report.png`` and refuses to replace an earlier report unless asked."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path

from mergelab.io.atomic import atomic_save_figure, atomic_write_text, guard_output_dir
from mergelab.reports.paper.matching import Report, task_key
from mergelab.reports.paper.runs import Run, display, subset_line
from mergelab.reports.paper.schema import MISSING, PaperTable
from mergelab.reports.tables import SUBSET_COLUMN, subset_phrase

REPORT_FILES = ("report.md", "report.csv", "report.png")


def _fmt(value: float | None, decimals: int, sign: bool = False) -> str:
    if value is None:
        return MISSING
    return f"{value:+.{decimals}f}" if sign else f"{value:.{decimals}f}"


def _cell(ours: float | None, paper: float | None, decimals: int, published: bool, derived: bool = False) -> str:
    if not published:
        return _fmt(ours, decimals)
    return f"{_fmt(ours, decimals)} / {_fmt(paper, decimals)}{'*' if derived else ''}"


def _paper_line(table: PaperTable) -> str:
    if not table.paper:
        return "No published numbers: mergelab's own layout."
    p = table.paper
    bits = [
        str(p.get("authors", "")),
        str(p.get("venue") or p.get("year") or ""),
        f"arXiv:{p['arxiv']}" if p.get("arxiv") else "",
    ]
    return f"Paper: {p.get('title', '?')} ({', '.join(b for b in bits if b)})"


def _runs_line(runs: Sequence[Run]) -> str:
    if len(runs) <= 4:
        return ", ".join(display(r.path) for r in runs)
    # A sweep's many jobs: their count and common parent (each row's own run is listed under "Rows used").
    return f"{len(runs)} runs under {display(Path(os.path.commonpath([r.path.resolve() for r in runs])))}"


def _subset_title(report: Report) -> str:
    """`` (ours on a subset: at most N examples per task)`` for a title when the runs scored a subset of each
    task (see :func:`~mergelab.reports.paper.runs.subset_line`), else empty."""
    subset = next((r.subset for r in report.runs if r.subset), None)
    return f" (ours on a subset: {subset_phrase(subset[1])})" if subset is not None else ""


def markdown_report(report: Report) -> str:
    """The report as markdown: the table (``ours / paper`` cells when the table has published numbers), then
    where each row came from and which task each column is."""
    t = report.table
    published = t.has_published
    norm = report.definition != "none"
    d, nd = t.decimals, t.normalized_decimals
    header = ["Method", *(task.name for task in t.tasks), "Avg"]
    if published:
        header.append("Δ avg")
    if norm:
        header.append(f"Norm. avg ({report.definition})")
        if published:
            header.append("Δ norm.")
    subset = subset_line(report.runs)
    lines = [
        f"## {t.title}" + (" — ours / paper" if published else "") + _subset_title(report),
        "",
        _paper_line(t),
        f"Model (as published): {t.model}" if t.paper and t.model else f"Model: {t.model}",
        f"Metric: {t.metric}; runs: {_runs_line(report.runs)}"
        f" (suite {report.runs[0].results.get('suite', '?')}, {report.runs[0].results.get('report_split', '?')} split"
        + (f"; {subset}" if subset else "")
        + ")",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for r in report.rows:
        cells = [r.method.name]
        cells += [_cell(r.ours[task.name], r.paper[task.name], d, published) for task in t.tasks]
        cells.append(_cell(r.ours_average, r.paper_average, d, published))
        if published:
            cells.append(_fmt(r.diff_average, d, sign=True))
        if norm:
            cells.append(_cell(r.ours_normalized, r.paper_normalized, nd, published, r.paper_normalized_derived))
            if published:
                cells.append(_fmt(r.diff_normalized, nd, sign=True))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"{MISSING}: missing (not published, or not in the runs). Averages are over the table's tasks only.")
    if norm:
        paper_def = "" if report.definition == t.normalized else f"; the paper's own definition is {t.normalized}"
        lines.append(f"Norm. avg ({report.definition}) is computed from each row's own run's experts row{paper_def}.")
    if any(r.paper_normalized_derived for r in report.rows):
        lines.append(
            "*: derived from the paper's published numbers under this definition; the paper does not print it."
        )
    renamed = [f"{p} = {c}" for p, c in report.task_columns.items() if c is not None and task_key(c) != task_key(p)]
    missing = [p for p, c in report.task_columns.items() if c is None]
    if renamed:
        lines.append(f"Tasks: {', '.join(renamed)}.")
    if missing:
        lines.append(f"Tasks the runs lack: {', '.join(missing)}.")
    lines += ["", "Rows used:", ""]
    for r in report.rows:
        where = r.source or f"{MISSING} (no run row" + (
            f" named {' / '.join(r.method.rows)})" if r.method.rows else "; mergelab has no such method)"
        )
        lines.append(f"- {r.method.name}: {where}" + (f" ({r.note})" if r.note else ""))
    if report.unused:
        by_row: dict[str, list[str]] = {}
        for label in report.unused:
            run, _, row = label.rpartition(":")
            by_row.setdefault(row, []).append(run)
        unused = [f"{row} ({runs[0] if len(runs) == 1 else f'{len(runs)} runs'})" for row, runs in by_row.items()]
        lines += ["", f"Run rows not in this table: {', '.join(unused)}."]
    return "\n".join(lines) + "\n"


def csv_report(report: Report) -> str:
    """The report as CSV: one line per method, ``ours`` and ``paper`` columns per task and average, empty = missing."""
    t = report.table
    header = ["method", "mergelab_method", "source"]
    for task in t.tasks:
        header += [f"{task.name} ours", f"{task.name} paper"]
    header += ["avg ours", "avg paper", "avg diff"]
    header += ["norm ours", "norm paper", "norm paper derived", "norm diff", "norm definition"]
    subset = next((r.subset for r in report.runs if r.subset), None)
    if subset is not None:  # ours on a subset of each task's examples: every line says so
        header.append(SUBSET_COLUMN)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)

    def num(v: float | None) -> str:
        return "" if v is None else f"{v:.6g}"

    for r in report.rows:
        line = [r.method.name, r.method.method or "", r.source or ""]
        for task in t.tasks:
            line += [num(r.ours[task.name]), num(r.paper[task.name])]
        line += [num(r.ours_average), num(r.paper_average), num(r.diff_average)]
        line += [num(r.ours_normalized), num(r.paper_normalized), str(r.paper_normalized_derived).lower()]
        line += [num(r.diff_normalized), report.definition]
        if subset is not None:
            line.append(subset_phrase(subset[1]))
        w.writerow(line)
    return buf.getvalue()


def plot_report(report: Report, path: str | Path) -> None:
    """Grouped bars per method, ours next to the paper's: the average and (when defined) the normalized average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = report.table
    panels = [("average", "ours_average", "paper_average", f"{t.metric} (average over the table's tasks)")]
    if report.definition != "none":
        unit = "%" if t.normalized_unit == "percent" else "ratio"
        panels.append(("normalized", "ours_normalized", "paper_normalized", f"normalized average ({unit})"))
    n = len(report.rows)
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(7.0, 1.1 * n + 2), 3.6 * len(panels)), squeeze=False)
    series = [("ours", 0)] + ([("paper", 1)] if t.has_published else [])
    width = 0.8 / len(series)
    for ax, (_title, ours_attr, paper_attr, ylabel) in zip(axes[:, 0], panels, strict=True):
        for label, i in series:
            attr = ours_attr if label == "ours" else paper_attr
            vals = [getattr(r, attr) for r in report.rows]
            xs = [x + (i - (len(series) - 1) / 2) * width for x in range(n)]
            bars = ax.bar(xs, [0.0 if v is None else v for v in vals], width=width, label=label, color=f"C{i}")
            for x, v, bar, r in zip(xs, vals, bars, report.rows, strict=True):
                # A missing value is drawn as a label, never as a zero-height bar that reads as a score of 0.
                if v is None:
                    ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90, color=f"C{i}")
                elif attr == "paper_normalized" and r.paper_normalized_derived:
                    bar.set_hatch("//")  # derived from the paper's numbers, not printed in it
        ax.set_xticks(range(n))
        ax.set_xticklabels([r.method.name for r in report.rows], rotation=20, ha="right")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0, 0].set_title(t.title + _subset_title(report), fontsize=10)
    fig.tight_layout()
    atomic_save_figure(fig, path)
    plt.close(fig)


def write_report(report: Report, out_dir: str | Path, overwrite: bool = False) -> list[Path]:
    """Write ``report.md``, ``report.csv`` and ``report.png`` into ``out_dir`` (atomically); refuse to replace an
    earlier report unless ``overwrite``."""
    out = Path(out_dir)
    try:
        guard_output_dir(out, overwrite, REPORT_FILES)
    except FileExistsError:
        held = [n for n in REPORT_FILES if (out / n).exists()]
        raise FileExistsError(f"{out} already holds {held}; pass --out with another dir, or --overwrite") from None
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.md", markdown_report(report))
    atomic_write_text(out / "report.csv", csv_report(report))
    plot_report(report, out / "report.png")
    return [out / n for n in REPORT_FILES]
