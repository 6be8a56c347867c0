"""TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint merge."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mergelab import task_vectors as tv
from mergelab.engine.chunks import Block, is_scratch
from mergelab.engine.protocol import FoldsLastPass, Sparsifier
from mergelab.methods.base import TaskVectorMethod, check_choice, check_range

PRUNE_MODES = ("global", "per_tensor")
DISJOINT_MODES = ("sum", "mean")


def _stacked(vectors: Sequence[Tensor]) -> Tensor:
    """The chunk's task vectors as one ``[T, ...]`` tensor that may be overwritten (the engine's, or a copy)."""
    return vectors.stacked if is_scratch(vectors) else torch.stack(list(vectors))  # type: ignore[attr-defined]


class TIES(TaskVectorMethod, FoldsLastPass, Sparsifier):
    """theta_0 + scaling * disjoint_merge(trim_k(tau_1..tau_T)).

    Args:
        k: percentage of coordinates kept per task vector, in (0, 100].
        prune: ``global`` ranks magnitudes over all merged parameters of a task vector (the reference code);
            ``per_tensor`` ranks within each tensor. The majority sign used for exact sign ties follows the
            same granularity.
        disjoint: ``sum`` (AdaMerging / FusionBench) or ``mean`` (TIES paper) over sign-agreeing tasks.
        scaling: lambda applied to the merged vector.

    Global pruning is exact and streams: passes 1 and 2 find the k-th largest float32 magnitude of each task
    vector by a two-level radix select (see :mod:`mergelab.task_vectors`), pass 3 sums the elected signs for
    the majority sign. Task vectors are float32, so this is the same threshold a full sort would give.
    Every per-chunk step is a pure function of the chunk, so the engine runs chunks on several threads. The
    streaming engine folds pass 3 into the merge (:meth:`merge_chunk_folded`): the majority sign only decides
    exact ties, so it merges with a provisional majority and corrects those few coordinates afterwards if the
    elected one differs.
    """

    parallel_chunks = True

    def __init__(self, k: float = 20.0, prune: str = "global", disjoint: str = "sum", scaling: float = 0.3) -> None:
        check_range("k", k, 0.0, 100.0, low_open=True, high_open=False)
        check_range("scaling", scaling, 0.0, float("inf"), low_open=False, high_open=True)
        check_choice("prune", prune, PRUNE_MODES)
        check_choice("disjoint", disjoint, DISJOINT_MODES)
        self.k, self.prune, self.disjoint, self.scaling = float(k), prune, disjoint, float(scaling)
        self.elementwise = prune == "global"
        self.stat_passes = 3 if prune == "global" else 0

    # ------------------------------------------------------------------------------- global statistics

    def begin(self, names: Sequence[str]) -> None:
        self._hist: Tensor | None = None  # [T, buckets]
        self._numel = 0
        self._high: list[tuple[int, int]] = []  # per task: top-16-bit bucket of the k-th largest, rank inside
        self._thresholds: list[float] = []
        self._sign_total = 0.0
        self._majority = 1.0

    def chunk_statistics(self, pass_idx: int, block: Block, vectors: Sequence[Tensor]) -> Any:
        """What pass ``pass_idx`` needs from one block (may overwrite scratch ``vectors``; thread-safe)."""
        stacked = _stacked(vectors)
        if pass_idx == 0:
            return tv.high_histograms(stacked, inplace=True), vectors[0].numel()
        if pass_idx == 1:
            return tv.low_histograms(stacked, [high for high, _ in self._high], inplace=True)
        return tv.sign_total_(stacked, self._thresholds)

    def add_statistics(self, pass_idx: int, block: Block, stats: Any) -> None:
        """Accumulate one block's :meth:`chunk_statistics` (called in block order)."""
        if pass_idx == 0:
            hist, numel = stats
            self._hist = hist if self._hist is None else self._hist.add_(hist)
            self._numel += numel
        elif pass_idx == 1:
            self._hist = stats if self._hist is None else self._hist.add_(stats)
        else:
            self._sign_total += stats

    def end_pass(self, pass_idx: int) -> None:
        hist = [] if self._hist is None else list(self._hist)  # None: nothing to merge
        if pass_idx == 0:
            keep = tv.topk_count(self._numel, self.k)
            self._high = [tv.locate_rank(h, keep) for h in hist]
            self._hist = None
        elif pass_idx == 1:
            lows = [tv.locate_rank(h, rank)[0] for h, (_, rank) in zip(hist, self._high, strict=True)]
            self._thresholds = [tv.bits_to_float(high, low) for (high, _), low in zip(self._high, lows, strict=True)]
            self._hist = None
        else:
            self._majority = tv.majority_sign(self._sign_total)

    # ------------------------------------------------------------------------------- merging

    def trim_and_elect(self, vectors: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Trimmed task vectors of one chunk (stacked, one row per task) and the elected sign per coordinate."""
        if self.prune == "global":
            trimmed = tv.trim(vectors, self._thresholds)
            majority = self._majority
        else:
            trimmed = tv.trim(vectors, [tv.magnitude_threshold([v], self.k) for v in vectors])
            majority = tv.majority_sign(tv.sign_total(trimmed))
        return trimmed, tv.elect_sign(trimmed, majority)

    def sparsify_chunk(self, block: Block, vectors: Sequence[Tensor]) -> list[Tensor]:
        """Each task's surviving entries: trimmed, and agreeing with the elected sign (for combinations)."""
        trimmed, sign = self.trim_and_elect(vectors)
        return list(tv.agreeing(trimmed, sign)[0])

    # ------------------------------------------------------------------------------- folded sign pass

    #: The majority sign a folded merge pass assumes (the one elected when the sign total is zero).
    PROVISIONAL_MAJORITY = 1.0

    def fold_last_pass(self, n_tasks: int) -> bool:
        """Whether the engine may skip the sign pass and run :meth:`merge_chunk_folded` instead."""
        return self.prune == "global" and n_tasks <= tv.SEQUENTIAL_SUM_ROWS

    def merge_chunk_folded(
        self, block: Block, vectors: Sequence[Tensor]
    ) -> tuple[Tensor, float, tuple[Tensor, Tensor] | None]:
        """The merge with the provisional majority, this chunk's sign total (the skipped pass's statistic, for
        :meth:`add_statistics`) and the exact ties with their values under the other majority."""
        merged, total, alt = tv.ties_merge_folded_(
            _stacked(vectors), self._thresholds, self.PROVISIONAL_MAJORITY, self.disjoint
        )
        if alt is not None:
            alt = (alt[0], alt[1].mul_(self.scaling))
        merged = merged.mul_(self.scaling)
        return (merged if is_scratch(vectors) else merged.clone()), total, alt

    def folded_values_hold(self) -> bool:
        """After the sign pass's :meth:`end_pass`: whether the provisional majority was the right one."""
        return self._majority == self.PROVISIONAL_MAJORITY

    def merge_chunk(self, block: Block, vectors: Sequence[Tensor]) -> Tensor:
        stacked = _stacked(vectors)
        if self.prune == "global":
            thresholds, majority = self._thresholds, self._majority
        else:
            thresholds, majority = [tv.magnitude_threshold([v], self.k) for v in stacked], None
        merged = tv.ties_merge_(stacked, thresholds, majority, self.disjoint).mul_(self.scaling)
        return merged if is_scratch(vectors) else merged.clone()  # not a view pinning the stacked copy
