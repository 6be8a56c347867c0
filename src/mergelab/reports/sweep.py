"""Aggregating a ``-m`` sweep: one row per job asked for, rewritten after every job, when the sweep ends and when it
is interrupted (Ctrl-C: :func:`interrupted`, called by the CLI).

When the sweep starts, the jobs it asks for are written to ``<sweep dir>/.mergelab-sweep/plan.json`` (the basic
sweeper's grid, each job's overrides; Optuna's number of trials), with the command that resumes the sweep; each job,
when it starts, records there which dir it runs in and what that dir held. A job's state is told from what its dir
holds now: ``metrics.json`` (done) or ``failed.json`` (failed: the error in one line, written by the CLI) written by
this sweep, its own result found in place (a job resumed, or not rerun), or neither: interrupted, running or not
started. A dir holding the run of other overrides (another command's) is said so, never shown as this sweep's job.
Without a plan (a sweep dir of an older mergelab, or another sweeper) every job dir is listed from its files.

The same callback checks, before Hydra creates them, that the run dir (or the sweep dir) and its log file can be
written: otherwise the command stops with one line naming the dir and the key to change.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shlex
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from mergelab.io.atomic import (
    FIGURE_FORMATS,
    atomic_save_figure,
    atomic_write_json,
    atomic_write_text,
    figure_format,
)
from mergelab.overrides import RUN_CONTROL_KEYS, job_overrides, override_key, same_job
from mergelab.reports.tables import GROUP_GAP, draw_heatmap, percent
from mergelab.suites.base import SPLITS  # a tuning objective is named <split>/avg_acc

log = logging.getLogger(__name__)

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

#: The sweep this process launches: ``dir`` (its sweep dir) and ``figure_format``, for :func:`interrupted`.
_ACTIVE: dict[str, Any] = {}


def refuse(message: str) -> None:
    """Stop the command with one line on stderr and exit status 1 (from a Hydra callback, where an exception would
    be printed by Hydra with its traceback)."""
    print(f"mergelab: error: {message}", file=sys.stderr)
    raise SystemExit(1)


# ------------------------------------------------------------------------------------ what a job dir holds


def _read(path: Path) -> tuple[dict[str, Any] | None, str | None]:
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


def _fingerprint(path: Path) -> list[int] | None:
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


def _overrides_of(res: dict[str, Any] | None) -> list[str] | None:
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
    res, problem = _read(job / METRICS_FILE)
    failed, failed_problem = _read(job / FAILED_FILE)
    if failed is not None and res is not None:
        newer = (_fingerprint(job / FAILED_FILE) or [0, 0, 0])[2] > (_fingerprint(job / METRICS_FILE) or [0, 0, 0])[2]
        res = None if newer else res  # failed.json beside a result: the job failed after (e.g. refused to replace it)
    if res is None:
        if failed is not None:
            overrides = _overrides_of(failed)
            rec.update(status=FAILED, error=failed.get("message", ""))
            if overrides is not None:
                rec["overrides"] = _joined(overrides)
            return rec, overrides
        rec["status"] = problem or failed_problem or NO_RESULT
        return rec, None
    overrides = _overrides_of(res) or []
    rec.update(status=DONE, overrides=_joined(overrides), **_results(res))
    return rec, overrides


# ------------------------------------------------------------------------------------------- the plan


def _state_dir(sweep_dir: Path) -> Path:
    return sweep_dir / STATE_DIR


def _read_plan(sweep_dir: Path) -> dict[str, Any] | None:
    plan, _ = _read(_state_dir(sweep_dir) / PLAN_FILE)
    return plan if plan is not None and isinstance(plan.get("id"), str) else None


def _markers(sweep_dir: Path, plan_id: str) -> dict[int, dict[str, Any]]:
    """job number -> its record of this sweep (``job-<num>.json``: its dir, overrides, what the dir held)."""
    out: dict[int, dict[str, Any]] = {}
    state = _state_dir(sweep_dir)
    for path in state.glob("job-*.json") if state.is_dir() else []:
        marker, _ = _read(path)
        if marker is not None and marker.get("id") == plan_id and isinstance(marker.get("num"), int):
            out[marker["num"]] = marker
    return out


def _config_loader() -> Any:
    from hydra.core.global_hydra import GlobalHydra

    instance = GlobalHydra.instance()
    return instance.config_loader() if instance.is_initialized() else None


def planned_jobs(config: DictConfig) -> list[list[str] | None] | None:
    """The jobs a sweep will launch, in job-number order: each one's overrides, as Hydra's basic sweeper splits the
    command line (and ``hydra.sweeper.params``), or None for a job whose overrides the sweeper picks as it goes
    (Optuna's trials). None when the sweeper is another one (its jobs are listed as they start)."""
    sweeper = config.hydra.sweeper
    target = str(sweeper.get("_target_") or "")
    task = [str(o) for o in config.hydra.overrides.task]
    if target.endswith(".BasicSweeper"):
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
        parser = OverridesParser.create(config_loader=_config_loader())
        batches = BasicSweeper.split_arguments(parser.parse_overrides([*params, *task]), None)
        return [list(job) for batch in batches for job in batch]
    if "optuna" in target.lower() and sweeper.get("n_trials") is not None:
        return [None] * int(sweeper.n_trials)
    return None


def resume_command(argv: list[str], sweep_dir: Path) -> str:
    """The command that resumes a sweep started with ``argv``: the same arguments, its ``hydra.sweep.dir`` and
    ``resume=true`` (``overwrite`` dropped: it would redo the finished jobs)."""
    drop = ("hydra.sweep.dir", *RUN_CONTROL_KEYS)
    args = [a for a in argv if a.startswith("-") or "=" not in a or override_key(a) not in drop]
    if not any(a in ("-m", "--multirun") for a in args):
        args.insert(0, "-m")
    return shlex.join(["mergelab", *args, f"hydra.sweep.dir={sweep_dir}", "resume=true"])


def _why(path: Path, e: OSError) -> str:
    """Why ``path`` could not be created, in words: a broken symlink or a file in the way, else the system's reason
    (with the dir that could not be written)."""
    for p in (path, *path.parents):
        who = "it" if p == path else str(p)
        if p.is_symlink() and not p.exists():
            return f"{who} is a broken symlink (to {os.readlink(p)})"
        if p.exists():
            if not p.is_dir() and not isinstance(e, IsADirectoryError):
                return f"{who} is a file, not a dir"
            if p.is_dir() and isinstance(e, IsADirectoryError):
                return f"{who} is a dir"
            reason = e.strerror or str(e)
            return reason if p == path else f"{reason} (in {p})"
    return e.strerror or str(e)


def _log_files(config: DictConfig, out_dir: Path) -> list[Path]:
    """The files Hydra's job logging writes for a job in ``out_dir`` (the config's file handlers)."""
    try:
        cfg = copy.deepcopy(config)  # whole: the file names are interpolations from the root
        with read_write(cfg.hydra.runtime), open_dict(cfg.hydra.runtime):
            cfg.hydra.runtime.output_dir = str(out_dir.absolute())
        handlers = (cfg.hydra.get("job_logging") or {}).get("handlers") or {}
        return [Path(str(h.filename)) for h in handlers.values() if h and h.get("filename")]
    except Exception:  # an unresolvable logging config is Hydra's to report
        return []


def check_run_dir(config: DictConfig) -> None:
    """Before Hydra creates the run dir and opens its log file: create them here, and stop in one line naming the
    path and ``hydra.run.dir`` when that fails (Hydra would print a traceback before the app starts)."""
    try:
        run_dir = Path(str(config.hydra.run.dir))
    except Exception:  # an unresolvable dir is Hydra's to report
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        refuse(f"cannot create the run dir {run_dir}: {_why(run_dir, e)}; choose another hydra.run.dir")
    for path in _log_files(config, run_dir):
        try:
            with open(path, "a"):  # as Hydra's file handler opens it, right after
                pass
        except OSError as e:
            refuse(f"cannot create the log file {path}: {_why(path, e)}; choose another hydra.run.dir")


def _check_job_dirs(config: DictConfig, job_dirs: list[Path]) -> None:
    """Job dirs that are already there must be dirs whose log file can be written (nothing is created)."""
    anywhere = Path("/job-dir-of-the-sweep")  # the log files' names, resolved once for every job dir
    logs = [
        (p.relative_to(anywhere), True) if p.is_relative_to(anywhere) else (p, False)
        for p in _log_files(config, anywhere)
    ]
    for job_dir in job_dirs:
        if not (job_dir.exists() or job_dir.is_symlink()):
            continue
        if not job_dir.is_dir():
            e = FileExistsError(17, "File exists", str(job_dir))
            refuse(f"cannot create the job dir {job_dir}: {_why(job_dir, e)}; choose another hydra.sweep.dir")
        for name, inside in logs:
            path = job_dir / name if inside else name
            if path.is_dir() or not os.access(path if path.exists() else path.parent, os.W_OK):
                reason = "it is a dir" if path.is_dir() else f"Permission denied (in {path.parent})"
                refuse(f"cannot create the log file {path}: {reason}; choose another hydra.sweep.dir")


def start_sweep(config: DictConfig) -> None:
    """At the start of a sweep: write its plan (the jobs asked for, the command that resumes it), after checking
    that the sweep dir and the job dirs already there can be written (else one line, exit status 1)."""
    sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
    try:
        jobs = planned_jobs(config)
    except Exception as e:  # the sweeper itself reports a command line it cannot split
        log.debug("sweep plan: cannot split the overrides (%s)", e)
        jobs = None
    subdir = OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir")  # type: ignore[union-attr]
    launcher = str(config.hydra.get("launcher", {}).get("_target_") or "")
    plan = {
        "id": uuid.uuid4().hex,
        "state": RUNNING,
        "jobs": jobs,
        "by_num": str(subdir).replace(" ", "") == "${hydra.job.num}",  # job <num> runs in <sweep dir>/<num>
        "overwrite": bool(config.get("overwrite")),
        "local": launcher.endswith(".BasicLauncher"),
        # None when the sweeper picks jobs' overrides as it goes (Optuna): resume=true could not find them again
        "resume": resume_command(sys.argv[1:], sweep_dir) if jobs and None not in jobs else None,
    }
    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        refuse(f"cannot create the sweep dir {sweep_dir}: {_why(sweep_dir, e)}; choose another hydra.sweep.dir")
    if plan["by_num"] and jobs is not None:
        _check_job_dirs(config, [sweep_dir / str(num) for num in range(len(jobs))])
    try:
        atomic_write_json(_state_dir(sweep_dir) / PLAN_FILE, plan)
    except OSError as e:
        why = _why(_state_dir(sweep_dir) / PLAN_FILE, e)
        refuse(f"cannot write in the sweep dir {sweep_dir}: {why}; choose another hydra.sweep.dir")
    for old in _state_dir(sweep_dir).glob("job-*.json"):  # an earlier command's jobs
        old.unlink(missing_ok=True)
    _ACTIVE.clear()
    _ACTIVE.update(dir=sweep_dir, figure_format=_figure_format(config))


def _set_state(sweep_dir: Path, state: str) -> dict[str, Any] | None:
    plan = _read_plan(sweep_dir)
    if plan is not None and plan.get("state") == RUNNING:
        plan["state"] = state
        atomic_write_json(_state_dir(sweep_dir) / PLAN_FILE, plan)
    return plan


def _job_marker(ended: bool) -> None:
    """Record, in the sweep's state dir, that this job (Hydra's current one) started or ended, with its dir and
    overrides; at its start, what its dir held (to tell a result of this sweep from an earlier one)."""
    hydra_cfg = HydraConfig.get()
    sweep_dir = Path(str(hydra_cfg.sweep.dir)).absolute()
    plan = _read_plan(sweep_dir)
    if plan is None:
        return
    num = int(hydra_cfg.job.num)
    path = _state_dir(sweep_dir) / f"job-{num}.json"
    out_dir = Path(str(hydra_cfg.runtime.output_dir))
    if ended:
        marker, _ = _read(path)
        if marker is None or marker.get("id") != plan["id"]:
            return
        marker["ended"] = True
        held = _overrides_of(_read(out_dir / METRICS_FILE)[0])
        unchanged = _fingerprint(out_dir / FAILED_FILE) == (marker.get("before") or {}).get(FAILED_FILE)
        if unchanged and held is not None and same_job(held, list(marker.get("overrides") or [])):
            # the job ended with its result and did not fail: an older failed.json beside it is not its state
            (out_dir / FAILED_FILE).unlink(missing_ok=True)
    else:
        marker = {
            "id": plan["id"],
            "num": num,
            "dir": str(out_dir),
            "overrides": [str(o) for o in hydra_cfg.overrides.task],
            "before": {n: _fingerprint(out_dir / n) for n in (METRICS_FILE, FAILED_FILE)},
            "ended": False,
        }
    atomic_write_json(path, marker)


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
    res, problem = _read(job_dir / METRICS_FILE) if job_dir is not None else (None, None)
    failed, failed_problem = _read(job_dir / FAILED_FILE) if job_dir is not None else (None, None)
    held = _overrides_of(res)
    matches = held is not None and overrides is not None and same_job(held, overrides)
    error = None
    if marker is None:  # not started by this sweep: done only if its own result is there (and is to be kept)
        status = DONE if matches and not plan.get("overwrite") else NOT_STARTED
    else:
        assert job_dir is not None
        before = marker.get("before") or {}

        def fresh(name: str) -> bool:
            now = _fingerprint(job_dir / name)
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
    plan = _read_plan(sweep_dir)
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
    return _summary(Path(sweep_dir))[0]


def _summary(sweep_dir: Path) -> tuple[list[dict[str, Any]], int, list[str], Any, int]:
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


def _cell(key: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        # scores in % as in the results tables; other numbers (coefficients, lambdas) as they are
        return f"{100 * value:.2f}" if key.endswith("avg_acc") or key.endswith("avg_norm_acc") else f"{value:.4g}"
    return str(value).replace("|", "\\|")


def _number(value: Any) -> float | None:
    """``value`` as a finite float (a swept value is a string from the command line), else None."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _sorted_values(values: list[Any]) -> list[Any]:
    """Distinct swept values: in numeric order when every one is a number, else in first-seen order."""
    distinct = list(dict.fromkeys(values))
    if all(_number(v) is not None for v in distinct):
        return sorted(distinct, key=float)
    return distinct


def _short(text: str, limit: int = 48) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _unscored(record: dict[str, Any]) -> str:
    """What a job's label adds when it has no result: its status (" (failed)", " (not started)", ...)."""
    status = record["status"]
    if status == DONE:
        return ""
    return f" ({status})" if status in (FAILED, INTERRUPTED, RUNNING, NOT_STARTED) else " (unfinished)"


def plot_objective(records: list[dict[str, Any]], axis: str, objective: str, path: Path) -> bool:
    """The objective against the one swept value, when that value is numeric: one line (its only series), the
    best point named; False when there is nothing to plot.

    ``path`` without a suffix: in the :func:`~mergelab.io.atomic.figure_format` in force."""
    points = []
    for r in records:
        x, y = _number(r.get(axis)), _number(r.get(objective))
        if x is not None and y is not None:
            points.append((x, 100 * y))
    if len(points) < 2:
        return False
    from matplotlib.figure import Figure

    points.sort()
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color="C0")
    bx, by = max(points, key=lambda p: p[1])
    ax.annotate(
        f"best {by:.2f} at {bx:g}", (bx, by), xytext=(0, 8), textcoords="offset points", ha="center", fontsize=8
    )
    ax.margins(y=0.15)  # room above the best point for its label
    ax.set_xlabel(axis)
    ax.set_ylabel(f"{objective} (%)")
    ax.grid(alpha=0.3)
    atomic_save_figure(fig, path)
    return True


def plot_objective_grid(records: list[dict[str, Any]], axes: list[str], objective: str, path: Path) -> bool:
    """For two swept values: a heatmap of the objective (%), the first value down, the second across, each cell
    printed, the best outlined, a job without a result hatched "n/a". False when there is nothing to plot or a pair
    of values occurs twice (then :func:`plot_jobs` shows every job).

    ``path`` without a suffix: in the :func:`~mergelab.io.atomic.figure_format` in force."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    ykey, xkey = axes
    swept = [r for r in records if r.get(ykey) is not None and r.get(xkey) is not None]
    pairs = [(str(r[ykey]), str(r[xkey])) for r in swept]
    if not swept or len(set(pairs)) < len(pairs):
        return False
    scores = {pair: percent(r.get(objective)) for pair, r in zip(pairs, swept, strict=True)}
    if all(v is None for v in scores.values()):
        return False
    ys, xs = _sorted_values([p[0] for p in pairs]), _sorted_values([p[1] for p in pairs])
    values = [[scores.get((y, x)) for x in xs] for y in ys]
    fig = Figure(figsize=(max(5.0, 2.2 + 0.9 * len(xs)), 1.8 + 0.45 * len(ys)), layout="constrained")
    ax = fig.add_subplot()
    mappable = draw_heatmap(ax, values, range(len(xs)), range(len(ys)), show_values=len(xs) * len(ys) <= 600)
    best = max(((v, i, j) for i, row in enumerate(values) for j, v in enumerate(row) if v is not None))
    ax.add_patch(Rectangle((best[2] - 0.45, best[1] - 0.45), 0.9, 0.9, fill=False, edgecolor="black", linewidth=2))
    ax.set_xticks(range(len(xs)), xs, rotation=30 if max(len(x) for x in xs) > 6 else 0)
    ax.set_yticks(range(len(ys)), ys)
    ax.set_xlabel(f"{xkey}\n(outlined: best; hatched: no result)")
    ax.set_ylabel(ykey)
    fig.colorbar(mappable, ax=ax, fraction=0.05, pad=0.02).set_label(f"{objective} (%)")
    atomic_save_figure(fig, path)
    return True


def score_columns(results: list[str], objective: str | None) -> list[str]:
    """The summary's columns shown in :func:`plot_jobs`: the objective, then each row's average accuracy."""
    return [*([objective] if objective else []), *(k for k in results if k.endswith("/avg_acc") and k != objective)]


def plot_jobs(
    records: list[dict[str, Any]], axes: list[str], columns: list[str], path: Path, objective: str | None = None
) -> bool:
    """A heatmap of jobs (rows, in job order, named by their number and swept values: the keys head the rows) x
    ``columns`` (scores in %: the ``objective`` first, set apart, then rows' averages, headed by the row), each cell
    printed while they fit; the best job on the first column in bold; a job without a score hatched "n/a". False
    when no job has a score.

    ``path`` without a suffix: in the :func:`~mergelab.io.atomic.figure_format` in force."""
    from matplotlib.figure import Figure

    values = [[percent(r.get(c)) for c in columns] for r in records]
    if not columns or all(v is None for row in values for v in row):
        return False
    # Values only (the keys name the axis once), so that a long key never truncates what tells jobs apart.
    labels = [_short(f"#{r['job']}  " + ", ".join(str(r.get(k)) for k in axes)) + _unscored(r) for r in records]
    heads = [f"{c} (objective)" if c == objective else c.removesuffix("/avg_acc") for c in columns]
    xs = [j + (GROUP_GAP if objective and j else 0.0) for j in range(len(columns))]
    dense = len(records) > 60 or len(columns) > 30  # past that, printed values would overlap: colour only
    firsts = [(v[0], -i) for i, v in enumerate(values) if v[0] is not None]
    best = -max(firsts)[1] if firsts else None
    longest = max(len(x) for x in labels)
    height = 1.9 + (0.18 if dense else 0.3) * len(records)
    fig = Figure(figsize=(max(6.0, 2.0 + 0.07 * longest + 0.9 * (len(columns) + 1)), height), layout="constrained")
    ax = fig.add_subplot()
    mappable = draw_heatmap(ax, values, xs, range(len(records)), fontsize=8, show_values=not dense)
    ax.set_yticks(range(len(records)), labels, fontsize=7 if dense else 8.5)
    ax.set_ylabel("job  " + ", ".join(axes))
    for i, (label, r) in enumerate(zip(ax.get_yticklabels(), records, strict=True)):
        if i == best:
            label.set_fontweight("bold")
        if r["status"] != "done":
            label.set_color("#888888")
    ax.xaxis.tick_top()
    ax.set_xticks(xs, heads, rotation=30, ha="left", fontsize=8.5)
    note = "bold: best on the first column; hatched: no score"
    if len(columns) > (1 if objective else 0):
        note = "after the objective: each table row's average accuracy; " + note
    ax.set_xlabel(note, fontsize=8, color="#555555")
    fig.colorbar(mappable, ax=ax, fraction=0.04, pad=0.02).set_label("accuracy (%)")
    atomic_save_figure(fig, path)
    return True


def plot_summary(records: list[dict[str, Any]], axes: list[str], results: list[str], path: Path) -> bool:
    """The sweep's figure: for one numeric swept value the objective against it (:func:`plot_objective`), for two
    a heatmap of the objective over both (:func:`plot_objective_grid`), otherwise (a non-numeric value, more
    values, or those plots had nothing to show) a heatmap of jobs x scores (:func:`plot_jobs`). False when none
    applies (nothing swept, or no job has a score: a merge-only sweep)."""
    if not axes:
        return False
    objective = next((k for k in results if k.endswith("/avg_acc") and k.split("/")[0] in SPLITS), None)
    if objective is not None and len(axes) == 1 and plot_objective(records, axes[0], objective, path):
        return True
    if objective is not None and len(axes) == 2 and plot_objective_grid(records, axes, objective, path):
        return True
    return plot_jobs(records, axes, score_columns(results, objective), path, objective)


def _table(records: list[dict[str, Any]], columns: list[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    return lines + ["| " + " | ".join(_cell(c, r.get(c)) for c in columns) + " |" for r in records]


def _header(asked: list[dict[str, Any]], plan: Any, sweep_dir: Path, others: int) -> list[str]:
    """The summary's first lines: k of N done; when not all are, what the others are and how to resume."""
    done = sum(r["status"] == DONE for r in asked)
    lines = [f"{done} of {len(asked)} job(s) done; scores in %."]
    if done == len(asked):
        return lines
    counts = Counter(r["status"] for r in asked if r["status"] != DONE)
    what = ", ".join(f"{n} {status}" for status, n in counts.items())
    resume = (plan or {}).get("resume")
    if plan is None:
        resume = f"mergelab -m <the sweep's overrides> hydra.sweep.dir={sweep_dir} resume=true"
    if resume is None:
        lines.append(
            f"Not done: {what}. The sweeper picks each job's overrides as it goes, so resume=true cannot find them "
            "again: run the sweep again with another hydra.sweep.dir."
        )
        return lines
    if plan is not None and plan.get("state") == RUNNING:
        lines.append(f"Not done yet: {what}. Should the sweep stop, resume it (finished jobs are skipped) with:")
    else:
        lines.append(f"Not done: {what}. Resume the sweep (finished jobs are skipped) with:")
    lines += ["", f"    {resume}"]
    if others:
        lines += [
            "",
            f"{others} job dir(s) hold the run of other overrides (another command's), which resume=true refuses: "
            "choose another hydra.sweep.dir, or add overwrite=true to replace those runs.",
        ]
    return lines


def _write(sweep_dir: str | Path) -> tuple[Path, int, int] | None:
    """Write the summary; returns its path, how many jobs are done and how many were asked for."""
    out = Path(sweep_dir)
    if not out.is_dir():
        return None
    records, n, axes, plan, others = _summary(out)
    if not records:
        return None
    asked, rest = records[:n], records[n:]
    skip = ("job", "status", "overrides", "error", "note", "merged_model", *axes)
    results = [k for k in dict.fromkeys(k for r in asked for k in r) if k not in skip]
    columns = [c for c in ["job", "status", *axes, *results, "error", "note"] if any(c in r for r in asked)]
    lines = [*_header(asked, plan, out, others), "", *_table(asked, columns)]
    if rest:
        extra = [c for c in ("job", "status", "overrides", "error") if any(c in r for r in rest)]
        lines += ["", f"Other dirs in {out}, not jobs of this sweep:", "", *_table(rest, extra)]
    atomic_write_text(out / "summary.md", "\n".join(lines) + "\n")
    atomic_write_json(out / "summary.json", records)
    for fmt in FIGURE_FORMATS:  # never leave an earlier figure that this summary no longer shows
        (out / f"summary.{fmt}").unlink(missing_ok=True)
    plot_summary(asked, axes, results, out / "summary")
    return out / "summary.md", sum(r["status"] == DONE for r in asked), len(asked)


def write_summary(sweep_dir: str | Path) -> Path | None:
    """summary.json and summary.md (and the figure ``summary.<figure format>``: :func:`plot_summary`, removed when
    there is nothing to plot) in ``sweep_dir``; None when it holds no job."""
    written = _write(sweep_dir)
    return written[0] if written is not None else None


def _figure_format(config: DictConfig) -> str | None:
    """The config's figure format, or png when it is not one (the job itself reports a wrong one)."""
    fmt = config.get("figure_format")
    return str(fmt).lower() if fmt is not None and str(fmt).lower() in FIGURE_FORMATS else None


def interrupted(state: str = INTERRUPTED) -> tuple[int, int, str | None, bool] | None:
    """When the sweep this process launches ends early (the CLI calls it): on Ctrl-C (``state`` interrupted), or on
    an error that stops the sweep (``stopped``). Records it in the plan (the jobs it started and left without a
    result are then interrupted, not running) and rewrites the summary. Returns how many jobs are done, how many were
    asked for, the command that resumes the sweep (None where the sweeper cannot redo the same jobs) and whether its
    jobs ran here (not on a cluster, where they go on); None when no sweep was started."""
    if not _ACTIVE:
        return None
    sweep_dir = _ACTIVE["dir"]
    try:
        plan = _set_state(sweep_dir, state)
        with figure_format(_ACTIVE.get("figure_format")):
            written = _write(sweep_dir)
    except OSError as e:  # the line on the console still says what can be said
        log.warning("could not update the sweep summary in %s: %s", sweep_dir, e)
        plan, written = _read_plan(sweep_dir), None
    done, n = (written[1], written[2]) if written is not None else (0, len((plan or {}).get("jobs") or []))
    return done, n, (plan or {}).get("resume"), bool((plan or {}).get("local", True))


class SweepSummary(Callback):
    """Hydra callback: checks that the run dir (a single run) or the sweep dir can be written before Hydra creates
    them; records what a sweep asks for and which of its jobs started; writes the sweep's summary after each job (so
    a failed or killed sweep still has one) and at the end (on Ctrl-C, :func:`interrupted` does).

    Hydra turns an exception of a callback into a multi-line warning: every hook here logs its own failure in one
    line instead (the summary must never fail a job); only a refused dir stops the command (:func:`refuse`)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _quietly(check_run_dir, config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _quietly(start_sweep, config)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            _quietly(_job_marker, False)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            _quietly(_job_marker, True)
            with figure_format(_figure_format(config)):
                _quietly(write_summary, HydraConfig.get().sweep.dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        _ACTIVE.clear()
        if sweep_dir.is_dir():
            _quietly(_set_state, sweep_dir, FINISHED)
        with figure_format(_figure_format(config)):
            path = _quietly(write_summary, sweep_dir)
        if path is not None:
            log.info("sweep summary: %s\n%s", path, path.read_text())


def _quietly(fn: Any, *args: Any) -> Any:
    """``fn(*args)``, a failure logged in one line (None returned) rather than raised into Hydra."""
    try:
        return fn(*args)
    except Exception as e:
        log.warning("sweep summary: %s failed: %s", getattr(fn, "__name__", fn), " ".join(str(e).split()))
        return None
