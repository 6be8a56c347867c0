"""What every merge method is: ``run(pool) -> merged state dict``, and the task-vector methods' chunk protocol.

A method of the form theta_0 + f(tau_1..tau_T) subclasses :class:`TaskVectorMethod` and implements the hooks of
:class:`mergelab.engine.protocol.ChunkMethod` (at least ``merge_chunk``); it then merges in memory and streams
from disk through the same pass driver. A method wrapping another one (DARE, AWD, MetaGPT's sparsification) takes
it as a config node with ``_target_``, a conf/method YAML name, or an instance (:func:`build_method`), so any
method, including one added later, composes with them.
"""

from __future__ import annotations

import copy
import itertools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from mergelab import task_vectors as tv
from mergelab.config_types import Requires, check_option_types
from mergelab.engine.chunks import Block
from mergelab.engine.forwarding import ForwardsPasses, View
from mergelab.engine.passes import combine_in_memory, merge_in_memory
from mergelab.engine.protocol import ChunkMethod, Sparsifier
from mergelab.method_config import named_method_config
from mergelab.methods.declaration import checked_init

if TYPE_CHECKING:
    from mergelab.pools.base import ModelPool

#: Keys of a method's config that are not constructor options: its row name, its tuning grid, Hydra's defaults.
NOT_METHOD_OPTIONS = ("name", "grid", "defaults")


