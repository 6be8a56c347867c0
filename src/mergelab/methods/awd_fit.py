"""Adaptive Weight Disentanglement's objective and its optimisation as a Lightning module.

AWD (Xiong et al. 2024) learns one redundant vector delta shared by every task and subtracts it from each task
vector, tau_hat_t = tau_t - delta, so that the tau_hat are as orthogonal as possible while delta stays small:

    L = L_O + alpha * L_R,   L_O = mean_{i != j} |cos(tau_i - delta, tau_j - delta)|,   L_R = ||delta||.

Every cosine is read off a Gram matrix. The Gram matrix of the tau is computed once; the one of tau - delta is
``G = C - a 1^T - 1 a^T + |delta|^2 11^T`` with ``a_t = <tau_t, delta>``, so a step costs one product of the
task vectors with delta and never materialises the T differences (memory stays T task vectors plus delta, its
gradient and the optimiser state).

Granularity (of delta's loss terms and of the cosine):
    ``model``: one cosine over all disentangled tensors flattened together; L_R is the norm of all of delta.
    ``tensor``: one cosine per tensor; L_O and L_R are the means over tensors of the per-tensor terms.
    ``row``: one cosine per row of each tensor, averaged over rows; then as ``tensor``.
With ``tensor`` and ``row`` the loss is a sum of per-tensor terms, so each tensor's delta can be optimised on
its own (:func:`fit_delta` with ``per_tensor=True``) with the same iterates as optimising all at once."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mergelab.training.distributed import trainer_arguments

GRANULARITIES = ("model", "tensor", "row")


NORMS = ("l2", "l2_squared", "l1", "row_l2")


OPTIMIZERS = ("sgd", "adam")


#: Cosines of vectors shorter than this are computed as if they had this norm (no division by zero).
COS_EPS = 1e-12


def as_rows(t: Tensor) -> Tensor:
    """View a tensor as rows: a matrix's rows, dim 0 of a higher-rank tensor, one row for a vector or scalar."""
    return t.reshape(1, -1) if t.dim() <= 1 else t.reshape(t.shape[0], -1)


def cosines(gram: Tensor) -> Tensor:
    """Pairwise cosine similarities from a Gram matrix (or a batch of them, [..., T, T])."""
    norms = torch.diagonal(gram, dim1=-2, dim2=-1).clamp_min(0).sqrt().clamp_min(COS_EPS)
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


def gram_of_differences(tau: Tensor, delta: Tensor, gram: Tensor, rowwise: bool) -> tuple[Tensor, Tensor]:
    """Gram matrix of ``tau_t - delta`` from ``gram`` = :func:`tau_gram` ``(tau)``, and delta's squared norm
    (per row when ``rowwise``); differentiable in delta, and never materialising the T differences."""
    if not rowwise:
        d = delta.reshape(-1)
        a = torch.mv(tau.reshape(tau.shape[0], -1), d)  # one pass over the task vectors (and one for the grad)
        sq = torch.dot(d, d)
        return gram - a[:, None] - a[None, :] + sq, sq
    d = as_rows(delta)
    a = torch.einsum("trc,rc->rt", tau.reshape(tau.shape[0], *d.shape), d)  # row-wise <tau_t, delta>: [rows, T]
    sq = (d * d).sum(-1)
    return gram - a[:, :, None] - a[:, None, :] + sq[:, None, None], sq


def objective_terms(
    objective: Objective, taus: Sequence[Tensor], grams: Sequence[Tensor], deltas: Sequence[Tensor]
) -> dict[str, Tensor]:
    """L_O, L_R and the loss at ``deltas`` (one per tensor), plus the model-level Gram matrix (detached).

    For ``tensor``/``row`` the terms are sums over the given tensors divided by ``objective.num_tensors``, so a
    subset of the tensors contributes exactly its share of the whole loss.
    """
    rowwise = objective.granularity == "row"
    cos_terms, norms, sqs, model_gram = [], [], [], None
    for tau, c, d in zip(taus, grams, deltas, strict=True):
        g, sq = gram_of_differences(tau, d, c, rowwise)
        flat_gram = g.sum(0) if rowwise else g
        model_gram = flat_gram if model_gram is None else model_gram + flat_gram
        sqs.append(sq.sum())
        if objective.granularity != "model":
            cos_terms.append(mean_abs_cos(g).mean())  # rows: the mean over rows of the row's mean |cos|
        if objective.norm == "l2":
            norms.append(safe_sqrt(sq.sum()))
        elif objective.norm == "l2_squared":
            norms.append(sq.sum())
        elif objective.norm == "l1":
            norms.append(d.abs().sum())
        else:  # row_l2
            norms.append(safe_sqrt((as_rows(d) * as_rows(d)).sum(-1)).sum())
    assert model_gram is not None
    if objective.granularity == "model":
        l_o = mean_abs_cos(model_gram)
        l_r = safe_sqrt(torch.stack(sqs).sum()) if objective.norm == "l2" else torch.stack(norms).sum()
    else:
        l_o = torch.stack(cos_terms).sum() / objective.num_tensors
        l_r = torch.stack(norms).sum() / objective.num_tensors
    return {"L_O": l_o, "L_R": l_r, "loss": l_o + objective.alpha * l_r, "gram": model_gram.detach()}


