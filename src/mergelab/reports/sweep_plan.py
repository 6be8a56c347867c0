"""What a sweep writes as it runs, from its Hydra callback (:class:`mergelab.reports.sweep_summary.SweepSummary`):
its plan when it starts (the jobs it asks for, the command that resumes it), a marker per job when the job starts
and ends, and the plan's final state (:mod:`mergelab.reports.sweep` reads them back).

Before Hydra creates them, the run dir (or the sweep dir) and its log file are checked to be writable: otherwise
the command stops with one line naming the dir and the key to change (:func:`refuse`).
"""

from __future__ import annotations

import copy
import logging
import os
import shlex
import sys
import uuid
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from mergelab.io.atomic import atomic_write_json
from mergelab.overrides import RUN_CONTROL_KEYS, override_key, same_job
from mergelab.reports.sweep import (
    FAILED_FILE,
    METRICS_FILE,
    PLAN_FILE,
    RUNNING,
    file_fingerprint,
    read_job_file,
    read_plan,
    recorded_overrides,
    state_dir,
)

log = logging.getLogger(__name__)


def refuse(message: str) -> None:
    """Stop the command with one line on stderr and exit status 1 (from a Hydra callback, where an exception would
    be printed by Hydra with its traceback)."""
    print(f"mergelab: error: {message}", file=sys.stderr)
    raise SystemExit(1)


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


def start_sweep(config: DictConfig) -> Path:
    """At the start of a sweep: write its plan (the jobs asked for, the command that resumes it), after checking
    that the sweep dir and the job dirs already there can be written (else one line, exit status 1). Returns the
    sweep dir (absolute)."""
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
        atomic_write_json(state_dir(sweep_dir) / PLAN_FILE, plan)
    except OSError as e:
        why = _why(state_dir(sweep_dir) / PLAN_FILE, e)
        refuse(f"cannot write in the sweep dir {sweep_dir}: {why}; choose another hydra.sweep.dir")
    for old in state_dir(sweep_dir).glob("job-*.json"):  # an earlier command's jobs
        old.unlink(missing_ok=True)
    return sweep_dir


def set_plan_state(sweep_dir: Path, state: str) -> dict[str, Any] | None:
    """Record in the plan that the sweep ended in ``state``, unless an earlier end was recorded; returns the plan
    (None: no plan)."""
    plan = read_plan(sweep_dir)
    if plan is not None and plan.get("state") == RUNNING:
        plan["state"] = state
        atomic_write_json(state_dir(sweep_dir) / PLAN_FILE, plan)
    return plan


def write_job_marker(ended: bool) -> None:
    """Record, in the sweep's state dir, that this job (Hydra's current one) started or ended, with its dir and
    overrides; at its start, what its dir held (to tell a result of this sweep from an earlier one)."""
    hydra_cfg = HydraConfig.get()
    sweep_dir = Path(str(hydra_cfg.sweep.dir)).absolute()
    plan = read_plan(sweep_dir)
    if plan is None:
        return
    num = int(hydra_cfg.job.num)
    path = state_dir(sweep_dir) / f"job-{num}.json"
    out_dir = Path(str(hydra_cfg.runtime.output_dir))
    if ended:
        marker, _ = read_job_file(path)
        if marker is None or marker.get("id") != plan["id"]:
            return
        marker["ended"] = True
        held = recorded_overrides(read_job_file(out_dir / METRICS_FILE)[0])
        unchanged = file_fingerprint(out_dir / FAILED_FILE) == (marker.get("before") or {}).get(FAILED_FILE)
        if unchanged and held is not None and same_job(held, list(marker.get("overrides") or [])):
            # the job ended with its result and did not fail: an older failed.json beside it is not its state
            (out_dir / FAILED_FILE).unlink(missing_ok=True)
    else:
        marker = {
            "id": plan["id"],
            "num": num,
            "dir": str(out_dir),
            "overrides": [str(o) for o in hydra_cfg.overrides.task],
            "before": {n: file_fingerprint(out_dir / n) for n in (METRICS_FILE, FAILED_FILE)},
            "ended": False,
        }
    atomic_write_json(path, marker)
