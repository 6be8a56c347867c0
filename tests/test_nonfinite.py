"""A merge that comes out NaN or inf is refused on every path (in memory, streamed, single-task rows), naming the
tensor and the method, and nothing is scored or written; reports never print a non-finite score."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mergelab.callbacks import MergeCallback
from mergelab.engine.streaming import stream_merge
from mergelab.io.reader import LazyCheckpoint
from mergelab.io.writer import write_checkpoint
from mergelab.methods import TIES, TaskArithmetic
from mergelab.reports.loggers import flat_metrics
from mergelab.reports.tables import markdown_table
from mergelab.run import run
from mergelab.weight_checks import NonFiniteMergeError
from tests.conftest import ListPool, make_cfg


def tiny_llama(dtype: torch.dtype) -> LlamaForCausalLM:
    """A random-weight Llama: plumbing only (file formats and dtypes)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).to(dtype)


@pytest.fixture(scope="module")
def fp16_pool(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """An fp16 base and two fp16 experts 0.01 away from it."""
    root = tmp_path_factory.mktemp("fp16_pool")
    base = tiny_llama(torch.float16)
    base.save_pretrained(root / "base")
    experts = []
    for i in range(2):
        g = torch.Generator().manual_seed(i)
        state = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).half() for k, v in base.state_dict().items()}
        experts.append(write_checkpoint(state, root / f"expert{i}"))
    return root / "base", experts


@pytest.mark.parametrize("method", [TaskArithmetic(scaling=1e7), TIES(k=50, scaling=1e7)], ids=["ta", "ties"])
@pytest.mark.parametrize("pipeline", [True, False], ids=["pipeline", "sequential"])
def test_streamed_overflow_past_the_output_dtype_is_refused(
    fp16_pool: tuple[Path, list[Path]], tmp_path: Path, method: Any, pipeline: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # fp32 arithmetic is finite (0.01 * 1e7 = 1e5) but float16 tops out at 65504: the written weights would be inf.
    from mergelab.engine import streaming

    monkeypatch.setattr(streaming, "PIPELINE", pipeline)
    base, experts = fp16_pool
    with pytest.raises(NonFiniteMergeError, match=rf"{type(method).__name__} merged tensor '[\w.]+' into 0 NaN"):
        stream_merge(method, base, experts, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".tmp-*"))


def test_streamed_merge_within_range_is_written(fp16_pool: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, experts = fp16_pool
    out = stream_merge(TaskArithmetic(scaling=100.0), base, experts, tmp_path / "out", progress=False)
    ck = LazyCheckpoint(out)
    assert all(torch.isfinite(ck.get(k)).all() for k in ck)


class NaNMerge(TaskArithmetic):
    """Task arithmetic that breaks: NaN in every merged block of the attention's query projections."""

    def merge_chunk(self, block: Any, vectors: Any) -> torch.Tensor:
        out = super().merge_chunk(block, vectors)
        return out * math.nan if "q_proj" in block.name or "query" in block.name else out


def state(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.q_proj.weight": torch.randn(4, 3, generator=g).to(dtype),
        "a.bias": torch.randn(3, generator=g).to(dtype),
    }


def test_in_memory_merges_are_checked_before_use() -> None:
    pool = ListPool(state(0), [state(1), state(2)])
    with pytest.raises(NonFiniteMergeError, match=r"NaNMerge merged tensor 'a.q_proj.weight' into 12 NaN"):
        MergeCallback(NaNMerge(0.3), pool).merged_state()
    # float16 weights: the merge is cast back to the pretrained dtype, where 1e6 * tau overflows
    half = ListPool(state(0, torch.float16), [state(1, torch.float16), state(2, torch.float16)])
    overflow = r"TaskArithmetic merged tensor 'a\.[\w.]+' into 0 NaN and \d+ inf"
    with pytest.raises(NonFiniteMergeError, match=overflow):
        MergeCallback(TaskArithmetic(1e6), half).merged_state()
    merged = MergeCallback(TaskArithmetic(0.3), half).merged_state()
    assert merged["a.bias"].dtype == torch.float16


def test_extra_rows_with_nan_name_the_expert(fp16_pool: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, experts = fp16_pool
    ck = LazyCheckpoint(experts[0])
    grown = {k: ck.get(k) for k in ck}
    extra = torch.zeros(2, 16, dtype=torch.float16)
    extra[1, 3] = float("nan")
    grown["model.embed_tokens.weight"] = torch.cat([grown["model.embed_tokens.weight"], extra])
    bigger = write_checkpoint(grown, tmp_path / "bigger")
    with pytest.raises(ValueError, match=r"bigger': tensor 'model.embed_tokens.weight' row 33 contains NaN"):
        stream_merge(TaskArithmetic(0.3), base, [bigger, experts[1]], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


class NaNSingleTask(TaskArithmetic):
    """Task arithmetic whose per-task states (as AWD's tau_t - delta are) hold NaN."""

    def single_task_states(self, pool: Any) -> dict[str, dict[str, torch.Tensor]]:
        task = pool.tasks[0]
        bad = {k: v * math.nan if v.is_floating_point() else v for k, v in pool.expert_states()[0].items()}
        return {task: bad}


@pytest.mark.parametrize(
    "target, match",
    [
        ("tests.test_nonfinite.NaNMerge", r"NaNMerge merged tensor '[\w.]*query[\w.]*' into \d+ NaN"),
        ("tests.test_nonfinite.NaNSingleTask", r"NaNSingleTask \(task 'tweet_sentiment' alone\) merged tensor"),
    ],
    ids=["merge", "single-task"],
)
def test_a_run_with_a_non_finite_merge_fails_and_writes_no_result(tmp_path: Path, target: str, match: str) -> None:
    cfg = make_cfg(tmp_path / "run", ["method=task_arithmetic", f"method._target_={target}"])
    with pytest.raises(NonFiniteMergeError, match=match):
        run(cfg)
    assert not (tmp_path / "run" / "metrics.json").exists()
    # The table written as rows finished holds the reference rows only, titled as unfinished: no merged row.
    table = (tmp_path / "run" / "results.md").read_text()
    assert "0 of 1 methods done" in table.splitlines()[0]
    assert "| task_arithmetic |" not in table and "| experts |" in table


def test_reports_never_print_a_non_finite_score() -> None:
    nan = float("nan")
    rows = {
        "broken": {"scores": {"t": {"acc": nan}}, "avg_acc": nan, "avg_norm_acc": float("inf")},
        "fine": {"scores": {"t": {"acc": 0.5}}, "avg_acc": 0.5, "avg_norm_acc": 1.0},
    }
    table = markdown_table(rows, ["t"])
    assert "nan" not in table.lower() and "inf" not in table.lower()
    assert "| broken | - | - | - |" in table and "| fine | 50.00 | 50.00 | 100.00 |" in table
    metrics = flat_metrics(
        {"report_split": "test", "rows": rows, "objective": {"name": "validation/avg_acc", "value": nan}}
    )
    assert metrics == {"test/fine/t/acc": 0.5, "test/fine/avg_acc": 0.5, "test/fine/avg_norm_acc": 1.0}
    assert all(math.isfinite(v) for v in metrics.values())
    json.dumps(metrics, allow_nan=False)


def test_results_files_are_strict_json(tmp_path: Path) -> None:
    import numpy as np

    from mergelab.io.atomic import atomic_write_json

    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"avg": float("nan"), "rows": [float("inf"), 0.5, np.float32(float("nan")), np.float64(2)]})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) == {
        "avg": None,
        "rows": [None, 0.5, None, 2.0],
    }
