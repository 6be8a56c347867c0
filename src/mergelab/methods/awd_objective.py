"""Adaptive Weight Disentanglement's objective: its loss terms, computed in a fixed order.

AWD (Xiong et al. 2024) learns one redundant vector delta shared by every task and subtracts it from each task
vector, tau_hat_t = tau_t - delta, so that the tau_hat are as orthogonal as possible while delta stays small:

    L = L_O + alpha * L_R,   L_O = mean_{i != j} |cos(tau_i - delta, tau_j - delta)|,   L_R = ||delta||.

Every cosine is read off a Gram matrix. The Gram matrix of the tau is computed once; the one of tau - delta is
``G = C - a 1^T - 1 a^T + |delta|^2 11^T`` with ``a_t = <tau_t, delta>``, so a step costs one product of the
task vectors with delta and never materialises the T differences (memory stays T task vectors plus delta, its
gradient, the optimiser state and the best delta so far).

Granularity (of delta's loss terms and of the cosine):
    ``model``: one cosine over all disentangled tensors flattened together; L_R is the norm of all of delta.
    ``tensor``: one cosine per tensor; L_O and L_R are the means over tensors of the per-tensor terms.
    ``row``: one cosine per row of each tensor, averaged over rows; then as ``tensor``.
With ``tensor`` and ``row`` the loss is a sum of per-tensor terms, so each tensor's delta can be optimised on
its own (:func:`mergelab.methods.awd_module.fit_delta` with ``per_tensor=True``) with the same iterates as
optimising all at once.

Every product is elementwise and every sum a fixed tree of elementwise additions
(:func:`mergelab.methods.awd_arithmetic.tree_sum`), so the terms have the same bytes on any CPU."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from torch import Tensor

from mergelab.config_types import Doc, Range, Requires, check_fields
from mergelab.methods.awd_arithmetic import fixed_sum, tree_sum, tree_sum_

GRANULARITIES = ("model", "tensor", "row")
NORMS = ("l2", "l2_squared", "l1", "row_l2")

# AWD's objective options, declared once: the method's constructor and :class:`Objective` both read them.
Granularity = Annotated[Literal[GRANULARITIES], Doc("granularity of the cosine and of delta's norm")]
Norm = Annotated[Literal[NORMS], Doc("the norm of delta in L_R")]
Alpha = Annotated[float, Range(0.0, float("inf"), high_open=True), Doc("weight of the norm term L_R")]

#: A fit one tensor at a time cannot couple tensors, as ``granularity=model`` does.
PER_TENSOR_MODE = Requires(
    ("mode", "granularity"),
    lambda mode, granularity: not (mode == "per_tensor" and granularity == "model"),
    "mode=per_tensor needs granularity tensor or row (model couples the tensors)",
)


#: Cosines of vectors shorter than this are computed as if they had this norm (no division by zero).
COS_EPS = 1e-12

#: Most elements of a product temporary (tasks x columns x rows) made at once: rows are taken in chunks, so that
#: the temporaries stay small (4 MiB in float32) whatever the size of a matrix (large ones cost page faults).
PRODUCT_CHUNK = 1 << 20


def as_rows(t: Tensor) -> Tensor:
    """View a tensor as rows: a matrix's rows, dim 0 of a higher-rank tensor, one row for a vector or scalar."""
    return t.reshape(1, -1) if t.dim() <= 1 else t.reshape(t.shape[0], -1)


def cosines(gram: Tensor) -> Tensor:
    """Pairwise cosine similarities from a Gram matrix (or a batch of them, [..., T, T]).

    A zero vector (zero Gram row) has cosine 0 with every vector, with a finite gradient: the squared norm is
    clamped *before* the sqrt (sqrt's derivative at 0 is inf, and inf times a clamp's zero gradient is NaN).
    """
    norms = torch.diagonal(gram, dim1=-2, dim2=-1).clamp_min(COS_EPS**2).sqrt()
    return gram / (norms[..., :, None] * norms[..., None, :])


def mean_abs_cos(gram: Tensor) -> Tensor:
    """Mean over pairs i != j of |cos|, per Gram matrix of a batch ([..., T, T] -> [...]), in a fixed order."""
    n = gram.shape[-1]
    off = 1.0 - torch.eye(n, dtype=gram.dtype, device=gram.device)
    return fixed_sum((cosines(gram).abs() * off).flatten(-2), dim=-1) / (n * (n - 1))


