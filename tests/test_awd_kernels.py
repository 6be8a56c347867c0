"""AWD's fit gives the same bytes under every CPU kernel choice this machine can be forced into: torch's kernels
compiled for another SIMD width (``ATEN_CPU_CAPABILITY``, read when torch is imported, so each choice runs in its
own process) and another thread count, as a second machine would run them (experiments/awd_kernels.py measures
the embedded experts' 300-step fit the same way)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

#: Task vectors with T = 9 >= 8 (so that a sum over tasks would be vectorised), rows longer than a SIMD register
#: times the unroll, odd lengths (the fixed order's carried middle element), and a 3-D tensor.
SHAPES = {"layer.0.w": (40, 300), "layer.1.w": (24, 129), "layer.2.w": (6, 5, 70)}
TASKS = 9


def fit_hashes() -> dict[str, str]:
    """Bytes (sha256) of deltas fitted here: the default objective and optimiser, and the other granularities,
    norms and SGD with momentum."""
    import hashlib

    from mergelab.methods.awd_fit import OptimizerConfig
    from mergelab.methods.awd_module import fit_delta
    from mergelab.methods.awd_objective import Objective

    # Integers, not randn: randn's own kernel (Box-Muller with vectorised log/sin) differs with the capability.
    g = torch.Generator().manual_seed(5)

    def noise(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randint(-(2**20), 2**20, shape, generator=g).float() / 2**20

    shared = {n: noise(s) for n, s in SHAPES.items()}
    taus = {n: 1e-3 * torch.stack([shared[n] + noise(s) for _ in range(TASKS)]) for n, s in SHAPES.items()}
    cpu = {"accelerator": "cpu", "enable_progress_bar": False, "logger": False, "enable_model_summary": False}
    runs = {
        "row_l2_adam": (Objective("row", "l2", 0.1), OptimizerConfig(steps=8)),
        "tensor_row_l2_sgd": (Objective("tensor", "row_l2", 0.1), OptimizerConfig("sgd", 0.5, 0.9, 8)),
        "model_l1_adam": (Objective("model", "l1", 0.1), OptimizerConfig(steps=8)),
    }
    out = {}
    for name, (objective, optim) in runs.items():
        fit = fit_delta(list(SHAPES), SHAPES, taus.__getitem__, objective, optim, cpu)
        h = hashlib.sha256()
        for n in SHAPES:
            h.update(fit.delta[n].numpy().tobytes())
        h.update(json.dumps([fit.history.L_O, fit.history.L_R, fit.final["L_O"], fit.final["L_R"]]).encode())
        out[name] = h.hexdigest()
    return out


def child() -> None:
    """Run in a subprocess: print the capability torch runs and the hashes."""
    torch.set_num_threads(int(os.environ["AWD_TEST_THREADS"]))
    out = {"capability": torch.backends.cpu.get_cpu_capability(), "hashes": fit_hashes()}
    print("RESULT " + json.dumps(out), flush=True)


def run_under(capability: str | None, threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    env["AWD_TEST_THREADS"] = str(threads)
    p = subprocess.run(
        [sys.executable, "-c", "from tests.test_awd_kernels import child; child()"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT ") :])


def kernel_choices() -> list[tuple[str | None, int]]:
    """This machine's own kernels with 2 threads, the portable ``default`` kernels with 1, and AVX2 with 1 where
    the machine runs AVX-512 (all three are different summation orders for torch's vectorised kernels)."""
    native = torch.backends.cpu.get_cpu_capability()
    choices: list[tuple[str | None, int]] = [(None, 2), ("default", 1)]
    if native == "AVX512":
        choices.append(("avx2", 1))
    return choices


def test_fit_is_bit_identical_under_every_kernel_choice() -> None:
    choices = kernel_choices()
    results = [run_under(cap, threads) for cap, threads in choices]
    forced = [r["capability"] for r in results]
    if len(set(forced)) < 2:
        pytest.skip(f"this machine cannot be forced into another kernel choice (capabilities {forced})")
    for (cap, threads), r in zip(choices[1:], results[1:], strict=True):
        assert cap is None or r["capability"].lower() == cap  # the choice took effect
        assert r["hashes"] == results[0]["hashes"], f"{cap}/{threads} threads vs {forced[0]}/2 threads"
