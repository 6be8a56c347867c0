"""How ``tune=true`` searches a grid: successive halving on a seeded subset, and the tuning precision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mergelab.run import run
from mergelab.text.suite import TextClassificationSuite
from tests.conftest import make_cfg

GRID = ["method=task_arithmetic", "tune=true", "method.grid.scaling=[0.1,0.4,0.7,1.0]"]


def test_halving_scores_every_point_on_a_subset_and_the_best_on_the_whole_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes: list[tuple[str, int]] = []  # (split, examples) of every task scored
    original = TextClassificationSuite.eval_loader

    def recording(self: TextClassificationSuite, task: str, split: str, tokenizer):  # type: ignore[no-untyped-def]
        loader = original(self, task, split, tokenizer)
        sizes.append((split, len(loader.dataset)))
        return loader

    monkeypatch.setattr(TextClassificationSuite, "eval_loader", recording)
    out = tmp_path / "halving"
    objective = run(make_cfg(out, [*GRID, "tuning.strategy=halving", "tuning.subset=8", "tuning.keep=2"]))
    metrics = json.loads((out / "metrics.json").read_text())
    tried = metrics["rows"]["task_arithmetic"]["tuning"]
    assert [t["params"]["scaling"] for t in tried] == [0.1, 0.4, 0.7, 1.0]
    assert all("validation_subset_avg_acc" in t for t in tried)
    full = [t for t in tried if "validation_avg_acc" in t]
    assert len(full) == 2  # the best two on the subset, and only they, on the whole split
    by_subset = sorted(tried, key=lambda t: -t["validation_subset_avg_acc"])
    assert {t["params"]["scaling"] for t in full} == {t["params"]["scaling"] for t in by_subset[:2]}
    best = max(full, key=lambda t: t["validation_avg_acc"])
    assert metrics["rows"]["task_arithmetic"]["params"]["scaling"] == best["params"]["scaling"]
    assert objective == pytest.approx(best["validation_avg_acc"])
    # 4 points x 2 tasks on 8 validation examples, 2 x 2 on all 48, then the report split.
    validation = [n for split, n in sizes if split == "validation"]
    assert validation.count(8) == 8 and validation.count(48) == 4
    assert metrics["precision"]["tuning_strategy"] == "halving"


def test_tuning_precision_scores_the_grid_in_bf16_and_reports_in_fp32(tmp_path: Path) -> None:
    out = tmp_path / "bf16"
    run(make_cfg(out, [*GRID, "tuning.precision=bf16-mixed", "tuning.strategy=exhaustive"]))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["precision"] == {"report": "32-true", "tune": "bf16-mixed", "tuning_strategy": "exhaustive"}
    title = (out / "results.md").read_text().splitlines()[0]
    assert "bf16" not in title and "exhaustive tuning" in title  # a search other than the default says so
    assert len(metrics["rows"]["task_arithmetic"]["tuning"]) == 4
    # A report in bf16 says so in the table's title.
    out2 = tmp_path / "bf16_report"
    run(make_cfg(out2, ["method=task_arithmetic", "trainer.precision=bf16-mixed"]))
    assert "bf16-mixed" in (out2 / "results.md").read_text().splitlines()[0]


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("tuning.strategy=bisect", "tuning.strategy"),
        ("tuning.keep=0", "tuning.keep"),
        ("tuning.subset=-4", "tuning.subset"),
        ("+tuning.rungs=3", r"tuning: unknown key\(s\) \['rungs'\]"),
    ],
)
def test_bad_tuning_options_are_refused_before_any_work(tmp_path: Path, override: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        run(make_cfg(tmp_path / "bad", [*GRID, override]))
    assert not (tmp_path / "bad").exists()


def test_a_two_trial_optuna_search_maximises_the_objective(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    import yaml

    from tests.conftest import TINY

    cmd = [
        sys.executable,
        "-m",
        "mergelab.cli",
        "hparams_search=optuna",
        *TINY,
        "hydra.sweeper.n_trials=2",
        f"hydra.sweep.dir={tmp_path}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = {p.parent.name: json.loads(p.read_text()) for p in tmp_path.glob("*/metrics.json")}
    assert sorted(jobs) == ["0", "1"]
    scalings = [m["rows"]["task_arithmetic"]["params"]["scaling"] for m in jobs.values()]
    assert all(0.05 <= s <= 1.0 for s in scalings) and scalings[0] != scalings[1]  # sampled, not the default
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    top = max(m["objective"]["value"] for m in jobs.values())
    assert best["best_value"] == pytest.approx(top)
    winners = [
        m["rows"]["task_arithmetic"]["params"]["scaling"] for m in jobs.values() if m["objective"]["value"] == top
    ]
    assert any(best["best_params"]["method.scaling"] == pytest.approx(w) for w in winners)
    assert (tmp_path / "summary.json").is_file()  # the sweep summary as for -m
