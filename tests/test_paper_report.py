"""mergelab-report: the paper tables, the normalized averages, runs aggregated into a paper's layout, the command."""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mergelab.reports import paper as pr
from mergelab.reports.paper.cli import main as report_main

ROOT = Path(__file__).resolve().parents[1]
PAPERS = ROOT / "data" / "papers"
TABLES = sorted(PAPERS.glob("*.yaml"))

# A small table of made-up numbers (test data, not a paper): three tasks, one published per-task row.
TOY_TABLE = """
name: toy
title: Toy table
paper: {title: A toy paper, authors: Nobody, year: 2000, arxiv: "0000.00000"}
model: toy-model
metric: accuracy (%)
unit: percent
decimals: 1
normalized: {definition: mean_of_ratios, unit: ratio, decimals: 2}
tasks:
  - {name: Alpha, aliases: [alpha_task]}
  - {name: Beta}
  - {name: Gamma}
methods:
  - {name: Individual, method: experts, average: 90.0}
  - name: Task Arithmetic
    method: task_arithmetic
    scores: {Alpha: 70.0, Beta: 60.0, Gamma: 50.0}
    average: 60.0
    normalized: 0.7
  - {name: TIES, method: ties, average: 65.0}
  - {name: AWD-TA, method: awd, rows: [awd_ta, awd], options: {merge: task_arithmetic}, average: 70.0}
  - {name: AWD-TIES, method: awd, rows: [awd_ties, awd], options: {merge: ties}}
  - {name: RegMean, method: null, average: 66.0}
"""
TASKS = ["alpha_task", "Beta", "gamma"]  # as a suite may name them: alias, same name, other case
EXPERTS = {"alpha_task": 0.9, "Beta": 0.8, "gamma": 1.0}