class MergeMethod(ABC):
    """A merge method turns the pretrained weights and the experts' weights into one set of weights."""

    #: Task names in expert order, set by :meth:`run` (for reports such as per-task coefficients).
    task_names: list[str] | None = None

    #: Whether :meth:`prepare` learns something from the pool (AWD's delta; Fisher, RegMean and AdaMerging from
    #: the tasks' data). A method wrapping one (DARE, AWD) then prepares it on the pool as it sees it: experts
    #: whose task vectors are the wrapper's transformed ones (``ModelPool.transformed``).
    learns_from_pool: bool = False

    #: Whether the method needs each task's examples from the pool (``ModelPool.task_data``): pools without them
    #: refuse it before any work (``ModelPool.check_method``).
    needs_task_data: bool = False

    #: Conditions between the constructor's options (one option's allowed values depending on another's), checked
    #: on construction and printed in the docs: declared once, beside the options' own annotations.
    requires: tuple[Requires, ...] = ()

    #: How many experts the method merges (SLERP: exactly one, the other end being the pretrained model); None: any
    #: number. A pool with another count is refused before any work (:meth:`check_experts`), a MergeKit config with
    #: another count when read, and the conformance tests run such a method on a pool of that many experts.
    expert_count: int | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every method's own constructor checks its arguments against its annotations (type, range, choices) before
        it runs, however the method is built (config, Python, a wrapper's inner method): :func:`checked_init`."""
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = checked_init(cls.__dict__["__init__"])  # type: ignore[method-assign]

    def run(self, pool: ModelPool) -> tv.StateDict:
        """Merge the shared (mergeable) parameters of ``pool``; unmerged ones stay pretrained.

        A method that learns from the pool is prepared first (a no-op when the run flow already prepared it).
        """
        if self.learns_from_pool:
            self.prepare(pool)
        self.task_names = list(pool.tasks)
        return self.merge(pool.mergeable(pool.pretrained_state()), [pool.mergeable(s) for s in pool.expert_states()])

    @abstractmethod
    def merge(self, base: Mapping[str, Tensor], experts: Sequence[Mapping[str, Tensor]]) -> tv.StateDict:
        """Merged parameters for every key of ``base``."""

    def report(self) -> dict[str, Any]:
        """Scalars the method computed and wants logged (e.g. per-task coefficients)."""
        return {}

    def prepare(
        self,
        pool: Any,
        trainer_kwargs: Mapping[str, Any] | None = None,
        loggers: Sequence[Any] = (),
        work_dir: str | Path | None = None,
    ) -> None:
        """Work that needs the run's Lightning trainer settings before merging (AWD's fit); none by default.

        ``work_dir``: where the method may write what it learns when that is too large for memory (streaming runs
        pass the method's artifacts dir).
        """
        return None

    def single_task_states(self, pool: Any) -> dict[str, tv.StateDict]:
        """Per-task weights to score each alone on its own task (AWD's tau_t - delta); none by default."""
        return {}

    def save_artifacts(self, out_dir: str | Path) -> None:
        """Write what the method learned (e.g. AWD's delta and plots) into ``out_dir``; nothing by default."""
        return None

    def expert_names(self, n: int) -> list[str]:
        """The names the method's per-expert options are keyed by for ``n`` experts, in the order the merge sees
        them: :attr:`task_names` (set by :meth:`run` or the streaming merge), else their positions."""
        names = self.task_names
        return list(names) if names and len(names) == n else [str(i) for i in range(n)]

    def expert_options(self) -> dict[str, Any]:
        """The method's per-expert options (option key -> checked value), checked against the pool's experts before
        any work (:meth:`check_experts`); none by default."""
        return {}

    #: Options (attribute = option name) that are one number or one per expert (:data:`PerExpertFloat`): a mapping
    #: of them names every expert (:func:`expert_values`), where a weights mapping may leave experts out.
    per_expert_values: tuple[str, ...] = ()

    def check_experts(self, names: Sequence[str]) -> None:
        """Refuse a pool of another number of experts than :attr:`expert_count`, and per-expert options that name
        experts the pool does not have, or list another number of them."""
        if names and self.expert_count is not None and len(names) != self.expert_count:
            raise ValueError(expert_count_error(type(self), len(names), names))
        for key, option in self.expert_options().items():
            expert_weights(option, names, key)
        for key in self.per_expert_values:
            expert_values(getattr(self, key), names, key)

    def values_per_expert(self, key: str, n: int) -> list[float]:
        """The option ``key`` (one of :attr:`per_expert_values`) for each of ``n`` experts, in merge order."""
        return expert_values(getattr(self, key), self.expert_names(n), key)

    def task_label(self, i: int) -> str:
        """Name of the i-th task vector for reports."""
        return self.task_names[i] if self.task_names and i < len(self.task_names) else str(i)


class TaskVectorMethod(MergeMethod, ChunkMethod):
    """Methods of the form theta_0 + f(tau_1, ..., tau_T), run block by block by :mod:`mergelab.engine.passes`.

    The hooks, their call order and their contracts are declared on :class:`~mergelab.engine.protocol.ChunkMethod`;
    subclasses implement :meth:`merge_chunk` and, for whole-model statistics, ``stat_passes`` with
    ``chunk_statistics`` / ``add_statistics`` / ``end_pass``.
    """

    def merge(self, base: Mapping[str, Tensor], experts: Sequence[Mapping[str, Tensor]]) -> tv.StateDict:
        return merge_in_memory(self, base, experts)

    def combine(
        self, vectors: Sequence[Mapping[str, Tensor]], base: Mapping[str, Tensor] | None = None
    ) -> tv.StateDict:
        """The merged task vector of in-memory task vectors (formed against ``base``, which a method that
        ``needs_base`` requires)."""
        return combine_in_memory(self, vectors, base=base)


class WrappedMethod(ForwardsPasses, TaskVectorMethod):
    """A task-vector method that runs ``inner`` on transformed task vectors (DARE's drop, AWD's tau - delta).

    Every hook forwards to ``inner`` with :meth:`transform` applied to the block's vectors (the statistics hooks
    through :class:`~mergelab.engine.forwarding.ForwardsPasses`), so the wrapper streams, parallelises and tunes
    exactly as its inner method does.
    """

    def __init__(self, inner: Any, option: str) -> None:
        self.inner: TaskVectorMethod = build_method(inner, option, TaskVectorMethod)
        self.stat_passes, self.elementwise = self.inner.stat_passes, self.inner.elementwise
        self.parallel_chunks, self.needs_base = self.inner.parallel_chunks, self.inner.needs_base
        self._view: Any = None  # the pool as inner sees it (ModelPool.transformed), formed once per pool

    @abstractmethod
    def transform(self, block: Block, vectors: Sequence[Tensor]) -> Sequence[Tensor]:
        """The task vectors ``inner`` sees for ``block`` (thread-safe; may overwrite scratch ``vectors``)."""

    @property
    def needs_task_data(self) -> bool:  # type: ignore[override]
        return bool(self.inner.needs_task_data)

    @property
    def learns_from_pool(self) -> bool:  # type: ignore[override]
        return type(self).prepare_wrapper is not WrappedMethod.prepare_wrapper or self.inner.learns_from_pool

    def prepare_wrapper(
        self,
        pool: Any,
        trainer_kwargs: Mapping[str, Any] | None,
        loggers: Sequence[Any],
        work_dir: str | Path | None,
    ) -> None:
        """What the wrapper itself learns before ``inner`` is prepared (AWD's delta); nothing by default."""
        return None

    def prepare(
        self,
        pool: Any,
        trainer_kwargs: Mapping[str, Any] | None = None,
        loggers: Sequence[Any] = (),
        work_dir: str | Path | None = None,
    ) -> None:
        """Prepare the wrapper, then ``inner`` on ``pool`` as ``inner`` sees it: every expert theta_0 plus its
        transformed task vector (so Fisher / RegMean statistics and AdaMerging's coefficients are those of the
        experts it merges)."""
        if getattr(pool, "tasks", None):  # the transform's per-expert options (DARE's p) are keyed by them
            self.task_names = list(pool.tasks)
        self.prepare_wrapper(pool, trainer_kwargs, loggers, work_dir)
        if self.inner.learns_from_pool:
            if self._view is None or self._view.pool is not pool:
                self._view = pool.transformed(self.transform)
            self.inner.prepare(self._view, trainer_kwargs, loggers, work_dir)

    def forwarded_to(self) -> ChunkMethod:
        return self.inner

    def forwarded_view(self) -> View:
        return self.transform

    def begin(self, names: Sequence[str]) -> None:
        self.inner.task_names = self.task_names  # set by run(pool) or stream_merge before the passes begin
        super().begin(names)

    def merge_chunk(self, block: Block, vectors: Sequence[Tensor]) -> Tensor:
        return self.inner.merge_chunk(block, self.transform(block, vectors))

    def sparsify_chunk(self, block: Block, vectors: Sequence[Tensor]) -> Sequence[Tensor]:
        """The transformed vectors, sparsified further by ``inner`` when it can (see :class:`Sparsifier`)."""
        out = self.transform(block, vectors)
        return self.inner.sparsify_chunk(block, out) if isinstance(self.inner, Sparsifier) else out

    def report(self) -> dict[str, Any]:
        return self.inner.report()

    def check_experts(self, names: Sequence[str]) -> None:
        super().check_experts(names)
        self.inner.check_experts(names)


def expert_count_error(cls: type, n: int, names: Sequence[str]) -> str:
    """Why a merge of ``n`` experts (``names``) is refused by ``cls``, which merges :attr:`MergeMethod.expert_count`."""
    count = cls.expert_count  # type: ignore[attr-defined]
    word = {1: "one", 2: "two", 3: "three"}.get(count, str(count))
    plural = "s" if count != 1 else ""
    return (
        f"{cls.__name__} merges the pretrained model with exactly {word} expert{plural} (MergeKit: base_model and "
        f"{word} other model{plural}); the pool has {n} experts {list(names)}: keep {word}"
    )


# ----------------------------------------------------------------------------------------------- building


def strip_config_keys(node: Any) -> Any:
    """A method config without :data:`NOT_METHOD_OPTIONS`, nested method nodes too."""
    if isinstance(node, Mapping):
        is_method = "_target_" in node
        return {k: strip_config_keys(v) for k, v in node.items() if not (is_method and k in NOT_METHOD_OPTIONS)}
    if isinstance(node, (list, tuple)):
        return [strip_config_keys(v) for v in node]
    return node


def option_summary(node: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A method config's options as flat ``{option: value}`` for tables: a nested method node becomes its name
    under its key plus its own options as ``key.option`` (``{"merge": "ties", "merge.k": 20, ...}``). Options left
    null (unset: the method's default behaviour, e.g. no per-expert weights) are left out."""
    out: dict[str, Any] = {}
    for k, v in node.items():
        if k in NOT_METHOD_OPTIONS or k.startswith("_") or v is None:
            continue
        if isinstance(v, Mapping) and "_target_" in v:
            out[prefix + k] = v.get("name", str(v["_target_"]).rsplit(".", 1)[-1])
            out.update(option_summary(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def set_option(node: dict[str, Any], key: str, value: Any) -> None:
    """Set a (dotted) option of a method config; an inner method given by name is expanded to its config first
    (:func:`~mergelab.method_config.named_method_config`)."""
    *path, leaf = key.split(".")
    for part in path:
        inner = node.get(part)
        if isinstance(inner, str):
            inner = node[part] = named_method_config(inner)
        if not isinstance(inner, dict):
            raise ValueError(f"grid key '{key}': '{part}' is not a method config (got {inner!r})")
        node = inner
    node[leaf] = value


def grid_candidates(
    node: Mapping[str, Any], tune: bool, build: Callable[[dict[str, Any]], Any]
) -> list[tuple[dict[str, Any], Any]]:
    """The method built at each point of its config's ``grid`` (only as configured when not tuning).

    ``node`` is a resolved method config (``_target_``, options, ``name``, ``grid`` with possibly dotted keys such
    as ``merge.scaling``); ``build`` instantiates a config without its ``name``/``grid``. Every candidate is built
    up front, so an out-of-range value fails before any work is done, with the method's name in the message.
    Returns ``(params, method)``: the grid point when tuning, else every option (:func:`option_summary`).
    """
    grid = dict(node.get("grid") or {}) if tune else {}
    keys = list(grid)
    points = [dict(zip(keys, vals, strict=True)) for vals in itertools.product(*(grid[k] for k in keys))] or [{}]
    out = []
    for point in points:
        cfg = copy.deepcopy(dict(node))
        try:
            for k, v in point.items():
                set_option(cfg, k, v)
            check_option_types(cfg, label=lambda key: f"method option '{key}'")
            method = build(strip_config_keys(cfg))
        except ValueError as e:
            raise ValueError(f"method '{node.get('name')}': {e}") from e
        out.append((point if grid else option_summary(cfg), method))
    return out


def build_method(spec: Any, option: str, kind: type = TaskVectorMethod) -> Any:
    """The method ``spec`` names, for the wrapping method's option ``option``.

    ``spec``: an instance, a config mapping with ``_target_`` (e.g. a Hydra node), or the name of a
    ``conf/method`` YAML (its defaults, composed and resolved by :func:`~mergelab.method_config.named_method_config`).
    Raises a ValueError naming the option when it is none of these or the built object is not a ``kind``.
    """
    if isinstance(spec, str):
        try:
            spec = named_method_config(spec)
        except ValueError as e:
            raise ValueError(f"method option '{option}': {e}") from None
    if isinstance(spec, Mapping) and not isinstance(spec, dict):
        from omegaconf import OmegaConf

        spec = OmegaConf.to_container(spec, resolve=True)  # type: ignore[arg-type]
    if isinstance(spec, Mapping):
        if "_target_" not in spec:
            raise ValueError(f"method option '{option}': a method config needs '_target_', got keys {sorted(spec)}")
        from hydra.errors import InstantiationException
        from hydra.utils import instantiate

        try:
            spec = instantiate(strip_config_keys(spec), _convert_="all")
        except InstantiationException as e:
            cause = e.__cause__ or e
            raise ValueError(f"method option '{option}': {cause}") from None
    if not isinstance(spec, kind):
        raise ValueError(f"method option '{option}' must be a {kind.__name__}, got {type(spec).__name__}")
    return spec


# ----------------------------------------------------------------------------------------------- option checks


def check_expert_weights(option: Any, key: str = "weights", negative: bool = False) -> Any:
    """A per-expert weights option checked for form and values: null, a list (expert order) or an expert -> weight
    mapping (experts left out weigh 1); each finite, >= 0 unless ``negative`` (task arithmetic: subtracting a task
    vector makes a model forget its task), not all 0. The names and count are checked against the pool by
    :func:`expert_weights` when it is known."""
    if option is None:
        return None
    if isinstance(option, Mapping):
        values = list(option.values())
    elif isinstance(option, list | tuple):
        values = list(option)
    else:
        raise ValueError(f"method option '{key}' must be null, a list or a mapping (expert: weight), got {option!r}")
    finite = all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    signs = "finite numbers" if negative else "finite numbers >= 0"
    if not values or not finite or (not negative and min(values) < 0) or not any(values):
        raise ValueError(f"method option '{key}' must be {signs}, not all 0, got {option!r}")
    return {str(k): float(v) for k, v in option.items()} if isinstance(option, Mapping) else [float(v) for v in values]


def expert_weights(option: Any, tasks: Sequence[str], key: str = "weights", default: float | None = 1.0) -> list[float]:
    """The per-expert weights of a checked option, in expert order (null: all 1); unknown names or a wrong count
    are refused naming the option and the pool's experts. ``default``: the value of an expert a mapping leaves
    out (None: refused)."""
    if option is None:
        return [1.0] * len(tasks)
    if isinstance(option, Mapping):
        unknown = sorted(set(option) - set(tasks))
        if unknown:
            raise ValueError(f"method option '{key}' names unknown expert(s) {unknown}; experts: {list(tasks)}")
        missing = [t for t in tasks if t not in option]
        if missing and default is None:
            raise ValueError(f"method option '{key}' gives no value for expert(s) {missing}; experts: {list(tasks)}")
        return [float(option.get(t, default)) for t in tasks]
    if len(option) != len(tasks):
        raise ValueError(f"method option '{key}' has {len(option)} values for {len(tasks)} experts {list(tasks)}")
    return [float(v) for v in option]


def per_expert_option(option: Any) -> float | dict[str, float] | list[float]:
    """A :data:`PerExpertFloat` option (form and ranges checked by the constructor's annotation) in plain form: a
    number stays one float (so a uniform value merges as it did before per-expert values), a mapping
    {expert: value} or a list in expert order becomes floats."""
    if isinstance(option, Mapping):
        return {str(k): float(v) for k, v in option.items()}
    if isinstance(option, list | tuple):
        return [float(v) for v in option]
    return float(option)


def expert_values(option: Any, tasks: Sequence[str], key: str) -> list[float]:
    """A :func:`per_expert_option` for each expert in ``tasks`` (expert order): a number for all, else the list
    or mapping checked against the experts as weights are, with a mapping naming every expert."""
    if isinstance(option, int | float):
        return [float(option)] * len(tasks)
    return expert_weights(option, tasks, key, default=None)


def given_values(option: float | Mapping[str, float] | Sequence[float]) -> list[float]:
    """Every value a :func:`per_expert_option` gives, whichever experts they are for."""
    if isinstance(option, Mapping):
        return list(option.values())
    return [option] if isinstance(option, float) else list(option)
