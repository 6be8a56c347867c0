"""Evaluation: the multi-task model reproduces each expert, and the metrics match a direct computation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from transformers import AutoModelForSequenceClassification

from mergelab.text.model import evaluate
from mergelab.text.pool import ClassifierPool
from mergelab.text.suite import TextClassificationSuite, pad_batch
from tests.conftest import make_cfg

TRAINER = {"accelerator": "cpu", "enable_progress_bar": False}


@pytest.fixture(scope="module")
def pool_and_suite(tmp_path_factory: pytest.TempPathFactory) -> tuple[ClassifierPool, TextClassificationSuite]:
    cfg = make_cfg(tmp_path_factory.mktemp("eval"))
    suite = instantiate(cfg.eval, _convert_="all")
    pool = instantiate(cfg.model, _convert_="all")
    pool.setup(suite, TRAINER)
    return pool, suite


def macro_f1(y: np.ndarray, p: np.ndarray, n: int) -> float:
    f1s = []
    for c in range(n):
        tp = np.sum((p == c) & (y == c))
        fp = np.sum((p == c) & (y != c))
        fn = np.sum((p != c) & (y == c))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s))


def test_scores_match_a_direct_computation(pool_and_suite: tuple[ClassifierPool, TextClassificationSuite]) -> None:
    pool, suite = pool_and_suite
    task = "tweet_sentiment"
    scores = evaluate(pool.expert_classifier(task), suite, "test", pool.tokenizer, TRAINER)[task]
    # The expert as transformers loads it, run example by example on the unsorted, unpadded texts.
    expert = AutoModelForSequenceClassification.from_pretrained(pool.resolved[task]).eval()
    ds = suite.eval_dataset(task, "test")
    preds = []
    with torch.inference_mode():
        for text in ds["text"]:
            enc = pool.tokenizer(text, truncation=True, max_length=suite.max_length, return_tensors="pt")
            preds.append(int(expert(**enc).logits.argmax(-1)))
    y, p = np.array(ds["label"]), np.array(preds)
    assert scores["acc"] == pytest.approx(float(np.mean(y == p)), abs=1e-6)
    assert scores["f1"] == pytest.approx(macro_f1(y, p, 3), abs=1e-5)


def test_padding_and_sorting_do_not_change_logits(
    pool_and_suite: tuple[ClassifierPool, TextClassificationSuite],
) -> None:
    pool, suite = pool_and_suite
    clf = pool.expert_classifier("food_review").eval()
    ds = suite.eval_dataset("food_review", "test").select(range(6))
    rows = suite.tokenize(ds, pool.tokenizer)
    with torch.inference_mode():
        batched = clf("food_review", pad_batch(rows, pool.tokenizer.pad_token_id))
        single = torch.cat([clf("food_review", pad_batch([r], pool.tokenizer.pad_token_id)) for r in rows])
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-4)


def test_evaluation_batches_are_tokenized_once_per_split_and_subset(
    pool_and_suite: tuple[ClassifierPool, TextClassificationSuite], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every model of a run is scored on the same examples: they are tokenized once per (task, split, subset size),
    and the cached batches are those :meth:`dataloader` builds from :meth:`eval_dataset`."""
    pool, suite = pool_and_suite
    suite._eval_rows.clear()
    calls = []
    tokenize = suite.tokenize
    monkeypatch.setattr(suite, "tokenize", lambda ds, tok: calls.append(len(ds)) or tokenize(ds, tok))

    def batches(loader: torch.utils.data.DataLoader) -> list[dict[str, list]]:
        return [{k: v.tolist() for k, v in b.items()} for b in loader]

    first = batches(suite.eval_loader("food_review", "validation", pool.tokenizer))
    again = batches(suite.eval_loader("food_review", "validation", pool.tokenizer))
    assert first == again and len(calls) == 1
    with suite.scoring_subset(5):  # another subset: its own examples
        subset = batches(suite.eval_loader("food_review", "validation", pool.tokenizer))
    assert sum(len(b["labels"]) for b in subset) == 5 and len(calls) == 2
    assert batches(suite.eval_loader("food_review", "validation", pool.tokenizer)) == first and len(calls) == 2
    direct = batches(suite.dataloader(suite.eval_dataset("food_review", "validation"), pool.tokenizer))
    assert direct == first


def test_pretrained_classifier_has_pretrained_backbone(
    pool_and_suite: tuple[ClassifierPool, TextClassificationSuite],
) -> None:
    pool, _ = pool_and_suite
    clf = pool.classifier()
    state = clf.backbone.state_dict()
    for k, v in pool.pretrained_state().items():
        assert torch.equal(state[k], v)
    # ...and each task's head is the expert's own.
    expert = AutoModelForSequenceClassification.from_pretrained(pool.resolved["food_review"])
    torch.testing.assert_close(clf.task_models["food_review"].classifier.weight, expert.classifier.weight)


def test_mergeable_respects_exclude(
    tmp_path: Path, pool_and_suite: tuple[ClassifierPool, TextClassificationSuite]
) -> None:
    pool, _ = pool_and_suite
    cfg = make_cfg(tmp_path, ["model.exclude=['^embeddings\\.']"])
    excl = instantiate(cfg.model, _convert_="all")
    names = set(excl.mergeable(pool.pretrained_state()))
    assert names and not any(n.startswith("embeddings.") for n in names)
    assert any(n.startswith("embeddings.") for n in pool.mergeable(pool.pretrained_state()))
