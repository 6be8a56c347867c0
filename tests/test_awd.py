"""AWD: the objective against a direct computation, the fit's behaviour, merging, saving and the CLI."""

from __future__ import annotations

import csv
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mergelab import task_vectors as tv
from mergelab.engine.passes import combine_in_memory
from mergelab.methods import AWD, TIES, TaskArithmetic
from mergelab.methods.awd_arithmetic import fixed_sum
from mergelab.methods.awd_fit import OptimizerConfig
from mergelab.methods.awd_module import fit_delta
from mergelab.methods.awd_objective import Objective, RowProducts, cosines, objective_terms, stack_rows, tau_gram
from mergelab.run import method_candidates, run
from tests.conftest import ListPool, make_cfg

CPU = {"accelerator": "cpu", "enable_progress_bar": False, "logger": False}
# Parameter names as a transformer backbone has them: block matrices are disentangled, the rest is not.
SHAPES = {
    "layer.0.attn.weight": (6, 5),
    "layer.0.attn.bias": (6,),
    "layer.1.mlp.weight": (4, 6),
    "embeddings.weight": (7, 5),
}
MATRICES = ["layer.0.attn.weight", "layer.1.mlp.weight"]


def make_models(n: int = 3, seed: int = 0) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    shared = {k: torch.randn(s, generator=g) * 0.5 for k, s in SHAPES.items()}  # a common (redundant) component
    experts = [
        {k: base[k] + shared[k] + 0.3 * torch.randn(s, generator=g) for k, s in SHAPES.items()} for _ in range(n)
    ]
    return base, experts


# ------------------------------------------------------------------------------ the objective, computed directly


def direct_loss(taus: list[torch.Tensor], deltas: list[torch.Tensor], granularity: str, norm: str, alpha: float):
    """L_O and L_R from their definitions: materialise tau_t - delta and take cosines pair by pair."""
    n_tasks = taus[0].shape[0]
    pairs = [(i, j) for i, j in itertools.permutations(range(n_tasks), 2)]

    def mean_abs_cos(x: torch.Tensor) -> torch.Tensor:  # x: [T, d] -> mean over ordered pairs of |cos|
        return torch.stack([F.cosine_similarity(x[i], x[j], dim=0, eps=1e-12).abs() for i, j in pairs]).mean()

    diffs = [tau - d for tau, d in zip(taus, deltas, strict=True)]
    if granularity == "model":
        l_o = mean_abs_cos(torch.cat([x.reshape(n_tasks, -1) for x in diffs], dim=1))
    elif granularity == "tensor":
        l_o = torch.stack([mean_abs_cos(x.reshape(n_tasks, -1)) for x in diffs]).mean()
    else:
        per_tensor = []
        for x in diffs:
            rows = x.reshape(n_tasks, x.shape[1], -1)
            per_tensor.append(torch.stack([mean_abs_cos(rows[:, r]) for r in range(rows.shape[1])]).mean())
        l_o = torch.stack(per_tensor).mean()

    def one_norm(d: torch.Tensor) -> torch.Tensor:  # vector_norm: a zero subgradient at 0, as AWD's
        if norm == "l2":
            return torch.linalg.vector_norm(d)
        if norm == "l2_squared":
            return (d**2).sum()
        if norm == "l1":
            return d.abs().sum()
        return torch.linalg.vector_norm(d.reshape(d.shape[0], -1), dim=1).sum()

    if granularity == "model":
        flat = torch.cat([d.reshape(-1) for d in deltas])
        l_r = one_norm(flat) if norm != "row_l2" else sum(one_norm(d) for d in deltas)
    else:
        l_r = torch.stack([one_norm(d) for d in deltas]).mean()
    return l_o, l_r, l_o + alpha * l_r


