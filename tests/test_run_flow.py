"""One pool interface, one run flow: a checkpoint pool is a ModelPool with declared capabilities, and every run
(in memory or streamed, scored or merge-only, tuned or not) goes through the same ``run`` and writes the same
``metrics.json`` schema."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mergelab.engine.streaming import stream_merge
from mergelab.io.reader import LazyCheckpoint
from mergelab.methods import TaskArithmetic
from mergelab.pools.base import CAPABILITIES, ModelPool, PoolCapabilityError
from mergelab.pools.checkpoint import CheckpointPool
from mergelab.reports.sweep import summarize
from mergelab.run import CANDIDATES_DIR, run
from tests.conftest import make_cfg

SRC = Path(__file__).resolve().parents[1] / "src" / "mergelab"

#: The top-level keys of every run's metrics.json, scored or not, in memory or streamed.
SCHEMA = {
    "suite",
    "report_split",
    "tune_split",
    "tasks",
    "experts",
    "rows",
    "objective",
    "timings",
    "precision",
    "overrides",
    "method",
    "params",
    "method_report",
    "scores",
    "avg_acc",
    "merged_model",
    "failed_rows",  # table rows whose method raised (empty when none did)
}


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens, no merges, BOS/EOS): what lm-eval needs of a tokenizer, offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<s>": len(vocab), "</s>": len(vocab) + 1})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def pool_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """A tiny Llama (byte vocabulary, with its tokenizer) and two experts: random weights plus noise."""
    root = tmp_path_factory.mktemp("flow_pool")
    tokenizer = byte_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        initializer_range=0.5,  # peaked next-token distributions, so that the merges' answers differ
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    dirs = {"base": root / "base", "e0": root / "e0", "e1": root / "e1"}
    for i, (name, path) in enumerate(dirs.items()):
        model = LlamaForCausalLM(cfg)
        g = torch.Generator().manual_seed(i)
        noise = 0.0 if name == "base" else 1.0
        model.load_state_dict(
            {k: v + noise * v.std() * torch.randn(v.shape, generator=g) for k, v in base.state_dict().items()}
        )
        model.save_pretrained(path, max_shard_size="200KB")
        tokenizer.save_pretrained(path)
    return dirs["base"], {"e0": dirs["e0"], "e1": dirs["e1"]}


def pool_overrides(pool_dirs: tuple[Path, dict[str, Path]]) -> list[str]:
    base, experts = pool_dirs
    spec = "{" + ",".join(f"{e}:'{p}'" for e, p in experts.items()) + "}"
    return ["model=checkpoints", f"model.pretrained={base}", f"model.experts={spec}", "logger=none"]


# ------------------------------------------------------------------------------------------- the interface


def test_checkpoint_pool_is_a_model_pool_with_declared_capabilities(pool_dirs: tuple[Path, dict[str, Path]]) -> None:
    base, experts = pool_dirs
    pool = CheckpointPool(str(base), {k: str(v) for k, v in experts.items()})
    assert isinstance(pool, ModelPool)
    flags = (pool.in_memory, pool.scorable, pool.needs_suite, pool.multi_process, pool.task_data)
    assert flags == (False, False, False, False, False)
    assert pool.tasks == ["e0", "e1"] and pool.resolved == {k: str(v) for k, v in experts.items()}
    pool.setup(None, {})  # merge only: no suite
    # What only in-memory / scorable pools can do is refused with the pool and the capability named.
    for call, capability in (
        (pool.pretrained_state, "in_memory"),
        (pool.expert_states, "in_memory"),
        (pool.model, "scorable"),
        (lambda: pool.reference_key(), "scorable"),
        (lambda: pool.evaluate(None, "test", {}), "scorable"),  # type: ignore[arg-type]
        (lambda: TaskArithmetic().run(pool), "in_memory"),
        (lambda: pool.task_batches("e0", "train", 8, 4, 0), "task_data"),
        (lambda: pool.task_logits(None, "e0", {}), "task_data"),  # type: ignore[arg-type]
    ):
        with pytest.raises(PoolCapabilityError, match=rf"CheckpointPool \(checkpoint pool\) .*\({capability}=False\)"):
            call()
    # A concrete pool declaring a capability must define what it needs.
    with pytest.raises(TypeError, match=r"declares scorable=True but does not define \['model', 'evaluate'"):

        class Half(ModelPool):
            def setup(self, suite: object, trainer_kwargs: object) -> None: ...

            def pretrained_state(self) -> dict:  # type: ignore[override]
                return {}

            def save_merged(self, state: object, out_dir: object) -> Path:  # type: ignore[override]
                return Path()

    assert set(CAPABILITIES) == {"in_memory", "scorable", "multi_process", "task_data"}


def test_no_pool_type_tests_in_the_package() -> None:
    pools = ("ModelPool", "CheckpointPool", "ClassifierPool", "CausalLMPool", "CLIPVisionPool")
    pattern = re.compile(r"isinstance\((self\.)?pool\b|isinstance\([^)]*\b(" + "|".join(pools) + r")\b")
    hits = [
        f"{p.relative_to(SRC)}:{i}"
        for p in SRC.rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line) and not line.lstrip().startswith("#")
    ]
    # The one exception: validating that a config built a pool at all (pools/base.check_pool).
    assert hits == [next(h for h in hits if h.startswith("pools/base.py"))], hits


def test_in_memory_pool_refuses_eval_none_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as err:
        run(make_cfg(tmp_path / "out", ["eval=none", "logger=none"], tiny=False))
    message = str(err.value)
    assert "\n" not in message
    assert "eval=none only applies to checkpoint pools" in message and "ClassifierPool" in message
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- merge only


def test_merge_only_run_writes_the_common_schema(pool_dirs: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    out = tmp_path / "run"
    objective = run(make_cfg(out, [*pool_overrides(pool_dirs), "method=metagpt", "eval=none"], tiny=False))
    assert objective != objective  # NaN: nothing was scored
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == SCHEMA
    assert metrics["objective"] == {"name": None, "value": None}
    assert metrics["suite"] is None and metrics["scores"] is None and metrics["avg_acc"] is None
    assert metrics["tasks"] == ["e0", "e1"] and set(metrics["experts"]) == {"e0", "e1"}
    assert list(metrics["rows"]) == ["metagpt"] and metrics["method"] == "metagpt"
    row = metrics["rows"]["metagpt"]
    assert "scores" not in row and row["params"]["granularity"] == "model"
    assert set(row["method_report"]) == {"lambda/e0", "lambda/e1"} == set(metrics["method_report"])
    assert metrics["merged_model"] == str(out / "merged_model")
    assert LazyCheckpoint(out / "merged_model").keys()
    assert not (out / CANDIDATES_DIR).exists() and not (out / "results.md").exists()
    # The paper report names such a run as merge-only.
    from mergelab.reports.paper.runs import load_run
    from mergelab.reports.paper.schema import ReportError

    with pytest.raises(ReportError, match="merge-only run"):
        load_run(out)
    # Tuning and tables need a suite: refused before any work.
    for extra in (["method=task_arithmetic", "tune=true"], ["experiment=embedded_table"]):
        with pytest.raises(ValueError, match="needs a suite"):
            run(make_cfg(tmp_path / "refused", [*pool_overrides(pool_dirs), *extra, "eval=none"], tiny=False))
        assert not (tmp_path / "refused").exists()


def test_sweep_of_merge_only_runs_is_summarized(pool_dirs: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "mergelab.cli",
        "-m",
        *pool_overrides(pool_dirs),
        "eval=none",
        "method=task_arithmetic,metagpt",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((sweep / "summary.json").read_text())
    assert [r["job"] for r in summary] == ["0", "1"]
    assert [r["overrides"].split()[-1] for r in summary] == ["method=task_arithmetic", "method=metagpt"]
    assert summary[1]["metagpt/lambda/e0"] + summary[1]["metagpt/lambda/e1"] == pytest.approx(1.0)
    assert all(r["merged_model"] == str(sweep / r["job"] / "merged_model") for r in summary)
    assert "metagpt/lambda/e0" in (sweep / "summary.md").read_text()
    # A job dir without a result is listed too, with why.
    (sweep / "2").mkdir()
    assert summarize(sweep)[-1] == {"job": "2", "status": "no metrics.json (failed or unfinished)"}


# ------------------------------------------------------------------------------------------- streamed + tuned


def test_streaming_run_tunes_a_grid_with_lm_eval(pool_dirs: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    """Each grid point is merged to a dir under the run dir and scored by lm-eval; the best is kept."""
    out = tmp_path / "run"
    overrides = [
        *pool_overrides(pool_dirs),
        "method=task_arithmetic",
        "tune=true",
        "method.grid.scaling=[0.0,1.0]",
        "eval=lm_harness",
        "eval.tasks=[mergelab_sentiment]",
        "eval.limit=8",
        "+eval.metrics.mergelab_sentiment=acc_norm\\,none",
        "eval.batch_size=4",
        "eval.log_samples=true",
        "eval.bootstrap_iters=20",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
    ]
    objective = run(make_cfg(out, overrides, tiny=False))
    # The harness's own results are kept beside the scores: standard errors (bootstrap_iters > 0) and samples.
    kept = json.loads((out / "artifacts" / "task_arithmetic" / "lm_eval_results.json").read_text())
    harness = kept["results"]["mergelab_sentiment"]
    assert isinstance(harness["acc_norm_stderr,none"], float) and kept["limit"] == 8
    assert len(kept["samples"]["mergelab_sentiment"]) == 8 and "versions" in kept
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= SCHEMA
    assert metrics["objective"] == {"name": "harness/avg_acc", "value": objective}
    assert list(metrics["rows"]) == ["task_arithmetic"]  # a streaming pool scores only its merges
    row = metrics["rows"]["task_arithmetic"]
    tried = {t["params"]["scaling"]: t["harness_avg_acc"] for t in row["tuning"]}
    assert list(tried) == [0.0, 1.0]
    assert tried[0.0] != tried[1.0], tried  # the tiny pool is built so that the two points score differently
    best = max(tried, key=tried.get)
    assert row["params"] == {"scaling": best} and metrics["params"] == {"scaling": best}
    assert objective == tried[best] == row["avg_acc"] == metrics["avg_acc"]
    assert metrics["scores"] == row["scores"] and set(row["scores"]) == {"mergelab_sentiment"}
    assert row["scores"]["mergelab_sentiment"]["acc_norm_stderr,none"] == harness["acc_norm_stderr,none"]
    # The kept merged model is the chosen point's; the other candidate is gone.
    base, experts = pool_dirs
    want = stream_merge(TaskArithmetic(scaling=best), base, list(experts.values()), tmp_path / "want", progress=False)
    got, ref = LazyCheckpoint(out / "merged_model"), LazyCheckpoint(want)
    assert sorted(got.keys()) == sorted(ref.keys()) and all(torch.equal(got[k], ref[k]) for k in ref)
    assert not (out / CANDIDATES_DIR).exists()
    assert "| task_arithmetic |" in (out / "results.md").read_text()
