"""Consensus merging with TALL masks (Wang et al., ICML 2024): drop the weights at most one task relies on.

TALL mask of task t: m_t = 1{|tau_t| >= tall_lambda * |tau_MTL - tau_t|} with tau_MTL = sum_s tau_s (the weights
where task t's own vector dominates what the other tasks add). Consensus mask: 1{sum_t m_t >= k}, i.e. weights
at least ``k`` tasks rely on; ``k = 2`` removes "selfish" (one task) and "catastrophic" (no task) weights. Each
tau_t is multiplied by the consensus mask and the result merged by ``merge`` (task arithmetic by default:
consensus TA; ``ties``: consensus TIES). Everything is per coordinate, so it streams in row blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import torch
from torch import Tensor

from mergelab.config_types import Doc, Range
from mergelab.engine.chunks import Block
from mergelab.engine.protocol import Sparsifier
from mergelab.methods.base import WrappedMethod


def tall_masks(vectors: Sequence[Tensor], tall_lambda: float) -> Tensor:
    """The TALL masks of one block, stacked ``[T, ...]``: |tau_t| >= tall_lambda * |tau_MTL - tau_t|."""
    total = torch.stack(list(vectors)).sum(0)
    return torch.stack([v.abs() >= (total - v).abs().mul_(tall_lambda) for v in vectors])


class Consensus(WrappedMethod, Sparsifier):
    """Consensus merging: keep each tau_t only where at least ``k`` TALL masks agree, then merge with ``merge``.

    Args:
        k: minimum number of tasks whose TALL mask keeps a weight (2 in the paper: drops selfish and catastrophic
            weights); an integer >= 0 (0 keeps every weight: plain ``merge``).
        tall_lambda: lambda of the TALL masks, > 0 (0.6, the value FusionBench and the paper's consensus runs use;
            the paper tunes it per task in [0.2, 0.6] for TALL-mask compression).
        merge: the method the masked task vectors go into (config node, conf/method name or instance).
    """

    reference = (
        "Wang et al. 2024, Localizing Task Information for Improved Model Merging and Compression, ICML 2024, "
        "arXiv 2405.07813"
    )
    mergekit = "consensus merging keeps the weights where enough tasks' TALL masks agree; MergeKit has no such mask"

    def __init__(
        self,
        k: Annotated[int, Range(low=0), Doc("tasks whose TALL masks must keep a weight (2 drops selfish ones)")] = 2,
        tall_lambda: Annotated[float, Range(low=0.0, low_open=True), Doc("lambda of the TALL masks")] = 0.6,
        merge: Annotated[Any, Doc("the method the masked vectors go into: a conf/method name or config")] = (
            "task_arithmetic"
        ),
    ) -> None:
        self.k, self.tall_lambda = int(k), float(tall_lambda)
        super().__init__(merge, "merge")

    def transform(self, block: Block, vectors: Sequence[Tensor]) -> list[Tensor]:
        """Each tau_t times the consensus mask of the block."""
        keep = tall_masks(vectors, self.tall_lambda).sum(0) >= self.k
        zero = torch.zeros((), dtype=vectors[0].dtype)
        return [torch.where(keep, v, zero) for v in vectors]
