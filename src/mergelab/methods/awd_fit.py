"""Adaptive Weight Disentanglement's objective and its optimisation as a Lightning module.

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
its own (:func:`fit_delta` with ``per_tensor=True``) with the same iterates as optimising all at once: each
tensor is then its own *group* (own step size, own guard), ``model`` has one group.

The fit is guarded (:class:`Guard`): the objective of every iterate is evaluated; an iterate whose group loss is
not finite or rises above the group's best by more than ``rise_tol`` relative is rejected (delta restored to the
best, the step size halved, the optimiser state reset); after ``max_backoffs`` rejections a group stops. The
returned delta is always each group's best iterate.

Every reduction is formulated so that its result does not depend on torch's intra-op thread count
(:func:`fixed_sum`): same inputs give the same bytes with 1 or N threads."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GRANULARITIES = ("model", "tensor", "row")


NORMS = ("l2", "l2_squared", "l1", "row_l2")


OPTIMIZERS = ("sgd", "adam")


#: Cosines of vectors shorter than this are computed as if they had this norm (no division by zero).
COS_EPS = 1e-12

#: Block length of :func:`fixed_sum`: below torch's parallel grain (32768), so one block is summed by one thread.
SUM_BLOCK = 4096


def fixed_sum(x: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` (all of it, or over ``dim``) in an order that does not depend on the number of threads.

    torch splits a full reduction of more than 32768 elements into one partial sum per thread, so its result
    changes with ``torch.get_num_threads()``; a reduction to many outputs gives each output to one thread. Summing
    fixed blocks of :data:`SUM_BLOCK` elements (many outputs), then the block sums, fixes the order.
    """
    if dim is None:
        x, dim = x.reshape(-1), 0
    x = x.movedim(dim, -1)
    while x.shape[-1] > SUM_BLOCK:
        x = F.pad(x, (0, -x.shape[-1] % SUM_BLOCK))  # zeros: exact, and the blocks then tile the dim
        x = x.reshape(*x.shape[:-1], -1, SUM_BLOCK).sum(-1)
    return x.sum(-1)


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
    """Mean over pairs i != j of |cos|, per Gram matrix of a batch ([..., T, T] -> [...])."""
    n = gram.shape[-1]
    off = 1.0 - torch.eye(n, dtype=gram.dtype, device=gram.device)
    return (cosines(gram).abs() * off).sum((-1, -2)) / (n * (n - 1))


def safe_sqrt(x: Tensor) -> Tensor:
    """sqrt with gradient 0 (not inf) at 0, so the L2 norm of delta = 0 (its initial value) has a subgradient."""
    pos = x > 0
    return torch.where(pos, torch.where(pos, x, 1.0).sqrt(), 0.0)


@dataclass
class Objective:
    """What the loss is; ``num_tensors`` is the number of tensors the whole problem has (the mean's divisor)."""

    granularity: str = "row"
    norm: str = "l2"
    alpha: float = 0.1
    num_tensors: int = 1

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"AWD option 'granularity' must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.norm not in NORMS:
            raise ValueError(f"AWD option 'norm' must be one of {NORMS}, got {self.norm!r}")
        if not (self.alpha >= 0 and math.isfinite(self.alpha)):
            raise ValueError(f"AWD option 'alpha' must be a finite number >= 0, got {self.alpha}")


def tau_gram(tau: Tensor, rowwise: bool) -> Tensor:
    """Gram matrix of the stacked task vectors ``tau`` ([T, ...]): [T, T], or [rows, T, T] when ``rowwise``."""
    n = tau.shape[0]
    if not rowwise:
        flat = tau.reshape(n, -1)
        return flat @ flat.T
    rows = [as_rows(t) for t in tau]
    g = torch.empty(rows[0].shape[0], n, n, dtype=tau.dtype, device=tau.device)
    for i in range(n):
        for j in range(i, n):
            g[:, i, j] = g[:, j, i] = (rows[i] * rows[j]).sum(-1)
    return g


def stack_rows(tau: Tensor) -> Tensor:
    """Stacked task vectors ``[T, *shape]`` laid out row by row, ``[rows, T, cols]`` (rows as :func:`as_rows`):
    each row's T task-vector rows are contiguous, which is what :class:`RowProducts` reads."""
    return tau.reshape(tau.shape[0], *as_rows(tau[0]).shape).transpose(0, 1).contiguous()


