"""The table's method rows: each row's grid searched on the tune split (:mod:`mergelab.tuning`), the chosen merge
scored on the report split, and a row that raises recorded and left out while the other rows go on."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mergelab.io.atomic import atomic_write_json
from mergelab.merge_candidates import Candidate, candidate_merge
from mergelab.methods.base import MergeMethod
from mergelab.run_state import RunSetup, TableProgress
from mergelab.suites import scoring as ev
from mergelab.training import distributed as distributed
from mergelab.tuning import TunedPoint, grid_search
from mergelab.weight_checks import require_finite_merge

if TYPE_CHECKING:
    import lightning as L

#: The rows' console lines are the run's (the logger name is part of each line).
log = logging.getLogger("mergelab.run")


def row(scores: ev.Scores, reference: ev.Scores | None, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One table row: per-task scores, the average of each metric and the normalized accuracy against the experts."""
    # acc first, then the suite's others (those every task has: lm-eval's differ from task to task)
    metrics = [m for m in dict.fromkeys(m for s in scores.values() for m in s) if all(m in s for s in scores.values())]
    out: dict[str, Any] = {"scores": scores, **{f"avg_{m}": ev.average(scores, m) for m in metrics}}
    if reference is not None:
        norm = ev.normalized(scores, reference)
        out["norm_acc"] = norm
        out["avg_norm_acc"] = sum(norm.values()) / len(norm)
    if params:
        out["params"] = dict(params)
    return out


def score_model(
    setup: RunSetup, what: str, model: L.LightningModule, split: str, tasks: list[str] | None = None
) -> ev.Scores:
    """Scores of an in-memory model of a ``scorable`` pool (pretrained, an expert, a single-task state), named
    ``what`` on the console."""
    with ev.scoring(what, split):
        return setup.pool.evaluate(model, split, setup.trainer_kwargs, tasks, callbacks=[])


def prepared_candidate(setup: RunSetup, name: str, i: int) -> Candidate:
    """Row ``name``'s ``i``-th candidate, its method prepared first: trained methods (AWD) fit here, under
    trainer.fit (a pool not in memory has them write to the row's artifacts dir)."""
    params, method = setup.candidates[name][i]
    method.prepare(setup.pool, setup.trainer_kwargs, setup.loggers, work_dir=setup.out_dir / "artifacts" / name)
    return candidate_merge(setup.pool, method, setup.suite, setup.trainer_kwargs, setup.out_dir, name, i, params)


def tune_row(setup: RunSetup, name: str) -> TunedPoint:
    """Row ``name``'s chosen candidate, its grid searched as ``tuning`` says (nothing to search for one point)."""
    grid = [params for params, _ in setup.candidates[name]]
    search = grid_search(setup.tuning, len(grid), setup.suite, setup.tune_split, setup.tune_kwargs)
    return search.search(name, grid, functools.partial(prepared_candidate, setup, name))


def score_row(setup: RunSetup, progress: TableProgress, name: str, tuned: TunedPoint) -> dict[str, Any]:
    """Row ``name`` of the chosen candidate: scored on the report split, with its tune-split objective (which becomes
    the run's), what tuning tried and the method's report; a merge-only run (no suite) only merges it."""
    merge, params = tuned.merge, tuned.params
    if setup.suite is None:  # merge only
        merge.realize()
        return {"params": dict(params), "method_report": merge.method.report()}
    report, tune_split = setup.report, setup.tune_split
    assert report is not None and tune_split is not None
    # One split only (lm-eval's): the tuned candidate's scores are the report's (in the same precision).
    reuse = tune_split == report and setup.tune_kwargs is setup.trainer_kwargs
    test_scores = tuned.tune_scores if reuse and tuned.tune_scores is not None else merge.score(report)
    if len(setup.candidates[name]) > 1:
        progress.objective = tuned.value
    elif tune_split == report:
        progress.objective = ev.average(test_scores)
    else:
        progress.objective = ev.average(merge.score(tune_split))
    done_row = row(test_scores, progress.expert_scores, params)
    if merge.raw is not None:  # the harness's own results (standard errors, configs, samples) kept
        atomic_write_json(setup.out_dir / "artifacts" / name / "lm_eval_results.json", merge.raw)
    done_row[f"{tune_split}_avg_acc"] = progress.objective
    if tuned.tried:
        done_row["tuning"] = tuned.tried
    if merge.method.report():
        done_row["method_report"] = merge.method.report()
    return done_row


