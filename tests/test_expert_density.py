"""Per-expert densities (MergeKit's per-model ``density``): TIES's k, DARE's p, Breadcrumbs' density and gamma and
DELLA's density and epsilon given one per expert, checked against float64 computations made here on small inputs,
and read from / written to MergeKit configs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from mergelab.engine.chunks import Block
from mergelab.methods import DARE, DELLA, TIES, Breadcrumbs, MetaGPT, TaskArithmetic
from mergelab.methods.della import uniforms
from tests.conftest import ListPool
from tests.test_expert_weights import NAMES, pool

Tensors = dict[str, torch.Tensor]


def task_vectors(p: ListPool) -> list[Tensors]:
    """tau_t as the merge forms them (float32), for the hand computations to rank."""
    return [{k: e[k] - b for k, b in p.base.items()} for e in p.experts]


def assert_close(a: Tensors, b: Tensors) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def theta(p: ListPool, merged: Tensors) -> Tensors:
    return {k: (b.double() + merged[k]).float() for k, b in p.base.items()}


def top_k_mask(tau: Tensors, k: float, keys: list[list[str]]) -> Tensors:
    """Keep the ceil(k% x n) largest magnitudes of each group of tensors (the whole model, or each tensor)."""
    out = {}
    for group in keys:
        flat = torch.cat([tau[n].abs().flatten() for n in group])
        threshold = flat.sort(descending=True).values[math.ceil(flat.numel() * k / 100) - 1]
        out.update({n: tau[n].abs() >= threshold for n in group})
    return out


@pytest.mark.parametrize("prune", ["global", "per_tensor"])
def test_ties_keeps_each_experts_own_top_k(prune: str) -> None:
    p = pool()
    ks = {"math": 10.0, "code": 60.0, "toxic": 35.0}
    taus = task_vectors(p)
    groups = [list(p.base)] if prune == "global" else [[n] for n in p.base]
    trimmed = [
        {n: t[n].double() * top_k_mask(t, ks[name], groups)[n] for n in t} for t, name in zip(taus, NAMES, strict=True)
    ]
    total_sign = {n: sum(t[n] for t in trimmed).sign() for n in p.base}
    majority = {}
    for group in groups:  # exact zero sums take the sign of the sum of the signs (+ when that is 0)
        s = sum(float(total_sign[n].sum()) for n in group)
        majority.update({n: -1.0 if s < 0 else 1.0 for n in group})
    merged = {}
    for n in p.base:
        sign = torch.where(total_sign[n] == 0, majority[n], total_sign[n])
        merged[n] = 0.4 * sum(t[n] * ((t[n] * sign) > 0) for t in trimmed)
    got = TIES(k=ks, prune=prune, disjoint="sum", scaling=0.4).run(p)
    assert_close(got, theta(p, merged))
    # and the list form, in expert order, is the same merge
    assert_close(TIES(k=list(ks.values()), prune=prune, scaling=0.4).run(p), got)


def test_ties_one_k_for_all_equals_the_number() -> None:
    p = pool()
    a, b = TIES(k=30.0).run(p), TIES(k={n: 30.0 for n in NAMES}).run(p)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dare_drops_each_expert_at_its_own_rate() -> None:
    p = pool()
    rates = [0.2, 0.5, 0.75]
    taus = task_vectors(p)
    g = torch.Generator().manual_seed(3)
    masks = [{k: torch.rand(v.shape, generator=g) > 0.4 for k, v in t.items()} for t in taus]
    dare = DARE(p={"math": 0.2, "code": 0.5, "toxic": 0.75}, merge=TaskArithmetic(scaling=0.5))
    dare.task_names = list(NAMES)
    got = dare.combine(taus, masks=masks)
    want = {
        k: sum(0.5 * t[k].double() * m[k] / (1 - r) for t, m, r in zip(taus, masks, rates, strict=True))
        for k in taus[0]
    }
    assert_close(got, {k: v.float() for k, v in want.items()})


def test_dare_draws_each_experts_mask_at_its_rate() -> None:
    """A drawn mask keeps about 1 - p_t of the entries, and an expert's draw is the one a single p gives it."""
    block = Block("w", 0, None, None, (200, 150))
    dare = DARE(p=[0.1, 0.5, 0.9], seed=4)
    for task, rate in enumerate([0.1, 0.5, 0.9]):
        kept = dare.masks(block, task, rate).float().mean().item()
        assert abs(kept - (1 - rate)) < 0.01, (rate, kept)  # 30,000 draws: sd < 0.003
    vectors = [torch.ones(200, 150)] * 3
    mixed = dare.transform(block, vectors)
    assert torch.equal(mixed[1], DARE(p=0.5, seed=4).transform(block, vectors)[1])


