"""TIES-Merging's operations (Yadav et al. 2023): trim, elect sign, disjoint merge.

The reference functions (:func:`trim`, :func:`weigh`, :func:`elect_sign`, :func:`disjoint_merge`) state the method;
the in-place ones (``*_``) compute the same bytes on one chunk's stacked task vectors (one row per task) in fewer
passes over memory, overwriting that stack (the engine's scratch buffer, or a fresh stack of the caller's vectors).

Per-expert weights w_t (MergeKit's per-model ``weight``) enter after trimming: d_t = w_t * trim(tau_t) is what the
sign is elected from and what is summed; a disjoint mean divides by the agreeing tasks' summed weights (their count
when every weight is 1, 1 where nothing agrees). ``weights`` None is all 1 and skips the products.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mergelab.engine.scratch import workspace


def trim(vectors: Sequence[Tensor], thresholds: Sequence[float]) -> Tensor:
    """The task vectors stacked (one row per task), each with coordinates below its threshold zeroed."""
    stacked = torch.stack(list(vectors))
    th = torch.tensor(list(thresholds), dtype=stacked.dtype).view(-1, *([1] * (stacked.dim() - 1)))
    return stacked.masked_fill_(stacked.abs() < th, 0)


def weigh(trimmed: Tensor, weights: Sequence[float] | None) -> Tensor:
    """The stacked trimmed task vectors, each row times its weight (``trimmed`` itself when ``weights`` is None)."""
    if weights is None:
        return trimmed
    return trimmed * torch.tensor(list(weights), dtype=trimmed.dtype).view(-1, *([1] * (trimmed.dim() - 1)))


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


def disjoint_merge(weighted: Tensor, sign: Tensor, reduce: str, weights: Sequence[float] | None = None) -> Tensor:
    """Sum over the tasks whose non-zero (weighted) coordinate agrees with the elected sign, or that sum divided by
    the agreeing tasks' summed ``weights`` (their count when None; 1 where nothing agrees)."""
    selected, agree = agreeing(weighted, sign)
    total = selected.sum(0)
    if reduce == "sum":
        return total
    if reduce == "mean":
        if weights is None:
            return total / agree.sum(0).clamp(min=1)
        divisor = weigh(agree.to(total.dtype), weights).sum(0)
        return total / divisor.masked_fill_(divisor == 0, 1.0)
    raise ValueError(f"disjoint reduce must be 'mean' or 'sum', got {reduce!r}")


def trim_(
    stacked: Tensor, thresholds: Sequence[float], kept: Tensor | None = None, weights: Sequence[float] | None = None
) -> Tensor:
    """In place: zero each row's coordinates below its threshold (``|x| < th``), by multiplying with the kept mask,
    then (``weights``) multiply each row by its weight: :func:`weigh` of :func:`trim`.

    Same values as :func:`trim` except that a dropped negative coordinate becomes -0.0 rather than +0.0,
    which nothing downstream can tell apart (sums start from +0.0, signs of zero sums are replaced).
    ``kept``, if given, receives per coordinate the number of rows that keep it.
    """
    rows = stacked.reshape(stacked.shape[0], -1)
    keep = workspace("keep", rows.shape[1], rows.dtype)
    for i, (row, th) in enumerate(zip(rows, thresholds, strict=True)):
        mask = kept if kept is not None and i == 0 else keep
        torch.abs(row, out=mask)
        torch.ge(mask, th, out=mask)  # float 1/0: comparisons into bool tensors are several times slower
        row.mul_(mask)
        if kept is not None and i > 0:
            kept.add_(mask)
    if weights is not None:
        for row, w in zip(rows, weights, strict=True):
            row.mul_(w)
    return stacked


def _signs(rows: Tensor) -> Tensor:
    """sign(sum over rows) of ``[T, N]`` rows, in a workspace buffer."""
    return torch.sum(rows, 0, out=workspace("sign", rows.shape[1], rows.dtype)).sign_()


def sign_total_(stacked: Tensor, thresholds: Sequence[float], weights: Sequence[float] | None = None) -> float:
    """:func:`sign_total` of the task vectors trimmed at ``thresholds`` (and weighed); overwrites ``stacked``."""
    rows = trim_(stacked, thresholds, weights=weights).reshape(stacked.shape[0], -1)
    return float(_signs(rows).sum())  # the same reduction as sign_total, so the same float


def ties_merge_(
    stacked: Tensor,
    thresholds: Sequence[float],
    majority: float | None,
    reduce: str,
    weights: Sequence[float] | None = None,
) -> Tensor:
    """Trim, weigh, elect sign and disjoint-merge one chunk: bit for bit :func:`trim`, :func:`weigh`,
    :func:`elect_sign` and :func:`disjoint_merge`, in fewer passes over memory and without boolean temporaries.
    Overwrites ``stacked`` and returns a view of it.

    ``majority`` None elects it from this chunk's own signs (per-tensor TIES). Why it is exact: with the
    elected sign s = +-1, the agreeing entries are those with s * x > 0, and summing them equals s times the
    sum of max(s * x, 0) in the same order (round-to-nearest is symmetric under negation); the disagreeing
    entries are zeros that leave a sum starting from +0.0 unchanged. Adding +0.0 at the end turns the one
    possible difference, a -0.0 where nothing agrees, into the +0.0 the reference gives.
    """
    rows = trim_(stacked, thresholds, weights=weights).reshape(stacked.shape[0], -1)
    sign = _signs(rows)
    if majority is None:
        majority = majority_sign(float(sign.sum()))
    return _disjoint_merge_(rows, sign, majority, reduce, weights=weights).view(stacked.shape[1:])


