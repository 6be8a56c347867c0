"""Building experts: full fine-tuning of the pretrained model (plus a task head for classifiers), cached as HF dirs.

:func:`cached_build` is the cache every built checkpoint goes through (classification and causal-LM experts, converted
GGUF checkpoints): keyed by a hash of what determines it, written atomically."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import lightning as L
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from mergelab.io.atomic import atomic_write_text, make_temp_dir, unmark_temp_dir
from mergelab.suites.base import file_digest
from mergelab.text.model import MultiTaskClassifier, evaluate, split_backbone
from mergelab.text.suite import TextClassificationSuite
from mergelab.training import distributed as distributed
from mergelab.training.distributed import trainer_arguments

log = logging.getLogger(__name__)

# Bump when the way experts are trained changes, so stale cache entries are not reused.
EXPERT_FORMAT = 1
#: The classification experts' own format: 2 since their batches are length-grouped and AdamW is fused (the
#: causal-LM experts, which kept their recipe, stay on EXPERT_FORMAT).
CLASSIFIER_EXPERT_FORMAT = 2


RECORD = "mergelab_expert.json"


class ExpertFinetuner(L.LightningModule):
    """Full fine-tuning with AdamW and linear warm-up/decay of a transformers model whose output has a ``loss``.

    Used for sequence classifiers (batches with ``labels``) and causal LMs (``labels`` = the tokens to predict,
    -100 elsewhere). ``name`` (the expert's task) names its loss curve in the run's loggers:
    ``experts/<name>/train_loss``. ``fused``: torch's fused AdamW kernel (the same update in one pass over the
    weights: a tenth of the for-each update's time on MiniLM; rounding may differ in the last bit).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        lr: float,
        weight_decay: float,
        warmup_ratio: float,
        name: str = "expert",
        fused: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.lr, self.weight_decay, self.warmup_ratio, self.name = lr, weight_decay, warmup_ratio, name
        self.fused = fused

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train/loss", loss, prog_bar=True, logger=False)
        if self.trainer.loggers:  # the run's (see logging_to); Lightning warns of a logged value with none
            self.log(f"experts/{self.name}/train_loss", loss, prog_bar=False, logger=True)
        return loss

    def configure_optimizers(self) -> Any:
        no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
        groups = [
            {"params": [p for n, p in self.model.named_parameters() if not n.endswith(no_decay)]},
            {"params": [p for n, p in self.model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0},
        ]
        opt = torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay, fused=self.fused or None)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.warmup_ratio * total)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (total - step) / max(1, total - warmup))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def model_fingerprint(path: str) -> str:
    """Identity of a checkpoint: the hub id as given, or a hash of a local dir's content (its config.json bytes and
    each weight file's header and sampled data, :func:`mergelab.provenance.identity.checkpoint_identity`), so the
    same bytes anywhere (another venv, a copied cache) have the same identity; computed once per file and process.
    """
    from mergelab.provenance.identity import checkpoint_identity

    p = Path(path)
    if not p.is_dir():
        return path
    fingerprint = str(checkpoint_identity(str(p))["sha256"])[:16]
    _LEGACY_FINGERPRINTS[fingerprint] = legacy_model_fingerprint(p)
    return fingerprint


def legacy_model_fingerprint(p: Path) -> str:
    """The identity cache keys used before they were content-based (config and weight-file sizes/mtimes): read
    only to adopt entries built under it (:func:`cached_build`)."""
    h = hashlib.sha256()
    cfg = p / "config.json"
    if cfg.is_file():
        h.update(cfg.read_bytes())
    for f in sorted(p.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".gguf"):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


# content fingerprint -> the mtime-based one of the same dir, for the fingerprints computed in this process
_LEGACY_FINGERPRINTS: dict[str, str] = {}


def legacy_spec(spec: Mapping[str, Any]) -> dict[str, Any] | None:
    """``spec`` with every content fingerprint computed in this process replaced by its legacy one (None: none)."""
    text = json.dumps(spec, sort_keys=True)
    old = text
    for new, legacy in _LEGACY_FINGERPRINTS.items():
        text = text.replace(new, legacy)
    return json.loads(text) if text != old else None


def training_precision(trainer_kwargs: Mapping[str, Any]) -> dict[str, str]:
    """The trainer's precision as part of a built expert's key: ``{}`` for full precision (the default, so entries
    built before it was part of the key keep their key), else ``{"precision": ...}``: a bf16-trained expert is
    another expert."""
    precision = str(trainer_kwargs.get("precision") or "32-true")
    return {} if precision in ("32-true", "32") else {"precision": precision}


def spec_key(spec: Mapping[str, Any]) -> str:
    """A short hash of a JSON-able spec (everything that determines a built artefact)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def expert_spec(
    pretrained: str,
    suite: TextClassificationSuite,
    task: str,
    finetune: Mapping[str, Any],
    trainer_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What determines a classification expert: base weights, training data, labels, recipe and precision."""
    return {
        **training_precision(trainer_kwargs or {}),
        "format": CLASSIFIER_EXPERT_FORMAT,
        "pretrained": model_fingerprint(pretrained),
        "task": task,
        "labels": suite.tasks[task].labels,
        "train_data": file_digest(suite.tasks[task].files["train"]),
        "max_length": suite.max_length,
        "finetune": dict(sorted(finetune.items())),
    }


