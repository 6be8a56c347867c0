"""A sweep's records: what each job dir holds, the sweep's plan and job markers, and one record per job asked for.

When the sweep starts, the jobs it asks for are written to ``<sweep dir>/.mergelab-sweep/plan.json`` (the basic
sweeper's grid, each job's overrides; Optuna's number of trials), with the command that resumes the sweep; each job,
when it starts, records there which dir it runs in and what that dir held (:mod:`mergelab.reports.sweep_plan`). A
job's state is told from what its dir holds now: ``metrics.json`` (done) or ``failed.json`` (failed: the error in
one line, written by the CLI) written by this sweep, its own result found in place (a job resumed, or not rerun), or
neither: interrupted, running or not started. A dir holding the run of other overrides (another command's) is said
so, never shown as this sweep's job. Without a plan (a sweep dir of an older mergelab, or another sweeper) every job
dir is listed from its files. The summary written from these records is :mod:`mergelab.reports.sweep_summary`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mergelab.overrides import job_overrides, override_key, same_job

#: A sweep job's record of its failure (see :func:`mergelab.cli.fail`).
FAILED_FILE = "failed.json"
#: A job's result (see :mod:`mergelab.run`).
METRICS_FILE = "metrics.json"
#: The sweep's own records, inside the sweep dir: ``plan.json`` and one ``job-<num>.json`` per job started.
STATE_DIR = ".mergelab-sweep"
PLAN_FILE = "plan.json"

#: A job's status in the summary.
DONE, FAILED, INTERRUPTED, RUNNING, NOT_STARTED = "done", "failed", "interrupted", "running", "not started"
#: The states of a sweep (its plan's ``state``, besides running and interrupted): ran to its end, or stopped by an
#: error before it.
FINISHED, STOPPED = "finished", "stopped"
#: The status of a job dir without a result, in a sweep without a plan.
NO_RESULT = "no metrics.json (failed or unfinished)"


# ------------------------------------------------------------------------------------ what a job dir holds


def read_job_file(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """A job file's JSON object, or why it could not be read (None, None when it does not exist)."""
    try:
        if not path.is_file():  # never open a pipe or a dir: reading one could block or fail obscurely
            return (None, f"{path.name} is not a file") if path.exists() else (None, None)
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"unreadable {path.name}: {e}"
    return (data, None) if isinstance(data, dict) else (None, f"unreadable {path.name}: not a JSON object")


def file_fingerprint(path: Path) -> list[int] | None:
    """What tells a file apart from the one that was there before (it is replaced by a rename): inode, size, mtime."""
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def _results(res: dict[str, Any]) -> dict[str, Any]:
    """A finished job's numbers: the objective and each row's averages (a merge-only row: its method report)."""
    rec: dict[str, Any] = {}
    objective = res.get("objective") or {}
    if objective.get("name") is not None:
        rec[objective["name"]] = objective.get("value")
    for name, row in (res.get("rows") or {}).items():
        for key in ("avg_acc", "avg_norm_acc"):
            if row.get(key) is not None:
                rec[f"{name}/{key}"] = row[key]
        if "scores" not in row:  # merge only: what the method computed is all there is
            for key, value in (row.get("method_report") or {}).items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    rec[f"{name}/{key}"] = value
    if res.get("merged_model"):
        rec["merged_model"] = res["merged_model"]
    return rec


def recorded_overrides(res: dict[str, Any] | None) -> list[str] | None:
    """The overrides a job file (``metrics.json``, ``failed.json``) records, or None when it records none."""
    overrides = (res or {}).get("overrides")
    return [str(o) for o in overrides] if isinstance(overrides, list) else None


def _joined(overrides: list[str]) -> str:
    return " ".join(job_overrides(overrides))


def _values(overrides: list[str]) -> dict[str, str]:
    """key -> value of the overrides that define a job (:data:`RUN_CONTROL_KEYS` left out)."""
    return {override_key(o): o.split("=", 1)[1] for o in job_overrides(overrides) if "=" in o}


