"""The one entry point: instantiate pool, suite and method(s) from the config, merge, evaluate, report.

One flow serves every pool (:func:`run`); what differs is read from the pool's capability flags
(:class:`mergelab.pools.base.ModelPool`), never from its type. The flow runs in named stages: the config checked
(:func:`check_config`), the run built (:func:`build_run`), the reference rows (:func:`reference_rows`), the method
rows (:mod:`mergelab.method_rows`, tuned by :mod:`mergelab.tuning`) and the results (:mod:`mergelab.run_results`);
what they share is :mod:`mergelab.run_state`."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, NamedTuple

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mergelab.config_types import check_option_types
from mergelab.errors import TableRowsFailed
from mergelab.io.atomic import RESULT_FILES, atomic_write_json, figure_format
from mergelab.io.run_lock import run_dir_lock
from mergelab.merge_candidates import CANDIDATES_DIR
from mergelab.method_config import resolving_against
from mergelab.method_rows import row, run_rows, score_model
from mergelab.methods.base import MergeMethod, grid_candidates
from mergelab.overrides import same_job
from mergelab.pools.base import ModelPool, check_pool
from mergelab.reports.live import RESULTS_MARKER, LiveTable
from mergelab.reports.sweep import FAILED_FILE
from mergelab.run_results import publish_results, write_merged_model
from mergelab.run_state import RunSetup, TableProgress
from mergelab.suites import scoring as ev
from mergelab.suites.base import EvalSuite
from mergelab.training import distributed as distributed
from mergelab.tuning import TuningOptions

log = logging.getLogger(__name__)


def build(node: Any, group: str | None = None, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, re-raising the component's own error (it names the key or value at fault).

    With ``group`` (the config group, e.g. ``model``) the values are first checked against the constructor's types,
    so a mistyped override is named as ``model.chunk_elems`` rather than failing inside the component."""
    if group is not None:
        check_option_types(OmegaConf.to_container(node, resolve=True), label=lambda key: f"{group}.{key}")
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
    node = OmegaConf.to_container(mcfg, resolve=True)
    return grid_candidates(node, tune, build)


def reference_score_key(
    suite: EvalSuite,
    pool: ModelPool,
    split: str,
    trainer_kwargs: Mapping[str, Any],
    task: str | None = None,
    columns: list[str] | None = None,
) -> dict[str, Any]:
    """Everything the cached scores of the pretrained model (``task=None``) or ``task``'s expert depend on: the
    suite's data, subset, seed and formatting (its fingerprint), the split, truncation, batch size, the precision
    they are computed in, the metrics and the scoring code's version, the model (and the heads it is scored with),
    and the columns scored when they are not the expert's own task."""
    return {
        "suite": suite.fingerprint,
        "split": split,
        "max_length": suite.max_length,
        "batch_size": getattr(suite, "batch_size", None),
        "precision": str(trainer_kwargs.get("precision") or "32-true"),
        "metrics": list(pool.metric_names),
        "scorer": ev.SCORER_VERSION,
        **pool.reference_key(task),
        **({"columns": columns} if columns is not None and columns != [task] else {}),
    }


def cached_scores(
    cache_dir: Path, parts: Mapping[str, Any], compute: Callable[[], ev.Scores], metrics: Sequence[str] = ()
) -> ev.Scores:
    """Scores of a model that does not change between runs (pretrained, experts), cached on disk under a hash of
    ``parts`` (:func:`reference_score_key`). An entry is used only if it records the same ``parts`` and has every
    one of ``metrics`` for every task; otherwise the scores are computed again (and the entry replaced)."""
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]
    path = cache_dir / "scores" / f"{key}.json"
    try:
        entry = json.loads(path.read_text())
        scores = entry["scores"]
        if entry.get("key") == json.loads(json.dumps(dict(parts))) and all(
            m in s for s in scores.values() for m in metrics
        ):
            return scores
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # no entry, or an unreadable one: computed again
    scores = compute()  # under DDP every rank computes (the same scores); rank 0 writes them
    if distributed.is_global_zero():
        atomic_write_json(path, {"key": dict(parts), "scores": scores})
    distributed.barrier()  # so that no rank finds the file before another has decided to compute it
    return scores


