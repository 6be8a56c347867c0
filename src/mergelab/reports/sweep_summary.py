"""A ``-m`` sweep's summary (``summary.md``, ``summary.json`` and its figure): one row per job asked for,
rewritten after every job, when the sweep ends and when it is interrupted (Ctrl-C: :func:`interrupted`, called by
the CLI), by the Hydra callback :class:`SweepSummary`, which also has the sweep's plan and job markers written
(:mod:`mergelab.reports.sweep_plan`). The rows are :func:`mergelab.reports.sweep.summarize`'s records.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from mergelab.io.atomic import FIGURE_FORMATS, atomic_write_json, atomic_write_text, figure_format
from mergelab.reports.sweep import DONE, FINISHED, INTERRUPTED, RUNNING, read_plan, summary_records
from mergelab.reports.sweep_plan import check_run_dir, set_plan_state, start_sweep, write_job_marker
from mergelab.reports.sweep_plots import plot_summary

log = logging.getLogger(__name__)

#: The sweep this process launches: ``dir`` (its sweep dir) and ``figure_format``, for :func:`interrupted`.
_ACTIVE: dict[str, Any] = {}


def _cell(key: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        # scores in % as in the results tables; other numbers (coefficients, lambdas) as they are
        return f"{100 * value:.2f}" if key.endswith("avg_acc") or key.endswith("avg_norm_acc") else f"{value:.4g}"
    return str(value).replace("|", "\\|")


def _table(records: list[dict[str, Any]], columns: list[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    return lines + ["| " + " | ".join(_cell(c, r.get(c)) for c in columns) + " |" for r in records]


def _header(asked: list[dict[str, Any]], plan: Any, sweep_dir: Path, others: int) -> list[str]:
    """The summary's first lines: k of N done; when not all are, what the others are and how to resume."""
    done = sum(r["status"] == DONE for r in asked)
    lines = [f"{done} of {len(asked)} job(s) done; scores in %."]
    if done == len(asked):
        return lines
    counts = Counter(r["status"] for r in asked if r["status"] != DONE)
    what = ", ".join(f"{n} {status}" for status, n in counts.items())
    resume = (plan or {}).get("resume")
    if plan is None:
        resume = f"mergelab -m <the sweep's overrides> hydra.sweep.dir={sweep_dir} resume=true"
    if resume is None:
        lines.append(
            f"Not done: {what}. The sweeper picks each job's overrides as it goes, so resume=true cannot find them "
            "again: run the sweep again with another hydra.sweep.dir."
        )
        return lines
    if plan is not None and plan.get("state") == RUNNING:
        lines.append(f"Not done yet: {what}. Should the sweep stop, resume it (finished jobs are skipped) with:")
    else:
        lines.append(f"Not done: {what}. Resume the sweep (finished jobs are skipped) with:")
    lines += ["", f"    {resume}"]
    if others:
        lines += [
            "",
            f"{others} job dir(s) hold the run of other overrides (another command's), which resume=true refuses: "
            "choose another hydra.sweep.dir, or add overwrite=true to replace those runs.",
        ]
    return lines


def _write(sweep_dir: str | Path) -> tuple[Path, int, int] | None:
    """Write the summary; returns its path, how many jobs are done and how many were asked for."""
    out = Path(sweep_dir)
    if not out.is_dir():
        return None
    records, n, axes, plan, others = summary_records(out)
    if not records:
        return None
    asked, rest = records[:n], records[n:]
    skip = ("job", "status", "overrides", "error", "note", "merged_model", *axes)
    results = [k for k in dict.fromkeys(k for r in asked for k in r) if k not in skip]
    columns = [c for c in ["job", "status", *axes, *results, "error", "note"] if any(c in r for r in asked)]
    lines = [*_header(asked, plan, out, others), "", *_table(asked, columns)]
    if rest:
        extra = [c for c in ("job", "status", "overrides", "error") if any(c in r for r in rest)]
        lines += ["", f"Other dirs in {out}, not jobs of this sweep:", "", *_table(rest, extra)]
    atomic_write_text(out / "summary.md", "\n".join(lines) + "\n")
    atomic_write_json(out / "summary.json", records)
    for fmt in FIGURE_FORMATS:  # never leave an earlier figure that this summary no longer shows
        (out / f"summary.{fmt}").unlink(missing_ok=True)
    plot_summary(asked, axes, results, out / "summary")
    return out / "summary.md", sum(r["status"] == DONE for r in asked), len(asked)


