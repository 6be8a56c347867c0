"""The one entry point: instantiate pool, suite and method(s) from the config, merge, evaluate, report."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import datasets
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mergelab.callbacks import MergeCallback
from mergelab.causal_lm.lm_harness import LMHarnessSuite
from mergelab.io.atomic import atomic_write_json, atomic_write_text, guard_output_dir
from mergelab.methods.base import MergeMethod, TaskVectorMethod
from mergelab.pools.base import ModelPool
from mergelab.pools.checkpoint import CheckpointPool
from mergelab.reports.loggers import log_run, send
from mergelab.reports.tables import write_reports
from mergelab.suites.base import EvalSuite
from mergelab.text import model as ev
from mergelab.training import distributed as distributed

log = logging.getLogger(__name__)

NOT_METHOD_OPTIONS = ("name", "grid")


def build(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, re-raising the component's own error (it names the key or value at fault)."""
    try:
        return instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as e:
        if e.__cause__ is not None:
            raise e.__cause__ from None
        raise


def method_candidates(mcfg: DictConfig, tune: bool) -> list[tuple[dict[str, Any], MergeMethod]]:
    """The method built at each point of its coefficient grid (or only as configured when not tuning).

    Every candidate is built up front so an out-of-range value fails before any work is done.
    """
    full = OmegaConf.to_container(mcfg, resolve=True)
    base = {k: v for k, v in full.items() if k not in NOT_METHOD_OPTIONS}
    grid = (full.get("grid") or {}) if tune else {}
    keys = list(grid)
    points = [dict(zip(keys, vals, strict=True)) for vals in itertools.product(*(grid[k] for k in keys))] or [{}]
    out = []
    for point in points:
        # What the table shows as chosen: the grid point when tuning, else every option.
        params = point if grid else {k: v for k, v in base.items() if not k.startswith("_")}
        try:
            method = build({**base, **point})
        except ValueError as e:
            raise ValueError(f"method '{mcfg.get('name')}': {e}") from e
        out.append((params, method))
    return out


def cached_scores(cache_dir: Path, parts: Mapping[str, Any], compute: Callable[[], ev.Scores]) -> ev.Scores:
    """Scores of a model that does not change between runs (pretrained, experts), cached on disk."""
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]
    path = cache_dir / "scores" / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text())["scores"]
    scores = compute()  # under DDP every rank computes (the same scores); rank 0 writes them
    if distributed.is_global_zero():
        atomic_write_json(path, {"key": dict(parts), "scores": scores})
    distributed.barrier()  # so that no rank finds the file before another has decided to compute it
    return scores


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


