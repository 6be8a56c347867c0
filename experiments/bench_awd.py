"""Benchmark (not a test): AWD's optimisation, time per step and peak memory.

Two pools, each measured in a fresh process:
- ``embedded``: the six real experts of the embedded suite (all-MiniLM-L6-v2; 36 block matrices, 10.6M
  parameters per task vector), 300 steps as in the default config;
- ``llama``: three random task vectors over the block matrices of a Llama-shaped model (hidden 1024,
  intermediate 2816, 16 layers: 201M parameters per task vector), fewer steps, in ``whole`` and ``per_tensor``
  mode.

Memory is reported as the rise of peak RSS over the RSS before the task vectors were loaded, in units of
one task vector (float32 over the disentangled parameters); the target is T + 4 (delta, its gradient, the
guard's best delta, temporaries; Adam's state adds 2). With ``--allocator fixed`` (the default) children run
with ``MALLOC_MMAP_THRESHOLD_=131072`` (see ``main``): RSS then shows what is live, but every large temporary
costs fresh pages, so time is measured with ``--allocator default`` (glibc as in a user's run).

    python experiments/bench_awd.py [--runs embedded_row,embedded_row_adam,...] [--allocator fixed|default]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

RUNS = {
    "embedded_row": {"pool": "embedded", "granularity": "row", "mode": "whole", "steps": 300},
    # the shipped default (conf/method/awd.yaml): Adam at a relative lr, whose state is two more task vectors
    "embedded_row_adam": {"pool": "embedded", "granularity": "row", "mode": "whole", "steps": 300, "optimizer": "adam"},
    "embedded_tensor": {"pool": "embedded", "granularity": "tensor", "mode": "whole", "steps": 300},
    "embedded_model": {"pool": "embedded", "granularity": "model", "mode": "whole", "steps": 300},
    "llama_whole": {"pool": "llama", "granularity": "row", "mode": "whole", "steps": 20},
    "llama_per_tensor": {"pool": "llama", "granularity": "row", "mode": "per_tensor", "steps": 20},
}
LLAMA = {"hidden": 1024, "intermediate": 2816, "layers": 16, "tasks": 3}


def rss_mib() -> float:
    """Current resident set size."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def embedded_loader() -> tuple[list[str], dict, object, int]:
    """Task vectors of the cached embedded experts, read tensor by tensor (positioned reads, no mmap, so the
    files' pages do not count as the process's memory)."""
    from pathlib import Path

    import torch

    from mergelab.cli import minilm_path
    from mergelab.io.reader import LazyCheckpoint
    from mergelab.methods.awd import AWD

    cache = Path.home() / ".cache" / "mergelab" / "experts"
    base_type = json.loads((Path(minilm_path()) / "config.json").read_text())["model_type"]

    def is_embedded_expert(p: Path) -> bool:  # the cache also holds other pools' experts (e.g. SmolLM2's)
        cfg = p / "config.json"
        return (p / "model.safetensors").is_file() and json.loads(cfg.read_text()).get("model_type") == base_type

    dirs = sorted(p for p in cache.iterdir() if is_embedded_expert(p))
    if len(dirs) < 2:
        sys.exit(f"no cached experts under {cache}: run `mergelab` once to build them")
    base = LazyCheckpoint(minilm_path())
    experts = [LazyCheckpoint(d) for d in dirs]
    base_keys = {k.removeprefix("bert."): k for k in base}
    keys = {k.removeprefix("bert."): k for k in experts[0]}
    probe = AWD()
    names = [n for n in keys if n in base_keys and probe.disentangles(n, base.shape(base_keys[n]))]
    shapes = {n: base.shape(base_keys[n]) for n in names}

    def load(n: str) -> torch.Tensor:
        b = base.get_rows(base_keys[n], None, None).float()
        return torch.stack([e.get_rows(keys[n], None, None).float() - b for e in experts])

    return names, shapes, load, len(experts)