def _difference(held: list[str], asked: list[str]) -> str:
    """How the overrides of the run a dir holds differ from those a job asks for, e.g. ``method.scaling=0.1 (asked
    0.4)``."""
    h, a = _values(held), _values(asked)
    parts = []
    for k in dict.fromkeys([*h, *a]):
        if h.get(k) != a.get(k):
            have = f"{k}={h[k]}" if k in h else f"no {k}"
            parts.append(f"{have} (asked {a[k]})" if k in a else f"{have} (not asked)")
    return ", ".join(parts) or "the same keys in another form"


def _legacy_record(job: Path, name: str) -> tuple[dict[str, Any], list[str] | None]:
    """A job dir told from its files alone (no plan): the newer of ``metrics.json`` and ``failed.json``."""
    rec: dict[str, Any] = {"job": name}
    res, problem = read_job_file(job / METRICS_FILE)
    failed, failed_problem = read_job_file(job / FAILED_FILE)
    if failed is not None and res is not None:
        failed_at, metrics_at = ((file_fingerprint(job / n) or [0, 0, 0])[2] for n in (FAILED_FILE, METRICS_FILE))
        # failed.json beside a result, newer: the job failed after (e.g. refused to replace it)
        res = None if failed_at > metrics_at else res
    if res is None:
        if failed is not None:
            overrides = recorded_overrides(failed)
            rec.update(status=FAILED, error=failed.get("message", ""))
            if overrides is not None:
                rec["overrides"] = _joined(overrides)
            return rec, overrides
        rec["status"] = problem or failed_problem or NO_RESULT
        return rec, None
    overrides = recorded_overrides(res) or []
    rec.update(status=DONE, overrides=_joined(overrides), **_results(res))
    return rec, overrides


# ------------------------------------------------------------------------------------------- the plan


def state_dir(sweep_dir: Path) -> Path:
    """The dir of the sweep's own records: its plan and job markers."""
    return sweep_dir / STATE_DIR


def read_plan(sweep_dir: Path) -> dict[str, Any] | None:
    """The sweep's plan, or None when it has none (or an unreadable one)."""
    plan, _ = read_job_file(state_dir(sweep_dir) / PLAN_FILE)
    return plan if plan is not None and isinstance(plan.get("id"), str) else None


def _markers(sweep_dir: Path, plan_id: str) -> dict[int, dict[str, Any]]:
    """job number -> its record of this sweep (``job-<num>.json``: its dir, overrides, what the dir held)."""
    out: dict[int, dict[str, Any]] = {}
    state = state_dir(sweep_dir)
    for path in state.glob("job-*.json") if state.is_dir() else []:
        marker, _ = read_job_file(path)
        if marker is not None and marker.get("id") == plan_id and isinstance(marker.get("num"), int):
            out[marker["num"]] = marker
    return out


# ------------------------------------------------------------------------------------------- the records


def _name(sweep_dir: Path, job_dir: Path) -> str:
    try:
        return str(job_dir.relative_to(sweep_dir))
    except ValueError:
        return str(job_dir)