@pytest.mark.parametrize("granularity", ["model", "tensor", "row"])
@pytest.mark.parametrize("norm", ["l2", "l2_squared", "l1", "row_l2"])
@pytest.mark.parametrize("rows_stacked", [False, True])
def test_loss_and_gradient_match_the_definition(granularity: str, norm: str, rows_stacked: bool) -> None:
    g = torch.Generator().manual_seed(1)
    shapes = [(5, 4), (3, 7), (2, 3, 2)]  # a 3-D tensor: its rows are dim 0
    taus = [torch.randn(3, *s, generator=g, dtype=torch.float64) for s in shapes]
    start = [0.2 * torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    objective = Objective(granularity, norm, alpha=0.7, num_tensors=len(shapes))

    ours = [d.clone().requires_grad_(True) for d in start]
    grams = [tau_gram(t, granularity == "row") for t in taus]
    # a fit lays the task vectors out row by row once (stack_rows); other granularities ignore the flag
    given = [stack_rows(t) for t in taus] if rows_stacked and granularity == "row" else taus
    out = objective_terms(objective, given, grams, ours, rows_stacked=rows_stacked)
    out["loss"].backward()

    ref = [d.clone().requires_grad_(True) for d in start]
    l_o, l_r, loss = direct_loss(taus, ref, granularity, norm, 0.7)
    loss.backward()

    assert float(out["L_O"]) == pytest.approx(float(l_o), rel=1e-9)
    assert float(out["L_R"]) == pytest.approx(float(l_r), rel=1e-9)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-7, atol=1e-10)


