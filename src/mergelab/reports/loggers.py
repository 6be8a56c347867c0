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


def flat_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """``row/task/metric`` scalars, plus averages and the objective; a missing or non-finite value is left out."""
    out: dict[str, float] = {}
    split = results["report_split"]
    for name, row in results["rows"].items():
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
    for key, value in (results.get("timings") or {}).items():
        if _finite(value):
            out[f"timings/{key}"] = float(value)
    objective = results["objective"]
    if objective["name"] is not None and _finite(objective["value"]):  # no name: a merge-only run (eval=none)
        out[objective["name"]] = objective["value"]
    return out


def tuning_series(results: Mapping[str, Any]) -> list[dict[str, float]]:
    """The tuning curve as step series: step i holds each row's i-th grid point (its numeric options and scores)."""
    steps: list[dict[str, float]] = []
    for name, row in results["rows"].items():
        for i, point in enumerate(row.get("tuning") or []):
            while len(steps) <= i:
                steps.append({})
            for pname, value in (point.get("params") or {}).items():
                if _finite(value):
                    steps[i][f"tuning/{name}/{pname}"] = float(value)
            for key, value in point.items():
                if key != "params" and _finite(value):
                    steps[i][f"tuning/{name}/{key}"] = float(value)
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


def send(
    loggers: Sequence[Logger],
    cfg: DictConfig,
    metrics: Mapping[str, float],
    table: tuple[list[str], list[list[Any]]] | None = None,
    chart: Path | None = None,
    series: Sequence[Mapping[str, float]] = (),
) -> None:
    """Log the resolved config, the step ``series`` (tuning curves), the metrics and (to wandb) a results table and
    ``chart`` (png, svg or pdf: see :func:`log_chart`); close every logger."""
    if not loggers:
        return
    container = OmegaConf.to_container(cfg, resolve=True)
    for lg in loggers:
        lg.log_hyperparams(container)  # type: ignore[arg-type]
        for step, values in enumerate(series):
            lg.log_metrics(values, step=step)
        lg.log_metrics(dict(metrics))
        if isinstance(lg, WandbLogger):
            if table is not None:
                lg.log_table(key="results", columns=table[0], data=table[1])
            if chart is not None and chart.is_file():
                log_chart(lg, chart)
        lg.finalize("success")
    if any(isinstance(lg, WandbLogger) for lg in loggers):
        import wandb

        wandb.finish()


def log_run(loggers: Sequence[Logger], cfg: DictConfig, results: Mapping[str, Any], out_dir: Path) -> None:
    """Log everything an evaluated run produced to each logger and close it; the chart is the run's
    ``results.<figure_format>``."""
    scored = all("scores" in row for row in results["rows"].values())
    table = table_records(results["rows"], results["tasks"]) if scored else None
    with figure_format(cfg.get("figure_format")) as fmt:  # checked and normalised as the run wrote it
        chart = out_dir / f"results.{fmt}"
    send(loggers, cfg, flat_metrics(results), table, chart, tuning_series(results))
