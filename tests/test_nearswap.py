"""NearSwap (MergeKit's ``nearswap``) against its definition, written out here in float64: per coordinate
w = clamp(t / max(|theta_1 - theta_0|, eps), 0, 1) and theta = w theta_1 + (1 - w) theta_0; and its pool and
MergeKit contracts (exactly one expert)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mergelab.engine.passes import merge_in_memory
from mergelab.methods import NearSwap
from mergelab.methods.base import expert_count_error


def models() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(9, 7, generator=g), "b": torch.randn(9, generator=g)}
    # moves of every size around t: tiny (taken whole), large (a step of t), exactly zero (nothing to take)
    scale = torch.logspace(-6, -1, 63).view(9, 7)
    expert = {"w": base["w"] + scale * torch.randn(9, 7, generator=g).sign(), "b": base["b"].clone()}
    return base, expert


def by_hand(base: dict, expert: dict, t: float, eps: float) -> dict[str, torch.Tensor]:
    out = {}
    for k in base:
        a, b = base[k].double(), expert[k].double()
        w = (t / (a - b).abs().clamp(min=eps)).clamp(0.0, 1.0)
        out[k] = (w * b + (1 - w) * a).float()
    return out


@pytest.mark.parametrize(("t", "eps"), [(1e-4, 1e-6), (1e-3, 1e-6), (0.0, 1e-6), (1.0, 1e-6), (1e-4, 1e-3)])
def test_nearswap_is_its_definition(t: float, eps: float) -> None:
    base, expert = models()
    merged = merge_in_memory(NearSwap(t=t, eps=eps), base, [expert])
    want = by_hand(base, expert, t, eps)
    for k in base:
        torch.testing.assert_close(merged[k], want[k], rtol=0, atol=2e-7)


def test_small_moves_are_taken_whole_and_large_ones_by_a_step_of_t() -> None:
    base, expert = models()
    merged = merge_in_memory(NearSwap(t=1e-3), base, [expert])
    moved = (expert["w"] - base["w"]).abs()
    near, far = moved <= 1e-3, moved > 1e-2
    torch.testing.assert_close(merged["w"][near], expert["w"][near], rtol=0, atol=1e-7)
    step = (merged["w"] - base["w"]).abs()[far]
    torch.testing.assert_close(step, torch.full_like(step, 1e-3), rtol=1e-3, atol=0)
    assert torch.equal(merged["b"], base["b"])  # nothing moved: nothing taken


def test_a_pool_of_two_experts_is_refused_naming_them() -> None:
    with pytest.raises(ValueError, match=r"NearSwap merges the pretrained model with exactly one expert .* keep one"):
        NearSwap().check_experts(["math", "code"])
    assert "the pool has 2 experts ['math', 'code']" in expert_count_error(NearSwap, 2, ["math", "code"])


def test_a_mergekit_nearswap_config_reads_back(tmp_path: Path) -> None:
    from mergelab.io.writer import write_checkpoint
    from mergelab.provenance.mergekit import read_mergekit

    base, expert = models()
    dirs = [write_checkpoint(s, tmp_path / n) for s, n in ((base, "base"), (expert, "e0"), (expert, "e1"))]
    body = f"merge_method: nearswap\nbase_model: {dirs[0]}\nparameters: {{t: 0.001}}\nmodels:\n  - model: {dirs[1]}\n"
    (tmp_path / "one.yml").write_text(body)
    assert read_mergekit(tmp_path / "one.yml").method == ["method=nearswap", "method.t=0.001"]
    (tmp_path / "two.yml").write_text(body + f"  - model: {dirs[2]}\n")
    with pytest.raises(ValueError, match=r"two.yml: models: NearSwap merges the pretrained model with exactly one"):
        read_mergekit(tmp_path / "two.yml")
