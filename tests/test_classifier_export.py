"""A merged classifier pool's per-task exports (``merged_model/classifiers/<task>``) load with transformers alone
(``AutoModelForSequenceClassification``, ``pipeline``) and score exactly as mergelab scores the merged model; with
``model.export_classifiers=false`` they are left out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

from mergelab.provenance.recipe import CARD_FILE, RECIPE_FILE
from mergelab.run import build, run
from mergelab.text.pool import CLASSIFIERS_DIR, HEADS_FILE, load_merged
from tests.conftest import make_cfg

TASKS = ["tweet_sentiment", "food_review"]  # the tasks of conftest's TINY overrides


@pytest.fixture(scope="module")
def merged_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny task-arithmetic run through the app that saves its merged model."""
    out = tmp_path_factory.mktemp("export_run")
    run(make_cfg(out, ["method=task_arithmetic", "save_merged=true"]))
    return out


def test_merged_dir_holds_one_classifier_per_task_beside_the_backbone(merged_run: Path) -> None:
    merged = merged_run / "merged_model"
    assert sorted(p.name for p in (merged / CLASSIFIERS_DIR).iterdir()) == sorted(TASKS)
    for task in TASKS:
        files = {p.name for p in (merged / CLASSIFIERS_DIR / task).iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= files, files
    # The multi-task layout is unchanged: load_merged still rebuilds every head.
    assert sorted(load_merged(merged).task_models) == sorted(TASKS)
    assert not list(merged_run.glob(".tmp-*")), "the dir was not written in place"


@pytest.mark.parametrize("task", TASKS)
def test_exported_classifier_scores_as_mergelab(merged_run: Path, task: str) -> None:
    merged = merged_run / "merged_model"
    export = merged / CLASSIFIERS_DIR / task
    suite = instantiate(make_cfg(merged_run).eval, _convert_="all")
    labels = suite.tasks[task].labels
    test = suite.eval_dataset(task, "test")  # the examples the run scored

    # Same logits as mergelab's multi-task model on a few test texts (padded together, as mergelab batches them).
    texts = list(test["text"][:6])
    tok = AutoTokenizer.from_pretrained(export)
    batch = tok(texts, padding=True, truncation=True, max_length=suite.max_length, return_tensors="pt")
    with torch.no_grad():
        expected = load_merged(merged).eval()(task, batch)
        model = AutoModelForSequenceClassification.from_pretrained(export).eval()
        logits = model(**batch).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert model.config.id2label == dict(enumerate(labels))
    assert model.config.label2id == {name: i for i, name in enumerate(labels)}

    # A pipeline (one text at a time, no padding) names the task's labels with mergelab's probabilities.
    clf = pipeline("text-classification", model=str(export), device="cpu")
    out = clf(texts, top_k=None, truncation=True, max_length=suite.max_length)
    probs = expected.softmax(-1)
    for row, p in zip(out, probs, strict=True):
        assert {r["label"]: r["score"] for r in row} == pytest.approx(
            dict(zip(labels, p.tolist(), strict=True)), abs=1e-5
        )
        assert row[0]["label"] == labels[int(p.argmax())]

    # Over the whole scored split, the pipeline's top labels give the accuracy metrics.json reports for the merge.
    top = clf(list(test["text"]), truncation=True, max_length=suite.max_length)
    acc = sum(r["label"] == labels[y] for r, y in zip(top, test["label"], strict=True)) / len(test)
    metrics = json.loads((merged_run / "metrics.json").read_text())
    assert acc == pytest.approx(metrics["rows"]["task_arithmetic"]["scores"][task]["acc"], abs=1e-6)


def test_export_classifiers_false_saves_the_merged_model_without_them(tmp_path: Path) -> None:
    run(make_cfg(tmp_path, ["method=task_arithmetic", "save_merged=true", "model.export_classifiers=false"]))
    merged = tmp_path / "merged_model"
    assert not (merged / CLASSIFIERS_DIR).exists()
    files = {p.name for p in merged.iterdir()}
    assert {"config.json", "model.safetensors", HEADS_FILE, RECIPE_FILE, CARD_FILE} <= files, files
    assert sorted(load_merged(merged).task_models) == sorted(TASKS)  # the multi-task model is all there
    recipe = json.loads((merged / RECIPE_FILE).read_text())
    assert recipe["config"]["model"]["export_classifiers"] is False  # the choice is recorded with the merge
    for name in (RECIPE_FILE, CARD_FILE):  # and nothing points at the dirs that were not written
        assert f"{CLASSIFIERS_DIR}/" not in (merged / name).read_text(), name


def test_export_classifiers_must_be_a_boolean(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"model.export_classifiers must be true or false, got 'sometimes'"):
        build(make_cfg(tmp_path, ["model.export_classifiers=sometimes"]).model)
