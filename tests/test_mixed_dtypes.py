"""Experts saved in another precision than the pretrained model (fp16 / bf16 over fp32) load, merge and score."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from mergelab.run import run
from tests.conftest import make_cfg


def test_fp16_and_bf16_classifier_experts_over_an_fp32_base(tmp_path: Path) -> None:
    reference = tmp_path / "fp32"
    run(make_cfg(reference, ["method=task_arithmetic"]))
    ref = json.loads((reference / "metrics.json").read_text())

    experts = {}
    for (task, path), dtype in zip(ref["experts"].items(), (torch.float16, torch.bfloat16), strict=True):
        model = AutoModelForSequenceClassification.from_pretrained(path).to(dtype)
        experts[task] = tmp_path / f"{task}-{str(dtype).removeprefix('torch.')}"
        model.save_pretrained(experts[task])
        AutoTokenizer.from_pretrained(path).save_pretrained(experts[task])
        assert next(model.parameters()).dtype == dtype
    spec = "{" + ",".join(f"{t}:'{p}'" for t, p in experts.items()) + "}"
    mixed = tmp_path / "mixed"
    run(make_cfg(mixed, ["method=task_arithmetic", f"model.experts={spec}"]))
    got = json.loads((mixed / "metrics.json").read_text())

    # Rounding the experts' weights to 16 bits moves a prediction or two of 48, no more.
    for row in ("experts", "task_arithmetic"):
        for task in experts:
            assert abs(got["rows"][row]["scores"][task]["acc"] - ref["rows"][row]["scores"][task]["acc"]) <= 3 / 48
    assert got["rows"]["experts"]["avg_acc"] > got["rows"]["pretrained"]["avg_acc"]