def claim_output_dir(out_dir: Path, overwrite: bool, resume: bool, overrides: list[str], multirun: bool) -> Any:
    """Make ``out_dir`` ready for this run; returns the finished run's ``metrics.json`` when ``resume`` finds one
    (the job is then skipped; a table whose ``failed_rows`` is not empty is run again), else None.

    ``metrics.json`` is written last, so it marks a finished run: one is never overwritten unless ``overwrite``.
    Result files without it, beside :data:`RESULTS_MARKER`, are an unfinished run's leftovers (e.g. a merged model
    whose evaluation failed): they are removed, with a warning, so that a failed run never blocks its own rerun.
    Result files without the marker are refused (they may be anyone's).
    """
    where = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    metrics = out_dir / "metrics.json"
    if metrics.exists() and not overwrite:
        if not resume:
            raise FileExistsError(
                f"output dir {out_dir} already holds a finished run ({metrics.name}); choose another {where}, set "
                "resume=true to skip finished jobs, or overwrite=true to redo it"
            )
        try:
            done = json.loads(metrics.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"resume=true: cannot read {metrics} ({e}); remove it to rerun that job") from None
        if not same_job(done.get("overrides") or [], overrides):
            raise ValueError(
                f"resume=true: {out_dir} holds a run with overrides {done.get('overrides')}, not {overrides}: "
                f"resume with the same command and {where}"
            )
        if not done.get("failed_rows"):
            return done
        # A table that finished with failed rows is not done: resume runs the job again, whole.
        log.warning("resume: %s finished with failed rows %s: running it again", out_dir, list(done["failed_rows"]))
        for n in RESULT_FILES:
            path = out_dir / n
            if path.exists():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        return None
    if not metrics.exists():
        (out_dir / FAILED_FILE).unlink(missing_ok=True)  # an earlier failure of this job: it is being rerun
        leftovers = [n for n in RESULT_FILES if (out_dir / n).exists()]
        if leftovers and not overwrite:
            if not (out_dir / RESULTS_MARKER).exists():  # not known to be mergelab's: never delete it
                raise FileExistsError(
                    f"output dir {out_dir} holds {leftovers} but no mergelab run wrote them; choose another {where}"
                    " or set overwrite=true"
                )
            log.warning("%s holds an unfinished run's %s (no metrics.json): replacing them", out_dir, leftovers)
            for n in leftovers:
                path = out_dir / n
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    return None


#: Warnings of libraries that every run would print and that say nothing about it: (message regex, category,
#: regex of the warning module). Matched narrowly, so that mergelab's own warnings and others still show.
LIBRARY_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # Lightning <= 2.6's pytree helper under torch >= 2.10, on every Trainer (lightning/pytorch/utilities/_pytree.py).
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\."),
)


