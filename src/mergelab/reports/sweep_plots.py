"""The figure of a sweep's summary (:func:`plot_summary`): the objective against one swept value, a heatmap of it
over two, or a heatmap of jobs x scores."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mergelab.io.atomic import atomic_save_figure
from mergelab.reports.sweep import DONE, FAILED, INTERRUPTED, NOT_STARTED, RUNNING
from mergelab.reports.tables import GROUP_GAP, draw_heatmap, percent
from mergelab.suites.base import SPLITS  # a tuning objective is named <split>/avg_acc


def _number(value: Any) -> float | None:
    """``value`` as a finite float (a swept value is a string from the command line), else None."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _sorted_values(values: list[Any]) -> list[Any]:
    """Distinct swept values: in numeric order when every one is a number, else in first-seen order."""
    distinct = list(dict.fromkeys(values))
    if all(_number(v) is not None for v in distinct):
        return sorted(distinct, key=float)
    return distinct


def _short(text: str, limit: int = 48) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _unscored(record: dict[str, Any]) -> str:
    """What a job's label adds when it has no result: its status (" (failed)", " (not started)", ...)."""
    status = record["status"]
    if status == DONE:
        return ""
    return f" ({status})" if status in (FAILED, INTERRUPTED, RUNNING, NOT_STARTED) else " (unfinished)"


def plot_objective(records: list[dict[str, Any]], axis: str, objective: str, path: Path) -> bool:
    """The objective against the one swept value, when that value is numeric: one line (its only series), the
    best point named; False when there is nothing to plot.

    ``path`` without a suffix: in the :func:`~mergelab.io.atomic.figure_format` in force."""
    points = []
    for r in records:
        x, y = _number(r.get(axis)), _number(r.get(objective))
        if x is not None and y is not None:
            points.append((x, 100 * y))
    if len(points) < 2:
        return False
    from matplotlib.figure import Figure

    points.sort()
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color="C0")
    bx, by = max(points, key=lambda p: p[1])
    ax.annotate(
        f"best {by:.2f} at {bx:g}", (bx, by), xytext=(0, 8), textcoords="offset points", ha="center", fontsize=8
    )
    ax.margins(y=0.15)  # room above the best point for its label
    ax.set_xlabel(axis)
    ax.set_ylabel(f"{objective} (%)")
    ax.grid(alpha=0.3)
    atomic_save_figure(fig, path)
    return True


