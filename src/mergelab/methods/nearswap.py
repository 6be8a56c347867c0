"""NearSwap, as MergeKit's ``nearswap``: the pretrained model takes the expert's value where the two are already close.

Per coordinate, with tau = theta_1 - theta_0 (the pool's only expert minus the pretrained model) and
w = clamp(t / max(|tau|, eps), 0, 1): theta = w theta_1 + (1 - w) theta_0 = theta_0 + w tau. Coordinates that moved
by at most ``t`` take the expert's value; those that moved further keep the pretrained value plus a step of ``t``
toward the expert's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from torch import Tensor

from mergelab.config_types import Doc, Range
from mergelab.engine.chunks import Block
from mergelab.methods.base import TaskVectorMethod
from mergelab.methods.declaration import (
    REQUIRED,
    Exported,
    Import,
    MergeKitInput,
    MergeKitMapping,
    MergeKitMethod,
    NotExpressible,
)

#: MergeKit's floor on |theta_1 - theta_0| (its division's guard).
MERGEKIT_EPS = 1e-6


class NearSwapMergeKit(MergeKitMapping):
    """MergeKit's ``nearswap`` (``t``; its base_model the pool's pretrained model, its one other model the expert)."""

    reads = (MergeKitMethod("nearswap", {"t": REQUIRED}, {}),)

    def export(self, method: Any, n_experts: int) -> Exported:
        if method.eps != MERGEKIT_EPS:
            raise NotExpressible(f"MergeKit's nearswap fixes eps {MERGEKIT_EPS}; this merge uses {method.eps}")
        notes = ["MergeKit computes w theta_1 + (1 - w) theta_0, mergelab theta_0 + w tau: equal up to rounding"]
        return Exported("nearswap", {}, {"t": method.t}, notes)

    def read(self, config: MergeKitInput) -> Import:
        t = config.shared["t"]
        if t < 0:
            raise config.fail("parameters.t", f"{t:g} < 0: every weight would be 0 (the base model alone)")
        return config.imported(["method=nearswap", f"method.t={float(t)!r}"])


class NearSwap(TaskVectorMethod):
    """theta_0 + w tau per coordinate, w = clamp(t / max(|tau|, eps), 0, 1), for the pool's only expert.

    Args:
        t: how far (in weight units) a coordinate may have moved and still take the expert's value; 0 keeps the
            pretrained model.
        eps: the floor on |tau| in the division (MergeKit's 1e-6).

    Elementwise and a pure function of each chunk, so it streams and runs on several threads as task arithmetic does.
    """

    parallel_chunks = True
    elementwise = True
    expert_count = 1
    reference = "MergeKit's nearswap (alchemonaut, QuartetAnemoi-70B-t0.0001, 2024)"
    mergekit = NearSwapMergeKit()

    def __init__(
        self,
        t: Annotated[float, Range(low=0.0), Doc("largest |tau| that takes the expert's value (weight units)")] = 1e-4,
        eps: Annotated[float, Range(0.0, low_open=True), Doc("floor on |tau| in t / |tau| (MergeKit's 1e-6)")] = 1e-6,
    ) -> None:
        self.t, self.eps = float(t), float(eps)

    def merge_chunk(self, block: Block, vectors: Sequence[Tensor]) -> Tensor:
        (tau,) = vectors
        weight = (self.t / tau.abs().clamp_(min=self.eps)).clamp_(0.0, 1.0)  # t / |tau| as MergeKit divides
        return weight.mul_(tau)
