"""Bad input fails with a clear message naming the culprit, before any output is written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from hydra.errors import MissingConfigException
from omegaconf import DictConfig, OmegaConf, open_dict
from safetensors.torch import load_file, save_file
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
)

from mergelab.config_types import constructor_hints
from mergelab.run import build, run
from tests.conftest import CONFIG_DIR, TINY, make_cfg

DATA = Path(__file__).resolve().parents[1] / "data" / "embedded"


def assert_nothing_written(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


def tiny_expert_dirs(tmp_path: Path) -> dict[str, str]:
    """The session's real tiny experts (built by a first run if needed), copied so tests can corrupt them."""
    out = tmp_path / "build"
    run(make_cfg(out, ["method=weight_averaging"]))
    experts = json.loads((out / "metrics.json").read_text())["experts"]
    copies = {}
    for task, path in experts.items():
        dst = tmp_path / f"copy-{task}"
        shutil.copytree(path, dst)
        copies[task] = str(dst)
    return copies


def local_pool(experts: dict[str, str]) -> list[str]:
    mapping = "{" + ",".join(f"{t}:'{p}'" for t, p in experts.items()) + "}"
    return ["model=local_experts", "model.pretrained=${mergelab.minilm:}", f"model.experts={mapping}"]


def assert_pool_rejected(tmp_path: Path, experts: dict[str, str], match: str, extra: tuple[str, ...] = ()) -> None:
    """Running on this pool fails with ``match`` and leaves the output dir empty."""
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        run(make_cfg(out, [*local_pool(experts), *extra]))
    assert_nothing_written(out)


def test_missing_expert_dir(tmp_path: Path) -> None:
    out = tmp_path / "out"
    experts = {"tweet_sentiment": str(tmp_path / "nope"), "food_review": str(tmp_path / "nope2")}
    with pytest.raises(FileNotFoundError, match=r"expert 'tweet_sentiment' dir '.*nope' does not exist"):
        run(make_cfg(out, local_pool(experts)))
    assert_nothing_written(out)


def test_dir_without_config_is_not_a_model(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=r"pretrained model dir '.*empty' has no config.json"):
        run(make_cfg(out, ["model=local_experts", f"model.pretrained={empty}", "model.experts=null"]))
    assert_nothing_written(out)


def test_expert_with_other_architecture(tmp_path: Path) -> None:
    experts = tiny_expert_dirs(tmp_path)
    # A random-weight DistilBERT classifier stands in for "an expert of another model" (plumbing only).
    other = DistilBertForSequenceClassification(
        DistilBertConfig(vocab_size=30522, dim=32, n_layers=1, n_heads=2, hidden_dim=64, num_labels=2)
    )
    other.save_pretrained(tmp_path / "distil")
    experts["food_review"] = str(tmp_path / "distil")
    assert_pool_rejected(tmp_path, experts, r"expert 'food_review'.*architecture 'distilbert' differs.*'bert'")


def test_expert_with_other_shapes(tmp_path: Path) -> None:
    experts = tiny_expert_dirs(tmp_path)
    cfg = BertConfig(
        vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=512
    )
    cfg.num_labels = 2
    BertForSequenceClassification(cfg).save_pretrained(tmp_path / "narrow")
    experts["food_review"] = str(tmp_path / "narrow")
    assert_pool_rejected(tmp_path, experts, r"expert 'food_review'.*parameter '.*intermediate.dense.weight' has shape")


def test_nan_in_checkpoint(tmp_path: Path) -> None:
    experts = tiny_expert_dirs(tmp_path)
    weights = Path(experts["tweet_sentiment"]) / "model.safetensors"
    state = load_file(str(weights))
    key = next(k for k in state if k.endswith("attention.self.query.weight"))
    state[key][0, 0] = float("nan")
    state[key][1, 1] = float("inf")
    save_file(state, str(weights), metadata={"format": "pt"})
    assert_pool_rejected(tmp_path, experts, rf"expert 'tweet_sentiment'.*'{key}' contains 2 NaN/inf")


def test_unknown_method_and_suite_names() -> None:
    with pytest.raises(MissingConfigException, match="method/magic"):
        make_cfg(Path("/nonexistent"), ["method=magic"])
    with pytest.raises(MissingConfigException, match="eval/nosuchsuite"):
        make_cfg(Path("/nonexistent"), ["eval=nosuchsuite"])


