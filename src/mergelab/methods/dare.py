"""DARE (Yu et al. 2024): drop each task-vector coordinate with probability p, rescale, then merge."""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import torch
from torch import Tensor

from mergelab import task_vectors as tv
from mergelab.config_types import Doc, Range
from mergelab.engine.chunks import DEFAULT_CHUNK_ELEMS, Block, read_bounds, row_blocks
from mergelab.engine.passes import combine_in_memory
from mergelab.engine.protocol import Sparsifier
from mergelab.methods.base import WrappedMethod, per_expert_option
from mergelab.methods.declaration import (
    Exported,
    Import,
    MergeKitInput,
    MergeKitMapping,
    NotExpressible,
    PerExpertFloat,
    decimal,
    same_or_each,
)
from mergelab.methods.mergekit_terms import read_task_arithmetic, task_arithmetic_family, ties_parameters
from mergelab.methods.task_arithmetic import TaskArithmetic
from mergelab.methods.ties import TIES, TIES_NOTES
from mergelab.methods.weight_averaging import WeightAveraging

#: DARE draws its masks on these fixed row blocks of each tensor, whatever blocks the engine hands it, so the
#: same seed gives the same masks for any chunk size, thread count, and in memory or streamed.
MASK_BLOCK_ELEMS = DEFAULT_CHUNK_ELEMS


def tensor_seed(seed: int, name: str, index: int, chunk: int = 0) -> int:
    """A seed for one (parameter, mask block, task) that does not depend on the order tensors are visited in."""
    return (seed * 1_000_003 + zlib.crc32(f"{name}#{chunk}".encode()) * 31 + index) % (2**63 - 1)


def drop_and_rescale(
    t: Tensor, p: float, generator: torch.Generator | None = None, mask: Tensor | None = None
) -> Tensor:
    """DARE: zero each coordinate with probability ``p`` and rescale the survivors by 1 / (1 - p).

    ``mask`` (True = keep) may be injected; otherwise it is drawn from ``generator``.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"DARE drop rate p must be in [0, 1), got {p}")
    if mask is None:
        mask = torch.rand(t.shape, generator=generator) >= p
    return torch.where(mask, t / (1.0 - p), torch.zeros((), dtype=t.dtype))


def random_masks_note(seed: int) -> str:
    """Why a random drop's merge is reproduced by mergelab, not by MergeKit (which draws its own masks)."""
    return (
        f"DARE's masks are random: MergeKit draws its own; `mergelab mergekit=mergekit_config.yml seed={seed}` draws "
        f"these (method.seed {seed})"
    )


