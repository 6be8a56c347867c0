"""State-dict arithmetic shared by every merge method.

All methods express themselves through these functions, so a merge is a composition of small, separately
tested operations on ``{parameter name: tensor}`` mappings. Arithmetic runs in float32 (or the input's wider
dtype) and results are cast back to the pretrained tensor's dtype by :func:`apply_task_vector`.
"""

from __future__ import annotations

import math
import threading
import zlib
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

StateDict = dict[str, Tensor]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype task vectors are computed in: float32, or float64 for float64 weights.

    Low-precision weights are upcast so that sums over several experts do not lose precision.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def subtract_base(expert: Tensor, base: Tensor, out: Tensor | None = None) -> Tensor:
    """tau = expert - base for one block, ``base`` already in its compute dtype (into ``out`` when given).

    The only place a task vector is formed: in memory, sequentially streamed and pipelined alike. Upcasting is
    exact, so copying the expert into ``out`` and subtracting in place gives the values of the mixed-dtype
    subtraction (which TensorIterator runs on a slower casting path).
    """
    if out is None:
        return torch.sub(expert, base)
    return out.copy_(expert).sub_(base)


def add_base(base: Tensor, delta: Tensor, out: Tensor | None = None) -> Tensor:
    """theta = base + delta for one block in the compute dtype (into ``out`` when given); the caller casts back."""
    return torch.add(base, delta, out=out) if out is not None else base.add(delta)


def task_vector(base: Mapping[str, Tensor], expert: Mapping[str, Tensor]) -> StateDict:
    """tau = theta_expert - theta_0 for every parameter of ``base`` (keys must match)."""
    return {k: subtract_base(expert[k], v.to(compute_dtype(v.dtype))) for k, v in base.items()}


def task_vectors(base: Mapping[str, Tensor], experts: Iterable[Mapping[str, Tensor]]) -> list[StateDict]:
    """Task vectors of several experts against the same pretrained weights."""
    return [task_vector(base, e) for e in experts]


def apply_task_vector(base: Mapping[str, Tensor], delta: Mapping[str, Tensor]) -> StateDict:
    """theta_0 + delta, cast back to the pretrained dtypes. Parameters absent from ``delta`` stay pretrained."""
    out: StateDict = {}
    for k, v in base.items():
        out[k] = add_base(v.to(compute_dtype(v.dtype)), delta[k]).to(v.dtype) if k in delta else v.clone()
    return out


def ordered_sum(tensors: Sequence[Tensor]) -> Tensor:
    """sum_t tensors[t], added in task order into a fresh tensor (the same bytes however a tensor is cut into
    blocks)."""
    out = tensors[0].clone()
    for t in tensors[1:]:
        out.add_(t)
    return out


def weighted_sum(tensors: Sequence[Tensor], weights: Sequence[float], out: Tensor | None = None) -> Tensor:
    """sum_t w_t * tensors[t], accumulated in place in one tensor: ``out`` if given (it may be ``tensors[0]``)."""
    out = torch.mul(tensors[0], weights[0], out=out) if out is not None else tensors[0] * weights[0]
    for w, t in zip(weights[1:], tensors[1:], strict=True):
        out.add_(t, alpha=w)
    return out


#: Elements converted to float64 at a time by :func:`row_squared_sums` (a 4 MB temporary, whatever the block).
SQUARES_SLICE = 1 << 19


