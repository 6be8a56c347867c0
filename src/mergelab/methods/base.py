"""The method interface: ``run(pool) -> merged backbone state dict``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from mergelab import task_vectors as tv
from mergelab.engine.passes import combine_in_memory

if TYPE_CHECKING:
    from mergelab.text.pool import ClassifierPool


class MergeMethod(ABC):
    """A merge method turns the pretrained weights and the experts' weights into one set of weights."""

    #: Task names in expert order, set by :meth:`run` (for reports such as per-task coefficients).
    task_names: list[str] | None = None

    def run(self, pool: ClassifierPool) -> tv.StateDict:
        """Merge the shared (mergeable) parameters of ``pool``; unmerged ones stay pretrained."""
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

    def task_label(self, i: int) -> str:
        """Name of the i-th task vector for reports."""
        return self.task_names[i] if self.task_names and i < len(self.task_names) else str(i)


class TaskVectorMethod(MergeMethod):
    """Methods of the form theta_0 + f(tau_1, ..., tau_T), run chunk by chunk by :mod:`mergelab.engine.passes`.

    Subclasses implement :meth:`merge_chunk`; methods that need whole-model statistics (a global magnitude
    threshold, task-vector norms) declare ``stat_passes`` and accumulate them in :meth:`observe`. Methods
    whose result for a coordinate depends on other coordinates of the same tensor set ``elementwise = False``
    and then always see whole tensors.
    """

    stat_passes: int = 0
    elementwise: bool = True

    def merge(self, base: Mapping[str, Tensor], experts: Sequence[Mapping[str, Tensor]]) -> tv.StateDict:
        return tv.apply_task_vector(base, self.combine(tv.task_vectors(base, experts)))

    def combine(self, vectors: Sequence[Mapping[str, Tensor]]) -> tv.StateDict:
        """The merged task vector of in-memory task vectors."""
        return combine_in_memory(self, vectors)

    def begin(self, names: Sequence[str]) -> None:
        """Reset statistics before the first pass over ``names``."""

    def observe(self, pass_idx: int, name: str, chunk: int, vectors: Sequence[Tensor]) -> None:
        """Accumulate statistics from one chunk of every task vector."""

    def end_pass(self, pass_idx: int) -> None:
        """Turn the statistics of a finished pass into what the next pass needs."""

    @abstractmethod
    def merge_chunk(self, name: str, chunk: int, vectors: Sequence[Tensor]) -> Tensor:
        """The merged task vector for one chunk."""


def check_range(name: str, value: float, low: float, high: float, low_open: bool, high_open: bool) -> None:
    """Raise a ValueError naming the option when ``value`` lies outside the interval."""
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"method option '{name}' must be in {interval}, got {value}")


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    """Raise a ValueError naming the option when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"method option '{name}' must be one of {tuple(choices)}, got {value!r}")
