"""Model pools: the pretrained model and one expert per task (hub ids or local dirs, or built on demand)."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from mergelab import task_vectors as tv
from mergelab.io.atomic import atomic_dir, atomic_write_json
from mergelab.io.files import checkpoint_format, is_adapter_dir, looks_local
from mergelab.io.reader import adapter_expert
from mergelab.pools.base import ModelPool, Scores, copy_with_state
from mergelab.suites.base import subsample
from mergelab.text.model import METRICS, MultiTaskClassifier, evaluate, split_backbone
from mergelab.text.suite import TextClassificationSuite
from mergelab.training.experts import build_expert, model_fingerprint
from mergelab.weight_checks import check_finite

HEADS_FILE = "task_heads.safetensors"


HEADS_META = "task_heads.json"

#: Inside a merged dir: one standalone sequence-classification dir per task (the merged backbone + that task's head).
CLASSIFIERS_DIR = "classifiers"


def checkpoint_location(name: str, path: str, need_config: bool = True) -> str:
    """A local dir (expanded; checked to exist and, with ``need_config``, to hold config.json) or a hub id as given.

    Errors name the pool entry at fault.
    """
    if not looks_local(path):
        return path
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"model pool: {name} dir '{path}' does not exist")
    if need_config and not (p / "config.json").is_file():
        if is_adapter_dir(p):
            raise FileNotFoundError(
                f"model pool: {name} dir '{path}' is a PEFT adapter (no config.json), not a model: an adapter is an "
                "expert over the pool's pretrained model"
            )
        raise FileNotFoundError(f"model pool: {name} dir '{path}' has no config.json (not a HF model dir)")
    return str(p)


def adapter_location(name: str, path: str) -> str | None:
    """The local dir of ``path`` when it holds a PEFT adapter (read by :func:`mergelab.io.reader.adapter_expert`),
    else None (a model checkpoint, or a hub id, loaded by transformers). A dir holding both is refused."""
    p = Path(path).expanduser()
    if not looks_local(path) or not p.is_dir() or not is_adapter_dir(p):
        return None
    checkpoint_format(p, f"model pool: {name}")
    return str(p)


def load_model(auto_class: Any, name: str, path: str, trust_remote_code: bool, **kwargs: Any) -> nn.Module:
    """Load a checkpoint with a transformers ``Auto*`` class, with an error that names the pool entry at fault.

    ``pytorch_model.bin`` checkpoints are read with ``weights_only=True`` (transformers' default, asked for here so
    that a pickle holding anything but tensors is refused whatever the default becomes).
    """
    path = checkpoint_location(name, path)
    try:
        model = auto_class.from_pretrained(path, trust_remote_code=trust_remote_code, weights_only=True, **kwargs)
    except Exception as e:  # transformers raises several types for unreadable/unreachable checkpoints
        raise OSError(f"model pool: cannot load {name} from '{path}': {type(e).__name__}: {e}") from e
    return model.eval()


def load_classifier(name: str, path: str, trust_remote_code: bool, **kwargs: Any) -> nn.Module:
    """Load a sequence-classification model, with an error that names the pool entry at fault."""
    return load_model(AutoModelForSequenceClassification, name, path, trust_remote_code, **kwargs)


class ClassifierPool(ModelPool):
    """The pretrained model and the experts, with the shared (merged) / per-task (head) split.

    Args:
        pretrained: hub id or local dir of the pretrained model.
        experts: task name -> hub id or local dir; a null value (or ``experts: null`` for every suite task)
            means "fine-tune this expert from the suite's train split" (cached, see :mod:`mergelab.training.experts`).
        exclude: regexes over backbone parameter names that are not merged (they stay pretrained).
        finetune: the recipe for experts built on demand.
        cache_dir: where built experts and cached reference scores live.
        trust_remote_code: passed to transformers; off unless the user turns it on.
        export_classifiers: write each task's standalone classifier under :data:`CLASSIFIERS_DIR` of a merged dir
            (see :meth:`save_merged`); false writes no such dir, saving one full copy of the backbone per task.
    """

    task_data = True
    metric_names = METRICS

    def __init__(
        self,
        pretrained: str,
        experts: Mapping[str, str | None] | None = None,
        exclude: Sequence[str] = (),
        finetune: Mapping[str, Any] | None = None,
        cache_dir: str = "~/.cache/mergelab",
        trust_remote_code: bool = False,
        export_classifiers: bool = True,
    ) -> None:
        super().__init__(experts, exclude, cache_dir, trust_remote_code)
        self.pretrained_path = str(pretrained)
        self.finetune = dict(finetune or {})
        if not isinstance(export_classifiers, bool):  # a string (e.g. a typo) would count as true
            raise ValueError(f"model.export_classifiers must be true or false, got {export_classifiers!r}")
        self.export_classifiers = export_classifiers

    # ----------------------------------------------------------------------------------------- loading

    def setup(self, suite: Any, trainer_kwargs: Mapping[str, Any]) -> None:
        """Resolve (building if needed) and load every model, and check they fit together and the suite."""
        if not isinstance(suite, TextClassificationSuite):
            raise ValueError(
                "model pool ClassifierPool (sequence classifiers) scores text-classification suites "
                "(e.g. eval=embedded); "
                f"eval '{suite.name}' is a {type(suite).__name__}"
            )
        paths = self.task_paths(suite.task_names)
        self.suite = suite
        transformers.logging.set_verbosity_error()  # the "newly initialised head" report is expected here
        pre = load_classifier("pretrained model", self.pretrained_path, self.trust_remote_code, num_labels=2)
        self._pretrained_backbone: nn.Module = getattr(pre, pre.base_model_prefix)
        self.model_type = pre.config.model_type
        self.tokenizer = AutoTokenizer.from_pretrained(
            checkpoint_location("pretrained model", self.pretrained_path), trust_remote_code=self.trust_remote_code
        )
        base = self.pretrained_state()
        self.check_pretrained(base, f"pretrained model '{self.pretrained_path}'")
        self._shells: dict[str, nn.Module] = {}
        for task in self.tasks:
            path = paths[task]
            if path is None:
                if not self.finetune:
                    raise ValueError(f"model pool: expert '{task}' has no path and model.finetune is empty")
                path = str(
                    build_expert(self.pretrained_path, suite, task, self.finetune, self.cache_dir, trainer_kwargs)
                )
            where = f"expert '{task}' ({path})"
            adapter = adapter_location(f"expert '{task}'", path)
            if adapter is not None:
                model = self._adapter_classifier(f"model pool: expert '{task}'", adapter, pre)
            else:
                model = load_classifier(f"expert '{task}'", path, self.trust_remote_code)
            self.check_architecture(where, model.config.model_type)
            self._check_labels(task, model, suite, where)
            state = {k: v.detach() for k, v in model.state_dict().items()}
            check_finite(state, where)
            backbone, shell = split_backbone(model)
            # An expert saved in another precision (fp16/bf16 over an fp32 base) keeps its weights for merging;
            # its head runs on the pool's backbones, so it takes their dtype (upcasting is exact).
            self._shells[task] = shell.to(self.dtype)
            self.add_expert(task, path, where, base, backbone.state_dict())

    def _adapter_classifier(self, name: str, path: str, pre: nn.Module) -> nn.Module:
        """The classifier of a PEFT adapter expert: the pretrained classifier with the LoRA deltas, and the head the
        adapter saved (``modules_to_save``; PEFT saves it for ``task_type=SEQ_CLS``), its label count read from it.

        An adapter without a head is refused: the pretrained model's head is untrained, so the expert would score
        nothing of its task.
        """
        pre_state = pre.state_dict()
        adapted = adapter_expert(path, pre_state, name, self.pretrained_path)
        head = [k for k in pre_state if not k.startswith(pre.base_model_prefix + ".")]
        missing = [k for k in head if k not in adapted.saved]
        if missing:
            raise ValueError(
                f"{name}: PEFT adapter {path} has no classification head ({', '.join(missing)}): a classifier expert "
                "needs its head; save it with the adapter (modules_to_save, as PEFT does for task_type SEQ_CLS)"
            )
        # The head's output rows are the labels: the pretrained head (built with num_labels outputs) says which.
        n = pre.config.num_labels
        counts = {
            adapted.state[k].shape[0]
            for k in head
            if pre_state[k].dim()
            and pre_state[k].shape[0] == n
            and adapted.state[k].shape[1:] == pre_state[k].shape[1:]
        }
        if len(counts) != 1:
            raise ValueError(f"{name}: PEFT adapter {path}: cannot tell its label count from its head {head}")
        cfg = copy.deepcopy(pre.config)
        cfg.num_labels = counts.pop()
        model = AutoModelForSequenceClassification.from_config(cfg, trust_remote_code=self.trust_remote_code)
        try:
            model.to(pre.dtype).load_state_dict(adapted.state)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[-1].strip()
            raise ValueError(
                f"{name}: PEFT adapter {path}: its head does not fit the pretrained model ({first})"
            ) from None
        return model.eval()

    @staticmethod
    def _check_labels(task: str, model: nn.Module, suite: TextClassificationSuite, where: str) -> None:
        labels = suite.tasks[task].labels
        if model.config.num_labels != len(labels):
            raise ValueError(
                f"{where}: head has {model.config.num_labels} outputs but task '{task}' has {len(labels)} labels "
                f"{labels} ({suite.index})"
            )
        names = [str(model.config.id2label[i]) for i in range(len(labels))]
        default = [f"LABEL_{i}" for i in range(len(labels))]
        if names != default and names != [str(x) for x in labels]:
            raise ValueError(f"{where}: head labels {names} do not match task '{task}' labels {labels} ({suite.index})")

    # ----------------------------------------------------------------------------------------- state

    @property
    def dtype(self) -> torch.dtype:
        """The floating-point dtype of the pretrained backbone: every model the pool builds computes in it."""
        return next(p.dtype for p in self._pretrained_backbone.parameters() if p.is_floating_point())

    def pretrained_state(self) -> tv.StateDict:
        """The pretrained backbone's state dict."""
        return {k: v.detach() for k, v in self._pretrained_backbone.state_dict().items()}

    # ----------------------------------------------------------------------------------------- models

    def backbone(self, state: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
        """A copy of the pretrained backbone, with ``state`` (possibly partial) loaded into it."""
        return copy_with_state(self._pretrained_backbone, state)

    def classifier(
        self, state: Mapping[str, torch.Tensor] | None = None, tasks: Sequence[str] | None = None
    ) -> MultiTaskClassifier:
        """A multi-task model: the given backbone weights with each task's expert head."""
        return MultiTaskClassifier(self.backbone(state), {t: self._shells[t] for t in (tasks or self.tasks)})

    def expert_classifier(self, task: str) -> MultiTaskClassifier:
        """The expert of ``task`` alone, as a one-task classifier."""
        return self.classifier(self._expert_states[task], [task])

    def model(
        self, state: Mapping[str, torch.Tensor] | None = None, tasks: Sequence[str] | None = None
    ) -> MultiTaskClassifier:
        """The pool interface's name for :meth:`classifier`."""
        return self.classifier(state, tasks)

    def evaluate(
        self,
        model: L.LightningModule,
        split: str,
        trainer_kwargs: Mapping[str, Any],
        tasks: Sequence[str] | None = None,
        callbacks: Sequence[L.Callback] = (),
    ) -> Scores:
        """Accuracy and macro-F1 of ``model`` on ``split`` of each task (see :func:`mergelab.text.model.evaluate`)."""
        assert isinstance(model, MultiTaskClassifier)
        return evaluate(model, self.suite, split, self.tokenizer, trainer_kwargs, tasks, callbacks)

    def task_batches(
        self, task: str, split: str, max_examples: int | None, batch_size: int, seed: int, shuffle: bool = False
    ) -> list[dict[str, torch.Tensor]]:
        """Tokenised batches of ``split`` of ``task`` (``input_ids``, ``attention_mask``, ``labels``)."""
        ds = subsample(self.suite.dataset(task, split), max_examples, seed)
        return list(self.suite.dataloader(ds, self.tokenizer, shuffle=shuffle, batch_size=batch_size, seed=seed))

    def task_logits(self, model: nn.Module, task: str, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``task``'s head on the backbone of ``model`` (a :class:`MultiTaskClassifier`)."""
        return model(task, batch)

    def reference_key(self, task: str | None = None) -> dict[str, Any]:
        """The pretrained backbone scores with the experts' heads, so its key names them too."""
        if task is None:
            return {
                "model": model_fingerprint(self.pretrained_path),
                "heads": [model_fingerprint(self.resolved[t]) for t in self.tasks],
            }
        return {"model": model_fingerprint(self.resolved[task]), "task": task}

    def save_merged(self, state: Mapping[str, torch.Tensor], out_dir: str | Path) -> Path:
        """Write the merged model: an HF backbone dir (``AutoModel.from_pretrained`` loads it) plus task heads
        (:func:`load_merged` rebuilds the multi-task classifier), and, with ``export_classifiers``, under
        :data:`CLASSIFIERS_DIR` one standalone classifier per task (see :func:`save_task_classifier`).

        Written to a temporary dir and renamed into place when complete.
        """
        clf = self.classifier(state)
        heads: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {"tasks": {}}
        for task, model in clf.task_models.items():
            prefix = model.base_model_prefix + "."
            for k, v in model.state_dict().items():
                if not k.startswith(prefix):
                    heads[f"{task}/{k}"] = v.detach().contiguous().clone()
            meta["tasks"][task] = model.config.to_dict()
        with atomic_dir(out_dir) as tmp:
            clf.backbone.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            save_file(heads, str(tmp / HEADS_FILE))
            atomic_write_json(tmp / HEADS_META, meta)
            if self.export_classifiers:
                for task, model in clf.task_models.items():
                    labels = self.suite.tasks[task].labels
                    save_task_classifier(model, labels, self.tokenizer, tmp / CLASSIFIERS_DIR / task)
        return Path(out_dir)


def save_task_classifier(model: nn.Module, labels: Sequence[str], tokenizer: Any, out_dir: str | Path) -> Path:
    """Write one task's sequence-classification model (backbone attached) as a dir that
    ``AutoModelForSequenceClassification.from_pretrained`` and ``transformers.pipeline("text-classification")`` load
    as they are: its full weights, its config naming the task's ``labels`` (in label-id order) and the tokenizer.

    The label names are set on ``model.config``: a pool's experts may carry the default ``LABEL_<i>`` names, which
    a pipeline would report instead of the task's.
    """
    out_dir = Path(out_dir)
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {name: i for i, name in enumerate(labels)}
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def load_merged(path: str | Path) -> MultiTaskClassifier:
    """Load a merged model written by :meth:`ClassifierPool.save_merged` back into a multi-task classifier."""
    path = Path(path)
    backbone = AutoModel.from_pretrained(path).eval()
    meta = json.loads((path / HEADS_META).read_text())
    heads_state = load_file(str(path / HEADS_FILE))
    shells = {}
    for task, cfg_dict in meta["tasks"].items():
        cfg = AutoConfig.for_model(**cfg_dict)
        _, shell = split_backbone(AutoModelForSequenceClassification.from_config(cfg))
        prefix = f"{task}/"
        shell.load_state_dict({k[len(prefix) :]: v for k, v in heads_state.items() if k.startswith(prefix)})
        shells[task] = shell.eval()
    return MultiTaskClassifier(backbone, shells)
