"""State-dict arithmetic shared by every merge method.

All methods express themselves through these functions, so a merge is a composition of small, separately
tested operations on ``{parameter name: tensor}`` mappings. Arithmetic runs in float32 (or the input's wider
dtype) and results are cast back to the pretrained tensor's dtype by :func:`apply_task_vector`.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

StateDict = dict[str, Tensor]


def _compute_dtype(t: Tensor) -> torch.dtype:
    """Low-precision tensors are upcast so that sums of several experts do not lose precision."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def task_vector(base: Mapping[str, Tensor], expert: Mapping[str, Tensor]) -> StateDict:
    """tau = theta_expert - theta_0 for every parameter of ``base`` (keys must match)."""
    return {k: expert[k].to(_compute_dtype(v)) - v.to(_compute_dtype(v)) for k, v in base.items()}


def task_vectors(base: Mapping[str, Tensor], experts: Iterable[Mapping[str, Tensor]]) -> list[StateDict]:
    """Task vectors of several experts against the same pretrained weights."""
    return [task_vector(base, e) for e in experts]


def apply_task_vector(base: Mapping[str, Tensor], delta: Mapping[str, Tensor]) -> StateDict:
    """theta_0 + delta, cast back to the pretrained dtypes. Parameters absent from ``delta`` stay pretrained."""
    out: StateDict = {}
    for k, v in base.items():
        out[k] = (v.to(_compute_dtype(v)) + delta[k]).to(v.dtype) if k in delta else v.clone()
    return out


def weighted_sum(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """sum_t w_t * tensors[t], accumulated in place in one new tensor."""
    out = tensors[0] * weights[0]
    for w, t in zip(weights[1:], tensors[1:], strict=True):
        out.add_(t, alpha=w)
    return out


def topk_count(numel: int, k_percent: float) -> int:
    """Number of coordinates kept by a top-k% trim of ``numel`` coordinates (at least one)."""
    return max(1, math.ceil(numel * k_percent / 100.0))


def magnitude_threshold(tensors: Iterable[Tensor], k_percent: float) -> float:
    """Smallest magnitude among the top-k% largest-magnitude coordinates of the concatenated tensors.

    Keeping ``|x| >= threshold`` keeps exactly the top-k% (plus any coordinates tied with the threshold).
    """
    mags = [t.detach().abs().flatten() for t in tensors]
    return kth_largest(mags, topk_count(sum(m.numel() for m in mags), k_percent))


def trim(vectors: Sequence[Tensor], thresholds: Sequence[float]) -> Tensor:
    """The task vectors stacked (one row per task), each with coordinates below its threshold zeroed."""
    stacked = torch.stack(list(vectors))
    th = torch.tensor(list(thresholds), dtype=stacked.dtype).view(-1, *([1] * (stacked.dim() - 1)))
    return stacked.masked_fill_(stacked.abs() < th, 0)


def elect_sign(trimmed: Tensor, majority_sign: float) -> Tensor:
    """Per-coordinate sign of sum_t trimmed_t; coordinates whose sum is exactly zero take ``majority_sign``."""
    sign = trimmed.sum(0).sign_()
    return sign.masked_fill_(sign == 0, majority_sign)


def sign_total(trimmed: Tensor) -> float:
    """Sum over coordinates of sign(sum_t trimmed_t): what the majority sign is elected from."""
    return float(trimmed.sum(0).sign_().sum())


def majority_sign(total: float) -> float:
    """Sign of the total of the per-coordinate signs (+1 when it is zero): the fallback for exact ties."""
    return -1.0 if total < 0 else 1.0


def agreeing(trimmed: Tensor, sign: Tensor) -> tuple[Tensor, Tensor]:
    """The stacked entries whose sign agrees with the elected sign (others zeroed), and that mask."""
    agree = (trimmed * sign) > 0  # sign is +-1: positive product = same sign and non-zero
    return trimmed * agree, agree


def disjoint_merge(trimmed: Tensor, sign: Tensor, reduce: str) -> Tensor:
    """Mean (or sum) over the tasks whose non-zero coordinate agrees with the elected sign."""
    selected, agree = agreeing(trimmed, sign)
    total = selected.sum(0)
    if reduce == "sum":
        return total
    if reduce == "mean":
        return total / agree.sum(0).clamp(min=1)
    raise ValueError(f"disjoint reduce must be 'mean' or 'sum', got {reduce!r}")


# Exact top-k over a whole model without holding it (a two-level radix select): the bit pattern of a
# non-negative float32 grows with its value, so one pass histograms the top 16 bits and finds the bucket that
# holds the k-th largest magnitude, and a second pass histograms the low 16 bits inside that bucket only.
# The two halves together are the k-th largest float32 magnitude itself: exact, in two small histograms.
HIGH_BUCKETS = 1 << 15  # sign bit cleared by abs(): bits >> 16 < 2**15
LOW_BUCKETS = 1 << 16


def magnitude_bits(t: Tensor) -> Tensor:
    """The int32 bit patterns of |t| in float32 (ordered like the magnitudes)."""
    return t.detach().abs().float().contiguous().view(torch.int32)


def high_histogram(t: Tensor) -> Tensor:
    """Counts of |t| per top-16-bit bucket."""
    return torch.bincount((magnitude_bits(t) >> 16).flatten(), minlength=HIGH_BUCKETS)


def low_histogram(t: Tensor, high: int) -> Tensor:
    """Counts of the low 16 bits of the |t| whose top 16 bits are ``high``."""
    bits = magnitude_bits(t).flatten()
    inside = bits[(bits >> 16) == high]
    return torch.bincount(inside & 0xFFFF, minlength=LOW_BUCKETS)


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


# ----------------------------------------------------------------------------------------------- DARE pieces


def tensor_seed(seed: int, name: str, index: int, chunk: int = 0) -> int:
    """A seed for one (parameter, row block, task) that does not depend on the order tensors are visited in."""
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


def check_finite(state: Mapping[str, Tensor], where: str) -> None:
    """Raise if any tensor holds NaN or inf, naming the checkpoint and parameter."""
    for k, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{where}: parameter '{k}' contains {bad} NaN/inf value(s)")


def check_compatible(base: Mapping[str, Tensor], other: Mapping[str, Tensor], where: str) -> None:
    """Raise if ``other`` lacks a parameter of ``base`` or has it with another shape."""
    missing = [k for k in base if k not in other]
    if missing:
        raise ValueError(f"{where}: missing parameter(s) {missing[:5]} present in the pretrained model")
    for k, v in base.items():
        if tuple(other[k].shape) != tuple(v.shape):
            raise ValueError(
                f"{where}: parameter '{k}' has shape {tuple(other[k].shape)}, pretrained has {tuple(v.shape)}"
            )