def safe_sqrt(x: Tensor) -> Tensor:
    """sqrt with gradient 0 (not inf) at 0, so the L2 norm of delta = 0 (its initial value) has a subgradient."""
    pos = x > 0
    return torch.where(pos, torch.where(pos, x, 1.0).sqrt(), 0.0)


@dataclass
class Objective:
    """What the loss is; ``num_tensors`` is the number of tensors the whole problem has (the mean's divisor)."""

    granularity: Granularity = "row"
    norm: Norm = "l2"
    alpha: Alpha = 0.1
    num_tensors: int = 1

    def __post_init__(self) -> None:
        check_fields(self, "AWD option '{}'".format)


def stack_rows(tau: Tensor) -> Tensor:
    """Stacked task vectors ``[T, *shape]`` laid out for :class:`RowProducts`: ``[cols, T, rows]`` (rows as
    :func:`as_rows`), columns outermost, so that each step of the sums over a row's columns (:func:`tree_sum_`) adds
    one contiguous half of a buffer to the other."""
    return row_view(tau).contiguous()


def row_view(tau: Tensor) -> Tensor:
    """Stacked task vectors ``[T, *shape]`` seen as ``[cols, T, rows]`` without a copy (strided): the values
    :func:`stack_rows` lays out (the products are elementwise, so the layout changes no bit, only the speed)."""
    return tau.reshape(tau.shape[0], *as_rows(tau[0]).shape).permute(2, 0, 1)