def band_mask(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """MergeKit's breadcrumbs on one tensor (no ties in random floats): drop the int(gamma n) largest magnitudes
    (fewer when int(density n) must fit), keep the next int(density n)."""
    n = tau.numel()
    keep = int(density * n)
    top = min(int(gamma * n), n - keep)
    order = tau.abs().flatten().argsort(descending=True)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[top : top + keep]] = True
    return mask.view(tau.shape) if density < 1.0 else torch.ones_like(tau, dtype=torch.bool)


def test_breadcrumbs_keeps_each_experts_own_band() -> None:
    p = pool()
    densities, gammas, weights = [0.5, 1.0, 0.8], [0.1, 0.2, 0.0], [1.0, 2.0, -0.5]
    taus = task_vectors(p)
    merged = {
        k: 0.7
        * sum(
            w * t[k].double() * band_mask(t[k], d, g)
            for t, d, g, w in zip(taus, densities, gammas, weights, strict=True)
        )
        for k in p.base
    }
    method = Breadcrumbs(density=densities, gamma={"math": 0.1, "code": 0.2, "toxic": 0.0}, weights=weights)
    method.scaling = 0.7
    assert_close(method.run(p), theta(p, merged))


def test_della_prunes_each_expert_with_its_own_band() -> None:
    """Keep probability (d_t - e_t) + 2 e_t (rank - 1) / (n - 1) by magnitude rank in each row, drawn from the
    method's uniforms; rescale none, no consensus: a plain sum."""
    p = pool()
    bands = [(0.5, 0.2), (1.0, 0.1), (0.7, 0.25)]
    taus = task_vectors(p)
    merged = {}
    for k, b in p.base.items():
        total = torch.zeros(b.shape, dtype=torch.float64)
        for i, (t, (d, e)) in enumerate(zip(taus, bands, strict=True)):
            if d >= 1.0:
                total += t[k].double()
                continue
            rows = t[k].abs().double().reshape(1, -1) if t[k].dim() == 1 else t[k].abs().double()
            ranks = rows.argsort(dim=1, stable=True).argsort(dim=1).double()
            prob = (d - e) + 2 * e * ranks / (rows.shape[1] - 1)
            kept = uniforms(5, Block(k, 0, None, None, tuple(b.shape)), i).double() < prob.view(b.shape)
            total += t[k].double() * kept
        merged[k] = total
    method = DELLA(
        density=[d for d, _ in bands],
        epsilon={n: e for n, (_, e) in zip(NAMES, bands, strict=True)},
        consensus=False,
        normalize=False,
        rescale="none",
        seed=5,
    )
    assert_close(method.run(p), theta(p, merged))


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: TIES(k={"math": 10.0}), r"'k' gives no value for expert\(s\) \['code', 'toxic'\]"),
        (lambda: DARE(p={"maths": 0.1, "code": 0.1, "toxic": 0.1}), r"'p' names unknown expert\(s\) \['maths'\]"),
        (lambda: Breadcrumbs(density=[0.5, 0.5]), r"'density' has 2 values for 3 experts"),
        (  # a list beside a mapping pairs up by the pool's names only
            lambda: DELLA(density=[0.5, 0.9, 0.5], epsilon={"math": 0.2, "code": 0.2, "toxic": 0.2}),
            r"'epsilon' of expert 'code' \(epsilon=0.2, density=0.9\)",
        ),
        (lambda: MetaGPT(sparsify=TIES(k={"math": 5.0})), r"'k' gives no value"),
    ],
)
def test_per_expert_values_that_do_not_fit_the_pool(build: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build().check_experts(NAMES)  # type: ignore[operator]


@pytest.mark.parametrize(
    ("cls", "option", "value", "match"),
    [
        (TIES, "k", [10.0, 0.0, 5.0], r"'k\[1\]' must be in \(0.0, 100.0\], got 0.0"),
        (DARE, "p", {"math": 1.0}, r"'p.math' must be in \[0.0, 1.0\), got 1.0"),
        (Breadcrumbs, "gamma", [], r"'gamma' must be a number, a mapping \(expert: number\) or a list"),
        (DELLA, "density", {"math": "abc"}, r"'density.math' must be a number, got 'abc'"),
    ],
)
def test_each_value_is_checked_against_the_options_range(cls: type, option: str, value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cls(**{option: value})


def export(method: object) -> dict:
    from mergelab.provenance.mergekit import export_merge

    method.task_names = list(NAMES)  # type: ignore[attr-defined]
    found = export_merge(method, "base", NAMES, streamed=True, pool="checkpoint pool", base_dtypes=["float32"])
    assert found.config is not None, found.reason
    return found.config


def test_mergekit_export_writes_per_model_density_only_when_they_differ() -> None:
    config = export(TIES(k={"math": 10.0, "code": 50.0, "toxic": 25.0}, prune="per_tensor"))
    assert [m["parameters"]["density"] for m in config["models"]] == [0.1, 0.5, 0.25]
    config = export(DARE(p=[0.5, 0.75, 0.25]))
    assert [m["parameters"]["density"] for m in config["models"]] == [0.5, 0.25, 0.75]
    uniform = export(TIES(k=20.0, prune="per_tensor"))
    assert all(m["parameters"] == uniform["models"][0]["parameters"] for m in uniform["models"])


def test_dare_into_ties_with_per_expert_p_folds_each_rate_into_its_weight(tmp_path: Path) -> None:
    """dare_ties without rescale: weight scaling / density_t per model (disjoint sum), read back to the same p."""
    from tests.test_expert_weights import mergekit_round_trip

    method = DARE(p=[0.5, 0.75, 0.0], merge=TIES(k=100.0, prune="per_tensor", scaling=0.375))
    first, second, overrides = mergekit_round_trip(method, tmp_path)
    assert first == second  # identical bytes
    models = yaml.safe_load(first)["models"]
    assert [m["parameters"]["weight"] for m in models] == [0.75, 1.5, 0.375]
    assert "method.p={math: 0.5, code: 0.75, toxic: 0.0}" in overrides and "method.merge.scaling=0.375" in overrides


def test_dare_into_ties_mean_with_per_expert_p_is_not_exported() -> None:
    from mergelab.provenance.mergekit import export_merge

    method = DARE(p=[0.5, 0.25, 0.5], merge=TIES(k=100.0, prune="per_tensor", disjoint="mean"))
    method.task_names = list(NAMES)
    found = export_merge(method, "base", NAMES, streamed=True, pool="checkpoint pool", base_dtypes=["float32"])
    assert found.config is None and "per-expert p and disjoint=mean" in (found.reason or "")


def mergekit_config(tmp_path: Path, head: str, params: list[str]) -> Path:
    from mergelab.io.writer import write_checkpoint

    base = write_checkpoint(pool().base, tmp_path / "base")
    models = ""
    for name, extra in zip(NAMES, params, strict=True):
        (tmp_path / name).mkdir()
        models += f"  - model: {tmp_path / name}\n    parameters: {{{extra}}}\n"
    path = tmp_path / "in.yml"
    path.write_text(f"{head}\nbase_model: {base}\nmodels:\n{models}")
    return path


@pytest.mark.parametrize(
    ("head", "params", "want"),
    [
        (
            "merge_method: ties",
            ["weight: 1, density: 0.5"] * 2 + ["weight: 1, density: 0.25"],
            "method.k={math: 50.0, code: 50.0, toxic: 25.0}",
        ),
        (
            "merge_method: dare_ties",
            ["weight: 1, density: 0.5", "weight: 1, density: 0.75", "weight: 1, density: 1"],
            "method.p={math: 0.5, code: 0.25, toxic: 0.0}",
        ),
        (
            "merge_method: della",
            ["weight: 1, density: 0.5", "weight: 1, density: 0.6", "weight: 1, density: 0.6"],
            "method.density={math: 0.5, code: 0.6, toxic: 0.6}",
        ),
        (
            "merge_method: breadcrumbs",
            ["weight: 1, gamma: 0.1", "weight: 1, gamma: 0.2", "weight: 1"],
            "method.gamma={math: 0.1, code: 0.2, toxic: 0.01}",
        ),
    ],
)
def test_mergekit_per_model_densities_read_as_per_expert_options(
    tmp_path: Path, head: str, params: list[str], want: str
) -> None:
    from mergelab.provenance.mergekit import read_mergekit

    found = read_mergekit(mergekit_config(tmp_path, head, params)).method
    assert want in found, found


def test_unrescaled_dare_ties_with_differing_densities_reads_as_ties_weights(tmp_path: Path) -> None:
    """Without rescale, each expert's survivors keep their size: mergelab's rescaled ones times the density, a
    per-expert factor TIES takes as its weights; normalize (a mean by MergeKit's agreeing w_t) is refused."""
    from mergelab.provenance.mergekit import read_mergekit

    params = ["weight: 1, density: 0.5", "weight: 1, density: 0.25", "weight: 1"]
    head = "merge_method: dare_ties\nparameters: {rescale: false}"
    found = read_mergekit(mergekit_config(tmp_path / "sum", head, params)).method
    assert "method.merge.weights={math: 0.5, code: 0.25, toxic: 1.0}" in found, found
    head = "merge_method: dare_ties\nparameters: {rescale: false, normalize: true}"
    with pytest.raises(ValueError, match=r"parameters\.normalize: true with densities .* differ"):
        read_mergekit(mergekit_config(tmp_path / "mean", head, params))
