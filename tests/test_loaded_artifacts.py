"""Everything a method loads is checked against the pool it is applied to: names, shapes, dtypes and finiteness,
refused naming the file and the first mismatch (never applied silently, never ignored)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergelab.io.artifacts import check_artifact
from mergelab.io.writer import write_checkpoint
from mergelab.methods.awd import AWD
from tests.conftest import ListPool

CPU = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False}


def pool() -> ListPool:
    g = torch.Generator().manual_seed(0)
    base = {
        "layer.0.w": torch.randn(6, 4, generator=g),
        "layer.0.b": torch.randn(6, generator=g),
        "layer.1.w": torch.randn(5, 6, generator=g),
    }
    experts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    return ListPool(base, experts)


def good_delta() -> dict[str, torch.Tensor]:
    """A delta for :func:`pool` under AWD's default selection (2-D weights of the numbered layers)."""
    return {"layer.0.w": torch.full((6, 4), 0.01), "layer.1.w": torch.full((5, 6), -0.01)}


BAD_DELTAS = {
    "another model": ({"encoder.block.3.q": torch.zeros(6, 4)}, r"was saved from another model: none of its 1"),
    "NaN": ({**good_delta(), "layer.1.w": torch.full((5, 6), float("nan"))}, r"tensor 'layer\.1\.w' holds NaN or inf"),
    "inf": ({**good_delta(), "layer.0.w": torch.full((6, 4), float("inf"))}, r"tensor 'layer\.0\.w' holds NaN or inf"),
    "shape": ({**good_delta(), "layer.1.w": torch.zeros(6, 5)}, r"'layer\.1\.w' has shape \[6, 5\], .* has \[5, 6\]"),
    "missing": ({"layer.0.w": torch.zeros(6, 4)}, r"has no tensor 'layer\.1\.w' \(1 of the 2 "),
    "extra": ({**good_delta(), "layer.0.b": torch.zeros(6)}, r"tensor 'layer\.0\.b' is not a tensor this AWD"),
    "integer": ({**good_delta(), "layer.0.w": torch.zeros(6, 4, dtype=torch.int32)}, r"dtype torch\.int32, not a"),
}


@pytest.mark.parametrize("form", ["file", "dir"])
@pytest.mark.parametrize("case", list(BAD_DELTAS))
def test_awd_refuses_a_delta_that_is_not_this_pools(case: str, form: str, tmp_path: Path) -> None:
    delta, match = BAD_DELTAS[case]
    if form == "file":
        path = tmp_path / "delta.safetensors"
        save_file(delta, str(path))
    else:  # a streaming run's delta dir
        path = write_checkpoint(delta, tmp_path / "delta")
    awd = AWD(delta_path=str(path))
    with pytest.raises(ValueError, match=rf"method option 'delta_path' \({path}\)(:| was| has) .*{match}|{match}"):
        awd.prepare(pool(), CPU)


def test_awd_applies_a_matching_delta(tmp_path: Path) -> None:
    path = tmp_path / "delta.safetensors"
    save_file(good_delta(), str(path))
    p = pool()
    awd = AWD(delta_path=str(path))
    awd.prepare(p, CPU)
    merged = awd.merge(p.base, p.experts)
    delta = good_delta()
    for name, base in p.base.items():  # task arithmetic (scaling 0.3) of tau_t - delta, by hand
        taus = [e[name] - base - delta.get(name, 0) for e in p.experts]
        torch.testing.assert_close(merged[name], base + 0.3 * sum(taus), rtol=0, atol=1e-6)


def test_check_artifact_on_a_subset() -> None:
    """``exact=False`` (e.g. statistics of some tensors) accepts a subset but still checks each tensor."""
    expected = {"a": (2, 2), "b": (3,)}
    check_artifact({"a": torch.zeros(2, 2)}, expected, "stats.safetensors", exact=False)
    with pytest.raises(ValueError, match=r"stats\.safetensors: tensor 'a' holds NaN"):
        check_artifact({"a": torch.full((2, 2), float("nan"))}, expected, "stats.safetensors", exact=False)
    with pytest.raises(ValueError, match=r"stats\.safetensors holds no tensor"):
        check_artifact({}, expected, "stats.safetensors", exact=False)
