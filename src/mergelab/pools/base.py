"""The one interface every model pool implements, and what :func:`mergelab.run.run` may ask of it.

A pool holds the pretrained model and one expert per task: sequence classifiers (:mod:`mergelab.text.pool`),
causal LMs (:mod:`mergelab.causal_lm.pool`) and CLIP vision towers (:mod:`mergelab.vision.pool`) in memory, or
safetensors checkpoints larger than memory streamed from disk (:mod:`mergelab.pools.checkpoint`). Merge methods
read its weights (:meth:`ModelPool.tensor_sources`, or the state dicts of an in-memory pool), and the run flow
scores what they merge.

What differs between pools is declared, never guessed from a pool's type: the class attributes
:attr:`~ModelPool.in_memory`, :attr:`~ModelPool.scorable`, :attr:`~ModelPool.needs_suite`,
:attr:`~ModelPool.multi_process` and :attr:`~ModelPool.task_data` say what a pool can do. The methods only some
pools can honour (the in-memory state dicts, building and scoring in-memory modules, handing out the tasks'
examples) raise a :class:`PoolCapabilityError` naming the pool and the
capability on a pool that lacks it; a pool that declares the capability overrides them.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from mergelab import task_vectors as tv
from mergelab.engine.chunks import Block, DictSource, TensorSource, load_chunk
from mergelab.weight_checks import check_compatible, check_finite

if TYPE_CHECKING:  # Lightning is imported by the pools that build models, not by a merge of checkpoints
    import lightning as L

log = logging.getLogger(__name__)

Scores = dict[str, dict[str, float]]  # task -> {metric: value}; every task has the main metric "acc"


def copy_with_state(module: nn.Module, state: Mapping[str, torch.Tensor] | None) -> nn.Module:
    """A copy of ``module`` with ``state`` (possibly partial: e.g. only the merged parameters) loaded, in eval mode.

    Every pool builds its scored and saved models this way, so the pool's own pretrained module is never changed.
    """
    out = copy.deepcopy(module)
    if state is not None:
        out.load_state_dict(dict(state), strict=False)
    return out.eval()


def warn_repeated_experts(experts: Mapping[str, str | None]) -> None:
    """Warn when one checkpoint is listed under several expert names: it would count twice in every merge."""
    seen: dict[str, str] = {}
    for name, path in experts.items():
        if path is None:
            continue
        key = os.path.realpath(os.path.expanduser(path)) if os.path.exists(os.path.expanduser(path)) else str(path)
        if key in seen:
            log.warning(
                "model.experts: '%s' and '%s' are the same checkpoint (%s); it is merged twice", seen[key], name, path
            )
        else:
            seen[key] = name


class PoolSources(NamedTuple):
    """A pool's weights as tensor sources: pretrained, experts in task order, the merged tensors' names."""

    base: TensorSource
    experts: list[TensorSource]
    names: list[str]
    label: str  # how errors name the pool's pretrained model


class PoolCapabilityError(ValueError):
    """A run (or a method) asked a pool for something it cannot do; the message names the pool and the capability."""


#: What each capability flag means, as errors say it (``needs_suite`` is a requirement, see ``check_suite``).
CAPABILITIES = {
    "in_memory": "hold its weights in memory (state dicts)",
    "scorable": "build and score in-memory models (pretrained, experts, merges) with the suite",
    "multi_process": "run under a multi-process trainer",
    "task_data": "give its tasks' examples to a method that learns from data (Fisher, RegMean, AdaMerging)",
}


class ModelPool(ABC):
    """The pretrained model and one expert per task, with the parameters that merge methods operate on.

    Every pool, after :meth:`setup`, has :attr:`tasks` (expert names, in the order methods see the experts),
    :attr:`resolved` (task -> its checkpoint), :attr:`expert_of` (suite task -> its reference expert), honours
    :meth:`tensor_sources` (the merged tensors' weights), :meth:`check_method` (which methods it can merge) and
    :meth:`write_merged` (merge with a method and write the model). The rest depends on the capability flags below.

    Args:
        experts: task -> hub id or local dir of its expert (None entries, or None for all: the pool builds them).
        exclude: regexes over parameter names that are not merged (they stay pretrained).
        cache_dir: where built experts (and converted checkpoints) and cached reference scores live.
        trust_remote_code: passed to transformers; off unless the user turns it on.
    """

    #: How messages name this kind of pool.
    kind: str = "model pool"

    #: The scores each task gets from :meth:`evaluate` (part of the cached reference scores' key, and checked when
    #: one is read: a metric added misses the entries that lack it).
    metric_names: tuple[str, ...] = ("acc",)

    #: Whether the pool holds its weights in memory (a checkpoint pool streams them from disk instead): methods
    #: that learn something per tensor (AWD) then keep it in memory rather than writing it to disk. In memory:
    #: :meth:`pretrained_state`, :meth:`expert_states` and :meth:`save_merged` work, and ``MergeMethod.run(pool)``.
    in_memory: bool = True

    #: Whether the pool builds in-memory LightningModules of any weights and scores them on the suite
    #: (:meth:`model`, :meth:`expert_model`, :meth:`evaluate`, :meth:`reference_key`): the run then scores the
    #: pretrained model, the experts and single-task rows too. Otherwise a merge is written to disk
    #: (:meth:`write_merged`) and scored from there by the suite's ``evaluate_checkpoint``.
    scorable: bool = True

    #: Whether :meth:`setup` needs an evaluation suite (its tasks pick, build and check the experts). A pool that
    #: does not can be set up with ``suite=None`` (``eval=none``: merge only).
    needs_suite: bool = True

    #: Whether the pool may run under a multi-process trainer (DDP/FSDP, every rank re-running the command).
    multi_process: bool = True

    #: Whether the pool hands out batches of each task's examples (:meth:`task_batches`) and the classification
    #: logits of one of its models on them (:meth:`task_logits`), for methods that learn from data (Fisher merging,
    #: RegMean, AdaMerging). Needs ``scorable`` (the models are in memory).
    task_data: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A concrete pool declaring a capability must define the methods behind it (the base only raises)."""
        super().__init_subclass__(**kwargs)
        if getattr(cls.setup, "__isabstractmethod__", False):
            return  # still abstract: checked on its concrete subclasses
        if cls.scorable and not cls.in_memory:
            raise TypeError(f"{cls.__name__}: scorable=True needs in_memory=True (it scores in-memory state dicts)")
        if cls.task_data and not cls.scorable:
            raise TypeError(f"{cls.__name__}: task_data=True needs scorable=True (it runs in-memory models)")
        for capability, names in CAPABILITY_METHODS.items():
            missing = [n for n in names if getattr(cls, capability) and getattr(cls, n) is getattr(ModelPool, n)]
            if missing:
                raise TypeError(f"{cls.__name__} declares {capability}=True but does not define {missing}")

    def __init__(
        self,
        experts: Mapping[str, str | None] | None = None,
        exclude: Sequence[str] = (),
        cache_dir: str = "~/.cache/mergelab",
        trust_remote_code: bool = False,
    ) -> None:
        self.expert_paths: dict[str, str | None] | None = dict(experts) if experts is not None else None
        warn_repeated_experts(self.expert_paths or {})
        try:
            self.exclude = [re.compile(p) for p in exclude]
        except re.error as e:
            raise ValueError(f"model.exclude: invalid regex: {e}") from e
        self.cache_dir = Path(cache_dir).expanduser()
        self.trust_remote_code = trust_remote_code
        self.tasks: list[str] = []
        self.model_type = ""
        #: task -> the expert's checkpoint (as given, or the dir it was built into); set by :meth:`setup`.
        self.resolved: dict[str, str] = {}
        #: suite task (a table column) -> the expert it is scored against; the identity unless a suite scores
        #: other tasks than the experts' (lm-eval benchmarks); set by :meth:`setup`.
        self.expert_of: dict[str, str] = {}
        self._expert_states: dict[str, tv.StateDict] = {}

    # ------------------------------------------------------------------------------------------- every pool

    @abstractmethod
    def setup(self, suite: Any, trainer_kwargs: Mapping[str, Any]) -> None:
        """Resolve (building if needed) and load every model; check they fit together and fit ``suite``.

        ``suite`` is None for a merge-only run (``eval=none``), which only pools with ``needs_suite = False``
        accept (see :meth:`check_suite`).
        """

    def check_inputs(self, suite: Any) -> None:  # noqa: B027 - optional hook
        """Checks of the pool's inputs that are cheap (headers, configs, tokenizer files), run before the run starts
        its loggers; a pool whose checks need its models loaded makes them in :meth:`setup`."""

    def check_suite(self, suite: Any) -> None:
        """Refuse ``suite=None`` (``eval=none``) unless the pool merges without one; a one-line ValueError."""
        if suite is None and self.needs_suite:
            raise ValueError(
                f"eval=none only applies to checkpoint pools (merge only): {self.describe()} needs an evaluation "
                "suite (e.g. eval=embedded)"
            )

    def check_method(self, method: Any, where: str) -> None:
        """Raise a ValueError naming ``where`` (e.g. "method 'ties'") if the pool cannot merge with ``method``.

        Every pool refuses a method that learns from the tasks' data (``needs_task_data``) unless it has
        ``task_data``; a pool that refuses more extends this.
        """
        if getattr(method, "needs_task_data", False) and not self.task_data:
            raise PoolCapabilityError(
                f"{where} learns from the tasks' examples, but {self.describe()} cannot "
                f"{CAPABILITIES['task_data']} (task_data=False); use a classifier pool (e.g. model=minilm_embedded)"
            )

    def write_merged(self, method: Any, out_dir: str | Path, overwrite: bool = False) -> Path:
        """Merge with ``method`` and write the merged model to ``out_dir`` (atomically); returns the dir.

        In memory: :meth:`save_merged` of ``method.run(self)``; a streaming pool merges straight to disk.
        """
        out = Path(out_dir)
        if overwrite and out.exists():
            shutil.rmtree(out)
        return self.save_merged(method.run(self), out)

    def describe(self) -> str:
        """How messages name the pool: its class (and its kind, when more specific than "model pool")."""
        name = f"model pool {type(self).__name__}"
        return name if self.kind == ModelPool.kind else f"{name} ({self.kind})"

    def require(self, capability: str, what: str) -> None:
        """Raise a :class:`PoolCapabilityError` naming the pool and ``capability`` when the pool lacks it."""
        if not getattr(self, capability):
            raise PoolCapabilityError(
                f"{self.describe()} cannot {what}: it cannot {CAPABILITIES[capability]} ({capability}=False)"
            )

    def task_paths(self, task_names: Sequence[str]) -> dict[str, str | None]:
        """Task -> configured expert (None: build it); sets :attr:`tasks`. Every suite task needs an entry."""
        paths = dict(self.expert_paths) if self.expert_paths is not None else dict.fromkeys(task_names)
        missing = [t for t in task_names if t not in paths]
        if missing:
            raise ValueError(f"model pool has no expert for suite task(s) {missing}; experts: {sorted(paths)}")
        self.tasks = list(task_names)
        self.expert_of = {t: t for t in task_names}
        return paths

    def columns_of(self, task: str) -> list[str]:
        """The suite tasks ``task``'s expert is the reference of (itself, unless :attr:`expert_of` says otherwise)."""
        return [c for c, e in self.expert_of.items() if e == task]

    def check_architecture(self, where: str, model_type: str) -> None:
        """An expert must be the pretrained model's architecture (``self.model_type``)."""
        if model_type != self.model_type:
            raise ValueError(
                f"{where}: architecture '{model_type}' differs from the pretrained model's '{self.model_type}'"
            )

    def add_expert(
        self, task: str, path: str, where: str, base: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]
    ) -> None:
        """Keep ``task``'s expert weights for the keys of ``base``, after checking names and shapes match."""
        check_compatible(base, state, where)
        self.resolved[task] = path
        self._expert_states[task] = {k: state[k].detach() for k in base}

    @contextmanager
    def tensor_sources(self) -> Iterator[PoolSources]:
        """The pretrained and expert weights of the merged tensors as :class:`TensorSource` s (task order)."""
        base = self.mergeable(self.pretrained_state())
        yield PoolSources(
            DictSource(base), [DictSource(self.mergeable(s)) for s in self.expert_states()], list(base), "the pool"
        )

    def is_mergeable(self, name: str, tensor: torch.Tensor) -> bool:
        """Floating-point parameters not matched by ``exclude``."""
        return tensor.is_floating_point() and not any(p.search(name) for p in self.exclude)

    def mergeable(self, state: Mapping[str, torch.Tensor]) -> tv.StateDict:
        """The subset of a state dict that merge methods operate on."""
        return {k: v for k, v in state.items() if self.is_mergeable(k, v)}

    def check_pretrained(self, base: Mapping[str, torch.Tensor], where: str) -> None:
        """Refuse pretrained weights holding NaN/inf, or of which the pool's selection (``exclude``) merges nothing
        (a run would then report the pretrained model as a merge); called by ``setup`` before experts are built."""
        check_finite(base, where)
        if base and not self.mergeable(base):
            raise ValueError(
                f"model.exclude={[p.pattern for p in self.exclude]} leaves no floating-point tensor of the {where} to "
                f"merge (of {len(base)}, e.g. '{next(iter(base))}'): nothing would be merged"
            )

    # ------------------------------------------------------------------------------ in_memory pools only

    def pretrained_state(self) -> tv.StateDict:
        """The pretrained weights of the merged part of the model (``in_memory``)."""
        self.require("in_memory", "give its pretrained weights as a state dict")
        raise NotImplementedError(f"{type(self).__name__} declares in_memory but does not define pretrained_state")

    def expert_states(self) -> list[tv.StateDict]:
        """The experts' weights (same keys as :meth:`pretrained_state`), in task order (``in_memory``)."""
        self.require("in_memory", "give its experts' weights as state dicts")
        return [self._expert_states[t] for t in self.tasks]

    def save_merged(self, state: Mapping[str, torch.Tensor], out_dir: str | Path) -> Path:
        """Write the model with the merged weights ``state`` to ``out_dir`` (atomically); returns the dir
        (``in_memory``)."""
        self.require("in_memory", "write a merged state dict")
        raise NotImplementedError(f"{type(self).__name__} declares in_memory but does not define save_merged")

    # ------------------------------------------------------------------------------- scorable pools only

    def model(
        self, state: Mapping[str, torch.Tensor] | None = None, tasks: Sequence[str] | None = None
    ) -> L.LightningModule:
        """A module scoring ``tasks`` (default: all) with the pretrained weights and ``state`` (possibly partial).

        Its ``backbone`` attribute holds the merged part of the model (what :meth:`pretrained_state` covers).
        (``scorable``)
        """
        self.require("scorable", "build an in-memory model to score")
        raise NotImplementedError(f"{type(self).__name__} declares scorable but does not define model")

    def expert_model(self, task: str) -> L.LightningModule:
        """The expert of ``task`` alone, scoring the suite tasks it is the reference of (``scorable``)."""
        self.require("scorable", "build an expert's model to score")
        return self.model(self._expert_states[task], self.columns_of(task))

    def evaluate(
        self,
        model: L.LightningModule,
        split: str,
        trainer_kwargs: Mapping[str, Any],
        tasks: Sequence[str] | None = None,
        callbacks: Sequence[L.Callback] = (),
    ) -> Scores:
        """Scores of ``model`` on ``split`` of the suite's ``tasks``, under ``trainer.test`` with ``callbacks``
        (``scorable``)."""
        self.require("scorable", "score an in-memory model")
        raise NotImplementedError(f"{type(self).__name__} declares scorable but does not define evaluate")

    def reference_key(self, task: str | None = None) -> dict[str, Any]:
        """What identifies the pretrained model (``task=None``) or ``task``'s expert, for caching their scores
        (``scorable``)."""
        self.require("scorable", "identify its reference models for cached scores")
        raise NotImplementedError(f"{type(self).__name__} declares scorable but does not define reference_key")

    # ------------------------------------------------------------------------------ task_data pools only

    def task_batches(
        self, task: str, split: str, max_examples: int | None, batch_size: int, seed: int, shuffle: bool = False
    ) -> list[dict[str, torch.Tensor]]:
        """Batches of ``split`` of ``task``: the first ``max_examples`` of a seeded shuffle (all when None), each
        a dict of model inputs plus ``labels``; with ``shuffle`` the batches are drawn in a seeded random order
        (``task_data``)."""
        self.require("task_data", "give a task's examples")
        raise NotImplementedError(f"{type(self).__name__} declares task_data but does not define task_batches")

    def task_logits(self, model: nn.Module, task: str, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The ``[examples, classes]`` logits of ``model`` (built by :meth:`model` with ``task`` among its tasks) on
        ``batch``, differentiable with respect to ``model.backbone``'s parameters (``task_data``)."""
        self.require("task_data", "run a model on a task's examples")
        raise NotImplementedError(f"{type(self).__name__} declares task_data but does not define task_logits")

    def task_data_key(self, task: str) -> dict[str, Any] | None:
        """What identifies ``task``'s expert and its data, for caching statistics computed from them (Fisher
        diagonals, Gram matrices); None: do not cache (``task_data``)."""
        self.require("task_data", "identify a task's data")
        suite = getattr(self, "suite", None)
        return {**self.reference_key(task), "data": getattr(suite, "fingerprint", None)}

    # ------------------------------------------------------------------------------------------- views

    def transformed(self, transform: Callable[[Block, list[torch.Tensor]], Sequence[torch.Tensor]]) -> TransformedPool:
        """This pool with every expert replaced by theta_0 + ``transform(block, task vectors)`` (in memory)."""
        return TransformedPool(self, transform)


class TransformedPool:
    """``pool`` with every expert replaced by theta_0 + transform(tau_t): what the inner method of a wrapping method
    (AWD's tau_t - delta, DARE's drop) sees when it learns from the pool (:meth:`ModelPool.transformed`).

    Everything else (tasks, models, data, capabilities) is the pool's own. The transformed experts are formed once,
    on first use, in memory (the methods that learn from a pool need it in memory). Statistics computed on them are
    not cached on disk (:meth:`task_data_key` is None): they depend on the wrapper.
    """

    def __init__(self, pool: Any, transform: Callable[[Block, list[torch.Tensor]], Sequence[torch.Tensor]]) -> None:
        self.pool, self.transform = pool, transform
        self._states: list[tv.StateDict] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)

    def expert_states(self) -> list[tv.StateDict]:
        """Every expert with its mergeable tensors replaced by theta_0 + transform(tau_t), in the expert's dtype."""
        if self._states is None:
            base = self.pool.pretrained_state()
            experts = self.pool.expert_states()
            mergeable = self.pool.mergeable(base)
            out = [dict(e) for e in experts]
            sources = [DictSource(e) for e in experts]
            for name, b in mergeable.items():
                chunk = load_chunk(Block(name, 0, None, None, tuple(b.shape)), DictSource(mergeable), sources)
                vectors = self.transform(chunk.block, list(chunk.vectors))
                for state, v in zip(out, vectors, strict=True):
                    state[name] = (chunk.base + v).to(state[name].dtype)
            self._states = out
        return self._states

    def tensor_sources(self) -> Any:
        return ModelPool.tensor_sources(self)  # type: ignore[arg-type]

    def transformed(self, transform: Callable[[Block, list[torch.Tensor]], Sequence[torch.Tensor]]) -> TransformedPool:
        return TransformedPool(self, transform)  # a wrapper inside a wrapper: the transforms compose

    def expert_model(self, task: str) -> Any:
        return self.pool.model(self.expert_states()[self.pool.tasks.index(task)], self.pool.columns_of(task))

    def task_data_key(self, task: str) -> None:
        return None


#: The methods a pool declaring each capability must define itself (the base only raises).
CAPABILITY_METHODS = {
    "in_memory": ("pretrained_state", "save_merged"),
    "scorable": ("model", "evaluate", "reference_key"),
    "task_data": ("task_batches", "task_logits"),
}


def check_pool(obj: Any, where: str = "model") -> ModelPool:
    """``obj`` when it implements the pool interface, else a TypeError naming the config key ``where``.

    This validates what a config built; what a pool can do is read from its capability flags, never its type.
    """
    if not isinstance(obj, ModelPool):
        raise TypeError(f"{where}: {type(obj).__name__} is not a model pool (mergelab.pools.base.ModelPool)")
    return obj