def test_row_products_gradient_is_the_derivative() -> None:
    """RowProducts' hand-written backward against finite differences, on a 3-D tensor (rows = dim 0)."""
    g = torch.Generator().manual_seed(3)
    tau = torch.randn(4, 3, 2, 5, generator=g, dtype=torch.float64)
    delta = torch.randn(3, 2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    rows = stack_rows(tau)
    assert torch.autograd.gradcheck(lambda d: RowProducts.apply(rows, d), (delta,))
    a, sq = RowProducts.apply(rows, delta)
    ref_a = torch.stack([(t.reshape(3, -1) * delta.detach().reshape(3, -1)).sum(-1) for t in tau], dim=1)
    torch.testing.assert_close(a, ref_a)
    torch.testing.assert_close(sq, delta.detach().reshape(3, -1).pow(2).sum(-1))


def test_l2_norm_has_a_zero_subgradient_at_zero() -> None:
    taus = [torch.randn(3, 4, 5, dtype=torch.float64)]
    delta = [torch.zeros(4, 5, dtype=torch.float64, requires_grad=True)]
    out = objective_terms(Objective("tensor", "l2", alpha=1.0), taus, [tau_gram(taus[0], False)], delta)
    out["L_R"].backward()
    assert torch.equal(delta[0].grad, torch.zeros(4, 5, dtype=torch.float64))


# ------------------------------------------------------------------------------ the fit


def fit(base: dict, experts: list[dict], **kwargs) -> AWD:
    method = AWD(**{"steps": 40, "lr": 0.05, **kwargs})
    method.prepare(ListPool(base, experts), CPU)
    return method


def test_only_block_matrices_are_disentangled_by_default() -> None:
    base, experts = make_models()
    method = fit(base, experts, steps=2)
    assert sorted(method.delta) == sorted(MATRICES)


@pytest.mark.parametrize("granularity", ["model", "tensor", "row"])
def test_loss_decreases_and_vectors_become_more_orthogonal(granularity: str) -> None:
    base, experts = make_models(seed=2)
    method = fit(base, experts, granularity=granularity, alpha=0.01, lr=0.3, steps=60)
    h = method.fit.history
    assert h.L_O[-1] < 0.8 * h.L_O[0]
    rep = method.report()
    assert rep["mean_abs_cos_after"] < rep["mean_abs_cos_before"]
    assert rep["delta_norm"] > 0


def test_very_large_alpha_keeps_delta_near_zero_and_awd_ta_equals_ta() -> None:
    base, experts = make_models(seed=3)
    method = fit(base, experts, norm="l2_squared", alpha=1e4, lr=1e-5, steps=50)
    vectors = tv.task_vectors(base, experts)
    tau_norm = torch.cat([v[k].reshape(-1) for v in vectors for k in MATRICES]).norm()
    delta_norm = torch.cat([d.reshape(-1) for d in method.delta.values()]).norm()
    assert delta_norm < 1e-4 * tau_norm
    awd = method.merge(base, experts)
    ta = TaskArithmetic(scaling=0.3).merge(base, experts)
    for k in base:
        torch.testing.assert_close(awd[k], ta[k], atol=1e-5, rtol=0)


@pytest.mark.parametrize("granularity", ["model", "tensor", "row"])
def test_orthogonal_task_vectors_leave_delta_at_zero(granularity: str) -> None:
    # Each task changes its own columns of every row: task vectors orthogonal at every granularity.
    base = {k: torch.randn(s) for k, s in SHAPES.items()}
    experts = []
    for t in range(3):
        e = {}
        for k, s in SHAPES.items():
            change = torch.zeros(s)
            if len(s) == 2:
                change[:, t::3] = torch.randn(s[0], len(range(t, s[1], 3)))
            e[k] = base[k] + change
        experts.append(e)
    method = fit(base, experts, granularity=granularity, steps=20)
    assert method.fit.history.L_O[0] == pytest.approx(0.0, abs=1e-6)
    for d in method.delta.values():
        assert float(d.abs().max()) < 1e-6


def test_awd_ta_is_ta_minus_scaling_times_t_times_delta() -> None:
    base, experts = make_models(seed=4)
    method = fit(base, experts, merge=TaskArithmetic(scaling=0.4))
    out = method.merge(base, experts)
    ta = TaskArithmetic(scaling=0.4).merge(base, experts)
    for k in base:
        expected = ta[k] - 0.4 * len(experts) * method.delta[k] if k in method.delta else ta[k]
        torch.testing.assert_close(out[k], expected, atol=1e-5, rtol=1e-5)


def test_awd_ties_is_ties_on_the_disentangled_vectors_in_any_chunking() -> None:
    base, experts = make_models(seed=5)
    method = fit(base, experts, merge=TIES(k=30, scaling=1.0))
    hats = tv.task_vectors(base, experts)
    for v in hats:
        for k, d in method.delta.items():
            v[k] = v[k] - d
    expected = TIES(k=30, scaling=1.0).combine(hats)
    for chunk in (None, 12, 5):  # whole tensors, and row blocks (the streaming engine's unit)
        got = combine_in_memory(method, tv.task_vectors(base, experts), chunk_elems=chunk)
        for k in expected:
            torch.testing.assert_close(got[k], expected[k], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_tensor_by_tensor_mode_gives_the_same_delta(granularity: str) -> None:
    base, experts = make_models(seed=6)
    whole = fit(base, experts, granularity=granularity, optimizer="sgd", momentum=0.9, lr=0.02)
    one_by_one = fit(base, experts, granularity=granularity, optimizer="sgd", momentum=0.9, lr=0.02, mode="per_tensor")
    for k in whole.delta:
        torch.testing.assert_close(one_by_one.delta[k], whole.delta[k], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(one_by_one.fit.history.L_O), torch.tensor(whole.fit.history.L_O))


def test_rerun_gives_the_same_delta_and_saved_delta_reloads(tmp_path: Path) -> None:
    base, experts = make_models(seed=7)
    a = fit(base, experts, optimizer="adam", lr=0.01)
    b = fit(base, experts, optimizer="adam", lr=0.01)
    for k in a.delta:
        assert torch.equal(a.delta[k], b.delta[k])
    a.task_names = ListPool(base, experts).tasks
    a.save_artifacts(tmp_path)
    files = ("delta.safetensors", "history.csv", "awd.json", "cosine_before_after.png", "delta_norms_and_losses.png")
    for name in files:
        assert (tmp_path / name).is_file(), name
    with (tmp_path / "history.csv").open() as f:
        history = list(csv.DictReader(f))
    # steps + 1 rows: the start and the iterate after each step.
    assert len(history) == 41 and float(history[-1]["L_O"]) < float(history[0]["L_O"])
    summary = json.loads((tmp_path / "awd.json").read_text())
    assert len(summary["cosine_after"]) == len(experts)
    reloaded = AWD(delta_path=str(tmp_path / "delta.safetensors"))
    reloaded.prepare(ListPool(base, experts), CPU)  # nothing to fit: the saved delta is used
    merged_a, merged_r = a.merge(base, experts), reloaded.merge(base, experts)
    for k in merged_a:
        assert torch.equal(merged_a[k], merged_r[k])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"granularity": "layer"}, "'granularity'"),
        ({"norm": "l3"}, "'norm'"),
        ({"alpha": -1.0}, "'alpha'"),
        ({"optimizer": "lbfgs"}, "'optimizer'"),
        ({"lr": 0.0}, "'lr'"),
        ({"steps": 0}, "'steps'"),
        ({"rise_tol": -0.1}, "'rise_tol'"),
        ({"max_backoffs": -1}, "'max_backoffs'"),
        ({"merge": "no_such_method"}, "'merge'"),
        ({"merge": {"_target_": "mergelab.methods.TIES", "q": 1}}, "'merge'"),
        ({"mode": "per_tensor", "granularity": "model"}, "per_tensor"),
        ({"delta_path": "/nonexistent/delta.safetensors"}, "delta_path"),
    ],
)
def test_bad_options_are_named(kwargs: dict, match: str) -> None:
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        AWD(**kwargs)


