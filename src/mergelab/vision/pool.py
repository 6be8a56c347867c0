"""The CLIP vision pool: :class:`CLIPVisionPool` holds a pretrained ``CLIPModel`` and one expert vision tower per
task (a ``CLIPModel`` or ``CLIPVisionModel`` checkpoint, as tanganke's fine-tuned CLIP experts are). Only the vision
tower is merged; the text tower, projections and logit scale always come from the pretrained model, whose text
encoder builds each task's zero-shot head once, cached as safetensors under ``<cache_dir>/heads/``."""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import transformers
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, CLIPModel, CLIPVisionModel

from mergelab import task_vectors as tv
from mergelab.io.atomic import atomic_dir, atomic_write_json
from mergelab.io.reader import adapter_expert
from mergelab.pools.base import ModelPool, Scores, copy_with_state
from mergelab.suites.base import subsample
from mergelab.suites.scoring import run_test
from mergelab.text.pool import adapter_location, checkpoint_location, load_model
from mergelab.training.experts import cached_build, model_fingerprint
from mergelab.vision.model import ZeroShotClassifier, fill_templates, tensors_digest, tokenize_prompts, zero_shot_head
from mergelab.vision.suite import (
    CLIP_TYPES,
    HEADS_FILE,
    HEADS_FORMAT,
    MERGED_HEADS_FILE,
    MERGED_HEADS_META,
    ImageCollator,
    ZeroShotImageSuite,
)
from mergelab.weight_checks import check_finite


