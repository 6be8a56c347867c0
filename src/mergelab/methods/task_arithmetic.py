"""Task arithmetic (Ilharco et al. 2023): theta = theta_0 + lambda * sum_t w_t tau_t."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from torch import Tensor

from mergelab import task_vectors as tv
from mergelab.config_types import Doc, Range
from mergelab.engine.chunks import Block
from mergelab.engine.scratch import ChunkVectors
from mergelab.methods.base import TaskVectorMethod, check_expert_weights, expert_weights
from mergelab.methods.declaration import ExpertWeights, Exported, Import, MergeKitInput, MergeKitMapping, same_or_each
from mergelab.methods.mergekit_terms import read_task_arithmetic, task_arithmetic_family


class TaskArithmeticMergeKit(MergeKitMapping):
    """MergeKit's ``task_arithmetic`` with per-model weight lambda * w_t (``normalize: false``); reading,
    ``normalize: true`` divides by the summed weights."""

    reads = (task_arithmetic_family("task_arithmetic", normalize=False, rescale=False),)

    def export(self, method: Any, n_experts: int) -> Exported:
        weights = [{"weight": c} for c in method.coefficients(n_experts)]
        return Exported("task_arithmetic", same_or_each(weights), {"normalize": False})

    def read(self, config: MergeKitInput) -> Import:
        terms = read_task_arithmetic(config, sign_election=False, dropped=False)
        overrides = ["method=task_arithmetic", f"method.scaling={terms.scaling!r}"]
        return config.imported(overrides + ([f"method.weights={terms.weights}"] if terms.weights else []))


class TaskArithmetic(TaskVectorMethod):
    """Sum of task vectors, each weighted by its expert's ``weights`` entry, scaled by one coefficient ``scaling``.

    Args:
        scaling: lambda, >= 0 (the coefficient a grid tunes).
        weights: per-expert weights w_t: null (all 1), a list in expert order, or {expert: weight} (experts left out
            weigh 1). Negative weights subtract a task vector: the model forgets that task (task negation).
    """

    parallel_chunks = True  # merge_chunk is a pure function of the chunk
    reference = "Ilharco et al. 2023, Editing Models with Task Arithmetic, arXiv 2212.04089"
    mergekit = TaskArithmeticMergeKit()

    def __init__(
        self,
        scaling: Annotated[float, Range(low=0.0), Doc("lambda, the coefficient of the weighted sum")] = 0.3,
        weights: Annotated[
            ExpertWeights, Doc("per-expert w_t: null (all 1), a list or {expert: weight}; < 0 forgets a task")
        ] = None,
    ) -> None:
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