def _disjoint_merge_(
    rows: Tensor,
    sign: Tensor,
    majority: float,
    reduce: str,
    zero: Tensor | None = None,
    weights: Sequence[float] | None = None,
) -> Tensor:
    """The disjoint merge of trimmed, weighed ``rows`` (``[T, N]``) given sign(sum) (zeros not yet elected), into
    ``rows[0]``. ``zero``: where ``sign`` is 0, as 1/0, if already computed; ``weights``: the rows' weights (a mean
    divides by the agreeing ones' sum), None for all 1.
    """
    if reduce not in ("sum", "mean"):
        raise ValueError(f"disjoint reduce must be 'mean' or 'sum', got {reduce!r}")
    n = rows.shape[1]
    tmp = workspace("tmp", n, rows.dtype)
    if zero is None:
        zero = torch.eq(sign, 0, out=tmp)
    sign.add_(zero, alpha=majority)  # zero-sum coordinates take the majority sign
    rows.mul_(sign).clamp_(min=0)  # s * x where it agrees with s, else zero
    count = None
    if reduce == "mean":
        count = torch.zeros(n, dtype=rows.dtype, out=workspace("count", n, rows.dtype))
        for i, row in enumerate(rows):
            count.add_(torch.gt(row, 0, out=tmp), alpha=1.0 if weights is None else weights[i])
    total = torch.sum(rows, 0, out=workspace("total", n, rows.dtype))
    total = torch.mul(total, sign, out=rows[0]).add_(0.0)  # the result lives in the caller's buffer
    return total.div_(_nonzero_divisor(count, weights)) if count is not None else total


def _nonzero_divisor(count: Tensor, weights: Sequence[float] | None) -> Tensor:
    """A disjoint mean's divisor with 1 where nothing agrees: a count is clamped (no boolean temporary), summed
    weights (possibly fractions below 1) replaced where exactly 0."""
    return count.clamp_(min=1) if weights is None else count.masked_fill_(count == 0, 1.0)


def _disjoint_merge_columns(
    cols: Tensor, majority: float, reduce: str, weights: Sequence[float] | None = None
) -> Tensor:
    """:func:`_disjoint_merge_` of a few exact-tie columns (sum of trimmed, weighed values exactly zero), all
    electing ``majority``, with the sums accumulated in task order from +0.0: what ``sum(0)`` does for up to 4 rows."""
    total = torch.zeros(cols.shape[1], dtype=cols.dtype)
    count = torch.zeros_like(total)
    for i, col in enumerate(cols):
        agree = col.mul(majority).clamp_(min=0)
        total.add_(agree)
        count.add_(torch.gt(agree, 0).to(total.dtype), alpha=1.0 if weights is None else weights[i])
    total.mul_(majority).add_(0.0)
    return total.div_(_nonzero_divisor(count, weights)) if reduce == "mean" else total


# The largest task count for which torch's sum over dim 0 adds the rows one after the other from +0.0 in every
# layout (ATen's cascade sum interleaves four partial sums, and only a fifth row changes the order).
SEQUENTIAL_SUM_ROWS = 4


def ties_merge_folded_(
    stacked: Tensor,
    thresholds: Sequence[float],
    provisional: float,
    reduce: str,
    weights: Sequence[float] | None = None,
) -> tuple[Tensor, float, tuple[Tensor, Tensor] | None]:
    """:func:`ties_merge_` with a majority sign not known yet (global TIES folds its sign pass into the merge).

    Merges with the ``provisional`` majority and returns, with the result, this chunk's :func:`sign_total`
    (what the majority is elected from) and the exact ties, the only coordinates the majority decides: their
    flat indices and their merged values under the other majority. At most ``SEQUENTIAL_SUM_ROWS`` tasks.
    """
    if stacked.shape[0] > SEQUENTIAL_SUM_ROWS:
        raise ValueError(f"folding the sign pass needs at most {SEQUENTIAL_SUM_ROWS} task vectors")
    rows = stacked.reshape(stacked.shape[0], -1)
    kept = workspace("kept", rows.shape[1], rows.dtype)  # how many entries of each coordinate survive
    trim_(stacked, thresholds, kept=kept, weights=weights)
    sign = _signs(rows)
    total = float(sign.sum())  # exactly what the sign pass's sign_total gives for this chunk
    zero = torch.eq(sign, 0, out=workspace("zero", rows.shape[1], rows.dtype))
    index = torch.mul(zero, kept, out=kept).nonzero().view(-1)  # a zero sum though something survived
    alternative = None
    if index.numel():
        alternative = (index, _disjoint_merge_columns(rows[:, index], -provisional, reduce, weights))
    merged = _disjoint_merge_(rows, sign, provisional, reduce, zero=zero, weights=weights).view(stacked.shape[1:])
    return merged, total, alternative
