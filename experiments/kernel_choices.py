"""What the kernel-choice experiments share (``awd_kernels.py``, ``artifact_kernels.py``): the variables that
pick torch's and MKL's kernels, running one measurement in a fresh process under a choice, CPU time, and the
embedded table's experts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Variables that pick kernels: ``ATEN_CPU_CAPABILITY`` torch's own (read when torch is imported), MKL's
#: instruction cap and conditional numerical reproducibility, and mkldnn off (read by the children).
KERNEL_VARS = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "MERGELAB_KERNELS_NO_MKLDNN")

#: How a child process hands back its result: one stdout line starting with it, then JSON.
RESULT = "RESULT "


def run_in_process(name: str, cmd: Sequence[str], env_vars: Mapping[str, str], tail: int = 2000) -> dict:
    """Run ``cmd`` in a fresh process whose kernel variables are exactly ``env_vars``; its last ``RESULT`` line as a
    dict with ``config`` (``name``) and ``process_s`` added, or ``{"config", "error"}`` (stderr's last ``tail``
    characters) when it failed."""
    env = {k: v for k, v in os.environ.items() if k not in KERNEL_VARS}
    env.update(env_vars)
    t0 = time.perf_counter()
    p = subprocess.run(list(cmd), env=env, capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(RESULT)]
    if p.returncode != 0 or not lines:
        return {"config": name, "error": p.stderr[-tail:]}
    out = json.loads(lines[-1][len(RESULT) :])
    out["config"] = name
    out["process_s"] = round(time.perf_counter() - t0, 1)
    return out


def cpu_seconds() -> float:
    """CPU time of this process (user + system): the work, whatever else shares the cores."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def table_experts() -> dict[str, Path]:
    """The embedded table's experts in its task order: the dirs its metrics.json names, else those of the same name
    under ``$MERGELAB_KERNELS_EXPERTS`` (default: the user's cache)."""
    recorded = json.loads((ROOT / "experiments" / "embedded_table" / "metrics.json").read_text())["experts"]
    cache = Path(os.environ.get("MERGELAB_KERNELS_EXPERTS", Path.home() / ".cache" / "mergelab" / "experts"))
    out = {}
    for task, d in recorded.items():
        p = Path(d)
        if not (p / "model.safetensors").is_file():
            p = cache / Path(d).name
        if not (p / "model.safetensors").is_file():
            sys.exit(f"expert {task} not found at {d} or {p}: build the table's experts (README command 1) first")
        out[task] = p
    return out
