"""The one entry point: instantiate pool, suite and method(s) from the config, merge, evaluate, report.

One flow serves every pool (:func:`run`); what differs is read from the pool's capability flags
(:class:`mergelab.pools.base.ModelPool`), never from its type."""

from __future__ import annotations

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
from typing import TYPE_CHECKING, Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mergelab.config_types import check_option_types
from mergelab.errors import TableRowsFailed
from mergelab.io.atomic import (
    RESULT_FILES,
    atomic_write_json,
    atomic_write_text,
    build_into_place,
    figure_format,
    move_dir_into_place,
)
from mergelab.io.run_lock import run_dir_lock
from mergelab.methods.base import MergeMethod, grid_candidates
from mergelab.overrides import job_overrides, same_job
from mergelab.pools.base import ModelPool, check_pool
from mergelab.provenance.recipe import MergeRecord, write_provenance
from mergelab.reports.live import RESULTS_MARKER, LiveTable
from mergelab.reports.sweep import FAILED_FILE
from mergelab.suites import scoring as ev
from mergelab.suites.base import EvalSuite
from mergelab.training import distributed as distributed
from mergelab.weight_checks import require_finite_merge

if TYPE_CHECKING:
    import lightning as L

log = logging.getLogger(__name__)

#: Where a pool that is not scorable in memory writes its candidate merges (under the run dir) until one is kept.
CANDIDATES_DIR = ".candidates"


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


def point_label(name: str, params: Mapping[str, Any]) -> str:
    """A candidate as the console names it: its row and grid point, e.g. ``ties {k: 20, scaling: 0.4}``."""
    return f"{name} {{{', '.join(f'{k}: {v}' for k, v in params.items())}}}" if params else name


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


class InMemoryMerge:
    """A candidate merge of a ``scorable`` pool: merged into the scoring module's backbone when first scored.

    ``label`` names it on the console when it is scored (see :func:`point_label`)."""

    def __init__(
        self, pool: ModelPool, method: MergeMethod, trainer_kwargs: Mapping[str, Any], label: str = "merged"
    ) -> None:
        self.pool, self.trainer_kwargs, self.label = pool, trainer_kwargs, label
        from mergelab.callbacks import MergeCallback  # Lightning: only pools that score in memory need it

        # The merge itself happens inside the evaluation trainer, as a callback, when testing starts.
        self.callback, self.model = MergeCallback(method, pool), pool.model()
        self.raw: dict[str, Any] | None = None  # the suite's own output of the last scoring (lm-eval's results)

    @property
    def method(self) -> MergeMethod:
        return self.callback.method

    def score(self, split: str, tasks: list[str] | None = None, kwargs: Mapping[str, Any] | None = None) -> ev.Scores:
        """Scores on ``split`` (under the run's trainer arguments, or ``kwargs``: tuning's precision)."""
        with ev.scoring(self.label, split):
            scores = self.pool.evaluate(
                self.model, split, kwargs or self.trainer_kwargs, tasks, callbacks=[self.callback]
            )
        self.raw = getattr(getattr(self.pool, "suite", None), "last_results", None)
        return scores

    def realize(self) -> None:
        """Compute the merge (scoring does it too)."""
        self.callback.merged_state()

    def write(self, out_dir: Path, overwrite: bool, finish: Callable[[Path], Any] | None = None) -> Path:
        """Save the merged model to ``out_dir``, ``finish(dir)`` adding files to it before it is moved into place."""
        if overwrite and out_dir.exists():
            shutil.rmtree(out_dir)
        return build_into_place(lambda d: self.pool.save_merged(self.callback.merged_state(), d), out_dir, finish)

    def discard(self) -> None:
        return None


