"""Paper-style result tables (markdown, CSV) and the table's figure: a heatmap of methods x tasks."""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergelab.io.atomic import atomic_save_figure, atomic_write_text

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.cm import ScalarMappable
    from matplotlib.figure import Figure

# rows: name -> {"scores": {task: {"acc", ...}}, "avg_acc": float, "avg_<metric>": ..., "avg_norm_acc": float | None,
#                "params": {}, "tuning": [...] (tuned rows), "method_report": {} (what the method computed)}
Rows = Mapping[str, Mapping[str, Any]]


HEADERS = {"avg_acc": "Avg acc", "avg_f1": "Avg F1"}

#: Rows that are no merge but what merges are measured against: shown apart from the methods in the figure.
REFERENCE_ROWS = ("pretrained", "experts")

#: A row scoring each task's own model alone (e.g. AWD's retention, ``awd_ta (single-task)``): a reference too.
SINGLE_TASK_SUFFIX = "(single-task)"

#: Method-report keys of learned per-task coefficients (AdaMerging's ``lambda_<task>``, MetaGPT's
#: ``lambda/<task>`` or ``lambda_mean/<task>``); the prefix before the task is group 1.
LEARNED_KEY = re.compile(r"(lambda(?:_mean)?[/_])")

#: At most this many learned coefficients are listed in the Chosen column; more are summarised by their range.
MAX_LEARNED_SHOWN = 4

#: The heatmaps' colormap: perceptually uniform, so equal steps in score look like equal steps in colour.
CMAP = "viridis"


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


def tuned_params(row: Mapping[str, Any]) -> dict[str, Any]:
    """The grid point that tuning chose for a row; empty when nothing was tuned.

    ``row["chosen"]`` when the run states it; else the row's ``params`` when the row has a ``tuning`` record (run.py
    then sets ``params`` to the chosen grid point: a row built as configured has every option there instead, and
    no ``tuning``).
    """
    chosen = row.get("chosen")
    if isinstance(chosen, Mapping):
        return dict(chosen)
    return dict(row.get("params") or {}) if row.get("tuning") else {}


def learned_summary(report: Mapping[str, Any] | None) -> str:
    """The per-task coefficients a method learned (see :data:`LEARNED_KEY`), in a few words: each one when there
    are at most :data:`MAX_LEARNED_SHOWN`, else their count and range; empty when it reports none."""
    learned = {
        k: float(v)
        for k, v in (report or {}).items()
        if LEARNED_KEY.match(k) and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }
    if not learned:
        return ""
    if len(learned) <= MAX_LEARNED_SHOWN:
        return ", ".join(f"{k}={report_value(v)}" for k, v in learned.items())
    match = LEARNED_KEY.match(next(iter(learned)))
    assert match is not None
    lo, hi = min(learned.values()), max(learned.values())
    return f"{len(learned)} learned {match.group(1)}* in [{lo:.3f}, {hi:.3f}] (see metrics.json)"


def chosen_summary(row: Mapping[str, Any]) -> str:
    """The table's Chosen cell: what tuning chose (:func:`tuned_params`) and what the method learned
    (:func:`learned_summary`); a method's full options stay in metrics.json."""
    tuned = ", ".join(f"{k}={v}" for k, v in tuned_params(row).items())
    return "; ".join(x for x in (tuned, learned_summary(row.get("method_report"))) if x)


def task_score(row: Mapping[str, Any], task: str) -> float | None:
    """A row's accuracy on ``task`` in % (None: not scored there, e.g. a single-task row without that task)."""
    return percent((row.get("scores") or {}).get(task, {}).get("acc"))


