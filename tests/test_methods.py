"""Each merge method against its definition, computed independently here (numpy, flattened vectors)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergelab import task_vectors as tv
from mergelab.engine.passes import merge_in_memory
from mergelab.methods import DARE, TIES, TaskArithmetic, WeightAveraging
from mergelab.weight_checks import check_compatible, check_finite

SHAPES = {"layer.weight": (4, 6), "layer.bias": (6,), "other.weight": (3, 5)}


def make_models(n_experts: int = 3, seed: int = 0) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    experts = [{k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n_experts)]
    return base, experts


def flat(state: dict) -> np.ndarray:
    return np.concatenate([state[k].numpy().ravel() for k in SHAPES])


def unflat(vec: np.ndarray) -> dict:
    out, i = {}, 0
    for k, s in SHAPES.items():
        n = int(np.prod(s))
        out[k] = torch.from_numpy(vec[i : i + n].reshape(s).astype(np.float32))
        i += n
    return out


def assert_state_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5)


def ties_reference(
    base: dict, experts: list[dict], k: float, reduce: str, lam: float, names: list[str] | None = None
) -> np.ndarray:
    """TIES on the whole flattened model (or on the tensors ``names``), written from the paper's three steps."""

    def flat_of(state: dict) -> np.ndarray:
        return flat(state) if names is None else np.concatenate([state[n].numpy().ravel() for n in names])

    b = flat_of(base).astype(np.float64)
    taus = np.stack([flat_of(e).astype(np.float64) - b for e in experts])
    keep = int(np.ceil(taus.shape[1] * k / 100))
    trimmed = np.zeros_like(taus)
    for i, t in enumerate(taus):
        idx = np.argsort(-np.abs(t))[:keep]
        trimmed[i, idx] = t[idx]
    sign = np.sign(trimmed.sum(0))
    majority = 1.0 if np.sign(sign.sum()) >= 0 else -1.0
    sign[sign == 0] = majority
    agree = (np.sign(trimmed) == sign) & (trimmed != 0)
    total = (trimmed * agree).sum(0)
    merged = total if reduce == "sum" else total / np.maximum(agree.sum(0), 1)
    return b + lam * merged


def test_weight_averaging_is_mean_of_experts() -> None:
    base, experts = make_models()
    out = WeightAveraging().merge(base, experts)
    expected = {k: sum(e[k] for e in experts) / len(experts) for k in base}
    assert_state_close(out, expected)


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_task_arithmetic_definition(lam: float) -> None:
    base, experts = make_models()
    out = TaskArithmetic(scaling=lam).merge(base, experts)
    expected = unflat(flat(base) + lam * sum(flat(e) - flat(base) for e in experts))
    assert_state_close(out, expected)


@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("k", [10, 20, 50, 100])
def test_ties_global_matches_reference(reduce: str, k: float) -> None:
    base, experts = make_models(n_experts=4, seed=1)
    out = TIES(k=k, prune="global", disjoint=reduce, scaling=0.7).merge(base, experts)
    assert_state_close(out, unflat(ties_reference(base, experts, k, reduce, 0.7)))


@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("chunk_elems", [7, 1 << 20])
def test_ties_per_tensor_matches_reference(reduce: str, chunk_elems: int) -> None:
    # the paper's steps on each tensor alone (threshold and majority sign of that tensor), whatever the blocks
    base, experts = make_models(n_experts=4, seed=2)
    method = TIES(k=30, prune="per_tensor", disjoint=reduce, scaling=0.7)
    out = merge_in_memory(method, base, experts, chunk_elems=chunk_elems)
    for name in base:
        alone = ties_reference({"x": base[name]}, [{"x": e[name]} for e in experts], 30, reduce, 0.7, ["x"])
        torch.testing.assert_close(out[name], torch.from_numpy(alone.astype(np.float32)).view(base[name].shape))


def test_ties_hand_worked_example() -> None:
    # One tensor, three tasks, keep 60% (3 of 5) of each task vector.
    base = {"w": torch.zeros(5)}
    t1 = torch.tensor([0.5, -0.1, 0.9, -0.8, 0.05])  # keeps 0.5, 0.9, -0.8
    t2 = torch.tensor([-0.6, 0.2, 0.3, -0.1, 0.7])  # keeps -0.6, 0.3, 0.7
    t3 = torch.tensor([0.4, 0.3, -0.2, 0.25, -0.9])  # keeps 0.4, 0.3, -0.9
    experts = [{"w": t} for t in (t1, t2, t3)]
    # trimmed sums: [0.3, 0.3, 1.2, -0.8, -0.2] -> signs [+, +, +, -, -]
    # agreeing entries: [0.5, 0.4], [0.3], [0.9, 0.3], [-0.8], [-0.9]
    mean = TIES(k=60, disjoint="mean", scaling=1.0).merge(base, experts)["w"]
    torch.testing.assert_close(mean, torch.tensor([0.45, 0.3, 0.6, -0.8, -0.9]))
    total = TIES(k=60, disjoint="sum", scaling=0.5).merge(base, experts)["w"]
    torch.testing.assert_close(total, 0.5 * torch.tensor([0.9, 0.3, 1.2, -0.8, -0.9]))


