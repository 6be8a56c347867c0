"""DELLA (Deep et al. 2024, arXiv 2406.11617) as MergeKit's ``della`` / ``della_linear``: MAGPRUNE, then a mix.

MAGPRUNE drops each task-vector coordinate at random with a keep probability that grows with its magnitude's rank
within its row: p = (density - epsilon) + 2 * epsilon * (rank - 1) / (n - 1), rank 1 the smallest of the row's n
magnitudes (ranks along dim 1, as MergeKit; a 1-D tensor is one row). Survivors are rescaled, then mixed
(:func:`mergelab.methods.breadcrumbs.mix`) and scaled by lambda.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import torch
from torch import Tensor

from mergelab import task_vectors as tv
from mergelab.config_types import Doc, Range, Requires
from mergelab.engine.chunks import Block, read_bounds, row_blocks
from mergelab.methods.base import (
    TaskVectorMethod,
    check_expert_weights,
    expert_values,
    expert_weights,
    given_values,
    per_expert_option,
)
from mergelab.methods.breadcrumbs import mix
from mergelab.methods.dare import MASK_BLOCK_ELEMS, random_masks_note, tensor_seed
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
from mergelab.methods.mergekit_terms import read_sparsified_mix, task_arithmetic_family


class DellaMergeKit(MergeKitMapping):
    """MergeKit's ``della`` / ``della_linear`` (per-model weight, density, epsilon; ``normalize``; ``rescale: true``
    is mergelab's ``l1``, MergeKit 0.1.5's L1-norm restoration; ``lambda`` = scaling)."""

    reads = (
        task_arithmetic_family("della", normalize=True, rescale=True, density=1.0, epsilon=0.15),
        task_arithmetic_family("della_linear", normalize=False, rescale=True, density=1.0, epsilon=0.15),
    )

    def export(self, method: Any, n_experts: int) -> Exported:
        if method.rescale == "probability":
            raise NotExpressible(
                "DELLA with rescale=probability divides each survivor by its keep probability (the paper); MergeKit "
                "0.1.5 restores each tensor's L1 norm (method.rescale=l1 or none is expressible)"
            )
        bands = method.keep_bands(method.expert_names(n_experts))
        pairs = zip(method.coefficients(n_experts), bands, strict=True)
        each = [{"weight": w, "density": d, "epsilon": e} for w, (d, e) in pairs]
        shared = {"normalize": method.normalize, "rescale": method.rescale == "l1", "lambda": method.scaling}
        notes = [random_masks_note(method.seed).replace("DARE's masks", "DELLA's drops")]
        return Exported("della" if method.consensus else "della_linear", same_or_each(each), shared, notes)

    def read(self, config: MergeKitInput) -> Import:
        return read_sparsified_mix(
            config, "epsilon", [f"method.rescale={'l1' if config.shared['rescale'] else 'none'}"]
        )


def uniforms(seed: int, block: Block, task: int) -> Tensor:
    """Uniform draws in [0, 1) for task ``task`` over ``block``'s rows, drawn per (seed, tensor, fixed row block of
    ``MASK_BLOCK_ELEMS`` elements, task) exactly as DARE's masks: the same values for any chunk size or thread count,
    in memory or streamed."""
    s, e = read_bounds(block.shape, block.start, block.stop)
    shape = block.shape
    if not shape or shape[0] == 0:
        return torch.rand(shape, generator=torch.Generator().manual_seed(tensor_seed(seed, block.name, task, 0)))
    assert s is not None and e is not None
    parts = []
    for c, (ms, me) in enumerate(row_blocks(shape, MASK_BLOCK_ELEMS)):
        lo, hi = (0, shape[0]) if ms is None or me is None else (ms, me)
        if hi <= s or lo >= e:
            continue
        gen = torch.Generator().manual_seed(tensor_seed(seed, block.name, task, c))
        full = torch.rand((hi - lo, *shape[1:]), generator=gen)
        parts.append(full[max(s, lo) - lo : min(e, hi) - lo])
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def rank_fraction(magnitudes: Tensor) -> Tensor:
    """(rank - 1) / (n - 1) of each entry among its row's n entries along dim 1 (rank 1 = smallest; ties in index
    order); a 1-D tensor is one row, a row of one entry gets 0.5. Float32."""
    rows = magnitudes.reshape(1, -1) if magnitudes.dim() < 2 else magnitudes
    n = rows.shape[1]
    if n < 2:
        return torch.full(magnitudes.shape, 0.5)
    order = torch.sort(rows.float(), dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n).view(1, -1, *([1] * (rows.dim() - 2))).expand_as(order))
    return (ranks.float() / (n - 1)).reshape(magnitudes.shape)


def band_fits(density: float, epsilon: float) -> bool:
    """Whether the keep probabilities density -/+ epsilon lie inside (0, 1) (a density of 1 keeps all: no band)."""
    return density >= 1.0 or (density - epsilon > 0.0 and density + epsilon < 1.0)


def bands_fit(density: Any, epsilon: Any) -> bool:
    """:func:`band_fits` for every (density, epsilon) pair the options give without the pool's expert names: two
    numbers, a number beside a list or mapping, two lists or two mappings (by position or name); a list beside a
    mapping pairs up only once the experts are known (:meth:`DELLA.keep_bands`)."""

    def entries(option: Any) -> dict[Any, float] | float:
        if isinstance(option, Mapping):
            return {str(k): float(v) for k, v in option.items()}
        return dict(enumerate(map(float, option))) if isinstance(option, list | tuple) else float(option)

    d, e = entries(density), entries(epsilon)
    if isinstance(d, dict) and isinstance(e, dict):
        pairs = [(d[k], e[k]) for k in d.keys() & e.keys()]
    elif isinstance(d, dict):
        pairs = [(v, e) for v in d.values()]
    elif isinstance(e, dict):
        pairs = [(d, v) for v in e.values()]
    else:
        pairs = [(d, e)]
    return all(band_fits(a, b) for a, b in pairs)


#: DELLA's keep probabilities density -/+ epsilon must be probabilities, expert by expert.
BAND = Requires(
    ("epsilon", "density"),
    bands_fit,
    "density -/+ epsilon must lie inside (0, 1) for each expert whose density is below 1",
)


class DELLA(TaskVectorMethod):
    """theta_0 + scaling * mix_t(w_t * magprune(tau_t)).

    Args:
        density: mean keep probability, in (0, 1]; 1 keeps every coordinate (MergeKit). One number, or per expert
            ({expert: density} naming every expert, or a list in expert order), as MergeKit's per-model ``density``.
        epsilon: half-width of the keep probabilities around ``density``: density -/+ epsilon must lie in (0, 1)
            for each expert. One number or per expert, as ``density`` (MergeKit's per-model ``epsilon``).
        weights: per-expert w_t (MergeKit per-model ``weight``): null (all 1), a list, or {expert: weight}.
        consensus: True: MergeKit ``della`` (TIES sign election by sum); False: ``della_linear`` (a weighted sum).
        normalize: divide by the sum of the (agreeing) weights (MergeKit ``normalize``: della true, della_linear
            false).
        rescale: ``l1``: each pruned tensor scaled back to its L1 norm (MergeKit 0.1.5's ``rescale: true``);
            ``probability``: each survivor divided by its keep probability (the DELLA paper); ``none``.
        scaling: lambda on the mixed vector (MergeKit ``lambda``).
        seed: the drops of a tensor's rows are drawn per (seed, tensor, fixed row block, task) (:func:`uniforms`).

    Streams: ranks are per row (rows are never split across blocks); a 1-D tensor's ranks need the whole vector,
    so statistics pass 1 gathers the magnitudes of 1-D tensors only (biases and norms: small). With ``l1``, pass 2
    sums each tensor's |tau| before and after pruning (per-row float64 sums, added exactly).
    """

    parallel_chunks = True
    elementwise = True
    reference = (
        "Deep et al. 2024, DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling, "
        "arXiv 2406.11617"
    )
    mergekit = DellaMergeKit()
    per_expert_values = ("density", "epsilon")
    requires = (BAND,)

    def __init__(
        self,
        density: Annotated[
            PerExpertFloat, Range(0.0, 1.0, low_open=True), Doc("mean keep probability; 1 keeps all; or per expert")
        ] = 0.7,
        epsilon: Annotated[
            PerExpertFloat,
            Range(0.0, 0.5, high_open=True),
            Doc("half-width of the keep probabilities around density; a number or per expert"),
        ] = 0.15,
        weights: Annotated[
            ExpertWeights, Doc("per-expert w_t (MergeKit weight): null (all 1), a list or {expert: weight}")
        ] = None,
        consensus: Annotated[bool, Doc("TIES sign election by sum (della); false: della_linear")] = True,
        normalize: Annotated[bool, Doc("divide by the sum of the (agreeing) weights (MergeKit normalize)")] = True,
        rescale: Annotated[
            Literal["l1", "probability", "none"],
            Doc("l1: restore each tensor's L1 norm (MergeKit rescale); probability: 1/p (the paper); none"),
        ] = "l1",
        scaling: Annotated[float, Range(low=0.0), Doc("lambda on the mixed task vector (MergeKit lambda)")] = 1.0,
        seed: Annotated[int, Doc("drops drawn per (seed, tensor, fixed row block, task)")] = 0,
    ) -> None:
        self.density, self.epsilon = per_expert_option(density), per_expert_option(epsilon)
        self.scaling, self.seed = float(scaling), int(seed)
        self.weights = check_expert_weights(weights, negative=True)
        self.consensus, self.normalize, self.rescale = bool(consensus), bool(normalize), rescale
        self.stat_passes = 0 if min(given_values(self.density)) >= 1.0 else (2 if rescale == "l1" else 1)

    def expert_options(self) -> dict[str, Any]:
        return {"weights": self.weights}

    def check_experts(self, names: Sequence[str]) -> None:
        super().check_experts(names)
        self.keep_bands(names)

    def keep_bands(self, names: Sequence[str]) -> list[tuple[float, float]]:
        """Each expert's (density, epsilon), for the experts ``names`` in merge order; refused (:data:`BAND`, naming
        the expert) where density -/+ epsilon leaves (0, 1): pairs a construction could not form (a list beside a
        mapping) are checked here."""
        densities = expert_values(self.density, names, "density")
        bands = list(zip(densities, expert_values(self.epsilon, names, "epsilon"), strict=True))
        for (density, epsilon), name in zip(bands, names, strict=True):
            BAND.check({"density": density, "epsilon": epsilon}, f"method option '{{}}' of expert {name!r}".format)
        return bands

    def coefficients(self, n: int) -> list[float]:
        """w_t for the ``n`` experts, in the order the merge sees them."""
        names = self.expert_names(n)
        return expert_weights(self.weights, names)

    # ------------------------------------------------------------------------------- statistics

    def begin(self, names: Sequence[str]) -> None:
        self._vectors_1d: dict[str, list[Tensor]] = {}  # 1-D tensors' magnitude blocks, then their rank fractions
        self._fractions: dict[str, Tensor] = {}
        self._l1: dict[str, list[list[float]]] = {}  # per tensor: per task [sum |tau|, sum |pruned tau|] row sums
        self._scales: dict[str, list[float]] = {}

    def chunk_statistics(self, pass_idx: int, block: Block, vectors: Sequence[Tensor]) -> Any:
        if pass_idx == 0:
            return torch.stack([v.abs().float() for v in vectors]) if len(block.shape) == 1 else None
        pruned = self._pruned(block, vectors, probability_rescale=False)
        return [(_abs_row_sums(v), _abs_row_sums(p)) for v, p in zip(vectors, pruned, strict=True)]

    def add_statistics(self, pass_idx: int, block: Block, stats: Any) -> None:
        if stats is None:
            return
        if pass_idx == 0:
            self._vectors_1d.setdefault(block.name, []).append(stats)
            return
        acc = self._l1.setdefault(block.name, [[] for _ in stats])
        for a, (before, after) in zip(acc, stats, strict=True):
            a.append((before, after))

    def end_pass(self, pass_idx: int) -> None:
        if pass_idx == 0:
            for name, parts in self._vectors_1d.items():
                mags = torch.cat(parts, dim=1)
                self._fractions[name] = torch.stack([rank_fraction(m) for m in mags])
            self._vectors_1d = {}
            return
        for name, per_task in self._l1.items():
            scales = []
            for pairs in per_task:
                before = tv.exact_sum([b for b, _ in pairs])
                after = tv.exact_sum([a for _, a in pairs])
                # MergeKit: no rescaling when either norm is below 1e-7
                scales.append(before / after if before >= 1e-7 and after >= 1e-7 else 1.0)
            self._scales[name] = scales
        self._l1 = {}

    # ------------------------------------------------------------------------------- merging

    def keep_probabilities(self, block: Block, task: int, magnitudes: Tensor, band: tuple[float, float]) -> Tensor:
        """Each coordinate's keep probability (float32) from its rank within its row, for the task's ``band``
        (density, epsilon)."""
        if len(block.shape) == 1:
            s, e = read_bounds(block.shape, block.start, block.stop)
            fraction = self._fractions[block.name][task, s:e]
        else:
            fraction = rank_fraction(magnitudes)
        density, epsilon = band
        return (density - epsilon) + fraction * (2 * epsilon)

    def _pruned(self, block: Block, vectors: Sequence[Tensor], probability_rescale: bool) -> list[Tensor]:
        out = []
        for i, (v, band) in enumerate(zip(vectors, self.keep_bands(self.expert_names(len(vectors))), strict=True)):
            if band[0] >= 1.0:  # MergeKit: a density of 1 keeps every entry
                out.append(v.clone())  # a copy: the rescaling below works in place
                continue
            p = self.keep_probabilities(block, i, v.abs(), band)
            kept = uniforms(self.seed, block, i) < p
            pruned = v * kept
            out.append(pruned.div_(p.to(pruned.dtype)) if probability_rescale else pruned)
        return out

    def sparsify(self, block: Block, vectors: Sequence[Tensor]) -> list[Tensor]:
        """Each task vector of ``block`` after MAGPRUNE and the rescaling."""
        if self.stat_passes == 0:
            return list(vectors)
        pruned = self._pruned(block, vectors, probability_rescale=self.rescale == "probability")
        if self.rescale == "l1":
            pruned = [p.mul_(s) for p, s in zip(pruned, self._scales[block.name], strict=True)]
        return pruned

    def merge_chunk(self, block: Block, vectors: Sequence[Tensor]) -> Tensor:
        merged = mix(self.sparsify(block, vectors), self.coefficients(len(vectors)), self.consensus, self.normalize)
        return merged.mul_(self.scaling)


def _abs_row_sums(t: Tensor) -> Tensor:
    """Sum of |x| of each row in float64 (each element for a 1-D tensor): a function of the row alone."""
    d = t.detach()
    if d.dim() <= 1:
        return d.reshape(-1).abs().to(torch.float64)
    return d.reshape(d.shape[0], -1).abs().to(torch.float64).sum(1)