def _planned_record(
    sweep_dir: Path, plan: dict[str, Any], num: int, asked: list[str] | None, marker: dict[str, Any] | None
) -> tuple[dict[str, Any], list[str] | None, bool]:
    """Job ``num`` of the plan: its record, its overrides and whether its dir holds the run of other overrides."""
    overrides = asked if asked is not None else (marker or {}).get("overrides")
    if marker is not None:
        job_dir: Path | None = Path(str(marker.get("dir")))
    else:
        job_dir = sweep_dir / str(num) if plan.get("by_num") else None
    rec: dict[str, Any] = {"job": _name(sweep_dir, job_dir) if job_dir is not None else str(num)}
    res, problem = read_job_file(job_dir / METRICS_FILE) if job_dir is not None else (None, None)
    failed, failed_problem = read_job_file(job_dir / FAILED_FILE) if job_dir is not None else (None, None)
    held = recorded_overrides(res)
    matches = held is not None and overrides is not None and same_job(held, overrides)
    error = None
    if marker is None:  # not started by this sweep: done only if its own result is there (and is to be kept)
        status = DONE if matches and not plan.get("overwrite") else NOT_STARTED
    else:
        assert job_dir is not None
        before = marker.get("before") or {}

        def fresh(name: str) -> bool:
            now = file_fingerprint(job_dir / name)
            return now is not None and now != before.get(name)

        if failed is not None and fresh(FAILED_FILE):
            status, error = FAILED, str(failed.get("message") or "")
        elif res is not None and (fresh(METRICS_FILE) or (marker.get("ended") and matches)):
            status = DONE
        elif marker.get("ended"):
            status = FAILED
            error = problem or failed_problem or f"no result and no {FAILED_FILE}: see the job's log in {job_dir}"
        elif plan.get("state") in (INTERRUPTED, STOPPED) and plan.get("local", True):
            status = INTERRUPTED
        else:
            status = RUNNING  # or killed: nothing could record it
    rec["status"] = status
    if overrides is not None:
        rec["overrides"] = _joined(overrides)
    if status == DONE and res is not None:
        rec.update(_results(res))
    if error is not None:
        rec["error"] = error
    other = held is not None and overrides is not None and not matches
    if other:
        assert held is not None and overrides is not None
        rec["note"] = f"{rec['job']} holds a run of other overrides: {_difference(held, overrides)}"
    elif status != DONE and (problem or failed_problem) and error is None:
        rec["note"] = problem or failed_problem
    return rec, overrides, other


def _collect(sweep_dir: Path) -> tuple[list[tuple[dict[str, Any], list[str] | None, bool]], int | None, Any]:
    """Every job's record (the plan's jobs first, in job-number order, then other dirs), how many jobs the plan
    asks for (None: no plan) and the plan."""
    plan = read_plan(sweep_dir)
    entries: list[tuple[dict[str, Any], list[str] | None, bool]] = []
    claimed: set[str] = set()
    if plan is not None:
        markers = _markers(sweep_dir, plan["id"])
        jobs = plan.get("jobs")
        asked: list[list[str] | None] = list(jobs) if isinstance(jobs, list) else []
        for num in sorted(set(range(len(asked))) | set(markers)):
            want = asked[num] if num < len(asked) else None
            if want is None and num not in markers and plan.get("state") == FINISHED:
                continue  # a trial the sweeper did not launch (e.g. Optuna's grid was smaller)
            entry = _planned_record(sweep_dir, plan, num, want, markers.get(num))
            entries.append(entry)
            claimed.add(entry[0]["job"].split("/", 1)[0])
    planned = len(entries) if plan is not None else None
    dirs = [p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in claimed]
    for job in sorted(dirs, key=lambda p: (len(p.name), p.name)):
        rec, overrides = _legacy_record(job, job.name)
        entries.append((rec, overrides, False))
    return entries, planned, plan


def _axes(lists: list[list[str]]) -> list[str]:
    """The override keys whose value differs between jobs (in first-seen order; :data:`RUN_CONTROL_KEYS` never)."""
    per_job = [_values(o) for o in lists]
    keys = list(dict.fromkeys(k for o in per_job for k in o))
    return [k for k in keys if len({o.get(k) for o in per_job}) > 1]


def summarize(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One record per job asked for by the sweep (then per other dir under ``sweep_dir``): ``job`` (its dir),
    ``status`` (done, failed, interrupted, running, not started), its overrides and one key per swept value, the
    objective and each row's averages (a merge-only row lists its method report instead), or the ``error``; a
    ``note`` when its dir holds the run of other overrides."""
    return summary_records(Path(sweep_dir))[0]


def summary_records(sweep_dir: Path) -> tuple[list[dict[str, Any]], int, list[str], Any, int]:
    """The records, how many were asked for (the first ones), the swept keys, the plan, and how many job dirs hold
    the run of other overrides."""
    entries, planned, plan = _collect(sweep_dir)
    asked = entries if planned is None else entries[:planned]
    axes = _axes([o for _, o, _ in asked if o is not None])
    for rec, overrides, _ in entries:
        if overrides is not None:
            values = _values(overrides)
            for k in axes:
                rec[k] = values.get(k)
    n = len(asked)
    return [rec for rec, _, _ in entries], n, axes, plan, sum(other for _, _, other in asked)