def quiet_libraries() -> None:
    """Keep the console to progress bars and results: no per-evaluation banners or dataset-map bars."""
    datasets.disable_progress_bars()
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run(cfg: DictConfig) -> float:
    """Run the configured job; returns the objective (mean accuracy of the last method on the tune split)."""
    quiet_libraries()
    out_dir = Path(cfg.paths.output_dir)
    guard_output_dir(out_dir, bool(cfg.overwrite))
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    distributed.check_launch(trainer_kwargs, multirun)

    # Everything that can be wrong with the config fails here, before models load or outputs are written.
    method_cfgs = dict(cfg.table.methods) if cfg.get("table") else {cfg.method.name: cfg.method}
    tune = bool(cfg.tune)
    candidates = {name: method_candidates(m, tune) for name, m in method_cfgs.items()}
    pool = build(cfg.model)
    if isinstance(pool, CheckpointPool):
        return run_streaming(cfg, pool, candidates, out_dir, trainer_kwargs)
    if not cfg.get("eval"):
        raise ValueError("eval=none only applies to checkpoint pools; this model pool needs an evaluation suite")
    suite: EvalSuite = build(cfg.eval)
    loggers = [build(lc) for lc in (cfg.get("logger") or {}).values() if lc]

    t0 = time.perf_counter()
    if not isinstance(pool, ModelPool):
        raise TypeError(f"model: {type(pool).__name__} is not a model pool (mergelab.pools.base.ModelPool)")
    pool.setup(suite, trainer_kwargs)
    t_setup = time.perf_counter() - t0
    report, tune_split = suite.report_split, suite.tune_split

    def score(
        model: L.LightningModule, split: str, tasks: list[str] | None = None, merge: MergeCallback | None = None
    ) -> ev.Scores:
        return pool.evaluate(model, split, trainer_kwargs, tasks, callbacks=[merge] if merge else [])

    base_key = {"suite": suite.fingerprint, "split": report, "max_length": suite.max_length}
    pre_scores = cached_scores(
        pool.cache_dir, {**base_key, **pool.reference_key()}, lambda: score(pool.model(), report)
    )
    # Each expert is scored on the suite tasks it is the reference of (its own task, unless the suite's tasks are
    # benchmarks matched with experts, as lm-eval's are).
    columns = list(pool.expert_of)
    expert_scores: ev.Scores = {}
    for t in pool.tasks:
        own = pool.columns_of(t)
        if own:
            expert_scores.update(
                cached_scores(
                    pool.cache_dir,
                    {**base_key, **pool.reference_key(t), **({} if own == [t] else {"columns": own})},
                    lambda t=t, own=own: score(pool.expert_model(t), report, own),
                )
            )
    expert_scores = {c: expert_scores[c] for c in columns}
    rows: dict[str, dict[str, Any]] = {
        "pretrained": row(pre_scores, expert_scores),
        "experts": row(expert_scores, expert_scores),
    }

    objective = float("nan")
    merged_state = None
    chosen: dict[str, MergeMethod] = {}
    timings: dict[str, float] = {"setup_s": round(t_setup, 1)}
    for name, cands in candidates.items():
        t1 = time.perf_counter()
        tried = []
        best: tuple[float, dict[str, Any], MergeCallback, L.LightningModule] | None = None
        for params, method in cands:
            method.prepare(pool, trainer_kwargs, loggers)  # trained methods (AWD) fit here, under trainer.fit
            # The merge itself happens inside the evaluation trainer, as a callback, when testing starts.
            merge, model = MergeCallback(method, pool), pool.model()
            if len(cands) > 1:
                val = ev.average(score(model, tune_split, merge=merge))
                tried.append({"params": params, f"{tune_split}_avg_acc": val})
                log.info("%s %s: %s avg acc %.4f", name, params, tune_split, val)
            else:
                val = float("nan")
            if best is None or val > best[0]:
                best = (val, params, merge, model)
        assert best is not None
        val, params, merge, model = best
        test_scores = score(model, report, merge=merge)
        if len(cands) > 1:
            objective = val
        elif tune_split == report:  # one split only (lm-eval's): no second evaluation
            objective = ev.average(test_scores)
        else:
            objective = ev.average(score(model, tune_split, merge=merge))
        method, state = merge.method, merge.merged_state()
        rows[name] = row(test_scores, expert_scores, params)
        rows[name][f"{tune_split}_avg_acc"] = objective
        if tried:
            rows[name]["tuning"] = tried
        if method.report():
            rows[name]["method_report"] = method.report()
        single = method.single_task_states(pool)
        if single:  # e.g. AWD's retention: each theta_0 + tau_t - delta alone on its own task
            own = {t: pool.columns_of(t) for t in single}
            rows[f"{name} (single-task)"] = row(
                {
                    c: v
                    for t, s in single.items()
                    if own[t]
                    for c, v in score(pool.model(s, own[t]), report, own[t]).items()
                },
                expert_scores,
            )
        chosen[name] = method
        timings[f"{name}_s"] = round(time.perf_counter() - t1, 1)
        merged_state = state

    results = {
        "suite": suite.name,
        "report_split": report,
        "tune_split": tune_split,
        "tasks": columns,
        "experts": pool.resolved,
        **({} if columns == pool.tasks else {"expert_of": pool.expert_of}),
        "rows": rows,
        "objective": {"name": f"{tune_split}/avg_acc", "value": objective},
        "timings": timings,
        "overrides": list(cfg.get("overrides") or []),
    }
    if not distributed.is_global_zero():
        return objective  # rank 0 writes the results and sends them to the loggers
    title = f"{suite.name}: {report} accuracy (%)"
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.save_merged and merged_state is not None:
        pool.save_merged(merged_state, out_dir / "merged_model")
    for name, method in chosen.items():
        method.save_artifacts(out_dir / "artifacts" / name)
    atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    write_reports(rows, columns, out_dir, title, chart=bool(cfg.plot))
    atomic_write_json(out_dir / "metrics.json", results)
    log_run(loggers, cfg, results, out_dir)
    log.info("results in %s\n%s", out_dir, (out_dir / "results.md").read_text())
    return objective


