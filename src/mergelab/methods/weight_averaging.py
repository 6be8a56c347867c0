"""Weight averaging: theta = sum_t w_t theta_t / sum_t w_t (uniform by default)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from torch import Tensor

from mergelab import task_vectors as tv
from mergelab.config_types import Doc
from mergelab.engine.chunks import Block
from mergelab.engine.scratch import ChunkVectors
from mergelab.methods.base import TaskVectorMethod, check_expert_weights, expert_weights
from mergelab.methods.declaration import (
    REQUIRED,
    ExpertWeights,
    Exported,
    Import,
    MergeKitInput,
    MergeKitMapping,
    MergeKitMethod,
    same_or_each,
)


class WeightAveragingMergeKit(MergeKitMapping):
    """MergeKit's ``linear`` (``normalize: true``), the base listed with weight 0: it supplies the config, not a
    share of the average. Reading, a weighted mean with equal weights is weight averaging; models of weight 0 take
    no part in it."""

    reads = (MergeKitMethod("linear", {"normalize": True}, {"weight": REQUIRED}, base_in_models=True),)

    def export(self, method: Any, n_experts: int) -> Exported:
        weights = expert_weights(method.weights, method.expert_names(n_experts))
        return Exported("linear", same_or_each([{"weight": w} for w in weights]), {"normalize": True}, base_listed=True)

    def read(self, config: MergeKitInput) -> Import:
        fail, base, weights = config.fail, config.base, config.column("weight")
        if not config.shared["normalize"]:
            raise fail("parameters.normalize", "false sums the models; mergelab's linear is weight averaging")
        if base is not None and base not in config.experts.values():
            raise fail(
                "base_model",
                "not listed under models: MergeKit would add it to the average without a weight (list it with "
                "weight 0 to keep it out of the average)",
            )
        kept = {n: p for (n, p), w in zip(config.experts.items(), weights, strict=True) if w != 0}
        used = [w for w in weights if w != 0]
        if not used:
            raise fail("models[].parameters.weight", "every weight is 0")
        if min(used) < 0:
            raise fail(
                "models[].parameters.weight",
                f"{weights}: a weighted mean with negative weights is not an average (task negation: task_arithmetic)",
            )
        # The pretrained model only sets theta_0 of theta_0 + sum(w_t tau_t) / sum(w_t): the experts' mean either way.
        pretrained = base if base is not None else next(iter(config.experts.values()))
        overrides = ["method=weight_averaging"]
        if len(set(used)) > 1:  # a weighted mean: the weights by expert name
            overrides.append(
                "method.weights={" + ", ".join(f"{n}: {w!r}" for n, w in zip(kept, used, strict=True)) + "}"
            )
        return Import(pretrained, kept, overrides)


class WeightAveraging(TaskVectorMethod):
    """Weighted average of the experts, written as theta_0 + sum_t (w_t / sum_s w_s) tau_t (identical up to
    rounding).

    Args:
        weights: per-expert weights w_t >= 0, normalised to sum to 1: null (uniform), a list in expert order, or
            {expert: weight} (experts left out weigh 1).
    """

    parallel_chunks = True  # merge_chunk is a pure function of the chunk
    reference = (
        "Wortsman et al. 2022, Model soups: averaging weights of multiple fine-tuned models improves accuracy "
        "without increasing inference time, arXiv 2203.05482"
    )
    mergekit = WeightAveragingMergeKit()

    def __init__(
        self,
        weights: Annotated[
            ExpertWeights, Doc("per-expert w_t >= 0, normalised: null (uniform), a list or {expert: weight}")
        ] = None,
    ) -> None:
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
