"""TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint merge."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mergelab import task_vectors as tv
from mergelab.methods.base import TaskVectorMethod, check_range

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
    """

    def __init__(self, k: float = 20.0, prune: str = "global", disjoint: str = "sum", scaling: float = 0.3) -> None:
        check_range("k", k, 0.0, 100.0, low_open=True, high_open=False)
        check_range("scaling", scaling, 0.0, float("inf"), low_open=False, high_open=True)
        if prune not in PRUNE_MODES:
            raise ValueError(f"method option 'prune' must be one of {PRUNE_MODES}, got {prune!r}")
        if disjoint not in DISJOINT_MODES:
            raise ValueError(f"method option 'disjoint' must be one of {DISJOINT_MODES}, got {disjoint!r}")
        self.k, self.prune, self.disjoint, self.scaling = float(k), prune, disjoint, float(scaling)

    def trim_all(self, vectors: Sequence[Mapping[str, Tensor]]) -> list[tv.StateDict]:
        """Top-k% trim of each task vector at the configured granularity."""
        out = []
        for v in vectors:
            if self.prune == "global":
                thr = tv.magnitude_threshold(v.values(), self.k)
                out.append({n: tv.trim(t, thr) for n, t in v.items()})
            else:
                out.append({n: tv.trim(t, tv.magnitude_threshold([t], self.k)) for n, t in v.items()})
        return out

    def combine(self, vectors: Sequence[Mapping[str, Tensor]]) -> tv.StateDict:
        trimmed = self.trim_all(vectors)
        names = list(trimmed[0])
        sums = {n: torch.stack([t[n] for t in trimmed]).sum(0) for n in names}
        global_majority = tv.majority_sign(sums.values()) if self.prune == "global" else None
        merged: tv.StateDict = {}
        for n in names:
            maj = global_majority if global_majority is not None else tv.majority_sign([sums[n]])
            per_task = [t[n] for t in trimmed]
            merged[n] = self.scaling * tv.disjoint_merge(per_task, tv.elect_sign(per_task, maj), self.disjoint)
        return merged
