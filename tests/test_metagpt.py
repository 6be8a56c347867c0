"""MetaGPT against its closed form, computed independently here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergelab import task_vectors as tv
from mergelab.engine.chunks import Block
from mergelab.methods import DARE, TIES, MetaGPT, WeightAveraging
from tests.test_methods import SHAPES, assert_state_close, flat, make_models, unflat


def sq_norm(vector: dict) -> float:
    """||v||^2 in float64, computed here independently of the library."""
    return float(sum(np.sum(t.double().numpy() ** 2) for t in vector.values()))


def numpy_lambdas(base: dict, experts: list[dict], curvature: list[float] | None = None) -> np.ndarray:
    b = flat(base).astype(np.float64)
    sq = np.array([np.sum((flat(e).astype(np.float64) - b) ** 2) for e in experts])
    w = sq * (np.array(curvature) ** 2 if curvature else 1.0)
    return w / w.sum()


def test_lambdas_and_merge_match_the_closed_form() -> None:
    base, experts = make_models(n_experts=4, seed=3)
    experts[2] = {k: base[k] + 3.0 * (v - base[k]) for k, v in experts[2].items()}  # a much longer task vector
    method = MetaGPT()
    method.task_names = ["a", "b", "c", "d"]
    out = method.merge(base, experts)
    lam = numpy_lambdas(base, experts)
    assert [method.report()[f"lambda/{t}"] for t in "abcd"] == pytest.approx(lam.tolist(), rel=1e-6)
    assert sum(method.report().values()) == pytest.approx(1.0)
    assert lam[2] > 0.5  # the longest task vector dominates
    b = flat(base).astype(np.float64)
    expected = b + sum(lam[i] * (flat(e) - b) for i, e in enumerate(experts))
    assert_state_close(out, unflat(expected))


def test_equal_norms_give_weight_averaging() -> None:
    base, _ = make_models()
    g = torch.Generator().manual_seed(1)
    tau = {k: torch.randn(v.shape, generator=g) for k, v in base.items()}
    # Same norm, different directions: a sign flip and a permutation of the same values.
    experts = [
        {k: base[k] + tau[k] for k in base},
        {k: base[k] - tau[k] for k in base},
        {k: base[k] + tau[k].flatten().flip(0).reshape(tau[k].shape) for k in base},
    ]
    method = MetaGPT()
    out = method.merge(base, experts)
    assert list(method.report().values()) == pytest.approx([1 / 3] * 3)
    assert_state_close(out, WeightAveraging().merge(base, experts))


def test_tensor_granularity() -> None:
    base, experts = make_models(seed=4)
    method = MetaGPT(granularity="tensor")
    out = method.merge(base, experts)
    for k in SHAPES:
        sq = np.array([float(((e[k] - base[k]).double() ** 2).sum()) for e in experts])
        lam = sq / sq.sum()
        assert method.lambdas(k) == pytest.approx(lam.tolist(), rel=1e-6)
        expected = base[k] + sum(float(lam[i]) * (e[k] - base[k]) for i, e in enumerate(experts))
        torch.testing.assert_close(out[k], expected, atol=1e-6, rtol=1e-5)


def test_data_aware_curvature_variant() -> None:
    base, experts = make_models(seed=5)
    curvature = [1.0, 2.0, 0.5]
    method = MetaGPT(curvature=curvature)
    method.merge(base, experts)
    assert list(method.report().values()) == pytest.approx(numpy_lambdas(base, experts, curvature).tolist())
    with pytest.raises(ValueError, match="'curvature' has 2 values for 3 task vectors"):
        MetaGPT(curvature=[1.0, 2.0]).merge(base, experts)
    with pytest.raises(ValueError, match=r"'curvature\[1\]' must be in \(0.0, inf\)"):
        MetaGPT(curvature=[1.0, 0.0, 1.0])


@pytest.mark.parametrize("lambda_from", ["original", "sparsified"])
def test_with_ties(lambda_from: str) -> None:
    base, experts = make_models(seed=6)
    vecs = tv.task_vectors(base, experts)
    method = MetaGPT(sparsify=TIES(k=30), lambda_from=lambda_from)
    out = method.combine(vecs)
    # Independently: TIES trim + sign election keeps, per task, the entries agreeing with the elected sign.
    ties = TIES(k=30, scaling=1.0)
    ties.begin(list(vecs[0]))
    blocks = {n: Block(n, 0, None, None, tuple(vecs[0][n].shape)) for n in vecs[0]}
    for p in range(ties.stat_passes):
        for n in vecs[0]:
            ties.add_statistics(p, blocks[n], ties.chunk_statistics(p, blocks[n], [v[n] for v in vecs]))
        ties.end_pass(p)
    kept = [{n: ties.sparsify_chunk(blocks[n], [v[n] for v in vecs])[i] for n in vecs[0]} for i in range(len(vecs))]
    norms_of = vecs if lambda_from == "original" else kept
    sq = np.array([sq_norm(v) for v in norms_of])
    lam = sq / sq.sum()
    for n in vecs[0]:
        expected = sum(float(lam[i]) * kept[i][n] for i in range(len(vecs)))
        torch.testing.assert_close(out[n], expected, atol=1e-6, rtol=1e-5)
    # The TIES-kept entries: trimmed to 30% and sign-consistent, so the merge differs from plain MetaGPT.
    assert sum(int((k[n] != 0).sum()) for k in kept for n in k) < 0.3 * sum(v.numel() for v in vecs[0].values()) * 3
    plain = MetaGPT().combine(vecs)
    assert not all(torch.allclose(plain[n], out[n]) for n in out)


def test_with_dare_uses_the_dare_masks() -> None:
    base, experts = make_models(seed=7)
    vecs = tv.task_vectors(base, experts)
    out = MetaGPT(sparsify=DARE(p=0.4, seed=2), lambda_from="sparsified").combine(vecs)
    dropped = DARE(p=0.4, seed=2).drop(vecs)
    sq = np.array([sq_norm(v) for v in dropped])
    lam = sq / sq.sum()
    for n in vecs[0]:
        expected = sum(float(lam[i]) * dropped[i][n] for i in range(len(vecs)))
        torch.testing.assert_close(out[n], expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"granularity": "layer"}, "'granularity'"),
        ({"sparsify": "magic"}, "'sparsify'"),
        ({"lambda_from": "both"}, "'lambda_from'"),
        ({"sparsify": {"_target_": "mergelab.methods.TIES", "k": 0}}, "'sparsify.k'"),
        ({"sparsify": {"_target_": "mergelab.methods.DARE", "p": 1.0}}, "'sparsify.p'"),
        ({"sparsify": "task_arithmetic"}, "'sparsify' must be a Sparsifier"),
    ],
)
def test_bad_options(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MetaGPT(**kwargs)


def test_norms_are_accumulated_in_float64() -> None:
    # Millions of float32 squares summed in float32 drift by ~1e-6 relative; the lambdas must not.
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(1024, 2048, generator=g), "v": torch.randn(4096, generator=g)}
    experts = [{k: v + 0.01 * (i + 1) * torch.randn(v.shape, generator=g) for k, v in base.items()} for i in range(3)]
    method = MetaGPT()
    method.task_names = ["a", "b", "c"]
    method.merge(base, experts)
    # the oracle: task vectors formed in float32 (as every method forms them), squared and summed in float64
    sq = np.array([sum(np.sum((e[k] - base[k]).double().numpy() ** 2) for k in base) for e in experts])
    lam = sq / sq.sum()
    assert [method.report()[f"lambda/{t}"] for t in "abc"] == pytest.approx(lam.tolist(), rel=1e-12, abs=0)
