"""TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint merge."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar, Literal

from torch import Tensor

from mergelab.config_types import Doc, Range, Requires
from mergelab.engine.chunks import Block
from mergelab.engine.protocol import FoldsLastPass, Sparsifier
from mergelab.engine.scratch import ChunkVectors
from mergelab.methods.base import TaskVectorMethod, check_expert_weights, expert_weights, per_expert_option
from mergelab.methods.declaration import (
    ExpertWeights,
    Exported,
    Import,
    MergeKitInput,
    MergeKitMapping,
    NotExpressible,
    PerExpertFloat,
    decimal,
    same_or_each,
)
from mergelab.methods.magnitude_select import topk_count
from mergelab.methods.magnitude_threshold import MagnitudeRanks
from mergelab.methods.mergekit_terms import read_task_arithmetic, task_arithmetic_family, ties_parameters
from mergelab.methods.ties_ops import (
    SEQUENTIAL_SUM_ROWS,
    agreeing,
    elect_sign,
    majority_sign,
    sign_total_,
    ties_merge_,
    ties_merge_folded_,
    trim,
    weigh,
)

#: Where MergeKit's implementation of TIES may still differ from mergelab's in the last bits.
TIES_NOTES = [
    "top-k per tensor: MergeKit keeps int(density x n) entries (ties at the threshold broken by order), mergelab "
    "ceil(k% x n) and every entry tied with the k-th largest magnitude",
    "a sign sum of exactly 0 elects + in MergeKit, the tensor's majority sign in mergelab",
]


class TiesMergeKit(MergeKitMapping):
    """MergeKit's ``ties`` (density = k/100; disjoint sum: weight = scaling, ``normalize: false``; disjoint mean:
    weight 1, ``normalize: true``, ``lambda`` = scaling; per-expert weights: each model's weight w_t, ``lambda`` =
    scaling) for per-tensor pruning only."""

    reads = (task_arithmetic_family("ties", normalize=True, rescale=False, density=1.0),)
    expressible: ClassVar[dict[str, Any]] = {"prune": "per_tensor"}

    def export(self, method: Any, n_experts: int) -> Exported:
        if method.prune != "per_tensor":
            raise NotExpressible(
                "TIES with prune=global ranks magnitudes over the whole model; MergeKit's ties trims each tensor on "
                "its own (method.prune=per_tensor is expressible)"
            )
        per, shared, notes = ties_parameters(method.disjoint, method.scaling, method.weights is not None)
        pairs = zip(method.values_per_expert("k", n_experts), method.expert_weight_list(n_experts), strict=True)
        each = [{"density": k / 100.0, "weight": w, **per} for k, w in pairs]
        return Exported("ties", same_or_each(each), shared, [*TIES_NOTES, *notes])

    def read(self, config: MergeKitInput) -> Import:
        if config.shared["rescale"]:
            raise config.fail("parameters.rescale", "true: mergelab's TIES does not rescale the trimmed vectors")
        terms = read_task_arithmetic(config, sign_election=True, dropped=False)
        return config.imported(
            [
                "method=ties",
                f"method.k={config.one_or_each([decimal(100 * d) for d in terms.densities])}",
                "method.prune=per_tensor",
                f"method.disjoint={terms.disjoint}",
                f"method.scaling={terms.scaling!r}",
                *([f"method.weights={terms.weights}"] if terms.weights else []),
            ]
        )


def has_negative(weights: Any) -> bool:
    """Whether a per-expert weights option (null, a list or a mapping) gives any expert a negative weight."""
    values = weights.values() if isinstance(weights, Mapping) else weights or []
    return any(isinstance(v, int | float) and v < 0 for v in values)


class TIES(TaskVectorMethod, FoldsLastPass, Sparsifier):
    """theta_0 + scaling * disjoint_merge(w_1 trim_k(tau_1), ..., w_T trim_k(tau_T)).

    Args:
        k: percentage of coordinates kept per task vector, in (0, 100]: one number, or per expert ({expert: k}
            naming every expert, or a list in expert order); each task vector is ranked on its own either way.
        prune: ``global`` ranks magnitudes over all merged parameters of a task vector (the reference code);
            ``per_tensor`` ranks within each tensor. The majority sign used for exact sign ties follows the
            same granularity.
        disjoint: ``sum`` (AdaMerging / FusionBench) or ``mean`` (TIES paper) over sign-agreeing tasks.
        scaling: lambda applied to the merged vector.
        weights: per-expert w_t (MergeKit's per-model ``weight``): null (all 1), a list in expert order or {expert:
            weight} (experts left out weigh 1). Each trimmed task vector is multiplied by its weight before the sign
            election; a disjoint mean then divides by the agreeing tasks' summed weights (MergeKit's ``normalize``),
            which is their count when every weight is 1. A negative weight (``disjoint=sum`` only) subtracts its
            task vector's surviving entries: task negation.

    Pruning is exact and streams at either granularity: passes 1 and 2 find the k-th largest float32 magnitude
    of each task vector (``global``) or of each tensor of it (``per_tensor``) by a two-level radix select over
    row blocks (:mod:`mergelab.methods.magnitude_select`), pass 3 sums the elected signs for the majority sign (of
    the model, or of each tensor). Task vectors are float32, so these are the thresholds a full sort would give, and
    no tensor is ever held whole. Blocks arrive tensor by tensor in order, so a per-tensor statistic is
    concluded when the next tensor starts: one tensor's histograms are held at a time.
    Every per-chunk step is a pure function of the chunk, so the engine runs chunks on several threads. The
    streaming engine folds pass 3 into the merge (:meth:`merge_chunk_folded`): the majority sign only decides
    exact ties, so it merges with a provisional majority and corrects those few coordinates afterwards in the
    tensors (or model) whose elected majority differs.
    """

    parallel_chunks = True
    elementwise = True
    stat_passes = 3
    reference = "Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models, arXiv 2306.01708"
    mergekit = TiesMergeKit()
    per_expert_values = ("k",)
    requires = (
        Requires(
            ("weights", "disjoint"),
            lambda weights, disjoint: disjoint == "sum" or not has_negative(weights),
            "a negative weight needs disjoint=sum (a mean divides by the agreeing tasks' summed weights, which a "
            "negative one cancels)",
        ),
    )

    def __init__(
        self,
        k: Annotated[
            PerExpertFloat,
            Range(0.0, 100.0, low_open=True),
            Doc("% of each task vector's coordinates kept: a number, or per expert ({expert: k} or a list)"),
        ] = 20.0,
        prune: Annotated[
            Literal["global", "per_tensor"], Doc("rank magnitudes over the whole model (reference code) or per tensor")
        ] = "global",
        disjoint: Annotated[
            Literal["sum", "mean"], Doc("sum (FusionBench) or mean (TIES paper) of agreeing tasks")
        ] = "sum",
        scaling: Annotated[float, Range(low=0.0), Doc("lambda on the merged task vector")] = 0.3,
        weights: Annotated[
            ExpertWeights,
            Doc("per-expert w_t (MergeKit weight): null (all 1), a list or {expert: weight}; < 0 subtracts (sum only)"),
        ] = None,
    ) -> None:
        self.k, self.prune, self.disjoint, self.scaling = per_expert_option(k), prune, disjoint, float(scaling)
        self.weights = check_expert_weights(weights, negative=True)

    def expert_options(self) -> dict[str, Any]:
        return {"weights": self.weights}

    def expert_weight_list(self, n: int) -> list[float]:
        """w_t for the ``n`` experts, in the order the merge sees them (all 1 without ``weights``)."""
        return expert_weights(self.weights, self.expert_names(n))

    def _weights(self, n: int) -> list[float] | None:
        """The weights the kernels take: None (no products) when the option is not given."""
        return None if self.weights is None else self.expert_weight_list(n)

    # ------------------------------------------------------------------------------- statistics

    def _key(self, block: Block) -> str:
        """Whose statistic a block adds to: the model's (``""``) or its tensor's."""
        return "" if self.prune == "global" else block.name

    def begin(self, names: Sequence[str]) -> None:
        self._ranks = MagnitudeRanks(self._keep_ranks)  # passes 1 and 2: each task's k-th largest magnitude
        self._thresholds: dict[str, list[float]] = {}
        self._sign_total: dict[str, float] = {}
        self._majority: dict[str, float] = {}

    def _keep_ranks(self, key: str, numel: int) -> list[list[int]]:
        """The rank of the smallest kept magnitude, for every task: the top-k% (its own k) of ``numel`` coordinates."""
        return [[topk_count(numel, k)] for k in self.values_per_expert("k", self._n_tasks)]

    def chunk_statistics(self, pass_idx: int, block: Block, vectors: Sequence[Tensor]) -> Any:
        """What pass ``pass_idx`` needs from one block (may overwrite scratch ``vectors``; thread-safe)."""
        stacked = ChunkVectors.of(vectors).writable_stack()
        key = self._key(block)
        if pass_idx < MagnitudeRanks.passes:
            return self._ranks.chunk_statistics(pass_idx, key, stacked, inplace=True)
        return sign_total_(stacked, self._thresholds[key], self._weights(len(vectors)))

    def add_statistics(self, pass_idx: int, block: Block, stats: Any) -> None:
        """Accumulate one block's :meth:`chunk_statistics` (called in block order)."""
        key = self._key(block)
        if pass_idx == 2:
            self._sign_total[key] = self._sign_total.get(key, 0.0) + stats
            return
        if pass_idx == 0:
            self._n_tasks = int(stats[0].shape[0])
        self._ranks.add_statistics(pass_idx, key, stats)

    def end_pass(self, pass_idx: int) -> None:
        if pass_idx < MagnitudeRanks.passes:
            self._ranks.end_pass(pass_idx)
            if pass_idx == 1:
                self._thresholds = {key: [v[0] for v in vals] for key, vals in self._ranks.all_values().items()}
        else:
            self._majority = {key: majority_sign(total) for key, total in self._sign_total.items()}
            self._sign_total = {}

    # ------------------------------------------------------------------------------- merging

    def trim_and_weigh(self, block: Block, vectors: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """The trimmed task vectors of one chunk (stacked, one row per task) and the same times their weights
        (the same tensor without ``weights``)."""
        trimmed = trim(vectors, self._thresholds[self._key(block)])
        return trimmed, weigh(trimmed, self._weights(len(vectors)))

    def sparsify_chunk(self, block: Block, vectors: Sequence[Tensor]) -> list[Tensor]:
        """Each task's surviving entries (for combinations, which weigh them themselves): trimmed, unweighed, where
        the weighed entry agrees with the sign elected from the weighed ones."""
        trimmed, weighted = self.trim_and_weigh(block, vectors)
        selected, agree = agreeing(weighted, elect_sign(weighted, self._majority[self._key(block)]))
        return list(selected if weighted is trimmed else trimmed * agree)

    # ------------------------------------------------------------------------------- folded sign pass

    #: The majority sign a folded merge pass assumes (the one elected when the sign total is zero).
    PROVISIONAL_MAJORITY = 1.0

    def fold_last_pass(self, n_tasks: int) -> bool:
        """Whether the engine may skip the sign pass and run :meth:`merge_chunk_folded` instead."""
        return n_tasks <= SEQUENTIAL_SUM_ROWS

    def merge_chunk_folded(
        self, block: Block, vectors: Sequence[Tensor]
    ) -> tuple[Tensor, float, tuple[Tensor, Tensor] | None]:
        """The merge with the provisional majority, this chunk's sign total (the skipped pass's statistic, for
        :meth:`add_statistics`) and the exact ties with their values under the other majority."""
        chunk = ChunkVectors.of(vectors)
        merged, total, alt = ties_merge_folded_(
            chunk.writable_stack(),
            self._thresholds[self._key(block)],
            self.PROVISIONAL_MAJORITY,
            self.disjoint,
            self._weights(len(vectors)),
        )
        if alt is not None:
            alt = (alt[0], alt[1].mul_(self.scaling))
        merged = merged.mul_(self.scaling)
        return chunk.owned(merged), total, alt

    def folded_values_hold(self, name: str) -> bool:
        """After the sign pass's :meth:`end_pass`: whether the provisional majority was the one elected for the
        tensor ``name`` (per-tensor pruning) or the model."""
        key = "" if self.prune == "global" else name
        return self._majority.get(key, self.PROVISIONAL_MAJORITY) == self.PROVISIONAL_MAJORITY

    def merge_chunk(self, block: Block, vectors: Sequence[Tensor]) -> Tensor:
        key = self._key(block)
        chunk = ChunkVectors.of(vectors)
        weights = self._weights(len(vectors))
        merged = ties_merge_(chunk.writable_stack(), self._thresholds[key], self._majority[key], self.disjoint, weights)
        return chunk.owned(merged.mul_(self.scaling))
