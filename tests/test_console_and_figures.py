"""First contact: what the console says while scoring (bars naming what they score, no redraws in a log file, no
library deprecation noise) and the figures (value labels, a subset title, AWD's full legend, svg/pdf output)."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from mergelab.io.atomic import figure_format
from mergelab.methods import AdaMerging
from mergelab.methods import awd as awd_module
from mergelab.reports.sweep import SweepSummary
from mergelab.reports.tables import percent
from mergelab.run import quiet_libraries, run
from mergelab.suites import scoring as ev
from tests.conftest import TINY, make_cfg
from tests.test_awd import fit, make_models
from tests.test_data_methods import CPU, softmax_pool

LEAFSPEC = "`isinstance(treespec, LeafSpec)` is deprecated"


def svg_texts(path: Path) -> list[str]:
    """Every text drawn in an svg (matplotlib writes text as <text> when svg.fonttype is none)."""
    return ["".join(el.itertext()) for el in ET.parse(path).iter() if el.tag.endswith("}text")]


@pytest.fixture(scope="module")
def svg_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TIES run on the tiny suite (48 examples per task) with its chart as svg; builds the session's experts."""
    out = tmp_path_factory.mktemp("svg_run")
    run(make_cfg(out, ["method=ties", "plot=true", "figure_format=svg"]))
    return out


# ------------------------------------------------------------------------------------------------ the console


class Counter(L.LightningModule):
    """Counts the examples of each task's dataloader (its "score")."""

    def __init__(self, tasks: list[str]) -> None:
        super().__init__()
        self.eval_tasks, self.scores = tasks, {}

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        task = self.eval_tasks[dataloader_idx]
        self.scores[task] = {"acc": self.scores.get(task, {"acc": 0})["acc"] + len(batch[0])}