def test_nothing_to_disentangle_is_an_error() -> None:
    base, experts = make_models()
    with pytest.raises(ValueError, match=r"include=\[.\^nothing\$.\] / exclude / matrices_only select no tensor"):
        fit(base, experts, include=["^nothing$"])


def test_fit_delta_rejects_a_single_task_vector() -> None:
    with pytest.raises(ValueError, match="at least two task vectors"):
        fit_delta(["w"], {"w": (2, 2)}, lambda n: torch.ones(1, 2, 2), Objective(), OptimizerConfig(steps=1), CPU)


def test_yaml_defaults_match_the_class() -> None:
    cfg = make_cfg(Path("/unused"), ["method=awd"])
    ((_, method),) = method_candidates(cfg.method, tune=False)
    assert isinstance(method, AWD)
    assert isinstance(method.inner, TaskArithmetic) and method.inner.scaling == 0.3
    assert method.objective.granularity == AWD().objective.granularity
    assert method.optim == AWD().optim
    assert [p.pattern for p in method.include] == [p.pattern for p in AWD().include]


# ------------------------------------------------------------------------------ zero task-vector rows, tensors, vectors


def zeroed(kind: str, taus: list[torch.Tensor]) -> list[torch.Tensor]:
    """Task vectors ([T, rows, cols] per tensor) with zeros of ``kind``: rows of some tasks (and one row of every
    task), a tensor an expert did not change, a whole task vector (an expert equal to the base), or everything."""
    taus = [t.clone() for t in taus]
    if kind == "rows":
        taus[0][1, 2] = 0
        taus[0][:, 4] = 0  # a row that no task changed
        taus[1][0, 0] = 0
        taus[1][2, 1] = 0
    elif kind == "tensor":
        taus[1][2] = 0  # task 2 changed only the first matrix (LoRA-style)
    elif kind == "task_vector":
        for t in taus:
            t[0] = 0
    else:
        for t in taus:
            t.zero_()
    return taus


ZERO_KINDS = ["rows", "tensor", "task_vector", "everything"]


@pytest.mark.parametrize("kind", ZERO_KINDS)
@pytest.mark.parametrize("granularity", ["model", "tensor", "row"])
@pytest.mark.parametrize("norm", ["l2", "l2_squared", "l1", "row_l2"])
def test_zero_task_vector_parts_give_zero_cosines_with_finite_gradients(kind: str, granularity: str, norm: str) -> None:
    """tau - delta = 0 (at delta = 0 where tau is zero) has cosine 0 and a finite gradient, as F.cosine_similarity
    computes on the materialised differences; with delta != 0 the same task vectors give the ordinary cosines."""
    g = torch.Generator().manual_seed(11)
    shapes = [(5, 4), (3, 7)]
    taus = zeroed(kind, [torch.randn(3, *s, generator=g, dtype=torch.float64) for s in shapes])
    objective = Objective(granularity, norm, alpha=0.7, num_tensors=len(shapes))
    grams = [tau_gram(t, granularity == "row") for t in taus]
    for start in (
        [torch.zeros(s, dtype=torch.float64) for s in shapes],
        [0.2 * torch.randn(s, generator=g, dtype=torch.float64) for s in shapes],
    ):
        ours = [d.clone().requires_grad_(True) for d in start]
        out = objective_terms(objective, taus, grams, ours)
        out["loss"].backward()
        ref = [d.clone().requires_grad_(True) for d in start]
        l_o, l_r, loss = direct_loss(taus, ref, granularity, norm, 0.7)
        loss.backward()
        assert math.isfinite(float(out["loss"]))
        assert float(out["L_O"]) == pytest.approx(float(l_o), rel=1e-9, abs=1e-12)
        assert float(out["L_R"]) == pytest.approx(float(l_r), rel=1e-9, abs=1e-12)
        for a, b in zip(ours, ref, strict=True):
            assert bool(torch.isfinite(a.grad).all())
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-7, atol=1e-10)


def test_cosine_of_a_zero_vector_is_zero_with_zero_gradient() -> None:
    gram = torch.tensor([[0.0, 0.0, 0.0], [0.0, 4.0, 2.0], [0.0, 2.0, 9.0]], requires_grad=True)
    cos = cosines(gram)
    assert torch.equal(cos[0].detach(), torch.zeros(3)) and float(cos[1, 2]) == pytest.approx(2 / 6)
    cos.abs().sum().backward()
    assert bool(torch.isfinite(gram.grad).all())


