"""First contact: what the console says while scoring (bars naming what they score, no redraws in a log file, no
library deprecation noise), the figures (the results heatmap: the table's values in its cells, methods sorted by
average with the references apart; a subset title, AWD's full legend, the sweep's figures, svg/pdf output) and the
tables' Chosen column (only what tuning chose and a few learned values)."""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
import os
import random
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
from mergelab.reports import sweep_plots
from mergelab.reports.sweep_summary import SweepSummary, write_summary
from mergelab.reports.tables import (
    markdown_table,
    percent,
    results_chart,
    results_figure,
    table_records,
    write_reports,
)
from mergelab.run import quiet_libraries, run
from mergelab.suites import scoring as ev
from tests.conftest import TINY, make_cfg
from tests.test_awd import fit, make_models
from tests.test_data_methods import CPU, softmax_pool

ROOT = Path(__file__).resolve().parents[1]

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


def test_results_chart_as_svg_has_the_table_values_and_a_subset_title(svg_run: Path) -> None:
    assert (svg_run / "results.svg").is_file() and not (svg_run / "results.png").exists()
    texts = svg_texts(svg_run / "results.svg")
    title = "embedded: test accuracy (%) (subset: at most 48 examples per task)"
    assert title in texts
    table = (svg_run / "results.md").read_text()
    assert table.startswith(f"## {title}\n")
    rows = json.loads((svg_run / "metrics.json").read_text())["rows"]
    assert list(rows) == ["pretrained", "experts", "ties"]
    for name, row in rows.items():
        cells = [f"{percent(v):.2f}" for v in [*(s["acc"] for s in row["scores"].values()), row["avg_acc"]]]
        assert f"| {name} | " + " | ".join(cells[:-1]) + f" | {cells[-1]} |" in table  # as the table prints them
        for cell in cells:
            assert cell in texts, (name, cell)


# ------------------------------------------------------------------------------------------------ the heatmaps

TASKS = ["alpha", "beta", "gamma"]


def table_row(accs: dict[str, float], **extra: Any) -> dict[str, Any]:
    """A table row as run.py makes it: scores per task and their average."""
    return {"scores": {t: {"acc": a} for t, a in accs.items()}, "avg_acc": sum(accs.values()) / len(accs), **extra}


def many_rows() -> dict[str, dict[str, Any]]:
    """20 rows as a big table has them: references first, 17 methods in no particular order (distinct averages,
    one at the top and one at the bottom of the scale), a single-task row without 'beta' after them."""
    rng = random.Random(3)
    rows = {"pretrained": table_row({"alpha": 0.3, "beta": 0.2, "gamma": 0.25})}
    rows["experts"] = table_row({"alpha": 0.9, "beta": 0.85, "gamma": 0.8})
    for i in range(15):
        rows[f"method_{i}"] = table_row({t: rng.uniform(0.3, 0.8) for t in TASKS})
    rows["high"] = table_row({"alpha": 0.98, "beta": 0.97, "gamma": 0.99})
    rows["low"] = table_row({"alpha": 0.02, "beta": 0.01, "gamma": 0.03})
    rows["awd_ta (single-task)"] = table_row({"alpha": 0.88, "gamma": 0.79})
    return rows


def cells(ax: Any) -> dict[tuple[float, float], Any]:
    """The texts drawn in a heatmap's cells, by their centre."""
    return {(round(t.get_position()[0], 3), round(t.get_position()[1], 3)): t for t in ax.texts}


def ticks(ax: Any, axis: str) -> dict[str, float]:
    """Tick label -> position on ``axis`` ("x" or "y")."""
    labels, positions = (
        (ax.get_xticklabels(), ax.get_xticks()) if axis == "x" else (ax.get_yticklabels(), ax.get_yticks())
    )
    return {label.get_text(): pos for label, pos in zip(labels, positions, strict=True)}


def luminance(colour: Any) -> float:
    from matplotlib.colors import to_rgb

    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in to_rgb(colour)]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def face_at(ax: Any, x: float, y: float) -> Any:
    """The fill colour of the cell centred at (x, y)."""
    from matplotlib.patches import Rectangle

    for p in ax.patches:
        at = math.isclose(p.get_x(), x - 0.5, abs_tol=1e-6) and math.isclose(p.get_y(), y - 0.5, abs_tol=1e-6)
        if isinstance(p, Rectangle) and p.get_fill() and at:
            return p
    raise AssertionError(f"no cell at {(x, y)}")


