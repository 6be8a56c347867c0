"""Aggregating a ``-m`` sweep: one row per job, rewritten after every job and when the sweep ends.

Every job dir holds ``metrics.json`` (done) or ``failed.json`` (failed: the error in one line, written by the CLI),
or neither (unfinished, or killed). The summary lists every job with its status and one column per swept value.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from mergelab.io.atomic import atomic_save_figure, atomic_write_json, atomic_write_text, figure_format
from mergelab.reports.tables import GROUP_GAP, draw_heatmap, percent
from mergelab.suites.base import SPLITS  # a tuning objective is named <split>/avg_acc

log = logging.getLogger(__name__)

#: A sweep job's record of its failure (see :func:`mergelab.cli.fail`).
FAILED_FILE = "failed.json"


def _read(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """A job file's JSON, or why it could not be read (None, None when it does not exist)."""
    try:
        return json.loads(path.read_text()), None
    except FileNotFoundError:
        return None, None
    except (OSError, json.JSONDecodeError) as e:
        return None, f"unreadable {path.name}: {e}"


def _job_record(job: Path) -> dict[str, Any]:
    rec: dict[str, Any] = {"job": job.name}
    res, problem = _read(job / "metrics.json")
    if res is None:
        failed, failed_problem = _read(job / FAILED_FILE)
        if failed is not None:
            rec.update(status="failed", error=failed.get("message", ""))
            rec["overrides"] = " ".join(failed.get("overrides") or [])
        else:
            rec["status"] = problem or failed_problem or "no metrics.json (failed or unfinished)"
        return rec
    rec["status"] = "done"
    rec["overrides"] = " ".join(res.get("overrides") or [])
    objective = res.get("objective") or {}
    if objective.get("name") is not None:
        rec[objective["name"]] = objective.get("value")
    for name, row in (res.get("rows") or {}).items():
        for key in ("avg_acc", "avg_norm_acc"):
            if row.get(key) is not None:
                rec[f"{name}/{key}"] = row[key]
        if "scores" not in row:  # merge only: what the method computed is all there is
            for key, value in (row.get("method_report") or {}).items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    rec[f"{name}/{key}"] = value
    if res.get("merged_model"):
        rec["merged_model"] = res["merged_model"]
    return rec


def _overrides(rec: dict[str, Any]) -> dict[str, str]:
    pairs = (o.split("=", 1) for o in str(rec.get("overrides") or "").split() if "=" in o)
    return {k.lstrip("+~"): v for k, v in pairs}


def swept_keys(records: list[dict[str, Any]]) -> list[str]:
    """The override keys whose value differs between jobs (in first-seen order): the sweep's axes."""
    per_job = [_overrides(r) for r in records if r.get("overrides") is not None]
    keys = list(dict.fromkeys(k for o in per_job for k in o))
    return [k for k in keys if len({o.get(k) for o in per_job}) > 1]


def summarize(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One record per job dir under ``sweep_dir``: status, its overrides and one key per swept value, the
    objective and each row's averages (a merge-only row lists its method report instead), or the error."""
    jobs = [p for p in Path(sweep_dir).iterdir() if p.is_dir() and not p.name.startswith(".")]
    records = [_job_record(job) for job in sorted(jobs, key=lambda p: (len(p.name), p.name))]
    axes = swept_keys(records)
    for rec in records:
        values = _overrides(rec)
        for k in axes:
            if "overrides" in rec:
                rec[k] = values.get(k)
    return records


def _cell(key: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        # scores in % as in the results tables; other numbers (coefficients, lambdas) as they are
        return f"{100 * value:.2f}" if key.endswith("avg_acc") or key.endswith("avg_norm_acc") else f"{value:.4g}"
    return str(value).replace("|", "\\|")


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
    """What a job's label adds when it has no result: " (failed)" or " (unfinished)"."""
    return {"done": "", "failed": " (failed)"}.get(record["status"], " (unfinished)")


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


def write_summary(sweep_dir: str | Path) -> Path | None:
    """summary.json and summary.md (and the figure ``summary.<figure format>``: :func:`plot_summary`) in
    ``sweep_dir``; None when it holds no job dir."""
    out = Path(sweep_dir)
    if not out.is_dir():
        return None
    records = summarize(out)
    if not records:
        return None
    axes = swept_keys(records)
    results = [k for k in dict.fromkeys(k for r in records for k in r) if k not in ("job", "status", "overrides")]
    results = [k for k in results if k not in axes and k not in ("error", "merged_model")]
    columns = ["job", "status", *axes, *results, "error"]
    columns = [c for c in columns if any(c in r for r in records)]
    done = sum(r["status"] == "done" for r in records)
    lines = [f"{done} of {len(records)} job(s) done; scores in %.", ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in records:
        lines.append("| " + " | ".join(_cell(c, r.get(c)) for c in columns) + " |")
    atomic_write_text(out / "summary.md", "\n".join(lines) + "\n")
    atomic_write_json(out / "summary.json", records)
    plot_summary(records, axes, results, out / "summary")
    return out / "summary.md"


class SweepSummary(Callback):
    """Hydra callback: the sweep's summary, rewritten after each job (so a failed or killed sweep still has one)
    and at the end."""

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
            return
        sweep_dir = HydraConfig.get().sweep.dir
        try:
            with figure_format(config.get("figure_format")):
                write_summary(sweep_dir)
        except OSError as e:  # the summary must never fail a job
            log.warning("could not update the sweep summary in %s: %s", sweep_dir, e)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        with figure_format(config.get("figure_format")):
            path = write_summary(config.hydra.sweep.dir)
        if path is not None:
            log.info("sweep summary: %s\n%s", path, path.read_text())