class Terminal(io.StringIO):
    """A stdout that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def count(trainer: dict[str, Any]) -> dict[str, Any]:
    """Scores of a :class:`Counter` over two tasks (3 batches each) while scoring "ties {k: [20, 30]}" on test."""
    loaders = [DataLoader(TensorDataset(torch.zeros(6, 1)), batch_size=2) for _ in range(2)]
    with ev.scoring("ties {k: [20, 30]}", "test"):
        return ev.run_test(Counter(["alpha", "beta"]), loaders, {"accelerator": "cpu", **trainer})


def test_a_terminal_bar_names_the_model_split_and_task(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdout", Terminal())
    assert count({"enable_progress_bar": True}) == {"alpha": {"acc": 6}, "beta": {"acc": 6}}
    drawn = sys.stdout.getvalue()
    # Each task's bar; the brackets of a list value shown as they are (not read as rich markup).
    assert "ties {k: [20, 30]} · test · alpha" in drawn and "ties {k: [20, 30]} · test · beta" in drawn
    assert "Testing" not in drawn and "DataLoader" not in drawn


@pytest.mark.parametrize(("stdout", "enabled"), [(io.StringIO, True), (Terminal, False)])
def test_without_a_bar_one_log_line_names_what_is_scored(
    stdout: type, enabled: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Not a terminal (a log file, CI), or bars turned off: nothing drawn, one line logged.
    monkeypatch.setattr(sys, "stdout", stdout())
    with caplog.at_level(logging.INFO, logger="mergelab.suites.scoring"):
        count({"enable_progress_bar": enabled})
    assert sys.stdout.getvalue() == ""
    logged = [r.getMessage() for r in caplog.records if r.name == "mergelab.suites.scoring"]
    assert logged == ["scoring ties {k: [20, 30]} · test"]


def test_known_library_deprecations_are_filtered_and_others_kept() -> None:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_libraries()
        pytree = "lightning.pytorch.utilities._pytree"
        warnings.warn_explicit(LEAFSPEC + ", use ... instead.", FutureWarning, "_pytree.py", 21, module=pytree)
        warnings.warn_explicit(LEAFSPEC + ", use ... instead.", FutureWarning, "model.py", 3, module="mergelab.x")
        warnings.warn_explicit("`foo` is deprecated", FutureWarning, "other.py", 9, module="lightning.pytorch.x")
    assert [(str(w.message)[:5], w.filename) for w in seen] == [("`isin", "model.py"), ("`foo`", "other.py")]


def test_a_log_file_names_what_was_scored_without_bar_redraws_or_deprecations(svg_run: Path, tmp_path: Path) -> None:
    """The CLI with stdout and stderr to a file, bars enabled (the default; experts and references cached)."""
    log_file = tmp_path / "console.log"
    # A fresh environment: without what quiet_libraries set in this process, the CLI must quieten itself.
    env = {k: v for k, v in os.environ.items() if not k.endswith("_DISABLE_PROGRESS_BARS")}
    cmd = [
        sys.executable,
        "-m",
        "mergelab.cli",
        *(o for o in TINY if not o.startswith("trainer.enable_progress_bar=")),
        "method=task_arithmetic",
        "method.scaling=0.4",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    with log_file.open("w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=600, check=False)
    text = log_file.read_text()
    assert done.returncode == 0, text[-3000:]
    assert "\r" not in text and "it/s" not in text and "━" not in text  # no bar, redrawn or final
    assert "LeafSpec" not in text
    for split in ("test", "validation"):
        assert f"scoring task_arithmetic {{scaling: 0.4}} · {split}" in text
    assert "scoring task_arithmetic {scaling: 0.4} · test" in (tmp_path / "run" / "mergelab.log").read_text()


# ------------------------------------------------------------------------------------------------ the figures


def test_results_chart_as_svg_has_value_labels_and_a_subset_title(svg_run: Path) -> None:
    assert (svg_run / "results.svg").is_file() and not (svg_run / "results.png").exists()
    texts = svg_texts(svg_run / "results.svg")
    title = "embedded: test accuracy (%) (first 48 examples per task)"
    assert title in texts
    assert (svg_run / "results.md").read_text().startswith(f"## {title}\n")
    rows = json.loads((svg_run / "metrics.json").read_text())["rows"]
    assert list(rows) == ["pretrained", "experts", "ties"]
    for row in rows.values():
        for value in [*(s["acc"] for s in row["scores"].values()), row["avg_acc"]]:
            assert f"{percent(value):.1f}" in texts, value


def test_a_bad_figure_format_fails_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"figure_format must be one of \('png', 'svg', 'pdf'\), got 'bmp'"):
        run(make_cfg(tmp_path, ["figure_format=bmp"]))
    assert list(tmp_path.iterdir()) == []


def test_awd_legend_has_every_loss_term_and_plots_follow_the_format(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    legends: dict[str, list[str]] = {}
    save = awd_module.atomic_save_figure

    def recording(fig: Any, path: Path) -> Path:
        legends[Path(path).name] = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().texts]
        return save(fig, path)

    monkeypatch.setattr(awd_module, "atomic_save_figure", recording)
    base, experts = make_models(seed=7)
    method = fit(base, experts, steps=4, alpha=0.1)
    method.task_names = ["a", "b", "c"]
    with figure_format("svg"):
        method.save_artifacts(tmp_path)
    assert legends["delta_norms_and_losses"] == [
        "loss = L_O + 0.1·L_R",
        "L_O (mean |cos|)",
        "0.1·L_R",
        "model-level mean |cos|",
        "L_R (right axis)",
    ]
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".png", ".svg")) == [
        "cosine_before_after.svg",
        "delta_norms_and_losses.svg",
    ]
    assert "loss = L_O + 0.1·L_R" in svg_texts(tmp_path / "delta_norms_and_losses.svg")


def test_adamerging_plot_and_sweep_summary_follow_the_format(tmp_path: Path) -> None:
    method = AdaMerging(steps=3, lr=0.05, batch_size=8)
    method.prepare(softmax_pool(n=16), CPU)
    with figure_format("pdf"):
        method.save_artifacts(tmp_path / "ada")
    assert (tmp_path / "ada" / "adamerging.pdf").read_bytes()[:5] == b"%PDF-"
    assert not (tmp_path / "ada" / "adamerging.png").exists()

    sweep = tmp_path / "sweep"
    for job, scaling in enumerate((0.1, 0.5)):
        (sweep / str(job)).mkdir(parents=True)
        metrics = {
            "overrides": [f"method.scaling={scaling}"],
            "objective": {"name": "validation/avg_acc", "value": scaling},
            "rows": {},
        }
        (sweep / str(job) / "metrics.json").write_text(json.dumps(metrics))
    SweepSummary().on_multirun_end(OmegaConf.create({"figure_format": "svg", "hydra": {"sweep": {"dir": str(sweep)}}}))
    assert (sweep / "summary.svg").is_file() and not (sweep / "summary.png").exists()
