"""Exact streamed magnitude thresholds for every magnitude mask (TIES, Breadcrumbs, SCE's variance selection).

:class:`MagnitudeRanks` finds, for each key (the whole model ``""`` or one tensor) and each task, the float32
magnitudes at given ranks (1 = largest) by the two-level radix select of :mod:`mergelab.methods.magnitude_select`:
its first pass histograms the top 16 bits of every |x|, its second the low 16 bits inside the bucket holding each
rank. The two halves are the rank's float32 magnitude itself: what a full sort gives, with no tensor ever held
whole.

A method drives it from its own statistics hooks, for two consecutive passes ``p`` (0 then 1 below)::

    chunk_statistics -> ranks.chunk_statistics(p, key, stacked, inplace)   # thread-safe
    add_statistics   -> ranks.add_statistics(p, key, stats)                # block order
    end_pass         -> ranks.end_pass(p)

and reads :meth:`MagnitudeRanks.values` afterwards. Blocks arrive tensor by tensor, so a per-tensor key is
concluded when the next key starts: one key's histograms are held at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from mergelab.methods.magnitude_select import bits_to_float, high_histograms, locate_rank, low_histograms

#: ranks(key, numel) -> per task, the ranks wanted (1 = largest, at most ``numel``); every task the same count.
RankRule = Callable[[str, int], Sequence[Sequence[int]]]


class MagnitudeRanks:
    """The float32 magnitudes at given ranks of each task's coordinates, per key, in two streamed passes.

    Args:
        ranks: ``ranks(key, numel)``: per task, the ranks to find among the key's ``numel`` coordinates
            (1 = largest magnitude); every rank in ``[1, numel]``, each task the same number of ranks. Called
            when the key's first pass is complete, so a method may make it depend on counts it gathered in that
            pass (SCE: the non-zero variances).
    """

    passes = 2

    def __init__(self, ranks: RankRule) -> None:
        self.ranks = ranks
        self.begin()

    def begin(self) -> None:
        """Forget every statistic (before a merge's first pass)."""
        self._hist: Tensor | None = None  # the histograms being accumulated for ``_key``
        self._key: str | None = None
        self._numel: dict[str, int] = {}
        self._high: dict[str, list[list[tuple[int, int]]]] = {}  # [task][rank]: top-16-bit bucket, rank inside
        self._values: dict[str, list[list[float]]] = {}

    def chunk_statistics(self, pass_idx: int, key: str, stacked: Tensor, inplace: bool = False) -> Any:
        """Pass ``pass_idx`` (0 or 1) over one block of ``stacked`` values (``[T, ...]``; only |x| counts).

        ``inplace``: ``stacked`` may be overwritten (the engine's scratch buffer). Thread-safe.
        """
        if pass_idx == 0:
            return high_histograms(stacked, inplace=inplace), stacked[0].numel()
        highs = self._high[key]
        n_ranks = len(highs[0])
        return torch.stack([low_histograms(stacked, [h[j][0] for h in highs], inplace=inplace) for j in range(n_ranks)])

    def add_statistics(self, pass_idx: int, key: str, stats: Any) -> None:
        """Accumulate one block's :meth:`chunk_statistics` (in block order)."""
        if key != self._key:  # the previous key's blocks are all in
            self._conclude(pass_idx)
            self._key = key
        hist = stats[0] if pass_idx == 0 else stats
        self._hist = hist if self._hist is None else self._hist.add_(hist)
        if pass_idx == 0:
            self._numel[key] = self._numel.get(key, 0) + stats[1]

    def end_pass(self, pass_idx: int) -> None:
        """Conclude the last key of pass ``pass_idx``."""
        self._conclude(pass_idx)

    def _conclude(self, pass_idx: int) -> None:
        key, hist = self._key, self._hist
        self._hist, self._key = None, None
        if key is None or hist is None:
            return
        if pass_idx == 0:
            wanted = self.ranks(key, self._numel[key])
            self._high[key] = [[locate_rank(h, int(r)) for r in rs] for h, rs in zip(hist, wanted, strict=True)]
            return
        highs = self._high.pop(key)  # hist: [rank, task, buckets]
        self._values[key] = [
            [bits_to_float(b, locate_rank(hist[j][t], rank)[0]) for j, (b, rank) in enumerate(per_task)]
            for t, per_task in enumerate(highs)
        ]

    def values(self, key: str) -> list[list[float]]:
        """Per task, the magnitudes at its ranks (in the order ``ranks`` gave them), once pass 1 is over."""
        return self._values[key]

    def all_values(self) -> dict[str, list[list[float]]]:
        """:meth:`values` of every key concluded so far."""
        return dict(self._values)

    def numel(self, key: str) -> int:
        """How many coordinates of each task the key has (known after pass 0)."""
        return self._numel[key]


def kth_largest_reference(values: Tensor, rank: int) -> float:
    """The ``rank``-th largest float32 magnitude of ``values`` by a full sort (for tests and checks)."""
    return float(values.detach().abs().float().flatten().sort(descending=True).values[rank - 1])
