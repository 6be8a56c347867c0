"""Measurement (not a test): is AWD's fit the same bytes under every CPU kernel choice this machine can be forced
into?

A second machine differs from this one by its CPU (the SIMD width torch's kernels are compiled for, the code path
MKL picks) and its thread count. Each configuration below forces one such choice in a fresh process
(``ATEN_CPU_CAPABILITY`` is read when torch is imported, MKL's variables when MKL loads) and hashes what it
computes:

- ``fit``: the default fit on the six embedded experts (row, l2, alpha 0.1, Adam, lr 0.01 x rms(tau); ``--steps``):
  sha256 of delta's bytes and of the history, L_O at steps 0 and 1 and at the end, the best steps, the time;
- ``compare``: the 300-step default fit of an older AWD implementation (``--old``, e.g. copied from
  ``git show HEAD:...``) and of this checkout, one thread each: time, best steps and the difference of the deltas.

The other trained artifacts (experts, AdaMerging's coefficients, Fisher/RegMean statistics) are not measured here.

    python experiments/awd_kernels.py --only fit --steps 20 [--configs avx512/1,default/1,...]   # this checkout
    python experiments/awd_kernels.py --only fit --steps 20 --old /tmp/awdk/old      # an older AWD (AWD_MODULES)
    python experiments/awd_kernels.py --only compare --old /tmp/awdk/old             # 300 steps, older vs this one
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from kernel_choices import ROOT, cpu_seconds, run_in_process, table_experts  # experiments/, beside this file

OUT = ROOT / "experiments" / "awd_kernels.json"

#: AWD's modules under mergelab/methods, each after the ones it imports (what ``--old`` replaces).
AWD_MODULES = ("awd_arithmetic", "awd_objective", "awd_fit", "awd_module")

#: Kernel choices: (name, environment, torch threads). ``ATEN_CPU_CAPABILITY`` picks torch's own kernels (SIMD
#: width of its vectorised loops and reductions); ``MKL_ENABLE_INSTRUCTIONS`` caps the instruction set of MKL's
#: BLAS (GEMM/GEMV blocking and kernels); ``MKL_CBWR=COMPATIBLE`` is MKL's conditional numerical reproducibility.
CONFIGS = [
    ("avx512/2", {"ATEN_CPU_CAPABILITY": "avx512"}, 2),
    ("avx512/1", {"ATEN_CPU_CAPABILITY": "avx512"}, 1),
    ("avx2/2", {"ATEN_CPU_CAPABILITY": "avx2"}, 2),
    ("avx2/1", {"ATEN_CPU_CAPABILITY": "avx2"}, 1),
    ("default/2", {"ATEN_CPU_CAPABILITY": "default"}, 2),
    ("default/1", {"ATEN_CPU_CAPABILITY": "default"}, 1),
    ("avx512/2 mkl=avx2", {"ATEN_CPU_CAPABILITY": "avx512", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}, 2),
    ("avx512/2 mkl=sse4_2", {"ATEN_CPU_CAPABILITY": "avx512", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}, 2),
    ("avx512/2 mkl_cbwr=compatible", {"ATEN_CPU_CAPABILITY": "avx512", "MKL_CBWR": "COMPATIBLE"}, 2),
    ("avx512/2 mkldnn off", {"ATEN_CPU_CAPABILITY": "avx512", "MERGELAB_KERNELS_NO_MKLDNN": "1"}, 2),
]


def sha(*tensors: object) -> str:
    """sha256 (first 16 hex digits) of the bytes of tensors (or of JSON-able values)."""
    import torch

    h = hashlib.sha256()
    for t in tensors:
        if isinstance(t, torch.Tensor):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(json.dumps(t, sort_keys=True).encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------- set-up


def setup_child(threads: int, old: str | None) -> None:
    """Threads, mkldnn, and (``old``) an older AWD implementation imported in place of this checkout's: each of
    its modules the dir holds (an older checkout has only awd_fit and awd_module), dependencies first."""
    import torch

    torch.set_num_threads(threads)
    if os.environ.get("MERGELAB_KERNELS_NO_MKLDNN"):
        torch.backends.mkldnn.enabled = False
    if old:
        import importlib.util

        for mod in AWD_MODULES:
            name, path = f"mergelab.methods.{mod}", Path(old) / f"{mod}.py"
            if not path.is_file():
                continue
            spec = importlib.util.spec_from_file_location(name, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)


def embedded_problem() -> tuple[list[str], dict, object]:
    """The disentangled matrices of the embedded experts (table order) and their stacked task vectors."""
    import torch

    from mergelab.cli import minilm_path
    from mergelab.io.reader import LazyCheckpoint
    from mergelab.methods.awd import AWD

    base = LazyCheckpoint(minilm_path())
    experts = [LazyCheckpoint(d) for d in table_experts().values()]
    base_keys = {k.removeprefix("bert."): k for k in base}
    keys = {k.removeprefix("bert."): k for k in experts[0]}
    probe = AWD()
    names = [n for n in keys if n in base_keys and probe.disentangles(n, base.shape(base_keys[n]))]
    shapes = {n: tuple(base.shape(base_keys[n])) for n in names}

    def load(n: str) -> torch.Tensor:
        b = base.get_rows(base_keys[n], None, None).float()
        return torch.stack([e.get_rows(keys[n], None, None).float() - b for e in experts])

    return names, shapes, load


CPU = {"accelerator": "cpu", "enable_progress_bar": False, "logger": False, "enable_model_summary": False}


# ------------------------------------------------------------------------------------------------- children


def child_fit(steps: int) -> dict:
    """The default fit on the embedded experts."""
    from mergelab.methods.awd_fit import OptimizerConfig
    from mergelab.methods.awd_module import fit_delta
    from mergelab.methods.awd_objective import Objective

    names, shapes, load = embedded_problem()
    t0, c0 = time.perf_counter(), cpu_seconds()
    fit = fit_delta(names, shapes, load, Objective("row", "l2", 0.1), OptimizerConfig(steps=steps), CPU)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    best = [g.best_step for g in fit.guard]
    return {
        "delta_sha256": sha(*(fit.delta[n] for n in names)),
        "history_sha256": sha(fit.history.L_O, fit.history.L_R),
        "L_O_0": fit.history.L_O[0],
        "L_O_1": fit.history.L_O[1],
        "L_O_end": fit.final["L_O"],
        "best_step_min_max": [min(best), max(best)],
        "backoffs": sum(g.backoffs for g in fit.guard),
        "fit_s": round(seconds, 1),
        "fit_cpu_s": round(cpu, 1),
    }


def save_delta(path: str, steps: int) -> dict:
    """The default fit (as :func:`child_fit`), its delta also written to ``path`` (safetensors) for a comparison
    across implementations."""
    from safetensors.torch import save_file

    from mergelab.methods.awd_fit import OptimizerConfig
    from mergelab.methods.awd_module import fit_delta
    from mergelab.methods.awd_objective import Objective

    names, shapes, load = embedded_problem()
    t0, c0 = time.perf_counter(), cpu_seconds()
    fit = fit_delta(names, shapes, load, Objective("row", "l2", 0.1), OptimizerConfig(steps=steps), CPU)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    save_file({n: fit.delta[n].contiguous() for n in names}, path)
    best = [g.best_step for g in fit.guard]
    return {
        "delta_sha256": sha(*(fit.delta[n] for n in names)),
        "L_O_1": fit.history.L_O[1],
        "L_O_end": fit.final["L_O"],
        "L_R_end": fit.final["L_R"],
        "best_step_min_max": [min(best), max(best)],
        "fit_s": round(seconds, 1),
        "fit_cpu_s": round(cpu, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="fit", help="comma-separated measurements: fit, compare")
    ap.add_argument("--old", default=None, help="dir holding an older AWD_MODULES (.py)")
    ap.add_argument("--configs", default=None, help="comma-separated config names (default: all)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--save-delta", default=None, help="write the default fit's delta here (one process) and exit")
    args = ap.parse_args()
    if args.save_delta:
        setup_child(args.threads, args.old)
        print("RESULT " + json.dumps(save_delta(args.save_delta, args.steps)), flush=True)
        return
    if args.child:
        setup_child(args.threads, args.old)
        import torch

        out = CHILDREN[args.child](args)
        out["capability"] = torch.backends.cpu.get_cpu_capability()
        out["threads"] = torch.get_num_threads()
        print("RESULT " + json.dumps(out), flush=True)
        return
    run_all(args)


CHILDREN = {"fit": lambda a: child_fit(a.steps)}


def run_child(kind: str, cfg: tuple, args: argparse.Namespace, old: str | None) -> dict:
    name, env_vars, threads = cfg
    cmd = [sys.executable, __file__, "--child", kind, "--threads", str(threads), "--steps", str(args.steps)]
    if old:
        cmd += ["--old", old]
    out = run_in_process(name, cmd, env_vars)
    if "error" in out:
        return out
    print(kind, "old" if old else "new", json.dumps(out), flush=True)
    return out


def compare(args: argparse.Namespace) -> dict:
    """The 300-step default fit of an older checkout (``--old``) and of this one, one thread each: time, best
    steps and how far apart the two deltas are."""
    import tempfile

    from safetensors.torch import load_file

    out: dict = {"date": datetime.date.today().isoformat(), "threads": 1, "steps": args.steps}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for label, old in (("old", args.old), ("new", None)):
            paths[label] = f"{tmp}/{label}.safetensors"
            cmd = [sys.executable, __file__, "--save-delta", paths[label], "--threads", "1", "--steps", str(args.steps)]
            p = subprocess.run(cmd + (["--old", old] if old else []), capture_output=True, text=True, cwd=ROOT)
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if p.returncode != 0 or not lines:
                sys.exit(p.stderr[-2000:])
            out[label] = json.loads(lines[-1][len("RESULT ") :])
            print("compare", label, json.dumps(out[label]), flush=True)
        a, b = load_file(paths["old"]), load_file(paths["new"])
        diff = max(float((a[n] - b[n]).abs().max()) for n in a)
        scale = max(float(a[n].abs().max()) for n in a)
        num = sum(float((a[n].double() - b[n].double()).pow(2).sum()) for n in a)
        den = sum(float(a[n].double().pow(2).sum()) for n in a)
        out["delta_max_abs_diff"] = diff
        out["delta_max_abs"] = scale
        out["delta_relative_l2_diff"] = (num / den) ** 0.5
    return out


def run_all(args: argparse.Namespace) -> None:
    configs = [c for c in CONFIGS if args.configs is None or c[0] in args.configs.split(",")]
    kinds = args.only.split(",")
    for kind in kinds:
        if kind == "compare":
            entry = compare(args)
        else:
            runs = [run_child(kind, c, args, args.old) for c in configs]
            entry = {"date": datetime.date.today().isoformat(), "steps": args.steps, "runs": runs}
        results = json.loads(OUT.read_text()) if OUT.is_file() else {}  # read now: other kinds may have run since
        results[f"{kind}_old" if args.old and kind != "compare" else kind] = entry
        results["machine"] = {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()}
        OUT.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
