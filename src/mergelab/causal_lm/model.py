"""Scoring a causal LM on a :class:`~mergelab.causal_lm.suite.GenerativeSuite` under Lightning: the
:class:`GenerativeEvaluator` module greedily generates and exact-matches answers, or picks the most likely of a task's
choices, one test dataloader per task, with torchmetrics states that add up across ranks."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics.aggregation import MeanMetric
from torchmetrics.classification import MulticlassAccuracy
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from mergelab.causal_lm.suite import GenerativeTask, cut_at_stop, normalize_answer, pad_id
from mergelab.pools.base import Scores
from mergelab.training.distributed import is_filler


def cache_kwarg(model: nn.Module, cache: Any) -> dict[str, Any]:
    """``cache`` under the keyword ``model.forward`` takes: ``cache`` (transformers 5.x), else ``past_key_values``."""
    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}


class StopStrings(StoppingCriteria):
    """Stops each row of a generation once its generated text (after leading whitespace, as
    :func:`~mergelab.causal_lm.suite.cut_at_stop` reads it) holds one of ``stop``; the prompt is not looked at, so
    a stop string that only spans the prompt's end does not stop a row."""

    def __init__(self, tokenizer: Any, stop: Sequence[str], prompt_len: int) -> None:
        self.tokenizer, self.stop, self.prompt_len = tokenizer, tuple(stop), prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len :], skip_special_tokens=True)
        return torch.tensor([any(s in t.lstrip() for s in self.stop) for t in texts], device=input_ids.device)


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
                for text, answer in zip(
                    self.generate(batch, task.max_new_tokens, task.stop), batch["answers"], strict=True
                )
            ]
            self.metrics[name].update(torch.tensor(hits, dtype=torch.float32, device=self.device))
        else:
            logp = self.target_logprobs(batch)
            self.metrics[name].update(logp.argmax(-1), batch["labels"])

    def generate(self, batch: Mapping[str, torch.Tensor], max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]:
        """Greedy continuations of the left-padded prompts (KV-cached, all rows at once), decoded up to the
        end-of-sequence token; a row stops early once its text holds one of ``stop``, which changes nothing after
        :func:`~mergelab.causal_lm.suite.cut_at_stop` (the text is cut at the first stop string anyway)."""
        eos = self.tokenizer.eos_token_id
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad_id(self.tokenizer)
        )
        prompt_len = batch["input_ids"].shape[1]
        criteria = StoppingCriteriaList([StopStrings(self.tokenizer, stop, prompt_len)] if stop else [])
        out = self.backbone.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            generation_config=config,
            stopping_criteria=criteria,
        )
        texts = []
        for row in out[:, prompt_len:].tolist():
            if eos in row:
                row = row[: row.index(eos)]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True))
        return texts

    def target_logprobs(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Summed log-probability of every choice target after every prompt, ``(examples, choices)``.

        Each prompt is run once; its key/value cache is repeated for the choices, which are then run together
        (one short pass), instead of the prompt once per choice. Only the prompt's last position's logits are
        computed there (``logits_to_keep``), not a vocabulary-sized row per prompt token.
        """
        targets, target_len = batch["targets"], batch["target_len"]
        n, c = batch["input_ids"].shape[0], targets.shape[0]
        out = self.backbone(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            use_cache=True,
            logits_to_keep=1,
        )
        # The prompt's last position predicts every target's first token.
        first = out.logits[:, -1].float().log_softmax(-1)[:, targets[:, 0]]  # (n, c)
        if targets.shape[1] == 1:
            return first
        cache = out.cache if "cache" in out else out.past_key_values
        cache.batch_repeat_interleave(c)
        rest_ids = targets[:, :-1].repeat(n, 1)  # row i * c + j: example i, choice j, as the repeated cache
        rest_mask = (torch.arange(targets.shape[1] - 1, device=targets.device) < (target_len - 1)[:, None]).long()
        mask = torch.cat([batch["attention_mask"].repeat_interleave(c, 0), rest_mask.repeat(n, 1)], dim=1)
        start = batch["attention_mask"].sum(-1, keepdim=True).repeat_interleave(c, 0)  # real prompt tokens
        positions = start + torch.arange(targets.shape[1] - 1, device=targets.device)
        logits = self.backbone(
            input_ids=rest_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **cache_kwarg(self.backbone, cache),
        ).logits
        logp = logits.float().log_softmax(-1).gather(-1, targets[:, 1:].repeat(n, 1).unsqueeze(-1)).squeeze(-1)
        # where, not a product: logits after a target's end (padding) are ignored whatever their value.
        rest = torch.where(rest_mask.repeat(n, 1).bool(), logp, torch.zeros_like(logp)).sum(-1).view(n, c)
        return first + rest

    def on_test_epoch_end(self) -> None:
        self.scores = {t: {"acc": float(m.compute())} for t, m in self.metrics.items()}
