"""Task arithmetic over magnitude-pruned task vectors: TIES without sign election (the TIES paper's ablation).

Written as a TIES subclass that overrides only ``merge_chunk``: it reuses TIES's trimming thresholds (global or
per tensor) and sums the trimmed vectors. The pass driver never runs TIES's folded merge pass for it (that fast
path stands in for ``merge_chunk``), so it merges the same in memory and streamed.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from mergelab.engine.chunks import Block
from mergelab.methods.ties import TIES


class MagnitudePrunedTA(TIES):
    """theta_0 + scaling * sum_t w_t trim_k(tau_t): each task vector keeps its top-k% magnitudes (``prune``,
    ``weights`` as TIES)."""

    reference = (
        "Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models, arXiv 2306.01708 (its ablation "
        "without sign election)"
    )
    mergekit = (
        "magnitude-pruned task arithmetic is TIES without sign election; MergeKit's magnitude pruning (ties) always "
        "elects signs"
    )

    def merge_chunk(self, block: Block, vectors: Sequence[Tensor]) -> Tensor:
        _, weighted = self.trim_and_weigh(block, vectors)  # no sign election: the sum of every survivor
        return weighted.sum(0).mul_(self.scaling)