class DareMergeKit(MergeKitMapping):
    """DARE into task arithmetic (or weight averaging) as MergeKit's ``dare_linear``, into TIES with k=100 and
    per-tensor pruning as ``dare_ties``; DARE's 1/(1-p) is folded into the weights (``rescale: false``), so MergeKit
    versions that rescale survivors to the task vector's norm instead give the same merge. Reading, ``rescale:
    true`` is DARE's 1/density."""

    reads = (
        task_arithmetic_family("dare_ties", normalize=False, rescale=True, density=1.0),
        task_arithmetic_family("dare_linear", normalize=False, rescale=True, density=1.0),
    )

    def export(self, method: Any, n_experts: int) -> Exported:
        densities, inner = [1.0 - p for p in method.values_per_expert("p", n_experts)], method.inner
        masks = random_masks_note(method.seed)
        if type(inner) in (TaskArithmetic, WeightAveraging):  # exact classes: a subclass may merge differently
            inner.task_names = inner.task_names or method.task_names  # as the merge passes them on (begin)
            pairs = zip(densities, inner.coefficients(n_experts), strict=True)
            each = [{"density": d, "weight": c / d} for d, c in pairs]
            return Exported("dare_linear", same_or_each(each), {"normalize": False, "rescale": False}, [masks])
        if type(inner) is TIES:
            if inner.prune != "per_tensor":  # its exact sign ties take the model's majority, MergeKit's the tensor's
                raise NotExpressible(
                    "DARE into TIES with prune=global elects the majority sign of exact ties over the whole model; "
                    "MergeKit's dare_ties works tensor by tensor (method.merge.prune=per_tensor is expressible)"
                )
            ks = sorted(set(inner.values_per_expert("k", n_experts)))
            if ks != [100.0]:
                shown = "/".join(f"{k:g}" for k in ks)
                raise NotExpressible(
                    f"DARE into TIES with k={shown}: MergeKit's dare_ties elects signs without trimming by "
                    "magnitude (method.merge.k=100 is expressible)"
                )
            if len(set(densities)) > 1 and inner.disjoint == "mean":
                raise NotExpressible(
                    "DARE into TIES with per-expert p and disjoint=mean: MergeKit's dare_ties rescales each model "
                    "by its weight, and its normalize then divides by the agreeing weights, not their count "
                    "(method.merge.disjoint=sum is expressible)"
                )
            inner.task_names = inner.task_names or method.task_names  # as the merge passes them on (begin)
            each, shared, notes = _dare_ties_models(inner, densities, n_experts)
            return Exported(
                "dare_ties", same_or_each(each), {**shared, "rescale": False}, [masks, TIES_NOTES[1], *notes]
            )
        raise NotExpressible(
            f"DARE into {type(inner).__name__}: MergeKit's DARE merges the dropped vectors by task arithmetic "
            "(dare_linear) or sign election without trimming (dare_ties) only"
        )

    def read(self, config: MergeKitInput) -> Import:
        linear = config.merge_method == "dare_linear"
        terms = read_task_arithmetic(config, sign_election=not linear, dropped=True)
        overrides = ["method=dare", f"method.p={config.one_or_each([decimal(1.0 - d) for d in terms.densities])}"]
        if linear:
            overrides += ["method@method.merge=task_arithmetic", f"method.merge.scaling={terms.scaling!r}"]
            overrides += [f"method.merge.weights={terms.weights}"] if terms.weights else []
        else:
            overrides += [
                "method@method.merge=ties",
                "method.merge.k=100.0",
                "method.merge.prune=per_tensor",
                f"method.merge.disjoint={terms.disjoint}",
                f"method.merge.scaling={terms.scaling!r}",
            ]
            overrides += [f"method.merge.weights={terms.weights}"] if terms.weights else []
        return config.imported(overrides)


def _dare_ties_models(
    inner: TIES, densities: list[float], n_experts: int
) -> tuple[list[dict[str, float]], dict[str, Any], list[str]]:
    """Per-model parameters, global parameters and notes of DARE into TIES as ``dare_ties`` without ``rescale``:
    DARE's 1/(1-p) folded into each model's weight (a sum), or into ``lambda`` when every density is the same (a
    mean's divisor then stays the agreeing weights, as mergelab's)."""
    if inner.weights is None:
        each = []
        for d in densities:
            per, shared, notes = ties_parameters(inner.disjoint, inner.scaling / d)
            each.append({"density": d, **per})
        return each, shared, notes
    weights = inner.expert_weight_list(n_experts)
    if len(set(densities)) > 1:  # a sum (a mean was refused): w_t / d_t each, lambda = scaling
        per, shared, notes = ties_parameters(inner.disjoint, inner.scaling, weighted=True)
        return (
            [{"density": d, "weight": decimal(w / d)} for d, w in zip(densities, weights, strict=True)],
            shared,
            notes,
        )
    per, shared, notes = ties_parameters(inner.disjoint, decimal(inner.scaling / densities[0]), weighted=True)
    return [{"density": d, "weight": w} for d, w in zip(densities, weights, strict=True)], shared, notes


