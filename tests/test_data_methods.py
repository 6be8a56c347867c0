"""Fisher merging, RegMean and AdaMerging against independent implementations of their papers' equations.

The pools are small networks whose gradients, layer inputs and entropies the tests compute directly (closed forms
for a softmax regression, explicit matrix products), never through the methods' own helpers. CLI-level runs on the
real embedded MiniLM pool check that each method runs through the app and reports what it used.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from mergelab.methods import AWD, AdaMerging, FisherMerging, RegMean
from mergelab.pools.base import TransformedPool
from mergelab.run import method_candidates, run
from tests.conftest import TaskDataPool, make_cfg

CPU = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "logger": False}


class Softmax(nn.Module):
    """``x -> W x + b``: a softmax regression's logits (state keys ``lin.weight``, ``lin.bias``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def softmax_pool(n: int = 40, cache_dir: Path | None = None, same_x: bool = False) -> TaskDataPool:
    """A softmax regression ``logits = W x + b`` (the backbone, merged; heads are the identity), three experts."""
    g = torch.Generator().manual_seed(0)
    base = {"lin.weight": torch.randn(3, 4, generator=g), "lin.bias": torch.randn(3, generator=g)}
    experts = [{k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    data = {}
    for i in range(3):
        x = torch.randn(n, 4, generator=g) * (1 + i)
        if same_x:
            x = x[:1].expand(n, 4).clone()
        data[f"task{i}"] = (x, torch.randint(0, 3, (n,), generator=g), None)
    return TaskDataPool(base, experts, Softmax(), {t: nn.Identity() for t in data}, data, cache_dir)


def fisher_by_hand(pool: TaskDataPool, t: int, labels: str) -> dict[str, torch.Tensor]:
    """Matena & Raffel's diagonal Fisher of a softmax regression: d log p_y / dW = (e_y - p) x^T, d/db = e_y - p."""
    x, y, _ = pool.data[f"task{t}"]
    w, b = pool.experts[t]["lin.weight"], pool.experts[t]["lin.bias"]
    p = torch.softmax(x @ w.T + b, dim=-1)  # [N, C]
    eye = torch.eye(3)
    if labels == "data":
        r2 = (eye[y] - p).square()[:, None, :]  # [N, 1, C]: one label per example
        weights = torch.ones(len(y), 1)
    else:  # exact expectation over the model's classes
        r2 = (eye[None, :, :] - p[:, None, :]).square()  # [N, y, C]
        weights = p
    fw = torch.einsum("ny,nyc,nd->cd", weights, r2, x.square()) / len(y)
    fb = torch.einsum("ny,nyc->c", weights, r2) / len(y)
    return {"lin.weight": fw, "lin.bias": fb}


def fisher_average(pool: TaskDataPool, fishers: list[dict], weights: list[float], floor: float) -> dict:
    """sum_t w_t F_t theta_t / sum_t w_t F_t with every F at least ``floor`` (the experts' weights, not tau)."""
    out = {}
    for k in pool.base:
        f = [w * torch.clamp(fi[k], min=floor) for fi, w in zip(fishers, weights, strict=True)]
        out[k] = sum(fi * e[k] for fi, e in zip(f, pool.experts, strict=True)) / sum(f)
    return out


def assert_close(a: dict, b: dict, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=rtol, atol=atol, msg=k)


# ------------------------------------------------------------------------------------------------ Fisher


@pytest.mark.parametrize("labels", ["expected", "data"])
def test_fisher_diagonals_and_merge_match_the_closed_form(labels: str) -> None:
    pool = softmax_pool()
    method = FisherMerging(labels=labels, num_examples=1000, floor=1e-12)
    merged = method.run(pool)
    by_hand = [fisher_by_hand(pool, t, labels) for t in range(3)]
    for t in range(3):
        assert_close({k: method.fishers[t][k] for k in pool.base}, by_hand[t])
    assert_close(merged, fisher_average(pool, by_hand, [1.0, 1.0, 1.0], 1e-12))


def test_sampled_labels_estimate_the_expected_fisher() -> None:
    # One input repeated: the sampled estimate's mean over 3000 draws approaches the exact expectation.
    pool = softmax_pool(n=3000, same_x=True)
    sampled = FisherMerging(labels="sample", num_examples=3000, seed=3)
    sampled.prepare(pool)
    exact = fisher_by_hand(pool, 1, "expected")
    for k in exact:
        rel = (sampled.fishers[1][k] - exact[k]).abs().max() / exact[k].abs().max()
        assert rel < 0.1, (k, float(rel))
    again = FisherMerging(labels="sample", num_examples=3000, seed=3)
    again.prepare(pool)
    assert torch.equal(again.fishers[1]["lin.weight"], sampled.fishers[1]["lin.weight"])  # seeded


def test_fisher_floor_weights_normalize_and_subset() -> None:
    pool = softmax_pool()
    by_hand = [fisher_by_hand(pool, t, "data") for t in range(3)]
    # Per-task weights.
    merged = FisherMerging(labels="data", num_examples=1000, floor=1e-12, task_weights=[1.0, 0.0, 3.0]).run(pool)
    assert_close(merged, fisher_average(pool, by_hand, [1.0, 0.0, 3.0], 1e-12))
    # A floor above every Fisher value: the plain average of the experts.
    merged = FisherMerging(labels="data", num_examples=1000, floor=1e3).run(pool)
    assert_close(merged, {k: sum(e[k] for e in pool.experts) / 3 for k in pool.base})
    # Normalised: each F_t divided by its L2 norm over all parameters.
    normed = []
    for f in by_hand:
        norm = torch.sqrt(sum(v.double().square().sum() for v in f.values())).float()
        normed.append({k: v / norm for k, v in f.items()})
    merged = FisherMerging(labels="data", num_examples=1000, floor=1e-12, normalize=True).run(pool)
    assert_close(merged, fisher_average(pool, normed, [1.0, 1.0, 1.0], 1e-12))
    # A subset: the pool is asked for num_examples of the train split, one example per batch.
    pool.batch_calls.clear()
    FisherMerging(labels="data", num_examples=7, seed=5).prepare(pool)
    assert pool.batch_calls == [(f"task{i}", "train", 7, 1, 5, False) for i in range(3)]


def test_fisher_options_are_checked() -> None:
    for kwargs, key in [
        ({"labels": "model"}, "labels"),
        ({"split": "dev"}, "split"),
        ({"floor": 0.0}, "floor"),
        ({"num_examples": 0}, "num_examples"),
        ({"task_weights": [1.0, -1.0]}, "task_weights"),
        ({"task_weights": "equal"}, "task_weights"),
    ]:
        with pytest.raises(ValueError, match=key):
            FisherMerging(**kwargs)
    with pytest.raises(ValueError, match="3 experts"):
        FisherMerging(task_weights=[1.0, 2.0]).prepare(softmax_pool())
    with pytest.raises(ValueError, match="unknown expert"):
        FisherMerging(task_weights={"nope": 1.0}).prepare(softmax_pool())


def test_statistics_are_cached_on_disk_per_expert_task_and_options(tmp_path: Path) -> None:
    pool = softmax_pool(cache_dir=tmp_path)
    first = FisherMerging(labels="data", num_examples=1000)
    first.prepare(pool)
    stored = sorted(p.name for p in (tmp_path / "statistics").iterdir())
    assert len(stored) == 3 and all(s.startswith("fisher-task") for s in stored)
    pool.batch_calls.clear()
    second = FisherMerging(labels="data", num_examples=1000)
    second.prepare(pool)
    assert pool.batch_calls == []  # read back, not recomputed
    for t in range(3):
        assert torch.equal(second.fishers[t]["lin.weight"], first.fishers[t]["lin.weight"])
    FisherMerging(labels="expected", num_examples=1000).prepare(pool)  # other options: computed again
    assert len(pool.batch_calls) == 3
    assert len(list((tmp_path / "statistics").iterdir())) == 6


# ------------------------------------------------------------------------------------------------ RegMean


class TwoLayer(nn.Module):
    """[N, L, 4] -> relu(lin1) -> lin2 -> mean over positions: the second layer's inputs depend on the expert."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(torch.relu(self.lin1(x))).mean(1)


def two_layer_pool() -> TaskDataPool:
    g = torch.Generator().manual_seed(1)
    net = TwoLayer()
    base = {k: torch.randn(v.shape, generator=g) for k, v in net.state_dict().items()}
    experts = [{k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    data = {}
    for i in range(2):
        mask = (torch.rand(20, 5, generator=g) > 0.3).long()
        mask[:, 0] = 1
        data[f"task{i}"] = (torch.randn(20, 5, 4, generator=g), torch.zeros(20, dtype=torch.long), mask)
    return TaskDataPool(base, experts, net, {t: nn.Identity() for t in data}, data)


def regmean_by_hand(pool: TaskDataPool, alpha: float) -> dict[str, torch.Tensor]:
    """W = (sum_t W_t G_t)(sum_t G_t)^-1 per linear layer, G_t = X_t^T X_t / rows over unpadded positions, with
    the off-diagonals scaled by alpha; biases averaged."""
    grams: dict[str, list[torch.Tensor]] = {"lin1.weight": [], "lin2.weight": []}
    for t, e in enumerate(pool.experts):
        x, _, mask = pool.data[f"task{t}"]
        x1 = x[mask.bool()].double()
        h = torch.relu(x1 @ e["lin1.weight"].double().T + e["lin1.bias"].double())
        for name, rows in (("lin1.weight", x1), ("lin2.weight", h)):
            g = rows.T @ rows / rows.shape[0]
            grams[name].append(alpha * g + (1 - alpha) * torch.diag(torch.diag(g)))
    out = {}
    for name, gs in grams.items():
        num = sum(e[name].double() @ g for e, g in zip(pool.experts, gs, strict=True))
        out[name] = (num @ torch.linalg.inv(sum(gs))).float()
    for name in ("lin1.bias", "lin2.bias"):
        out[name] = sum(e[name] for e in pool.experts) / len(pool.experts)
    return out


@pytest.mark.parametrize("alpha", [1.0, 0.6, 0.0])
def test_regmean_matches_its_closed_form(alpha: float) -> None:
    pool = two_layer_pool()
    merged = RegMean(alpha=alpha, num_examples=1000, batch_size=3).run(pool)
    assert_close(merged, regmean_by_hand(pool, alpha), rtol=1e-4, atol=1e-5)
    # Padding is left out, so the batch size does not change the Gram matrices.
    assert_close(RegMean(alpha=alpha, num_examples=1000, batch_size=20).run(pool), merged, rtol=1e-5, atol=1e-6)


def test_regmean_options_are_checked() -> None:
    for kwargs, key in [({"alpha": 1.5}, "alpha"), ({"alpha": float("nan")}, "alpha"), ({"batch_size": 0}, "batch")]:
        with pytest.raises(ValueError, match=key):
            RegMean(**kwargs)


# ------------------------------------------------------------------------------------------------ AdaMerging


def adamerging_by_hand(
    pool: TaskDataPool, steps: int, layer_wise: bool, lr: float, batch_size: int, clamp: tuple | None
) -> torch.Tensor:
    """Yang et al.'s loop on the softmax regression: lambda (init 0.3) minimises the summed mean entropy of
    softmax(x W^T + b), W = W_0 + sum_t clamp(lambda_t) tau_t, with Adam; step k takes batch k of every task."""
    names = list(pool.base)
    taus = {k: torch.stack([e[k] - pool.base[k] for e in pool.experts]) for k in names}
    lam = torch.full((3, len(names) if layer_wise else 1), 0.3, requires_grad=True)
    opt = torch.optim.Adam([lam], lr=lr, betas=(0.9, 0.999))
    batches = [pool.task_batches(f"task{t}", "test", None, batch_size, 0, shuffle=True) for t in range(3)]
    for k in range(steps):
        c = lam.clamp(*clamp) if clamp else lam
        w = {
            n: pool.base[n] + torch.einsum("t,t...->...", c[:, i if layer_wise else 0], taus[n])
            for i, n in enumerate(names)
        }
        loss = 0
        for t in range(3):
            x = batches[t][k % len(batches[t])]["x"]
            logp = torch.log_softmax(x @ w["lin.weight"].T + w["lin.bias"], dim=-1)
            loss = loss + -(logp.exp() * logp).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (lam.clamp(*clamp) if clamp else lam).detach()


@pytest.mark.parametrize(("granularity", "clamp"), [("layer", (0.0, 1.0)), ("task", None)])
def test_adamerging_learns_the_papers_coefficients(granularity: str, clamp: tuple | None) -> None:
    pool = softmax_pool(n=30)
    method = AdaMerging(granularity=granularity, clamp=clamp, steps=12, lr=0.05, batch_size=8, trainer={})
    method.prepare(pool, CPU)
    expected = adamerging_by_hand(pool, 12, granularity == "layer", 0.05, 8, clamp)
    torch.testing.assert_close(method.lambdas, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(expected, torch.full_like(expected, 0.3))  # it moved
    merged = method.run(pool)
    for i, k in enumerate(pool.base):
        col = i if granularity == "layer" else 0
        want = pool.base[k] + sum(expected[t, col] * (pool.experts[t][k] - pool.base[k]) for t in range(3))
        torch.testing.assert_close(merged[k], want, rtol=1e-5, atol=1e-6)
    assert method.report()["adamerging_split"] == "test"
    assert pool.batch_calls[0][:2] == ("task0", "test")


def test_adamerging_options_are_checked() -> None:
    for kwargs, key in [
        ({"granularity": "row"}, "granularity"),
        ({"clamp": [1.0, 0.0]}, "clamp"),
        ({"split": "dev"}, "split"),
        ({"steps": 0}, "steps"),
        ({"betas": [0.9, 1.0]}, "betas"),
        ({"lr": float("nan")}, "lr"),
    ]:
        with pytest.raises(ValueError, match=key):
            AdaMerging(**kwargs)


def test_awd_with_adamerging_learns_on_the_disentangled_experts(tmp_path: Path) -> None:
    # AWD(merge=AdaMerging): AdaMerging is fitted on the experts theta_0 + tau_t - delta, then merges tau_t - delta.
    from safetensors.torch import save_file

    pool = softmax_pool(n=30)
    delta = {"lin.weight": 0.2 * torch.randn(3, 4, generator=torch.Generator().manual_seed(9))}
    save_file(delta, str(tmp_path / "delta.safetensors"))
    inner = AdaMerging(steps=6, lr=0.05, batch_size=8)
    awd = AWD(merge=inner, delta_path=str(tmp_path / "delta.safetensors"), include=[".*"])
    merged = awd.run(pool)

    hats = [{k: v - delta[k] if k in delta else v for k, v in e.items()} for e in pool.experts]
    plain = softmax_pool(n=30)
    plain.experts = hats
    alone = AdaMerging(steps=6, lr=0.05, batch_size=8)
    expected = alone.run(plain)
    torch.testing.assert_close(inner.lambdas, alone.lambdas)
    assert_close(merged, expected)
    assert isinstance(awd._view, TransformedPool)


def test_fisher_inside_awd_sees_the_transformed_experts(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    pool = softmax_pool()
    delta = {"lin.weight": 0.3 * torch.ones(3, 4)}
    save_file(delta, str(tmp_path / "delta.safetensors"))
    awd = AWD(
        merge=FisherMerging(labels="data", num_examples=1000, floor=1e-12),
        delta_path=str(tmp_path / "delta.safetensors"),
        include=[".*"],
    )
    merged = awd.run(pool)
    plain = softmax_pool()
    plain.experts = [{k: v - delta[k] if k in delta else v for k, v in e.items()} for e in pool.experts]
    by_hand = [fisher_by_hand(plain, t, "data") for t in range(3)]
    assert_close(merged, fisher_average(plain, by_hand, [1.0, 1.0, 1.0], 1e-12))


# ------------------------------------------------------------------------------------------------ the app


def test_pools_without_task_data_refuse_data_methods_before_any_work(tmp_path: Path) -> None:
    from mergelab.pools.base import PoolCapabilityError
    from mergelab.pools.checkpoint import CheckpointPool

    pool = CheckpointPool(pretrained=str(tmp_path / "base"), experts={"a": str(tmp_path / "a")})
    for name in ("fisher", "regmean", "adamerging"):
        cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "method" / f"{name}.yaml")
        ((_, method),) = method_candidates(cfg, False)
        with pytest.raises(PoolCapabilityError, match=rf"method '{name}' learns from the tasks' examples.*task_data"):
            pool.check_method(method, f"method '{name}'")
    awd = AWD(merge="fisher")
    with pytest.raises(PoolCapabilityError, match="task_data"):
        pool.check_method(awd, "method 'awd'")


@pytest.mark.parametrize(
    ("method", "extra", "report_key"),
    [
        ("fisher", ["method.num_examples=16"], "fisher_below_floor"),
        ("regmean", ["method.num_examples=16"], "regmean_layers"),
        ("adamerging", ["method.steps=2", "method.max_examples=16", "method.granularity=task"], "lambda_food_review"),
    ],
)
def test_data_methods_run_through_the_app_on_the_embedded_pool(
    tmp_path: Path, method: str, extra: list[str], report_key: str
) -> None:
    out = tmp_path / method
    objective = run(make_cfg(out, [f"method={method}", *extra]))
    assert objective == objective  # scored (not NaN)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == method
    assert report_key in metrics["method_report"]
    assert set(metrics["scores"]) == {"tweet_sentiment", "food_review"}