@pytest.mark.parametrize("kind", ["rows", "tensor", "task_vector"])
@pytest.mark.parametrize(
    ("granularity", "norm", "mode"),
    [
        ("row", "l2", "whole"),
        ("row", "row_l2", "per_tensor"),
        ("tensor", "l1", "whole"),
        ("tensor", "l2_squared", "per_tensor"),
        ("model", "l2", "whole"),
        ("model", "row_l2", "whole"),
    ],
)
def test_fit_on_zero_task_vector_parts_gives_a_finite_delta(kind: str, granularity: str, norm: str, mode: str) -> None:
    """Experts equal to the base, experts that changed only some matrices, and zero rows: delta, the history and
    the reported end terms are finite, and the end terms are the returned delta's (recomputed directly)."""
    base, experts = make_models(seed=12)
    taus = zeroed(kind, [torch.stack([e[k] - base[k] for e in experts]) for k in MATRICES])
    for t, e in enumerate(experts):
        for k, tau in zip(MATRICES, taus, strict=True):
            e[k] = base[k] + tau[t]
    method = fit(base, experts, granularity=granularity, norm=norm, mode=mode, steps=12, lr=0.05)
    assert all(bool(torch.isfinite(d).all()) for d in method.delta.values())
    h = method.fit.history
    assert all(math.isfinite(v) for v in h.L_O + h.L_R)
    rep = method.report()
    pool_taus = [torch.stack([e[k] - base[k] for e in experts]).double() for k in MATRICES]
    l_o, l_r, loss = direct_loss(pool_taus, [method.delta[k].double() for k in MATRICES], granularity, norm, 0.1)
    assert rep["L_O_end"] == pytest.approx(float(l_o), rel=1e-5, abs=1e-7)
    assert rep["L_R_end"] == pytest.approx(float(l_r), rel=1e-5, abs=1e-7)
    assert float(loss) <= h.L_O[0] + 0.1 * h.L_R[0] + 1e-6  # the guard never returns worse than the start


# ------------------------------------------------------------------------------ reported terms = the saved delta's


@pytest.mark.parametrize(
    ("granularity", "mode", "optimizer"),
    [
        ("row", "whole", "adam"),
        ("row", "per_tensor", "sgd"),
        ("tensor", "per_tensor", "adam"),
        ("model", "whole", "sgd"),
    ],
)
def test_reported_end_terms_are_those_of_the_returned_delta(granularity: str, mode: str, optimizer: str) -> None:
    base, experts = make_models(seed=13)
    method = fit(base, experts, granularity=granularity, mode=mode, optimizer=optimizer, lr=0.3, steps=7, alpha=0.05)
    taus = [torch.stack([e[k] - base[k] for e in experts]).double() for k in MATRICES]
    deltas = [method.delta[k].double() for k in MATRICES]
    l_o, l_r, _ = direct_loss(taus, deltas, granularity, "l2", 0.05)
    rep = method.report()
    assert rep["L_O_end"] == pytest.approx(float(l_o), rel=1e-5)
    assert rep["L_R_end"] == pytest.approx(float(l_r), rel=1e-5)
    # mean |cos| of the flattened disentangled vectors, from the returned delta
    flat = torch.cat([(t - d).reshape(t.shape[0], -1) for t, d in zip(taus, deltas, strict=True)], dim=1)
    pairs = list(itertools.permutations(range(len(experts)), 2))
    want = torch.stack([F.cosine_similarity(flat[i], flat[j], dim=0).abs() for i, j in pairs]).mean()
    assert rep["mean_abs_cos_after"] == pytest.approx(float(want), rel=1e-4)
    h = method.fit.history
    assert len(h.L_O) == 8  # the start and the iterate after each of the 7 steps
    assert rep["L_O_end"] != pytest.approx(h.L_O[-2], rel=1e-5)  # not the iterate before the last step


# ------------------------------------------------------------------------------ the guarded fit