class DARE(WrappedMethod, Sparsifier):
    """Drop-and-rescale every task vector, then merge the results with another method.

    Args:
        p: drop rate in [0, 1); survivors are scaled by 1 / (1 - p). One number, or per expert ({expert: p}
            naming every expert, or a list in expert order): each task vector is dropped at its own rate.
        seed: the mask of a tensor's rows is drawn per (seed, parameter name, mask block, task index), on fixed
            row blocks of ``MASK_BLOCK_ELEMS`` elements: it depends neither on the order tensors are visited in
            nor on the engine's chunk size or threads, nor on streaming vs in-memory merging.
        merge: the method the dropped vectors go into: a config node with ``_target_``, the name of a
            ``conf/method`` YAML (default ``task_arithmetic``) or a method instance.
    """

    reference = (
        "Yu et al. 2024, Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch, "
        "arXiv 2311.03099"
    )
    mergekit = DareMergeKit()
    per_expert_values = ("p",)

    def __init__(
        self,
        p: Annotated[
            PerExpertFloat,
            Range(0.0, 1.0, high_open=True),
            Doc("drop rate; survivors scaled by 1 / (1 - p): a number, or per expert ({expert: p} or a list)"),
        ] = 0.5,
        seed: Annotated[int, Doc("masks drawn per (seed, tensor, fixed row block, task)")] = 0,
        merge: Annotated[Any, Doc("the method the dropped vectors go into: a conf/method name or config")] = (
            "task_arithmetic"
        ),
    ) -> None:
        self.p, self.seed = per_expert_option(p), int(seed)
        super().__init__(merge, "merge")

    def masks(self, block: Block, task: int, p: float) -> Tensor:
        """The keep-mask (True = keep) of task ``task`` over ``block``'s rows, at drop rate ``p``."""
        s, e = read_bounds(block.shape, block.start, block.stop)
        shape = block.shape
        if not shape or shape[0] == 0:
            gen = torch.Generator().manual_seed(tensor_seed(self.seed, block.name, task, 0))
            return torch.rand(shape, generator=gen) >= p
        assert s is not None and e is not None
        parts = []
        for c, (ms, me) in enumerate(row_blocks(shape, MASK_BLOCK_ELEMS)):
            lo, hi = (0, shape[0]) if ms is None or me is None else (ms, me)
            if hi <= s or lo >= e:
                continue  # this mask block does not overlap the requested rows
            gen = torch.Generator().manual_seed(tensor_seed(self.seed, block.name, task, c))
            full = torch.rand((hi - lo, *shape[1:]), generator=gen) >= p
            parts.append(full[max(s, lo) - lo : min(e, hi) - lo])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def transform(self, block: Block, vectors: Sequence[Tensor]) -> list[Tensor]:
        """Dropped-and-rescaled task vectors of one block (each at its expert's drop rate)."""
        rates = self.values_per_expert("p", len(vectors))
        pairs = enumerate(zip(vectors, rates, strict=True))
        return [drop_and_rescale(t, p, mask=self.masks(block, i, p)) for i, (t, p) in pairs]

    def drop(
        self, vectors: Sequence[Mapping[str, Tensor]], masks: Sequence[Mapping[str, Tensor]] | None = None
    ) -> list[tv.StateDict]:
        """Whole dropped task vectors (the masks a merge draws); ``masks`` (True = keep) replace the draw."""
        if masks is not None:
            triples = zip(vectors, masks, self.values_per_expert("p", len(vectors)), strict=True)
            return [{n: drop_and_rescale(t, p, mask=m[n]) for n, t in v.items()} for v, m, p in triples]
        out: list[tv.StateDict] = [{} for _ in vectors]
        for n, t in vectors[0].items():
            block = Block(n, 0, None, None, tuple(t.shape))
            for i, d in enumerate(self.transform(block, [v[n] for v in vectors])):
                out[i][n] = d
        return out

    def combine(
        self,
        vectors: Sequence[Mapping[str, Tensor]],
        masks: Sequence[Mapping[str, Tensor]] | None = None,
        base: Mapping[str, Tensor] | None = None,
    ) -> tv.StateDict:
        """The merged task vector; with ``masks`` (True = keep) injected instead of drawn (``base``: see
        :meth:`TaskVectorMethod.combine`)."""
        if masks is not None:
            return combine_in_memory(self.inner, self.drop(vectors, masks), base=base)
        return super().combine(vectors, base)