def table_records(rows: Rows, tasks: Sequence[str]) -> tuple[list[str], list[list[Any]]]:
    """Columns and values (accuracies in %) of the comparison table; the last column is :func:`chosen_summary`."""
    averages = average_columns(rows)
    columns = ["method", *tasks, *averages, "norm_acc", "chosen"]
    data = []
    for name, row in rows.items():
        data.append(
            [
                name,
                *[task_score(row, t) for t in tasks],
                *[percent(row.get(a)) for a in averages],
                percent(row.get("avg_norm_acc")),
                chosen_summary(row),
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
        # A "|" inside a cell (a regex option value) would end the cell.
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(x for x in lines if x) + "\n"


def csv_table(rows: Rows, tasks: Sequence[str], subset: float | None = None) -> str:
    """The same table as CSV; scored on a subset (see :func:`subset_phrase`), a last column :data:`SUBSET_COLUMN`
    says so on every row."""
    columns, data = table_records(rows, tasks)
    if subset is not None:
        columns = [*columns, SUBSET_COLUMN]
        data = [[*rec, subset_phrase(subset)] for rec in data]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(columns)
    w.writerows(data)
    return buf.getvalue()


#: The CSV column (added only then) that says a table's scores are on a subset of each task's examples.
SUBSET_COLUMN = "eval_subset"

#: The config keys that score a subset of each task's examples: the mergelab suites' seeded sample of
#: ``eval.max_eval_examples`` examples, lm-eval's first ``eval.limit`` examples (a fraction < 1: that share).
SUBSET_KEYS = ("max_eval_examples", "limit")


def subset_phrase(examples: float | None) -> str:
    """What was scored of each task when not every example was (the suite's ``max_eval_examples`` or lm-eval's
    ``limit``: a count, or a fraction < 1), in words true of both (a task smaller than the count is scored whole);
    empty when every example was."""
    if examples is None:
        return ""
    if examples < 1:
        return f"{100 * examples:g}% of each task's examples"
    return f"at most {examples:g} examples per task"


def subset_note(examples: float | None) -> str:
    """How a title says that its scores are on a subset of each task (see :func:`subset_phrase`); empty when every
    example was scored."""
    return f" (subset: {subset_phrase(examples)})" if examples is not None else ""


def eval_subset(config: Mapping[str, Any] | None) -> tuple[str, float] | None:
    """``(key, value)`` of the setting in a run's resolved config that scored a subset of each task
    (``eval.max_eval_examples`` or ``eval.limit``, see :data:`SUBSET_KEYS`); None when every example was scored or
    the run scored nothing."""
    suite = (config or {}).get("eval")
    if not isinstance(suite, Mapping):
        return None
    for key in SUBSET_KEYS:
        value = suite.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return f"eval.{key}", value
    return None


# ------------------------------------------------------------------------------------------------ heatmaps


def is_reference(name: str) -> bool:
    """Whether a row is a reference (pretrained, experts, a single-task row) rather than a merge method."""
    return name in REFERENCE_ROWS or name.endswith(SINGLE_TASK_SUFFIX)


def chart_order(rows: Rows) -> tuple[list[str], list[str]]:
    """The figure's rows: the references (pretrained and experts first, then single-task rows, in table order) and
    the methods by average accuracy, best first (ties in table order; a row without an average last)."""
    refs = [n for n in REFERENCE_ROWS if n in rows] + [n for n in rows if is_reference(n) and n not in REFERENCE_ROWS]
    methods = [n for n in rows if not is_reference(n)]
    avg = {n: percent(rows[n].get("avg_acc")) for n in methods}
    methods.sort(key=lambda n: (avg[n] is None, -(avg[n] or 0.0)))  # stable: ties keep the table's order
    return refs, methods


def text_colour(rgba: Sequence[float]) -> str:
    """Black or white, whichever contrasts more with a cell of colour ``rgba`` (WCAG relative luminance)."""

    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(c) for c in rgba[:3])
    lum = 0.2126 * r + 0.7152 * g + 0.0722 * b
    return "black" if (lum + 0.05) / 0.05 >= 1.05 / (lum + 0.05) else "white"


#: How a cell without a value is drawn (and labelled): hatched grey, so it is never read as a low score.
MISSING_FACE, MISSING_HATCH, MISSING_TEXT = "#f0f0f0", "///", "n/a"


def draw_heatmap(
    ax: Axes,
    values: Sequence[Sequence[float | None]],
    xs: Sequence[float],
    ys: Sequence[float],
    *,
    fontsize: float = 8.5,
    bold_columns: Sequence[int] = (),
    show_values: bool = True,
    vmin: float = 0.0,
    vmax: float = 100.0,
) -> ScalarMappable:
    """Cells ``values[i][j]`` (scores in %) centred at ``(xs[j], ys[i])``, each 1 x 1, coloured on :data:`CMAP`
    over ``[vmin, vmax]`` with its value printed (2 decimals, as in the tables) in black or white for contrast; a
    None is a hatched grey "n/a" cell. Returns the mappable for a colorbar. ``ys`` grow downwards (the caller
    inverts the axis), so gaps between groups are gaps in ``xs``/``ys``."""
    import matplotlib
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    mappable = ScalarMappable(Normalize(vmin, vmax), matplotlib.colormaps[CMAP])
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            x, y = xs[j] - 0.5, ys[i] - 0.5
            weight = "bold" if j in bold_columns else "normal"
            if value is None:
                ax.add_patch(Rectangle((x, y), 1, 1, facecolor=MISSING_FACE, edgecolor="#bbbbbb", hatch=MISSING_HATCH))
                colour, label = "#555555", MISSING_TEXT  # grey, still readable on the grey cell
            else:
                face = mappable.to_rgba(value)
                ax.add_patch(Rectangle((x, y), 1, 1, facecolor=face, edgecolor="none"))
                colour, label = text_colour(face), f"{value:.2f}"
            # A white border between cells (drawn on top: a hatched cell's edge colour is its hatch's).
            ax.add_patch(Rectangle((x, y), 1, 1, fill=False, edgecolor="white", linewidth=1.5))
            if show_values:
                ax.text(xs[j], ys[i], label, ha="center", va="center", fontsize=fontsize, color=colour, weight=weight)
    ax.set_xlim(min(xs, default=0) - 0.5, max(xs, default=0) + 0.5)
    ax.set_ylim(max(ys, default=0) + 0.5, min(ys, default=0) - 0.5)  # first row at the top
    for side in ax.spines.values():
        side.set_visible(False)
    ax.tick_params(length=0)
    return mappable


#: Vertical space between the reference rows and the methods, and horizontal space before the average column
#: (in cells).
GROUP_GAP = 0.45


def results_figure(rows: Rows, tasks: Sequence[str], title: str = "") -> Figure:
    """The table's figure: a heatmap of accuracy (%) with one row per table row and one column per task, then the
    average (set apart, values in bold); the references (:func:`is_reference`, italic grey labels) on top, apart
    from the methods, which follow sorted by average (:func:`chart_order`); a task a row was not scored on is a
    hatched "n/a" cell."""
    from matplotlib.figure import Figure

    refs, methods = chart_order(rows)
    names = refs + methods
    ys = [float(i) for i in range(len(refs))]
    ys += [len(refs) + (GROUP_GAP if refs else 0.0) + i for i in range(len(methods))]
    xs = [float(j) for j in range(len(tasks))] + [len(tasks) + GROUP_GAP]
    values = [[task_score(rows[n], t) for t in tasks] + [percent(rows[n].get("avg_acc"))] for n in names]
    longest = max((len(n) for n in names), default=8)
    # Inches: ~0.95 per column, ~0.34 per row, room for the labels, the column heads, the title and a colorbar.
    width = 1.8 + 0.075 * longest + 0.95 * (len(xs) + GROUP_GAP)
    height = 1.9 + 0.34 * (ys[-1] + 1 if ys else 1)
    fig = Figure(figsize=(max(6.0, width), height), layout="constrained")
    ax = fig.add_subplot()
    mappable = draw_heatmap(ax, values, xs, ys, bold_columns=[len(tasks)])
    ax.set_yticks(ys, names, fontsize=9)
    for label, name in zip(ax.get_yticklabels(), names, strict=True):
        if is_reference(name):
            label.set_fontstyle("italic")
            label.set_color("#666666")
    ax.xaxis.tick_top()
    turned = max((len(t) for t in tasks), default=0) > 10  # long task names would run into each other
    ax.set_xticks(xs, [*tasks, "average"], fontsize=9, rotation=30 if turned else 0, ha="left" if turned else "center")
    ax.get_xticklabels()[-1].set_fontweight("bold")
    if refs and methods:  # a rule through the gap between the references and the methods
        ax.axhline(len(refs) - 0.5 + GROUP_GAP / 2, color="#999999", linewidth=0.8)
    ax.set_aspect("auto")
    colorbar = fig.colorbar(mappable, ax=ax, fraction=0.04, pad=0.02, aspect=max(8, 2 * len(names)))
    colorbar.set_label("accuracy (%)")
    note = "methods sorted by average, best first"
    if refs:
        note = "references in italics on top; " + note
    if any(v is None for row in values for v in row):
        note += "; hatched: not scored"
    ax.set_xlabel(note, fontsize=8, color="#555555")
    ax.set_title(title)
    return fig


def results_chart(rows: Rows, tasks: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Save :func:`results_figure`. ``path`` without a suffix: in the :func:`~mergelab.io.atomic.figure_format` in
    force. Returns the path written."""
    return atomic_save_figure(results_figure(rows, tasks, title), path)


def write_reports(
    rows: Rows, tasks: Sequence[str], out_dir: str | Path, title: str, chart: bool, subset: float | None = None
) -> None:
    """results.md, results.csv and (optionally) the chart ``results.<figure format>`` in ``out_dir``; ``subset``:
    the examples scored per task when not all were (see :func:`subset_phrase`), stated in the table's and the chart's
    title and in the CSV's :data:`SUBSET_COLUMN`."""
    out = Path(out_dir)
    title += subset_note(subset)
    atomic_write_text(out / "results.md", markdown_table(rows, tasks, title))
    atomic_write_text(out / "results.csv", csv_table(rows, tasks, subset))
    if chart:
        results_chart(rows, tasks, out / "results", title)
