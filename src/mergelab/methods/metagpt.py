"""MetaGPT, Model Exclusive Task Arithmetic (Zhou et al., EMNLP 2024): closed-form, data-free coefficients."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mergelab import task_vectors as tv
from mergelab.engine.chunks import is_scratch
from mergelab.methods.base import TaskVectorMethod, check_choice, check_range
from mergelab.methods.dare import DARE
from mergelab.methods.ties import TIES


class MetaGPT(TaskVectorMethod):
    """theta = theta_0 + sum_t lambda_t tau_t with lambda_t = ||tau_t||^2 / sum_k ||tau_k||^2.

    Args:
        granularity: ``model`` (the paper: one lambda per task over all merged parameters) or ``tensor``
            (one lambda per task per tensor).
        curvature: optional per-task curvature constants delta_t (data-aware variant):
            lambda_t = delta_t^2 ||tau_t||^2 / sum_s delta_s^2 ||tau_s||^2. Default: none (the paper).
        sparsify: ``none`` (the paper's MetaGPT), ``ties`` (trim + sign election, then sum_t lambda_t of each
            task's surviving entries) or ``dare`` (drop and rescale, then sum_t lambda_t) - Table 4's combinations.
        lambda_from: with sparsify, compute the norms on the ``original`` or on the ``sparsified`` task vectors.
        k, prune: TIES options (sparsify=ties). p, seed: DARE options (sparsify=dare).
    """

    parallel_chunks = True  # per-chunk statistics and merges are pure functions of the chunk

    def __init__(
        self,
        granularity: str = "model",
        curvature: Sequence[float] | None = None,
        sparsify: str = "none",
        lambda_from: str = "original",
        k: float = 20.0,
        prune: str = "global",
        p: float = 0.5,
        seed: int = 0,
    ) -> None:
        check_choice("granularity", granularity, ("model", "tensor"))
        check_choice("sparsify", sparsify, ("none", "ties", "dare"))
        check_choice("lambda_from", lambda_from, ("original", "sparsified"))
        if curvature is not None:
            for c in curvature:
                check_range("curvature", float(c), 0.0, float("inf"), low_open=True, high_open=True)
        self.granularity, self.sparsify, self.lambda_from = granularity, sparsify, lambda_from
        self.curvature = [float(c) for c in curvature] if curvature is not None else None
        self.sparsifier: TIES | DARE | None = None
        if sparsify == "ties":
            self.sparsifier = TIES(k=k, prune=prune, scaling=1.0)
        elif sparsify == "dare":
            self.sparsifier = DARE(p=p, seed=seed, scaling=1.0)
        inner_passes = self.sparsifier.stat_passes if self.sparsifier else 0
        self.stat_passes = inner_passes + 1
        self.elementwise = self.sparsifier.elementwise if self.sparsifier else True
        self._norm_pass = inner_passes

    def _sparse(self, name: str, chunk: int, vectors: Sequence[Tensor]) -> Sequence[Tensor]:
        if isinstance(self.sparsifier, TIES):
            return self.sparsifier.select(vectors)
        if isinstance(self.sparsifier, DARE):
            return self.sparsifier.drop_chunk(name, chunk, vectors)
        return vectors

    def begin(self, names: Sequence[str]) -> None:
        if self.sparsifier is not None:
            self.sparsifier.begin(names)
        self._sq: dict[str, list[float]] = {}  # tensor name (or "" for the whole model) -> ||tau_t||^2
        self._lambdas: dict[str, list[float]] = {}

    def chunk_statistics(self, pass_idx: int, name: str, chunk: int, vectors: Sequence[Tensor]) -> Any:
        """One chunk's contribution to pass ``pass_idx`` (thread-safe): its squared norms in the norm pass."""
        if pass_idx < self._norm_pass:
            assert self.sparsifier is not None
            return self.sparsifier.chunk_statistics(pass_idx, name, chunk, vectors)
        used = vectors if self.lambda_from == "original" else self._sparse(name, chunk, vectors)
        return [float(torch.dot(v.reshape(-1), v.reshape(-1))) for v in used]  # chunk sums in float32

    def add_statistics(self, pass_idx: int, name: str, chunk: int, stats: Any) -> None:
        """Accumulate one chunk's :meth:`chunk_statistics` (called in chunk order, so sums are reproducible)."""
        if pass_idx < self._norm_pass:
            assert self.sparsifier is not None
            self.sparsifier.add_statistics(pass_idx, name, chunk, stats)
            return
        key = "" if self.granularity == "model" else name
        acc = self._sq.setdefault(key, [0.0] * len(stats))
        for i, sq in enumerate(stats):
            acc[i] += sq  # the total in float64

    def observe(self, pass_idx: int, name: str, chunk: int, vectors: Sequence[Tensor]) -> None:
        self.add_statistics(pass_idx, name, chunk, self.chunk_statistics(pass_idx, name, chunk, vectors))

    def end_pass(self, pass_idx: int) -> None:
        if pass_idx < self._norm_pass:
            assert self.sparsifier is not None
            self.sparsifier.end_pass(pass_idx)
            return
        self._lambdas = {key: self.coefficients(sq) for key, sq in self._sq.items()}

    def coefficients(self, squared_norms: Sequence[float]) -> list[float]:
        """lambda_t from the tasks' squared norms (and curvature constants, when given)."""
        if self.curvature is not None and len(self.curvature) != len(squared_norms):
            raise ValueError(
                f"method option 'curvature' has {len(self.curvature)} values for {len(squared_norms)} task vectors"
            )
        weights = [(self.curvature[i] ** 2 if self.curvature else 1.0) * n for i, n in enumerate(squared_norms)]
        total = sum(weights)
        if total == 0.0:  # every task vector is zero here: any convex weights give theta_0
            return [1.0 / len(weights)] * len(weights)
        return [w / total for w in weights]

    def lambdas(self, name: str = "") -> list[float]:
        """The coefficients used for tensor ``name`` (any name at model granularity)."""
        return self._lambdas["" if self.granularity == "model" else name]

    def merge_chunk(self, name: str, chunk: int, vectors: Sequence[Tensor]) -> Tensor:
        used = self._sparse(name, chunk, vectors)
        out = used[0] if is_scratch(used) else None  # accumulate in the engine's buffer
        return tv.weighted_sum(used, self.lambdas(name), out=out)

    def report(self) -> dict[str, Any]:
        if not self._lambdas:
            return {}
        if self.granularity == "model":
            return {f"lambda/{self.task_label(i)}": v for i, v in enumerate(self._lambdas[""])}
        per_task = list(zip(*self._lambdas.values(), strict=True))
        return {f"lambda_mean/{self.task_label(i)}": sum(v) / len(v) for i, v in enumerate(per_task)}
