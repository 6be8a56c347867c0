"""Model Breadcrumbs (Davari & Belilovsky 2024, arXiv 2312.06795), as MergeKit's ``breadcrumbs`` / ``breadcrumbs_ties``.

Each task vector loses its ``gamma`` fraction of largest magnitudes (outliers) and then its smallest ones, keeping a
``density`` fraction; the survivors are mixed as MergeKit's generalized task arithmetic does (:func:`mix`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

import torch
from torch import Tensor

from mergelab import task_vectors as tv
from mergelab.config_types import Doc, Range
from mergelab.engine.chunks import Block
from mergelab.methods.base import (
    TaskVectorMethod,
    check_expert_weights,
    expert_weights,
    given_values,
    per_expert_option,
)
from mergelab.methods.declaration import (
    ExpertWeights,
    Exported,
    Import,
    MergeKitInput,
    MergeKitMapping,
    NotExpressible,
    PerExpertFloat,
    same_or_each,
)
from mergelab.methods.magnitude_threshold import MagnitudeRanks
from mergelab.methods.mergekit_terms import read_sparsified_mix, task_arithmetic_family


def mix(sparse: Sequence[Tensor], weights: Sequence[float], consensus: bool, normalize: bool) -> Tensor:
    """MergeKit's generalized task-arithmetic mix of sparsified task vectors ``sparse`` with per-expert ``weights``.

    d_t = w_t * sparse_t. Without ``consensus``: sum_t d_t, divided by sum_t w_t (1 when |.| < 1e-8) if
    ``normalize``. With ``consensus`` (TIES's sign election by sum): the majority sign is + where sum_t d_t >= 0,
    else -; only the d_t whose sign equals it are summed, divided by the sum of their w_t (1 where 0) if
    ``normalize``. Zeros never agree, so they are not counted.
    """
    weighted = [s * w for s, w in zip(sparse, weights, strict=True)]
    if not consensus:
        mixed = tv.ordered_sum(weighted)
        total = sum(weights)
        return mixed.div_(total if abs(total) >= 1e-8 else 1.0) if normalize else mixed
    majority = torch.where(tv.ordered_sum(weighted) >= 0, 1.0, -1.0).to(weighted[0].dtype)
    agree = [torch.sign(d) == majority for d in weighted]
    mixed = tv.ordered_sum([d * a for d, a in zip(weighted, agree, strict=True)])
    if not normalize:
        return mixed
    divisor = tv.ordered_sum([a.to(mixed.dtype) * w for a, w in zip(agree, weights, strict=True)])
    return mixed.div_(divisor.masked_fill_(divisor == 0, 1.0))


def breadcrumb_ranks(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """(largest magnitudes removed, magnitudes kept after them) for ``numel`` coordinates, as MergeKit counts them:
    kept int(density * n); removed from the top int(gamma * n), fewer when both do not fit."""
    keep = int(density * numel)
    top = min(int(gamma * numel), numel - keep)
    return top, keep


class BreadcrumbsMergeKit(MergeKitMapping):
    """MergeKit's ``breadcrumbs`` / ``breadcrumbs_ties`` (per-model weight, density, gamma; ``normalize``;
    ``lambda`` = scaling; no ``rescale``) for per-tensor pruning."""

    reads = (
        task_arithmetic_family("breadcrumbs", normalize=False, rescale=False, density=1.0, gamma=0.01),
        task_arithmetic_family("breadcrumbs_ties", normalize=False, rescale=False, density=1.0, gamma=0.01),
    )

    def export(self, method: Any, n_experts: int) -> Exported:
        if method.prune != "per_tensor":
            raise NotExpressible(
                "Breadcrumbs with prune=global ranks magnitudes over the whole model; MergeKit's breadcrumbs trims "
                "each tensor on its own (method.prune=per_tensor is expressible)"
            )
        columns = zip(method.coefficients(n_experts), *method.sparsifier_values(n_experts), strict=True)
        each = [{"weight": w, "density": d, "gamma": g} for w, d, g in columns]
        shared = {"normalize": method.normalize, "rescale": False, "lambda": method.scaling}
        notes = [
            "the kept band: MergeKit sorts each tensor's magnitudes and keeps an arbitrary subset of those tied with a "
            "bound, mergelab keeps (lower bound) or drops (upper bound) every tied entry"
        ]
        return Exported("breadcrumbs_ties" if method.consensus else "breadcrumbs", same_or_each(each), shared, notes)

    def read(self, config: MergeKitInput) -> Import:
        if config.shared["rescale"]:
            raise config.fail("parameters.rescale", "true: mergelab's Breadcrumbs does not rescale the kept entries")
        return read_sparsified_mix(config, "gamma", ["method.prune=per_tensor"])


class Breadcrumbs(TaskVectorMethod):
    """theta_0 + scaling * mix_t(w_t * breadcrumb(tau_t)): outliers and small magnitudes of each tau_t removed.

    Args:
        density: fraction of each task vector's coordinates kept, in (0, 1]; 1 keeps everything (no outlier
            removal either, as MergeKit). One number, or per expert ({expert: density} naming every expert, or a
            list in expert order), as MergeKit's per-model ``density``.
        gamma: fraction of the largest magnitudes removed first, in [0, 1); fewer when density + gamma > 1. One
            number or per expert, as ``density`` (MergeKit's per-model ``gamma``).
        weights: per-expert w_t (MergeKit's per-model ``weight``): null (all 1), a list in expert order, or
            {expert: weight}; negative subtracts a task vector.
        consensus: False: MergeKit's ``breadcrumbs`` (a weighted sum); True: ``breadcrumbs_ties`` (TIES's sign
            election by sum, then only agreeing entries).
        normalize: divide by the sum of the (agreeing) weights, as MergeKit's ``normalize`` (default off).
        scaling: lambda applied to the mixed vector (MergeKit's ``lambda``).
        prune: ``per_tensor`` ranks within each tensor (MergeKit); ``global`` over the whole model.

    The two magnitudes bounding the kept band are found exactly and streamed (:class:`MagnitudeRanks`): a
    coordinate is kept when lo <= |x| < hi, so coordinates tied in magnitude with a bound are all kept (lo) or all
    removed (hi), where MergeKit's sort keeps an arbitrary subset of the tied ones.
    """

    parallel_chunks = True
    elementwise = True
    reference = (
        "Davari & Belilovsky 2024, Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks, "
        "arXiv 2312.06795"
    )
    mergekit = BreadcrumbsMergeKit()
    per_expert_values = ("density", "gamma")

    def __init__(
        self,
        density: Annotated[
            PerExpertFloat,
            Range(0.0, 1.0, low_open=True),
            Doc("fraction of each task vector kept; 1 keeps all (no outlier removal either); a number or per expert"),
        ] = 0.9,
        gamma: Annotated[
            PerExpertFloat,
            Range(0.0, 1.0, high_open=True),
            Doc("fraction of the largest magnitudes removed first; a number or per expert"),
        ] = 0.01,
        weights: Annotated[
            ExpertWeights,
            Doc("per-expert w_t (MergeKit weight): null (all 1), a list or {expert: weight}; < 0 subtracts"),
        ] = None,
        consensus: Annotated[bool, Doc("TIES sign election by sum (MergeKit breadcrumbs_ties)")] = False,
        normalize: Annotated[bool, Doc("divide by the sum of the (agreeing) weights (MergeKit normalize)")] = False,
        scaling: Annotated[float, Range(low=0.0), Doc("lambda on the mixed task vector (MergeKit lambda)")] = 1.0,
        prune: Annotated[
            Literal["per_tensor", "global"], Doc("rank magnitudes per tensor (MergeKit) or over the whole model")
        ] = "per_tensor",
    ) -> None:
        self.density, self.gamma = per_expert_option(density), per_expert_option(gamma)
        self.scaling, self.prune = float(scaling), prune
        self.weights = check_expert_weights(weights, negative=True)
        self.consensus, self.normalize = bool(consensus), bool(normalize)
        self.stat_passes = 0 if min(given_values(self.density)) >= 1.0 else MagnitudeRanks.passes

    def expert_options(self) -> dict[str, Any]:
        return {"weights": self.weights}

    def sparsifier_values(self, n: int) -> tuple[list[float], list[float]]:
        """Each of the ``n`` experts' density and gamma, in merge order."""
        return self.values_per_expert("density", n), self.values_per_expert("gamma", n)

    def coefficients(self, n: int) -> list[float]:
        """w_t for the ``n`` experts, in the order the merge sees them."""
        names = self.expert_names(n)
        return expert_weights(self.weights, names)

    def _key(self, block: Block) -> str:
        return "" if self.prune == "global" else block.name

    def begin(self, names: Sequence[str]) -> None:
        self._ranks = MagnitudeRanks(self._band_ranks)
        self._n_tasks = 0

    def _band_ranks(self, key: str, numel: int) -> list[list[int]]:
        """Per task, the ranks bounding its kept band (unused for a task that keeps everything)."""
        ranks = []
        for density, gamma in zip(*self.sparsifier_values(self._n_tasks), strict=True):
            top, keep = breadcrumb_ranks(numel, density, gamma)
            ranks.append([max(top, 1), max(top + keep, 1)])
        return ranks

    def chunk_statistics(self, pass_idx: int, block: Block, vectors: Sequence[Tensor]) -> Any:
        stacked = torch.stack([v.float() for v in vectors])
        return self._ranks.chunk_statistics(pass_idx, self._key(block), stacked, inplace=True)

    def add_statistics(self, pass_idx: int, block: Block, stats: Any) -> None:
        if pass_idx == 0:
            self._n_tasks = int(stats[0].shape[0])
        self._ranks.add_statistics(pass_idx, self._key(block), stats)

    def end_pass(self, pass_idx: int) -> None:
        self._ranks.end_pass(pass_idx)

    def sparsify(self, block: Block, vectors: Sequence[Tensor]) -> list[Tensor]:
        """Each task vector of ``block`` with only its kept band of magnitudes."""
        if self.stat_passes == 0:
            return list(vectors)
        key = self._key(block)
        out = []
        bounds = zip(vectors, self._ranks.values(key), *self.sparsifier_values(len(vectors)), strict=True)
        for v, (hi, lo), density, gamma in bounds:
            if density >= 1.0:  # MergeKit: no outlier removal either
                out.append(v)
                continue
            top, keep = breadcrumb_ranks(self._ranks.numel(key), density, gamma)
            mag = v.abs().float()
            kept = (mag >= lo) if keep > 0 else torch.zeros_like(mag, dtype=torch.bool)
            if top > 0:
                kept &= mag < hi
            out.append(v * kept)
        return out

    def merge_chunk(self, block: Block, vectors: Sequence[Tensor]) -> Tensor:
        merged = mix(self.sparsify(block, vectors), self.coefficients(len(vectors)), self.consensus, self.normalize)
        return merged.mul_(self.scaling)