def llama_loader() -> tuple[list[str], dict, object, int]:
    """Random task vectors (seeded per tensor) over a Llama-shaped model's block matrices."""
    import torch

    h, i = LLAMA["hidden"], LLAMA["intermediate"]
    shapes = {}
    for layer in range(LLAMA["layers"]):
        p = f"model.layers.{layer}."
        for n, s in {
            "self_attn.q_proj.weight": (h, h),
            "self_attn.k_proj.weight": (h // 4, h),
            "self_attn.v_proj.weight": (h // 4, h),
            "self_attn.o_proj.weight": (h, h),
            "mlp.gate_proj.weight": (i, h),
            "mlp.up_proj.weight": (i, h),
            "mlp.down_proj.weight": (h, i),
        }.items():
            shapes[p + n] = s
    names = list(shapes)

    def load(n: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(names.index(n))
        shared = torch.randn(shapes[n], generator=g)
        return torch.stack([1e-3 * (shared + torch.randn(shapes[n], generator=g)) for _ in range(LLAMA["tasks"])])

    return names, shapes, load, LLAMA["tasks"]


def child(name: str) -> None:
    """One measurement, in this process."""
    import math

    import torch

    from mergelab.methods.awd_fit import OptimizerConfig
    from mergelab.methods.awd_module import fit_delta
    from mergelab.methods.awd_objective import Objective

    spec = RUNS[name]
    names, shapes, load, n_tasks = embedded_loader() if spec["pool"] == "embedded" else llama_loader()
    numel = sum(math.prod(shapes[n]) for n in names)
    tv_mib = numel * 4 / 2**20
    start_rss = rss_mib()
    t0 = time.perf_counter()
    fit = fit_delta(
        names,
        shapes,
        load,
        Objective(spec["granularity"], "l2", 0.1),
        # SGD at an absolute lr, as when the first figures in experiments/README.md were measured (no optimiser
        # state), or the default Adam
        OptimizerConfig("adam", 0.01, 0.0, spec["steps"])
        if spec.get("optimizer") == "adam"
        else OptimizerConfig("sgd", 0.1, 0.0, spec["steps"], lr_relative=False),
        {"accelerator": "cpu", "enable_progress_bar": False, "logger": False},
        per_tensor=spec["mode"] == "per_tensor",
    )
    seconds = time.perf_counter() - t0
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "run": name,
                "tasks": n_tasks,
                "params_per_task_vector_M": round(numel / 1e6, 1),
                "steps": spec["steps"],
                "fit_s": round(seconds, 1),
                "s_per_step": round(seconds / spec["steps"], 4),
                "threads": torch.get_num_threads(),
                "task_vector_MiB": round(tv_mib),
                "rss_rise_MiB": round(peak_mib - start_rss),
                "rss_rise_in_task_vectors": round((peak_mib - start_rss) / tv_mib, 2),
                # delta, its gradient, the guard's best delta, and one for temporaries (+2 for Adam's state).
                "target_in_task_vectors": n_tasks + 4 + (2 if spec.get("optimizer") == "adam" else 0),
                "allocator": "glibc default" if "MALLOC_MMAP_THRESHOLD_" not in os.environ else "fixed mmap threshold",
                "L_O": [round(fit.history.L_O[0], 4), round(fit.final["L_O"], 4)],
            }
        ),
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument(
        "--allocator",
        choices=("fixed", "default"),
        default="fixed",
        help="fixed: children run with a fixed glibc mmap threshold, so RSS shows what is live (the memory "
        "figure; every large temporary then costs fresh pages); default: glibc as a user's run has it (the time "
        "figure)",
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    # glibc raises its mmap threshold after large frees, then serves later per-tensor temporaries from a heap
    # it does not give back: RSS grows ~2 task vectors above what is live. A fixed threshold measures the latter.
    env = dict(os.environ)
    if args.allocator == "fixed":
        env["MALLOC_MMAP_THRESHOLD_"] = os.environ.get("MALLOC_MMAP_THRESHOLD_", "131072")
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    for name in args.runs.split(","):
        subprocess.run([sys.executable, __file__, "--child", name], check=True, env=env)


if __name__ == "__main__":
    main()
