"""TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint merge."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mergelab import task_vectors as tv
from mergelab.methods.base import TaskVectorMethod, check_choice, check_range

PRUNE_MODES = ("global", "per_tensor")
DISJOINT_MODES = ("sum", "mean")


class TIES(TaskVectorMethod):
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
    """

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
        self._hist: list[Tensor] = []
        self._numel = 0
        self._high: list[tuple[int, int]] = []  # per task: top-16-bit bucket of the k-th largest, rank inside
        self._thresholds: list[float] = []
        self._sign_total = 0.0
        self._majority = 1.0

    def observe(self, pass_idx: int, name: str, chunk: int, vectors: Sequence[Tensor]) -> None:
        if pass_idx == 0:
            if not self._hist:
                self._hist = [torch.zeros(tv.HIGH_BUCKETS, dtype=torch.long) for _ in vectors]
            for h, v in zip(self._hist, vectors, strict=True):
                h += tv.high_histogram(v)
            self._numel += vectors[0].numel()
        elif pass_idx == 1:
            for h, (high, _), v in zip(self._hist, self._high, vectors, strict=True):
                h += tv.low_histogram(v, high)
        else:
            self._sign_total += tv.sign_total(tv.trim(vectors, self._thresholds))

    def end_pass(self, pass_idx: int) -> None:
        if pass_idx == 0:
            keep = tv.topk_count(self._numel, self.k)
            self._high = [tv.locate_rank(h, keep) for h in self._hist]
            self._hist = [torch.zeros(tv.LOW_BUCKETS, dtype=torch.long) for _ in self._hist]
        elif pass_idx == 1:
            lows = [tv.locate_rank(h, rank)[0] for h, (_, rank) in zip(self._hist, self._high, strict=True)]
            self._thresholds = [tv.bits_to_float(high, low) for (high, _), low in zip(self._high, lows, strict=True)]
            self._hist = []
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

    def select(self, vectors: Sequence[Tensor]) -> list[Tensor]:
        """Each task's surviving entries: trimmed, and agreeing with the elected sign (for combinations)."""
        trimmed, sign = self.trim_and_elect(vectors)
        return list(tv.agreeing(trimmed, sign)[0])

    def merge_chunk(self, name: str, chunk: int, vectors: Sequence[Tensor]) -> Tensor:
        trimmed, sign = self.trim_and_elect(vectors)
        return tv.disjoint_merge(trimmed, sign, self.disjoint).mul_(self.scaling)
