"""Task arithmetic (Ilharco et al. 2023): theta = theta_0 + lambda * sum_t w_t tau_t."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from mergelab import task_vectors as tv
from mergelab.engine.chunks import Block
from mergelab.engine.scratch import ChunkVectors
from mergelab.methods.base import TaskVectorMethod, check_expert_weights, check_range, expert_weights


class TaskArithmetic(TaskVectorMethod):
    """Sum of task vectors, each weighted by its expert's ``weights`` entry, scaled by one coefficient ``scaling``.

    Args:
        scaling: lambda, >= 0 (the coefficient a grid tunes).
        weights: per-expert weights w_t: null (all 1), a list in expert order, or {expert: weight} (experts left out
            weigh 1). Negative weights subtract a task vector: the model forgets that task (task negation).
    """

    parallel_chunks = True  # merge_chunk is a pure function of the chunk

    def __init__(self, scaling: float = 0.3, weights: Mapping[str, float] | Sequence[float] | None = None) -> None:
        check_range("scaling", scaling, 0.0, float("inf"), low_open=False, high_open=True)
        self.scaling = float(scaling)
        self.weights = check_expert_weights(weights, negative=True)

    def expert_options(self) -> dict[str, Any]:
        return {"weights": self.weights}

    def coefficients(self, n: int) -> list[float]:
        """lambda * w_t for the ``n`` experts, in the order the merge sees them."""
        names = self.expert_names(n)
        return [self.scaling * w for w in expert_weights(self.weights, names)]

    def merge_chunk(self, block: Block, vectors: Sequence[Tensor]) -> Tensor:
        return tv.weighted_sum(vectors, self.coefficients(len(vectors)), out=ChunkVectors.of(vectors).output_buffer())