def plot_objective_grid(records: list[dict[str, Any]], axes: list[str], objective: str, path: Path) -> bool:
    """For two swept values: a heatmap of the objective (%), the first value down, the second across, each cell
    printed, the best outlined, a job without a result hatched "n/a". False when there is nothing to plot or a pair
    of values occurs twice (then :func:`plot_jobs` shows every job).

    ``path`` without a suffix: in the :func:`~mergelab.io.atomic.figure_format` in force."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    ykey, xkey = axes
    swept = [r for r in records if r.get(ykey) is not None and r.get(xkey) is not None]
    pairs = [(str(r[ykey]), str(r[xkey])) for r in swept]
    if not swept or len(set(pairs)) < len(pairs):
        return False
    scores = {pair: percent(r.get(objective)) for pair, r in zip(pairs, swept, strict=True)}
    if all(v is None for v in scores.values()):
        return False
    ys, xs = _sorted_values([p[0] for p in pairs]), _sorted_values([p[1] for p in pairs])
    values = [[scores.get((y, x)) for x in xs] for y in ys]
    fig = Figure(figsize=(max(5.0, 2.2 + 0.9 * len(xs)), 1.8 + 0.45 * len(ys)), layout="constrained")
    ax = fig.add_subplot()
    mappable = draw_heatmap(ax, values, range(len(xs)), range(len(ys)), show_values=len(xs) * len(ys) <= 600)
    best = max(((v, i, j) for i, row in enumerate(values) for j, v in enumerate(row) if v is not None))
    ax.add_patch(Rectangle((best[2] - 0.45, best[1] - 0.45), 0.9, 0.9, fill=False, edgecolor="black", linewidth=2))
    ax.set_xticks(range(len(xs)), xs, rotation=30 if max(len(x) for x in xs) > 6 else 0)
    ax.set_yticks(range(len(ys)), ys)
    ax.set_xlabel(f"{xkey}\n(outlined: best; hatched: no result)")
    ax.set_ylabel(ykey)
    fig.colorbar(mappable, ax=ax, fraction=0.05, pad=0.02).set_label(f"{objective} (%)")
    atomic_save_figure(fig, path)
    return True


def score_columns(results: list[str], objective: str | None) -> list[str]:
    """The summary's columns shown in :func:`plot_jobs`: the objective, then each row's average accuracy."""
    return [*([objective] if objective else []), *(k for k in results if k.endswith("/avg_acc") and k != objective)]


def plot_jobs(
    records: list[dict[str, Any]], axes: list[str], columns: list[str], path: Path, objective: str | None = None
) -> bool:
    """A heatmap of jobs (rows, in job order, named by their number and swept values: the keys head the rows) x
    ``columns`` (scores in %: the ``objective`` first, set apart, then rows' averages, headed by the row), each cell
    printed while they fit; the best job on the first column in bold; a job without a score hatched "n/a". False
    when no job has a score.

    ``path`` without a suffix: in the :func:`~mergelab.io.atomic.figure_format` in force."""
    from matplotlib.figure import Figure

    values = [[percent(r.get(c)) for c in columns] for r in records]
    if not columns or all(v is None for row in values for v in row):
        return False
    # Values only (the keys name the axis once), so that a long key never truncates what tells jobs apart.
    labels = [_short(f"#{r['job']}  " + ", ".join(str(r.get(k)) for k in axes)) + _unscored(r) for r in records]
    heads = [f"{c} (objective)" if c == objective else c.removesuffix("/avg_acc") for c in columns]
    xs = [j + (GROUP_GAP if objective and j else 0.0) for j in range(len(columns))]
    dense = len(records) > 60 or len(columns) > 30  # past that, printed values would overlap: colour only
    firsts = [(v[0], -i) for i, v in enumerate(values) if v[0] is not None]
    best = -max(firsts)[1] if firsts else None
    longest = max(len(x) for x in labels)
    height = 1.9 + (0.18 if dense else 0.3) * len(records)
    fig = Figure(figsize=(max(6.0, 2.0 + 0.07 * longest + 0.9 * (len(columns) + 1)), height), layout="constrained")
    ax = fig.add_subplot()
    mappable = draw_heatmap(ax, values, xs, range(len(records)), fontsize=8, show_values=not dense)
    ax.set_yticks(range(len(records)), labels, fontsize=7 if dense else 8.5)
    ax.set_ylabel("job  " + ", ".join(axes))
    for i, (label, r) in enumerate(zip(ax.get_yticklabels(), records, strict=True)):
        if i == best:
            label.set_fontweight("bold")
        if r["status"] != "done":
            label.set_color("#888888")
    ax.xaxis.tick_top()
    ax.set_xticks(xs, heads, rotation=30, ha="left", fontsize=8.5)
    note = "bold: best on the first column; hatched: no score"
    if len(columns) > (1 if objective else 0):
        note = "after the objective: each table row's average accuracy; " + note
    ax.set_xlabel(note, fontsize=8, color="#555555")
    fig.colorbar(mappable, ax=ax, fraction=0.04, pad=0.02).set_label("accuracy (%)")
    atomic_save_figure(fig, path)
    return True


def plot_summary(records: list[dict[str, Any]], axes: list[str], results: list[str], path: Path) -> bool:
    """The sweep's figure: for one numeric swept value the objective against it (:func:`plot_objective`), for two
    a heatmap of the objective over both (:func:`plot_objective_grid`), otherwise (a non-numeric value, more
    values, or those plots had nothing to show) a heatmap of jobs x scores (:func:`plot_jobs`). False when none
    applies (nothing swept, or no job has a score: a merge-only sweep)."""
    if not axes:
        return False
    objective = next((k for k in results if k.endswith("/avg_acc") and k.split("/")[0] in SPLITS), None)
    if objective is not None and len(axes) == 1 and plot_objective(records, axes[0], objective, path):
        return True
    if objective is not None and len(axes) == 2 and plot_objective_grid(records, axes, objective, path):
        return True
    return plot_jobs(records, axes, score_columns(results, objective), path, objective)