def test_the_results_heatmap_prints_every_table_value_in_its_method_and_task_cell() -> None:
    rows = many_rows()
    ax = results_figure(rows, TASKS, "a title").axes[0]
    ys, xs, drawn = ticks(ax, "y"), ticks(ax, "x"), cells(ax)
    assert list(xs) == [*TASKS, "average"]
    assert sorted(ys) == sorted(rows)  # every row has its own, labelled row: no method shares a colour or a label
    columns, data = table_records(rows, TASKS)
    avg = columns.index("avg_acc")
    for rec in data:
        for head, value in zip([*TASKS, "average"], [*rec[1 : 1 + len(TASKS)], rec[avg]], strict=True):
            text = drawn[(round(xs[head], 3), round(ys[rec[0]], 3))]
            assert text.get_text() == ("n/a" if value is None else f"{value:.2f}"), (rec[0], head)
    assert len(drawn) == len(rows) * (len(TASKS) + 1)  # nothing else printed over the cells
    # The task a single-task row was not scored on: a hatched cell, not a low score.
    assert face_at(ax, xs["beta"], ys["awd_ta (single-task)"]).get_hatch()
    assert not face_at(ax, xs["beta"], ys["high"]).get_hatch()


def test_the_results_heatmap_sorts_methods_by_average_with_the_references_apart_on_top() -> None:
    rows = many_rows()
    ax = results_figure(rows, TASKS).axes[0]
    order = [t.get_text() for t in ax.get_yticklabels()]
    methods = sorted((n for n in rows if n.startswith("method_")), key=lambda n: -rows[n]["avg_acc"])
    assert order == ["pretrained", "experts", "awd_ta (single-task)", "high", *methods, "low"]
    ys, xs = ticks(ax, "y"), ticks(ax, "x")
    steps = [b - a for a, b in itertools.pairwise(ys.values())]
    assert steps[2] > 1.2 and all(s == pytest.approx(1.0) for i, s in enumerate(steps) if i != 2)  # one gap
    assert xs["average"] - xs["gamma"] > 1.2  # the average is set apart from the tasks
    styles = {t.get_text(): (t.get_fontstyle(), t.get_color()) for t in ax.get_yticklabels()}
    assert {n for n, (style, _) in styles.items() if style == "italic"} == {
        "pretrained",
        "experts",
        "awd_ta (single-task)",
    }
    assert styles["pretrained"][1] != styles["high"][1]  # references greyed


def test_every_heatmap_value_is_readable_on_its_cell() -> None:
    rows = many_rows()
    ax = results_figure(rows, TASKS).axes[0]
    xs, ys = ticks(ax, "x"), ticks(ax, "y")
    for (x, y), text in cells(ax).items():
        face = luminance(face_at(ax, x, y).get_facecolor())
        ink = luminance(text.get_color())
        contrast = (max(face, ink) + 0.05) / (min(face, ink) + 0.05)
        assert contrast >= 4.5, (text.get_text(), contrast)  # WCAG AA for normal text
    # The two ends of the scale: light text on the darkest cells, dark text on the lightest.
    assert luminance(cells(ax)[(round(xs["alpha"], 3), round(ys["low"], 3))].get_color()) > 0.9
    assert luminance(cells(ax)[(round(xs["alpha"], 3), round(ys["high"], 3))].get_color()) < 0.1


def test_the_heatmap_grows_with_its_rows_and_draws_one_row_in_every_format(tmp_path: Path) -> None:
    rows = many_rows()
    three = {n: rows[n] for n in ("pretrained", "experts", "high")}
    tall, short = results_figure(rows, TASKS), results_figure(three, TASKS)
    per_row = (tall.get_size_inches()[1] - short.get_size_inches()[1]) / (len(rows) - len(three))
    assert 0.25 < per_row < 0.5  # each row gets room for its text, and no more
    one = {"ties": table_row({"alpha": 0.5})}
    for fmt, magic in (("png", b"\x89PNG"), ("svg", b"<?xml"), ("pdf", b"%PDF-")):
        with figure_format(fmt):
            assert results_chart(one, ["alpha"], tmp_path / "one", "one row").read_bytes()[:5].startswith(magic)
    assert "50.00" in svg_texts(tmp_path / "one.svg") and "one row" in svg_texts(tmp_path / "one.svg")


