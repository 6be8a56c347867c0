"""One live run per output dir: a second run is refused at once naming the live one; a dead run's lock and
leftovers are taken over; a run never removes another live run's files."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mergelab.errors import RunDirInUse
from mergelab.io.run_lock import LOCK_FILE, run_dir_lock
from mergelab.run import CANDIDATES_DIR, run
from tests.conftest import make_cfg, small_checkpoint_pool


def hold_lock(out_dir: Path) -> subprocess.Popen:
    """Another live process holding ``out_dir``'s lock until killed."""
    code = (
        "import sys, time\n"
        "from mergelab.io.run_lock import run_dir_lock\n"
        f"with run_dir_lock({str(out_dir)!r}, 'hydra.run.dir'):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_is_refused_and_leaves_the_live_runs_files(tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = small_checkpoint_pool(tmp_path / "pool")
    holder = hold_lock(out)
    try:
        candidate = out / CANDIDATES_DIR / "task_arithmetic-0" / "model.safetensors"
        candidate.parent.mkdir(parents=True)
        candidate.write_bytes(b"the live run's candidate")
        with pytest.raises(RunDirInUse, match=rf"in use by a live run \(pid {holder.pid} on {socket.gethostname()}"):
            run(make_cfg(out, overrides, tiny=False))
        assert candidate.read_bytes() == b"the live run's candidate"  # never touched
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == holder.pid  # still the live run's lock
        assert not (out / "metrics.json").exists()
    finally:
        holder.kill()
        holder.wait()


def test_dead_runs_lock_and_leftovers_are_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = small_checkpoint_pool(tmp_path / "pool")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "x"}))
    (out / CANDIDATES_DIR / "old-0").mkdir(parents=True)
    run(make_cfg(out, overrides, tiny=False))
    assert (out / "merged_model").is_dir() and (out / "metrics.json").is_file()
    assert not (out / CANDIDATES_DIR).exists()
    assert not (out / LOCK_FILE).exists()  # released at the end


def test_lock_released_after_a_failed_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = [*small_checkpoint_pool(tmp_path / "pool"), "method.scaling=-1"]
    with pytest.raises(ValueError, match="scaling"):
        run(make_cfg(out, overrides, tiny=False))
    assert not (out / LOCK_FILE).exists()


def test_lock_of_another_host_is_refused_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "x"}))
    lock = run_dir_lock(tmp_path, "hydra.sweep.dir")
    with pytest.raises(RunDirInUse, match=rf"pid 1 on elsewhere.*remove {tmp_path / LOCK_FILE}"), lock:
        pass


def test_unreadable_lock_is_refused(tmp_path: Path) -> None:
    (tmp_path / LOCK_FILE).write_text("not json")
    with pytest.raises(RunDirInUse, match=r"unreadable.*hydra.run.dir"), run_dir_lock(tmp_path, "hydra.run.dir"):
        pass


def test_two_cli_runs_into_one_dir(tmp_path: Path) -> None:
    """Two real CLI runs started together into one dir: one finishes, the other is refused in one line (or, if
    the first had already finished, refused as a finished run): never a foreign error, never a half result."""
    out = tmp_path / "run"
    overrides = [*small_checkpoint_pool(tmp_path / "pool"), f"hydra.run.dir={out}", "logger=none"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = [
        subprocess.Popen([sys.executable, "-m", "mergelab.cli", *overrides], stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    results = [(p.wait(timeout=300), p.stderr.read() if p.stderr else "") for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    err = next(text for code, text in results if code == 1)
    last = [line for line in err.splitlines() if line.startswith("mergelab: error:")]
    assert len(last) == 1 and ("in use by a live run" in last[0] or "already holds a finished run" in last[0]), err
    assert json.loads((out / "metrics.json").read_text())["method"] == "task_arithmetic"
    assert not (out / LOCK_FILE).exists()