def test_ties_exact_tie_takes_majority_sign() -> None:
    # coordinate 0: +1 and -1 cancel exactly; the other coordinates are mostly negative -> majority sign -1.
    base = {"w": torch.zeros(4)}
    experts = [{"w": torch.tensor([1.0, -2.0, -2.0, 1.0])}, {"w": torch.tensor([-1.0, -2.0, -2.0, 0.0])}]
    out = TIES(k=100, disjoint="mean", scaling=1.0).merge(base, experts)["w"]
    torch.testing.assert_close(out, torch.tensor([-1.0, -2.0, -2.0, 1.0]))


def test_ties_per_tensor_ranks_within_each_tensor() -> None:
    base = {"a": torch.zeros(4), "b": torch.zeros(4)}
    # global top-50% of one task would keep only tensor a's entries; per tensor keeps 2 of each.
    experts = [{"a": torch.tensor([10.0, 9.0, 8.0, 7.0]), "b": torch.tensor([0.1, 0.4, 0.2, 0.3])}]
    glob = TIES(k=50, prune="global", scaling=1.0).merge(base, experts)
    per = TIES(k=50, prune="per_tensor", scaling=1.0).merge(base, experts)
    torch.testing.assert_close(glob["b"], torch.zeros(4))
    torch.testing.assert_close(per["a"], torch.tensor([10.0, 9.0, 0.0, 0.0]))
    torch.testing.assert_close(per["b"], torch.tensor([0.0, 0.4, 0.0, 0.3]))


def test_dare_with_injected_mask() -> None:
    base, experts = make_models()
    g = torch.Generator().manual_seed(5)
    masks = [{k: torch.rand(s, generator=g) > 0.4 for k, s in SHAPES.items()} for _ in experts]
    p, lam = 0.4, 0.6
    method = DARE(p=p, merge=TaskArithmetic(scaling=lam))
    out = tv.apply_task_vector(base, method.combine(tv.task_vectors(base, experts), masks=masks))
    expected = {
        k: base[k] + lam * sum(m[k].float() * (e[k] - base[k]) / (1 - p) for e, m in zip(experts, masks, strict=True))
        for k in base
    }
    assert_state_close(out, expected)


def test_dare_then_ties_equals_ties_on_dropped_vectors() -> None:
    base, experts = make_models()
    dare = DARE(p=0.3, seed=3, merge=TIES(k=30, disjoint="mean", scaling=0.9))
    vecs = tv.task_vectors(base, experts)
    dropped = dare.drop(vecs)
    expected = TIES(k=30, disjoint="mean", scaling=0.9).combine(dropped)
    assert_state_close(dare.combine(vecs), expected)


def test_dare_statistics_and_seeding() -> None:
    tau = [{"w": torch.ones(200_000)}]
    p = 0.3
    dropped = DARE(p=p, seed=7).drop(tau)[0]["w"]
    kept = dropped != 0
    assert abs(1 - kept.float().mean().item() - p) < 0.01  # drop fraction ~ p
    torch.testing.assert_close(dropped[kept], torch.full((int(kept.sum()),), 1 / (1 - p)))
    assert abs(dropped.mean().item() - 1.0) < 0.01  # rescaling keeps the expectation
    again = DARE(p=p, seed=7).drop(tau)[0]["w"]
    other = DARE(p=p, seed=8).drop(tau)[0]["w"]
    assert torch.equal(dropped, again)
    assert not torch.equal(dropped, other)


def test_dare_p_zero_is_task_arithmetic() -> None:
    base, experts = make_models()
    assert_state_close(
        DARE(p=0.0, merge=TaskArithmetic(scaling=0.4)).merge(base, experts),
        TaskArithmetic(scaling=0.4).merge(base, experts),
    )


@pytest.mark.parametrize(
    ("ctor", "match"),
    [
        (lambda: TIES(k=0), "'k' must be in \\(0.0, 100.0\\]"),
        (lambda: TIES(k=100.5), "'k'"),
        (lambda: TIES(prune="layer"), "'prune'"),
        (lambda: TIES(disjoint="max"), "'disjoint'"),
        (lambda: DARE(p=1.0), "'p' must be in \\[0.0, 1.0\\)"),
        (lambda: DARE(p=-0.1), "'p'"),
        (lambda: DARE(merge="magic"), "'merge'"),
        (lambda: TaskArithmetic(scaling=-1), "'scaling'"),
    ],
)
def test_out_of_range_options_are_rejected(ctor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ctor()


def test_bf16_inputs_keep_dtype_and_merge_in_float32() -> None:
    base, experts = make_models()
    b16 = {k: v.bfloat16() for k, v in base.items()}
    e16 = [{k: v.bfloat16() for k, v in e.items()} for e in experts]
    out = TaskArithmetic(scaling=0.5).merge(b16, e16)
    assert all(v.dtype == torch.bfloat16 for v in out.values())
    expected = {k: (b16[k].float() + 0.5 * sum(e[k].float() - b16[k].float() for e in e16)).bfloat16() for k in base}
    assert_state_close(out, expected, atol=0)


def test_checks_name_the_parameter() -> None:
    base, experts = make_models()
    bad = dict(experts[0])
    bad["layer.bias"] = torch.tensor([float("nan")] * 6)
    with pytest.raises(ValueError, match=r"expert 'x': parameter 'layer\.bias' contains 6 NaN/inf"):
        check_finite(bad, "expert 'x'")
    bad["layer.bias"] = torch.zeros(7)
    with pytest.raises(ValueError, match=r"parameter 'layer.bias' has shape \(7,\), pretrained has \(6,\)"):
        check_compatible(base, bad, "expert 'x'")
