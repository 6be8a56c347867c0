"""Weight averaging: theta = sum_t w_t theta_t / sum_t w_t (uniform by default)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from mergelab import task_vectors as tv
from mergelab.engine.chunks import Block
from mergelab.engine.scratch import ChunkVectors
from mergelab.methods.base import TaskVectorMethod, check_expert_weights, expert_weights


class WeightAveraging(TaskVectorMethod):
    """Weighted average of the experts, written as theta_0 + sum_t (w_t / sum_s w_s) tau_t (identical up to
    rounding).

    Args:
        weights: per-expert weights w_t >= 0, normalised to sum to 1: null (uniform), a list in expert order, or
            {expert: weight} (experts left out weigh 1).
    """

    parallel_chunks = True  # merge_chunk is a pure function of the chunk

    def __init__(self, weights: Mapping[str, float] | Sequence[float] | None = None) -> None:
        self.weights = check_expert_weights(weights)

    def expert_options(self) -> dict[str, Any]:
        return {"weights": self.weights}

    def coefficients(self, n: int) -> list[float]:
        """w_t / sum_s w_s for the ``n`` experts (1/n each without weights)."""
        if self.weights is None:
            return [1.0 / n] * n
        names = self.expert_names(n)
        w = expert_weights(self.weights, names)
        return [v / sum(w) for v in w]

    def merge_chunk(self, block: Block, vectors: Sequence[Tensor]) -> Tensor:
        return tv.weighted_sum(vectors, self.coefficients(len(vectors)), out=ChunkVectors.of(vectors).output_buffer())