def test_guard_undoes_rising_steps_and_returns_the_best_iterate() -> None:
    """The old default (SGD, absolute lr 1.0) on small task vectors overshoots: the guard backs off, the loss of
    the returned delta is the smallest evaluated, never above the start, and the back-offs are recorded."""
    base, experts = make_models(seed=14)
    small = [{k: base[k] + 1e-3 * (e[k] - base[k]) for k in base} for e in experts]
    method = fit(base, small, optimizer="sgd", lr=1.0, lr_relative=False, steps=30, granularity="tensor")
    rows = list(method.fit.history.rows(0.1))
    rep = method.report()
    assert rep["guard_backoffs"] > 0 and rep["guard_backoffs"] == sum(r["backoffs"] for r in rows)
    assert max(r["loss"] for r in rows) > rows[0]["loss"]  # there were rising iterates...
    end = rep["L_O_end"] + 0.1 * rep["L_R_end"]
    assert end <= rows[0]["loss"] + 1e-7  # ...but the returned delta is no worse than the start
    assert end == pytest.approx(min(r["loss"] for r in rows), rel=1e-5, abs=1e-8)  # it is the best one evaluated
    assert all(bool(torch.isfinite(d).all()) for d in method.delta.values())


@pytest.mark.parametrize(("granularity", "mode"), [("row", "whole"), ("row", "per_tensor"), ("model", "whole")])
def test_guard_stops_a_group_whose_objective_is_not_finite(tmp_path: Path, granularity: str, mode: str) -> None:
    base, experts = make_models(seed=15)
    experts[1]["layer.1.mlp.weight"] = experts[1]["layer.1.mlp.weight"].clone()
    experts[1]["layer.1.mlp.weight"][2, 3] = float("inf")
    method = fit(base, experts, granularity=granularity, mode=mode, steps=25, max_backoffs=3)
    assert all(bool(torch.isfinite(d).all()) for d in method.delta.values())
    assert torch.equal(method.delta["layer.1.mlp.weight"], torch.zeros(4, 6))  # never moved from its start
    rep = method.report()
    assert rep["guard_groups_stopped_early"] == 1 and rep["guard_backoffs"] >= 3
    assert len(method.fit.history.L_O) == 26  # completed to steps + 1 rows after the stop
    if granularity == "row":  # the other tensor is its own group and was fitted
        assert float(method.delta["layer.0.attn.weight"].abs().max()) > 0
    method.task_names = ["a", "b", "c"]
    method.save_artifacts(tmp_path)
    guard = json.loads((tmp_path / "awd.json").read_text())["guard"]
    stopped = [g for g in guard if g["stopped_at"] is not None]
    assert len(stopped) == 1 and "layer.1.mlp.weight" in stopped[0]["names"]
    assert stopped[0]["backoffs"] == 3 and stopped[0]["stopped_at"] == 2  # rejected at steps 0, 1, 2


# ------------------------------------------------------------------------------ the default optimiser's scale


