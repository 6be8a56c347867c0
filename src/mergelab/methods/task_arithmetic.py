"""Task arithmetic (Ilharco et al. 2023): theta = theta_0 + lambda * sum_t tau_t."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from mergelab import task_vectors as tv
from mergelab.methods.base import TaskVectorMethod, check_range


class TaskArithmetic(TaskVectorMethod):
    """Sum of task vectors scaled by one coefficient ``scaling`` (lambda)."""

    def __init__(self, scaling: float = 0.3) -> None:
        check_range("scaling", scaling, 0.0, float("inf"), low_open=False, high_open=True)
        self.scaling = float(scaling)

    def merge_chunk(self, name: str, chunk: int, vectors: Sequence[Tensor]) -> Tensor:
        return tv.weighted_sum(vectors, [self.scaling] * len(vectors))
