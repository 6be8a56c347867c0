"""The method interface: ``run(pool) -> merged backbone state dict``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

from mergelab import task_vectors as tv

if TYPE_CHECKING:
    from mergelab.modelpool import ModelPool


class MergeMethod(ABC):
    """A merge method turns the pretrained weights and the experts' weights into one set of weights."""

    def run(self, pool: ModelPool) -> tv.StateDict:
        """Merge the shared (mergeable) parameters of ``pool``; unmerged ones stay pretrained."""
        return self.merge(pool.mergeable(pool.pretrained_state()), [pool.mergeable(s) for s in pool.expert_states()])

    @abstractmethod
    def merge(self, base: Mapping[str, Tensor], experts: Sequence[Mapping[str, Tensor]]) -> tv.StateDict:
        """Merged parameters for every key of ``base``."""

    def report(self) -> dict[str, Any]:
        """Quantities the method computed and wants logged (e.g. per-task coefficients)."""
        return {}


class TaskVectorMethod(MergeMethod):
    """Methods of the form theta_0 + combine(tau_1, ..., tau_T).

    Subclasses implement :meth:`combine`; wrappers such as DARE transform the task vectors and delegate.
    """

    def merge(self, base: Mapping[str, Tensor], experts: Sequence[Mapping[str, Tensor]]) -> tv.StateDict:
        return tv.apply_task_vector(base, self.combine(tv.task_vectors(base, experts)))

    @abstractmethod
    def combine(self, vectors: Sequence[Mapping[str, Tensor]]) -> tv.StateDict:
        """The merged task vector."""


def check_range(name: str, value: float, low: float, high: float, low_open: bool, high_open: bool) -> None:
    """Raise a ValueError naming the option when ``value`` lies outside the interval."""
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"method option '{name}' must be in {interval}, got {value}")
