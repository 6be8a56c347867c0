"""Robustness of AWD's optimiser across pools whose task vectors differ in scale (not a test: minutes on 2 cores).

For each pool it fits delta with the old default (plain SGD, absolute lr 1.0, no guard: the iterate after the last
step is returned, as before the guard existed) and with the current default (``OptimizerConfig()``: Adam, lr 0.01
relative to each tensor's task-vector rms, guarded), both at row granularity, l2, alpha 0.1, tensor by tensor
(the row objective is a sum over tensors, so this is the whole fit's iterates), and prints one line per fit:
L_O at the start and of the returned delta, ||delta|| / ||tau|| (||tau||: the rms over tasks of ||tau_t|| on the
disentangled matrices), whether the evaluated loss never rose, the guard's back-offs, and the time. Saves
experiments/awd_robustness.json.

Pools:
- ``embedded``: the six cached experts of the embedded suite (all-MiniLM-L6-v2; 36 block matrices, 10.6M
  parameters per task vector); needs ``mergelab`` to have been run once (it builds them).
- ``embedded_x0.1``: the same task vectors times 0.1 (a pool with smaller task vectors, e.g. shorter fine-tuning).
- ``smollm2``: SmolLM2-135M's 210 block matrices (its config: hidden 576, intermediate 1536, 30 layers, 9 heads,
  3 KV heads; 106M parameters per task vector). No expert is fine-tuned (too slow on 2 cores) and AWD only sees
  task vectors, so the base weights are not needed: 3 task vectors built as structured perturbations, per matrix a
  shared rank-4 component + a task's own rank-4 component + 30% dense noise, rms 3e-4; task 3 is LoRA-like: it
  changes only the q_proj and v_proj matrices (every other matrix is exactly zero: zero tensors and rows).
- ``clip``: a random-init ``CLIPVisionModel`` with transformers' default config (the ViT-B/32 shape: 12 layers,
  hidden 768; 72 block matrices, 85M parameters per task vector), 4 experts = base + random task vectors of rms
  1e-4, 3e-4, 1e-3, 3e-4 (different scales on purpose), each 0.5 x a shared component + its own.

    python experiments/awd_robustness.py                        # every pool, 300 steps (60 for smollm2 and clip)
    python experiments/awd_robustness.py --pools embedded --steps 300
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from mergelab.methods.awd_arithmetic import fixed_sum
from mergelab.methods.awd_fit import OptimizerConfig
from mergelab.methods.awd_module import fit_delta
from mergelab.methods.awd_objective import Objective, objective_terms, tau_gram

CPU = {"accelerator": "cpu", "enable_progress_bar": False, "logger": False}
POOLS = ("embedded", "embedded_x0.1", "smollm2", "clip")
#: Steps per pool: the two large pools get fewer, to keep the measurement affordable on 2 cores.
STEPS = {"embedded": 300, "embedded_x0.1": 300, "smollm2": 60, "clip": 60}
Loader = tuple[list[str], dict[str, tuple[int, ...]], Callable[[str], Tensor]]


def embedded_pool(scale: float) -> Loader:
    """The cached embedded experts' task vectors (times ``scale``), via bench_awd's reader."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_awd import embedded_loader

    names, shapes, load, _ = embedded_loader()
    return names, {n: tuple(s) for n, s in shapes.items()}, (lambda n: load(n) * scale) if scale != 1 else load


def low_rank(shape: tuple[int, ...], rank: int, g: torch.Generator) -> Tensor:
    """A random rank-``rank`` matrix of rms about 1."""
    return torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g) / math.sqrt(rank)


def smollm2_pool() -> Loader:
    """SmolLM2-135M-shaped block matrices with structured (low-rank) task vectors; the third task is LoRA-like."""
    h, inter, layers, kv = 576, 1536, 30, 192
    per_layer = {
        "self_attn.q_proj.weight": (h, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, h),
        "mlp.gate_proj.weight": (inter, h),
        "mlp.up_proj.weight": (inter, h),
        "mlp.down_proj.weight": (h, inter),
    }
    shapes = {f"model.layers.{i}.{k}": s for i in range(layers) for k, s in per_layer.items()}
    names = list(shapes)

    def load(n: str) -> Tensor:
        g = torch.Generator().manual_seed(names.index(n))
        s = shapes[n]
        shared = low_rank(s, 4, g)
        out = []
        for t in range(3):
            if t == 2 and not n.endswith(("q_proj.weight", "v_proj.weight")):
                out.append(torch.zeros(s))  # LoRA on q/v only: the expert equals the base elsewhere
                continue
            v = shared + low_rank(s, 4, g) + 0.3 * torch.randn(s, generator=g)
            out.append(3e-4 * v / v.pow(2).mean().sqrt())
        return torch.stack(out)

    return names, shapes, load


