"""Scoring a (merged) backbone with each task's head, under Lightning, with torchmetrics."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from mergelab.pools.base import Scores
from mergelab.suites.scoring import run_test
from mergelab.text.suite import TextClassificationSuite
from mergelab.training.distributed import is_filler


def split_backbone(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Split a sequence-classification model into its backbone and a head shell (the model, backbone slot empty)."""
    backbone = getattr(model, model.base_model_prefix)
    setattr(model, model.base_model_prefix, None)
    return backbone, model


def attach_backbone(head_shell: nn.Module, backbone: nn.Module) -> nn.Module:
    """A copy of a task model whose backbone slot (emptied by the model pool) points at ``backbone``."""
    model = copy.deepcopy(head_shell)
    setattr(model, model.base_model_prefix, backbone)
    return model


def task_metrics(num_labels: int) -> dict[str, nn.Module]:
    """The metrics every task is scored with: accuracy and macro-F1 (their names are :data:`METRICS`)."""
    return {
        "acc": MulticlassAccuracy(num_labels, average="micro"),
        "f1": MulticlassF1Score(num_labels, average="macro"),
    }


#: The scores of each task (part of every cached score's key: a metric added here misses the old entries).
METRICS = tuple(task_metrics(2))


class MultiTaskClassifier(L.LightningModule):
    """One shared backbone, one classification model per task built around it.

    ``heads`` are sequence-classification models whose backbone attribute is ``None`` (see
    :meth:`mergelab.text.pool.ClassifierPool.head_shell`); each gets ``backbone`` attached, so any
    ``AutoModelForSequenceClassification`` architecture works unchanged.
    """

    def __init__(self, backbone: nn.Module, heads: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.backbone = backbone
        self.task_models = nn.ModuleDict({t: attach_backbone(h, backbone) for t, h in heads.items()})
        self.eval_tasks: list[str] = list(heads)
        self.metrics = nn.ModuleDict()
        self.scores: Scores = {}

    def forward(self, task: str, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return self.task_models[task](**inputs).logits

    def on_test_epoch_start(self) -> None:
        self.metrics = nn.ModuleDict({t: nn.ModuleDict(task_metrics(self.num_labels(t))) for t in self.eval_tasks}).to(
            self.device
        )

    def num_labels(self, task: str) -> int:
        return int(self.task_models[task].config.num_labels)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        if is_filler(batch):
            return
        task = self.eval_tasks[dataloader_idx]
        preds = self(task, batch).argmax(-1)
        for m in self.metrics[task].values():
            m.update(preds, batch["labels"])

    def on_test_epoch_end(self) -> None:
        self.scores = {t: {k: float(m.compute()) for k, m in ms.items()} for t, ms in self.metrics.items()}


def evaluate(
    model: MultiTaskClassifier,
    suite: TextClassificationSuite,
    split: str,
    tokenizer: Any,
    trainer_kwargs: Mapping[str, Any],
    tasks: Sequence[str] | None = None,
    callbacks: Sequence[L.Callback] = (),
) -> Scores:
    """Accuracy and macro-F1 of ``model`` on ``split`` of each task (default: every task it has a head for).

    ``callbacks`` run in the evaluation trainer (e.g. a :class:`mergelab.callbacks.MergeCallback` that
    merges into the backbone when testing starts).
    """
    model.eval_tasks = list(tasks or model.task_models.keys())
    loaders = [suite.eval_loader(t, split, tokenizer) for t in model.eval_tasks]
    return run_test(model, loaders, trainer_kwargs, callbacks)