def test_a_row_without_a_task_is_a_dash_in_the_table_and_n_a_in_the_chart(tmp_path: Path) -> None:
    rows = {"experts": table_row({"alpha": 0.9, "beta": 0.8}), "single (single-task)": table_row({"alpha": 0.7})}
    with figure_format("svg"):
        write_reports(rows, ["alpha", "beta"], tmp_path, "t", chart=True, subset=0.5)
    assert "| single (single-task) | 70.00 | - | 70.00 |" in (tmp_path / "results.md").read_text()
    assert "single (single-task),70.0,,70.0" in (tmp_path / "results.csv").read_text()
    texts = svg_texts(tmp_path / "results.svg")
    assert "n/a" in texts and "t (subset: 50% of each task's examples)" in texts


# ------------------------------------------------------------------------------------------------ Chosen


def test_chosen_holds_only_the_tuned_grid_point_and_a_few_learned_values() -> None:
    r = table_row({"alpha": 0.5, "beta": 0.6, "gamma": 0.7})
    tried = [{"params": {"scaling": 0.1}}, {"params": {"scaling": 0.3}}]
    rows = {
        "pretrained": r,
        # tuned: params is the grid point tuning chose
        "ties": {**r, "params": {"k": 20, "scaling": 0.3}, "tuning": tried},
        # as configured: params are the method's options, nothing was chosen
        "fisher": {**r, "params": {"num_examples": 256, "labels": "sample"}, "method_report": {"fisher_split": "x"}},
        # learned, few: each one; diagnostics are left out
        "metagpt": {
            **r,
            "params": {"granularity": "model"},
            "method_report": {"lambda/alpha": 0.2, "lambda/beta": 0.3, "lambda/gamma": 0.5},
        },
        # learned, many: their count and range
        "adamerging": {
            **r,
            "params": {"steps": 200, "lr": 0.001},
            "method_report": {"entropy_end": 5.4, **{f"lambda_t{i}": 0.1 * i for i in range(1, 7)}},
        },
        "awd_ta": {**r, "params": {"merge.scaling": 0.3}, "tuning": tried, "method_report": {"L_O_start": 0.09}},
        # a run that states what was chosen
        "stated": {**r, "params": {"alpha": 1.0, "svd": "full"}, "chosen": {"alpha": 1.0}},
        "regex": {**r, "params": {"include": "(a|b)"}, "tuning": tried},
    }
    columns, data = table_records(rows, TASKS)
    assert columns[-1] == "chosen"
    assert {rec[0]: rec[-1] for rec in data} == {
        "pretrained": "",
        "ties": "k=20, scaling=0.3",
        "fisher": "",
        "metagpt": "lambda/alpha=0.200, lambda/beta=0.300, lambda/gamma=0.500",
        "adamerging": "6 learned lambda_* in [0.100, 0.600] (see metrics.json)",
        "awd_ta": "merge.scaling=0.3",
        "stated": "alpha=1.0",
        "regex": "include=(a|b)",
    }
    table = markdown_table(rows, TASKS).splitlines()
    assert {line.replace("\\|", "").count("|") for line in table} == {len(TASKS) + 5}  # "|" escaped in a cell


@pytest.mark.parametrize("run_dir", ["embedded_table", "smollm2_data_free", "smollm2_generative"])
def test_the_committed_tables_are_the_librarys_own_from_their_metrics(run_dir: str) -> None:
    """results.md/csv of the committed runs are what the library makes of their metrics.json (regenerated, not
    hand-edited), and their Chosen cells stay short: the full options are in metrics.json only."""
    out = ROOT / "experiments" / run_dir
    metrics = json.loads((out / "metrics.json").read_text())
    table = (out / "results.md").read_text()
    title = table.splitlines()[0].removeprefix("## ")
    assert table == markdown_table(metrics["rows"], metrics["tasks"], title)
    _columns, data = table_records(metrics["rows"], metrics["tasks"])
    for rec in data:
        row = metrics["rows"][rec[0]]
        assert rec[-1].count("=") <= 5 and len(rec[-1]) <= 100, rec  # a few values
        if row.get("tuning"):
            assert rec[-1].startswith(", ".join(f"{k}={v}" for k, v in row["params"].items()))


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


