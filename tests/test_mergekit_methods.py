"""MergeKit's methods against their definitions, computed here independently in float64 with plain loops.

Breadcrumbs (+TIES), DELLA (+linear), Model Stock and SCE merge small random tensors, in memory and with several
chunk sizes; each result is compared with the definition written out below (MergeKit 0.1.5's, see each method's
module). The conformance matrix (tests/test_conformance.py) covers streaming, chunking and threads for their YAMLs.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mergelab.engine.chunks import Block
from mergelab.engine.passes import merge_in_memory
from mergelab.methods import DELLA, SCE, Breadcrumbs, ModelStock
from mergelab.methods.della import uniforms
from mergelab.methods.magnitude_threshold import MagnitudeRanks, kth_largest_reference

SHAPES = {"layers.0.w": (23, 17), "layers.0.b": (31,), "layers.1.w": (9, 40), "norm": (1, 7)}


def pool(n_experts: int = 3, seed: int = 0) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    experts = []
    for i in range(n_experts):
        experts.append({k: v + 0.1 * torch.randn(v.shape, generator=g) + 0.03 * (i - 1) for k, v in base.items()})
    return base, experts


def taus(base, experts, name):  # float64 task vectors of one tensor, flattened
    return [(e[name].double() - base[name].double()).flatten() for e in experts]


def mergekit_mix(deltas, weights, consensus, normalize):
    """MergeKit's generalized task-arithmetic mix, element by element in float64."""
    n = len(deltas[0])
    out = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        d = [w * delta[i].item() for w, delta in zip(weights, deltas, strict=True)]
        if consensus:
            majority = 1.0 if sum(d) >= 0 else -1.0
            agree = [x != 0 and math.copysign(1.0, x) == majority for x in d]
            mixed = sum(x for x, a in zip(d, agree, strict=True) if a)
            divisor = sum(w for w, a in zip(weights, agree, strict=True) if a) or 1.0
        else:
            mixed = sum(d)
            divisor = sum(weights) if abs(sum(weights)) >= 1e-8 else 1.0
        out[i] = mixed / divisor if normalize else mixed
    return out


def check(method, reference, base, experts, atol=2e-5):
    for chunk in (None, 40, 7):
        merged = merge_in_memory(method, base, experts, chunk_elems=chunk)
        for name in base:
            expected = base[name].double().flatten() + reference(name)
            torch.testing.assert_close(merged[name].double().flatten(), expected, atol=atol, rtol=0), (name, chunk)


# ----------------------------------------------------------------------------------------------- the helper


def test_magnitude_ranks_are_the_sorted_values_for_any_blocks() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 50, 7, generator=g)
    want = [[1, 10, 350], [2, 5, 17], [350, 1, 100]]
    for rows in (50, 7, 1):
        helper = MagnitudeRanks(lambda key, numel: want)
        for p in range(MagnitudeRanks.passes):
            for s in range(0, 50, rows):
                helper.add_statistics(p, "k", helper.chunk_statistics(p, "k", x[:, s : s + rows].clone(), True))
            helper.end_pass(p)
        got = helper.values("k")
        assert got == [[kth_largest_reference(x[t], r) for r in want[t]] for t in range(3)]


# ----------------------------------------------------------------------------------------------- Breadcrumbs


def breadcrumb(delta, density, gamma):
    n = len(delta)
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    order = sorted(range(n), key=lambda i: abs(delta[i].item()))  # ascending magnitude
    out = torch.zeros_like(delta)
    for i in order[bottom : bottom + target]:
        out[i] = delta[i]
    return out


@pytest.mark.parametrize(
    ("density", "gamma", "weights", "consensus", "normalize"),
    [
        (0.7, 0.05, [1.0, 0.5, 2.0], False, False),
        (0.5, 0.1, [1.0, -0.5, 2.0], True, False),
        (0.9, 0.2, [0.3, 0.5, 0.2], True, True),
        (0.95, 0.1, None, False, True),  # density + gamma > 1: fewer outliers removed
    ],
)
def test_breadcrumbs_follows_its_definition(density, gamma, weights, consensus, normalize) -> None:
    base, experts = pool()
    method = Breadcrumbs(density, gamma, weights, consensus, normalize, scaling=0.8)
    w = weights or [1.0] * 3

    def reference(name):
        sparse = [breadcrumb(d, density, gamma) for d in taus(base, experts, name)]
        return 0.8 * mergekit_mix(sparse, w, consensus, normalize)

    check(method, reference, base, experts)


def test_breadcrumbs_global_prune_ranks_over_the_model() -> None:
    base, experts = pool()
    method = Breadcrumbs(0.6, 0.1, prune="global")
    names = list(base)
    flat = [torch.cat(v) for v in zip(*[taus(base, experts, n) for n in names], strict=True)]
    sparse = [breadcrumb(d, 0.6, 0.1) for d in flat]
    mixed = mergekit_mix(sparse, [1.0] * 3, False, False)
    merged = method.merge(base, experts)
    offset = 0
    for n in names:
        size = base[n].numel()
        expected = base[n].double().flatten() + mixed[offset : offset + size]
        torch.testing.assert_close(merged[n].double().flatten(), expected, atol=2e-5, rtol=0)
        offset += size


# ----------------------------------------------------------------------------------------------- DELLA


