"""SLERP and the Karcher mean against their definitions (MergeKit 0.1.5's), computed here by hand in float64.

The oracles below work on whole flattened tensors, as MergeKit does; the methods work from streamed per-tensor Gram
matrices and combine row blocks, so several chunk sizes are merged. Streaming, threads and DARE/AWD are covered by
the conformance matrix (tests/test_conformance.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from mergelab import task_vectors as tv
from mergelab.engine.chunks import Block
from mergelab.engine.passes import combine_in_memory, merge_in_memory
from mergelab.methods import DARE, SLERP, KarcherMean, TaskVectorMethod
from mergelab.methods.slerp import layer_positions
from mergelab.reports.analysis import analyze_pool
from tests.conftest import ListPool
from tests.test_method_declarations import composed

SHAPES = {
    "model.embed_tokens.weight": (11, 6),
    "model.layers.0.mlp.weight": (9, 6),
    "model.layers.1.mlp.weight": (9, 6),
    "model.layers.2.attn.weight": (6, 6),
    "model.layers.3.attn.weight": (6, 6),
    "model.layers.3.norm": (6,),
    "model.norm.weight": (6,),
}


def pool(n_experts: int, dtype: torch.dtype = torch.float64, spread: float = 0.4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in SHAPES.items()}
    experts = [
        {k: v + spread * torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in base.items()}
        for _ in range(n_experts)
    ]
    cast = {k: v.to(dtype) for k, v in base.items()}
    return cast, [{k: v.to(dtype) for k, v in e.items()} for e in experts]


def merged(method: TaskVectorMethod, base, experts) -> list[dict[str, Tensor]]:
    """The merge for several chunk sizes (whole tensors, a few rows, one row per block)."""
    return [merge_in_memory(method, base, experts, chunk_elems=c) for c in (None, 20, 6)]


# ----------------------------------------------------------------------------------------------- SLERP


def slerp_by_hand(t: float, a: Tensor, b: Tensor, threshold: float = 0.9995, eps: float = 1e-8) -> Tensor:
    """MergeKit's slerp of two whole tensors, in float64."""
    a, b = a.double().flatten(), b.double().flatten()
    na, nb = float(a.norm()), float(b.norm())
    na, nb = (na if na > eps else 1.0), (nb if nb > eps else 1.0)
    dot = max(-1.0, min(1.0, float((a / na) @ (b / nb))))
    if abs(dot) > threshold:
        return (1 - t) * a + t * b
    omega = math.acos(dot)
    return math.sin((1 - t) * omega) / math.sin(omega) * a + math.sin(t * omega) / math.sin(omega) * b


def test_slerp_is_the_definition_for_every_chunk_size() -> None:
    base, experts = pool(1)
    for t in (0.3, 0.75):
        for out in merged(SLERP(t=t), base, experts):
            for k in base:
                want = slerp_by_hand(t, base[k], experts[0][k])
                torch.testing.assert_close(out[k].flatten(), want, atol=1e-12, rtol=0)
    base32, experts32 = pool(1, torch.float32)
    out = merge_in_memory(SLERP(t=0.3), base32, experts32, chunk_elems=20)
    for k in base32:
        torch.testing.assert_close(
            out[k].double().flatten(), slerp_by_hand(0.3, base32[k], experts32[0][k]), atol=2e-6, rtol=0
        )


def test_slerp_endpoints_are_the_two_models() -> None:
    for dtype in (torch.float64, torch.bfloat16):
        base, experts = pool(1, dtype)
        for out in merged(SLERP(t=0.0), base, experts):
            assert all(torch.equal(out[k], base[k]) for k in base)
        for out in merged(SLERP(t=1.0), base, experts):
            assert all(torch.equal(out[k], experts[0][k]) for k in base)


def test_slerp_falls_back_to_linear_interpolation_for_colinear_tensors() -> None:
    base, _ = pool(0)
    twice = {k: 2 * v for k, v in base.items()}  # cos = 1: same direction, other norm
    flipped = {k: -v for k, v in base.items()}  # cos = -1: antipodal
    for other, want in ((twice, 1.3), (flipped, 0.4)):
        out = merge_in_memory(SLERP(t=0.3), base, [other])
        for k in base:  # (1 - t) theta_0 + t theta_1 = (1 + t) theta_0, resp. (1 - 2t) theta_0
            torch.testing.assert_close(out[k], want * base[k], atol=1e-12, rtol=0)
    # the threshold decides: with 0 every pair of tensors counts as colinear
    base, experts = pool(1)
    out = merge_in_memory(SLERP(t=0.3, dot_threshold=0.0), base, experts)
    for k in base:
        torch.testing.assert_close(out[k], 0.7 * base[k] + 0.3 * experts[0][k], atol=1e-12, rtol=0)
        assert not torch.allclose(out[k].flatten(), slerp_by_hand(0.3, base[k], experts[0][k]), atol=1e-6)