def cached_build(root: Path, name: str, spec: Mapping[str, Any], build: Callable[[Path], dict[str, Any]]) -> Path:
    """The dir ``root/<name>-<hash of spec>``, made by ``build(tmp_dir) -> record`` first if it is not there yet.

    ``build`` writes the model files into ``tmp_dir`` and returns a JSON-able record, saved as ``RECORD``. The dir
    is written under a temporary name and renamed into place once complete, so an interrupted build never leaves
    a half-written dir that a later run would trust.
    """
    final = root / f"{name}-{spec_key(spec)}"
    if (final / RECORD).is_file():
        return final
    legacy = legacy_spec(spec)
    earlier = root / f"{name}-{spec_key(legacy)}" if legacy is not None else None
    if earlier is not None and (earlier / RECORD).is_file() and not final.exists():
        # Built before keys were content-based: the same inputs, so adopt it under the new key instead of rebuilding.
        try:
            earlier.rename(final)
            log.info("cache: %s adopted as %s (content-based key)", earlier.name, final.name)
            return final
        except OSError:
            pass  # another process adopted it first, or the cache is read-only: build (or find) below
        if (final / RECORD).is_file():
            return final
    final.parent.mkdir(parents=True, exist_ok=True)
    # .tmp-<name>-<pid> with a marker: a build killed earlier (kill -9) is cleaned up here once its process is gone.
    tmp = make_temp_dir(final)
    try:
        # Every rank builds (a build's Trainer needs all of them), but only rank 0 keeps what it wrote.
        record = build(tmp)
        atomic_write_text(tmp / RECORD, json.dumps(record, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if distributed.initialized() and not distributed.is_global_zero():
        shutil.rmtree(tmp, ignore_errors=True)
        distributed.barrier()  # rank 0 has renamed its build into place
        return final
    if final.exists():  # a leftover without a record is not a finished build
        shutil.rmtree(final)
    unmark_temp_dir(tmp)  # the marker is no part of the build
    try:
        tmp.rename(final)
    except OSError:  # another process finished the same build first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    if distributed.initialized():
        distributed.barrier()
    return final


#: The run's loggers, which expert fine-tuning logs its loss curves to as it trains (see :func:`logging_to`).
_LOGGERS: ContextVar[Sequence[Any]] = ContextVar("expert_loggers", default=())

#: How often (in optimizer steps) an expert's loss goes to the loggers: a curve of ~20 points for the embedded experts.
LOG_EVERY_N_STEPS = 5


@contextmanager
def logging_to(loggers: Sequence[Any]) -> Iterator[None]:
    """Inside the block, experts that are fine-tuned (:func:`fit`) log their loss curves to ``loggers`` as they
    train; the run sets it around building its pool, whichever pool builds the experts."""
    token = _LOGGERS.set(tuple(loggers))
    try:
        yield
    finally:
        _LOGGERS.reset(token)


def fit(module: L.LightningModule, loader: Any, epochs: int, trainer_kwargs: Mapping[str, Any]) -> tuple[float, float]:
    """``trainer.fit`` for ``epochs`` without checkpoints, logging to the run's loggers (:func:`logging_to`) when
    there are any; returns the seconds it took and the last loss."""
    arguments = {
        "logger": list(_LOGGERS.get()) or False,
        "log_every_n_steps": LOG_EVERY_N_STEPS,
        **trainer_arguments(trainer_kwargs),  # the run's trainer settings win
    }
    kwargs = {"max_epochs": epochs, "enable_checkpointing": False, "enable_model_summary": False, **arguments}
    start = time.perf_counter()
    metrics = distributed.run_trainer(kwargs, "fit", module, train_dataloaders=loader)
    return time.perf_counter() - start, metrics.get("train/loss", float("nan"))


def build_expert(
    pretrained: str,
    suite: TextClassificationSuite,
    task: str,
    finetune: Mapping[str, Any],
    cache_dir: str | Path,
    trainer_kwargs: Mapping[str, Any],
) -> Path:
    """Return the cached expert dir for ``task``, fine-tuning it first if it is not cached yet."""
    spec = expert_spec(pretrained, suite, task, finetune, trainer_kwargs)

    def build(tmp: Path) -> dict[str, Any]:
        info = suite.tasks[task]
        ft = dict(finetune)
        log.info("building expert '%s' (%s) from %s", task, spec_key(spec), pretrained)
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
        loader = suite.dataloader(
            train, tokenizer, shuffle=True, batch_size=int(ft["batch_size"]), seed=int(ft["seed"])
        )
        module = ExpertFinetuner(
            model, float(ft["lr"]), float(ft["weight_decay"]), float(ft["warmup_ratio"]), name=task, fused=True
        )
        seconds, _ = fit(module, loader, int(ft["epochs"]), trainer_kwargs)

        # The expert's own scores on the full test and validation splits.
        full = copy.copy(suite)
        full.max_eval_examples = None
        backbone, shell = split_backbone(copy.deepcopy(model).eval())
        clf = MultiTaskClassifier(backbone, {task: shell})
        start = time.perf_counter()
        scores = {s: evaluate(clf, full, s, tokenizer, trainer_kwargs)[task] for s in ("validation", "test")}
        scoring = time.perf_counter() - start

        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        log.info(
            "expert '%s': test acc %.4f (%.0f s of training, %.0f s of scoring)",
            task,
            scores["test"]["acc"],
            seconds,
            scoring,
        )
        return {
            "task": task,
            "labels": info.labels,
            "pretrained": pretrained,
            "finetune": ft,
            "max_length": suite.max_length,
            "train_examples": len(train),
            "train_seconds": round(seconds, 1),
            "scores": scores,
        }

    return cached_build(Path(cache_dir) / "experts", task, spec, build)