@dataclass
class OptimizerConfig:
    """How delta is optimised: ``sgd`` (with momentum) or ``adam``, a learning rate and a number of steps."""

    name: str = "sgd"
    lr: float = 1.0
    momentum: float = 0.0
    steps: int = 300

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"AWD option 'optimizer' must be one of {OPTIMIZERS}, got {self.name!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"AWD option 'lr' must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"AWD option 'momentum' must be in [0, 1), got {self.momentum}")
        if int(self.steps) < 1:
            raise ValueError(f"AWD option 'steps' must be >= 1, got {self.steps}")

    def build(self, params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
        if self.name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)
        return torch.optim.Adam(params, lr=self.lr)


@dataclass
class History:
    """Per-step values of the loss terms and the model-level Gram matrix of the disentangled vectors."""

    L_O: list[float] = field(default_factory=list)
    L_R: list[float] = field(default_factory=list)
    grams: list[Tensor] = field(default_factory=list)

    def add(self, other: History) -> None:
        """Sum a subset's per-step contributions into this one (tensor/row granularity decompose by tensor)."""
        if not self.L_O:
            self.L_O, self.L_R, self.grams = list(other.L_O), list(other.L_R), list(other.grams)
            return
        self.L_O = [a + b for a, b in zip(self.L_O, other.L_O, strict=True)]
        self.L_R = [a + b for a, b in zip(self.L_R, other.L_R, strict=True)]
        self.grams = [a + b for a, b in zip(self.grams, other.grams, strict=True)]

    def rows(self, alpha: float) -> Iterator[dict[str, float]]:
        """One record per step: L_O, L_R, the loss and the model-level mean |cos| of the disentangled vectors."""
        for lo, lr, g in zip(self.L_O, self.L_R, self.grams, strict=True):
            yield {"L_O": lo, "L_R": lr, "loss": lo + alpha * lr, "mean_abs_cos": float(mean_abs_cos(g))}