def test_default_step_is_relative_to_the_task_vectors_scale() -> None:
    """L_O is scale-free; with alpha = 0 the default fit on s * tau is s times the fit on tau, for any s."""
    base, experts = make_models(seed=16)
    fits = {}
    for s in (1.0, 1e-3):
        scaled = [{k: base[k] + s * (e[k] - base[k]) for k in base} for e in experts]
        fits[s] = fit(base, scaled, alpha=0.0, steps=30, lr=OptimizerConfig().lr)
    torch.testing.assert_close(
        torch.tensor(fits[1e-3].fit.history.L_O), torch.tensor(fits[1.0].fit.history.L_O), rtol=1e-3, atol=1e-6
    )
    for k in MATRICES:  # up to Adam's eps (1e-8), which weighs more where the gradient is small
        want = fits[1.0].delta[k]
        torch.testing.assert_close(fits[1e-3].delta[k] / 1e-3, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
    assert fits[1.0].report()["L_O_end"] < 0.9 * fits[1.0].report()["L_O_start"]


# ------------------------------------------------------------------------------ reproducibility


def big_problem(granularity: str, norm: str) -> dict:
    """Tensors larger than torch's parallel grain (32768 elements), so that thread-dependent reductions would show."""
    g = torch.Generator().manual_seed(17)
    shapes = {"layer.0.w": (300, 128), "layer.1.w": (64, 700)}
    shared = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    taus = {
        n: 1e-3 * torch.stack([shared[n] + torch.randn(s, generator=g) for _ in range(3)]) for n, s in shapes.items()
    }
    return {"names": list(shapes), "shapes": shapes, "taus": taus, "objective": Objective(granularity, norm, 0.1)}


def fit_bytes(granularity: str, norm: str, threads: int) -> tuple[bytes, list[float]]:
    p = big_problem(granularity, norm)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = fit_delta(
            p["names"], p["shapes"], p["taus"].__getitem__, p["objective"], OptimizerConfig(steps=6), CPU
        )
    finally:
        torch.set_num_threads(before)
    return b"".join(result.delta[n].numpy().tobytes() for n in p["names"]), result.history.L_O + list(
        result.sq_norms.values()
    )


@pytest.mark.parametrize("granularity", ["model", "tensor", "row"])
@pytest.mark.parametrize("norm", ["l2", "l2_squared", "l1", "row_l2"])
def test_fit_is_bit_identical_with_one_or_two_threads(granularity: str, norm: str) -> None:
    one, two = fit_bytes(granularity, norm, 1), fit_bytes(granularity, norm, 2)
    assert one[0] == two[0]
    assert one[1] == two[1]  # the history and delta's norms too


def test_fixed_sum_does_not_depend_on_the_thread_count() -> None:
    x = torch.randn(3, 70_001, generator=torch.Generator().manual_seed(18))
    before = torch.get_num_threads()
    sums = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        sums.append((fixed_sum(x), fixed_sum(x, dim=1), fixed_sum(x.T, dim=0)))
    torch.set_num_threads(before)
    for other in sums[1:]:
        assert all(torch.equal(a, b) for a, b in zip(sums[0], other, strict=True))
    assert float(sums[0][0]) == pytest.approx(float(x.double().sum()), rel=1e-5, abs=1e-3)
    torch.testing.assert_close(sums[0][1], x.double().sum(1).float(), rtol=1e-5, atol=1e-3)


SUBPROCESS = """
import hashlib, sys, torch
sys.path.insert(0, {root!r})
from tests.test_awd import fit_bytes
torch.set_num_threads(2)
print(hashlib.sha256(fit_bytes("row", "l2", 2)[0] + fit_bytes("model", "l1", 2)[0]).hexdigest())
"""


def test_a_fit_in_another_process_gives_the_same_bytes() -> None:
    import hashlib

    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run(
        [sys.executable, "-c", SUBPROCESS.format(root=root)], capture_output=True, text=True, check=True, cwd=root
    )
    here = hashlib.sha256(fit_bytes("row", "l2", 1)[0] + fit_bytes("model", "l1", 1)[0]).hexdigest()
    assert out.stdout.strip().splitlines()[-1] == here


# ------------------------------------------------------------------------------ the CLI on the real model


def test_cli_awd_run_on_the_real_encoder(tmp_path: Path) -> None:
    out = tmp_path / "awd"
    # The default optimiser (lr relative to the task vectors' scale) on these one-epoch experts, whose task vectors
    # are smaller than the full experts' (the old SGD lr 1.0 made L_O rise here).
    cfg = make_cfg(out, ["method=awd", "method.steps=15", "logger=csv", "plot=true"])
    run(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["rows"]) == ["pretrained", "experts", "awd", "awd (single-task)"]
    report = metrics["rows"]["awd"]["method_report"]
    assert report["L_O_end"] < report["L_O_start"]
    single = metrics["rows"]["awd (single-task)"]["scores"]
    assert set(single) == set(metrics["tasks"]) and all(0 <= s["acc"] <= 1 for s in single.values())
    art = out / "artifacts" / "awd"
    assert (art / "delta.safetensors").is_file() and (art / "cosine_before_after.png").is_file()
    # Per-step L_O / L_R went to the CSV logger through trainer.fit.
    logged = list(out.rglob("metrics.csv"))
    assert logged
    with logged[0].open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("awd/L_O")]
    assert len(rows) == 16  # the start and after each of the 15 steps
    assert "awd (single-task)" in (out / "results.md").read_text()


# ------------------------------------------------------------------------------ checkpoint (streaming) pools