def single_task_rows(setup: RunSetup, progress: TableProgress, name: str, method: MergeMethod) -> dict[str, Any]:
    """The rows that come with row ``name``: its single-task row where the method has per-task weights (e.g. AWD's
    retention: each theta_0 + tau_t - delta alone on its own task), scored where the pool scores in memory."""
    pool, report = setup.pool, setup.report
    single = method.single_task_states(pool) if pool.scorable else {}
    for t, state in single.items():
        for tensor, value in state.items():
            require_finite_merge(value, tensor, f"{type(method).__name__} (task '{t}' alone)")
    if not single:
        return {}
    assert report is not None
    own = {t: pool.columns_of(t) for t in single}
    scores = {
        column: value
        for t, state in single.items()
        if own[t]
        for column, value in score_model(
            setup, f"{name} (single-task {t})", pool.model(state, own[t]), report, own[t]
        ).items()
    }
    return {f"{name} (single-task)": row(scores, progress.expert_scores)}


def run_row(setup: RunSetup, progress: TableProgress, name: str) -> None:
    """Row ``name`` tuned, scored and added to the table; its merge becomes the run's merged model. A row that
    raises is recorded and left out (:func:`drop_failed_row`), unless the table has only that row or the run is
    several processes."""
    started = time.perf_counter()
    if progress.kept is not None:  # an earlier row's merge: only the last row's is the run's merged model
        progress.kept.discard()
        progress.kept = None
    try:
        tuned = tune_row(setup, name)
        progress.kept, progress.last = tuned.merge, name  # kept as the run's merged model unless the row fails below
        done_row = score_row(setup, progress, name, tuned)
        extra = single_task_rows(setup, progress, name, tuned.merge.method) if setup.suite is not None else {}
        progress.chosen[name] = tuned.merge.method
    except Exception as e:
        if len(setup.candidates) == 1 or distributed.multi_process(setup.cfg.trainer):
            raise  # one method, or several processes (whose ranks must stay in step): the run fails at once
        drop_failed_row(setup, progress, name, e, started)
        return
    progress.last_done = progress.last
    progress.timings[f"{name}_s"] = round(time.perf_counter() - started, 1)
    setup.live.finish_row(name, done_row, time.perf_counter() - started, extra)


def drop_failed_row(setup: RunSetup, progress: TableProgress, name: str, error: Exception, started: float) -> None:
    """Record row ``name``'s ``error`` (with its traceback: called while it is handled) and leave the row out: a
    table keeps its finished rows and the run exits with an error at the end. When it was the run's last row so
    far, its merge is discarded and the run's row falls back to the last finished one."""
    log.exception("table row '%s' failed; the other rows go on and the run ends with an error", name)
    progress.failed[name] = f"{type(error).__name__}: {error}"
    progress.chosen.pop(name, None)
    setup.live.rows.pop(name, None)
    setup.live.rows.pop(f"{name} (single-task)", None)
    setup.live.finish_row(name, None, time.perf_counter() - started)
    if progress.last == name:
        assert progress.kept is not None
        progress.kept.discard()
        progress.kept, progress.last = None, progress.last_done


def run_rows(setup: RunSetup, progress: TableProgress) -> None:
    """Every method row of the table, in order."""
    for name in setup.candidates:
        run_row(setup, progress, name)
