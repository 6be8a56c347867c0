"""Shared fixtures: a tiny but real configuration (the real MiniLM encoder, a small subset of the real suite)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
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

    def __init__(self, base: dict, experts: list[dict]) -> None:
        self.base, self.experts = base, experts
        self.tasks = [f"task{i}" for i in range(len(experts))]

    def pretrained_state(self) -> dict:
        return self.base

    def expert_states(self) -> list[dict]:
        return self.experts

    def mergeable(self, state: dict) -> dict:
        return dict(state)
