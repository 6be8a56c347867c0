"""Every cache is keyed on everything that determines its value: change any one input and the cache misses.

Caches: reference scores (pretrained and expert rows), built experts, statistics (Fisher, RegMean), the text
suite's tokenized evaluation rows, AWD's in-process fits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from mergelab.methods import task_statistics
from mergelab.run import cached_scores, reference_score_key
from mergelab.suites import scoring as ev
from mergelab.text.suite import TextClassificationSuite
from mergelab.training.experts import expert_spec, spec_key

DATA = Path(__file__).resolve().parents[1] / "data" / "embedded"


def suite(**kwargs: Any) -> TextClassificationSuite:
    options = {"name": "embedded", "data_dir": str(DATA), "tasks": ["tweet_sentiment"], **kwargs}
    return TextClassificationSuite(**options)


class Pool(SimpleNamespace):
    metric_names = ("acc", "f1")

    def reference_key(self, task: str | None = None) -> dict[str, Any]:
        return {"model": self.model, **({"task": task} if task else {})}


BASE = {"split": "test", "trainer": {"precision": "32-true"}, "task": None, "columns": None}

# One change of each input of the reference scores: each must give another key.
CHANGES = {
    "subset": lambda a: a["suite"].__setattr__("max_eval_examples", 50),
    "seed": lambda a: a["suite"].__setattr__("seed", 1),
    "max_length": lambda a: a["suite"].__setattr__("max_length", 32),
    "batch_size": lambda a: a["suite"].__setattr__("batch_size", 8),
    "split": lambda a: a.__setitem__("split", "validation"),
    "precision": lambda a: a.__setitem__("trainer", {"precision": "bf16-mixed"}),
    "metric set": lambda a: a["pool"].__setattr__("metric_names", ("acc", "f1", "mcc")),
    "model": lambda a: a["pool"].__setattr__("model", "another"),
    "task": lambda a: a.__setitem__("task", "tweet_sentiment"),
    "columns": lambda a: a.update(task="tweet_sentiment", columns=["a", "b"]),
}


def key(args: dict[str, Any]) -> str:
    s = args["suite"]
    s.__dict__.pop("fingerprint", None)  # a cached_property: recomputed from the changed attributes
    parts = reference_score_key(s, args["pool"], args["split"], args["trainer"], args["task"], args["columns"])
    return json.dumps(parts, sort_keys=True)


@pytest.mark.parametrize("change", list(CHANGES))
def test_reference_score_key_changes_with_each_input(change: str) -> None:
    args = {**BASE, "suite": suite(), "pool": Pool(model="m")}
    before = key(args)
    CHANGES[change](args)
    assert key(args) != before


def test_reference_score_key_changes_with_the_scorer_version(monkeypatch: pytest.MonkeyPatch) -> None:
    args = {**BASE, "suite": suite(), "pool": Pool(model="m")}
    before = key(args)
    monkeypatch.setattr(ev, "SCORER_VERSION", ev.SCORER_VERSION + 1)
    assert key(args) != before


def test_reference_score_key_changes_with_the_data(tmp_path: Path) -> None:
    data = tmp_path / "embedded"
    shutil.copytree(DATA, data)
    a = reference_score_key(suite(data_dir=str(data)), Pool(model="m"), "test", {})
    test_file = next((data / "tweet_sentiment").glob("test*"))
    test_file.write_bytes(test_file.read_bytes().replace(b"e", b"a", 1))
    b = reference_score_key(suite(data_dir=str(data)), Pool(model="m"), "test", {})
    assert a["suite"] != b["suite"]


def test_cached_scores_misses_stale_or_foreign_entries(tmp_path: Path) -> None:
    parts = {"suite": "s", "model": "m"}
    calls: list[int] = []

    def compute() -> dict[str, dict[str, float]]:
        calls.append(1)
        return {"t": {"acc": 0.5, "f1": 0.4}}

    assert cached_scores(tmp_path, parts, compute, ("acc", "f1")) == {"t": {"acc": 0.5, "f1": 0.4}}
    assert cached_scores(tmp_path, parts, compute, ("acc", "f1")) and len(calls) == 1  # a hit
    (entry,) = (tmp_path / "scores").iterdir()
    # An entry written before a metric existed (the suite gained one): a miss, computed again.
    entry.write_text(json.dumps({"key": parts, "scores": {"t": {"acc": 0.9}}}))
    assert cached_scores(tmp_path, parts, compute, ("acc", "f1"))["t"]["f1"] == 0.4 and len(calls) == 2
    # An entry recording other inputs (a hash collision, an edited file): a miss.
    entry.write_text(json.dumps({"key": {**parts, "model": "x"}, "scores": {"t": {"acc": 0.9, "f1": 0.9}}}))
    assert cached_scores(tmp_path, parts, compute, ("acc", "f1"))["t"]["acc"] == 0.5 and len(calls) == 3
    entry.write_text("{not json")  # damaged: a miss
    assert cached_scores(tmp_path, parts, compute, ("acc", "f1"))["t"]["acc"] == 0.5 and len(calls) == 4


def test_expert_key_changes_with_the_training_precision() -> None:
    s, ft = suite(), {"lr": 1e-4, "seed": 0}
    fp32 = spec_key(expert_spec("m", s, "tweet_sentiment", ft, {"precision": "32-true"}))
    assert fp32 == spec_key(expert_spec("m", s, "tweet_sentiment", ft, {}))  # the default: the existing key
    assert fp32 != spec_key(expert_spec("m", s, "tweet_sentiment", ft, {"precision": "bf16-mixed"}))
    assert fp32 != spec_key(expert_spec("m", s, "tweet_sentiment", {**ft, "seed": 1}, {}))
    assert fp32 != spec_key(expert_spec("m", suite(max_length=32), "tweet_sentiment", ft, {}))


class StatsPool:
    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir

    def task_data_key(self, task: str) -> dict[str, Any]:
        return {"expert": task, "data": "d"}


def test_statistics_cache_misses_on_options_and_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(task_statistics, "_OPENED", {})
    pool, calls = StatsPool(tmp_path), []

    def compute() -> dict[str, torch.Tensor]:
        calls.append(1)
        return {"w": torch.ones(2, 2)}

    task_statistics.cached_statistics(pool, "t", "regmean", {"batch": 8}, compute)
    task_statistics.cached_statistics(pool, "t", "regmean", {"batch": 8}, compute)
    assert len(calls) == 1
    task_statistics.cached_statistics(pool, "t", "regmean", {"batch": 16}, compute)
    assert len(calls) == 2
    monkeypatch.setattr(task_statistics, "STATISTICS_FORMAT", task_statistics.STATISTICS_FORMAT + 1)
    task_statistics.cached_statistics(pool, "t", "regmean", {"batch": 16}, compute)
    assert len(calls) == 3


def test_damaged_cached_statistics_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(task_statistics, "_OPENED", {})
    pool = StatsPool(tmp_path)
    task_statistics.cached_statistics(pool, "t", "fisher", {}, lambda: {"w": torch.ones(2, 2)})
    (built,) = (tmp_path / "statistics").iterdir()
    save_file({"w": torch.full((2, 2), float("nan"))}, str(next(built.glob("*.safetensors"))))
    monkeypatch.setattr(task_statistics, "_OPENED", {})  # a new process
    with pytest.raises(ValueError, match=rf"fisher statistics of task 't' \({built}\): tensor 'w' holds NaN"):
        task_statistics.cached_statistics(pool, "t", "fisher", {}, lambda: {"w": torch.ones(2, 2)})


def test_eval_rows_are_tokenized_again_when_truncation_changes() -> None:
    from transformers import AutoTokenizer

    from mergelab.cli import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    s = suite(max_eval_examples=8)
    long = max(len(b["input_ids"][0]) for b in s.eval_loader("tweet_sentiment", "test", tok))
    s.max_length = 8
    short = max(len(b["input_ids"][0]) for b in s.eval_loader("tweet_sentiment", "test", tok))
    assert long > 8 and short == 8


def test_awd_reuses_a_fit_only_under_the_same_trainer_settings() -> None:
    from mergelab.methods.awd import AWD
    from tests.test_loaded_artifacts import CPU, pool

    p = pool()
    first, same, other = (AWD(steps=2) for _ in range(3))
    first.prepare(p, CPU)
    same.prepare(p, CPU)
    other.prepare(p, {**CPU, "precision": "bf16-mixed"})
    assert same.fit is first.fit  # the grid's candidates share one fit
    assert other.fit is not first.fit
