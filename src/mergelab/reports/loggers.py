"""Sending a run's config, metrics, results table and chart to Lightning loggers (wandb, CSV)."""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from mergelab.io.atomic import figure_format
from mergelab.reports.tables import table_records

#: The wandb key of the results chart (an image for a png, an HTML panel for an svg).
CHART_KEY = "results_chart"


def wandb_offline() -> bool:
    """Offline unless the user configured wandb (WANDB_MODE=online or an API key in the environment / netrc)."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode in ("offline", "dryrun", "disabled")
    if os.environ.get("WANDB_API_KEY"):
        return False
    netrc = Path.home() / ".netrc"
    return not (netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"))


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def row_metrics(split: str, name: str, row: Mapping[str, Any]) -> dict[str, float]:
    """One table row's ``split/row/task/metric`` scalars, averages, chosen grid point and method report; a missing
    or non-finite value is left out."""
    out: dict[str, float] = {}
    for task, scores in (row.get("scores") or {}).items():  # a merge-only run's rows have none
        for metric, value in scores.items():
            if _finite(value):
                out[f"{split}/{name}/{task}/{metric}"] = value
    for key in ("avg_acc", "avg_f1", "avg_norm_acc"):
        if _finite(row.get(key)):
            out[f"{split}/{name}/{key}"] = row[key]
    for pname, value in (row.get("params") or {}).items():
        if _finite(value):
            out[f"chosen/{name}/{pname}"] = float(value)
    for key, value in (row.get("method_report") or {}).items():
        if _finite(value):
            out[f"method/{name}/{key}"] = float(value)
    return out


def run_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """What a run knows only once it ends: its timings and objective (the rows are logged as they finish)."""
    out: dict[str, float] = {}
    for key, value in (results.get("timings") or {}).items():
        if _finite(value):
            out[f"timings/{key}"] = float(value)
    objective = results["objective"]
    if objective["name"] is not None and _finite(objective["value"]):  # no name: a merge-only run (eval=none)
        out[objective["name"]] = objective["value"]
    return out


def flat_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """Every row's :func:`row_metrics` plus :func:`run_metrics`: all a finished run's scalars."""
    out: dict[str, float] = {}
    for name, row in results["rows"].items():
        out.update(row_metrics(results["report_split"], name, row))
    return {**out, **run_metrics(results)}


def row_tuning_series(name: str, row: Mapping[str, Any]) -> list[dict[str, float]]:
    """One row's tuning curve: step i holds its i-th grid point's numeric options and scores."""
    steps: list[dict[str, float]] = []
    for point in row.get("tuning") or []:
        values = {f"tuning/{name}/{p}": float(v) for p, v in (point.get("params") or {}).items() if _finite(v)}
        values.update({f"tuning/{name}/{k}": float(v) for k, v in point.items() if k != "params" and _finite(v)})
        steps.append(values)
    return steps


def log_chart(logger: WandbLogger, chart: Path) -> None:
    """Send the results chart to a wandb run in its own format: a png as an image; an svg or pdf (which
    ``wandb.Image`` cannot read) as a file of the run (under ``files/``, uploaded now, or by ``wandb sync`` for an
    offline run), an svg also as an HTML panel that the wandb UI draws."""
    run = logger.experiment
    if chart.suffix == ".png":
        logger.log_image(key=CHART_KEY, images=[str(chart)])
        return
    # A copy inside the run's files dir rather than wandb's default symlink to it: an offline run synced later, after
    # the output dir was moved or copied, still holds the chart.
    files = Path(run.dir)
    shutil.copyfile(chart, files / chart.name)
    run.save(str(files / chart.name), base_path=str(files), policy="now")
    if chart.suffix == ".svg":
        import wandb

        run.log({CHART_KEY: wandb.Html(chart.read_text(encoding="utf-8"))})


def start(loggers: Sequence[Logger], cfg: DictConfig) -> None:
    """Log the resolved config to each logger, when the run starts (so a live run shows what it runs)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    for lg in loggers:
        lg.log_hyperparams(container)  # type: ignore[arg-type]
        lg.save()


def log_row(loggers: Sequence[Logger], split: str | None, name: str, row: Mapping[str, Any], step: int) -> None:
    """Log one finished table row (its scores, averages, chosen point and method report as step ``step``; its tuning
    curve as steps 0, 1, ..., one per grid point) and flush each logger (the CSV logger writes its file on save), so
    a live run's rows show as they come."""
    metrics = row_metrics(split or "merge", name, row)
    for lg in loggers:
        for i, values in enumerate(row_tuning_series(name, row)):
            lg.log_metrics(values, step=i)
        if metrics:
            lg.log_metrics(metrics, step=step)
        lg.save()


def finish(
    loggers: Sequence[Logger],
    results: Mapping[str, Any],
    table: tuple[list[str], list[list[Any]]] | None = None,
    chart: Path | None = None,
    step: int = 0,
) -> None:
    """Log what is known only at the end (timings, objective) and, to wandb, the results table and ``chart`` (png,
    svg or pdf: see :func:`log_chart`); close every logger."""
    if not loggers:
        return
    metrics = run_metrics(results)
    for lg in loggers:
        if metrics:
            lg.log_metrics(metrics, step=step)
        if isinstance(lg, WandbLogger):
            if table is not None:
                lg.log_table(key="results", columns=table[0], data=table[1])
            if chart is not None and chart.is_file():
                log_chart(lg, chart)
        lg.finalize("success")
    if any(isinstance(lg, WandbLogger) for lg in loggers):
        import wandb

        wandb.finish()


def log_run(
    loggers: Sequence[Logger], cfg: DictConfig, results: Mapping[str, Any], out_dir: Path, step: int = 0
) -> None:
    """Close a run's loggers with what only its end knows (:func:`finish`; its rows went out as they finished,
    :func:`log_row`): the table and the run's chart ``results.<figure_format>``."""
    scored = all("scores" in row for row in results["rows"].values())
    table = table_records(results["rows"], results["tasks"]) if scored else None
    with figure_format(cfg.get("figure_format")) as fmt:  # checked and normalised as the run wrote it
        chart = out_dir / f"results.{fmt}"
    finish(loggers, results, table, chart, step)
