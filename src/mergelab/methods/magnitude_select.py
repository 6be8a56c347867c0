"""Exact k-th largest magnitudes: in memory (:func:`kth_largest`), or by a two-level radix select over blocks streamed.

The radix select's per-block histograms (:func:`high_histograms`, :func:`low_histograms`) are what
:class:`mergelab.methods.magnitude_threshold.MagnitudeRanks` accumulates over a model's blocks; :func:`locate_rank`
and :func:`bits_to_float` turn the accumulated histograms into the magnitude itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mergelab.engine.scratch import workspace


def topk_count(numel: int, k_percent: float) -> int:
    """Number of coordinates kept by a top-k% trim of ``numel`` coordinates (at least one)."""
    return max(1, math.ceil(numel * k_percent / 100.0))


# Exact top-k over a whole model without holding it (a two-level radix select): the bit pattern of a
# non-negative float32 grows with its value, so one pass histograms the top 16 bits and finds the bucket that
# holds the k-th largest magnitude, and a second pass histograms the low 16 bits inside that bucket only.
# The two halves together are the k-th largest float32 magnitude itself: exact, in two small histograms.
HIGH_BUCKETS = 1 << 15  # sign bit cleared by abs(): bits >> 16 < 2**15
LOW_BUCKETS = 1 << 16


def locate_rank(hist: Tensor, rank: int) -> tuple[int, int]:
    """The bucket holding the ``rank``-th largest counted value (1 = largest), and its rank inside the bucket."""
    from_top = hist.flip(0).cumsum(0)
    idx = int(torch.searchsorted(from_top, torch.tensor(rank, dtype=from_top.dtype)))
    above = int(from_top[idx - 1]) if idx > 0 else 0
    return hist.numel() - 1 - idx, rank - above


def bits_to_float(high: int, low: int) -> float:
    """The float32 value whose bit pattern is ``high << 16 | low``."""
    return float(torch.tensor([(high << 16) | low], dtype=torch.int32).view(torch.float32))


def kth_largest(values: Sequence[Tensor], rank: int) -> float:
    """The ``rank``-th largest of the concatenated values (rank 1 = largest)."""
    flat = torch.cat([v.flatten() for v in values])
    return float(flat.kthvalue(flat.numel() - rank + 1).values)


def radix_kth_largest(magnitudes: Sequence[Tensor], rank: int) -> float:
    """:func:`kth_largest` of non-negative float32 tensors by the two-level radix select (two histograms)."""
    bits = [m.contiguous().view(torch.int32).flatten() for m in magnitudes]
    high_hist = sum(torch.bincount(b >> 16, minlength=HIGH_BUCKETS) for b in bits)
    high, rest = locate_rank(high_hist, rank)  # type: ignore[arg-type]
    low_hist = sum(torch.bincount(b[(b >> 16) == high] & 0xFFFF, minlength=LOW_BUCKETS) for b in bits)
    low, _ = locate_rank(low_hist, rest)  # type: ignore[arg-type]
    return bits_to_float(high, low)


# The streaming statistics passes work on the stacked task vectors of one chunk (one row per task). They may
# overwrite ``stacked`` when ``inplace`` (the engine's scratch buffers), saving a copy per step.


def _bits_rows(stacked: Tensor, inplace: bool) -> Tensor:
    """|stacked| as int32 float32-bit patterns, one row per task."""
    rows = stacked.reshape(stacked.shape[0], -1)
    if rows.dtype == torch.float32 and inplace:
        return rows.abs_().view(torch.int32)
    return rows.abs().float().contiguous().view(torch.int32)


def high_histograms(stacked: Tensor, inplace: bool = False) -> Tensor:
    """Per task (row), counts of |x| per top-16-bit bucket: ``[T, HIGH_BUCKETS]``."""
    bits = _bits_rows(stacked, inplace).bitwise_right_shift_(16)  # a new tensor unless ``inplace`` allowed it
    return torch.stack([torch.bincount(b, minlength=HIGH_BUCKETS) for b in bits])


def low_histograms(stacked: Tensor, highs: Sequence[int], inplace: bool = False) -> Tensor:
    """Per task (row), counts of the low 16 bits of the |x| whose top 16 bits are that task's ``highs``."""
    bits = _bits_rows(stacked, inplace)
    n = bits.shape[1]
    top, inside = workspace("top", n, torch.int32), workspace("inside", n, torch.bool)
    out = []
    for b, high in zip(bits, highs, strict=True):
        torch.eq(torch.bitwise_right_shift(b, 16, out=top), high, out=inside)
        out.append(torch.bincount(b[inside].bitwise_and_(0xFFFF), minlength=LOW_BUCKETS))
    return torch.stack(out)
