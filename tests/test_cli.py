"""The app end to end on the real pretrained encoder and a small subset of the real suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from transformers import AutoTokenizer

from mergelab.run import run
from mergelab.text.model import evaluate
from mergelab.text.pool import load_merged
from tests.conftest import TINY, embedded_table_rows, make_cfg, run_states
from tests.test_run_flow import SCHEMA


@pytest.fixture(scope="module")
def ta_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A task-arithmetic run that builds the tiny experts and saves the merged model."""
    out = tmp_path_factory.mktemp("ta_run")
    cfg = make_cfg(out, ["method=task_arithmetic", "method.scaling=0.4", "save_merged=true", "plot=true"])
    objective = run(cfg)
    assert 0.0 <= objective <= 1.0
    return out


def test_run_writes_results(ta_run: Path) -> None:
    for name in ("metrics.json", "results.md", "results.csv", "results.png", "config.yaml"):
        assert (ta_run / name).is_file(), name
    metrics = json.loads((ta_run / "metrics.json").read_text())
    assert list(metrics["rows"]) == ["pretrained", "experts", "task_arithmetic"]
    assert metrics["tasks"] == ["tweet_sentiment", "food_review"]
    assert set(metrics) == SCHEMA  # the keys of every run's metrics.json (tests/test_run_flow.py)
    ta = metrics["rows"]["task_arithmetic"]
    assert metrics["method"] == "task_arithmetic" and metrics["scores"] == ta["scores"]
    assert metrics["params"] == ta["params"] and metrics["avg_acc"] == ta["avg_acc"]
    assert metrics["merged_model"] == str(ta_run / "merged_model")
    experts = metrics["rows"]["experts"]["scores"]
    for task, scores in ta["scores"].items():
        assert 0.0 <= scores["acc"] <= 1.0
        assert ta["norm_acc"][task] == pytest.approx(scores["acc"] / experts[task]["acc"])
    assert ta["params"]["scaling"] == 0.4
    table = (ta_run / "results.md").read_text()
    assert "| task_arithmetic |" in table and "| experts |" in table and "| pretrained |" in table
    assert "method.scaling" not in (ta_run / "config.yaml").read_text()  # resolved config, not overrides
    assert "scaling: 0.4" in (ta_run / "config.yaml").read_text()


def test_experts_are_real_cached_hf_dirs(ta_run: Path, cache_dir: Path) -> None:
    metrics = json.loads((ta_run / "metrics.json").read_text())
    for task, path in metrics["experts"].items():
        p = Path(path)
        assert p.parent == cache_dir / "experts" and p.name.startswith(task)
        assert (p / "model.safetensors").is_file()
        record = json.loads((p / "mergelab_expert.json").read_text())
        assert record["train_examples"] == 256
        assert 0.0 <= record["scores"]["test"]["acc"] <= 1.0
    # A second run with the same recipe reuses them (same dirs, files untouched).
    stamps = {t: (Path(p) / "model.safetensors").stat().st_mtime_ns for t, p in metrics["experts"].items()}
    out2 = ta_run.parent / "second"
    run(make_cfg(out2, ["method=weight_averaging"]))
    again = json.loads((out2 / "metrics.json").read_text())
    assert again["experts"] == metrics["experts"]
    assert {t: (Path(p) / "model.safetensors").stat().st_mtime_ns for t, p in again["experts"].items()} == stamps
    # The reference rows are identical across runs (same experts, same data).
    assert again["rows"]["experts"] == metrics["rows"]["experts"]


def test_saved_merged_model_is_task_arithmetic_and_reloads(ta_run: Path) -> None:
    metrics = json.loads((ta_run / "metrics.json").read_text())
    cfg = make_cfg(ta_run)
    pretrained, experts, merged = run_states(cfg.model.pretrained, metrics["experts"].values(), ta_run / "merged_model")
    for k, v in pretrained.items():
        if not v.is_floating_point():
            continue
        expected = v + 0.4 * sum(e[k] - v for e in experts)
        torch.testing.assert_close(merged[k], expected, atol=1e-6, rtol=1e-5)
    # The reloaded multi-task model scores exactly what the run reported.
    suite = instantiate(cfg.eval, _convert_="all")
    tok = AutoTokenizer.from_pretrained(ta_run / "merged_model")
    scores = evaluate(load_merged(ta_run / "merged_model"), suite, "test", tok, {"enable_progress_bar": False})
    assert scores == metrics["rows"]["task_arithmetic"]["scores"]


def test_existing_result_is_not_overwritten(ta_run: Path) -> None:
    before = (ta_run / "metrics.json").read_bytes()
    with pytest.raises(FileExistsError, match="already holds"):
        run(make_cfg(ta_run, ["method=task_arithmetic"]))
    assert (ta_run / "metrics.json").read_bytes() == before


