"""Weight averaging: theta = (1/T) sum_t theta_t."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from mergelab import task_vectors as tv
from mergelab.engine.chunks import Block, is_scratch
from mergelab.methods.base import TaskVectorMethod


class WeightAveraging(TaskVectorMethod):
    """Uniform average of the experts, written as theta_0 + mean_t tau_t (identical up to rounding)."""

    parallel_chunks = True  # merge_chunk is a pure function of the chunk

    def merge_chunk(self, block: Block, vectors: Sequence[Tensor]) -> Tensor:
        out = vectors[0] if is_scratch(vectors) else None  # accumulate in the engine's buffer
        return tv.weighted_sum(vectors, [1.0 / len(vectors)] * len(vectors), out=out)