class OnDiskMerge:
    """A candidate merge of a pool not scorable in memory: written to ``work_dir`` (under the run dir) when first
    needed, and scored from there by the suite's ``evaluate_checkpoint`` (on the suite's own split); ``label`` names
    it on the console when it is scored."""

    def __init__(
        self,
        pool: ModelPool,
        method: MergeMethod,
        suite: Any,
        trainer_kwargs: Mapping[str, Any],
        work_dir: Path,
        label: str = "merged",
    ) -> None:
        self.pool, self.method, self.suite, self.trainer_kwargs = pool, method, suite, trainer_kwargs
        self.work_dir, self.path, self.label = work_dir, None, label

    def realize(self) -> Path:
        if self.path is None:
            self.path = self.pool.write_merged(self.method, self.work_dir, overwrite=True)
        return self.path

    def score(self, split: str, tasks: list[str] | None = None, kwargs: Mapping[str, Any] | None = None) -> ev.Scores:
        """Scores of the written merge (under the run's trainer arguments, or ``kwargs``)."""
        path = self.realize()
        with ev.scoring(self.label, split):
            scores = self.suite.evaluate_checkpoint(path, kwargs or self.trainer_kwargs, self.pool.trust_remote_code)
        self.raw = getattr(self.suite, "last_results", None)
        return {t: s for t, s in scores.items() if tasks is None or t in tasks}

    def write(self, out_dir: Path, overwrite: bool, finish: Callable[[Path], Any] | None = None) -> Path:
        """Move the merged dir to ``out_dir``, ``finish(dir)`` adding files to it first (it is still a work dir)."""
        src = self.realize()
        if finish is not None:
            finish(src)
        if overwrite and out_dir.exists():
            shutil.rmtree(out_dir)
        move_dir_into_place(src, out_dir)
        self.path = None
        return out_dir

    def discard(self) -> None:
        shutil.rmtree(self.work_dir, ignore_errors=True)
        self.path = None