def test_table_experiment_tunes_each_method(tmp_path: Path, ta_run: Path) -> None:
    # AWD rows are covered by tests/test_awd.py (here they would add a 300-step fit), the spectral and data-using
    # methods by their own tests.
    overrides = [
        *embedded_table_rows("weight_averaging", "task_arithmetic", "ties", "dare", "metagpt"),
        "logger=none",
        "plot=true",
        "table.methods.task_arithmetic.grid.scaling=[0.2,0.6]",
        "table.methods.ties.grid.scaling=[0.5]",
        "table.methods.dare.grid={merge.scaling:[0.3]}",  # DARE's inner task arithmetic
    ]
    run(make_cfg(tmp_path, overrides))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    rows = ["pretrained", "experts", "weight_averaging", "task_arithmetic", "ties", "dare", "metagpt"]
    assert list(metrics["rows"]) == rows
    ta = metrics["rows"]["task_arithmetic"]
    tried = {t["params"]["scaling"]: t["validation_avg_acc"] for t in ta["tuning"]}
    assert set(tried) == {0.2, 0.6}
    assert ta["params"]["scaling"] == max(tried, key=tried.get)  # the best validation point is reported
    assert (tmp_path / "results.png").stat().st_size > 1000
    csv_lines = (tmp_path / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("method,tweet_sentiment,food_review,avg_acc")
    assert len(csv_lines) == 8
    # MetaGPT's coefficients are reported with the row, one per task, summing to 1.
    lambdas = metrics["rows"]["metagpt"]["method_report"]
    assert set(lambdas) == {"lambda/tweet_sentiment", "lambda/food_review"}
    assert sum(lambdas.values()) == pytest.approx(1.0)


def wandb_record(run_dir: Path, keys: Sequence[bytes]) -> bytes:
    """The record log of an offline wandb run, once it holds every one of ``keys`` (or after 60 s).

    wandb-core writes the record log from its own service process, and wandb.finish() can return before that write
    reaches the file (seen with a busy machine: only the 7-byte header was there). Wait for it, bounded."""
    record_file = next(run_dir.glob("run-*.wandb"))
    deadline = time.monotonic() + 60
    while not all(k in record_file.read_bytes() for k in keys) and time.monotonic() < deadline:
        time.sleep(0.5)
    return record_file.read_bytes()


def test_wandb_offline_logging(tmp_path: Path, ta_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    grid = ["method=task_arithmetic", "tune=true", "method.grid.scaling=[0.2,0.6]"]
    run(make_cfg(tmp_path, [*grid, "logger=many"]))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # The results table is written as a wandb table file...
    (table_file,) = (runs[0] / "files" / "media" / "table").glob("results_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"][:3] == ["method", "tweet_sentiment", "food_review"]
    assert [r[0] for r in table["data"]] == ["pretrained", "experts", "task_arithmetic"]
    # ...and the metrics, the tuning curve, timings, the full config and the run's identity (name, tags, job type)
    # go into the run's record log.
    keys = (
        b"test/task_arithmetic/avg_acc",
        b"test/experts/food_review/f1",
        b"max_eval_examples",
        b"tuning/task_arithmetic/scaling",
        b"tuning/task_arithmetic/validation_avg_acc",
        b"timings/setup_s",
        b"ClassifierPool",
        b"embedded",
        b"tune",
    )
    record = wandb_record(runs[0], keys)
    for key in keys:
        assert key in record, key
    csv_metrics = next((tmp_path / "csv").rglob("metrics.csv")).read_text()
    assert "test/task_arithmetic/avg_acc" in csv_metrics and "tuning/task_arithmetic/scaling" in csv_metrics


@pytest.mark.parametrize("fmt", ["svg", "pdf"])
def test_wandb_keeps_the_chart_in_the_figure_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    """wandb.Image reads neither svg nor pdf: the chart goes to the run as a file (and an svg as an HTML panel)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run(make_cfg(tmp_path, ["method=task_arithmetic", "plot=true", f"figure_format={fmt}", "logger=wandb"]))
    chart = tmp_path / f"results.{fmt}"
    assert chart.is_file() and not (tmp_path / "results.png").exists()
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    # A copy in the run's files (what `wandb sync` uploads), not a link into the output dir.
    kept = run_dir / "files" / chart.name
    assert kept.is_file() and not kept.is_symlink()
    assert kept.read_bytes() == chart.read_bytes()
    assert chart.name.encode() in wandb_record(run_dir, [chart.name.encode()])  # the upload is recorded
    panels = list((run_dir / "files" / "media").rglob("results_chart_*"))
    if fmt == "svg":
        (panel,) = panels
        assert panel.suffix == ".html"
        html = panel.read_text()
        assert "<svg" in html and "accuracy (%)" in html  # the chart itself, its text kept as text
    else:
        assert panels == []  # nothing wandb can draw from a pdf


def test_multirun_sweep_writes_jobs_and_summary(tmp_path: Path, ta_run: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "mergelab.cli",
        "-m",
        *TINY,
        "method=task_arithmetic",
        "method.scaling=0.1,0.5",
        f"hydra.sweep.dir={tmp_path}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.parent.name for p in tmp_path.glob("*/metrics.json"))
    assert jobs == ["0", "1"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["overrides"].split()[-2:] for r in summary] == [
        ["method=task_arithmetic", f"method.scaling={s}"] for s in ("0.1", "0.5")
    ]
    for rec, job in zip(summary, jobs, strict=True):
        metrics = json.loads((tmp_path / job / "metrics.json").read_text())
        assert rec["validation/avg_acc"] == metrics["objective"]["value"]
        assert rec["task_arithmetic/avg_acc"] == metrics["rows"]["task_arithmetic"]["avg_acc"]
    assert "task_arithmetic/avg_acc" in (tmp_path / "summary.md").read_text()
