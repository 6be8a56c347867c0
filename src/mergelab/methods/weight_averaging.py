"""Weight averaging: theta = (1/T) sum_t theta_t."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from mergelab.methods.base import TaskVectorMethod


class WeightAveraging(TaskVectorMethod):
    """Uniform average of the experts, written as theta_0 + mean_t tau_t (identical up to rounding)."""

    def merge_chunk(self, name: str, chunk: int, vectors: Sequence[Tensor]) -> Tensor:
        w = 1.0 / len(vectors)
        out = vectors[0] * w
        for v in vectors[1:]:
            out.add_(v, alpha=w)
        return out