def row_squared_sums(t: Tensor) -> Tensor:
    """Sum of squares of each row, accumulated in float64 (each element's square for a 1-D tensor; 0-D: the value's).

    Every square is formed and summed in float64, so a row's value is exact to float64 rounding and a function of
    the row alone; a row is never split across blocks, so these values do not depend on how a tensor is cut into
    blocks, and :func:`exact_sum` of them is the same float whatever the chunking or thread count. Rows are
    converted a slice of :data:`SQUARES_SLICE` elements at a time: a float64 copy of a whole-tensor block (an
    embedding matrix) would cost hundreds of MB per worker thread.
    """
    d = t.detach()
    if d.dim() <= 1:
        return d.reshape(-1).to(torch.float64).square()
    rows = d.reshape(d.shape[0], -1)
    out = torch.empty(rows.shape[0], dtype=torch.float64)
    step = max(1, SQUARES_SLICE // max(1, rows.shape[1]))
    for r in range(0, rows.shape[0], step):
        part = rows[r : r + step].to(torch.float64, copy=True)  # a copy even from float64: squared in place
        out[r : r + step] = part.mul_(part).sum(1)
    return out


def exact_sum(parts: Sequence[Tensor]) -> float:
    """The exactly rounded sum of the values of 1-D float64 tensors (order and grouping do not matter)."""
    return math.fsum(v for p in parts for v in p.tolist())


def topk_count(numel: int, k_percent: float) -> int:
    """Number of coordinates kept by a top-k% trim of ``numel`` coordinates (at least one)."""
    return max(1, math.ceil(numel * k_percent / 100.0))


def magnitude_threshold(tensors: Iterable[Tensor], k_percent: float) -> float:
    """Smallest magnitude among the top-k% largest-magnitude coordinates of the concatenated tensors.

    Keeping ``|x| >= threshold`` keeps exactly the top-k% (plus any coordinates tied with the threshold).
    """
    mags = [t.detach().abs().flatten() for t in tensors]
    rank = topk_count(sum(m.numel() for m in mags), k_percent)
    if all(m.dtype == torch.float32 for m in mags):
        return radix_kth_largest(mags, rank)  # the same float as kth_largest, several times faster
    return kth_largest(mags, rank)


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


# The streaming statistics passes of global TIES work on the stacked task vectors of one chunk (one row per
# task). They may overwrite ``stacked`` when ``inplace`` (the engine's scratch buffers), saving a copy per step.

_WORKSPACE = threading.local()
# Temporaries of up to this many elements are kept per thread and reused: a fresh multi-megabyte tensor is
# mapped from the OS and page-faulted in on every use, which costs as much as the arithmetic on it.
WORKSPACE_ELEMS = 1 << 21


def workspace(slot: str, n: int, dtype: torch.dtype) -> Tensor:
    """A reusable 1-D temporary of ``n`` elements for this thread (fresh when larger than WORKSPACE_ELEMS).

    Valid until the same ``slot`` is asked for again on this thread: never return one to a caller.
    """
    if n > WORKSPACE_ELEMS:
        return torch.empty(n, dtype=dtype)
    bufs: dict[tuple[str, torch.dtype], Tensor] = _WORKSPACE.__dict__.setdefault("bufs", {})
    buf = bufs.get((slot, dtype))
    if buf is None or buf.numel() < n:
        buf = bufs[(slot, dtype)] = torch.empty(n, dtype=dtype)
    return buf[:n]


def release_workspace() -> None:
    """Free this thread's :func:`workspace` buffers."""
    _WORKSPACE.__dict__.pop("bufs", None)


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


def trim_(stacked: Tensor, thresholds: Sequence[float], kept: Tensor | None = None) -> Tensor:
    """In place: zero each row's coordinates below its threshold (``|x| < th``), by multiplying with the kept mask.

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
    return stacked


def _signs(rows: Tensor) -> Tensor:
    """sign(sum over rows) of ``[T, N]`` rows, in a workspace buffer."""
    return torch.sum(rows, 0, out=workspace("sign", rows.shape[1], rows.dtype)).sign_()


def sign_total_(stacked: Tensor, thresholds: Sequence[float]) -> float:
    """:func:`sign_total` of the task vectors trimmed at ``thresholds``; overwrites ``stacked``."""
    rows = trim_(stacked, thresholds).reshape(stacked.shape[0], -1)
    return float(_signs(rows).sum())  # the same reduction as sign_total, so the same float


def ties_merge_(stacked: Tensor, thresholds: Sequence[float], majority: float | None, reduce: str) -> Tensor:
    """Trim, elect sign and disjoint-merge one chunk: bit for bit :func:`trim`, :func:`elect_sign` and
    :func:`disjoint_merge`, in fewer passes over memory and without boolean temporaries. Overwrites ``stacked``
    and returns a view of it.

    ``majority`` None elects it from this chunk's own signs (per-tensor TIES). Why it is exact: with the
    elected sign s = +-1, the agreeing entries are those with s * x > 0, and summing them equals s times the
    sum of max(s * x, 0) in the same order (round-to-nearest is symmetric under negation); the disagreeing
    entries are zeros that leave a sum starting from +0.0 unchanged. Adding +0.0 at the end turns the one
    possible difference, a -0.0 where nothing agrees, into the +0.0 the reference gives.
    """
    rows = trim_(stacked, thresholds).reshape(stacked.shape[0], -1)
    sign = _signs(rows)
    if majority is None:
        majority = majority_sign(float(sign.sum()))
    return _disjoint_merge_(rows, sign, majority, reduce).view(stacked.shape[1:])


def _disjoint_merge_(rows: Tensor, sign: Tensor, majority: float, reduce: str, zero: Tensor | None = None) -> Tensor:
    """The disjoint merge of trimmed ``rows`` (``[T, N]``) given sign(sum) (zeros not yet elected), into ``rows[0]``.

    ``zero``: where ``sign`` is 0, as 1/0, if already computed.
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
        for row in rows:
            count.add_(torch.gt(row, 0, out=tmp))
    total = torch.sum(rows, 0, out=workspace("total", n, rows.dtype))
    total = torch.mul(total, sign, out=rows[0]).add_(0.0)  # the result lives in the caller's buffer
    return total.div_(count.clamp_(min=1)) if count is not None else total


def _disjoint_merge_columns(cols: Tensor, majority: float, reduce: str) -> Tensor:
    """:func:`_disjoint_merge_` of a few exact-tie columns (sum of trimmed values exactly zero), all electing
    ``majority``, with the sums accumulated in task order from +0.0: what ``sum(0)`` does for up to 4 rows."""
    total = torch.zeros(cols.shape[1], dtype=cols.dtype)
    count = torch.zeros_like(total)
    for col in cols:
        agree = col.mul(majority).clamp_(min=0)
        total.add_(agree)
        count.add_(torch.gt(agree, 0).to(total.dtype))
    total.mul_(majority).add_(0.0)
    return total.div_(count.clamp_(min=1)) if reduce == "mean" else total


# The largest task count for which torch's sum over dim 0 adds the rows one after the other from +0.0 in every
# layout (ATen's cascade sum interleaves four partial sums, and only a fifth row changes the order).
SEQUENTIAL_SUM_ROWS = 4


def ties_merge_folded_(
    stacked: Tensor, thresholds: Sequence[float], provisional: float, reduce: str
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
    trim_(stacked, thresholds, kept=kept)
    sign = _signs(rows)
    total = float(sign.sum())  # exactly what the sign pass's sign_total gives for this chunk
    zero = torch.eq(sign, 0, out=workspace("zero", rows.shape[1], rows.dtype))
    index = torch.mul(zero, kept, out=kept).nonzero().view(-1)  # a zero sum though something survived
    alternative = None
    if index.numel():
        alternative = (index, _disjoint_merge_columns(rows[:, index], -provisional, reduce))
    merged = _disjoint_merge_(rows, sign, provisional, reduce, zero=zero).view(stacked.shape[1:])
    return merged, total, alternative


# ----------------------------------------------------------------------------------------------- DARE pieces


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


def check_finite(state: Mapping[str, Tensor], where: str) -> None:
    """Raise if any tensor holds NaN or inf, naming the checkpoint and parameter."""
    for k, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{where}: parameter '{k}' contains {bad} NaN/inf value(s)")


class NonFiniteMergeError(ValueError):
    """A merge produced NaN or inf: never scored or written (an all-NaN model would still 'score' by argmax)."""


def require_finite_merge(t: Tensor, tensor: str, method: object) -> None:
    """Raise :class:`NonFiniteMergeError` naming ``tensor`` and ``method`` if the merged ``t`` holds NaN or inf."""
    if not t.is_floating_point() or bool(torch.isfinite(t).all()):
        return
    nan = int(torch.isnan(t).sum())
    inf = int(torch.isinf(t).sum())
    who = method if isinstance(method, str) else type(method).__name__
    raise NonFiniteMergeError(
        f"{who} merged tensor '{tensor}' into {nan} NaN and {inf} inf value(s) of {t.numel()}: check the method's "
        "options and the experts' weights"
    )


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
