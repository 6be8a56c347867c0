"""A sweep's summary tells the truth after any interruption: it lists every job the command asked for, each with its
true state (done, failed, interrupted, not started), never another command's result as this sweep's; Ctrl-C stops a
sweep or a run in one line (exit status 130) saying how to resume; a run dir that cannot be created, and a mapping
with a key given twice, are one-line errors (exit status 1)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mergelab.cli import one_line
from mergelab.errors import MergelabError, RunDirInUse, TableRowsFailed
from tests.conftest import TINY
from tests.test_run_flow import byte_tokenizer, pool_dirs, pool_overrides  # noqa: F401  (pool_dirs is a fixture)
from tests.test_sweeps_and_errors import CLI, mergelab

Pool = tuple[Path, dict[str, Path]]


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def summary(sweep: Path) -> list[dict]:
    return json.loads((sweep / "summary.json").read_text())


def states(sweep: Path, key: str) -> list[tuple[str, str, str | None]]:
    return [(r["job"], r["status"], r.get(key)) for r in summary(sweep)]


def one_error_line(stderr: str) -> str:
    """The only line of ``stderr`` that mergelab printed (progress bars aside), checked to be its last."""
    said = [line for line in stderr.splitlines() if line.startswith("mergelab:") or "Traceback" in line]
    assert len(said) == 1, stderr[-3000:]
    assert stderr.rstrip().splitlines()[-1] == said[0], stderr[-3000:]  # nothing after it
    return said[0]


def run_resume_command(command: str) -> subprocess.CompletedProcess:
    """Run the ``mergelab ...`` command a summary or an error line gave, as a user would paste it."""
    argv = shlex.split(command)
    assert argv[0] == "mergelab", command
    return mergelab(*argv[1:])


# ------------------------------------------------------------------------- resumed with other overrides


def test_a_resume_with_other_values_says_so_and_shows_the_values_asked_for(pool_dirs: Pool, tmp_path: Path) -> None:  # noqa: F811
    sweep = tmp_path / "sweep"
    pool = [*pool_overrides(pool_dirs), "eval=none"]
    first = mergelab("-m", *pool, "method.scaling=0.1,0.2,0.3", f"hydra.sweep.dir={sweep}")
    assert first.returncode == 0, first.stderr[-3000:]
    assert lines(sweep / "summary.md")[0] == "3 of 3 job(s) done; scores in %."
    (sweep / "summary.png").write_bytes(b"an earlier sweep's figure")  # a figure this sweep can no longer draw
    results = {j: (sweep / j / "metrics.json").read_bytes() for j in "012"}

    # Other values with resume=true: every job is refused, and the summary says so with the values asked for.
    other = mergelab("-m", *pool, "method.scaling=0.4,0.5,0.6", f"hydra.sweep.dir={sweep}", "resume=true")
    assert other.returncode == 1
    assert states(sweep, "method.scaling") == [("0", "failed", "0.4"), ("1", "failed", "0.5"), ("2", "failed", "0.6")]
    records = summary(sweep)
    assert all("resume=true:" in r["error"] and "holds a run with overrides" in r["error"] for r in records)
    assert [r["note"] for r in records] == [
        f"{j} holds a run of other overrides: method.scaling={old} (asked {new})"
        for j, old, new in (("0", 0.1, 0.4), ("1", 0.2, 0.5), ("2", 0.3, 0.6))
    ]
    assert all("resume" not in r and "method.scaling=0.4,0.5,0.6" not in r["overrides"] for r in records)
    md = lines(sweep / "summary.md")
    assert md[0] == "0 of 3 job(s) done; scores in %."
    assert md[1] == "Not done: 3 failed. Resume the sweep (finished jobs are skipped) with:"
    resume = md[3].strip()
    assert resume.startswith("mergelab -m ") and resume.endswith(
        f" method.scaling=0.4,0.5,0.6 hydra.sweep.dir={sweep} resume=true"
    )
    assert any(line.startswith("3 job dir(s) hold the run of other overrides") for line in md)
    assert "| job | status | method.scaling | error | note |" in md
    assert [line.split(" | ")[:3] for line in md if line.startswith("| 0 ") or line.startswith("| 1 ")] == [
        ["| 0", "failed", "0.4"],
        ["| 1", "failed", "0.5"],
    ]
    assert not (sweep / "summary.png").exists()  # never an earlier figure beside this summary
    assert {j: (sweep / j / "metrics.json").read_bytes() for j in "012"} == results  # the earlier runs are kept

    # One value changed, the overrides in another order: the two unchanged jobs are resumed, the third is refused.
    shuffled = ["eval=none", *reversed(pool_overrides(pool_dirs))]
    mixed = mergelab("-m", *shuffled, "method.scaling=0.1,0.2,0.7", f"hydra.sweep.dir={sweep}", "resume=true")
    assert mixed.returncode == 1
    assert states(sweep, "method.scaling") == [("0", "done", "0.1"), ("1", "done", "0.2"), ("2", "failed", "0.7")]
    assert summary(sweep)[2]["note"] == "2 holds a run of other overrides: method.scaling=0.3 (asked 0.7)"
    assert lines(sweep / "summary.md")[0] == "2 of 3 job(s) done; scores in %."
    assert not (sweep / "0" / "failed.json").exists()  # the refusal of the run before is no longer its state

    # overwrite=true replaces the refused run; neither resume nor overwrite is ever a swept value.
    again = mergelab("-m", *pool, "method.scaling=0.1,0.2,0.7", f"hydra.sweep.dir={sweep}", "overwrite=true")
    assert again.returncode == 0, again.stderr[-3000:]
    assert states(sweep, "method.scaling") == [("0", "done", "0.1"), ("1", "done", "0.2"), ("2", "done", "0.7")]
    assert all("overwrite" not in r and "note" not in r and "error" not in r for r in summary(sweep))
    assert lines(sweep / "summary.md")[:3] == [
        "3 of 3 job(s) done; scores in %.",
        "",
        "| job | status | method.scaling |",
    ]

    # Fewer values: the dir of a job not asked for is listed apart, not counted.
    fewer = mergelab("-m", *pool, "method.scaling=0.1,0.2", f"hydra.sweep.dir={sweep}", "resume=true")
    assert fewer.returncode == 0, fewer.stderr[-3000:]
    md = lines(sweep / "summary.md")
    assert md[0] == "2 of 2 job(s) done; scores in %."
    assert md[md.index(f"Other dirs in {sweep}, not jobs of this sweep:") + 4].startswith("| 2 | done | ")


def test_a_sweep_stopped_by_an_error_lists_the_jobs_it_never_started(pool_dirs: Pool, tmp_path: Path) -> None:  # noqa: F811
    """HYDRA_FULL_ERROR=1 stops a sweep at the first batch with a failure (with the traceback): the jobs of the batches
    after it are listed, never started."""
    sweep = tmp_path / "sweep"
    args = ["-m", *pool_overrides(pool_dirs), "eval=none", "method.scaling=-1,0.3,0.5", f"hydra.sweep.dir={sweep}"]
    args.append("hydra.sweeper.max_batch_size=1")
    proc = mergelab(*args, full_error=True)
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    assert states(sweep, "method.scaling") == [
        ("0", "failed", "-1"),
        ("1", "not started", "0.3"),
        ("2", "not started", "0.5"),
    ]
    md = lines(sweep / "summary.md")
    assert md[:2] == [
        "0 of 3 job(s) done; scores in %.",
        "Not done: 1 failed, 2 not started. Resume the sweep (finished jobs are skipped) with:",
    ]
    resumed = run_resume_command(md[3].strip().replace("-1,", "0.1,"))  # the wrong value corrected
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [s for _, s, _ in states(sweep, "method.scaling")] == ["done", "done", "done"]


# ------------------------------------------------------------------------------------------------ Ctrl-C


@pytest.fixture(scope="module")
def slow_pool(tmp_path_factory: pytest.TempPathFactory) -> Pool:
    """A Llama big enough that Iso-C (a full SVD of every matrix) takes seconds per merge: a job to interrupt."""
    root = tmp_path_factory.mktemp("slow_pool")
    tokenizer = byte_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).state_dict()
    dirs = {name: root / name for name in ("base", "e0", "e1")}
    for i, path in enumerate(dirs.values()):
        g = torch.Generator().manual_seed(i)
        model = LlamaForCausalLM(cfg)
        model.load_state_dict(
            {k: v + (0.0 if i == 0 else 0.01) * torch.randn(v.shape, generator=g) for k, v in base.items()}
        )
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return dirs["base"], {"e0": dirs["e0"], "e1": dirs["e1"]}


def interrupt(
    args: list[str], ready: Callable[[], bool], after_s: float, tmp_path: Path, **env: str
) -> subprocess.CompletedProcess:
    """Run ``mergelab args`` and send it SIGINT (what Ctrl-C sends) ``after_s`` seconds after ``ready()``."""
    environ = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"} | env
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out.open("w") as stdout, err.open("w") as stderr:
        # A Ctrl-C as a terminal sends it: SIGINT handled by default even when this test runs as a background job
        # (which starts with SIGINT ignored, and Python keeps an inherited "ignore").
        proc = subprocess.Popen(
            [*CLI, *args],
            stdout=stdout,
            stderr=stderr,
            text=True,
            env=environ,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            deadline = time.monotonic() + 600
            while not ready():
                assert proc.poll() is None, f"ended before it could be interrupted:\n{err.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "never got ready to be interrupted"
                time.sleep(0.05)
            time.sleep(after_s)
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out.read_text(), err.read_text())


def test_ctrl_c_during_a_sweep_lists_every_job_and_says_how_to_resume(slow_pool: Pool, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = ["-m", *pool_overrides(slow_pool), "eval=none", "method=iso_c", "method.alpha=0.5,1.0,1.5,2.0"]
    args.append(f"hydra.sweep.dir={sweep}")
    # Interrupted while job 2 merges (its log file is created as it starts; the merge takes seconds).
    proc = interrupt(args, (sweep / "2" / "mergelab.log").exists, 0.5, tmp_path)
    assert proc.returncode == 130, proc.stderr[-3000:]
    line = one_error_line(proc.stderr)
    head, resume = line.split("; resume with: ")
    assert head == "mergelab: interrupted: 2 of 4 job(s) done"
    assert resume.startswith("mergelab -m ") and resume.endswith(
        f"method.alpha=0.5,1.0,1.5,2.0 hydra.sweep.dir={sweep} resume=true"
    )
    assert states(sweep, "method.alpha") == [
        ("0", "done", "0.5"),
        ("1", "done", "1.0"),
        ("2", "interrupted", "1.5"),
        ("3", "not started", "2.0"),
    ]
    md = lines(sweep / "summary.md")
    assert md[:4] == [
        "2 of 4 job(s) done; scores in %.",
        "Not done: 1 interrupted, 1 not started. Resume the sweep (finished jobs are skipped) with:",
        "",
        f"    {resume}",
    ]
    assert lines(sweep / "2" / "mergelab.log")[-1].endswith(
        f"[ERROR] - interrupted: {line.removeprefix('mergelab: interrupted: ')}"
    )
    assert not (sweep / "2" / "metrics.json").exists() and not (sweep / "3").exists()

    finished = {j: (sweep / j / "metrics.json").stat().st_mtime_ns for j in "01"}
    resumed = run_resume_command(resume)  # as printed
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [s for _, s, _ in states(sweep, "method.alpha")] == ["done"] * 4
    assert lines(sweep / "summary.md")[0] == "4 of 4 job(s) done; scores in %."
    assert {j: (sweep / j / "metrics.json").stat().st_mtime_ns for j in "01"} == finished  # skipped, not redone


def test_ctrl_c_during_a_run_says_so_in_one_line(tmp_path: Path) -> None:
    """Interrupted while an expert is fine-tuned (Lightning turns Ctrl-C into ``sys.exit(1)``): one line, 130."""
    run_dir = tmp_path / "run"
    log = run_dir / "mergelab.log"

    def training() -> bool:
        return log.exists() and "building expert" in log.read_text()

    args = [*TINY, "method=task_arithmetic", f"hydra.run.dir={run_dir}"]
    proc = interrupt(args, training, 5.0, tmp_path, MERGELAB_CACHE=str(tmp_path / "cache"))  # no expert cached
    assert proc.returncode == 130, proc.stderr[-3000:]
    line = one_error_line(proc.stderr)
    head, rerun = line.split("; rerun with: ")
    assert head == f"mergelab: interrupted: {run_dir} holds no result"
    assert shlex.split(rerun) == ["mergelab", *args]  # hydra.run.dir last, as given
    assert not (run_dir / "metrics.json").exists()
    assert lines(log)[-1].endswith(f"[ERROR] - interrupted: {line.removeprefix('mergelab: interrupted: ')}")


# ------------------------------------------------------------------------------- dirs that cannot be made


def bad_run_dirs(root_too: bool) -> dict[str, Callable[[Path], tuple[Path, str]]]:
    """case -> (tmp dir -> (the hydra.run.dir to give, the end of the expected error)). Permissions do not stop
    root: those cases are only made when not root (each case fails for root too otherwise)."""

    def under_a_file(t: Path) -> tuple[Path, str]:
        (t / "file").write_text("x")
        return t / "file" / "run", f"cannot create the run dir {t / 'file' / 'run'}: {t / 'file'} is a file, not a dir"

    def a_file(t: Path) -> tuple[Path, str]:
        (t / "file").write_text("x")
        return t / "file", f"cannot create the run dir {t / 'file'}: it is a file, not a dir"

    def broken_symlink(t: Path) -> tuple[Path, str]:
        (t / "link").symlink_to(t / "gone" / "run")
        return t / "link", f"cannot create the run dir {t / 'link'}: it is a broken symlink (to {t / 'gone' / 'run'})"

    def log_file_taken(t: Path) -> tuple[Path, str]:
        (t / "run" / "mergelab.log").mkdir(parents=True)
        return t / "run", f"cannot create the log file {t / 'run' / 'mergelab.log'}: it is a dir"

    def read_only_parent(t: Path) -> tuple[Path, str]:
        (t / "ro").mkdir(mode=0o555)
        return t / "ro" / "run", f"cannot create the run dir {t / 'ro' / 'run'}: Permission denied (in {t / 'ro'})"

    def read_only_dir(t: Path) -> tuple[Path, str]:
        (t / "ro").mkdir(mode=0o555)
        return t / "ro", f"cannot create the log file {t / 'ro' / 'mergelab.log'}: Permission denied (in {t / 'ro'})"

    cases = {f.__name__: f for f in (under_a_file, a_file, broken_symlink, log_file_taken)}
    if not root_too:
        cases |= {f.__name__: f for f in (read_only_parent, read_only_dir)}
    return cases


RUN_DIRS = bad_run_dirs(root_too=os.geteuid() == 0)


@pytest.mark.parametrize("case", list(RUN_DIRS))
def test_a_run_dir_that_cannot_be_created_is_one_line(pool_dirs: Pool, tmp_path: Path, case: str) -> None:  # noqa: F811
    run_dir, message = RUN_DIRS[case](tmp_path)
    # method.scaling=-1 would fail the run itself at once: the run dir is refused before
    proc = mergelab(*pool_overrides(pool_dirs), "eval=none", "method.scaling=-1", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 1
    assert proc.stderr == f"mergelab: error: {message}; choose another hydra.run.dir\n"


@pytest.mark.parametrize("case", ["under_a_file", "job_dir_taken", "job_log_taken", "broken_symlink"])
def test_a_sweep_dir_that_cannot_be_created_is_one_line(pool_dirs: Pool, tmp_path: Path, case: str) -> None:  # noqa: F811
    sweep, taken = tmp_path / "sweep", tmp_path / "sweep" / "1"
    if case == "under_a_file":
        (tmp_path / "file").write_text("x")
        sweep = tmp_path / "file" / "sweep"
        message = f"cannot create the sweep dir {sweep}: {tmp_path / 'file'} is a file, not a dir"
    elif case == "job_dir_taken":
        sweep.mkdir()
        taken.write_text("x")
        message = f"cannot create the job dir {taken}: it is a file, not a dir"
    elif case == "job_log_taken":
        (taken / "mergelab.log").mkdir(parents=True)
        message = f"cannot create the log file {taken / 'mergelab.log'}: it is a dir"
    else:
        (tmp_path / "link").symlink_to(tmp_path / "gone" / "sweep")
        sweep = tmp_path / "link"
        message = f"cannot create the sweep dir {sweep}: it is a broken symlink (to {tmp_path / 'gone' / 'sweep'})"
    proc = mergelab("-m", *pool_overrides(pool_dirs), "eval=none", "method.scaling=0.3,0.5", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 1
    assert proc.stderr == f"mergelab: error: {message}; choose another hydra.sweep.dir\n"
    assert not list(tmp_path.rglob("metrics.json")) and not (tmp_path / "sweep" / "0").exists()  # no job ran


# ------------------------------------------------------------------------------------------------ one_line


@pytest.mark.parametrize(
    ("error", "line"),
    [
        # mergelab's own errors: their message, never their type
        (TableRowsFailed("table rows failed: ties (ValueError: boom)"), "table rows failed: ties (ValueError: boom)"),
        (RunDirInUse("output dir /o is in use by pid 7 (its lock)"), "output dir /o is in use by pid 7 (its lock)"),
        (MergelabError("model pool:\n  expert 'a' is missing"), "model pool: expert 'a' is missing"),
        # messages that say what is wrong: as they are
        (RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB"), "CUDA out of memory. Tried to allocate 2 GiB"),
        (ModuleNotFoundError("eval=lm_harness needs lm-eval"), "eval=lm_harness needs lm-eval"),
        (KeyError("AdaMerging: no coefficient was learned for 'w'"), "AdaMerging: no coefficient was learned for 'w'"),
        (ValueError("seed must be a whole number"), "seed must be a whole number"),
        # where the type says more than the message
        (KeyError("w"), "KeyError: 'w'"),
        (AssertionError("merged blocks left over"), "AssertionError: merged blocks left over"),
        (IndexError("list index out of range"), "IndexError: list index out of range"),
        (NotImplementedError(), "NotImplementedError"),
        (RuntimeError(""), "RuntimeError"),
    ],
)
def test_one_line_names_a_type_only_where_it_adds_information(error: BaseException, line: str) -> None:
    assert one_line(error) == line