def run_streaming(
    cfg: DictConfig,
    pool: CheckpointPool,
    candidates: Mapping[str, list[tuple[dict[str, Any], MergeMethod]]],
    out_dir: Path,
    trainer_kwargs: Mapping[str, Any],
) -> float:
    """Merge a checkpoint pool tensor by tensor into ``<output_dir>/merged_model``; score it with an lm-eval suite."""
    if distributed.multi_process(cfg.trainer):
        raise ValueError(
            f"trainer: devices={cfg.trainer.get('devices')} num_nodes={cfg.trainer.get('num_nodes', 1)}: a checkpoint "
            "pool merges in one process (disk-bound streaming; AWD fits one tensor at a time); use trainer=gpu or "
            "trainer=cpu"
        )
    suite = build(cfg.eval) if cfg.get("eval") else None
    if suite is not None and not isinstance(suite, LMHarnessSuite):
        raise ValueError(
            "model: a checkpoint (streaming) pool is merged, then scored only by an lm-eval suite (eval=lm_harness); "
            "set eval=none or eval=lm_harness"
        )
    if len(candidates) != 1 or any(len(c) != 1 for c in candidates.values()):
        raise ValueError("a checkpoint pool merges one method with fixed options: no table and no tune=true")
    ((name, [(params, method)]),) = candidates.items()
    if not isinstance(method, TaskVectorMethod):
        raise ValueError(f"method '{name}' cannot stream: it is not a task-vector method")
    loggers = [build(lc) for lc in (cfg.get("logger") or {}).values() if lc]
    artifacts = out_dir / "artifacts" / name
    start = time.perf_counter()
    method.prepare(pool, trainer_kwargs, loggers, work_dir=artifacts)  # AWD fits tensor by tensor from the files
    prepare_seconds = time.perf_counter() - start
    merged = pool.merge(method, out_dir / "merged_model", overwrite=bool(cfg.overwrite))
    method.save_artifacts(artifacts)
    seconds = time.perf_counter() - start
    scores = None
    if suite is not None:  # the merged model exists only on disk here: load it once and hand it to lm-eval
        start = time.perf_counter()
        scores = suite.evaluate_checkpoint(merged, trainer_kwargs, bool(cfg.model.get("trust_remote_code", False)))
        log.info("%s: %s", suite.name, {t: round(s["acc"], 4) for t, s in scores.items()})
    results = {
        "pretrained": pool.pretrained,
        "experts": pool.experts,
        "method": name,
        "params": params,
        "method_report": method.report(),
        "merged_model": str(merged),
        "timings": {"prepare_s": round(prepare_seconds, 1), "merge_s": round(seconds - prepare_seconds, 1)},
        "overrides": list(cfg.get("overrides") or []),
    }
    if scores is not None:
        results.update(suite=suite.name, scores=scores, avg_acc=ev.average(scores))
        results["timings"]["eval_s"] = round(time.perf_counter() - start, 1)
        # The evaluated runs' layout too, so mergelab-report reads a sweep of streaming runs like any other.
        merged_row = {**row(scores, None, params), "method_report": method.report()}
        results.update(tasks=list(scores), report_split=suite.report_split, rows={name: merged_row})
    atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    atomic_write_json(out_dir / "metrics.json", results)
    logged = {f"method/{name}/{k}": float(v) for k, v in method.report().items()}
    logged.update({f"{suite.name}/{t}/acc": s["acc"] for t, s in (scores or {}).items()} if suite else {})
    send(loggers, cfg, logged)
    log.info("merged %s with %s in %.1f s: %s %s", pool.pretrained, name, seconds, merged, method.report())
    return float(results.get("avg_acc", float("nan")))