class CLIPVisionPool(ModelPool):
    """A pretrained CLIP model and one fine-tuned vision tower per task; only the vision tower is merged.

    Args:
        pretrained: hub id or local dir of a ``CLIPModel`` (both towers: the heads need its text encoder).
        experts: task -> hub id or local dir of a ``CLIPModel`` or ``CLIPVisionModel`` fine-tuned on that task; only
            its vision tower is read.
        exclude: regexes of vision-tower parameter names kept pretrained instead of merged.
        cache_dir: where zero-shot heads and cached reference scores live.
        trust_remote_code: passed to transformers; off unless the user turns it on.
    """

    task_data = True

    def __init__(
        self,
        pretrained: str,
        experts: Mapping[str, str | None] | None = None,
        exclude: Sequence[str] = (),
        cache_dir: str = "~/.cache/mergelab",
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__(experts, exclude, cache_dir, trust_remote_code)
        self.source = str(pretrained)
        self.heads: dict[str, torch.Tensor] = {}
        self.head_dirs: dict[str, Path] = {}

    def _config_type(self, name: str, path: str) -> str:
        try:
            return str(AutoConfig.from_pretrained(path, trust_remote_code=self.trust_remote_code).model_type)
        except Exception as e:  # transformers raises several types for unreadable/unreachable configs
            raise OSError(f"model pool: cannot read the config of {name} at '{path}': {type(e).__name__}: {e}") from e

    def setup(self, suite: Any, trainer_kwargs: Mapping[str, Any]) -> None:
        """Load the pretrained CLIP and the experts' vision towers, check they fit, build (or load) the heads."""
        if not isinstance(suite, ZeroShotImageSuite):
            raise ValueError(
                f"model pool CLIPVisionPool scores zero-shot image suites (e.g. eval=clip8); eval '{suite.name}' is a "
                f"{type(suite).__name__}"
            )
        paths = self.task_paths(suite.task_names)
        missing = [t for t in self.tasks if not paths[t]]
        if missing:
            raise ValueError(f"model pool CLIPVisionPool builds no experts: set model.experts for {missing}")
        self.suite = suite
        transformers.logging.set_verbosity_error()  # the text weights a vision-only load skips are expected
        self.pretrained_path = checkpoint_location("pretrained model", self.source)
        kind = self._config_type("pretrained model", self.pretrained_path)
        if kind != "clip":
            raise ValueError(
                f"model pool: pretrained model '{self.source}' is a '{kind}' checkpoint; CLIPVisionPool needs a "
                f"CLIPModel ('clip'), whose text encoder builds the zero-shot heads"
            )
        self.clip: CLIPModel = load_model(CLIPModel, "pretrained model", self.pretrained_path, self.trust_remote_code)
        self.model_type = "clip_vision_model"
        self.processor = AutoImageProcessor.from_pretrained(
            self.pretrained_path, trust_remote_code=self.trust_remote_code
        )
        self.tokenizer = AutoTokenizer.from_pretrained(self.pretrained_path, trust_remote_code=self.trust_remote_code)
        base = self.pretrained_state()
        self.check_pretrained(base, f"pretrained model '{self.source}'")
        for task in self.tasks:
            adapter = adapter_location(f"expert '{task}'", str(paths[task]))
            if adapter is not None:
                path, where = adapter, f"expert '{task}' ({adapter})"
                state = self._adapter_tower(f"model pool: expert '{task}'", adapter, base)
            else:
                path = checkpoint_location(f"expert '{task}'", str(paths[task]))
                where = f"expert '{task}' ({path})"
                kind = self._config_type(f"expert '{task}'", path)
                if kind not in CLIP_TYPES:
                    raise ValueError(
                        f"{where}: architecture '{kind}' is not a CLIP vision tower (config types {CLIP_TYPES})"
                    )
                vision = load_model(CLIPVisionModel, f"expert '{task}'", path, self.trust_remote_code)
                state = {k: v.detach() for k, v in vision.state_dict().items()}
            check_finite(state, where)
            self.add_expert(task, path, where, base, state)
        self.build_heads(suite)

    def _adapter_tower(self, name: str, path: str, base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The vision tower of a PEFT adapter expert: the pretrained tower with the adapter's LoRA deltas.

        The tower's weights are matched under ``CLIPModel``'s names (``vision_model.*``), so an adapter of a whole
        ``CLIPModel`` and one of a ``CLIPVisionModel`` (named with or without ``vision_model.``, by transformers
        version) both fit; the adapter's text tower, projections and logit scale are ignored, as for any expert.
        """
        prefix = "vision_model."
        named = {prefix + k: v for k, v in base.items()}
        ignore = ("text_model.", "text_projection", "visual_projection", "logit_scale")
        adapted = adapter_expert(path, named, name, self.source, ignore)
        return {k.removeprefix(prefix): v for k, v in adapted.state.items()}

    def build_heads(self, suite: ZeroShotImageSuite) -> None:
        """Each task's zero-shot head from the pretrained text tower, loaded from the cache or computed once."""
        text = {k: v for k, v in self.clip.state_dict().items() if not k.startswith(("vision_model.", "visual_"))}
        text_id = tensors_digest(text)
        max_length = min(suite.max_length, int(self.clip.config.text_config.max_position_embeddings))
        for task in tqdm(self.tasks, desc="zero-shot heads", leave=False):
            classnames, templates = suite.classnames(task), suite.templates(task)
            encoded = tokenize_prompts(self.tokenizer, fill_templates(classnames, templates), max_length)
            spec = {
                "format": HEADS_FORMAT,
                "text_tower": text_id,
                "prompt_tokens": tensors_digest(encoded),
                "classnames": classnames,
                "templates": templates,
            }

            def build(
                tmp: Path, classnames: list[str] = classnames, templates: list[str] = templates
            ) -> dict[str, Any]:
                start = time.perf_counter()
                head = zero_shot_head(self.clip, self.tokenizer, classnames, templates, max_length)
                save_file({"head": head.contiguous()}, str(tmp / HEADS_FILE))
                return {
                    "pretrained": self.source,
                    "classes": len(classnames),
                    "templates": len(templates),
                    "seconds": round(time.perf_counter() - start, 2),
                }

            self.head_dirs[task] = cached_build(self.cache_dir / "heads", task, spec, build)
            self.heads[task] = load_file(str(self.head_dirs[task] / HEADS_FILE))["head"]

    def pretrained_state(self) -> tv.StateDict:
        """The pretrained vision tower's weights (keys as ``CLIPVisionModel`` names them)."""
        return {k: v.detach() for k, v in self.clip.vision_model.state_dict().items()}

    def model(
        self, state: Mapping[str, torch.Tensor] | None = None, tasks: Sequence[str] | None = None
    ) -> ZeroShotClassifier:
        """A copy of the pretrained vision tower with ``state`` loaded over it, with the heads of ``tasks``."""
        backbone = copy_with_state(self.clip.vision_model, state)
        heads = {t: self.heads[t] for t in (tasks or self.tasks)}
        # The projection is copied too: Lightning moves each scored module to its device, and the pool's CLIP stays.
        return ZeroShotClassifier(backbone, copy.deepcopy(self.clip.visual_projection), heads)

    def evaluate(
        self,
        model: L.LightningModule,
        split: str,
        trainer_kwargs: Mapping[str, Any],
        tasks: Sequence[str] | None = None,
        callbacks: Sequence[L.Callback] = (),
    ) -> Scores:
        """Zero-shot accuracy of ``model`` on ``split`` of each task (default: every task it has a head for)."""
        assert isinstance(model, ZeroShotClassifier)
        model.eval_tasks = list(tasks or model.head_names)
        loaders = [self.suite.eval_loader(t, split, self.processor) for t in model.eval_tasks]
        return run_test(model, loaders, trainer_kwargs, callbacks)

    def task_batches(
        self, task: str, split: str, max_examples: int | None, batch_size: int, seed: int, shuffle: bool = False
    ) -> list[dict[str, torch.Tensor]]:
        """Batches of ``pixel_values`` and ``labels`` of the suite split ``split`` of ``task``."""
        info = self.suite.tasks[task]
        ds = subsample(self.suite.dataset(task, split), max_examples, seed)
        loader = torch.utils.data.DataLoader(
            ds,  # type: ignore[arg-type]
            batch_size=batch_size,
            shuffle=shuffle,
            generator=torch.Generator().manual_seed(seed) if shuffle else None,
            collate_fn=ImageCollator(self.processor, info.image_column, info.label_column),
        )
        return list(loader)

    def task_logits(self, model: torch.nn.Module, task: str, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """CLIP's zero-shot logits of ``task`` for the (merged) vision tower of ``model``."""
        return model(task, batch["pixel_values"])

    def reference_key(self, task: str | None = None) -> dict[str, Any]:
        """The vision tower scored (pretrained or ``task``'s expert) and the heads it is scored with."""
        pre = model_fingerprint(self.pretrained_path)
        if task is None:
            return {"model": pre, "heads": [self.head_dirs[t].name for t in self.tasks]}
        expert = model_fingerprint(self.resolved[task])
        return {"model": expert, "task": task, "pretrained": pre, "heads": self.head_dirs[task].name}

    def save_merged(self, state: Mapping[str, torch.Tensor], out_dir: str | Path) -> Path:
        """Write a ``CLIPModel`` dir with the merged vision tower, plus tokenizer, processor and heads, atomically."""
        clip = copy.deepcopy(self.clip)
        clip.vision_model.load_state_dict(dict(state), strict=False)
        with atomic_dir(out_dir) as tmp:
            clip.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            self.processor.save_pretrained(tmp)
            save_file({t: h.contiguous() for t, h in self.heads.items()}, str(tmp / MERGED_HEADS_FILE))
            prompts = {
                t: {"classnames": self.suite.classnames(t), "templates": self.suite.templates(t)} for t in self.tasks
            }
            atomic_write_json(tmp / MERGED_HEADS_META, prompts)
        return Path(out_dir)