def magprune(delta, shape, u, density, epsilon, rescale):
    rows = delta.view(1, -1) if len(shape) < 2 else delta.view(shape[0], -1)
    us = u.double().view(rows.shape)
    out = torch.zeros_like(rows)
    probs = torch.zeros_like(rows)
    for r in range(rows.shape[0]):
        n = rows.shape[1]
        order = sorted(range(n), key=lambda i: (abs(rows[r, i].item()), i))
        for rank, i in enumerate(order):
            p = (density - epsilon) + 2 * epsilon * (rank / (n - 1) if n > 1 else 0.5)
            probs[r, i] = p
            if us[r, i] < p:
                out[r, i] = rows[r, i]
    if rescale == "probability":
        out = torch.where(out != 0, out / probs, out)
    if rescale == "l1":
        before, after = rows.abs().sum().item(), out.abs().sum().item()
        if before >= 1e-7 and after >= 1e-7:
            out = out * (before / after)
    return out.flatten()


@pytest.mark.parametrize(
    ("consensus", "normalize", "rescale", "weights"),
    [(True, True, "l1", None), (False, False, "l1", [1.0, -0.5, 2.0]), (True, False, "probability", [1, 2, 3])],
)
def test_della_follows_its_definition(consensus, normalize, rescale, weights) -> None:
    base, experts = pool()
    method = DELLA(0.6, 0.2, weights, consensus, normalize, rescale, scaling=0.7, seed=5)
    w = [float(x) for x in weights] if weights else [1.0] * 3

    def reference(name):
        shape = SHAPES[name]
        block = Block(name, 0, None, None, shape)
        sparse = [
            magprune(d, shape, uniforms(5, block, t), 0.6, 0.2, rescale)
            for t, d in enumerate(taus(base, experts, name))
        ]
        return 0.7 * mergekit_mix(sparse, w, consensus, normalize)

    check(method, reference, base, experts, atol=5e-5)


def test_della_keeps_about_density_and_its_drops_follow_the_seed() -> None:
    base, experts = pool()
    a = DELLA(0.5, 0.1, consensus=False, normalize=False, rescale="none", seed=1)
    kept = a.merge(base, experts[:1])["layers.0.w"] - base["layers.0.w"]
    assert 0.35 < float((kept != 0).float().mean()) < 0.65
    b = DELLA(0.5, 0.1, consensus=False, normalize=False, rescale="none", seed=2)
    assert not torch.equal(b.merge(base, experts[:1])["layers.0.w"], base["layers.0.w"] + kept)


# ----------------------------------------------------------------------------------------------- Model Stock


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_follows_its_definition(filter_wise) -> None:
    base, experts = pool(4)

    def reference(name):
        shape = SHAPES[name]
        d = [t.view(shape) if len(shape) == 2 and filter_wise else t.view(1, -1) for t in taus(base, experts, name)]
        rows = d[0].shape[0]
        out = []
        for r in range(rows):
            cos = [
                max(-1.0, min(1.0, float(a[r] @ b[r]) / max(float(a[r].norm() * b[r].norm()), 1e-6)))
                for a, b in itertools.combinations(d, 2)
            ]
            c = sum(cos) / len(cos)
            t = 4 * c / (1 + 3 * c)
            out.append(t * sum(x[r] for x in d) / 4)
        return torch.cat(out)

    check(ModelStock(filter_wise), reference, base, experts)


# ----------------------------------------------------------------------------------------------- SCE


@pytest.mark.parametrize("topk", [1.0, 0.3])
def test_sce_follows_its_definition(topk) -> None:
    base, experts = pool()

    def reference(name):
        d = taus(base, experts, name)
        n = len(d[0])
        var = [sum((x[i].item() - sum(y[i].item() for y in d) / 3) ** 2 for x in d) / 3 for i in range(n)]
        if topk < 1:
            k = int(topk * sum(v != 0 for v in var))
            keep = set(sorted(range(n), key=lambda i: -var[i])[:k])
            d = [torch.tensor([x[i].item() if i in keep else 0.0 for i in range(n)], dtype=torch.float64) for x in d]
        sq = [float((x**2).sum()) / n for x in d]
        w = [s / sum(sq) for s in sq] if sum(sq) else [1 / 3] * 3
        out = torch.zeros(n, dtype=torch.float64)
        for i in range(n):
            majority = 1.0 if sum(x[i].item() for x in d) >= 0 else -1.0
            agree = [x[i].item() != 0 and math.copysign(1.0, x[i].item()) == majority for x in d]
            num = sum(wt * x[i].item() for wt, x, a in zip(w, d, agree, strict=True) if a)
            den = sum(wt for wt, a in zip(w, agree, strict=True) if a) or 1.0
            out[i] = num / den
        return out

    check(SCE(topk), reference, base, experts)


# ----------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Breadcrumbs(density=0.0), "density"),
        (lambda: Breadcrumbs(gamma=1.0), "gamma"),
        (lambda: Breadcrumbs(prune="rows"), "prune"),
        (lambda: Breadcrumbs(weights=[1.0, math.inf]), "weights"),
        (lambda: DELLA(density=0.9, epsilon=0.15), "epsilon"),
        (lambda: DELLA(density=0.1, epsilon=0.1), "epsilon"),
        (lambda: DELLA(rescale="l2"), "rescale"),
        (lambda: SCE(select_topk=0.0), "select_topk"),
        (lambda: SCE(scaling=-1.0), "scaling"),
    ],
)
def test_bad_options_are_refused(build, message) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_model_stock_refuses_one_expert() -> None:
    base, experts = pool(1)
    with pytest.raises(ValueError, match="at least 2 experts"):
        ModelStock().merge(base, experts)


def test_per_expert_weights_are_checked_against_the_pool() -> None:
    for method in (Breadcrumbs(weights={"nope": 1.0}), DELLA(weights=[1.0, 2.0])):
        with pytest.raises(ValueError, match="weights"):
            method.check_experts(["a", "b", "c"])