def test_layer_positions_follow_mergekit_gradients() -> None:
    # Layer i of L at i / (L - 1); tensors outside the layers (MergeKit's pre/post weights) at 0.
    assert layer_positions(list(SHAPES)) == {
        "model.embed_tokens.weight": 0.0,
        "model.layers.0.mlp.weight": 0.0,
        "model.layers.1.mlp.weight": 1 / 3,
        "model.layers.2.attn.weight": 2 / 3,
        "model.layers.3.attn.weight": 1.0,
        "model.layers.3.norm": 1.0,
        "model.norm.weight": 0.0,
    }
    assert layer_positions(["encoder.layer.0.w", "encoder.layer.4.w", "pooler.w"])["encoder.layer.4.w"] == 1.0
    assert layer_positions(["transformer.h.0.w", "wte"]) == {"transformer.h.0.w": 1.0, "wte": 0.0}  # one layer: 1


def t_of_every_tensor(t) -> dict[str, float]:
    method = SLERP(t=t)
    method.begin(list(SHAPES))
    return {k: method.t_of(k) for k in SHAPES}


def test_t_gradients_and_filters_are_resolved_per_tensor() -> None:
    # [0.2, 0.8, 0.4] spread over positions 0, 1/3, 2/3, 1 (x 2 = index into the list), linear in between.
    got = t_of_every_tensor([0.2, 0.8, 0.4])
    want = {0.0: 0.2, 1 / 3: 0.2 + (2 / 3) * 0.6, 2 / 3: 0.8 - (1 / 3) * 0.4, 1.0: 0.4}
    for k, position in layer_positions(list(SHAPES)).items():
        assert got[k] == pytest.approx(want[position], abs=1e-15), k
    # MergeKit's list: the first entry whose filter is a substring of the name; a final default without filter.
    got = t_of_every_tensor([{"filter": "mlp", "value": [0.0, 1.0]}, {"filter": "attn", "value": 0.9}, {"value": 0.1}])
    assert got["model.layers.1.mlp.weight"] == pytest.approx(1 / 3)
    assert got["model.layers.0.mlp.weight"] == 0.0
    assert got["model.layers.2.attn.weight"] == got["model.layers.3.attn.weight"] == 0.9
    assert got["model.embed_tokens.weight"] == got["model.layers.3.norm"] == 0.1
    # and the merge uses each tensor's own t
    base, experts = pool(1)
    t = [{"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.25}]
    out = merge_in_memory(SLERP(t=t), base, experts, chunk_elems=20)
    for k, tk in t_of_every_tensor(t).items():
        torch.testing.assert_close(out[k].flatten(), slerp_by_hand(tk, base[k], experts[0][k]), atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    ("t", "message"),
    [
        ("abc", "option 't' must be a number, got 'abc'"),
        (math.nan, r"option 't' must be in \[0.0, 1.0\], got nan"),
        (1.5, r"option 't' must be in \[0.0, 1.0\], got 1.5"),
        ([], "option 't' is an empty gradient"),
        ([0.2, "x"], r"option 't\[1\]' must be a number"),
        ([{"filtr": "mlp", "value": 0.2}], r"option 't\[0\]' must be \{filter: <substring>, value: ...\}"),
        ([{"filter": 3, "value": 0.2}], r"option 't\[0\].filter' must be a substring"),
        ([{"filter": "mlp", "value": [0.1, 2.0]}], r"option 't\[0\].value\[1\]' must be in \[0.0, 1.0\]"),
        ([{"filter": "mlp", "value": 0.2}], r"option 't': end the list with a default \{value: ...\} \(no filter\)"),
    ],
)
def test_bad_t_is_refused_naming_it(t, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SLERP(t=t)


def test_slerp_refuses_pools_without_exactly_one_expert() -> None:
    with pytest.raises(ValueError, match=r"exactly one expert.*the pool has 2 experts \['math', 'code'\]: keep one"):
        SLERP().check_experts(["math", "code"])
    SLERP().check_experts(["math"])
    base, experts = pool(2)
    with pytest.raises(ValueError, match="the pool has 2 experts"):
        merge_in_memory(SLERP(), base, experts)


def test_weight_methods_need_the_pretrained_weights_and_others_do_not_get_them() -> None:
    base, experts = pool(1)
    vectors = tv.task_vectors(base, experts)
    with pytest.raises(ValueError, match="SLERP merges the models' weights, not task vectors alone"):
        combine_in_memory(SLERP(), vectors)

    seen: list[Block] = []

    class Recorder(TaskVectorMethod):
        def merge_chunk(self, block: Block, vectors: Sequence[Tensor]) -> Tensor:
            seen.append(block)
            return vectors[0]

    merge_in_memory(Recorder(), base, experts)
    assert seen and all(b.base is None for b in seen)  # nothing handed to methods not asking


# ----------------------------------------------------------------------------------------------- Karcher


def karcher_by_hand(tensors: Sequence[Tensor], max_iter: int = 10, tol: float = 1e-5) -> tuple[Tensor, int]:
    """MergeKit's karcher_merge_tensors on whole flattened tensors in float64, and the steps it took."""
    xs = [x.double().flatten() for x in tensors]
    if len(xs) == 1:
        return xs[0], 0
    alphas = [1 / len(xs)] * len(xs)
    norms = [float(x.norm()) for x in xs]
    valid = [i for i in range(len(xs)) if norms[i] > tol]
    if not valid:
        return torch.zeros_like(xs[0]), 0
    w = [alphas[i] / sum(alphas[j] for j in valid) for i in valid]
    units = [xs[i] / norms[i] for i in valid]
    mean = sum(a * u for a, u in zip(w, units, strict=True))
    mean = units[0].clone() if float(mean.norm()) < tol else mean / mean.norm()
    steps = 0
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(w, units, strict=True):
            dot = max(-1.0, min(1.0, float(mean @ u)))
            theta = math.acos(dot)
            if theta < tol:
                continue
            tangent += a * (theta / math.sin(theta)) * (u - dot * mean)
        step = float(tangent.norm())
        if step < tol:
            break
        steps += 1
        mean = math.cos(step) * mean + math.sin(step) * tangent / step
        if float(mean.norm()) > tol:
            mean = mean / mean.norm()
    return sum(a * n for a, n in zip(alphas, norms, strict=True)) * mean, steps


@pytest.mark.parametrize(("max_iter", "tol"), [(10, 1e-5), (0, 1e-5), (1, 1e-12), (50, 1e-12), (10, 0.5)])
@pytest.mark.parametrize("include_pretrained", [False, True])
def test_karcher_is_the_definition(max_iter: int, tol: float, include_pretrained: bool) -> None:
    base, experts = pool(3, spread=0.8)
    method = KarcherMean(max_iter=max_iter, tol=tol, include_pretrained=include_pretrained)
    for out in merged(method, base, experts):
        for k in base:
            models = [e[k] for e in experts] + ([base[k]] if include_pretrained else [])
            want, steps = karcher_by_hand(models, max_iter, tol)
            torch.testing.assert_close(out[k].flatten(), want, atol=1e-10, rtol=0)
            assert method.steps(k)[0] == steps, k


def test_karcher_converges_to_the_riemannian_mean() -> None:
    # With enough steps the mean direction is a fixed point: the models' log maps at it sum to 0.
    base, experts = pool(3, spread=0.8)
    method = KarcherMean(max_iter=100, tol=1e-13)
    out = merge_in_memory(method, base, experts)
    assert method.report() == {
        "karcher_max_steps": method.report()["karcher_max_steps"],
        "karcher_unconverged_tensors": 0,
    }
    for k in base:
        m = out[k].flatten() / out[k].norm()
        log_sum = torch.zeros_like(m)
        for e in experts:
            u = e[k].flatten() / e[k].norm()
            theta = math.acos(max(-1.0, min(1.0, float(m @ u))))
            log_sum += theta / math.sin(theta) * (u - math.cos(theta) * m)
        assert float(log_sum.norm()) < 1e-10, k
        assert float(out[k].norm()) == pytest.approx(sum(float(e[k].norm()) for e in experts) / 3, rel=1e-12)
    # too few steps for that tolerance: counted as not converged
    short = KarcherMean(max_iter=1, tol=1e-13)
    merge_in_memory(short, base, experts)
    assert short.report() == {"karcher_max_steps": 1, "karcher_unconverged_tensors": len(SHAPES)}


def test_karcher_of_identical_models_is_that_model_and_of_one_model_the_model() -> None:
    base, experts = pool(1)
    for out in merged(KarcherMean(), base, [experts[0]] * 3):
        for k in base:
            torch.testing.assert_close(out[k], experts[0][k], atol=1e-14, rtol=0)
    assert all(torch.equal(v, experts[0][k]) for k, v in merge_in_memory(KarcherMean(), base, experts).items())


def test_karcher_of_two_equal_norm_models_is_their_slerp_midpoint() -> None:
    # Two models of one norm: the Karcher mean is the geodesic midpoint, slerp at t = 1/2 (another definition).
    base, experts = pool(1)
    same_norm = {k: v * (base[k].norm() / v.norm()) for k, v in experts[0].items()}
    karcher = merge_in_memory(KarcherMean(max_iter=20, tol=1e-14, include_pretrained=True), base, [same_norm])
    slerp = merge_in_memory(SLERP(t=0.5), base, [same_norm])
    for k in base:
        torch.testing.assert_close(karcher[k], slerp[k], atol=1e-12, rtol=0)


def test_karcher_skips_zero_tensors_and_refuses_bad_options() -> None:
    base, experts = pool(2)
    experts[1] = {k: torch.zeros_like(v) for k, v in experts[1].items()}  # norm 0 <= tol: no direction
    out = merge_in_memory(KarcherMean(), base, experts)
    for k in base:  # the direction is the other model's, the scale the mean of both norms
        torch.testing.assert_close(out[k], experts[0][k] / 2, atol=1e-14, rtol=0)
    with pytest.raises(ValueError, match=r"option 'max_iter' must be a whole number, got 2\.5"):
        KarcherMean(max_iter=2.5)
    with pytest.raises(ValueError, match=r"option 'tol' must be >= 0.0, got -1"):
        KarcherMean(tol=-1)


def test_the_analysis_of_a_wrapper_around_a_weight_method_hands_it_the_pretrained_weights() -> None:
    # DARE(merge=SLERP) runs SLERP's statistics pass while the analysis reads DARE's dropped vectors.
    base, experts = pool(1)
    analysis_pool = ListPool(base, experts)
    analysis_pool.tasks = ["only"]
    dare = DARE(p=0.3, merge=SLERP())
    after = analyze_pool(analysis_pool, dare)["after"]
    dropped = dare.drop(tv.task_vectors(base, experts))[0]
    want = math.sqrt(sum(float(v.double().square().sum()) for v in dropped.values()))
    assert after["norm"][0] == pytest.approx(want, rel=1e-12)


# ------------------------------------------------------------------------------------------- MergeKit configs


def mergekit_round_trip(method: TaskVectorMethod, n_experts: int, tmp_path: Path) -> tuple[dict, Any]:
    """``method``'s exported MergeKit config for a pool of ``n_experts`` and what mergelab reads back from it."""
    from mergelab.io.writer import write_checkpoint
    from mergelab.provenance.mergekit import export_merge, read_mergekit

    base = write_checkpoint({"w": torch.ones(2, 2)}, tmp_path / "base")
    experts = [write_checkpoint({"w": torch.full((2, 2), 2.0 + i)}, tmp_path / f"e{i}") for i in range(n_experts)]
    method.task_names = [d.name for d in experts]
    exported = export_merge(method, str(base), [str(d) for d in experts], True, "pool", base_dtypes=["float32"])
    assert exported.config is not None, exported.reason
    path = tmp_path / "mergekit_config.yml"
    path.write_text(exported.yaml())
    return exported.config, read_mergekit(path)


def test_slerp_filters_and_gradients_go_to_mergekit_and_back(tmp_path: Path) -> None:
    t = [{"filter": "mlp", "value": [0.1, 0.9]}, {"value": 0.4}]
    config, imported = mergekit_round_trip(SLERP(t=t), 1, tmp_path)
    assert config["merge_method"] == "slerp" and config["parameters"] == {"t": t}  # MergeKit's own form
    again = composed(imported.method)
    assert isinstance(again, SLERP) and again.t == SLERP(t=t).t
    from mergelab.provenance.mergekit import export_merge

    other = export_merge(SLERP(dot_threshold=0.99), "base", ["e0"], True, "pool", base_dtypes=["float32"])
    assert other.config is None and "fixes dot_threshold 0.9995" in str(other.reason)  # MergeKit fixes it


def test_a_karcher_mean_of_the_experts_alone_has_no_base_model_and_reads_back_as_the_same_models(
    tmp_path: Path,
) -> None:
    config, imported = mergekit_round_trip(KarcherMean(max_iter=7, tol=1e-6), 3, tmp_path)
    assert "base_model" not in config and [m["model"] for m in config["models"]] == [
        str(tmp_path / f"e{i}") for i in range(3)
    ]
    # No base_model: the first model is the pool's pretrained one, taken into the mean with the others.
    assert imported.pretrained == str(tmp_path / "e0") and sorted(imported.experts.values()) == [
        str(tmp_path / "e1"),
        str(tmp_path / "e2"),
    ]
    again = composed(imported.method)
    assert (again.max_iter, again.tol, again.include_pretrained) == (7, 1e-6, True)
