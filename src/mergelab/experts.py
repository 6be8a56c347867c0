"""Building experts: full fine-tuning of the pretrained encoder plus a task head, cached as HF model dirs."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from mergelab.evaluation import MultiTaskClassifier, evaluate, split_backbone
from mergelab.outputs import atomic_write_text
from mergelab.suite import TextClassificationSuite, file_digest

log = logging.getLogger(__name__)

# Bump when the way experts are trained changes, so stale cache entries are not reused.
EXPERT_FORMAT = 1
RECORD = "mergelab_expert.json"


class ExpertFinetuner(L.LightningModule):
    """Full fine-tuning of a sequence-classification model with AdamW and linear warm-up/decay."""

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float, warmup_ratio: float) -> None:
        super().__init__()
        self.model = model
        self.lr, self.weight_decay, self.warmup_ratio = lr, weight_decay, warmup_ratio

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> Any:
        no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
        groups = [
            {"params": [p for n, p in self.model.named_parameters() if not n.endswith(no_decay)]},
            {"params": [p for n, p in self.model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0},
        ]
        opt = torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.warmup_ratio * total)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (total - step) / max(1, total - warmup))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def model_fingerprint(path: str) -> str:
    """Identity of a checkpoint: the hub id as given, or a local dir's config and weight-file sizes/mtimes."""
    p = Path(path)
    if not p.is_dir():
        return path
    h = hashlib.sha256()
    cfg = p / "config.json"
    if cfg.is_file():
        h.update(cfg.read_bytes())
    for f in sorted(p.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".gguf"):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def expert_key(pretrained: str, suite: TextClassificationSuite, task: str, finetune: Mapping[str, Any]) -> str:
    """Everything that determines an expert, hashed: base weights, training data, labels and recipe."""
    spec = {
        "format": EXPERT_FORMAT,
        "pretrained": model_fingerprint(pretrained),
        "task": task,
        "labels": suite.tasks[task].labels,
        "train_data": file_digest(suite.tasks[task].files["train"]),
        "max_length": suite.max_length,
        "finetune": dict(sorted(finetune.items())),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def build_expert(
    pretrained: str,
    suite: TextClassificationSuite,
    task: str,
    finetune: Mapping[str, Any],
    cache_dir: str | Path,
    trainer_kwargs: Mapping[str, Any],
) -> Path:
    """Return the cached expert dir for ``task``, fine-tuning it first if it is not cached yet.

    The dir is written under a temporary name and renamed into place once complete, so an interrupted build
    never leaves a half-written expert that a later run would trust.
    """
    key = expert_key(pretrained, suite, task, finetune)
    final = Path(cache_dir) / "experts" / f"{task}-{key}"
    if (final / RECORD).is_file():
        return final
    info = suite.tasks[task]
    ft = dict(finetune)
    log.info("building expert '%s' (%s) from %s", task, key, pretrained)
    L.seed_everything(int(ft["seed"]), workers=True, verbose=False)
    model = AutoModelForSequenceClassification.from_pretrained(
        pretrained,
        num_labels=info.num_labels,
        id2label=dict(enumerate(info.labels)),
        label2id={n: i for i, n in enumerate(info.labels)},
    )
    model.train()  # transformers 5 returns models in eval mode
    tokenizer = AutoTokenizer.from_pretrained(pretrained)
    train = suite.dataset(task, "train", ft.get("max_train_examples"))
    loader = suite.dataloader(train, tokenizer, shuffle=True, batch_size=int(ft["batch_size"]), seed=int(ft["seed"]))
    module = ExpertFinetuner(model, float(ft["lr"]), float(ft["weight_decay"]), float(ft["warmup_ratio"]))
    trainer = L.Trainer(
        max_epochs=int(ft["epochs"]),
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    seconds = time.perf_counter() - start

    # The expert's own scores on the full test and validation splits.
    full = copy.copy(suite)
    full.max_eval_examples = None
    backbone, shell = split_backbone(copy.deepcopy(model).eval())
    clf = MultiTaskClassifier(backbone, {task: shell})
    scores = {s: evaluate(clf, full, s, tokenizer, trainer_kwargs)[task] for s in ("validation", "test")}

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    record = {
        "task": task,
        "labels": info.labels,
        "pretrained": pretrained,
        "finetune": ft,
        "max_length": suite.max_length,
        "train_examples": len(train),
        "train_seconds": round(seconds, 1),
        "scores": scores,
    }
    atomic_write_text(tmp / RECORD, json.dumps(record, indent=2))
    if final.exists():  # a leftover without a record is not a finished expert
        shutil.rmtree(final)
    try:
        tmp.rename(final)
    except OSError:  # another process finished the same expert first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("expert '%s': test acc %.4f (%.0f s of training)", task, scores["test"]["acc"], seconds)
    return final
