"""Per-expert weights: task arithmetic theta_0 + lambda sum_t w_t tau_t (negative w_t: task negation), the
weighted average sum_t w_t theta_t / sum_t w_t and TIES's weighted election and disjoint merge, checked against
float64 computations made here, by expert name and in expert order, in memory and streamed."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mergelab.engine.streaming import stream_merge
from mergelab.io.reader import LazyCheckpoint
from mergelab.io.writer import write_checkpoint
from mergelab.methods import DARE, TIES, MagnitudePrunedTA, TaskArithmetic, WeightAveraging
from tests.conftest import ListPool

NAMES = ["math", "code", "toxic"]


def pool() -> ListPool:
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(7, 5, generator=g), "b": torch.randn(7, generator=g)}
    experts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in NAMES]
    p = ListPool(base, experts)
    p.tasks = list(NAMES)
    return p


def by_hand(p: ListPool, coefficients: list[float]) -> dict[str, torch.Tensor]:
    """theta_0 + sum_t c_t (theta_t - theta_0), in float64."""
    out = {}
    for k, base in p.base.items():
        b = base.double()
        out[k] = (b + sum(c * (e[k].double() - b) for c, e in zip(coefficients, p.experts, strict=True))).float()
    return out


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("weights", "coefficients"),
    [
        ({"toxic": -1.0}, [0.5, 0.5, -0.5]),  # forget "toxic", keep the others (those left out weigh 1)
        ([2.0, 0.0, -0.5], [1.0, 0.0, -0.25]),
        (None, [0.5, 0.5, 0.5]),
    ],
)
def test_task_arithmetic_weights(weights: object, coefficients: list[float]) -> None:
    p = pool()
    assert_close(TaskArithmetic(scaling=0.5, weights=weights).run(p), by_hand(p, coefficients))


def test_task_negation_alone_moves_away_from_the_expert() -> None:
    p = pool()
    merged = TaskArithmetic(scaling=1.0, weights={"math": 0.0, "code": 0.0, "toxic": -1.0}).run(p)
    for k, base in p.base.items():  # theta_0 - tau_toxic: the mirror image of the toxic expert around theta_0
        torch.testing.assert_close(merged[k], 2 * base - p.experts[2][k], rtol=0, atol=1e-6)


@pytest.mark.parametrize(("weights", "coefficients"), [({"math": 3.0}, [0.6, 0.2, 0.2]), ([1, 0, 1], [0.5, 0, 0.5])])
def test_weighted_average(weights: object, coefficients: list[float]) -> None:
    p = pool()
    assert_close(WeightAveraging(weights=weights).run(p), by_hand(p, coefficients))


def trimmed_by_hand(p: ListPool, k: float, prune: str) -> list[dict[str, torch.Tensor]]:
    """Each float32 task vector with the magnitudes below its ceil(k% n)-th largest zeroed (ties at it kept), ranked
    over the whole model (``global``) or each tensor, in float64."""
    vectors = [{key: (e[key] - b).double() for key, b in p.base.items()} for e in p.experts]
    groups = [list(p.base)] if prune == "global" else [[key] for key in p.base]
    out: list[dict[str, torch.Tensor]] = [{} for _ in vectors]
    for keys in groups:
        for t, vec in enumerate(vectors):
            flat = torch.cat([vec[key].flatten() for key in keys]).abs()
            kth = flat.sort(descending=True).values[math.ceil(flat.numel() * k / 100) - 1]
            for key in keys:
                out[t][key] = torch.where(vec[key].abs() >= kth, vec[key], torch.zeros_like(vec[key]))
    return out


def ties_by_hand(p: ListPool, k: float, prune: str, disjoint: str, scaling: float, w: list[float]) -> dict:
    """theta_0 + scaling * disjoint merge of d_t = w_t trim_k(tau_t): the sign of sum_t d_t elected per coordinate
    (an exact 0 takes the sign of the summed signs, over the model or the tensor as ``prune``), the agreeing d_t
    summed, for a mean divided by the agreeing w_t summed (1 where none agrees). Written out, in float64."""
    weighted = [
        {key: w_t * v for key, v in vec.items()} for w_t, vec in zip(w, trimmed_by_hand(p, k, prune), strict=True)
    ]
    groups = [list(p.base)] if prune == "global" else [[key] for key in p.base]
    out = {}
    for keys in groups:
        signs = {key: sum(d[key] for d in weighted).sign() for key in keys}
        majority = -1.0 if sum(float(s.sum()) for s in signs.values()) < 0 else 1.0
        for key in keys:
            sign = torch.where(signs[key] == 0, majority, signs[key])
            agree = [(d[key] * sign) > 0 for d in weighted]
            total = sum(d[key] * a for d, a in zip(weighted, agree, strict=True))
            if disjoint == "mean":
                divisor = sum(w_t * a.double() for w_t, a in zip(w, agree, strict=True))
                total = total / torch.where(divisor == 0, 1.0, divisor)
            out[key] = (p.base[key].double() + scaling * total).float()
    return out


@pytest.mark.parametrize(
    ("weights", "w", "k", "prune", "disjoint"),
    [
        ({"toxic": -1.0}, [1.0, 1.0, -1.0], 40.0, "global", "sum"),  # forget "toxic" among the TIES merge
        ([2.0, 0.0, -0.5], [2.0, 0.0, -0.5], 60.0, "per_tensor", "sum"),
        ([0.5, 0.25, 2.0], [0.5, 0.25, 2.0], 30.0, "global", "mean"),  # fractional divisors: none clamped to 1
        ({"code": 3.0}, [1.0, 3.0, 1.0], 100.0, "per_tensor", "mean"),
        (None, [1.0, 1.0, 1.0], 20.0, "global", "mean"),
    ],
)
def test_ties_weights(weights: object, w: list[float], k: float, prune: str, disjoint: str) -> None:
    p = pool()
    merged = TIES(k=k, prune=prune, disjoint=disjoint, scaling=0.7, weights=weights).run(p)
    assert_close(merged, ties_by_hand(p, k, prune, disjoint, 0.7, w))


def test_ties_weights_in_the_election_change_its_outcome() -> None:
    """A weight is not a rescaling of the result: a heavy expert wins coordinates it would lose by count."""
    p = pool()
    plain = TIES(k=100.0, scaling=1.0).run(p)
    heavy = TIES(k=100.0, scaling=1.0, weights={"toxic": 5.0}).run(p)
    tau = {key: p.experts[2][key] - b for key, b in p.base.items()}
    won = sum(int(((heavy[key] - b).sign() == tau[key].sign()).sum()) for key, b in p.base.items())
    before = sum(int(((plain[key] - b).sign() == tau[key].sign()).sum()) for key, b in p.base.items())
    assert won > before


def test_magnitude_pruned_ta_weights() -> None:
    p = pool()
    merged = MagnitudePrunedTA(k=50.0, scaling=0.5, weights=[1.0, -1.0, 0.5]).run(p)
    trimmed = trimmed_by_hand(p, 50.0, "global")
    coefficients = [0.5, -0.5, 0.25]
    want = {
        key: (b.double() + sum(c * t[key] for c, t in zip(coefficients, trimmed, strict=True))).float()
        for key, b in p.base.items()
    }
    assert_close(merged, want)


def test_ties_refuses_a_negative_weight_in_a_mean() -> None:
    with pytest.raises(ValueError, match=r"'weights' \(weights=\{'toxic': -1.0\}, disjoint='mean'\): a negative"):
        TIES(disjoint="mean", weights={"toxic": -1.0})


def test_run_refuses_a_negative_ties_weight_in_a_mean_before_any_work(tmp_path: Path) -> None:
    """The condition is declared on the class and checked when the config builds it, naming the options."""
    from mergelab.run import run
    from tests.conftest import make_cfg, small_checkpoint_pool

    out = tmp_path / "out"
    overrides = [*small_checkpoint_pool(tmp_path / "pool"), "method=ties", "method.disjoint=mean"]
    with pytest.raises(ValueError, match=r"'weights' \(weights=\{'e1': -1.0\}, disjoint='mean'\)"):
        run(make_cfg(out, [*overrides, "method.weights={e1: -1.0}"], tiny=False))
    assert not out.exists()


def test_dare_linear_with_weights_is_dare_then_weighted_sum() -> None:
    """MergeKit's dare_linear: each task vector dropped-and-rescaled, then weighted (p=0 keeps every entry)."""
    p = pool()
    merged = DARE(p=0.0, merge=TaskArithmetic(scaling=1.0, weights={"code": -2.0})).run(p)
    assert_close(merged, by_hand(p, [1.0, -2.0, 1.0]))