class TuningOptions:
    """How ``tune=true`` searches a method's grid (the config's ``tuning`` node), checked before any work.

    ``strategy``: ``exhaustive`` scores every point on the whole tune split; ``halving`` scores every point on the
    first ``subset`` examples of each task (the seeded prefix of what is scored otherwise), then the best ``keep`` on
    the whole split, and picks among those. ``precision``: Lightning's precision for the tuning scores (e.g.
    ``bf16-mixed``); null: ``trainer.precision``. Reported scores always use ``trainer.precision``.
    """

    def __init__(
        self, strategy: str = "halving", subset: int = 64, keep: int = 3, precision: str | None = None
    ) -> None:
        if strategy not in ("exhaustive", "halving"):
            raise ValueError(f"tuning.strategy must be 'exhaustive' or 'halving', got {strategy!r}")
        for key, value in (("subset", subset), ("keep", keep)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"tuning.{key} must be an integer >= 1, got {value!r}")
        self.strategy, self.subset, self.keep = strategy, int(subset), int(keep)
        self.precision = None if precision is None else str(precision)

    @classmethod
    def from_config(cls, node: Any) -> TuningOptions:
        """From the ``tuning`` config node (None: the defaults); an unknown key is named."""
        options = dict(node or {})
        known = ("strategy", "subset", "keep", "precision")
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"tuning: unknown key(s) {unknown}; known: {list(known)}")
        return cls(**options)


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
    results chart, methods' plots) are written in ``figure_format``.
    """
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    where = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise ValueError(f"seed must be a whole number, got {cfg.seed!r}")
    with figure_format(cfg.get("figure_format")):  # checked here, before any work
        # One live run per dir: a second one is refused at once rather than deleting the first one's candidates.
        owned = distributed.is_global_zero()  # other ranks work in rank 0's dir, under its lock
        lock = run_dir_lock(cfg.paths.output_dir, where, (CANDIDATES_DIR,)) if owned else nullcontext()
        with lock:
            return _run(cfg)


def _run(cfg: DictConfig) -> float:
    """:func:`run` inside its figure format."""
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
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    distributed.check_launch(trainer_kwargs, multirun)

    # Everything that can be wrong with the config fails here, before models load or outputs are written.
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
    loggers = [build(lc) for lc in (cfg.get("logger") or {}).values() if lc]

    zero = distributed.is_global_zero()  # rank 0 writes the results and sends them to the loggers
    t0 = time.perf_counter()
    expert_logging: AbstractContextManager[Any] = nullcontext()
    if loggers and zero:
        from mergelab.reports.loggers import start
        from mergelab.training.experts import logging_to  # Lightning's: loggers are Lightning's already

        start(loggers, cfg)
        expert_logging = logging_to(loggers)  # experts fine-tuned in setup log their loss curves as they train
    with expert_logging:
        pool.setup(suite, trainer_kwargs)
    t_setup = time.perf_counter() - t0
    report, tune_split = (suite.report_split, suite.tune_split) if suite is not None else (None, None)
    columns = list(suite.task_names) if suite is not None else list(pool.tasks)  # the table's columns
    live = LiveTable(
        out_dir,
        list(candidates),
        columns,
        table_title(
            suite, trainer_kwargs, tuning.strategy == "exhaustive" and any(len(c) > 1 for c in candidates.values())
        )
        if suite is not None
        else "",
        getattr(suite, "max_eval_examples", getattr(suite, "limit", None)),  # lm-eval's subset is its limit
        chart=bool(cfg.plot),
        files=suite is not None and zero,
        loggers=loggers if zero else [],
        split=report,
        started=started,
    )
    rows = live.rows

    def score(what: str, model: L.LightningModule, split: str, tasks: list[str] | None = None) -> ev.Scores:
        """Scores of an in-memory model of a ``scorable`` pool (pretrained, an expert, a single-task state), named
        ``what`` on the console."""
        with ev.scoring(what, split):
            return pool.evaluate(model, split, trainer_kwargs, tasks, callbacks=[])

    expert_scores: ev.Scores | None = None
    if suite is not None and pool.scorable:
        # Each expert is scored on the suite tasks it is the reference of (its own task, unless the suite's tasks
        # are benchmarks matched with experts, as lm-eval's are).
        metrics = pool.metric_names
        pre_scores = cached_scores(
            pool.cache_dir,
            reference_score_key(suite, pool, report, trainer_kwargs),
            lambda: score("pretrained", pool.model(), report),
            metrics,
        )
        expert_scores = {}
        for t in pool.tasks:
            own = pool.columns_of(t)
            if own:
                expert_scores.update(
                    cached_scores(
                        pool.cache_dir,
                        reference_score_key(suite, pool, report, trainer_kwargs, t, own),
                        lambda t=t, own=own: score(f"expert {t}", pool.expert_model(t), report, own),
                        metrics,
                    )
                )
        expert_scores = {c: expert_scores[c] for c in columns}
        live.add("pretrained", row(pre_scores, expert_scores))
        live.add("experts", row(expert_scores, expert_scores))

    def candidate(method: MergeMethod, name: str, i: int) -> InMemoryMerge | OnDiskMerge:
        label = point_label(name, candidates[name][i][0])
        if pool.scorable:
            return InMemoryMerge(pool, method, trainer_kwargs, label)
        return OnDiskMerge(pool, method, suite, trainer_kwargs, out_dir / CANDIDATES_DIR / f"{name}-{i}", label)

    objective = float("nan")
    kept: InMemoryMerge | OnDiskMerge | None = None  # the last row's merge: the run's merged model
    last = last_done = ""
    chosen: dict[str, MergeMethod] = {}
    failed: dict[str, str] = {}  # table rows that raised: name -> the error
    timings: dict[str, float] = {"setup_s": round(t_setup, 1)}
    try:
        for name, cands in candidates.items():
            t1 = time.perf_counter()
            if kept is not None:  # an earlier row's merge: only the last row's is the run's merged model
                kept.discard()
                kept = None
            try:
                tried: list[dict[str, Any]] = []
                best: tuple[float, dict[str, Any], InMemoryMerge | OnDiskMerge, ev.Scores | None] | None = None

                def prepared(i: int, method: MergeMethod, name: str = name) -> InMemoryMerge | OnDiskMerge:
                    # Trained methods (AWD) fit here, under trainer.fit; a pool not in memory has them write to
                    # work_dir.
                    method.prepare(pool, trainer_kwargs, loggers, work_dir=out_dir / "artifacts" / name)
                    return candidate(method, name, i)

                points: list[tuple[dict[str, Any], Any]] = [(p, (i, m)) for i, (p, m) in enumerate(cands)]
                if len(cands) > tuning.keep and tuning.strategy == "halving":
                    # Successive halving: every point on a seeded subset of the tune split, the best `keep` on all
                    # of it.
                    assert suite is not None and tune_split is not None
                    short: list[tuple[float, int, dict[str, Any], InMemoryMerge | OnDiskMerge]] = []
                    for i, (params, method) in enumerate(cands):
                        merge = prepared(i, method)
                        with suite.scoring_subset(tuning.subset):
                            val = ev.average(merge.score(tune_split, kwargs=tune_kwargs))
                        tried.append({"params": params, f"{tune_split}_subset_avg_acc": val})
                        log.info("%s %s: %s subset (%d) avg acc %.4f", name, params, tune_split, tuning.subset, val)
                        short = sorted([*short, (val, i, params, merge)], key=lambda x: (-x[0], x[1]))
                        for dropped in short[tuning.keep :]:
                            dropped[3].discard()
                        short = short[: tuning.keep]
                    points = [(params, merge) for _, _, params, merge in sorted(short, key=lambda x: x[1])]
                for params, point in points:
                    merge = prepared(*point) if isinstance(point, tuple) else point
                    tune_scores = None
                    if len(cands) > 1:
                        assert tune_split is not None
                        tune_scores = merge.score(tune_split, kwargs=tune_kwargs)
                        val = ev.average(tune_scores)
                        record = next((r for r in tried if r["params"] == params), None)
                        if record is None:
                            tried.append(record := {"params": params})
                        record[f"{tune_split}_avg_acc"] = val
                        log.info("%s %s: %s avg acc %.4f", name, params, tune_split, val)
                    else:
                        val = float("nan")
                    if best is None or val > best[0]:
                        if best is not None:
                            best[2].discard()
                        best = (val, params, merge, tune_scores)
                    else:
                        merge.discard()
                assert best is not None
                val, params, merge, tune_scores = best
                kept, last = merge, name  # kept as the run's merged model unless the row fails below
                extra: dict[str, dict[str, Any]] = {}  # rows that come with this one (its single-task row)
                if suite is None:  # merge only
                    merge.realize()
                    done_row: dict[str, Any] = {"params": dict(params), "method_report": merge.method.report()}
                else:
                    assert report is not None and tune_split is not None
                    # One split only (lm-eval's): the tuned candidate's scores are the report's (in the same precision).
                    same = tune_scores is not None and tune_split == report and tune_kwargs is trainer_kwargs
                    test_scores = tune_scores if same else merge.score(report)
                    if len(cands) > 1:
                        objective = val
                    elif tune_split == report:
                        objective = ev.average(test_scores)
                    else:
                        objective = ev.average(merge.score(tune_split))
                    done_row = row(test_scores, expert_scores, params)
                    if merge.raw is not None:  # the harness's own results (standard errors, configs, samples) kept
                        atomic_write_json(out_dir / "artifacts" / name / "lm_eval_results.json", merge.raw)
                    done_row[f"{tune_split}_avg_acc"] = objective
                    if tried:
                        done_row["tuning"] = tried
                    if merge.method.report():
                        done_row["method_report"] = merge.method.report()
                    single = merge.method.single_task_states(pool) if pool.scorable else {}
                    for t, state in single.items():
                        for tensor, value in state.items():
                            require_finite_merge(value, tensor, f"{type(merge.method).__name__} (task '{t}' alone)")
                    if single:  # e.g. AWD's retention: each theta_0 + tau_t - delta alone on its own task
                        own = {t: pool.columns_of(t) for t in single}
                        extra[f"{name} (single-task)"] = row(
                            {
                                c: v
                                for t, s in single.items()
                                if own[t]
                                for c, v in score(
                                    f"{name} (single-task {t})", pool.model(s, own[t]), report, own[t]
                                ).items()
                            },
                            expert_scores,
                        )
                chosen[name] = merge.method
            except Exception as e:
                # A table keeps its finished rows: the failed row is recorded and the run exits with an error at
                # the end. One method, or several processes (whose ranks must stay in step), fail at once.
                if len(candidates) == 1 or distributed.multi_process(cfg.trainer):
                    raise
                log.exception("table row '%s' failed; the other rows go on and the run ends with an error", name)
                failed[name] = f"{type(e).__name__}: {e}"
                chosen.pop(name, None)
                rows.pop(name, None)
                rows.pop(f"{name} (single-task)", None)
                live.finish_row(name, None, time.perf_counter() - t1)
                if last == name:
                    assert kept is not None
                    kept.discard()
                    kept, last = None, last_done
                continue
            last_done = last
            timings[f"{name}_s"] = round(time.perf_counter() - t1, 1)
            live.finish_row(name, done_row, time.perf_counter() - t1, extra)

        if not chosen:
            raise TableRowsFailed("every table row failed: " + "; ".join(f"{n} ({e})" for n, e in failed.items()))
        if not zero:
            return objective  # rank 0 writes the results and sends them to the loggers
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / RESULTS_MARKER).touch()  # results are mergelab's from here on: a rerun may replace leftovers
        merged_path = None
        if kept is not None and (cfg.save_merged or not pool.in_memory):  # a streamed merge is the run's product
            # The recipe, card and MergeKit config go into the merged dir before it is moved into place.
            record = MergeRecord(
                config=OmegaConf.to_container(cfg, resolve=True),  # type: ignore[arg-type]
                overrides=job_overrides(list(cfg.overrides)) if cfg.get("overrides") is not None else None,
                name=last,
                method_config=OmegaConf.to_container(method_cfgs[last], resolve=True),  # type: ignore[arg-type]
                grid_point=dict(rows[last].get("params") or {}) if len(candidates[last]) > 1 else None,
                method=chosen[last],
                pool=pool,
                rows=rows,
                tasks=columns,
                suite=suite.name if suite is not None else None,
                split=report,
                tune_split=tune_split,
            )
            merged_path = kept.write(
                out_dir / "merged_model", overwrite=bool(cfg.overwrite), finish=lambda d: write_provenance(d, record)
            )
    finally:
        if kept is not None:
            kept.discard()
        shutil.rmtree(out_dir / CANDIDATES_DIR, ignore_errors=True)

    merged_row = rows[last]
    results = {
        "suite": suite.name if suite is not None else None,
        "report_split": report,
        "tune_split": tune_split,
        "tasks": columns,
        "experts": pool.resolved,
        **({} if columns == pool.tasks else {"expert_of": pool.expert_of}),
        "rows": rows,
        "objective": {
            "name": f"{tune_split}/avg_acc" if suite is not None else None,
            "value": objective if suite is not None else None,
        },
        "timings": timings,
        # Lightning's precision of the reported scores and of tuning's (see TuningOptions).
        "precision": {
            "report": trainer_kwargs.get("precision"),
            "tune": tune_kwargs.get("precision") if suite is not None else None,
            "tuning_strategy": tuning.strategy,
        },
        "overrides": list(cfg.get("overrides") or []),
        # The run's merged model (the last row's), also where the objective comes from.
        "method": last,
        "params": merged_row.get("params") or {},
        "method_report": chosen[last].report(),
        "scores": merged_row.get("scores"),
        "avg_acc": merged_row.get("avg_acc"),
        "merged_model": str(merged_path) if merged_path is not None else None,
        # Table rows whose method raised (name -> error): left out of the rows, the run then exits with an error.
        "failed_rows": failed,
    }
    for name, method in chosen.items():
        method.save_artifacts(out_dir / "artifacts" / name)
    atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    live.write(final=True)
    atomic_write_json(out_dir / "metrics.json", results)
    if loggers:
        from mergelab.reports.loggers import log_run

        log_run(loggers, cfg, results, out_dir, step=live.steps)
    if suite is not None:
        log.info("results in %s\n%s", out_dir, (out_dir / "results.md").read_text())
    else:
        log.info("merged with %s into %s (%s)", last, merged_path, chosen[last].report())
    if failed:
        raise TableRowsFailed(
            f"table rows failed: {'; '.join(f'{n} ({e})' for n, e in failed.items())}; the other rows are in "
            f"{out_dir / 'metrics.json'}"
        )
    return objective