def row(accs: dict[str, float], val: float | None = None, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """A metrics.json row as run.py writes it (scores per task, averages, optional validation score)."""
    out: dict[str, Any] = {
        "scores": {t: {"acc": a, "f1": a / 2} for t, a in accs.items()},
        "avg_acc": sum(accs.values()) / len(accs),
    }
    if val is not None:
        out["validation_avg_acc"] = val
    if params:
        out["params"] = params
    return out


def write_run(
    path: Path, rows: dict[str, dict[str, Any]], config: dict[str, Any] | None = None, tasks: list[str] | None = None
) -> Path:
    """A fake run dir: metrics.json (and config.yaml when given)."""
    path.mkdir(parents=True)
    results = {
        "suite": "toy",
        "report_split": "test",
        "tune_split": "validation",
        "tasks": tasks or TASKS,
        "rows": rows,
    }
    (path / "metrics.json").write_text(json.dumps(results))
    if config is not None:
        (path / "config.yaml").write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    path = tmp_path / "toy.yaml"
    path.write_text(TOY_TABLE)
    return path


@pytest.fixture
def two_runs(tmp_path: Path) -> tuple[Path, Path]:
    """Two runs sharing their experts: both have task arithmetic (run b's validation score is higher)."""
    a = write_run(
        tmp_path / "runs" / "a",
        {
            "pretrained": row({"alpha_task": 0.3, "Beta": 0.2, "gamma": 0.1}),
            "experts": row(EXPERTS),
            "task_arithmetic": row({"alpha_task": 0.6, "Beta": 0.4, "gamma": 0.5}, val=0.50, params={"scaling": 0.3}),
            "ties": row({"alpha_task": 0.65, "Beta": 0.55, "gamma": 0.75}, val=0.60),
        },
    )
    b = write_run(
        tmp_path / "runs" / "b",
        {
            "pretrained": row({"alpha_task": 0.3, "Beta": 0.2, "gamma": 0.1}),
            "experts": row(EXPERTS),
            "task_arithmetic": row({"alpha_task": 0.7, "Beta": 0.6, "gamma": 0.8}, val=0.55, params={"scaling": 0.5}),
            "awd": row({"alpha_task": 0.72, "Beta": 0.62, "gamma": 0.9}, val=0.7, params={"scaling": 0.3}),
        },
        config={"method": {"name": "awd", "merge": "ties", "scaling": 0.3}},
    )
    return a, b


# ---------------------------------------------------------------------------------------------------------------
# Normalized averages


def test_normalized_definitions_against_hand_computation() -> None:
    scores = {"a": 0.5, "b": 0.9, "c": 0.3}
    reference = {"a": 1.0, "b": 0.6, "c": 0.6}
    # mean of ratios: (0.5/1.0 + 0.9/0.6 + 0.3/0.6) / 3 = (0.5 + 1.5 + 0.5) / 3
    assert pr.normalized_average(scores, reference, "mean_of_ratios") == pytest.approx(2.5 / 3)
    # ratio of means: (1.7 / 3) / (2.2 / 3)
    assert pr.normalized_average(scores, reference, "ratio_of_means") == pytest.approx(1.7 / 2.2)
    assert pr.normalized_average(scores, reference, "none") is None
    # The two differ whenever the experts' scores differ across tasks: they are not interchangeable.
    assert not math.isclose(2.5 / 3, 1.7 / 2.2)


def test_normalized_average_is_missing_without_every_task() -> None:
    reference = {"a": 1.0, "b": 0.5}
    assert pr.normalized_average({"a": 0.5, "b": None}, reference, "mean_of_ratios") is None
    assert pr.normalized_average({"a": 0.5, "b": 0.5, "c": 0.5}, reference, "ratio_of_means") is None
    assert pr.normalized_average({"a": 0.5}, {"a": 0.0}, "mean_of_ratios") is None
    with pytest.raises(pr.ReportError, match="mean_of_ratios"):
        pr.normalized_average({"a": 0.5}, reference, "median_of_ratios")


# ---------------------------------------------------------------------------------------------------------------
# The published tables


@pytest.mark.parametrize("path", TABLES, ids=[p.stem for p in TABLES])
def test_paper_table_loads_and_per_task_numbers_average_to_the_stated_average(path: Path) -> None:
    table = pr.load_table(path.stem)
    assert table.name == path.stem and table.tasks and table.methods
    assert table.normalized in pr.DEFINITIONS
    if table.paper is not None:
        assert table.paper["title"] and table.paper["arxiv"]
    raw = yaml.safe_load(path.read_text())
    unit = 10.0**-table.decimals
    for m in raw["methods"]:
        scores = m.get("scores") or {}
        if len(scores) == len(table.tasks) and m.get("average") is not None:
            mean = sum(scores.values()) / len(scores)
            # Each per-task number and the average are rounded to `decimals`: together at most one unit apart.
            assert abs(mean - m["average"]) <= unit + 1e-9, f"{path.name}: {m['name']}: {mean} vs {m['average']}"


def test_the_per_task_check_is_not_vacuous() -> None:
    checked = [
        p.stem for p in TABLES for m in yaml.safe_load(p.read_text())["methods"] if len(m.get("scores") or {}) > 1
    ]
    assert {"awd_vit_b32", "metagpt_llama2_7b"} <= set(checked)


def known_rows() -> set[str]:
    """Row names a mergelab run can produce: method names, table-experiment row names, the reference rows."""
    names = set(pr.REFERENCE_ROWS)
    for p in (ROOT / "conf" / "method").glob("*.yaml"):
        names.add(yaml.safe_load(p.read_text())["name"])
    for p in (ROOT / "conf" / "experiment").glob("*.yaml"):
        doc = yaml.safe_load(p.read_text()) or {}
        names.update(((doc.get("table") or {}).get("methods") or {}).keys())
        for entry in doc.get("defaults") or []:
            key = next(iter(entry)) if isinstance(entry, dict) else entry
            if "@table.methods." in key:
                names.add(key.split("@table.methods.")[1])
    return names


@pytest.mark.parametrize("path", TABLES, ids=[p.stem for p in TABLES])
def test_paper_table_maps_to_existing_methods_and_rows(path: Path) -> None:
    methods = {p.stem for p in (ROOT / "conf" / "method").glob("*.yaml")}
    rows = known_rows()
    for m in pr.load_table(path.stem).methods:
        assert m.method is None or m.method in methods | set(pr.REFERENCE_ROWS), f"{m.name}: {m.method}"
        assert set(m.rows) <= rows, f"{m.name}: {m.rows} not in {sorted(rows)}"
        if m.options:
            assert set(m.options) <= method_keys(m.method), f"{m.name}: options {m.options}"


def method_keys(method: str) -> set[str]:
    """The keys of ``conf/method/<method>.yaml``, with those its defaults list fills (``/method@merge: ...``)."""
    doc = yaml.safe_load((ROOT / "conf" / "method" / f"{method}.yaml").read_text())
    keys = set(doc) - {"defaults"}
    for entry in doc.get("defaults") or []:
        group = next(iter(entry)) if isinstance(entry, dict) else entry
        if "@" in group:
            keys.add(group.split("@", 1)[1])
    return keys


def test_unknown_table_lists_the_available_ones() -> None:
    with pytest.raises(pr.ReportError) as e:
        pr.load_table("no_such_table")
    for path in TABLES:
        assert path.stem in str(e.value)


def test_bad_table_names_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "toy.yaml"
    path.write_text(TOY_TABLE.replace("Gamma: 50.0", "Gama: 50.0"))
    with pytest.raises(pr.ReportError, match=r"toy\.yaml: methods\[1\] \(Task Arithmetic\)\.scores: unknown task"):
        pr.load_table(path)
    path.write_text(TOY_TABLE.replace("definition: mean_of_ratios", "definition: mean"))
    with pytest.raises(pr.ReportError, match=r"toy\.yaml: normalized\.definition"):
        pr.load_table(path)


# ---------------------------------------------------------------------------------------------------------------
# Aggregating runs


def test_two_runs_aggregate_into_the_layout(toy: Path, two_runs: tuple[Path, Path]) -> None:
    a, b = two_runs
    report = pr.build_report(pr.load_table(toy), pr.find_runs([a, b]))
    assert dict(report.task_columns) == {"Alpha": "alpha_task", "Beta": "Beta", "Gamma": "gamma"}
    rows = {r.method.name: r for r in report.rows}
    assert [r.method.name for r in report.rows] == [
        "Individual",
        "Task Arithmetic",
        "TIES",
        "AWD-TA",
        "AWD-TIES",
        "RegMean",
    ]

    ta = rows["Task Arithmetic"]  # run b's: the higher validation score
    assert ta.source is not None and ta.source.endswith("b:task_arithmetic")
    assert ta.ours == pytest.approx({"Alpha": 70.0, "Beta": 60.0, "Gamma": 80.0})
    assert ta.ours_average == pytest.approx((70 + 60 + 80) / 3)
    assert ta.ours_normalized == pytest.approx((0.7 / 0.9 + 0.6 / 0.8 + 0.8 / 1.0) / 3)  # ratio unit: no x100
    assert ta.paper == {"Alpha": 70.0, "Beta": 60.0, "Gamma": 50.0}
    assert ta.paper_average == 60.0 and ta.paper_normalized == 0.7 and not ta.paper_normalized_derived
    assert ta.diff_average == pytest.approx((70 + 60 + 80) / 3 - 60.0)
    assert ta.diff_normalized == pytest.approx((0.7 / 0.9 + 0.6 / 0.8 + 0.8 / 1.0) / 3 - 0.7)

    assert rows["TIES"].source is not None and rows["TIES"].source.endswith("a:ties")
    assert rows["TIES"].ours_average == pytest.approx((65 + 55 + 75) / 3)
    assert rows["Individual"].ours_normalized == pytest.approx(1.0)
    assert rows["Individual"].paper_average == 90.0
    # run b's config says its awd row merges with TIES: AWD-TIES, not AWD-TA.
    assert rows["AWD-TIES"].source is not None and rows["AWD-TIES"].source.endswith("b:awd")
    assert rows["AWD-TIES"].ours["Gamma"] == pytest.approx(90.0)
    for name in ("AWD-TA", "RegMean"):
        r = rows[name]
        assert r.source is None and r.ours_average is None and r.ours_normalized is None
        assert all(v is None for v in r.ours.values())
    assert rows["RegMean"].paper_average == 66.0 and rows["RegMean"].diff_average is None
    assert any(u.endswith("a:pretrained") for u in report.unused)


def test_a_missing_task_is_shown_missing_not_zero(toy: Path, tmp_path: Path) -> None:
    run = write_run(
        tmp_path / "run",
        {
            "experts": row({"alpha_task": 0.9, "Beta": 0.8}),
            "task_arithmetic": row({"alpha_task": 0.6, "Beta": 0.4}, val=0.5),
        },
        tasks=["alpha_task", "Beta"],
    )
    report = pr.build_report(pr.load_table(toy), pr.find_runs([run]))
    ta = next(r for r in report.rows if r.method.name == "Task Arithmetic")
    assert report.task_columns["Gamma"] is None
    assert ta.ours["Gamma"] is None and ta.ours["Alpha"] == pytest.approx(60.0)
    assert ta.ours_average is None and ta.ours_normalized is None and ta.diff_average is None
    md = pr.markdown_report(report)
    line = next(x for x in md.splitlines() if x.startswith("| Task Arithmetic"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[3] == f"{pr.MISSING} / 50.0" and cells[4] == f"{pr.MISSING} / 60.0"
    assert "Tasks the runs lack: Gamma" in md
    records = list(csv.DictReader(io.StringIO(pr.csv_report(report))))
    ta_rec = next(r for r in records if r["method"] == "Task Arithmetic")
    assert ta_rec["Gamma ours"] == "" and ta_rec["avg ours"] == "" and ta_rec["Gamma paper"] == "50"


def test_several_rows_without_a_validation_score_are_an_error_naming_the_runs(toy: Path, tmp_path: Path) -> None:
    rows = {"experts": row(EXPERTS), "task_arithmetic": row({"alpha_task": 0.6, "Beta": 0.4, "gamma": 0.5})}
    a = write_run(tmp_path / "first", rows)
    b = write_run(tmp_path / "second", rows)
    with pytest.raises(pr.ReportError) as e:
        pr.build_report(pr.load_table(toy), pr.find_runs([a, b]))
    assert "first:task_arithmetic" in str(e.value) and "second:task_arithmetic" in str(e.value)
    assert "validation_avg_acc" in str(e.value)


def test_runs_whose_experts_differ_are_an_error(toy: Path, tmp_path: Path) -> None:
    a = write_run(tmp_path / "first", {"experts": row(EXPERTS)})
    b = write_run(tmp_path / "second", {"experts": row({**EXPERTS, "gamma": 0.5})})
    with pytest.raises(pr.ReportError, match=r"first:experts.*second:experts"):
        pr.build_report(pr.load_table(toy), pr.find_runs([a, b]))


def test_a_row_its_run_cannot_place_is_an_error_until_mapped(toy: Path, tmp_path: Path) -> None:
    # No config.yaml and no merge option in params: the awd row could be AWD-TA or AWD-TIES.
    run = write_run(tmp_path / "run", {"experts": row(EXPERTS), "awd": row(EXPERTS, val=0.9)})
    runs = pr.find_runs([run])
    with pytest.raises(pr.ReportError, match="--map"):
        pr.build_report(pr.load_table(toy), runs)
    report = pr.build_report(pr.load_table(toy), runs, method_map={"AWD-TA": "awd"})
    rows = {r.method.name: r for r in report.rows}
    assert rows["AWD-TA"].source is not None and rows["AWD-TIES"].source is None


def test_table_experiment_rows_take_their_options_from_config(toy: Path, tmp_path: Path) -> None:
    run = write_run(
        tmp_path / "run",
        # ties: a row the table matches, so that the report is made (a run matching nothing is an error)
        {"experts": row(EXPERTS), "awd_ta": row(EXPERTS, val=0.9, params={"scaling": 0.5}), "ties": row(EXPERTS)},
        config={"method": {"name": "awd_ta", "merge": "x"}, "table": {"methods": {"awd_ta": {"merge": "ties"}}}},
    )
    (loaded,) = pr.find_runs([run])
    # table.methods.<row> wins over `method` in a table experiment; the chosen grid point overlays both.
    assert loaded.row_options("awd_ta") == {"merge": "ties", "scaling": 0.5}
    # A row named awd_ta whose config says it merged with TIES is not the paper's AWD-TA.
    report = pr.build_report(pr.load_table(toy), [loaded])
    assert next(r for r in report.rows if r.method.name == "AWD-TA").source is None


def test_an_inner_method_node_matches_by_its_name(toy: Path, tmp_path: Path) -> None:
    # AWD's merge composed as a method node (``/method@merge: ties``) in the run's config.yaml.
    node = {"_target_": "mergelab.methods.TIES", "name": "ties", "k": 20, "scaling": 0.3}
    run = write_run(
        tmp_path / "run",
        {"experts": row(EXPERTS), "awd": row(EXPERTS, val=0.9)},
        config={"method": {"name": "awd", "merge": node}},
    )
    rows = {r.method.name: r for r in pr.build_report(pr.load_table(toy), pr.find_runs([run])).rows}
    assert rows["AWD-TIES"].source is not None and rows["AWD-TA"].source is None


def test_paper_normalized_under_another_definition_is_derived_from_its_numbers(tmp_path: Path) -> None:
    tasks = ["sun397", "stanford_cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]
    accs = {t: 0.5 + 0.05 * i for i, t in enumerate(tasks)}
    run = write_run(
        tmp_path / "vit",
        {"experts": row(dict.fromkeys(tasks, 0.9)), "awd": row(accs, val=0.7)},
        config={"method": {"name": "awd", "merge": "task_arithmetic"}},
        tasks=tasks,
    )
    table = pr.load_table("awd_vit_b32")
    published = {m["name"]: m for m in yaml.safe_load((PAPERS / "awd_vit_b32.yaml").read_text())["methods"]}
    plain = {r.method.name: r for r in pr.build_report(table, pr.find_runs([run])).rows}
    assert plain["AWD"].paper_normalized is None and plain["AWD"].ours_normalized is None  # the paper has none
    assert plain["AWD"].ours_average == pytest.approx(100 * sum(accs.values()) / 8)
    assert plain["AWD"].diff_average == pytest.approx(100 * sum(accs.values()) / 8 - published["AWD"]["average"])
    assert plain["AWD"].paper["Cars"] == published["AWD"]["scores"]["Cars"]
    report = pr.build_report(table, pr.find_runs([run]), definition="ratio_of_means")
    awd = next(r for r in report.rows if r.method.name == "AWD")
    expected = 100 * published["AWD"]["average"] / published["Individual"]["average"]
    assert awd.paper_normalized == pytest.approx(expected) and awd.paper_normalized_derived
    assert awd.ours_normalized == pytest.approx(100 * (sum(accs.values()) / 8) / 0.9)
    assert "derived from the paper's published numbers" in pr.markdown_report(report)


def test_metagpt_table_with_sparsified_variants(tmp_path: Path) -> None:
    tasks = ["winogrande", "agieval", "gsm8k", "math", "mbpp", "humaneval"]
    experts = dict(zip(tasks, [0.6, 0.3, 0.4, 0.1, 0.3, 0.2], strict=True))
    plain = dict(zip(tasks, [0.62, 0.31, 0.44, 0.08, 0.2, 0.18], strict=True))
    a = write_run(
        tmp_path / "plain",
        {"experts": row(experts), "metagpt": row(plain, val=0.4)},
        config={"method": {"name": "metagpt", "sparsify": None}},
        tasks=tasks,
    )
    b = write_run(
        tmp_path / "ties",
        {"experts": row(experts), "metagpt": row(experts, val=0.3)},
        config={"method": {"name": "metagpt", "sparsify": {"_target_": "mergelab.methods.TIES", "name": "ties"}}},
        tasks=tasks,
    )
    published = {m["name"]: m for m in yaml.safe_load((PAPERS / "metagpt_llama2_7b.yaml").read_text())["methods"]}
    rows = {r.method.name: r for r in pr.build_report(pr.load_table("metagpt_llama2_7b"), pr.find_runs([a, b])).rows}
    mg = rows["MetaGPT"]
    assert mg.source is not None and mg.source.endswith("plain:metagpt")
    assert mg.ours_normalized == pytest.approx(sum(plain[t] / experts[t] for t in tasks) / 6)  # Nor. Avg: a ratio
    assert mg.paper_normalized == published["MetaGPT"]["normalized"]
    assert mg.paper["GSM8K"] == published["MetaGPT"]["scores"]["GSM8K"]
    combined = rows["TIES+MetaGPT"]
    assert combined.source is not None and combined.source.endswith("ties:metagpt")
    assert combined.ours_normalized == pytest.approx(1.0)
    assert combined.paper_average == published["TIES+MetaGPT"]["average"]
    assert rows["DARE+MetaGPT"].source is None


def test_the_embedded_table_on_the_measured_run() -> None:
    """mergelab's own layout (no published numbers) on the committed embedded-table run."""
    run_dir = ROOT / "experiments" / "embedded_table"
    results = json.loads((run_dir / "metrics.json").read_text())
    table = pr.load_table("embedded")
    report = pr.build_report(table, pr.find_runs([run_dir]))
    assert not table.has_published
    assert all(report.task_columns[t] == t for t in results["tasks"])
    for r in report.rows:
        name = r.method.rows[0]
        if name in results["rows"]:
            scores = results["rows"][name]["scores"]
            assert r.ours_average == pytest.approx(100 * sum(s["acc"] for s in scores.values()) / len(scores))
            # run.py's own normalized accuracy (mean over tasks of merged / expert), computed independently.
            assert r.ours_normalized == pytest.approx(100 * results["rows"][name]["avg_norm_acc"])
        else:
            assert r.source is None and r.ours_average is None
    md = pr.markdown_report(report)
    assert " / " not in md.split("Rows used")[0].split("\n| Method")[1]  # no published column to put beside


# ---------------------------------------------------------------------------------------------------------------
# Bad runs


def test_bad_metrics_json_errors_name_the_file_and_key(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.json").write_text('{"rows": {')
    with pytest.raises(pr.ReportError, match=r"broken/metrics\.json: not valid JSON"):
        pr.find_runs([broken])
    bad_value = write_run(tmp_path / "bad", {"ties": row({"alpha_task": 0.5})})
    results = json.loads((bad_value / "metrics.json").read_text())
    results["rows"]["ties"]["scores"]["alpha_task"]["acc"] = "high"
    (bad_value / "metrics.json").write_text(json.dumps(results))
    with pytest.raises(pr.ReportError, match=r"bad/metrics\.json: rows\.ties\.scores\.alpha_task\.acc: expected"):
        pr.find_runs([bad_value])
    merge_only = tmp_path / "merge_only"
    merge_only.mkdir()
    (merge_only / "metrics.json").write_text(json.dumps({"method": "metagpt", "merged_model": "x"}))
    with pytest.raises(pr.ReportError, match="merge-only run"):
        pr.find_runs([merge_only])
    (tmp_path / "empty").mkdir()
    with pytest.raises(pr.ReportError, match=r"empty: no metrics.json in it or in its job subdirs"):
        pr.find_runs([tmp_path / "empty"])


def test_runs_of_different_suites_are_refused(tmp_path: Path) -> None:
    a = write_run(tmp_path / "a", {"experts": row(EXPERTS)})
    b = write_run(tmp_path / "b", {"experts": row(EXPERTS)})
    results = json.loads((b / "metrics.json").read_text())
    results["suite"] = "other"
    (b / "metrics.json").write_text(json.dumps(results))
    with pytest.raises(pr.ReportError, match="differ in 'suite'"):
        pr.find_runs([a, b])


# ---------------------------------------------------------------------------------------------------------------
# The command


def test_main_writes_md_csv_png_and_refuses_to_overwrite(
    toy: Path, two_runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report"
    argv = [str(p) for p in two_runs] + ["--table", str(toy), "--out", str(out)]
    assert report_main(argv) == 0
    printed = capsys.readouterr().out
    assert "| Task Arithmetic | 70.0 / 70.0 | 60.0 / 60.0 | 80.0 / 50.0 |" in printed
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "report.md").read_text() in printed
    records = list(csv.DictReader(io.StringIO((out / "report.csv").read_text())))
    assert [r["method"] for r in records] == [
        m.method.name for m in pr.build_report(pr.load_table(toy), pr.find_runs(two_runs)).rows
    ]
    before = (out / "report.md").read_text()

    assert report_main([*argv, "--normalized", "ratio_of_means"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "report.md").read_text() == before
    assert report_main([*argv, "--normalized", "ratio_of_means", "--overwrite"]) == 0
    assert "ratio_of_means" in (out / "report.md").read_text()


def test_main_reports_bad_input_on_stderr(
    toy: Path, two_runs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert report_main([str(two_runs[0]), "--table", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown table 'nope'" in err and "awd_vit_b32" in err
    assert report_main([str(two_runs[0]), "--table", str(toy), "--map", "Nope=ties"]) == 2
    assert "no method 'Nope'" in capsys.readouterr().err


def test_main_fails_in_one_line_when_no_row_matches_the_table(
    toy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The reference rows match the table's Individual, but no merge row matches any method it compares.
    run = write_run(
        tmp_path / "runs" / "mine",
        {"pretrained": row(EXPERTS), "experts": row(EXPERTS), "my_merge": row(EXPERTS, val=0.5)},
    )
    out = tmp_path / "report"
    assert report_main([str(run), "--table", str(toy), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and not out.exists()
    (line,) = captured.err.splitlines()
    assert line.startswith(f"mergelab-report: error: nothing in {run} matches table toy: ")
    assert "the runs have rows pretrained, experts, my_merge;" in line
    assert "task_arithmetic (Task Arithmetic)" in line and "awd_ta|awd merge=task_arithmetic (AWD-TA)" in line
    assert "--map METHOD=ROW" in line
    # Mapped, the same run makes a report.
    assert report_main([str(run), "--table", str(toy), "--out", str(out), "--map", "TIES=my_merge"]) == 0
    assert (out / "report.md").is_file()


def test_no_matching_task_is_an_error_naming_both_sides(toy: Path, tmp_path: Path) -> None:
    a = write_run(
        tmp_path / "a",
        {"experts": row({"x": 0.9, "y": 0.8}), "ties": row({"x": 0.5, "y": 0.4}, val=0.4)},
        tasks=["x", "y"],
    )
    b = write_run(
        tmp_path / "b",
        {"experts": row({"x": 0.9, "y": 0.8}), "ties": row({"x": 0.6, "y": 0.4}, val=0.5)},
        tasks=["x", "y"],
    )
    with pytest.raises(pr.ReportError) as e:
        pr.build_report(pr.load_table(toy), pr.find_runs([a, b]))
    message = str(e.value)
    assert "\n" not in message and f"nothing in {a}, {b} matches table toy" in message
    assert "the runs have tasks x, y; the table expects tasks Alpha, Beta, Gamma" in message


def test_console_script_on_a_sweep_dir(tmp_path: Path) -> None:
    """The installed ``mergelab-report`` on a Hydra-style sweep dir (job subdirs 0, 1 with metrics.json)."""
    tasks = ["sun397", "stanford_cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]
    experts = dict.fromkeys(tasks, 0.9)
    write_run(
        tmp_path / "sweep" / "0", {"experts": row(experts), "ties": row(dict.fromkeys(tasks, 0.7), 0.6)}, tasks=tasks
    )
    write_run(
        tmp_path / "sweep" / "1", {"experts": row(experts), "ties": row(dict.fromkeys(tasks, 0.8), 0.7)}, tasks=tasks
    )
    script = Path(sys.executable).parent / "mergelab-report"
    done = subprocess.run(
        [str(script), str(tmp_path / "sweep"), "--table", "awd_vit_b32"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    out = tmp_path / "sweep" / "paper_report" / "awd_vit_b32"
    assert {p.name for p in out.iterdir()} == set(pr.REPORT_FILES)
    ties = next(x for x in done.stdout.splitlines() if x.startswith("| TIES-Merging"))
    published = {m["name"]: m for m in yaml.safe_load((PAPERS / "awd_vit_b32.yaml").read_text())["methods"]}
    assert f"80.0 / {published['TIES-Merging']['average']:.1f}" in ties  # job 1: the better validation score
    again = subprocess.run(
        [str(script), str(tmp_path / "sweep"), "--table", "awd_vit_b32"], capture_output=True, text=True, check=False
    )
    assert again.returncode == 2 and "--overwrite" in again.stderr
    listed = subprocess.run([str(script), "--list"], capture_output=True, text=True, check=True).stdout
    assert all(p.stem in listed for p in TABLES)
