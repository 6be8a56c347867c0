"""Task arithmetic (Ilharco et al. 2023): theta = theta_0 + lambda * sum_t tau_t."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from mergelab import task_vectors as tv
from mergelab.engine.chunks import Block, is_scratch
from mergelab.methods.base import TaskVectorMethod, check_range


class TaskArithmetic(TaskVectorMethod):
    """Sum of task vectors scaled by one coefficient ``scaling`` (lambda)."""

    parallel_chunks = True  # merge_chunk is a pure function of the chunk

    def __init__(self, scaling: float = 0.3) -> None:
        check_range("scaling", scaling, 0.0, float("inf"), low_open=False, high_open=True)
        self.scaling = float(scaling)

    def merge_chunk(self, block: Block, vectors: Sequence[Tensor]) -> Tensor:
        out = vectors[0] if is_scratch(vectors) else None  # accumulate in the engine's buffer
        return tv.weighted_sum(vectors, [self.scaling] * len(vectors), out=out)
