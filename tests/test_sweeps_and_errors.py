"""Failures reach the user as one line; a sweep lists every job (failed ones too) and can be resumed; mappings
with a key given twice and tasks listed twice are refused; an unfinished run never blocks its rerun."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mergelab.cli import check_command_line, repeated_keys
from mergelab.pools.checkpoint import CheckpointPool
from mergelab.reports.sweep import summarize
from mergelab.run import claim_output_dir, run
from tests.conftest import make_cfg
from tests.test_run_flow import pool_dirs, pool_overrides  # noqa: F401  (pool_dirs is a fixture)

CLI = [sys.executable, "-m", "mergelab.cli"]


def mergelab(*args: str, full_error: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    if full_error:
        env["HYDRA_FULL_ERROR"] = "1"
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=600)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error" in line.lower() or "Traceback" in line]


def test_a_failed_run_says_why_in_one_line(pool_dirs: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:  # noqa: F811
    args = [*pool_overrides(pool_dirs), "eval=none", "method.scaling=-1", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = mergelab(*args)
    assert proc.returncode == 1
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert "option 'scaling' must be >= 0.0, got -1" in lines[0] and "HYDRA_FULL_ERROR=1" in lines[0]
    assert not (tmp_path / "run" / "metrics.json").exists()
    full = mergelab(*args, full_error=True)
    assert full.returncode == 1 and "Traceback" in full.stderr and "option 'scaling'" in full.stderr


def test_a_sweep_lists_every_job_and_resumes_the_unfinished_ones(
    pool_dirs: tuple[Path, dict[str, Path]],  # noqa: F811
    tmp_path: Path,
) -> None:
    sweep = tmp_path / "sweep"
    args = ["-m", *pool_overrides(pool_dirs), "eval=none", "method.scaling=0.3,0.5,-1", f"hydra.sweep.dir={sweep}"]
    proc = mergelab(*args)
    assert proc.returncode == 1, proc.stderr[-3000:]  # one job failed; the others ran
    assert "Traceback" not in proc.stderr
    records = summarize(sweep)
    assert [(r["job"], r["status"], r["method.scaling"]) for r in records] == [
        ("0", "done", "0.3"),
        ("1", "done", "0.5"),
        ("2", "failed", "-1"),
    ]
    assert "option 'scaling'" in records[2]["error"]
    table = (sweep / "summary.md").read_text()
    assert "| job | status | method.scaling |" in table and "| 2 | failed | -1 |" in table
    assert json.loads((sweep / "summary.json").read_text())[2]["status"] == "failed"

    # Job 1 is left as if killed after writing its merged model: no metrics.json, a leftover merged_model.
    (sweep / "1" / "metrics.json").unlink()
    finished = (sweep / "0" / "metrics.json").read_bytes()
    mtime = (sweep / "0" / "metrics.json").stat().st_mtime_ns
    proc = mergelab(*args, "resume=true")
    assert proc.returncode == 1, proc.stderr[-3000:]  # job 2 is still wrong
    assert (sweep / "0" / "metrics.json").read_bytes() == finished
    assert (sweep / "0" / "metrics.json").stat().st_mtime_ns == mtime  # skipped, not redone
    redone = json.loads((sweep / "1" / "metrics.json").read_text())
    assert redone["params"]["scaling"] == 0.5 and Path(redone["merged_model"]).is_dir()
    assert [r["status"] for r in summarize(sweep)] == ["done", "done", "failed"]


def test_the_output_dir_is_claimed_once(tmp_path: Path) -> None:
    out = tmp_path / "job"
    out.mkdir()
    (out / "merged_model").mkdir()
    (out / "merged_model" / "model.safetensors").write_bytes(b"partial")
    (out / "config.yaml").write_text("somebody's own file")
    (out / "failed.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"holds \['config.yaml', 'merged_model'\] but no mergelab run wrote"):
        claim_output_dir(out, overwrite=False, resume=False, overrides=["a=1"], multirun=False)
    assert (out / "config.yaml").read_text() == "somebody's own file"  # not mergelab's: never deleted
    (out / ".mergelab-results").touch()  # what a run creates before it writes its first result
    assert claim_output_dir(out, overwrite=False, resume=False, overrides=["a=1"], multirun=False) is None
    assert not (out / "merged_model").exists() and not (out / "failed.json").exists()  # an unfinished run's
    assert not (out / "config.yaml").exists()

    (out / "metrics.json").write_text(json.dumps({"overrides": ["a=1"], "objective": {"value": 0.5}}))
    with pytest.raises(FileExistsError, match=r"finished run.*another hydra\.sweep\.dir, set resume=true"):
        claim_output_dir(out, overwrite=False, resume=False, overrides=["a=1"], multirun=True)
    with pytest.raises(FileExistsError, match=r"another hydra\.run\.dir"):
        claim_output_dir(out, overwrite=False, resume=False, overrides=["a=1"], multirun=False)
    done = claim_output_dir(out, overwrite=False, resume=True, overrides=["a=1", "resume=true"], multirun=True)
    assert done["objective"]["value"] == 0.5
    with pytest.raises(ValueError, match=r"holds a run with overrides \['a=1'\], not \['a=2'\]"):
        claim_output_dir(out, overwrite=False, resume=True, overrides=["a=2"], multirun=True)
    assert claim_output_dir(out, overwrite=True, resume=True, overrides=["a=2"], multirun=True) is None
    assert (out / "metrics.json").exists()  # replaced only when the new run finishes

    cfg = make_cfg(out, ["resume=true", "eval.tasks=[nonexistent]"])  # skipped before anything is built
    with pytest.raises(ValueError, match="holds a run with overrides"):
        run(cfg)


def test_repeated_keys_in_command_line_mappings() -> None:
    assert repeated_keys("model.experts={a: /x, a: /y}") == ["a"]
    assert repeated_keys("x={k: {j: 1, j: 2}, m: 3}") == ["j"]
    assert repeated_keys("model.experts={a: /x, b: /y},{c: /z, c: /w}") == ["c"]  # a sweep over mappings
    assert repeated_keys("model.experts={a: /x, b: /a}") == []
    assert repeated_keys("eval.tasks=[a,a]") == []  # a list, not a mapping (the suite refuses it)
    with pytest.raises(ValueError, match=r"gives \['e0'\] more than once"):
        check_command_line(["-m", "model.experts={e0: /a, e1: /b, e0: /c}", "method=ties"])
    check_command_line(["-m", "method=ties,dare", "model.experts={e0: /a, e1: /b}"])


def test_duplicate_keys_on_the_command_line_are_refused_before_anything_runs(tmp_path: Path) -> None:
    for args, key in (
        (["model=checkpoints", "model.experts={a: /x, a: /y}"], "a"),
        (["-m", "method.scaling=0.1,0.2", "model.experts={a: /x, b: {c: 1, c: 2}}"], "c"),  # nested, in a sweep
    ):
        proc = mergelab(*args, f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sweep'}")
        assert proc.returncode == 1, proc.stderr  # as every other error
        assert proc.stderr.strip() == (
            f"mergelab: error: override {args[-1]!r} gives [{key!r}] more than once; each key of a mapping once"
        )
        assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()


def test_a_task_listed_twice_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"eval.tasks lists \['food_review'\] more than once"):
        run(make_cfg(tmp_path / "out", ["eval.tasks=[food_review,tweet_sentiment,food_review]"]))
    assert not (tmp_path / "out").exists()


def test_one_checkpoint_under_two_expert_names_is_warned_about(
    pool_dirs: tuple[Path, dict[str, Path]],  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    base, experts = pool_dirs
    with caplog.at_level(logging.WARNING):
        CheckpointPool(str(base), {"e0": str(experts["e0"]), "again": str(experts["e0"]) + "/"})
    assert "'e0' and 'again' are the same checkpoint" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        CheckpointPool(str(base), {k: str(v) for k, v in experts.items()})
    assert "same checkpoint" not in caplog.text


def test_help_presents_mergelab_and_its_groups() -> None:
    proc = mergelab("--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("mergelab: merge fine-tuned experts")
    assert "Usage: mergelab" in proc.stdout and "cli" not in proc.stdout.split("== Options")[0]
    for group in ("model", "method", "eval", "experiment", "trainer", "logger"):
        assert f"\n  {group} " in proc.stdout, group  # one line describing each group
    assert "method: adamerging, awd," in proc.stdout and "ties" in proc.stdout  # and its options


def test_a_failed_table_row_keeps_the_other_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A row that raises is recorded and left out; the rows after it still run, and a failed last row leaves the
    last finished one as the run's merge. The run then ends with an error naming the rows, and ``resume=true``
    runs the job again (a table with failed rows is not done)."""
    from mergelab.methods import DARE, TaskArithmetic

    def boom(self, *args, **kwargs) -> None:
        raise ValueError("boom")

    # a row in the middle fails, and the last one
    monkeypatch.setattr(TaskArithmetic, "prepare", boom)
    monkeypatch.setattr(DARE, "prepare", boom)
    overrides = [
        "experiment=embedded_table",
        "logger=none",
        "table.methods.task_arithmetic.grid.scaling=[0.3]",
        "table.methods.ties.grid.scaling=[0.3]",
        "table.methods.dare.grid={merge.scaling:[0.3]}",
        *(
            f"~table.methods.{m}"
            for m in (
                *("metagpt", "awd_ta", "awd_ties", "awd_adamerging", "tsv_m", "iso_c", "iso_cts"),
                *("consensus", "fisher", "regmean", "adamerging"),
            )
        ),
    ]
    with pytest.raises(RuntimeError, match=r"table rows failed: task_arithmetic \(ValueError: boom\); dare \("):
        run(make_cfg(tmp_path, overrides))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert list(metrics["rows"]) == ["pretrained", "experts", "weight_averaging", "ties"]
    assert list(metrics["failed_rows"]) == ["task_arithmetic", "dare"]
    assert set(metrics["failed_rows"].values()) == {"ValueError: boom"}
    assert metrics["method"] == "ties"  # the last row that finished is the run's merge
    assert "task_arithmetic" not in (tmp_path / "results.csv").read_text()

    monkeypatch.undo()
    run(make_cfg(tmp_path, [*overrides, "resume=true"]))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert list(metrics["rows"]) == ["pretrained", "experts", "weight_averaging", "task_arithmetic", "ties", "dare"]
    assert metrics["failed_rows"] == {}
