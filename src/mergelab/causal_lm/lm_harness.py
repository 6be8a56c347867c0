"""Scoring merged causal LMs with EleutherAI's lm-evaluation-harness (``lm-eval``), in memory.

:class:`LMHarnessSuite` is an evaluation suite whose tasks are lm-eval task (or group) names, each with its number
of few-shot examples (``num_fewshot``); the defaults are the MetaGPT paper's six benchmarks. A model is scored by
wrapping the in-memory ``transformers`` LM (the merged weights already loaded) in lm-eval's ``HFLM`` inside
:class:`LMHarnessEvaluator`, a LightningModule run by ``trainer.test``, so a merge method's
:class:`~mergelab.callbacks.MergeCallback` and the trainer's accelerator apply as for every other suite. Each task's
main metric (acc, exact_match, pass@1 ...) is reported as ``acc`` (the table's column) next to the harness's own
metric names.

Offline tasks defined on local files live in ``data/lm_harness`` (always registered); ``include_path`` adds more."""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from mergelab.locations import DATA_DIR
from mergelab.pools.base import Scores
from mergelab.suites.base import file_digest
from mergelab.suites.scoring import run_test

log = logging.getLogger(__name__)

LOCAL_TASKS_DIR = DATA_DIR / "lm_harness"  # the checkout's data/, or the installed package's resources


#: The MetaGPT paper's benchmarks and shots (WinoGrande 0, AGIEval 5, GSM8K 4, MATH 4, MBPP 3, HumanEval 0). MATH is
#: the harness's ``minerva_math`` (the 4-shot Minerva prompt, answers checked by exact match after normalisation).
PAPER_TASKS: dict[str, int] = {
    "winogrande": 0,
    "agieval": 5,
    "gsm8k": 4,
    "minerva_math": 4,
    "mbpp": 3,
    "humaneval": 0,
}


#: The harness metric ("metric,filter") reported as ``acc`` where the first-match rule of :func:`main_metric` would
#: pick another one.
DEFAULT_METRICS: dict[str, str] = {
    "gsm8k": "exact_match,strict-match",
    "humaneval": "pass@1,create_test",
    "mbpp": "pass_at_1,none",
}


#: Metric names tried in order when a task has no entry in ``metrics``.
METRIC_PREFERENCE = ("acc", "exact_match", "pass@1", "pass_at_1", "acc_norm", "f1", "bleu")


SPLIT = "harness"  # lm-eval scores each task on its own evaluation split (test, else validation)


OPTION = "eval.allow_code_execution=true"


def main_metric(task: str, result: Mapping[str, Any], configured: str | None = None) -> str:
    """The harness key ("metric,filter") whose value is reported as ``acc`` for ``task``.

    ``configured`` wins; otherwise the first metric of :data:`METRIC_PREFERENCE` that the result has (any filter).
    """
    keys = [k for k in result if "," in k and "_stderr" not in k and isinstance(result[k], (int, float))]
    if configured is not None:
        if configured not in result:
            raise ValueError(f"eval.metrics.{task}: '{configured}' is not among the harness's results {keys}")
        return configured
    for name in METRIC_PREFERENCE:
        for k in keys:
            if k.split(",")[0] == name:
                return k
    if not keys:
        raise ValueError(f"lm-eval task '{task}' returned no numeric metric: {dict(result)}")
    return keys[0]


