"""Every config preset composes, resolves and instantiates (in the style of lightning-hydra-template's config tests).

Each ``conf/experiment/*.yaml`` (found by a glob at collection time, so a new file is covered without editing this
one) is composed into the root config ``config``, resolved in full, and its pieces are built with
``hydra.utils.instantiate(..., _convert_="all")`` as :func:`mergelab.run.run` builds them before any model is loaded:
the model pool, the evaluation suite (unless ``eval=none``), the loggers, and every method (``method`` and each
``table.methods`` row) at every point of its ``grid`` (what ``tune=true`` builds) and as configured. Then the same
for each preset of the ``method``, ``model`` and ``eval`` groups on its own, composed into the default root config.

Nothing here loads a model or reads a dataset: pools and suites only store hub ids and paths (and read local
``tasks.yaml`` files) when constructed, so the hub presets (llama2, mistral, clip) are built too. Any attempt to open
a network connection while building fails the test (see :func:`no_network`).
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from mergelab.cli import CONFIG_DIR
from tests.conftest import make_cfg

# mergelab's components are imported inside the helpers, so that a module broken mid-refactor fails the cases that
# need it rather than the collection of the whole file.


def presets(group: str) -> list[str]:
    """The config names of ``conf/<group>/*.yaml``, read when the tests are collected."""
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


EXPERIMENTS = presets("experiment")
METHODS = presets("method")
MODELS = presets("model")
EVALS = presets("eval")

# Values a preset leaves to the user (``???``: model=checkpoints, clip_local, local_experts) get placeholders here;
# constructors only store them. A new mandatory key fails test_*_preset until it is added.
PLACEHOLDERS: dict[str, Any] = {
    "model.pretrained": "/absent/pretrained",
    "model.experts": lambda cfg: {t: f"/absent/{t}" for t in (cfg.eval.tasks if cfg.get("eval") else ["a", "b"])},
}


class NetworkAccess(RuntimeError):
    """Raised by the socket guard: building a config piece tried to reach the network."""


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No hub downloads while building configs: offline mode for the HF libraries, and no outgoing connections."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    real_connect = socket.socket.connect

    def connect(self: socket.socket, address: Any) -> Any:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise NetworkAccess(f"a config test tried to connect to {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    yield


def compose(tmp_path: Path, overrides: list[str]) -> DictConfig:
    """The root config with ``overrides``, as the CLI composes it, placeholders filled, checked to resolve in full."""
    cfg = make_cfg(tmp_path, overrides, tiny=False)
    missing = OmegaConf.missing_keys(cfg)
    unknown = missing - set(PLACEHOLDERS)
    assert not unknown, f"{overrides}: mandatory value(s) {sorted(unknown)} have no placeholder in PLACEHOLDERS"
    with open_dict(cfg):
        for key in sorted(missing):
            value = PLACEHOLDERS[key]
            OmegaConf.update(cfg, key, value(cfg) if callable(value) else value, merge=False)
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert isinstance(container, dict) and container["paths"]["output_dir"] == str(tmp_path)
    return cfg


def build(node: DictConfig) -> Any:
    """One config piece, built the way the app builds it."""
    return instantiate(node, _convert_="all")


def build_pool(cfg: DictConfig) -> Any:
    from mergelab.pools.base import ModelPool
    from mergelab.pools.checkpoint import CheckpointPool

    pool = build(cfg.model)
    assert isinstance(pool, ModelPool | CheckpointPool), f"model: {type(pool).__name__} is not a model pool"
    return pool


def build_suite(cfg: DictConfig) -> Any:
    """The suite (None for ``eval=none``). lm-eval suites refuse code-running tasks (mbpp, humaneval) unless
    ``eval.allow_code_execution=true``, which the MetaGPT presets' run lines pass: the refusal is checked, then the
    suite is built with the opt-in."""
    if not cfg.get("eval"):
        return None
    try:
        suite = build(cfg.eval)
    except Exception as e:
        if "allow_code_execution" not in cfg.eval or cfg.eval.allow_code_execution:
            raise
        assert "execute model-generated code" in str(e), e
        with open_dict(cfg):
            cfg.eval.allow_code_execution = True
        suite = build(cfg.eval)
    assert suite.name == cfg.eval.name
    assert list(suite.task_names) == list(cfg.eval.tasks)
    return suite


def build_loggers(cfg: DictConfig) -> None:
    for name, node in (cfg.get("logger") or {}).items():
        if node:
            assert build(node) is not None, name


def build_method(mcfg: DictConfig) -> None:
    """The method as configured and at every point of its ``grid`` (``tune=true``), through the app's own path."""
    from mergelab.methods.base import MergeMethod
    from mergelab.run import method_candidates

    (configured,) = method_candidates(mcfg, tune=False)
    assert isinstance(configured[1], MergeMethod)
    full = OmegaConf.to_container(mcfg, resolve=True)
    assert isinstance(full, dict)
    grid = full.get("grid") or {}
    tuned = method_candidates(mcfg, tune=True)
    points = [dict(zip(grid, vals, strict=True)) for vals in itertools.product(*grid.values())] or [{}]
    assert [params for params, _ in tuned] == (points if grid else [configured[0]])
    assert all(isinstance(method, MergeMethod) for _, method in tuned)


def method_nodes(cfg: DictConfig) -> dict[str, DictConfig]:
    """``method`` and each ``table.methods`` row."""
    nodes = {"method": cfg.method}
    if cfg.get("table"):
        nodes.update({f"table.methods.{row}": node for row, node in cfg.table.methods.items()})
    return nodes


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_preset(experiment: str, tmp_path: Path) -> None:
    cfg = compose(tmp_path, [f"experiment={experiment}"])
    pool = build_pool(cfg)
    if build_suite(cfg) is None:  # as run() requires
        assert type(pool).__name__ == "CheckpointPool", "eval=none only applies to checkpoint pools"
    build_loggers(cfg)
    for where, node in method_nodes(cfg).items():
        try:
            build_method(node)
        except Exception as e:
            raise AssertionError(f"experiment={experiment}: {where}: {type(e).__name__}: {e}") from e


@pytest.mark.parametrize("method", METHODS)
def test_method_preset(method: str, tmp_path: Path) -> None:
    cfg = compose(tmp_path, [f"method={method}"])
    assert cfg.method.name == method
    build_method(cfg.method)


@pytest.mark.parametrize("model", MODELS)
def test_model_preset(model: str, tmp_path: Path) -> None:
    build_pool(compose(tmp_path, [f"model={model}"]))


@pytest.mark.parametrize("eval_", EVALS)
def test_eval_preset(eval_: str, tmp_path: Path) -> None:
    cfg = compose(tmp_path, [f"eval={eval_}"])
    suite = build_suite(cfg)
    assert (suite is None) == (eval_ == "none")
