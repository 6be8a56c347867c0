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


def plot_objective(records: list[dict[str, Any]], axis: str, objective: str, path: Path) -> bool:
    """The objective against the one swept value, when that value is numeric; False when there is nothing to plot.

    ``path`` without a suffix: in the :func:`~mergelab.io.atomic.figure_format` in force."""
    points = []
    for r in records:
        try:
            x, y = float(r.get(axis)), float(r.get(objective))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        if math.isfinite(x) and math.isfinite(y):
            points.append((x, 100 * y))
    if len(points) < 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points.sort()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
    ax.set_xlabel(axis)
    ax.set_ylabel(f"{objective} (%)")
    ax.grid(alpha=0.3)
    atomic_save_figure(fig, path)
    plt.close(fig)
    return True


def write_summary(sweep_dir: str | Path) -> Path | None:
    """summary.json and summary.md (and the plot ``summary.<figure format>`` for one numeric swept value) in
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
    objective = next((k for k in results if k.endswith("/avg_acc") and "/" in k and k.split("/")[0] in SPLITS), None)
    if len(axes) == 1 and objective is not None:
        plot_objective(records, axes[0], objective, out / "summary")
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