def test_adamerging_plot_and_sweep_summary_follow_the_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
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
    ax = recorded_sweep_figure(sweep, monkeypatch)
    assert len(ax.lines) == 1  # one swept value: the objective is the only series


def recorded_sweep_figure(sweep: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The axes of the figure :func:`write_summary` draws for ``sweep`` (None: none drawn)."""
    saved: list[Any] = []
    save = sweep_plots.atomic_save_figure
    monkeypatch.setattr(sweep_plots, "atomic_save_figure", lambda fig, path: saved.append(fig) or save(fig, path))
    write_summary(sweep)
    return saved[-1].axes[0] if saved else None


def sweep_job(sweep: Path, job: int, overrides: list[str], objective: float | None, rows: dict | None = None) -> None:
    """A finished sweep job (objective None: a failed one)."""
    (sweep / str(job)).mkdir(parents=True)
    if objective is None:
        (sweep / str(job) / "failed.json").write_text(json.dumps({"message": "boom", "overrides": overrides}))
        return
    metrics = {"overrides": overrides, "objective": {"name": "validation/avg_acc", "value": objective}}
    (sweep / str(job) / "metrics.json").write_text(json.dumps({**metrics, "rows": rows or {}}))


def test_a_sweep_of_two_values_is_a_heatmap_of_the_objective(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sweep, objective = tmp_path / "sweep", {}
    job = 0
    for k in ("20", "10"):
        for scaling in ("1.0", "0.1", "0.5"):  # not in order: the axis sorts them as numbers
            value = None if (k, scaling) == ("10", "0.5") else 0.4 + 0.01 * job
            sweep_job(sweep, job, ["method=ties", f"method.k={k}", f"method.scaling={scaling}"], value)
            objective[(k, scaling)] = value
            job += 1
    ax = recorded_sweep_figure(sweep, monkeypatch)
    xs, ys = ticks(ax, "x"), ticks(ax, "y")
    assert list(xs) == ["0.1", "0.5", "1.0"] and list(ys) == ["10", "20"]
    assert ax.get_xlabel().startswith("method.scaling") and ax.get_ylabel() == "method.k"
    drawn = cells(ax)
    for (k, scaling), value in objective.items():
        text = drawn[(round(xs[scaling], 3), round(ys[k], 3))].get_text()
        assert text == ("n/a" if value is None else f"{percent(value):.2f}")
    assert (sweep / "summary.png").stat().st_size > 1000


def test_a_sweep_of_more_values_is_a_heatmap_of_jobs_and_scores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sweep, jobs = tmp_path / "sweep", []
    rng = random.Random(0)
    for job, (method, seed, scaling) in enumerate(
        (m, s, c) for m in ("ties", "dare") for s in (0, 1) for c in (0.3, 0.5)
    ):
        rows = {"experts": {"avg_acc": 0.9}, method: {"avg_acc": rng.random()}}
        value = None if job == 3 else rng.random()
        sweep_job(sweep, job, [f"method={method}", f"seed={seed}", f"method.scaling={scaling}"], value, rows)
        jobs.append((value, None if value is None else rows))
    ax = recorded_sweep_figure(sweep, monkeypatch)
    xs, ys = ticks(ax, "x"), ticks(ax, "y")
    assert list(xs) == ["validation/avg_acc (objective)", "experts", "ties", "dare"]
    labels = list(ys)
    assert labels[0] == "#0  ties, 0, 0.3" and labels[3] == "#3  ties, 1, 0.5 (failed)"
    assert len(ys) == len(jobs) and ax.get_ylabel() == "job  method, seed, method.scaling"
    drawn = cells(ax)
    for (value, rows), y in zip(jobs, ys.values(), strict=True):
        expected = [value, *((rows or {}).get(n, {}).get("avg_acc") for n in ("experts", "ties", "dare"))]
        texts = [drawn[(round(x, 3), round(y, 3))].get_text() for x in xs.values()]
        assert texts == ["n/a" if v is None else f"{percent(v):.2f}" for v in expected]
    best = max(range(len(jobs)), key=lambda i: jobs[i][0] if jobs[i][0] is not None else -1)
    assert [t.get_fontweight() for t in ax.get_yticklabels()].count("bold") == 1
    assert ax.get_yticklabels()[best].get_fontweight() == "bold"