class RowProducts(torch.autograd.Function):
    """Row-wise inner products of delta with every task vector and delta's squared row norms:
    ``a[r, t] = <tau_t[r], delta[r]>`` and ``sq[r] = |delta[r]|^2``, from ``tau_rows`` = :func:`stack_rows` ``(tau)``.

    Batched products over the rows with no temporary the size of the task vectors: one read of them forward and
    one backward. (``einsum`` over the ``[T, *shape]`` layout took 2-3x as long over the embedded pool's matrices.)
    Each output is reduced by one thread, so the result does not depend on the thread count.
    """

    @staticmethod
    def forward(ctx: Any, tau_rows: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
        d = as_rows(delta).unsqueeze(1)  # [rows, 1, cols]
        ctx.save_for_backward(tau_rows, d)
        ctx.delta_shape = delta.shape
        return torch.bmm(d, tau_rows.transpose(1, 2)).squeeze(1), torch.bmm(d, d.transpose(1, 2)).reshape(-1)

    @staticmethod
    def backward(ctx: Any, grad_a: Tensor | None, grad_sq: Tensor | None) -> tuple[None, Tensor]:
        tau_rows, d = ctx.saved_tensors
        grad = torch.zeros_like(d) if grad_a is None else torch.bmm(grad_a.unsqueeze(1), tau_rows)
        if grad_sq is not None:
            grad.addcmul_(d, grad_sq.reshape(-1, 1, 1), value=2.0)
        return None, grad.reshape(ctx.delta_shape)


def gram_of_differences(tau: Tensor, delta: Tensor, gram: Tensor) -> tuple[Tensor, Tensor]:
    """Gram matrix ``[T, T]`` of ``tau_t - delta`` from ``gram`` = :func:`tau_gram` ``(tau)``, and delta's squared
    norm; differentiable in delta, and never materialising the T differences. (Row granularity does the same per
    row, batched over every tensor, in :func:`objective_terms`.)"""
    d = delta.reshape(-1)
    a = torch.mv(tau.reshape(tau.shape[0], -1), d)  # one pass over the task vectors (and one for the grad)
    sq = fixed_sum(as_rows(delta).pow(2).sum(-1))  # not torch.dot: its full reduction depends on the threads
    return gram - a[:, None] - a[None, :] + sq, sq


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
    (``rows_stacked``), which a fit does once rather than at every evaluation.

    For ``tensor``/``row`` the terms are sums over the given tensors divided by ``objective.num_tensors``, so a
    subset of the tensors contributes exactly its share of the whole loss.
    """
    rowwise = objective.granularity == "row"
    n = objective.num_tensors
    if rowwise:
        # The T x T algebra of every row of every tensor in one batch: per tensor it is ~20 small ops.
        stacked = taus if rows_stacked else [stack_rows(t) for t in taus]
        products = [RowProducts.apply(t, d) for t, d in zip(stacked, deltas, strict=True)]
        a = torch.cat([p[0] for p in products])
        sq_rows = torch.cat([p[1] for p in products])
        g_all = torch.cat(list(grams)) - a[:, :, None] - a[:, None, :] + sq_rows[:, None, None]
        cos_rows = mean_abs_cos(g_all)
        ends = torch.tensor([p[1].shape[0] for p in products]).cumsum(0).tolist()
        pieces = [(s, e) for s, e in zip([0, *ends[:-1]], ends, strict=True)]
    cos_terms, norms, sqs, model_gram = [], [], [], None
    for i, (tau, c, d) in enumerate(zip(taus, grams, deltas, strict=True)):
        if rowwise:
            s, e = pieces[i]
            g, sq = g_all[s:e], sq_rows[s:e]
        else:
            g, sq = gram_of_differences(tau, d, c)
        flat_gram = fixed_sum(g, dim=0) if rowwise else g
        model_gram = flat_gram if model_gram is None else model_gram + flat_gram
        sq_total = fixed_sum(sq)
        sqs.append(sq_total)
        if objective.granularity != "model":
            # rows: the mean over rows of the row's mean |cos|
            cos_terms.append(fixed_sum(cos_rows[s:e]) / g.shape[0] if rowwise else mean_abs_cos(g))
        if objective.norm == "l2":
            norms.append(safe_sqrt(sq_total))
        elif objective.norm == "l2_squared":
            norms.append(sq_total)
        elif objective.norm == "l1":
            norms.append(fixed_sum(d.abs()))
        else:  # row_l2
            norms.append(fixed_sum(safe_sqrt(sq if rowwise else as_rows(d).pow(2).sum(-1))))
    assert model_gram is not None
    if objective.granularity == "model":
        l_o = mean_abs_cos(model_gram)
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


@dataclass
class OptimizerConfig:
    """How delta is optimised.

    ``name``: ``adam`` or ``sgd`` (with ``momentum``), ``steps`` full-batch steps. With ``lr_relative`` the step size
    of each group is ``lr`` times its task vectors' scale, so that a pool whose task vectors are s times smaller
    takes s times smaller steps (the cosines are scale-free, so the iterates of L_O scale with tau): Adam's step is
    about ``lr`` per coordinate whatever the gradient's size, so its lr is multiplied by the rms of tau; the
    gradient of a cosine grows as 1 / |tau|, so SGD's lr is multiplied by rms(tau)^2.
    ``rise_tol`` and ``max_backoffs`` configure the :class:`Guard`.
    """

    name: str = "adam"
    lr: float = 0.01
    momentum: float = 0.0
    steps: int = 300
    lr_relative: bool = True
    rise_tol: float = 1e-3
    max_backoffs: int = 10

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"AWD option 'optimizer' must be one of {OPTIMIZERS}, got {self.name!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"AWD option 'lr' must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"AWD option 'momentum' must be in [0, 1), got {self.momentum}")
        if int(self.steps) < 1:
            raise ValueError(f"AWD option 'steps' must be >= 1, got {self.steps}")
        if not (self.rise_tol >= 0 and math.isfinite(self.rise_tol)):
            raise ValueError(f"AWD option 'rise_tol' must be a finite number >= 0, got {self.rise_tol}")
        if int(self.max_backoffs) < 0:
            raise ValueError(f"AWD option 'max_backoffs' must be >= 0, got {self.max_backoffs}")

    def group_lr(self, tau_rms: float) -> float:
        """The step size of a group whose task vectors have root-mean-square ``tau_rms``."""
        if not self.lr_relative:
            return self.lr
        return self.lr * (tau_rms if self.name == "adam" else tau_rms**2)

    def build(self, params: Sequence[nn.Parameter], lrs: Sequence[float]) -> torch.optim.Optimizer:
        """One parameter group per tensor, each with its own step size (halved on its own back-offs)."""
        groups = [{"params": [p], "lr": lr} for p, lr in zip(params, lrs, strict=True)]
        if self.name == "sgd":
            return torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum)
        return torch.optim.Adam(groups, lr=self.lr)


@dataclass
class GroupGuard:
    """What the guard did for one group of tensors (one tensor, or all of them for ``granularity=model``)."""

    names: list[str]
    best: float = math.inf
    best_step: int = 0
    backoffs: int = 0
    #: The step at which the group stopped after ``max_backoffs`` back-offs (None: it ran every step).
    stopped_at: int | None = None


class Guard:
    """Accepts or rejects each evaluated iterate of each group.

    An iterate is rejected when its group loss is not finite or exceeds the group's best loss so far by more than
    ``rise_tol * |best|``; the caller then restores the best delta, halves the group's step size and resets its
    optimiser state. After ``max_backoffs`` rejections the group stops (its delta stays at its best).
    """

    def __init__(self, groups: Sequence[Sequence[str]], rise_tol: float, max_backoffs: int) -> None:
        self.groups = [GroupGuard(list(g)) for g in groups]
        self.rise_tol, self.max_backoffs = rise_tol, max_backoffs

    def check(self, step: int, losses: Sequence[float]) -> tuple[list[int], list[int]]:
        """Judge the iterate of ``step``: (groups whose iterate is a new best, groups whose iterate is rejected)."""
        improved, rejected = [], []
        for i, (g, v) in enumerate(zip(self.groups, losses, strict=True)):
            if g.stopped_at is not None:
                continue
            if not math.isfinite(v) or v > g.best + self.rise_tol * abs(g.best):
                rejected.append(i)
                g.backoffs += 1
                if g.backoffs >= self.max_backoffs:
                    g.stopped_at = step
            elif v < g.best:
                g.best, g.best_step = v, step
                improved.append(i)
        return improved, rejected

    def active(self, rejected: Sequence[int]) -> list[int]:
        """Groups that take the next step: not stopped, and not just sent back to their best."""
        return [i for i, g in enumerate(self.groups) if g.stopped_at is None and i not in rejected]

    @property
    def all_stopped(self) -> bool:
        return all(g.stopped_at is not None for g in self.groups)


@dataclass
class History:
    """Per-evaluation values of the loss terms and the model-level Gram matrix of the disentangled vectors.

    Row k is the iterate after k steps (row 0: delta = 0; row ``steps``: after the last step), as evaluated
    (a rejected iterate included); ``backoffs`` counts the groups whose iterate was rejected at that row. The
    returned delta is each group's best iterate, whose terms are :attr:`FitResult.final`.
    """

    L_O: list[float] = field(default_factory=list)
    L_R: list[float] = field(default_factory=list)
    grams: list[Tensor] = field(default_factory=list)
    backoffs: list[int] = field(default_factory=list)

    def append(self, l_o: float, l_r: float, gram: Tensor, backoffs: int) -> None:
        self.L_O.append(l_o)
        self.L_R.append(l_r)
        self.grams.append(gram)
        self.backoffs.append(backoffs)

    def add(self, other: History) -> None:
        """Sum a subset's per-step contributions into this one (tensor/row granularity decompose by tensor)."""
        if not self.L_O:
            self.L_O, self.L_R, self.grams = list(other.L_O), list(other.L_R), list(other.grams)
            self.backoffs = list(other.backoffs)
            return
        self.L_O = [a + b for a, b in zip(self.L_O, other.L_O, strict=True)]
        self.L_R = [a + b for a, b in zip(self.L_R, other.L_R, strict=True)]
        self.grams = [a + b for a, b in zip(self.grams, other.grams, strict=True)]
        self.backoffs = [a + b for a, b in zip(self.backoffs, other.backoffs, strict=True)]

    def rows(self, alpha: float) -> Iterator[dict[str, float]]:
        """One record per evaluation: L_O, L_R, the loss, the model-level mean |cos| and the back-offs."""
        backoffs = self.backoffs or [0] * len(self.L_O)
        for lo, lr, g, b in zip(self.L_O, self.L_R, self.grams, backoffs, strict=True):
            yield {
                "L_O": lo,
                "L_R": lr,
                "loss": lo + alpha * lr,
                "mean_abs_cos": float(mean_abs_cos(g)),
                "backoffs": b,
            }


@dataclass
class FitResult:
    """A learned delta (in memory, or read from disk after a streaming fit) and how it was reached."""

    delta: Mapping[str, Tensor]
    history: History
    gram_before: Tensor
    gram_after: Tensor
    #: ||delta||^2 per parameter name (float64 sums), taken while delta is in memory so that reports never re-read
    #: a delta kept on disk; empty when delta was loaded rather than fitted.
    sq_norms: dict[str, float] = field(default_factory=dict)
    #: L_O and L_R of the returned delta (each group's best iterate); empty when delta was loaded.
    final: dict[str, float] = field(default_factory=dict)
    #: What the guard did, per group.
    guard: list[GroupGuard] = field(default_factory=list)

    def guard_report(self) -> dict[str, Any]:
        """The guard's activity over all groups: back-offs, groups that stopped early, best steps."""
        if not self.guard:
            return {}
        steps = [g.best_step for g in self.guard]
        return {
            "groups": len(self.guard),
            "backoffs": sum(g.backoffs for g in self.guard),
            "groups_backed_off": sum(g.backoffs > 0 for g in self.guard),
            "groups_stopped_early": sum(g.stopped_at is not None for g in self.guard),
            "best_step_min": min(steps),
            "best_step_max": max(steps),
        }
