"""SCE (Select, Calculate, Erase; FuseChat, Wan et al. 2024, arXiv 2408.07990) as MergeKit's ``sce``.

Per tensor, with task vectors d_t:
- select: keep the coordinates whose variance over the experts (population variance) is among the top
  ``select_topk`` fraction of the tensor's non-zero variances (all coordinates when select_topk = 1);
- calculate: w_t = sum(d_t^2) / numel over the selected d_t, normalised to sum to 1 (uniform when all are 0);
- erase: the majority sign is + where sum_t d_t >= 0, else -; only d_t whose sign equals it count;
- theta = theta_0 + scaling * sum_t w_t d_t [agrees] / sum_t w_t [agrees] (1 where nothing agrees).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import torch
from torch import Tensor

from mergelab import task_vectors as tv
from mergelab.config_types import Doc, Range
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
from mergelab.methods.magnitude_threshold import MagnitudeRanks
from mergelab.methods.mergekit_terms import read_unit_interval_value


class SceMergeKit(MergeKitMapping):
    """MergeKit's ``sce`` (``select_topk``; no per-model parameters) for scaling 1 (MergeKit has no scale)."""

    reads = (MergeKitMethod("sce", {"int8_mask": False, "select_topk": 1.0}, {}),)

    def export(self, method: Any, n_experts: int) -> Exported:
        if method.scaling != 1.0:
            raise NotExpressible(
                f"SCE with scaling={method.scaling:g}: MergeKit's sce adds the merged task vector unscaled "
                "(method.scaling=1 is expressible)"
            )
        notes = [
            "the variance selection: MergeKit's topk keeps an arbitrary subset of the entries tied with the threshold, "
            "mergelab keeps them all",
            "where the agreeing weights sum to 0 MergeKit divides by 1e-6, mergelab by 1 (the merged entry is 0 "
            "either way); below 1e-6 MergeKit's clamp differs",
        ]
        return Exported("sce", {}, {"select_topk": method.select_topk}, notes)

    def read(self, config: MergeKitInput) -> Import:
        topk = read_unit_interval_value(config, "parameters.select_topk", config.shared["select_topk"])
        return config.imported(["method=sce", f"method.select_topk={topk!r}", "method.scaling=1.0"])


def variance(vectors: Sequence[Tensor]) -> Tensor:
    """Population variance over the experts of each coordinate (float32, added in task order)."""
    mean = tv.ordered_sum(vectors).div_(len(vectors))
    return tv.ordered_sum([(v - mean).square_() for v in vectors]).div_(len(vectors))


class SCE(TaskVectorMethod):
    """theta_0 + scaling * erase-weighted mean of the variance-selected task vectors (see the module docstring).

    Args:
        select_topk: fraction of each tensor's non-zero-variance coordinates kept, in (0, 1]; 1 keeps all
            (MergeKit's default; FuseChat uses 0.1).
        scaling: factor on the merged task vector (1 = MergeKit, which has none).

    Streams: the variance threshold is the exact k-th largest float32 variance of the tensor
    (:class:`MagnitudeRanks`, passes 1-2, which also count the zero variances), and pass 3 adds up each task's
    sum of squares as per-row float64 sums added exactly. Coordinates tied with the threshold are all kept, where
    MergeKit's ``topk`` keeps an arbitrary subset of them.
    """

    parallel_chunks = True
    elementwise = True

    reference = (
        "Wan et al. 2024, FuseChat: Knowledge Fusion of Chat Models (SCE: select, calculate, erase), arXiv 2408.07990"
    )
    mergekit = SceMergeKit()

    def __init__(
        self,
        select_topk: Annotated[
            float, Range(0.0, 1.0, low_open=True), Doc("fraction of each tensor's non-zero variances kept")
        ] = 0.1,
        scaling: Annotated[float, Range(low=0.0), Doc("factor on the merged task vector (MergeKit: 1)")] = 1.0,
    ) -> None:
        self.select_topk, self.scaling = float(select_topk), float(scaling)
        self._select = self.select_topk < 1.0
        self.stat_passes = (MagnitudeRanks.passes if self._select else 0) + 1

    def begin(self, names: Sequence[str]) -> None:
        self._ranks = MagnitudeRanks(self._keep_rank)
        self._zeros: dict[str, int] = {}
        self._squares: dict[str, list[list[Tensor]]] = {}
        self._weights: dict[str, list[float]] = {}

    def _count(self, key: str, numel: int) -> int:
        """How many variances are kept: int(select_topk * non-zero count) (MergeKit)."""
        return int(self.select_topk * (numel - self._zeros[key]))

    def _keep_rank(self, key: str, numel: int) -> list[list[int]]:
        return [[max(1, self._count(key, numel))]]

    def chunk_statistics(self, pass_idx: int, block: Block, vectors: Sequence[Tensor]) -> Any:
        if self._select and pass_idx < MagnitudeRanks.passes:
            var = variance(vectors).unsqueeze(0)
            zeros = int((var == 0).sum()) if pass_idx == 0 else 0
            return self._ranks.chunk_statistics(pass_idx, block.name, var, inplace=True), zeros
        return [tv.row_squared_sums(v) for v in self.select(block, vectors)]

    def add_statistics(self, pass_idx: int, block: Block, stats: Any) -> None:
        if self._select and pass_idx < MagnitudeRanks.passes:
            hist, zeros = stats
            self._zeros[block.name] = self._zeros.get(block.name, 0) + zeros
            self._ranks.add_statistics(pass_idx, block.name, hist)
            return
        acc = self._squares.setdefault(block.name, [[] for _ in stats])
        for a, s in zip(acc, stats, strict=True):
            a.append(s)

    def end_pass(self, pass_idx: int) -> None:
        if self._select and pass_idx < MagnitudeRanks.passes:
            self._ranks.end_pass(pass_idx)
            return
        for name, per_task in self._squares.items():
            sq = [tv.exact_sum(parts) for parts in per_task]
            total = sum(sq)
            self._weights[name] = [s / total for s in sq] if total > 0 else [1.0 / len(sq)] * len(sq)
        self._squares = {}

    def select(self, block: Block, vectors: Sequence[Tensor]) -> list[Tensor]:
        """The task vectors of ``block`` with the coordinates outside the top-variance selection zeroed."""
        if not self._select:
            return list(vectors)
        if self._count(block.name, self._ranks.numel(block.name)) == 0:
            return [torch.zeros_like(v) for v in vectors]
        threshold = self._ranks.values(block.name)[0][0]
        kept = variance(vectors) >= threshold
        return [v * kept for v in vectors]

    def merge_chunk(self, block: Block, vectors: Sequence[Tensor]) -> Tensor:
        selected = self.select(block, vectors)
        majority = torch.where(tv.ordered_sum(selected) >= 0, 1.0, -1.0).to(selected[0].dtype)
        agree = [(torch.sign(d) == majority).to(d.dtype) for d in selected]
        weights = self._weights[block.name]
        erased = [a.mul_(w) for a, w in zip(agree, weights, strict=True)]
        mixed = tv.ordered_sum([d * e for d, e in zip(selected, erased, strict=True)])
        divisor = tv.ordered_sum(erased)
        return mixed.div_(divisor.masked_fill_(divisor == 0, 1.0)).mul_(self.scaling)