def quiet_libraries() -> None:
    """Keep the console to progress bars and results: no per-evaluation banners, dataset-map bars or the library
    deprecations of :data:`LIBRARY_WARNINGS`; and where stderr is not a terminal (a log file, CI) no hub download or
    weight-loading bars either, whose every redraw would stay in the log.

    Through the environment and logger names: neither library is imported here (a merge-only run never needs them).
    """
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "datasets" in sys.modules:  # already imported: the variable was read at import
        sys.modules["datasets"].disable_progress_bars()
    if not ev.live_console(sys.stderr):
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' bars follow the hub's
        if "huggingface_hub.utils" in sys.modules:  # already imported: as for datasets
            sys.modules["huggingface_hub.utils"].disable_progress_bars()
        if "transformers.utils.logging" in sys.modules:
            sys.modules["transformers.utils.logging"].disable_progress_bar()
    for message, category, module in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch, and let Lightning's data loaders seed their workers: what
    ``lightning.seed_everything(seed, workers=True)`` does, without importing Lightning for a merge-only run."""
    import random

    import numpy as np
    import torch

    os.environ["PL_GLOBAL_SEED"] = str(seed)
    os.environ["PL_SEED_WORKERS"] = "1"
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def table_title(suite: EvalSuite, trainer_kwargs: Mapping[str, Any], exhaustive: bool = False) -> str:
    """The results table's title: the suite and split, the precision when it is not fp32, and ``exhaustive``
    tuning when a grid was searched that way (successive halving is the default)."""
    precision = str(trainer_kwargs.get("precision") or "32-true")
    stated = "" if precision in ("32-true", "32") else f", {precision}"  # the table says when it is not fp32
    return f"{suite.name}: {suite.report_split} accuracy (%){stated}" + (", exhaustive tuning" if exhaustive else "")


def run(cfg: DictConfig) -> float:
    """Run the configured job; returns the objective (mean accuracy of the last method on the tune split; NaN for a
    merge-only run).

    One flow for every pool: candidates are built and checked up front, the pool is set up (with the suite, or
    None for ``eval=none``), the reference rows are scored where the pool can score them, each method row is
    prepared, tuned over its grid on the tune split and scored on the report split (an in-memory pool merges inside
    the evaluation trainer; any other pool writes each candidate to a dir under the run dir, scored from there), and
    the results go to ``metrics.json`` (one schema for every run), the tables, the loggers and, for the last row,
    ``merged_model`` (always written by a pool not held in memory, else with ``save_merged=true``). Figures (the
    results chart, methods' plots) are written in ``figure_format``. Methods named inside methods' configs
    (``method.merge=ties``) resolve their interpolations against ``cfg``.
    """
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    where = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise ValueError(f"seed must be a whole number, got {cfg.seed!r}")
    with figure_format(cfg.get("figure_format")), resolving_against(cfg):  # the format checked here, before any work
        # One live run per dir: a second one is refused at once rather than deleting the first one's candidates.
        owned = distributed.is_global_zero()  # other ranks work in rank 0's dir, under its lock
        lock = run_dir_lock(cfg.paths.output_dir, where, (CANDIDATES_DIR,)) if owned else nullcontext()
        with lock:
            return _run(cfg)


def _run(cfg: DictConfig) -> float:
    """:func:`run` inside its figure format, lock and config root (for named methods): the output dir claimed (or
    a finished job skipped), the run built (:func:`build_run`), the reference rows, the method rows
    (:mod:`mergelab.method_rows`) and the results (:mod:`mergelab.run_results`)."""
    started = time.perf_counter()
    quiet_libraries()
    out_dir = Path(cfg.paths.output_dir)
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    overrides = list(cfg.get("overrides") or [])
    done = claim_output_dir(out_dir, bool(cfg.overwrite), bool(cfg.get("resume", False)), overrides, multirun)
    if done is not None:
        value = (done.get("objective") or {}).get("value")
        log.info("resume: %s already holds this job's result; skipped", out_dir)
        return float(value) if value is not None else float("nan")
    seed_everything(cfg.seed)
    setup, setup_s = build_run(cfg, out_dir, multirun, started)
    progress = TableProgress(timings={"setup_s": round(setup_s, 1)})
    progress.expert_scores = reference_rows(setup)
    merged_path: Path | None = None
    try:
        run_rows(setup, progress)
        if not progress.chosen:
            failed = "; ".join(f"{n} ({e})" for n, e in progress.failed.items())
            raise TableRowsFailed("every table row failed: " + failed)
        if not setup.zero:
            return progress.objective  # rank 0 writes the results and sends them to the loggers
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / RESULTS_MARKER).touch()  # results are mergelab's from here on: a rerun may replace leftovers
        merged_path = write_merged_model(setup, progress)
    finally:
        if progress.kept is not None:
            progress.kept.discard()
        shutil.rmtree(out_dir / CANDIDATES_DIR, ignore_errors=True)
    publish_results(setup, progress, merged_path)
    return progress.objective


class CheckedConfig(NamedTuple):
    """The run's options once checked (:func:`check_config`)."""

    trainer_kwargs: dict[str, Any]
    tune_kwargs: dict[str, Any]  # trainer_kwargs itself unless tuning scores in another precision
    tuning: TuningOptions
    method_cfgs: dict[str, DictConfig]  # table row name -> method config
    candidates: dict[str, list[tuple[dict[str, Any], MergeMethod]]]  # table row name -> (grid point, method)


def check_config(cfg: DictConfig, multirun: bool) -> CheckedConfig:
    """Everything that can be wrong with the config, checked before models load or outputs are written: the launch,
    every candidate of every row, the tuning options and precisions, and what a merge-only run allows."""
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(trainer_kwargs, dict)
    distributed.check_launch(trainer_kwargs, multirun)
    method_cfgs = dict(cfg.table.methods) if cfg.get("table") else {cfg.method.name: cfg.method}
    tune = bool(cfg.tune)
    candidates = {name: method_candidates(m, tune) for name, m in method_cfgs.items()}
    tuning = TuningOptions.from_config(cfg.get("tuning"))
    distributed.check_precision("tuning.precision", tuning.precision)
    distributed.check_precision("trainer.precision", trainer_kwargs.get("precision"))
    # Tuning may score in another precision than the report (which is always trainer.precision).
    tune_kwargs = {**trainer_kwargs, "precision": tuning.precision} if tuning.precision else trainer_kwargs
    if not cfg.get("eval"):  # merge only: one method, one candidate (whatever the pool)
        if len(candidates) > 1:
            raise ValueError("table: a merge-only run (eval=none) writes one merged model; a table needs a suite")
        if any(len(c) > 1 for c in candidates.values()):
            raise ValueError("tune=true picks a grid point on the suite's tune split: it needs a suite, not eval=none")
    return CheckedConfig(trainer_kwargs, tune_kwargs, tuning, method_cfgs, candidates)


def build_pool_and_suite(
    cfg: DictConfig, candidates: Mapping[str, Sequence[tuple[dict[str, Any], MergeMethod]]]
) -> tuple[ModelPool, EvalSuite | None]:
    """The pool and the suite (None for ``eval=none``), each checked against the other and every candidate method
    (what the pool can merge and run, the experts the methods' options name, the pool's inputs)."""
    pool = check_pool(build(cfg.model, group="model"))
    for name, cands in candidates.items():
        for _, method in cands:
            pool.check_method(method, f"method '{name}'")
    if not pool.multi_process and distributed.multi_process(cfg.trainer):
        raise ValueError(
            f"trainer: devices={cfg.trainer.get('devices')} num_nodes={cfg.trainer.get('num_nodes', 1)}: a "
            f"{pool.kind} merges in one process ({type(pool).__name__}: multi_process=False); use trainer=gpu or "
            "trainer=cpu"
        )
    suite: EvalSuite | None = build(cfg.eval, group="eval") if cfg.get("eval") else None
    pool.check_suite(suite)
    experts = pool.tasks or (list(suite.task_names) if suite is not None else [])  # a suite's pool: its tasks
    for name, cands in candidates.items():
        for _, method in cands:
            try:
                method.check_experts(experts)
            except ValueError as e:
                raise ValueError(f"method '{name}': {e}") from None
    pool.check_inputs(suite)
    return pool, suite


def set_up_pool(
    cfg: DictConfig, pool: ModelPool, suite: EvalSuite | None, loggers: list[Any], trainer_kwargs: dict[str, Any]
) -> float:
    """Set the pool up for ``suite`` (experts fine-tuned or loaded), the loggers started on rank 0 and following
    the experts' fine-tuning; returns the seconds it took."""
    started = time.perf_counter()
    expert_logging: AbstractContextManager[Any] = nullcontext()
    if loggers and distributed.is_global_zero():
        from mergelab.reports.loggers import start
        from mergelab.training.experts import logging_to  # Lightning's: loggers are Lightning's already

        start(loggers, cfg)
        expert_logging = logging_to(loggers)  # experts fine-tuned in setup log their loss curves as they train
    with expert_logging:
        pool.setup(suite, trainer_kwargs)
    return time.perf_counter() - started


def build_run(cfg: DictConfig, out_dir: Path, multirun: bool, started: float) -> tuple[RunSetup, float]:
    """The run's config checked, its pool, suite and loggers built and the pool set up, the results table opened;
    returns the run and the seconds the pool's setup took. ``started``: when the run started (the table's clock)."""
    checked = check_config(cfg, multirun)
    pool, suite = build_pool_and_suite(cfg, checked.candidates)
    loggers = [build(lc) for lc in (cfg.get("logger") or {}).values() if lc]
    zero = distributed.is_global_zero()  # rank 0 writes the results and sends them to the loggers
    setup_s = set_up_pool(cfg, pool, suite, loggers, checked.trainer_kwargs)
    columns = list(suite.task_names) if suite is not None else list(pool.tasks)  # the table's columns
    exhaustive = checked.tuning.strategy == "exhaustive" and any(len(c) > 1 for c in checked.candidates.values())
    live = LiveTable(
        out_dir,
        list(checked.candidates),
        columns,
        table_title(suite, checked.trainer_kwargs, exhaustive) if suite is not None else "",
        getattr(suite, "max_eval_examples", getattr(suite, "limit", None)),  # lm-eval's subset is its limit
        chart=bool(cfg.plot),
        files=suite is not None and zero,
        loggers=loggers if zero else [],
        split=suite.report_split if suite is not None else None,
        started=started,
    )
    setup = RunSetup(
        cfg,
        out_dir,
        **checked._asdict(),
        pool=pool,
        suite=suite,
        loggers=loggers,
        zero=zero,
        columns=columns,
        live=live,
    )
    return setup, setup_s


def score_reference(setup: RunSetup, task: str | None, columns: list[str] | None) -> ev.Scores:
    """The pretrained model's scores (``task`` None) or ``task``'s expert's on its ``columns``, on the report split."""
    assert setup.report is not None
    if task is None:
        return score_model(setup, "pretrained", setup.pool.model(), setup.report)
    return score_model(setup, f"expert {task}", setup.pool.expert_model(task), setup.report, columns)


def reference_rows(setup: RunSetup) -> ev.Scores | None:
    """The table's ``pretrained`` and ``experts`` rows (cached on disk: :func:`cached_scores`) where the pool scores
    in memory; returns the experts' scores, the reference of the normalized accuracy (None without those rows).

    Each expert is scored on the suite tasks it is the reference of (its own task, unless the suite's tasks are
    benchmarks matched with experts, as lm-eval's are)."""
    suite, pool, report = setup.suite, setup.pool, setup.report
    if suite is None or report is None or not pool.scorable:
        return None
    metrics = pool.metric_names
    key = functools.partial(reference_score_key, suite, pool, report, setup.trainer_kwargs)
    pre_scores = cached_scores(pool.cache_dir, key(), functools.partial(score_reference, setup, None, None), metrics)
    expert_scores: ev.Scores = {}
    for t in pool.tasks:
        own = pool.columns_of(t)
        if own:
            compute = functools.partial(score_reference, setup, t, own)
            expert_scores.update(cached_scores(pool.cache_dir, key(t, own), compute, metrics))
    expert_scores = {c: expert_scores[c] for c in setup.columns}
    setup.live.add("pretrained", row(pre_scores, expert_scores))
    setup.live.add("experts", row(expert_scores, expert_scores))
    return expert_scores