def clip_pool() -> Loader:
    """A random-init CLIPVisionModel (default config: ViT-B/32 shape) and 4 random task vectors of mixed scales."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from mergelab.methods.awd import AWD

    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig())
    probe = AWD()
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items() if probe.disentangles(n, p.shape)}
    names = list(shapes)
    del model
    scales = (1e-4, 3e-4, 1e-3, 3e-4)

    def load(n: str) -> Tensor:
        g = torch.Generator().manual_seed(1000 + names.index(n))
        shared = torch.randn(shapes[n], generator=g)
        return torch.stack([s * (0.5 * shared + torch.randn(shapes[n], generator=g)) for s in scales])

    return names, shapes, load


def old_fit(names: list[str], load: Callable[[str], Tensor], steps: int) -> tuple[list[float], dict[str, Tensor]]:
    """The old default, as it ran: SGD lr 1.0, no guard, the last iterate returned; per-step loss (steps + 1
    evaluations: the start and after each step), tensor by tensor."""
    objective = Objective("row", "l2", 0.1, num_tensors=len(names))
    losses = [0.0] * (steps + 1)
    deltas = {}
    for n in names:
        tau = load(n)
        gram = tau_gram(tau, True)
        d = torch.zeros(tau.shape[1:], requires_grad=True)
        opt = torch.optim.SGD([d], lr=1.0)
        for k in range(steps + 1):
            out = objective_terms(objective, [tau], [gram], [d])
            losses[k] += float(out["loss"].detach())
            if k < steps:
                opt.zero_grad()
                out["loss"].backward()
                opt.step()
        deltas[n] = d.detach()
    return losses, deltas


def l_o(names: list[str], load: Callable[[str], Tensor], deltas: dict[str, Tensor]) -> float:
    """L_O of ``deltas``, recomputed."""
    objective = Objective("row", "l2", 0.1, num_tensors=len(names))
    total = 0.0
    for n in names:
        tau = load(n)
        total += float(objective_terms(objective, [tau], [tau_gram(tau, True)], [deltas[n]])["L_O"])
    return total


def tau_norm(names: list[str], load: Callable[[str], Tensor]) -> tuple[float, float]:
    """(rms over tasks of ||tau_t||, L_O at delta = 0) over the disentangled matrices."""
    sq = 0.0
    tasks = 0
    for n in names:
        tau = load(n).double()
        tasks = tau.shape[0]
        sq += float(fixed_sum(tau.pow(2)))
    return math.sqrt(sq / tasks), l_o(names, load, {n: torch.zeros(load(n).shape[1:]) for n in names})


def monotone(losses: list[float]) -> tuple[bool, float]:
    """Whether the loss never rose from one evaluation to the next (float noise aside), and the largest rise
    above the running minimum, relative to it."""
    best, worst = math.inf, 0.0
    for v in losses:
        if not math.isfinite(v):
            return False, math.inf
        if best < math.inf:
            worst = max(worst, (v - best) / abs(best))
        best = min(best, v)
    return all(b <= a * (1 + 1e-6) + 1e-9 for a, b in itertools.pairwise(losses)), worst


def measure(pool: str, steps: int) -> list[dict]:
    names, shapes, load = {
        "embedded": lambda: embedded_pool(1.0),
        "embedded_x0.1": lambda: embedded_pool(0.1),
        "smollm2": smollm2_pool,
        "clip": clip_pool,
    }[pool]()
    norm_tau, l_o0 = tau_norm(names, load)
    params = sum(math.prod(s) for s in shapes.values())
    records = []
    for setting in ("old: sgd lr 1.0", "new: default"):
        t0 = time.perf_counter()
        if setting.startswith("old"):
            losses, deltas = old_fit(names, load, steps)
            backoffs, stopped, best_step = 0, 0, [steps, steps]
        else:
            fit = fit_delta(
                names, shapes, load, Objective("row", "l2", 0.1), OptimizerConfig(steps=steps), CPU, per_tensor=True
            )
            losses = [r["loss"] for r in fit.history.rows(0.1)]
            deltas = dict(fit.delta)
            rep = fit.guard_report()
            backoffs, stopped = rep["backoffs"], rep["groups_stopped_early"]
            best_step = [rep["best_step_min"], rep["best_step_max"]]
        seconds = time.perf_counter() - t0
        delta_norm = math.sqrt(sum(float(fixed_sum(d.double().pow(2))) for d in deltas.values()))
        finite = all(bool(torch.isfinite(d).all()) for d in deltas.values())
        mono, rise = monotone(losses)
        rec = {
            "pool": pool,
            "setting": setting,
            "tasks": int(load(names[0]).shape[0]),
            "params_per_task_vector_M": round(params / 1e6, 1),
            "steps": steps,
            "L_O_start": l_o0,
            "L_O_end": l_o(names, load, deltas) if finite else math.nan,
            "delta_over_tau": delta_norm / norm_tau,
            "delta_finite": finite,
            "monotone": mono,
            "max_rise_over_best": rise,
            "backoffs": backoffs,
            "tensors_stopped_early": stopped,
            "best_step_min_max": best_step,
            "fit_s": round(seconds, 1),
        }
        records.append(rec)
        print(
            f"{pool:14s} {setting:16s} steps {steps:3d}  L_O {l_o0:.4f} -> {rec['L_O_end']:.4f}  "
            f"|delta|/|tau| {rec['delta_over_tau']:.4f}  monotone {'yes' if mono else 'no'} "
            f"(max rise {rise:.3g})  back-offs {backoffs}  stopped {stopped}  {seconds:.0f} s",
            flush=True,
        )
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pools", default=",".join(POOLS))
    ap.add_argument("--steps", type=int, default=None, help="steps for every pool (default: STEPS)")
    ap.add_argument("--out", default=str(Path(__file__).with_name("awd_robustness.json")))
    # One intra-op thread by default: on a shared 2-core machine two threads wait at every op's barrier (measured
    # 7x slower here). The fit's bytes do not depend on the thread count.
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from mergelab.run import quiet_libraries

    quiet_libraries()
    print(f"torch threads {torch.get_num_threads()}")
    results = []
    for pool in args.pools.split(","):
        results.extend(measure(pool, args.steps or STEPS[pool]))
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
