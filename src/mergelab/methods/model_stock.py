"""Model Stock (Jang et al. 2024, arXiv 2403.19522) as MergeKit's ``model_stock``.

Per tensor, with N >= 2 experts and cos the mean over expert pairs of cos(tau_i, tau_j):
t = N cos / (1 + (N - 1) cos) and theta = t * mean_t theta_t + (1 - t) theta_0 = theta_0 + t * mean_t tau_t.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Annotated, Any

import torch
from torch import Tensor

from mergelab.config_types import Doc
from mergelab.engine.chunks import Block
from mergelab.methods.base import TaskVectorMethod
from mergelab.methods.declaration import (
    Exported,
    Import,
    MergeKitInput,
    MergeKitMapping,
    MergeKitMethod,
    NotExpressible,
)
from mergelab.methods.tensor_gram import TensorGrams


class ModelStockMergeKit(MergeKitMapping):
    """MergeKit's ``model_stock`` (``filter_wise``; no per-model parameters; the base plus two or more models)."""

    reads = (MergeKitMethod("model_stock", {"filter_wise": False}, {}),)

    def export(self, method: Any, n_experts: int) -> Exported:
        if n_experts < 2:
            raise NotExpressible("Model Stock needs at least 2 experts (MergeKit: the base plus two or more models)")
        notes = ["the cosines: MergeKit computes them in the checkpoint's dtype, mergelab in float32/float64"]
        return Exported("model_stock", {}, {"filter_wise": method.filter_wise}, notes)

    def read(self, config: MergeKitInput) -> Import:
        if len(config.experts) < 2:
            raise config.fail("models", "Model Stock needs the base plus two or more models")
        return config.imported(
            ["method=model_stock", f"method.filter_wise={str(config.shared['filter_wise']).lower()}"]
        )


def interpolation(cos: Tensor | float, n: int) -> Tensor | float:
    """Model Stock's ratio t = N cos / (1 + (N - 1) cos)."""
    return (n * cos) / (1 + (n - 1) * cos)


def mean_pair_cosine(vectors: Sequence[Tensor], dim: int | None) -> Tensor:
    """Mean over pairs i < j of cos(v_i, v_j) along ``dim`` (None: over all coordinates), each clamped to [-1, 1]
    with the norm product clamped at 1e-6 (MergeKit). Float32, with a kept last dimension when ``dim`` is given."""
    cos = []
    for a, b in itertools.combinations(vectors, 2):
        if dim is None:
            dot, norms = (a * b).sum(), a.norm() * b.norm()
        else:
            dot, norms = (a * b).sum(dim, keepdim=True), a.norm(dim=dim, keepdim=True) * b.norm(dim=dim, keepdim=True)
        cos.append((dot / norms.clamp(min=1e-6)).clamp(-1, 1))
    return torch.stack(cos).mean(0)


class ModelStock(TaskVectorMethod):
    """theta_0 + t * mean_t tau_t, t from the experts' mean pairwise cosine (per tensor, or per row).

    Args:
        filter_wise: False: one t per tensor (cosines over all its coordinates); True: one t per row of the last
            dimension (MergeKit's ``filter_wise``; a 1-D tensor is one row).

    Needs at least two experts (MergeKit: the base plus two or more models). The per-tensor cosines stream: one
    statistics pass adds up, per tensor, the pairwise dot products and squared norms as per-row float64 sums
    added exactly, so they do not depend on the chunking.
    """

    parallel_chunks = True
    elementwise = True
    stat_passes = 1
    reference = "Jang et al. 2024, Model Stock: All we need is just a few fine-tuned models, arXiv 2403.19522"
    mergekit = ModelStockMergeKit()

    def __init__(
        self, filter_wise: Annotated[bool, Doc("one t per row (last dimension) instead of per tensor")] = False
    ) -> None:
        self.filter_wise = bool(filter_wise)

    def _whole(self, block: Block) -> bool:
        """Whether ``block``'s tensor takes one t (its cosines over the whole tensor)."""
        return not self.filter_wise or len(block.shape) < 2

    def begin(self, names: Sequence[str]) -> None:
        self._grams = TensorGrams()
        self._t: dict[str, float] = {}

    def chunk_statistics(self, pass_idx: int, block: Block, vectors: Sequence[Tensor]) -> Any:
        if len(vectors) < 2:
            raise ValueError(f"Model Stock needs at least 2 experts (the base plus two or more), got {len(vectors)}")
        return TensorGrams.block_parts(vectors) if self._whole(block) else None

    def add_statistics(self, pass_idx: int, block: Block, stats: Any) -> None:
        if stats is not None:
            self._grams.add(block.name, stats)

    def end_pass(self, pass_idx: int) -> None:
        for name, gram in self._grams.matrices().items():
            n = gram.shape[0]
            norms = gram.diagonal().sqrt()
            cos = [
                float((gram[i, j] / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
                for i, j in itertools.combinations(range(n), 2)
            ]
            self._t[name] = float(interpolation(sum(cos) / len(cos), n))

    def merge_chunk(self, block: Block, vectors: Sequence[Tensor]) -> Tensor:
        mean = vectors[0].clone()
        for v in vectors[1:]:
            mean.add_(v)
        mean.div_(len(vectors))
        if self._whole(block):
            return mean.mul_(self._t[block.name])
        return mean.mul_(interpolation(mean_pair_cosine(vectors, dim=-1), len(vectors)))
