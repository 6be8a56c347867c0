"""Zero-shot CLIP heads and scoring: :func:`zero_shot_head` builds a task's frozen head from the pretrained text
encoder (each class's prompt templates embedded, L2-normalised, averaged and normalised again, times
``exp(logit_scale)``, so logits are CLIP's own), :func:`tensors_digest` keys the head cache, and
:class:`ZeroShotClassifier` scores a (merged) vision tower with those heads under Lightning."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy
from transformers import CLIPModel

from mergelab.pools.base import Scores


def fill_templates(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every prompt, class-major: ``template.format(classname=c)`` for each class, then each template."""
    return [t.format(classname=c) for c in classnames for t in templates]


@torch.inference_mode()
def text_features(clip: CLIPModel, encoded: Mapping[str, torch.Tensor], batch_size: int = 256) -> torch.Tensor:
    """Projected text embeddings (not normalised) of already tokenised prompts, in batches."""
    out = []
    n = encoded["input_ids"].shape[0]
    for i in range(0, n, batch_size):
        batch = {k: v[i : i + batch_size] for k, v in encoded.items()}
        out.append(clip.get_text_features(**batch).pooler_output.float())
    return torch.cat(out)


def tokenize_prompts(tokenizer: Any, prompts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """Prompts padded to the longest, truncated to ``max_length`` tokens."""
    enc = tokenizer(list(prompts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def zero_shot_head(
    clip: CLIPModel, tokenizer: Any, classnames: Sequence[str], templates: Sequence[str], max_length: int = 77
) -> torch.Tensor:
    """The (classes x embedding) head: normalised mean over templates of normalised prompt embeddings, times scale.

    The scale is CLIP's learned temperature ``exp(logit_scale)``, so ``normalised image embedding @ head.T`` are
    CLIP's own logits.
    """
    encoded = tokenize_prompts(tokenizer, fill_templates(classnames, templates), max_length)
    emb = F.normalize(text_features(clip, encoded), dim=-1)
    emb = emb.view(len(classnames), len(templates), -1).mean(1)
    return F.normalize(emb, dim=-1) * clip.logit_scale.detach().float().exp()


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of named tensors' bytes (names, dtypes, shapes and values)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(tensors[name].shape)}".encode())
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")  # hashed in place, no copy
    return h.hexdigest()[:16]


class ZeroShotClassifier(L.LightningModule):
    """A CLIP vision tower (``backbone``, the merged part) with frozen zero-shot heads, one test loader per task.

    logits = normalise(visual_projection(backbone(pixels).pooler_output)) @ head.T; accuracy with torchmetrics.
    """

    def __init__(self, backbone: nn.Module, projection: nn.Module, heads: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection = projection
        self.head_names = list(heads)
        for i, h in enumerate(heads.values()):
            self.register_buffer(f"head_{i}", h.detach().clone(), persistent=False)
        self.eval_tasks: list[str] = list(heads)
        self.metrics = nn.ModuleDict()
        self.scores: Scores = {}

    def head(self, task: str) -> torch.Tensor:
        """The (classes x embedding) head of ``task``."""
        return getattr(self, f"head_{self.head_names.index(task)}")

    def forward(self, task: str, pixel_values: torch.Tensor) -> torch.Tensor:
        feats = self.projection(self.backbone(pixel_values=pixel_values).pooler_output)
        return F.normalize(feats.float(), dim=-1) @ self.head(task).T

    def on_test_epoch_start(self) -> None:
        self.metrics = nn.ModuleDict(
            {t: MulticlassAccuracy(self.head(t).shape[0], average="micro") for t in self.eval_tasks}
        ).to(self.device)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        task = self.eval_tasks[dataloader_idx]
        self.metrics[task].update(self(task, batch["pixel_values"]).argmax(-1), batch["labels"])

    def on_test_epoch_end(self) -> None:
        self.scores = {t: {"acc": float(m.compute())} for t, m in self.metrics.items()}
