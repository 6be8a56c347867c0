"""AdaMerging's optimisation as a Lightning module: merging coefficients fitted under ``trainer.fit``.

Kept apart from :mod:`mergelab.methods.adamerging` so that Lightning is imported only when a fit runs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader

from mergelab.methods.awd_module import StepCounter
from mergelab.training.distributed import run_trainer, trainer_arguments


class _TaskLogits(nn.Module):
    """``pool.task_logits(model, task, batch)`` as a module, so that ``functional_call`` can swap in the merged
    backbone weights (the backbone is one module object shared by every task's head)."""

    def __init__(self, pool: Any, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._pool = pool  # not a module: only its task_logits is used

    def forward(self, task: str, batch: Mapping[str, Tensor]) -> Tensor:
        return self._pool.task_logits(self.model, task, batch)


def prediction_entropy(logits: Tensor) -> Tensor:
    """Mean over examples of the Shannon entropy of softmax(logits) (nats)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


class AdaMergingModule(L.LightningModule):
    """Merging coefficients lambda[t, l] (the only trainable parameter) over frozen task vectors.

    theta^l = theta_0^l + sum_t clamp(lambda[t, l]) tau_t^l, with one column l per merged tensor (layer-wise) or a
    single column (task-wise). Step k takes batch k (cycled) of every task and minimises the sum over tasks of the
    mean prediction entropy of the merged model, with Adam.

    Args:
        pool: the pool (its ``task_logits`` runs the model on a batch).
        model: a module of the pool scoring every task (``pool.model(None, tasks)``); its weights are frozen.
        names: the merged tensors, in column order.
        base: name -> pretrained tensor (float32); vectors: name -> [T, *shape] task vectors (float32).
        tasks: the task names, in the order of ``vectors``' first dimension.
        batches: per task, its unlabeled batches.
        layer_wise: one coefficient per task and tensor (else per task).
        init, clamp: initial value; the interval coefficients are clamped to in the forward pass (None: none).
        lr, betas, steps: Adam's settings and the number of steps.
    """

    def __init__(
        self,
        pool: Any,
        model: nn.Module,
        names: Sequence[str],
        base: Mapping[str, Tensor],
        vectors: Mapping[str, Tensor],
        tasks: Sequence[str],
        batches: Sequence[Sequence[Mapping[str, Tensor]]],
        layer_wise: bool,
        init: float,
        clamp: tuple[float, float] | None,
        lr: float,
        betas: tuple[float, float],
        steps: int,
    ) -> None:
        super().__init__()
        self.net = _TaskLogits(pool, model)
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.names, self.tasks, self.batches = list(names), list(tasks), batches
        self.base, self.vectors = base, vectors
        self.lambdas = nn.Parameter(torch.full((len(tasks), len(names) if layer_wise else 1), float(init)))
        self.clamp, self.lr, self.betas, self.steps = clamp, lr, betas, steps
        self.entropy: list[float] = []

    def coefficients(self) -> Tensor:
        """lambda as the merge uses it (clamped)."""
        return self.lambdas if self.clamp is None else self.lambdas.clamp(*self.clamp)

    def merged(self) -> dict[str, Tensor]:
        """The merged backbone weights as functions of lambda, named as ``functional_call`` on ``net`` wants.

        sum_t c_t tau_t as one [1, T] x [T, n] product: one pass over the task vectors forward and one backward (the
        gradient of c), where broadcasting c over [T, *shape] first would write and read a T-times larger
        temporary each way (on MiniLM's shapes, 0.36 -> 0.10 s a step for the merge and its gradient)."""
        lam = self.coefficients()
        out = {}
        for col, name in enumerate(self.names):
            c = lam[:, col if lam.shape[1] > 1 else 0]
            base, v = self.base[name], self.vectors[name]
            out[f"model.backbone.{name}"] = base + (c @ v.reshape(len(c), -1)).view(base.shape)
        return out

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.net.eval()  # the model as it is scored (dropout off): the entropy of the predictions the merge makes

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        step = int(batch)
        params = self.merged()
        loss = torch.zeros((), dtype=torch.float32)
        for t, task in enumerate(self.tasks):
            data = self.batches[t][step % len(self.batches[t])]
            loss = loss + prediction_entropy(functional_call(self.net, params, (task, data)))
        self.entropy.append(float(loss.detach()))
        self.log("adamerging/entropy", loss.detach(), on_step=True, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([self.lambdas], lr=self.lr, betas=self.betas)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(StepCounter(self.steps), batch_size=None)


def fit_coefficients(
    module: AdaMergingModule, trainer_kwargs: Mapping[str, Any], loggers: Sequence[Any] = ()
) -> Tensor:
    """Run ``trainer.fit`` on ``module``; returns the clamped coefficients, detached."""
    kwargs = {
        "max_steps": -1,
        "max_epochs": 1,
        "logger": list(loggers) or False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
        **trainer_arguments(trainer_kwargs),
        "use_distributed_sampler": False,  # every rank runs every step on the same batches
    }
    run_trainer(kwargs, "fit", module)
    return module.coefficients().detach().clone()