class LMHarnessSuite:
    """lm-eval tasks scored on an in-memory causal LM.

    Args:
        name: the suite's name (tables, logs).
        tasks: lm-eval task/group names, in report order.
        num_fewshot: task -> number of few-shot examples; a task not listed (or null) keeps the task's own default.
        experts: task -> the pool's expert that is its reference (the expert row and the normalized score; MetaGPT's
            general expert for WinoGrande/AGIEval, math for GSM8K/MATH, code for MBPP/HumanEval). A task missing here
            is matched with the expert of its own name.
        metrics: task -> the harness metric ("metric,filter") reported as ``acc``; missing tasks use
            :data:`DEFAULT_METRICS`, else the first of acc / exact_match / pass@1 / pass_at_1 ...
        include_path: extra dirs of task YAML files (``data/lm_harness`` is always included).
        batch_size: the harness's batch size.
        max_length: the context length the harness truncates to (null: the model's config).
        limit: score only the first N examples of each task (a fraction < 1: that share); null = all.
        seed: the harness's random, numpy, torch and few-shot sampling seeds.
        allow_code_execution: run tasks that execute generated code (mbpp, humaneval); sets ``HF_ALLOW_CODE_EVAL=1``
            and the harness's ``confirm_run_unsafe_code``. Off: such tasks are refused.
        apply_chat_template: format prompts with the tokenizer's chat template (the harness's option).
        bootstrap_iters: bootstrap iterations of the harness's standard errors (0: none, faster); with > 0 every
            score also carries its ``<metric>_stderr,<filter>`` entries.
        log_samples: keep the harness's per-example records (prompts, responses, per-sample metrics) in the
            results JSON each scored row writes (``artifacts/<row>/lm_eval_results.json``).
        dtype: dtype of a merged checkpoint loaded from disk (streaming pools), e.g. bfloat16; auto: its config's.
    """

    tune_split = SPLIT
    report_split = SPLIT

    def __init__(
        self,
        name: str,
        tasks: Sequence[str],
        num_fewshot: Mapping[str, int | None] | None = None,
        experts: Mapping[str, str] | None = None,
        metrics: Mapping[str, str] | None = None,
        include_path: str | Sequence[str] | None = None,
        batch_size: int = 8,
        max_length: int | None = None,
        limit: float | None = None,
        seed: int = 0,
        allow_code_execution: bool = False,
        apply_chat_template: bool = False,
        bootstrap_iters: int = 0,
        dtype: str = "auto",
        log_samples: bool = False,
    ) -> None:
        self.name = name
        if isinstance(tasks, str) or not isinstance(tasks, Sequence) or not tasks:
            raise ValueError(f"eval.tasks must be a non-empty list of lm-eval task names, got {tasks!r}")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"eval.tasks has duplicates: {list(tasks)}")
        shots_cfg = dict(num_fewshot or {})
        for task, shots in shots_cfg.items():
            if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 0):
                raise ValueError(f"eval.num_fewshot.{task}: must be an integer >= 0 or null, got {shots!r}")
        self.task_names = [str(t) for t in tasks]
        self.fewshot: dict[str, int | None] = {t: shots_cfg.get(t) for t in self.task_names}
        self.experts = dict(experts or {})
        self.metrics = {**DEFAULT_METRICS, **dict(metrics or {})}
        if batch_size < 1:
            raise ValueError(f"eval.batch_size must be >= 1, got {batch_size}")
        if max_length is not None and max_length < 8:
            raise ValueError(f"eval.max_length must be >= 8 or null, got {max_length}")
        if limit is not None and not limit > 0:
            raise ValueError(f"eval.limit must be > 0 (a count, or a fraction < 1) or null, got {limit}")
        self.batch_size, self.max_length, self.limit, self.seed = int(batch_size), max_length, limit, int(seed)
        self.allow_code_execution, self.apply_chat_template = bool(allow_code_execution), bool(apply_chat_template)
        self.bootstrap_iters, self.dtype = int(bootstrap_iters), dtype
        self.log_samples = bool(log_samples)
        #: The harness's own output of the last :meth:`score` (results with their standard errors, task configs,
        #: versions, sample counts, and samples with ``log_samples``): what the run keeps beside its scores.
        self.last_results: dict[str, Any] | None = None
        extra = [include_path] if isinstance(include_path, str) else list(include_path or [])
        self.include_paths = [LOCAL_TASKS_DIR, *(Path(p).expanduser() for p in extra)]
        for p in self.include_paths:
            if not p.is_dir():
                raise FileNotFoundError(f"eval.include_path: {p} is not a directory")
        self.check_tasks()

    # ----------------------------------------------------------------------------------------------- tasks

    @contextmanager
    def scoring_subset(self, n: int) -> Iterator[None]:
        """Inside the block, score at most the first ``n`` examples of each task (lm-eval's ``limit``)."""
        old = self.limit
        self.limit = n if old is None or old < 1 else min(old, n)
        try:
            yield
        finally:
            self.limit = old

    @property
    def task_manager(self) -> Any:
        """lm-eval's index of its own tasks plus those of :attr:`include_paths`."""
        return task_manager(tuple(str(p) for p in self.include_paths))

    def check_tasks(self) -> None:
        """Unknown task names, and code-executing tasks without the opt-in, fail before any model is loaded."""
        known = set(self.task_manager.all_tasks)
        for task in self.task_names:
            if task not in known:
                close = difflib.get_close_matches(task, known, n=5)
                hint = f"; did you mean {close}?" if close else ""
                raise ValueError(
                    f"eval.tasks: unknown lm-eval task '{task}' (not in lm-eval's registry nor in "
                    f"{[str(p) for p in self.include_paths]}){hint}"
                )
        unsafe = [t for t in self.task_names if self.executes_code(t)]
        if unsafe and not self.allow_code_execution:
            raise ValueError(
                f"eval.tasks {unsafe} execute model-generated code; they run only with {OPTION} "
                "(do this only in a sandbox you trust)"
            )

    def executes_code(self, name: str, seen: frozenset[str] = frozenset()) -> bool:
        """Whether ``name`` (a task, or a group/tag holding one) is marked ``unsafe_code`` in its YAML."""
        index = self.task_manager.task_index
        entry = index.get(name)
        if entry is None or name in seen:
            return False
        cfg = entry.cfg or {}
        if cfg.get("unsafe_code"):
            return True
        seen = seen | {name}
        children = cfg.get("task") if "group" in cfg else None
        if isinstance(children, list):
            subs = [c if isinstance(c, str) else c.get("task") for c in children if isinstance(c, (str, dict))]
        elif str(entry.kind).lower().endswith("tag"):
            subs = [n for n, e in index.items() if name in (e.tags or set())]
        else:
            subs = []
        return any(isinstance(s, str) and self.executes_code(s, seen) for s in subs)

    @cached_property
    def fingerprint(self) -> str:
        """Identifies what the scores depend on: tasks and shots, metrics, limit, seed, lengths, local task files."""
        from importlib.metadata import version

        h = hashlib.sha256()
        spec = {
            "lm_eval": version("lm_eval"),
            "tasks": self.fewshot,
            "metrics": {t: self.metrics.get(t) for t in self.task_names},
            "limit": self.limit,
            "seed": self.seed,
            "max_length": self.max_length,
            "batch_size": self.batch_size,
            "chat": self.apply_chat_template,
        }
        h.update(json.dumps(spec, sort_keys=True).encode())
        for root in self.include_paths:
            for f in sorted(root.rglob("*")):
                if f.is_file() and f.suffix in (".yaml", ".yml", ".py", ".parquet", ".jsonl", ".json"):
                    h.update(f"{f.relative_to(root)}:{file_digest(f)}".encode())
        if LOCAL_TASKS_DIR in self.include_paths:  # the local tasks read data/generative
            for f in sorted((LOCAL_TASKS_DIR.parent / "generative").rglob("*.parquet")):
                h.update(f"{f.name}:{file_digest(f)}".encode())
        return h.hexdigest()[:16]

    # ----------------------------------------------------------------------------------------------- scoring

    def score(self, lm: nn.Module, tokenizer: Any, tasks: Sequence[str] | None = None) -> Scores:
        """Scores of the in-memory causal LM ``lm`` on ``tasks`` (default: all), one harness run per shot count."""
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        tasks = list(tasks or self.task_names)
        unknown = [t for t in tasks if t not in self.fewshot]
        if unknown:
            raise ValueError(f"suite '{self.name}' has no task(s) {unknown}; its tasks: {self.task_names}")
        logging.getLogger("lm_eval").setLevel(max(logging.WARNING, logging.getLogger().getEffectiveLevel()))
        if self.allow_code_execution:
            os.environ["HF_ALLOW_CODE_EVAL"] = "1"  # HF evaluate's code_eval (humaneval) checks it
        # backend="causal": no guessing from the config; the model is used as it is (no copy, no reload).
        wrapper = HFLM(
            pretrained=lm, tokenizer=tokenizer, backend="causal", batch_size=self.batch_size, max_length=self.max_length
        )
        by_shots: dict[int | None, list[str]] = defaultdict(list)
        for t in tasks:
            by_shots[self.fewshot[t]].append(t)
        results: dict[str, Any] = {}
        kept: dict[str, dict[str, Any]] = defaultdict(dict)
        for shots, names in by_shots.items():
            log.info("lm-eval: %s, %s-shot", names, "default" if shots is None else shots)
            out = lm_eval.simple_evaluate(
                model=wrapper,
                tasks=names,
                num_fewshot=shots,
                limit=self.limit,
                task_manager=self.task_manager,
                bootstrap_iters=self.bootstrap_iters,
                log_samples=self.log_samples,
                apply_chat_template=self.apply_chat_template,
                random_seed=self.seed,
                numpy_random_seed=self.seed,
                torch_random_seed=self.seed,
                fewshot_random_seed=self.seed,
                confirm_run_unsafe_code=self.allow_code_execution,
            )
            if out is None:  # only non-zero ranks of a distributed run get None
                raise RuntimeError("lm-eval returned no results (multi-process runs are not supported here)")
            results.update(out["results"])
            for part in ("results", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "samples"):
                kept[part].update(out.get(part) or {})
        # Through JSON once (numpy numbers, tuples, objects as strings), so that the run can always write it.
        plain = json.loads(json.dumps(dict(kept), default=str))
        self.last_results = {**plain, "limit": self.limit, "bootstrap_iters": self.bootstrap_iters}
        scores: Scores = {}
        for t in tasks:
            if t not in results:
                raise RuntimeError(f"lm-eval returned no result for task '{t}' (got {sorted(results)})")
            res = results[t]
            key = main_metric(t, res, self.metrics.get(t))
            # Standard errors only when the harness computed them (bootstrap_iters > 0; else they are "N/A").
            extra = {
                k: float(v)
                for k, v in res.items()
                if "," in k and isinstance(v, float) and ("_stderr" not in k or self.bootstrap_iters > 0)
            }
            scores[t] = {"acc": float(res[key]), **extra}
        return scores

    def evaluate_checkpoint(
        self, path: str | Path, trainer_kwargs: Mapping[str, Any], trust_remote_code: bool = False
    ) -> Scores:
        """Scores of a causal-LM checkpoint dir (e.g. a streaming merge's output), loaded once with :attr:`dtype`."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype = self.dtype if self.dtype == "auto" else getattr(torch, self.dtype)
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        return run_test(LMHarnessEvaluator(lm.eval(), self, tokenizer), [one_step()], trainer_kwargs)


@lru_cache(maxsize=4)
def task_manager(include_paths: tuple[str, ...]) -> Any:
    """lm-eval's ``TaskManager`` over its own tasks and ``include_paths``, built once per process (it parses every
    task YAML the harness ships: about 10 s on 2 cores)."""
    try:
        from lm_eval.tasks import TaskManager
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(f"eval=lm_harness needs lm-eval: pip install -e '.[llm]' ({e})") from e

    return TaskManager(include_path=list(include_paths))


def one_step() -> DataLoader:
    """A one-batch dataloader: ``trainer.test`` runs one ``test_step``, where the harness does all the work."""
    return DataLoader([0], batch_size=1)


class LMHarnessEvaluator(L.LightningModule):
    """Scores its ``backbone`` (a causal LM) on lm-eval tasks inside ``trainer.test``.

    The trainer places the module on its accelerator and runs callbacks (the merge) first; the single test step
    hands the LM, as it is in memory, to :meth:`LMHarnessSuite.score`.
    """

    def __init__(
        self, backbone: nn.Module, suite: LMHarnessSuite, tokenizer: Any, tasks: Sequence[str] | None = None
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.suite, self.tokenizer = suite, tokenizer
        self.eval_tasks: list[str] = list(tasks or suite.task_names)
        self.scores: Scores = {}

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.scores = self.suite.score(self.backbone, self.tokenizer, self.eval_tasks)