def test_streaming_awd_fits_from_the_files_and_merges_as_defined(tmp_path: Path) -> None:
    """AWD on a checkpoint pool: delta fitted tensor by tensor from the safetensors files (written to
    artifacts/awd/delta as it goes) equals the in-memory per-tensor fit, and the merged model is
    theta_0 + scaling * sum_t (tau_t - delta) on the disentangled matrices, theta_0 + scaling * sum_t tau_t elsewhere.
    """
    from mergelab.engine.streaming import stream_merge
    from mergelab.io.reader import LazyCheckpoint
    from tests.test_streaming import llama

    base_model = llama(0)
    base_model.save_pretrained(tmp_path / "base", max_shard_size="40KB")  # float32: exact comparisons below
    base = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
    experts = []
    for i in range(3):
        g = torch.Generator().manual_seed(10 + i)
        shared = {k: 0.02 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        state = {k: v + shared[k] + 0.02 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        m = llama(0)
        m.load_state_dict(state)
        m.save_pretrained(tmp_path / f"e{i}", max_shard_size="40KB")
        experts.append({k: v.detach().clone() for k, v in m.state_dict().items()})
    spec = "{" + ",".join(f"t{i}:'{tmp_path / f'e{i}'}'" for i in range(3)) + "}"
    overrides = [
        "model=checkpoints",
        f"model.pretrained={tmp_path / 'base'}",
        f"model.experts={spec}",
        "eval=none",
        "logger=none",
        "method=awd",
        "method.steps=15",
        "method.merge.scaling=0.3",
    ]
    run(make_cfg(tmp_path / "run", overrides, tiny=False))
    out = tmp_path / "run"
    metrics = json.loads((out / "metrics.json").read_text())
    report = metrics["method_report"]
    assert report["L_O_end"] < report["L_O_start"]
    for f in ("awd.json", "history.csv", "cosine_before_after.png", "delta_norms_and_losses.png"):
        assert (out / "artifacts" / "awd" / f).is_file(), f
    ck = LazyCheckpoint(out / "artifacts" / "awd" / "delta")
    delta = {k: ck[k] for k in ck}
    ck.close()
    blocks = [k for k, v in base.items() if v.dim() == 2 and ".layers." in k]
    assert sorted(delta) == sorted(blocks)  # the default: 2-D weights inside the numbered blocks

    # The same fit in memory, tensor by tensor (the streaming fit's own mode).
    mem = AWD(steps=15, merge=TaskArithmetic(scaling=0.3), mode="per_tensor")
    mem.prepare(ListPool(base, experts), CPU)
    for k in blocks:
        torch.testing.assert_close(delta[k], mem.delta[k], rtol=1e-5, atol=1e-7)
    taus = [{k: e[k] - base[k] for k in base} for e in experts]
    assert min(float(delta[k].norm()) / float(taus[0][k].norm()) for k in blocks) > 1e-3  # delta is not ~0

    merged = LazyCheckpoint(out / "merged_model")
    assert sorted(merged.keys()) == sorted(base)
    for k, v in base.items():
        d = delta.get(k, torch.zeros_like(v))
        want = v + 0.3 * sum(t[k] - d for t in taus)
        torch.testing.assert_close(merged[k], want, rtol=1e-5, atol=1e-6)
        if k in delta:  # and it differs from plain task arithmetic by far more than the tolerance
            assert float((merged[k] - (v + 0.3 * sum(t[k] for t in taus))).abs().max()) > 1e-4
    merged.close()

    # delta_path accepts the delta dir: the merge is reproduced without fitting.
    again = AWD(merge=TaskArithmetic(scaling=0.3), delta_path=str(out / "artifacts" / "awd" / "delta"))
    stream_merge(again, str(tmp_path / "base"), [str(tmp_path / f"e{i}") for i in range(3)], tmp_path / "again")
    a, b = LazyCheckpoint(out / "merged_model"), LazyCheckpoint(tmp_path / "again")
    assert all(torch.equal(a[k], b[k]) for k in a)

    # AWD-TIES streamed = TIES (global pruning, over all tensors) of the disentangled vectors, in memory.
    ties = AWD(merge="ties", delta_path=str(out / "artifacts" / "awd" / "delta"))
    stream_merge(ties, str(tmp_path / "base"), [str(tmp_path / f"e{i}") for i in range(3)], tmp_path / "ties")
    hat = [{k: t[k] - delta.get(k, torch.zeros_like(t[k])) for k in t} for t in taus]
    want_ties = tv.apply_task_vector(base, combine_in_memory(TIES(), hat))
    got = LazyCheckpoint(tmp_path / "ties")
    for k, v in want_ties.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)


def test_streaming_awd_refuses_model_granularity(tmp_path: Path) -> None:
    from mergelab.pools.checkpoint import CheckpointPool
    from tests.test_streaming import llama

    for name in ("base", "e0"):
        llama(0).save_pretrained(tmp_path / name)
    pool = CheckpointPool(str(tmp_path / "base"), {"t0": str(tmp_path / "e0")})
    with pytest.raises(ValueError, match="granularity 'row' or 'tensor'"):
        AWD(granularity="model").prepare(pool, CPU, work_dir=tmp_path / "w")
    assert not (tmp_path / "w").exists()
