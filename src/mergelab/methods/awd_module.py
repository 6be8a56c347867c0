"""AWD's optimisation as a Lightning module: delta fitted under ``trainer.fit`` (:func:`fit_delta`).

Kept apart from :mod:`mergelab.methods.awd_objective` (the objective) and :mod:`mergelab.methods.awd_fit` (the
optimiser settings, the guard and the results), which every run imports to check AWD's options: Lightning is
imported only when a fit runs."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mergelab.methods.awd_arithmetic import fixed_sum
from mergelab.methods.awd_fit import FitResult, GroupGuard, Guard, History, OptimizerConfig
from mergelab.methods.awd_objective import (
    PER_TENSOR_MODE,
    Objective,
    mean_abs_cos,
    objective_terms,
    row_gram,
    row_view,
    stack_rows,
)
from mergelab.training.distributed import run_trainer, trainer_arguments


class StepCounter(torch.utils.data.Dataset):
    """The 'data' of a fit that draws its own batches: item k is step k (AWD: one evaluation of the full-batch
    objective and a step; AdaMerging: one batch of every task)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class AWDModule(L.LightningModule):
    """The redundant vector delta (the only trainable parameter, initialised at zero) over frozen task vectors.

    Optimised manually (``automatic_optimization = False``) under ``trainer.fit``, so that every iterate passes
    the :class:`Guard`: ``steps + 1`` batches, batch k evaluating the iterate after k steps and, unless it is the
    last, taking the next step. :meth:`finish` then restores each group's best delta and evaluates it.

    Args:
        names, shapes: the disentangled parameters.
        load: name -> its task vectors stacked, [T, *shape]; kept as non-persistent buffers (not copied).
        objective: the loss (granularity, norm, alpha).
        optim: optimiser, learning rate, number of steps and the guard's settings.
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
        self.automatic_optimization = False
        self.names = list(names)
        self.objective, self.optim, self.log_prefix = objective, optim, log_prefix
        rowwise = objective.granularity == "row"
        self.tau_rms: list[float] = []
        for i, n in enumerate(self.names):
            v = load(n)
            if tuple(v.shape[1:]) != tuple(shapes[n]):
                raise ValueError(f"AWD: task vectors of {n} have shape {tuple(v.shape[1:])}, expected {shapes[n]}")
            if v.shape[0] < 2:
                raise ValueError(f"AWD needs at least two task vectors, got {v.shape[0]}")
            # Row granularity reads each row's T task-vector rows together (awd_objective.RowProducts): laid out
            # so once.
            rows = stack_rows(v) if rowwise else row_view(v)
            # The Gram matrices in a fixed order (per row; summed over rows for tensor/model), like every product.
            gram = row_gram(rows) if rowwise else fixed_sum(row_gram(rows), dim=0)
            self.register_buffer(f"gram_{i}", gram, persistent=False)
            self.register_buffer(f"tau_{i}", rows if rowwise else v, persistent=False)
            # float64 and a fixed order: the step size must not depend on the thread count either.
            self.tau_rms.append(math.sqrt(float(fixed_sum(v.double().pow(2))) / max(v.numel(), 1)))
            self.register_buffer(f"best_{i}", torch.zeros(tuple(shapes[n])), persistent=False)
        self.delta = nn.ParameterList([nn.Parameter(torch.zeros(tuple(shapes[n]))) for n in self.names])
        # The loss is a sum of per-tensor terms except at model granularity: each tensor is then its own group.
        self.group_members = (
            [list(range(len(self.names)))]
            if objective.granularity == "model"
            else [[i] for i in range(len(self.names))]
        )
        self.guard = Guard(
            [[self.names[i] for i in m] for m in self.group_members], optim.rise_tol, int(optim.max_backoffs)
        )
        self.history = History()
        self.final: dict[str, Any] = {}

    def _buffers_of(self, kind: str) -> list[Tensor]:
        return [getattr(self, f"{kind}_{i}") for i in range(len(self.names))]

    def terms(self) -> dict[str, Tensor]:
        """The loss terms at the current delta (in float32 even under mixed precision: the Gram algebra cancels)."""
        with torch.autocast(self.device.type, enabled=False):
            return objective_terms(
                self.objective, self._buffers_of("tau"), self._buffers_of("gram"), list(self.delta), rows_stacked=True
            )

    def training_step(self, batch: Any, batch_idx: int) -> None:
        step = int(batch_idx)
        out = self.terms()
        losses = [float(v) for v in out["group_loss"].detach().cpu()]
        improved, rejected = self.guard.check(step, losses)
        self.history.append(float(out["L_O"].detach()), float(out["L_R"].detach()), out["gram"].cpu(), len(rejected))
        if self.log_prefix is not None:
            p = self.log_prefix
            self.log(f"{p}L_O", out["L_O"].detach(), prog_bar=True)
            self.log(f"{p}L_R", out["L_R"].detach(), prog_bar=True)
            self.log(f"{p}mean_abs_cos", mean_abs_cos(out["gram"]))
            self.log(f"{p}backoffs", float(len(rejected)))
        opt = self.optimizers()
        stepping = step < self.optim.steps and not self.guard.all_stopped  # the last evaluation takes no step
        if stepping:
            opt.zero_grad(set_to_none=True)
            # Every group's loss is differentiated (DDP expects a gradient for every parameter), before any
            # back-off rewrites delta; the groups that do not step drop theirs below.
            self.manual_backward(out["loss"])
        best = self._buffers_of("best")
        with torch.no_grad():
            for g in improved:
                for i in self.group_members[g]:
                    best[i].copy_(self.delta[i])
            for g in rejected:  # back off: the best delta, half the step, a fresh optimiser state
                for i in self.group_members[g]:
                    self.delta[i].copy_(best[i])
                    opt.optimizer.state.pop(self.delta[i], None)
                    opt.optimizer.param_groups[i]["lr"] *= 0.5
        if not stepping:
            if self.guard.all_stopped:
                self.trainer.should_stop = True
            return
        active = self.guard.active(rejected)
        for g, members in enumerate(self.group_members):
            if g not in active:  # the optimisers skip parameters without a gradient
                for i in members:
                    self.delta[i].grad = None
        opt.step()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(StepCounter(self.optim.steps + 1), batch_size=None)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optim.build(list(self.delta), [self.optim.group_lr(r) for r in self.tau_rms])

    def finish(self) -> None:
        """After the fit: set delta to each group's best iterate, evaluate it (:attr:`final`), and complete the
        history of a fit that stopped early (every group stopped: the rows left are the best iterate's)."""
        with torch.no_grad():
            for d, b in zip(self.delta, self._buffers_of("best"), strict=True):
                d.copy_(b)
            out = self.terms()
        self.final = {"L_O": float(out["L_O"]), "L_R": float(out["L_R"]), "gram": out["gram"].cpu()}
        while len(self.history.L_O) < self.optim.steps + 1:
            self.history.append(self.final["L_O"], self.final["L_R"], self.final["gram"], 0)

    def deltas(self) -> dict[str, Tensor]:
        """The learned delta per parameter name (detached, on CPU)."""
        return {n: d.detach().cpu() for n, d in zip(self.names, self.delta, strict=True)}

    def gram_before(self) -> Tensor:
        """The model-level Gram matrix of the task vectors."""
        rowwise = self.objective.granularity == "row"
        grams = [fixed_sum(g, dim=0) if rowwise else g for g in self._buffers_of("gram")]
        return fixed_sum(torch.stack(grams), dim=0).cpu()


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

    Returns:
        each group's best delta, the history of the ``steps + 1`` evaluated iterates, the terms of the returned
        delta (``final``) and what the guard did.
    """
    mode = "per_tensor" if per_tensor else "whole"
    PER_TENSOR_MODE.check({"mode": mode, "granularity": objective.granularity}, "AWD option '{}'".format)
    objective = Objective(objective.granularity, objective.norm, objective.alpha, num_tensors=len(names))
    groups = [[n] for n in names] if per_tensor else [list(names)]
    delta: dict[str, Tensor] = {}
    sq_norms: dict[str, float] = {}
    history = History()
    guard: list[GroupGuard] = []
    final = {"L_O": 0.0, "L_R": 0.0}
    gram_before: Tensor | None = None
    gram_after: Tensor | None = None
    for group in tqdm(groups, desc="AWD, tensor by tensor", disable=not per_tensor):
        module = AWDModule(group, shapes, load, objective, optim, None if per_tensor else log_prefix)
        kwargs = {
            "max_steps": -1,  # the data is steps + 1 evaluations (the last one takes no step)
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
        run_trainer(kwargs, "fit", module)
        module.finish()
        for name, d in module.deltas().items():
            sq_norms[name] = float(fixed_sum(d.double().pow(2)))
            if sink is None:
                delta[name] = d
            else:
                sink(name, d)
        history.add(module.history)
        guard.extend(module.guard.groups)
        final["L_O"] += module.final["L_O"]
        final["L_R"] += module.final["L_R"]
        before, after = module.gram_before(), module.final["gram"]
        gram_before = before if gram_before is None else gram_before + before
        gram_after = after if gram_after is None else gram_after + after
        del module
    if per_tensor and loggers:
        for step, rec in enumerate(history.rows(objective.alpha)):
            for lg in loggers:
                lg.log_metrics({f"{log_prefix}{k}": v for k, v in rec.items() if k != "loss"}, step=step)
    assert gram_before is not None and gram_after is not None
    return FitResult(delta, history, gram_before, gram_after, sq_norms, final, guard)
