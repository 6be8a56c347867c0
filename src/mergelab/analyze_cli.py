"""``mergelab-analyze`` console script: the task-vector analysis (:mod:`mergelab.reports.analysis`) as a Hydra app.

It composes ``conf/analyze.yaml``: the run's own ``config.yaml`` (so every pool, method, preset and override of
``mergelab`` applies unchanged) plus the ``analysis`` options, with its outputs under ``outputs/analysis/``.
A separate app rather than ``mergelab analyze=true``: an analysis scores nothing, builds no suite unless the pool
needs one for its experts, and writes no ``metrics.json``, so it shares the config but not the run flow.
Errors are reported as by ``mergelab``: one line on stderr, exit status 1 (``HYDRA_FULL_ERROR=1``: the traceback).
"""

from __future__ import annotations

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from mergelab.cli import FULL_ERROR, check_command_line, fail
from mergelab.locations import CONFIG_DIR

PROG = "mergelab-analyze"


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="analyze")
def app(cfg: DictConfig) -> None:
    """Compose the config and run the analysis (one line on stderr and exit status 1 on failure)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if HydraConfig.initialized():
        with open_dict(cfg):
            cfg.overrides = list(HydraConfig.get().overrides.task)
    try:
        from mergelab.reports.analysis import analyze  # torch and the pools after Hydra has parsed the command line

        analyze(cfg)
    except Exception as e:
        if os.environ.get(FULL_ERROR) == "1":
            raise
        fail(e, cfg, multirun=False)


def command_line(args: list[str]) -> list[str]:
    """``args`` with ``--format X`` / ``--format=X`` as the override ``analysis.figure_format=X``.

    Raises a ValueError for a sweep (``-m``): every job would be listed as unfinished by the sweep summary, which
    reads runs' ``metrics.json``; run one command per method instead."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-m", "--multirun"):
            raise ValueError(f"{arg}: {PROG} runs one analysis per command; run it once per method or pool")
        if arg == "--format":
            if i + 1 >= len(args):
                raise ValueError("--format needs a value (png, svg or pdf)")
            out.append(f"analysis.figure_format={args[i + 1]}")
            i += 2
            continue
        out.append(f"analysis.figure_format={arg.split('=', 1)[1]}" if arg.startswith("--format=") else arg)
        i += 1
    return out


def main() -> None:
    """The ``mergelab-analyze`` console script: ``mergelab-analyze [--format svg] [overrides of mergelab]``."""
    try:
        check_command_line(sys.argv[1:])
        sys.argv[1:] = command_line(sys.argv[1:])
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)
    app()


if __name__ == "__main__":
    main()