def write_summary(sweep_dir: str | Path) -> Path | None:
    """summary.json and summary.md (and the figure ``summary.<figure format>``: :func:`plot_summary`, removed when
    there is nothing to plot) in ``sweep_dir``; None when it holds no job."""
    written = _write(sweep_dir)
    return written[0] if written is not None else None


def _figure_format(config: DictConfig) -> str | None:
    """The config's figure format, or png when it is not one (the job itself reports a wrong one)."""
    fmt = config.get("figure_format")
    return str(fmt).lower() if fmt is not None and str(fmt).lower() in FIGURE_FORMATS else None


def interrupted(state: str = INTERRUPTED) -> tuple[int, int, str | None, bool] | None:
    """When the sweep this process launches ends early (the CLI calls it): on Ctrl-C (``state`` interrupted), or on
    an error that stops the sweep (``stopped``). Records it in the plan (the jobs it started and left without a
    result are then interrupted, not running) and rewrites the summary. Returns how many jobs are done, how many were
    asked for, the command that resumes the sweep (None where the sweeper cannot redo the same jobs) and whether its
    jobs ran here (not on a cluster, where they go on); None when no sweep was started."""
    if not _ACTIVE:
        return None
    sweep_dir = _ACTIVE["dir"]
    try:
        plan = set_plan_state(sweep_dir, state)
        with figure_format(_ACTIVE.get("figure_format")):
            written = _write(sweep_dir)
    except OSError as e:  # the line on the console still says what can be said
        log.warning("could not update the sweep summary in %s: %s", sweep_dir, e)
        plan, written = read_plan(sweep_dir), None
    done, n = (written[1], written[2]) if written is not None else (0, len((plan or {}).get("jobs") or []))
    return done, n, (plan or {}).get("resume"), bool((plan or {}).get("local", True))


class SweepSummary(Callback):
    """Hydra callback: checks that the run dir (a single run) or the sweep dir can be written before Hydra creates
    them; records what a sweep asks for and which of its jobs started; writes the sweep's summary after each job (so
    a failed or killed sweep still has one) and at the end (on Ctrl-C, :func:`interrupted` does).

    Hydra turns an exception of a callback into a multi-line warning: every hook here logs its own failure in one
    line instead (the summary must never fail a job); only a refused dir stops the command
    (:func:`~mergelab.reports.sweep_plan.refuse`)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _quietly(check_run_dir, config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = _quietly(start_sweep, config)
        if sweep_dir is not None:
            _ACTIVE.clear()
            _ACTIVE.update(dir=sweep_dir, figure_format=_figure_format(config))

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            _quietly(write_job_marker, False)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            _quietly(write_job_marker, True)
            with figure_format(_figure_format(config)):
                _quietly(write_summary, HydraConfig.get().sweep.dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        _ACTIVE.clear()
        if sweep_dir.is_dir():
            _quietly(set_plan_state, sweep_dir, FINISHED)
        with figure_format(_figure_format(config)):
            path = _quietly(write_summary, sweep_dir)
        if path is not None:
            log.info("sweep summary: %s\n%s", path, path.read_text())


def _quietly(fn: Any, *args: Any) -> Any:
    """``fn(*args)``, a failure logged in one line (None returned) rather than raised into Hydra."""
    try:
        return fn(*args)
    except Exception as e:
        log.warning("sweep summary: %s failed: %s", getattr(fn, "__name__", fn), " ".join(str(e).split()))
        return None
