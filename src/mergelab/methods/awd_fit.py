"""How AWD's delta is optimised and what the fit records: the optimiser settings, the guard, the history and
the result. The objective is :mod:`mergelab.methods.awd_objective`; the fit loop, under Lightning, is
:mod:`mergelab.methods.awd_module` (kept apart so that checking AWD's options imports no Lightning).

With ``tensor`` and ``row`` granularity each tensor is its own *group* (own step size, own guard); ``model`` has
one group. The fit is guarded (:class:`Guard`): the objective of every iterate is evaluated; an iterate whose group
loss is not finite or rises above the group's best by more than ``rise_tol`` relative is rejected (delta restored
to the best, the step size halved, the optimiser state reset); after ``max_backoffs`` rejections a group stops.
The returned delta is always each group's best iterate.

The optimisers are separate elementwise ops (:class:`mergelab.methods.awd_arithmetic.ElementwiseAdam`), so the
iterates have the same bytes on any CPU."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import torch
from torch import Tensor, nn

from mergelab.config_types import Doc, Range, check_fields
from mergelab.methods.awd_arithmetic import ElementwiseAdam, ElementwiseSGD
from mergelab.methods.awd_objective import mean_abs_cos

OPTIMIZERS = ("sgd", "adam")

# AWD's optimiser options, declared once: the method's constructor and :class:`OptimizerConfig` both read them.
Optimizer = Annotated[Literal[OPTIMIZERS], Doc("full-batch optimiser of delta")]
LearningRate = Annotated[
    float,
    Range(0.0, float("inf"), low_open=True, high_open=True),
    Doc("relative (lr_relative): a step moves delta by about lr x rms(tau) per entry"),
]
Momentum = Annotated[float, Range(0.0, 1.0, high_open=True), Doc("sgd only")]
Steps = Annotated[int, Range(low=1), Doc("optimiser steps")]
LrRelative = Annotated[bool, Doc("lr x rms(tau) per tensor (adam; sgd: x rms(tau)^2): one lr fits pools of any scale")]
RiseTol = Annotated[float, Range(0.0, float("inf"), high_open=True), Doc("relative loss rise that undoes an iterate")]
MaxBackoffs = Annotated[int, Range(low=0), Doc("back-offs before a tensor stops")]


@dataclass
class OptimizerConfig:
    """How delta is optimised.

    ``optimizer``: ``adam`` or ``sgd`` (with ``momentum``), ``steps`` full-batch steps. With ``lr_relative`` the step
    size of each group is ``lr`` times its task vectors' scale, so that a pool whose task vectors are s times smaller
    takes s times smaller steps (the cosines are scale-free, so the iterates of L_O scale with tau): Adam's step is
    about ``lr`` per coordinate whatever the gradient's size, so its lr is multiplied by the rms of tau; the
    gradient of a cosine grows as 1 / |tau|, so SGD's lr is multiplied by rms(tau)^2.
    ``rise_tol`` and ``max_backoffs`` configure the :class:`Guard`.
    """

    optimizer: Optimizer = "adam"
    lr: LearningRate = 0.01
    momentum: Momentum = 0.0
    steps: Steps = 300
    lr_relative: LrRelative = True
    rise_tol: RiseTol = 1e-3
    max_backoffs: MaxBackoffs = 10

    def __post_init__(self) -> None:
        check_fields(self, "AWD option '{}'".format)

    def group_lr(self, tau_rms: float) -> float:
        """The step size of a group whose task vectors have root-mean-square ``tau_rms``."""
        if not self.lr_relative:
            return self.lr
        return self.lr * (tau_rms if self.optimizer == "adam" else tau_rms**2)

    def build(self, params: Sequence[nn.Parameter], lrs: Sequence[float]) -> torch.optim.Optimizer:
        """One parameter group per tensor, each with its own step size (halved on its own back-offs)."""
        groups = [{"params": [p], "lr": lr} for p, lr in zip(params, lrs, strict=True)]
        if self.optimizer == "sgd":
            return ElementwiseSGD(groups, lr=self.lr, momentum=self.momentum)
        return ElementwiseAdam(groups, lr=self.lr)


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
