"""Shared fixtures: a tiny but real configuration (the real MiniLM encoder, a small subset of the real suite)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from mergelab.cli import CONFIG_DIR  # registers the config resolvers
from mergelab.pools.base import ModelPool

# Two real tasks, few examples: experts train in seconds and still learn something.
TINY = [
    "eval.tasks=[tweet_sentiment,food_review]",
    "eval.max_eval_examples=48",
    "model.finetune.max_train_examples=256",
    "model.finetune.epochs=1",
    "model.finetune.lr=2e-4",
    "logger=none",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "plot=false",
]


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One expert cache for the whole session, so tiny experts are fine-tuned once."""
    path = tmp_path_factory.mktemp("mergelab-cache")
    old = os.environ.get("MERGELAB_CACHE")
    os.environ["MERGELAB_CACHE"] = str(path)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    yield path
    if old is None:
        os.environ.pop("MERGELAB_CACHE", None)
    else:
        os.environ["MERGELAB_CACHE"] = old


def embedded_table_rows(*keep: str) -> list[str]:
    """``experiment=embedded_table`` with only the rows ``keep`` (in the experiment's order): the overrides."""
    preset = (Path(CONFIG_DIR) / "experiment" / "embedded_table.yaml").read_text()
    rows = dict.fromkeys(re.findall(r"^  - /method@table\.methods\.(\w+):", preset, re.M))
    unknown = set(keep) - set(rows)
    assert not unknown, f"not rows of the embedded table: {sorted(unknown)}"
    return ["experiment=embedded_table", *(f"~table.methods.{m}" for m in rows if m not in keep)]


def make_cfg(output_dir: Path, overrides: Sequence[str] = (), tiny: bool = True) -> DictConfig:
    """Compose the app's config as the CLI would, with the output dir set (no Hydra runtime here)."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("config", overrides=[*(TINY if tiny else []), *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


class ListPool:
    """An in-memory model pool over state dicts: what merge methods use of a pool, without models or a suite."""

    in_memory = True
    tensor_sources = ModelPool.tensor_sources
    transformed = ModelPool.transformed

    def __init__(self, base: dict, experts: list[dict]) -> None:
        self.base, self.experts = base, experts
        self.tasks = [f"task{i}" for i in range(len(experts))]

    def pretrained_state(self) -> dict:
        return self.base

    def expert_states(self) -> list[dict]:
        return self.experts

    def mergeable(self, state: dict) -> dict:
        return dict(state)


class TaskDataPool(ListPool):
    """A :class:`ListPool` that also hands out each task's examples (``task_data``) and runs small in-memory
    models on them: what Fisher merging, RegMean and AdaMerging use of a pool, with everything known to the test.

    Args:
        base, experts: the backbone's state dicts (pretrained, experts in task order).
        backbone: an ``nn.Module`` whose state dict has the keys of ``base``; ``backbone(x)`` gives features.
        heads: task -> module mapping features to logits (not merged).
        data: task -> (inputs ``x`` [N, ...], labels [N], attention mask [N, L] or None).
        cache_dir: where statistics are cached; None: not cached (``task_data_key`` is None).
    """

    task_data = True

    def __init__(self, base, experts, backbone, heads, data, cache_dir=None) -> None:
        super().__init__(base, experts)
        self.backbone, self.heads, self.data = backbone, heads, data
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.batch_calls: list[tuple] = []

    def require(self, capability: str, what: str) -> None:
        if not getattr(self, capability, False):
            raise AssertionError(f"test pool lacks {capability} ({what})")

    def describe(self) -> str:
        return "test pool"

    def model(self, state=None, tasks=None):
        import copy

        import torch

        class Model(torch.nn.Module):
            def __init__(self, backbone, heads) -> None:
                super().__init__()
                self.backbone, self.heads = backbone, torch.nn.ModuleDict(heads)

            def forward(self, task, batch):
                return self.heads[task](self.backbone(batch["x"]))

        backbone = copy.deepcopy(self.backbone)
        if state is not None:
            backbone.load_state_dict(dict(state), strict=False)
        heads = {t: copy.deepcopy(self.heads[t]) for t in (tasks or self.tasks)}
        return Model(backbone, heads).eval()

    def task_batches(self, task, split, max_examples, batch_size, seed, shuffle=False):
        import torch

        self.batch_calls.append((task, split, max_examples, batch_size, seed, shuffle))
        x, y, mask = self.data[task]
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        order = order[:max_examples] if max_examples is not None else torch.arange(len(y))
        if shuffle:
            order = order[torch.randperm(len(order), generator=torch.Generator().manual_seed(seed + 1))]
        out = []
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            batch = {"x": x[idx], "labels": y[idx]}
            if mask is not None:
                batch["attention_mask"] = mask[idx]
            out.append(batch)
        return out

    def task_logits(self, model, task, batch):
        return model(task, batch)

    def task_data_key(self, task):
        return None if self.cache_dir is None else {"expert": f"{task}-{id(self)}", "data": "test"}


def small_checkpoint_pool(root: Path) -> list[str]:
    """A checkpoint pool of two experts of two small random tensors (plumbing only, never evidence a method works):
    the overrides of a merge-only run over it."""
    import json

    import torch

    from mergelab.io.writer import write_checkpoint

    g = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(8, 4, generator=g), "b.bias": torch.randn(8, generator=g)}
    config = json.dumps({"model_type": "bert", "architectures": ["BertModel"]})
    experts = {}
    for i, name in enumerate(("base", "e1", "e2")):
        d = write_checkpoint({k: v + 0.1 * i for k, v in base.items()}, root / name)
        (d / "config.json").write_text(config)
        experts[name] = str(d)
    mapping = "{" + ", ".join(f"{k}: '{v}'" for k, v in experts.items() if k != "base") + "}"
    return ["model=checkpoints", f"model.pretrained='{experts['base']}'", f"model.experts={mapping}", "eval=none"]


def run_states(pretrained: str, experts: Iterable[str], merged_dir: Path) -> tuple[dict, list[dict], dict]:
    """State dicts of a classifier run's inputs and output, loaded independently of mergelab: the pretrained
    backbone, each expert's backbone and the merged backbone a run saved (``save_merged``)."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    return (
        AutoModel.from_pretrained(pretrained).state_dict(),
        [AutoModelForSequenceClassification.from_pretrained(p).base_model.state_dict() for p in experts],
        AutoModel.from_pretrained(merged_dir).state_dict(),
    )