def row_chunks(rows: Tensor, factor: int = 1) -> list[tuple[int, int]]:
    """Row ranges of ``rows`` ([C, T, R]) whose product temporaries (``factor`` x T x C per row) hold at most
    :data:`PRODUCT_CHUNK` elements."""
    r = rows.shape[2]
    step = max(1, PRODUCT_CHUNK // max(1, factor * rows.shape[0] * rows.shape[1]))
    return [(s, min(s + step, r)) for s in range(0, r, step)]


def row_gram(rows: Tensor) -> Tensor:
    """Per-row Gram matrices ``[R, T, T]`` of task vectors laid out as :func:`stack_rows` (or :func:`row_view`),
    in a fixed order (elementwise products, :func:`tree_sum`); exactly symmetric."""
    c, n, r = rows.shape
    g = torch.empty(n, n, r, dtype=rows.dtype, device=rows.device)
    chunks = row_chunks(rows, n)
    buf = torch.empty(c, n, n, chunks[0][1] if chunks else 0, dtype=rows.dtype, device=rows.device)
    for s, e in chunks:
        x, w = rows[:, :, s:e], buf[..., : e - s]
        g[:, :, s:e] = tree_sum_(torch.mul(x[:, :, None], x[:, None, :], out=w), dim=0)
    return g.permute(2, 0, 1).contiguous()


def tau_gram(tau: Tensor, rowwise: bool) -> Tensor:
    """Gram matrix of the stacked task vectors ``tau`` ([T, ...]): [T, T], or [rows, T, T] when ``rowwise``.

    The row-wise Gram matrices are the fit's (:func:`row_gram`, a fixed order); the whole-vector one is a GEMM
    (fast, and its last bits follow the BLAS: the fit sums :func:`row_gram` over rows instead, reports use this)."""
    if rowwise:
        return row_gram(row_view(tau))
    flat = tau.reshape(tau.shape[0], -1)
    return flat @ flat.T


class RowProducts(torch.autograd.Function):
    """Row-wise inner products of delta with every task vector and delta's squared row norms:
    ``a[r, t] = <tau_t[r], delta[r]>`` and ``sq[r] = |delta[r]|^2``, from ``tau_rows`` = :func:`stack_rows` ``(tau)``
    (or :func:`row_view`: the same values).

    In a fixed order, not a GEMM (whose blocking, and so its last bits, follows the CPU and the BLAS): elementwise
    products summed by :func:`tree_sum` forward; backward, ``grad[r] = sum_t grad_a[r, t] tau_t[r] + 2 grad_sq[r]
    delta[r]`` added term by term in task order. Every operation is elementwise, so the bytes do not depend on the
    thread count, the SIMD width or the BLAS. Rows are taken in chunks (:func:`row_chunks`) whose temporaries stay
    in cache, whatever the size of a matrix.
    """

    @staticmethod
    def forward(ctx: Any, tau_rows: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
        c, n, r = tau_rows.shape
        d = delta.reshape(r, -1).T.contiguous()  # [cols, rows], laid out as the task vectors
        ctx.save_for_backward(tau_rows, d)
        ctx.delta_shape = delta.shape
        a = torch.empty(n, r, dtype=d.dtype, device=d.device)
        sq = torch.empty(r, dtype=d.dtype, device=d.device)
        chunks = row_chunks(tau_rows)
        buf = torch.empty(c, n, chunks[0][1] if chunks else 0, dtype=d.dtype, device=d.device)
        for s, e in chunks:
            ds, w = d[:, s:e], buf[..., : e - s]
            a[:, s:e] = tree_sum_(torch.mul(tau_rows[:, :, s:e], ds[:, None], out=w), dim=0)
            sq[s:e] = tree_sum_(torch.mul(ds, ds, out=w[:, 0]), dim=0)
        return a.T.contiguous(), sq

    @staticmethod
    def backward(ctx: Any, grad_a: Tensor | None, grad_sq: Tensor | None) -> tuple[None, Tensor]:
        tau_rows, d = ctx.saved_tensors
        grad = torch.zeros_like(d)  # [cols, rows]
        ga = None if grad_a is None else grad_a.T.contiguous()  # [T, rows]
        chunks = row_chunks(tau_rows)
        buf = torch.empty(d.shape[0], chunks[0][1] if chunks else 0, dtype=d.dtype, device=d.device)
        for s, e in chunks:
            acc, w = grad[:, s:e], buf[:, : e - s]
            terms = [] if ga is None else [(tau_rows[:, t, s:e], ga[t, s:e]) for t in range(tau_rows.shape[1])]
            if grad_sq is not None:
                terms.append((d[:, s:e], grad_sq[s:e] * 2.0))
            for k, (x, y) in enumerate(terms):  # added in task order, then delta's term
                if k == 0:
                    torch.mul(x, y, out=acc)
                else:
                    acc.add_(torch.mul(x, y, out=w))
        return None, grad.T.reshape(ctx.delta_shape)


class RowCosines(torch.autograd.Function):
    """The mean over pairs i != j of |cos(tau_i - delta, tau_j - delta)| per Gram matrix of a batch, from the
    task vectors' Gram matrices ``c`` ([B, T, T]), ``a`` ([B, T], :class:`RowProducts`) and ``sq`` = |delta|^2
    ([B]): ``G = c - a 1^T - 1 a^T + sq``. Returns the means ([B]) and G (not differentiable, for reports).

    The backward is written out so that every sum over tasks is a :func:`tree_sum` (autograd would reduce the
    broadcast a and sq with torch's vectorised ``sum``, whose order follows the SIMD width once T >= 8)."""

    @staticmethod
    def forward(ctx: Any, c: Tensor, a: Tensor, sq: Tensor) -> tuple[Tensor, Tensor]:
        g = c - a[:, :, None] - a[:, None, :] + sq[:, None, None]
        q = torch.diagonal(g, dim1=-2, dim2=-1)
        norms = q.clamp_min(COS_EPS**2).sqrt()
        den = norms[:, :, None] * norms[:, None, :]
        cos = g / den
        n = g.shape[-1]
        off = 1.0 - torch.eye(n, dtype=g.dtype, device=g.device)
        ctx.save_for_backward(cos, den, norms, q >= COS_EPS**2, off)
        ctx.mark_non_differentiable(g)
        return tree_sum((cos.abs() * off).flatten(-2)) / (n * (n - 1)), g

    @staticmethod
    def backward(ctx: Any, grad_m: Tensor, _grad_g: Tensor | None) -> tuple[None, Tensor, Tensor]:
        cos, den, norms, unclamped, off = ctx.saved_tensors
        n = cos.shape[-1]
        dcos = torch.sign(cos) * off * (grad_m / (n * (n - 1)))[:, None, None]
        dg = dcos / den
        dden = -dcos * (cos / den)  # d(g / den) / d den
        # den_ij = norm_i norm_j: norm_i gets sum_j dden_ij norm_j + sum_j dden_ji norm_j
        dnorm = tree_sum(dden * norms[:, None, :]) + tree_sum((dden * norms[:, :, None]).transpose(-1, -2))
        dq = torch.where(unclamped, dnorm / (2 * norms), 0.0)
        dg = dg + torch.diag_embed(dq)  # the diagonal of dcos is 0: this sets it
        # g_ij = c_ij - a_i - a_j + sq
        da = -(tree_sum(dg) + tree_sum(dg.transpose(-1, -2)))
        dsq = tree_sum(dg.flatten(-2))
        return None, da, dsq


def objective_terms(
    objective: Objective,
    taus: Sequence[Tensor],
    grams: Sequence[Tensor],
    deltas: Sequence[Tensor],
    rows_stacked: bool = False,
) -> dict[str, Tensor]:
    """L_O, L_R and the loss at ``deltas`` (one per tensor), the model-level Gram matrix (detached), and
    ``group_loss``: the loss of each independently optimisable group (one per tensor for ``tensor``/``row``,
    whose sum is the loss; one for ``model``).

    ``taus`` are ``[T, *shape]``; at ``row`` granularity they may instead be given as :func:`stack_rows` already
    (``rows_stacked``), which a fit does once rather than at every evaluation. ``grams`` are :func:`tau_gram`'s
    (``[rows, T, T]`` at ``row`` granularity, ``[T, T]`` otherwise).

    For ``tensor``/``row`` the terms are sums over the given tensors divided by ``objective.num_tensors``, so a
    subset of the tensors contributes exactly its share of the whole loss. Every sum has a fixed order
    (:func:`tree_sum`, or tensor by tensor in the given order): the terms have the same bytes on any CPU.
    """
    rowwise = objective.granularity == "row"
    n = objective.num_tensors
    a_rows, sq_rows = [], []
    for tau, d in zip(taus, deltas, strict=True):
        rows = (tau if rows_stacked else stack_rows(tau)) if rowwise else row_view(tau)
        a, sq = RowProducts.apply(rows, d)
        a_rows.append(a)
        sq_rows.append(sq)
    if rowwise:
        # The T x T algebra of every row of every tensor in one batch: per tensor it is ~20 small ops.
        cos_rows, g_all = RowCosines.apply(torch.cat(list(grams)), torch.cat(a_rows), torch.cat(sq_rows))
        ends = torch.tensor([a.shape[0] for a in a_rows]).cumsum(0).tolist()
        pieces = list(zip([0, *ends[:-1]], ends, strict=True))
        cos_terms = [fixed_sum(cos_rows[s:e]) / (e - s) for s, e in pieces]  # the mean over rows
        tensor_grams = [fixed_sum(g_all[s:e], dim=0) for s, e in pieces]
        sqs = [fixed_sum(sq) for sq in sq_rows]
    else:
        a_t = [fixed_sum(a, dim=0) for a in a_rows]
        sqs = [fixed_sum(sq) for sq in sq_rows]
        if objective.granularity == "tensor":
            cos_t, g_t = RowCosines.apply(torch.stack(list(grams)), torch.stack(a_t), torch.stack(sqs))
            cos_terms, tensor_grams = list(cos_t), list(g_t)
        else:  # model: one cosine over all tensors, every sum tensor by tensor in the given order
            c_m, a_m, sq_m = grams[0], a_t[0], sqs[0]
            for c, a, sq in zip(grams[1:], a_t[1:], sqs[1:], strict=True):
                c_m, a_m, sq_m = c_m + c, a_m + a, sq_m + sq
            cos_m, g_m = RowCosines.apply(c_m[None], a_m[None], sq_m[None])
            tensor_grams = [g_m[0]]
    model_gram = tensor_grams[0]
    for g in tensor_grams[1:]:
        model_gram = model_gram + g
    norms = []
    for d, sq_total, sq in zip(deltas, sqs, sq_rows, strict=True):
        if objective.norm == "l2":
            norms.append(safe_sqrt(sq_total))
        elif objective.norm == "l2_squared":
            norms.append(sq_total)
        elif objective.norm == "l1":
            norms.append(fixed_sum(d.abs()))
        else:  # row_l2
            row_sq = sq if rowwise else fixed_sum(as_rows(d) * as_rows(d), dim=-1)
            norms.append(fixed_sum(safe_sqrt(row_sq)))
    if objective.granularity == "model":
        l_o = cos_m[0]
        l_r = safe_sqrt(fixed_sum(torch.stack(sqs))) if objective.norm == "l2" else fixed_sum(torch.stack(norms))
        loss = l_o + objective.alpha * l_r
        group_loss = loss[None]
    else:
        # Each tensor's share of the loss computed alone, so that a whole fit and a per-tensor fit (one tensor's
        # terms only) see the same group losses, bit for bit.
        lo_parts = torch.stack(cos_terms) / n
        lr_parts = torch.stack(norms) / n
        group_loss = lo_parts + objective.alpha * lr_parts
        l_o, l_r = fixed_sum(lo_parts), fixed_sum(lr_parts)
        loss = fixed_sum(group_loss)
    return {"L_O": l_o, "L_R": l_r, "loss": loss, "gram": model_gram.detach(), "group_loss": group_loss}
