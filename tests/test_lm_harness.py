"""The lm-eval evaluator: scores against by-hand computations with the real SmolLM2, config defaults, refusals, runs.

Everything is offline: the tasks are those of data/lm_harness (local parquet files); the paper's hub tasks are only
resolved by name (never downloaded).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergelab.causal_lm.lm_harness import LOCAL_TASKS_DIR, PAPER_TASKS, LMHarnessSuite
from mergelab.causal_lm.pool import convert_gguf
from mergelab.cli import ROOT_DIR, smollm2_dir
from mergelab.run import run
from tests.conftest import make_cfg
from tests.test_causal_lm import greedy_alone

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SENTIMENTS = ["negative", "neutral", "positive"]
LIMIT = 8
RUN = [
    "model=smollm2",
    "eval=lm_harness",
    "method=metagpt",
    "eval.tasks=[mergelab_sentiment,mergelab_austen_names]",
    "eval.limit=4",
    "model.expert_suite.tasks=[sentiment_words,austen_names]",
    "model.finetune.max_train_examples=2",
    "model.finetune.batch_size=2",
    "logger=none",
    "plot=false",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
]


@pytest.fixture(scope="module")
def smol_dir(cache_dir: Path) -> Path:
    """SmolLM2 converted from its GGUF into the session cache."""
    return convert_gguf(smollm2_dir(), GGUF, cache_dir)


@pytest.fixture(scope="module")
def smol(smol_dir: Path) -> tuple[Any, Any]:
    return AutoModelForCausalLM.from_pretrained(smol_dir).eval(), AutoTokenizer.from_pretrained(smol_dir)


def test_paper_defaults_are_the_config(tmp_path: Path) -> None:
    ev = make_cfg(tmp_path, ["model=smollm2", "eval=lm_harness"], tiny=False).eval
    # WinoGrande 0-shot, AGIEval 5, GSM8K 4, MATH 4 (the harness's minerva_math), MBPP 3, HumanEval 0.
    expected = {"winogrande": 0, "agieval": 5, "gsm8k": 4, "minerva_math": 4, "mbpp": 3, "humaneval": 0}
    assert list(ev.tasks) == list(expected) == list(PAPER_TASKS)
    assert {t: ev.num_fewshot[t] for t in ev.tasks} == expected == PAPER_TASKS
    # Nor. Avg's matching experts: general for WinoGrande/AGIEval, math for GSM8K/MATH, code for MBPP/HumanEval.
    assert [ev.experts[t] for t in ev.tasks] == ["general", "general", "math", "math", "code", "code"]
    assert ev.allow_code_execution is False
    suite = LMHarnessSuite(**{k: v for k, v in ev.items() if k != "_target_"} | {"allow_code_execution": True})
    assert suite.fewshot == expected
    assert [t for t in suite.task_names if suite.executes_code(t)] == ["mbpp", "humaneval"]


def test_code_tasks_refuse_without_the_opt_in(tmp_path: Path) -> None:
    for tasks in (["gsm8k", "mbpp"], ["humaneval"]):
        with pytest.raises(ValueError, match=re.escape("eval.allow_code_execution=true")):
            LMHarnessSuite("h", tasks)
    # The CLI refuses the paper's defaults before loading any model or writing anything.
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"\['mbpp', 'humaneval'\] execute model-generated code"):
        run(make_cfg(out, ["model=smollm2", "eval=lm_harness", "logger=none"], tiny=False))
    assert not out.exists()


def test_unknown_task_errors_clearly() -> None:
    with pytest.raises(ValueError, match=r"unknown lm-eval task 'winogrand'.*did you mean \[.*'winogrande'"):
        LMHarnessSuite("h", ["mergelab_sentiment", "winogrand"])
    with pytest.raises(ValueError, match=r"eval.num_fewshot.gsm8k: must be an integer >= 0"):
        LMHarnessSuite("h", ["gsm8k"], num_fewshot={"gsm8k": -1})
    with pytest.raises(FileNotFoundError, match=r"eval.include_path: /nonexistent is not a directory"):
        LMHarnessSuite("h", ["gsm8k"], include_path="/nonexistent")


@torch.inference_mode()
def continuation_logprob(model: Any, context: list[int], continuation: list[int]) -> float:
    """Summed log-probability of ``continuation`` after ``context``: one unpadded forward pass."""
    logp = model(torch.tensor([context + continuation])).logits[0].float().log_softmax(-1)
    return float(sum(logp[len(context) - 1 + j, t] for j, t in enumerate(continuation)))


def test_multiple_choice_accuracy_equals_by_hand_loglikelihood_argmax(smol: tuple[Any, Any]) -> None:
    model, tok = smol
    rows = pd.read_parquet(ROOT_DIR / "data/generative/sentiment_words/test.parquet").head(LIMIT)
    hits, hits_norm = [], []
    for text, answer in zip(rows.text, rows.answer, strict=True):
        context = tok(f"Tweet: {text}\nSentiment (negative, neutral or positive):")["input_ids"]
        logps = []
        for choice in SENTIMENTS:
            cont = tok(" " + choice)["input_ids"]
            assert tok(f"Tweet: {text}\nSentiment (negative, neutral or positive): {choice}")["input_ids"] == [
                *context,
                *cont,
            ]
            logps.append(continuation_logprob(model, context, cont))
        hits.append(SENTIMENTS[max(range(3), key=lambda i: logps[i])] == answer)
        # acc_norm: log-likelihood per byte of the continuation (" negative" ...).
        hits_norm.append(SENTIMENTS[max(range(3), key=lambda i: logps[i] / len(" " + SENTIMENTS[i]))] == answer)
    suite = LMHarnessSuite("h", ["mergelab_sentiment"], num_fewshot={"mergelab_sentiment": 0}, limit=LIMIT)
    scores = suite.score(model, tok)
    assert 0 < sum(hits) < LIMIT  # the comparison can tell right from wrong answers
    assert scores == {
        "mergelab_sentiment": {
            "acc": pytest.approx(sum(hits) / LIMIT),
            "acc,none": pytest.approx(sum(hits) / LIMIT),
            "acc_norm,none": pytest.approx(sum(hits_norm) / LIMIT),
        }
    }


def test_generation_exact_match_equals_by_hand_greedy_decoding(smol: tuple[Any, Any]) -> None:
    model, tok = smol
    n = 6
    rows = pd.read_parquet(ROOT_DIR / "data/generative/austen_names/test.parquet").head(n)
    hits = []
    for text, answer in zip(rows.text, rows.answer, strict=True):
        out = tok.decode(greedy_alone(model, tok(text)["input_ids"], 6, tok.eos_token_id))
        out = re.split(r"[\n,.;:!?\"']", out)[0]  # the task's stop strings
        words = re.findall("[A-Za-z]+", out)
        hits.append(bool(words) and words[0] == answer)
    suite = LMHarnessSuite("h", ["mergelab_austen_names"], limit=n)
    assert suite.fewshot == {"mergelab_austen_names": None}  # not in num_fewshot: the task's default
    assert suite.score(model, tok) == {
        "mergelab_austen_names": {"acc": pytest.approx(sum(hits) / n), "exact_match,first-word": sum(hits) / n}
    }
    assert sum(hits) > 0


def test_code_execution_opt_in_reaches_the_harness(tmp_path: Path, smol: tuple[Any, Any]) -> None:
    """A task marked unsafe_code (a local one, so it runs offline) is refused, then runs with the opt-in."""
    (tmp_path / "unsafe.yaml").write_text(
        f"include: {LOCAL_TASKS_DIR / 'mergelab_sentiment.yaml'}\ntask: unsafe_sentiment\nunsafe_code: true\n"
    )
    (tmp_path / "group.yaml").write_text("group: unsafe_group\ntask: [mergelab_austen_names, unsafe_sentiment]\n")
    for task in ("unsafe_sentiment", "unsafe_group"):  # a group holding an unsafe task is refused too
        with pytest.raises(ValueError, match=rf"\['{task}'\] execute model-generated code.*allow_code"):
            LMHarnessSuite("h", [task], include_path=str(tmp_path))
    suite = LMHarnessSuite("h", ["unsafe_sentiment"], include_path=str(tmp_path), limit=2, allow_code_execution=True)
    old = os.environ.pop("HF_ALLOW_CODE_EVAL", None)
    try:
        scores = suite.score(*smol)  # lm-eval itself refuses unsafe tasks unless confirm_run_unsafe_code is passed
        assert os.environ["HF_ALLOW_CODE_EVAL"] == "1"
    finally:
        os.environ.pop("HF_ALLOW_CODE_EVAL", None)
        if old is not None:
            os.environ["HF_ALLOW_CODE_EVAL"] = old
    assert set(scores["unsafe_sentiment"]) == {"acc", "acc,none", "acc_norm,none"}


def test_pool_needs_experts_for_harness_tasks(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"set model.experts .* or model.expert_suite"):
        run(make_cfg(out, [*RUN, "model.expert_suite=null"], tiny=False))
    with pytest.raises(ValueError, match=r"task 'mergelab_sentiment' is scored against expert 'general'"):
        run(make_cfg(out, [*RUN, "eval.experts.mergelab_sentiment=general"], tiny=False))
    assert not out.exists()


@pytest.fixture(scope="module")
def harness_run(tmp_path_factory: pytest.TempPathFactory, smol_dir: Path) -> Path:
    """MetaGPT on SmolLM2 and two experts fine-tuned for one step, scored by lm-eval on 4 examples per local task."""
    out = tmp_path_factory.mktemp("harness_run")
    objective = run(make_cfg(out, [*RUN, "save_merged=true"], tiny=False))
    assert 0.0 <= objective <= 1.0
    return out


def test_cli_scores_pretrained_experts_and_merge(harness_run: Path, smol: tuple[Any, Any]) -> None:
    metrics = json.loads((harness_run / "metrics.json").read_text())
    tasks = ["mergelab_sentiment", "mergelab_austen_names"]
    assert metrics["tasks"] == tasks
    assert metrics["expert_of"] == {"mergelab_sentiment": "sentiment_words", "mergelab_austen_names": "austen_names"}
    assert list(metrics["rows"]) == ["pretrained", "experts", "metagpt"]
    assert set(metrics["rows"]["metagpt"]["method_report"]) == {"lambda/sentiment_words", "lambda/austen_names"}
    for row in metrics["rows"].values():
        assert row["scores"]["mergelab_sentiment"]["acc"] == row["scores"]["mergelab_sentiment"]["acc,none"]
        assert (
            row["scores"]["mergelab_austen_names"]["acc"]
            == row["scores"]["mergelab_austen_names"]["exact_match,first-word"]
        )
    # Each expert row entry is that expert's own checkpoint scored by lm-eval; the merged row is the saved merge's.
    suite = LMHarnessSuite("h", tasks, limit=4)
    tok = smol[1]
    for task, expert in metrics["expert_of"].items():
        lm = AutoModelForCausalLM.from_pretrained(metrics["experts"][expert]).eval()
        assert suite.score(lm, tok, [task])[task] == pytest.approx(metrics["rows"]["experts"]["scores"][task])
    merged = AutoModelForCausalLM.from_pretrained(harness_run / "merged_model").eval()
    assert suite.score(merged, tok) == {t: pytest.approx(s) for t, s in metrics["rows"]["metagpt"]["scores"].items()}
    table = (harness_run / "results.md").read_text()
    assert "| Method | mergelab_sentiment | mergelab_austen_names |" in table


def test_streaming_pool_scores_its_merged_dir(harness_run: Path, tmp_path: Path, smol: tuple[Any, Any]) -> None:
    """A checkpoint pool streams the merge to disk, then lm-eval scores that dir: as the in-memory merge scores."""
    metrics = json.loads((harness_run / "metrics.json").read_text())
    experts = "{" + ",".join(f"{e}:'{p}'" for e, p in metrics["experts"].items()) + "}"
    pretrained = Path(metrics["experts"]["sentiment_words"]).parent.parent / "pretrained"
    (base,) = pretrained.iterdir()
    out = tmp_path / "run"
    cfg = make_cfg(
        out,
        [
            "model=checkpoints",
            f"model.pretrained={base}",
            f"model.experts={experts}",
            "method=metagpt",
            "eval=lm_harness",
            "eval.tasks=[mergelab_sentiment,mergelab_austen_names]",
            "eval.limit=4",
            "logger=none",
            "trainer.accelerator=cpu",
            "trainer.enable_progress_bar=false",
        ],
        tiny=False,
    )
    objective = run(cfg)
    streamed = json.loads((out / "metrics.json").read_text())
    assert streamed["suite"] == "lm_harness"
    assert streamed["scores"] == {t: pytest.approx(s) for t, s in metrics["rows"]["metagpt"]["scores"].items()}
    assert objective == pytest.approx(streamed["avg_acc"])
    # The evaluated-run layout as well, which is what mergelab-report reads.
    assert streamed["rows"]["metagpt"]["scores"] == streamed["scores"]
    assert streamed["rows"]["metagpt"]["avg_acc"] == pytest.approx(streamed["avg_acc"])
    assert streamed["tasks"] == ["mergelab_sentiment", "mergelab_austen_names"]
    from mergelab.reports.paper.runs import load_run

    assert set(load_run(out).rows) == {"metagpt"}
