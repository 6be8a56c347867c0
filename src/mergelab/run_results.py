"""A run's last stage, on rank 0: the merged model with its provenance, then ``metrics.json`` (one schema for every
run), the resolved config, the tables and the loggers; a run with failed rows ends with their error."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mergelab.errors import TableRowsFailed
from mergelab.io.atomic import atomic_write_json, atomic_write_text
from mergelab.overrides import job_overrides
from mergelab.provenance.recipe import MergeRecord, write_provenance
from mergelab.run_state import RunSetup, TableProgress

#: The results' console lines are the run's (the logger name is part of each line).
log = logging.getLogger("mergelab.run")


def write_merged_model(setup: RunSetup, progress: TableProgress) -> Path | None:
    """The last row's merge written to ``merged_model`` with ``save_merged=true`` (a pool not held in memory always
    writes it: a streamed merge is the run's product), its recipe, card and MergeKit config inside it before it is
    moved into place; None when none is written."""
    cfg, name = setup.cfg, progress.last
    if progress.kept is None or not (cfg.save_merged or not setup.pool.in_memory):
        return None
    rows = setup.live.rows
    record = MergeRecord(
        config=OmegaConf.to_container(cfg, resolve=True),  # type: ignore[arg-type]
        overrides=job_overrides(list(cfg.overrides)) if cfg.get("overrides") is not None else None,
        name=name,
        method_config=OmegaConf.to_container(setup.method_cfgs[name], resolve=True),  # type: ignore[arg-type]
        grid_point=dict(rows[name].get("params") or {}) if len(setup.candidates[name]) > 1 else None,
        method=progress.chosen[name],
        pool=setup.pool,
        rows=rows,
        tasks=setup.columns,
        suite=setup.suite.name if setup.suite is not None else None,
        split=setup.report,
        tune_split=setup.tune_split,
    )
    return progress.kept.write(
        setup.out_dir / "merged_model", overwrite=bool(cfg.overwrite), finish=lambda d: write_provenance(d, record)
    )


def run_metrics(setup: RunSetup, progress: TableProgress, merged_path: Path | None) -> dict[str, Any]:
    """The content of ``metrics.json``: every row, the objective, timings, precisions and the run's merged model."""
    suite, pool, last = setup.suite, setup.pool, progress.last
    merged_row = setup.live.rows[last]
    return {
        "suite": suite.name if suite is not None else None,
        "report_split": setup.report,
        "tune_split": setup.tune_split,
        "tasks": setup.columns,
        "experts": pool.resolved,
        **({} if setup.columns == pool.tasks else {"expert_of": pool.expert_of}),
        "rows": setup.live.rows,
        "objective": {
            "name": f"{setup.tune_split}/avg_acc" if suite is not None else None,
            "value": progress.objective if suite is not None else None,
        },
        "timings": progress.timings,
        # Lightning's precision of the reported scores and of tuning's (see TuningOptions).
        "precision": {
            "report": setup.trainer_kwargs.get("precision"),
            "tune": setup.tune_kwargs.get("precision") if suite is not None else None,
            "tuning_strategy": setup.tuning.strategy,
        },
        "overrides": list(setup.cfg.get("overrides") or []),
        # The run's merged model (the last row's), also where the objective comes from.
        "method": last,
        "params": merged_row.get("params") or {},
        "method_report": progress.chosen[last].report(),
        "scores": merged_row.get("scores"),
        "avg_acc": merged_row.get("avg_acc"),
        "merged_model": str(merged_path) if merged_path is not None else None,
        # Table rows whose method raised (name -> error): left out of the rows, the run then exits with an error.
        "failed_rows": progress.failed,
    }


def publish_results(setup: RunSetup, progress: TableProgress, merged_path: Path | None) -> None:
    """Write the methods' artifacts, ``config.yaml``, the final tables and ``metrics.json`` (last: it marks a
    finished run), send the results to the loggers and show them; raise :class:`TableRowsFailed` if rows failed."""
    out_dir, cfg, last = setup.out_dir, setup.cfg, progress.last
    results = run_metrics(setup, progress, merged_path)
    for name, method in progress.chosen.items():
        method.save_artifacts(out_dir / "artifacts" / name)
    atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    setup.live.write(final=True)
    atomic_write_json(out_dir / "metrics.json", results)
    if setup.loggers:
        from mergelab.reports.loggers import log_run

        log_run(setup.loggers, cfg, results, out_dir, step=setup.live.steps)
    if setup.suite is not None:
        log.info("results in %s\n%s", out_dir, (out_dir / "results.md").read_text())
    else:
        log.info("merged with %s into %s (%s)", last, merged_path, progress.chosen[last].report())
    if progress.failed:
        raise TableRowsFailed(
            f"table rows failed: {'; '.join(f'{n} ({e})' for n, e in progress.failed.items())}; the other rows are in "
            f"{out_dir / 'metrics.json'}"
        )