def test_streamed_by_name_equals_in_memory(tmp_path: Path) -> None:
    p = pool()
    base_dir = write_checkpoint(p.base, tmp_path / "base")
    dirs = [write_checkpoint(e, tmp_path / n) for e, n in zip(p.experts, NAMES, strict=True)]
    method = TaskArithmetic(scaling=0.7, weights={"code": -1.0, "math": 0.25})
    out = stream_merge(method, base_dir, dirs, tmp_path / "out", task_names=NAMES, progress=False)
    ck = LazyCheckpoint(out)
    try:
        streamed = {k: ck.get(k) for k in ck}
    finally:
        ck.close()
    in_memory = TaskArithmetic(scaling=0.7, weights={"code": -1.0, "math": 0.25}).run(p)
    for k in in_memory:
        assert torch.equal(streamed[k], in_memory[k]), k


@pytest.mark.parametrize(
    ("cls", "weights", "match"),
    [
        (WeightAveraging, {"math": -1.0}, r"'weights' must be finite numbers >= 0"),
        (WeightAveraging, [0, 0, 0], r"'weights' must be .*not all 0"),
        (TaskArithmetic, [1.0, float("nan"), 1.0], r"'weights' must be finite numbers"),
        (TaskArithmetic, "math", r"'weights' must be null, a list or a mapping"),
    ],
)
def test_bad_weights_refused_when_built(cls: type, weights: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cls(weights=weights)


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ({"maths": 1.0}, r"'weights' names unknown expert\(s\) \['maths'\]; experts: \['math', 'code', 'toxic'\]"),
        ([1.0, 2.0], r"'weights' has 2 values for 3 experts"),
    ],
)
def test_weights_that_do_not_fit_the_pool(weights: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TaskArithmetic(weights=weights).run(pool())


def test_run_refuses_weights_naming_an_unknown_expert_before_any_work(tmp_path: Path) -> None:
    """Checked against the pool when the run starts: the name is refused before anything is merged or written."""
    from mergelab.run import run
    from tests.conftest import make_cfg, small_checkpoint_pool

    out = tmp_path / "out"
    overrides = [*small_checkpoint_pool(tmp_path / "pool"), "method.weights={e1: 1.0, e3: -1.0}"]
    with pytest.raises(ValueError, match=r"method 'task_arithmetic': .*unknown expert\(s\) \['e3'\]; experts: \['e1'"):
        run(make_cfg(out, overrides, tiny=False))
    assert not out.exists()


def ties_under_dare(weights: list[float]) -> TIES:
    """TIES as MergeKit's dare_ties computes it (no trimming, per tensor), with per-expert weights."""
    return TIES(k=100.0, prune="per_tensor", scaling=0.3, weights=weights)


def mergekit_round_trip(method: object, tmp_path: Path) -> tuple[str, str, list[str]]:
    """``method``'s MergeKit config, read back as mergelab overrides, built and exported again: both YAML texts
    and the overrides the import gave."""
    from omegaconf import OmegaConf

    from mergelab.provenance.mergekit import export_merge, read_mergekit
    from mergelab.run import method_candidates
    from tests.conftest import make_cfg

    p = pool()
    base = str(write_checkpoint(p.base, tmp_path / "base"))
    experts = [str(write_checkpoint(e, tmp_path / n)) for e, n in zip(p.experts, NAMES, strict=True)]
    method.task_names = list(NAMES)  # type: ignore[attr-defined]
    first = export_merge(method, base, experts, streamed=True, pool="checkpoint pool", base_dtypes=["float32"])
    assert first.config is not None, first.reason
    path = tmp_path / "merge.yml"
    path.write_text(first.yaml())
    imported = read_mergekit(path)
    assert list(imported.experts) == NAMES
    cfg = make_cfg(tmp_path / "unused", imported.method, tiny=False)
    ((_, again),) = method_candidates(OmegaConf.create(OmegaConf.to_container(cfg.method, resolve=True)), False)
    again.task_names = list(NAMES)
    second = export_merge(again, base, experts, streamed=True, pool="checkpoint pool", base_dtypes=["float32"])
    assert second.config is not None, second.reason
    return first.yaml(), second.yaml(), imported.method


@pytest.mark.parametrize(
    ("method", "per_model", "override"),
    [
        (TaskArithmetic(scaling=0.5, weights={"code": -1.0}), [0.5, -0.5, 0.5], "method.weights="),
        (WeightAveraging(weights=[1.0, 2.0, 1.0]), [1.0, 2.0, 1.0], "method.weights="),
        (DARE(p=0.5, merge=TaskArithmetic(scaling=0.3, weights=[1.0, 2.0, -1.0])), [0.6, 1.2, -0.6], "merge.weights="),
        (TIES(prune="per_tensor", scaling=0.5, weights={"code": -1.0}), [1.0, -1.0, 1.0], "method.weights="),
        (TIES(prune="per_tensor", disjoint="mean", weights=[0.5, 2.0, 1.0]), [0.5, 2.0, 1.0], "method.weights="),
        (DARE(p=0.5, merge=ties_under_dare([1.0, 2.0, -1.0])), [1.0, 2.0, -1.0], "merge.weights="),
        (DARE(p=[0.5, 0.75, 0.0], merge=ties_under_dare([1.0, 2.0, -1.0])), [2.0, 8.0, -1.0], "merge.weights="),
    ],
    ids=["task_arithmetic", "linear", "dare_linear", "ties", "ties-mean", "dare_ties", "dare_ties-per-expert-p"],
)
def test_per_model_weights_round_trip_through_mergekit(
    method: object, per_model: list[float], override: str, tmp_path: Path
) -> None:
    import yaml

    first, second, overrides = mergekit_round_trip(method, tmp_path)
    assert first == second  # identical bytes
    weights = [m["parameters"]["weight"] for m in yaml.safe_load(first)["models"] if m["parameters"].get("weight")]
    assert weights == pytest.approx(per_model)
    assert any(override in o for o in overrides), overrides


@pytest.mark.parametrize(
    ("cls", "options", "mergekit_name"),
    [
        ("Breadcrumbs", {}, "breadcrumbs"),
        ("Breadcrumbs", {"consensus": True}, "breadcrumbs_ties"),
        ("DELLA", {}, "della"),
        ("DELLA", {"consensus": False, "normalize": False}, "della_linear"),
        ("ModelStock", {}, "model_stock"),
        ("SCE", {}, "sce"),
    ],
)
def test_methods_mergekit_has_are_exported_as_mergekit_names_them(
    cls: str, options: dict[str, object], mergekit_name: str
) -> None:
    """Merges MergeKit computes get its config (never "no MergeKit merge method computes it")."""
    import mergelab.methods as methods
    from mergelab.provenance.mergekit import export_merge

    method = getattr(methods, cls)(**options)
    found = export_merge(method, "base", ["a", "b"], streamed=True, pool="checkpoint pool", base_dtypes=["float32"])
    assert found.config is not None, found.reason
    assert found.config["merge_method"] == mergekit_name


def test_dare_into_globally_pruned_ties_is_not_exported_as_dare_ties() -> None:
    """dare_ties elects exact sign ties per tensor; DARE into TIES with prune=global does it over the model."""
    from mergelab.methods import TIES
    from mergelab.provenance.mergekit import export_merge

    method = DARE(p=0.5, merge=TIES(k=100.0, prune="global"))
    found = export_merge(method, "base", ["a", "b"], streamed=True, pool="checkpoint pool", base_dtypes=["float32"])
    assert found.config is None and "prune=global" in (found.reason or "")
