"""State-dict arithmetic shared by every merge method.

All methods express themselves through these functions, so a merge is a composition of small, separately
tested operations on ``{parameter name: tensor}`` mappings. Arithmetic runs in float32 (or the input's wider
dtype) and results are cast back to the pretrained tensor's dtype by :func:`apply_task_vector`.

The kernels of single methods live with them (:mod:`mergelab.methods.ties_ops`, :mod:`mergelab.methods.dare`,
:mod:`mergelab.methods.magnitude_select`), the engine's reusable buffers in :mod:`mergelab.engine.scratch` and the
checks on weights in :mod:`mergelab.weight_checks`.
"""

from __future__ import annotations

import math
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
