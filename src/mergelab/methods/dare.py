"""DARE (Yu et al. 2024): drop each task-vector coordinate with probability p, rescale, then merge."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mergelab import task_vectors as tv
from mergelab.methods.base import TaskVectorMethod, check_range
from mergelab.methods.task_arithmetic import TaskArithmetic
from mergelab.methods.ties import TIES


class DARE(TaskVectorMethod):
    """Drop-and-rescale every task vector, then combine with task arithmetic or TIES.

    Args:
        p: drop rate in [0, 1); survivors are scaled by 1 / (1 - p).
        seed: masks are drawn per (seed, parameter name, task index), so they do not depend on visiting order.
        merge: ``task_arithmetic`` or ``ties``: the method applied to the dropped vectors.
        scaling, k, prune, disjoint: options of that method (the TIES ones are ignored for task arithmetic).
    """

    def __init__(
        self,
        p: float = 0.5,
        seed: int = 0,
        merge: str = "task_arithmetic",
        scaling: float = 0.3,
        k: float = 20.0,
        prune: str = "global",
        disjoint: str = "sum",
    ) -> None:
        check_range("p", p, 0.0, 1.0, low_open=False, high_open=True)
        self.p, self.seed = float(p), int(seed)
        if merge == "task_arithmetic":
            self.inner: TaskVectorMethod = TaskArithmetic(scaling=scaling)
        elif merge == "ties":
            self.inner = TIES(k=k, prune=prune, disjoint=disjoint, scaling=scaling)
        else:
            raise ValueError(f"method option 'merge' must be 'task_arithmetic' or 'ties', got {merge!r}")

    def drop(
        self, vectors: Sequence[Mapping[str, Tensor]], masks: Sequence[Mapping[str, Tensor]] | None = None
    ) -> list[tv.StateDict]:
        """Dropped-and-rescaled task vectors; ``masks`` (True = keep) replace the random draw when given."""
        out = []
        for i, v in enumerate(vectors):
            dropped = {}
            for n, t in v.items():
                gen = torch.Generator().manual_seed(tv.tensor_seed(self.seed, n, i))
                mask = masks[i][n] if masks is not None else None
                dropped[n] = tv.drop_and_rescale(t, self.p, generator=gen, mask=mask)
            out.append(dropped)
        return out

    def combine(
        self, vectors: Sequence[Mapping[str, Tensor]], masks: Sequence[Mapping[str, Tensor]] | None = None
    ) -> tv.StateDict:
        return self.inner.combine(self.drop(vectors, masks))
