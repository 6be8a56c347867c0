"""Scoring a causal LM on a :class:`~mergelab.causal_lm.suite.GenerativeSuite` under Lightning: the
:class:`GenerativeEvaluator` module greedily generates and exact-matches answers, or picks the most likely of a task's
choices, one test dataloader per task, with torchmetrics states that add up across ranks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics.aggregation import MeanMetric
from torchmetrics.classification import MulticlassAccuracy
from transformers import GenerationConfig

from mergelab.causal_lm.suite import GenerativeTask, cut_at_stop, normalize_answer, pad_id
from mergelab.pools.base import Scores
from mergelab.training.distributed import is_filler


class GenerativeEvaluator(L.LightningModule):
    """Scores one causal LM (``backbone``) on generative tasks, one test dataloader per task.

    ``exact_match`` tasks: greedy generation, cut at the task's stop strings, compared after
    :func:`mergelab.causal_lm.suite.normalize_answer` (mean of hits, torchmetrics ``MeanMetric``). ``choice`` tasks:
    the choice with the highest summed log-probability (``MulticlassAccuracy``). Both are reported as ``acc``.
    """

    def __init__(self, backbone: nn.Module, tasks: Mapping[str, GenerativeTask], tokenizer: Any) -> None:
        super().__init__()
        self.backbone = backbone
        self.task_specs = dict(tasks)
        self.tokenizer = tokenizer
        self.eval_tasks: list[str] = list(tasks)
        self.metrics = nn.ModuleDict()
        self.scores: Scores = {}

    def on_test_epoch_start(self) -> None:
        self.metrics = nn.ModuleDict({t: self.new_metric(t) for t in self.eval_tasks}).to(self.device)

    def new_metric(self, task: str) -> nn.Module:
        """Mean of exact-match hits, or accuracy of the most likely choice."""
        choices = self.task_specs[task].choices
        return MeanMetric() if choices is None else MulticlassAccuracy(len(choices), average="micro")

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        if is_filler(batch):
            return
        name = self.eval_tasks[dataloader_idx]
        task = self.task_specs[name]
        if task.choices is None:
            hits = [
                normalize_answer(cut_at_stop(text, task.stop)) == normalize_answer(answer)
                for text, answer in zip(self.generate(batch, task.max_new_tokens), batch["answers"], strict=True)
            ]
            self.metrics[name].update(torch.tensor(hits, dtype=torch.float32, device=self.device))
        else:
            logp = self.target_logprobs(batch).view(-1, len(task.choices))
            self.metrics[name].update(logp.argmax(-1), batch["labels"])

    def generate(self, batch: Mapping[str, torch.Tensor], max_new_tokens: int) -> list[str]:
        """Greedy continuations of the left-padded prompts, decoded up to the end-of-sequence token."""
        eos = self.tokenizer.eos_token_id
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad_id(self.tokenizer)
        )
        out = self.backbone.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], generation_config=config
        )
        texts = []
        for row in out[:, batch["input_ids"].shape[1] :].tolist():
            if eos in row:
                row = row[: row.index(eos)]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True))
        return texts

    def target_logprobs(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Summed log-probability of each sequence's last ``target_len`` tokens given what precedes them.

        Sequences are left-padded, so every target ends at the last position and only the last few positions'
        logits are computed (``logits_to_keep``), not a vocabulary-sized row per prompt token.
        """
        k = int(batch["target_len"].max())
        logits = self.backbone(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            logits_to_keep=k + 1,
        ).logits
        logp = logits[:, :-1].float().log_softmax(-1)  # position p predicts token p + 1
        token_logp = logp.gather(-1, batch["input_ids"][:, -k:].unsqueeze(-1)).squeeze(-1)
        in_target = torch.arange(k, device=token_logp.device) >= (k - batch["target_len"])[:, None]
        # where, not a product: logits at padded positions may be NaN (their attention is fully masked).
        return torch.where(in_target, token_logp, torch.zeros_like(token_logp)).sum(-1)

    def on_test_epoch_end(self) -> None:
        self.scores = {t: {"acc": float(m.compute())} for t, m in self.metrics.items()}