class _Steps(torch.utils.data.Dataset):
    """AWD needs no data: each 'batch' is one full-batch optimisation step."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int) -> int:
        return i


class AWDModule(L.LightningModule):
    """The redundant vector delta (the only trainable parameter, initialised at zero) over frozen task vectors.

    Args:
        names, shapes: the disentangled parameters.
        load: name -> its task vectors stacked, [T, *shape]; kept as non-persistent buffers (not copied).
        objective: the loss (granularity, norm, alpha).
        optim: optimiser, learning rate and number of steps.
        log_prefix: prefix of the logged metric names; ``None`` logs nothing (per-tensor fits).
    """

    def __init__(
        self,
        names: Sequence[str],
        shapes: Mapping[str, tuple[int, ...]],
        load: Callable[[str], Tensor],
        objective: Objective,
        optim: OptimizerConfig,
        log_prefix: str | None,
    ) -> None:
        super().__init__()
        if not names:
            raise ValueError("AWD: no parameter is disentangled (check method.include / method.exclude)")
        self.names = list(names)
        self.objective, self.optim, self.log_prefix = objective, optim, log_prefix
        rowwise = objective.granularity == "row"
        for i, n in enumerate(self.names):
            v = load(n)
            if tuple(v.shape[1:]) != tuple(shapes[n]):
                raise ValueError(f"AWD: task vectors of {n} have shape {tuple(v.shape[1:])}, expected {shapes[n]}")
            if v.shape[0] < 2:
                raise ValueError(f"AWD needs at least two task vectors, got {v.shape[0]}")
            self.register_buffer(f"tau_{i}", v, persistent=False)
            self.register_buffer(f"gram_{i}", tau_gram(v, rowwise), persistent=False)
        self.delta = nn.ParameterList([nn.Parameter(torch.zeros(tuple(shapes[n]))) for n in self.names])
        self.history = History()

    def _buffers_of(self, kind: str) -> list[Tensor]:
        return [getattr(self, f"{kind}_{i}") for i in range(len(self.names))]

    def terms(self) -> dict[str, Tensor]:
        """The loss terms at the current delta (in float32 even under mixed precision: the Gram algebra cancels)."""
        with torch.autocast(self.device.type, enabled=False):
            return objective_terms(self.objective, self._buffers_of("tau"), self._buffers_of("gram"), list(self.delta))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        out = self.terms()
        self.history.L_O.append(float(out["L_O"].detach()))
        self.history.L_R.append(float(out["L_R"].detach()))
        self.history.grams.append(out["gram"].cpu())
        if self.log_prefix is not None:
            p = self.log_prefix
            self.log(f"{p}L_O", out["L_O"], prog_bar=True)
            self.log(f"{p}L_R", out["L_R"], prog_bar=True)
            self.log(f"{p}mean_abs_cos", mean_abs_cos(out["gram"]))
        return out["loss"]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Steps(self.optim.steps), batch_size=None)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optim.build(list(self.delta))

    def deltas(self) -> dict[str, Tensor]:
        """The learned delta per parameter name (detached, on CPU)."""
        return {n: d.detach().cpu() for n, d in zip(self.names, self.delta, strict=True)}

    def model_grams(self) -> tuple[Tensor, Tensor]:
        """The model-level Gram matrix of the task vectors and of the disentangled vectors."""
        with torch.no_grad():
            after = self.terms()["gram"].cpu()
        rowwise = self.objective.granularity == "row"
        before = torch.stack([g.sum(0) if rowwise else g for g in self._buffers_of("gram")]).sum(0).cpu()
        return before, after


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


def fit_delta(
    names: Sequence[str],
    shapes: Mapping[str, tuple[int, ...]],
    load: Callable[[str], Tensor],
    objective: Objective,
    optim: OptimizerConfig,
    trainer_kwargs: Mapping[str, Any],
    per_tensor: bool = False,
    loggers: Sequence[Any] = (),
    log_prefix: str = "awd/",
    sink: Callable[[str, Tensor], None] | None = None,
) -> FitResult:
    """Learn delta with ``trainer.fit``.

    Args:
        names, shapes: the disentangled parameters and their shapes.
        load: name -> that parameter's task vectors stacked ([T, *shape], float32), called once per name.
        per_tensor: optimise one tensor at a time, loading only its task vectors (``tensor``/``row`` granularity);
            the per-step logs of the whole objective are then sent to ``loggers`` after the last tensor.
        trainer_kwargs: Lightning Trainer arguments (accelerator, precision, progress bar, ...).
        sink: called with each tensor's delta as soon as it is fitted, in ``names`` order, instead of keeping it in
            the result (whose ``delta`` is then empty): a model too large for memory writes delta to disk.
    """
    if per_tensor and objective.granularity == "model":
        raise ValueError("AWD option 'mode=per_tensor' needs granularity 'tensor' or 'row': 'model' couples tensors")
    objective = Objective(objective.granularity, objective.norm, objective.alpha, num_tensors=len(names))
    groups = [[n] for n in names] if per_tensor else [list(names)]
    delta: dict[str, Tensor] = {}
    sq_norms: dict[str, float] = {}
    history = History()
    gram_before: Tensor | None = None
    gram_after: Tensor | None = None
    for group in tqdm(groups, desc="AWD, tensor by tensor", disable=not per_tensor):
        module = AWDModule(group, shapes, load, objective, optim, None if per_tensor else log_prefix)
        kwargs = {
            "max_steps": optim.steps,
            "max_epochs": 1,
            "logger": False if per_tensor else (list(loggers) or False),
            "enable_checkpointing": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
            **trainer_arguments(trainer_kwargs),
            # The 'data' is a step counter: every rank runs every step on the same full loss (no sharding), and
            # DDP averages identical gradients, so delta is the one-process delta.
            "use_distributed_sampler": False,
        }
        if per_tensor:
            kwargs["enable_progress_bar"] = False
        L.Trainer(**kwargs).fit(module)
        for name, d in module.deltas().items():
            sq_norms[name] = float(d.double().pow(2).sum())
            if sink is None:
                delta[name] = d
            else:
                sink(name, d)
        history.add(module.history)
        before, after = module.model_grams()
        gram_before = before if gram_before is None else gram_before + before
        gram_after = after if gram_after is None else gram_after + after
        del module
    if per_tensor and loggers:
        for step, rec in enumerate(history.rows(objective.alpha)):
            for lg in loggers:
                lg.log_metrics({f"{log_prefix}{k}": v for k, v in rec.items() if k != "loss"}, step=step)
    assert gram_before is not None and gram_after is not None
    return FitResult(delta, history, gram_before, gram_after, sq_norms)