def test_unknown_method_on_the_command_line(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "mergelab.cli", *TINY, "method=magic", f"hydra.run.dir={tmp_path / 'out'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), timeout=300)
    assert proc.returncode != 0
    assert "Could not find 'method/magic'" in proc.stderr
    assert "task_arithmetic" in proc.stderr  # the available options are listed
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["method=ties", "method.k=0"], r"method 'ties': method option 'k' must be in \(0.0, 100.0\], got 0"),
        (["method=ties", "method.k=150"], r"option 'k' must be in \(0.0, 100.0\], got 150"),
        (["method=dare", "method.p=1.0"], r"method 'dare': method option 'p' must be in \[0.0, 1.0\), got 1.0"),
        (["method=dare", "method.p=-0.2"], r"option 'p' must be in \[0.0, 1.0\)"),
        (["method=ties", "tune=true", "method.grid.scaling=[0.3,-1]"], r"option 'scaling'.*got -1"),
    ],
)
def test_out_of_range_hyperparameters(tmp_path: Path, overrides: list[str], match: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        run(make_cfg(out, overrides))
    assert_nothing_written(out)


def make_suite_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "suite"
    dst.mkdir()
    shutil.copy(DATA / "tasks.yaml", dst / "tasks.yaml")
    for task in ("tweet_sentiment", "food_review"):
        shutil.copytree(DATA / task, dst / task)
    return dst


def test_dataset_label_outside_the_head(tmp_path: Path) -> None:
    suite = make_suite_copy(tmp_path)
    test_file = suite / "food_review" / "test.parquet"
    df = pd.read_parquet(test_file)
    df.loc[3, "label"] = 7
    df.to_parquet(test_file)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"task 'food_review': .*test.parquet has label id\(s\) \[7\] outside the 2"):
        run(make_cfg(out, [f"eval.data_dir={suite}"]))
    assert_nothing_written(out)


def test_expert_head_does_not_know_the_task_labels(tmp_path: Path) -> None:
    experts = tiny_expert_dirs(tmp_path)
    suite = make_suite_copy(tmp_path)
    meta = yaml.safe_load((suite / "tasks.yaml").read_text())
    meta["tasks"]["food_review"]["labels"] = ["great", "other", "terrible"]
    (suite / "tasks.yaml").write_text(yaml.safe_dump(meta))
    data = (f"eval.data_dir={suite}",)
    assert_pool_rejected(tmp_path, experts, r"'food_review'.*head has 2 outputs but task 'food_review' has 3", data)
    meta["tasks"]["food_review"]["labels"] = ["bad", "good"]
    (suite / "tasks.yaml").write_text(yaml.safe_dump(meta))
    assert_pool_rejected(tmp_path, experts, r"head labels \['great', 'other'\] do not match task 'food_review'", data)


def test_unknown_task_in_suite(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['imdb'\]"):
        run(make_cfg(tmp_path / "out", ["eval.tasks=[tweet_sentiment,imdb]"]))


def test_classification_pool_needs_a_suite(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="eval=none only applies to checkpoint pools"):
        run(make_cfg(tmp_path / "out", ["eval=none", "logger=none"], tiny=False))
    assert_nothing_written(tmp_path / "out")


def numeric_options(group: str, name: str, tmp_path: Path) -> tuple[DictConfig, list[str]]:
    """The composed ``group=name`` config and its number-valued keys that its constructor annotates."""
    cfg = make_cfg(tmp_path, [f"{group}={name}"], tiny=False)
    node = OmegaConf.to_container(cfg[group], resolve=False)
    hints = constructor_hints(node["_target_"])
    keys = [k for k, v in node.items() if k in hints and isinstance(v, int | float) and not isinstance(v, bool)]
    return cfg, keys


@pytest.mark.parametrize(
    ("group", "name"),
    [("model", p.stem) for p in sorted((CONFIG_DIR / "model").glob("*.yaml"))]
    + [("eval", p.stem) for p in sorted((CONFIG_DIR / "eval").glob("*.yaml")) if p.stem != "none"],
)
def test_a_word_for_a_number_is_named_before_the_component_is_built(group: str, name: str, tmp_path: Path) -> None:
    """``model.chunk_elems=abc`` or ``eval.batch_size=abc`` (a mistyped override) is refused naming the key, for
    every pool and suite config: the check reads the constructor's annotations, not a list kept by hand."""
    cfg, keys = numeric_options(group, name, tmp_path)
    for key in keys:
        bad = cfg.copy()
        with open_dict(bad):
            bad[group][key] = "abc"
        with pytest.raises(ValueError, match=rf"^{group}\.{key} must be a number, got 'abc'$"):
            build(bad[group], group=group)


def test_every_pool_and_suite_config_has_a_checked_number(tmp_path: Path) -> None:
    """The table above is not vacuous: the configs with numbers each have at least one checked."""
    assert numeric_options("model", "checkpoints", tmp_path)[1] == ["max_shard_bytes", "chunk_elems"]
    assert "batch_size" in numeric_options("eval", "embedded", tmp_path)[1]


def test_a_word_for_the_seed_is_refused_before_the_run_dir_is_claimed(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path / "run", ["seed=abc"])
    with pytest.raises(ValueError, match="seed must be a whole number, got 'abc'"):
        run(cfg)
    assert not (tmp_path / "run").exists()
