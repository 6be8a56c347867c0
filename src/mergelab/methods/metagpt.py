"""MetaGPT, Model Exclusive Task Arithmetic (Zhou et al., EMNLP 2024): closed-form, data-free coefficients."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

import torch
from torch import Tensor

from mergelab import task_vectors as tv
from mergelab.config_types import Doc, Range
from mergelab.engine.chunks import Block
from mergelab.engine.protocol import ChunkMethod, Sparsifier
from mergelab.engine.scratch import ChunkVectors
from mergelab.methods.base import MergeMethod, TaskVectorMethod, build_method


class MetaGPT(TaskVectorMethod):
    """theta = theta_0 + sum_t lambda_t tau_t with lambda_t = ||tau_t||^2 / sum_k ||tau_k||^2.

    Args:
        granularity: ``model`` (the paper: one lambda per task over all merged parameters) or ``tensor``
            (one lambda per task per tensor).
        curvature: optional per-task curvature constants delta_t (data-aware variant):
            lambda_t = delta_t^2 ||tau_t||^2 / sum_s delta_s^2 ||tau_s||^2. Default: none (the paper).
        sparsify: null / ``none`` (the paper's MetaGPT), or a method that sparsifies each task vector before the
            lambda-weighted sum (any :class:`~mergelab.engine.protocol.Sparsifier`: ``ties`` keeps each task's
            trimmed, sign-agreeing entries, ``dare`` drops and rescales - Table 4's combinations), given as a config
            node with ``_target_``, a ``conf/method`` YAML name, or an instance; the engine runs its statistics
            passes first (:meth:`prior_stages`) and its merge coefficient (``scaling``) is not used.
        lambda_from: with sparsify, compute the norms on the ``original`` or on the ``sparsified`` task vectors.
    """

    parallel_chunks = True  # per-chunk statistics and merges are pure functions of the chunk

    reference = (
        "Zhou et al. 2024, MetaGPT: Merging Large Language Models Using Model Exclusive Task Arithmetic, EMNLP 2024, "
        "arXiv 2406.11385"
    )
    mergekit = (
        "MetaGPT computes each task's coefficient from the task vectors' norms; MergeKit has no such method (its "
        "lambdas, under coefficients, as per-model task_arithmetic weights would give this merge's numbers, not the "
        "method)"
    )

    def __init__(
        self,
        granularity: Annotated[
            Literal["model", "tensor"], Doc("one lambda per task (the paper) or per task and tensor")
        ] = "model",
        curvature: Annotated[
            Sequence[float] | None,
            Range(0.0, float("inf"), low_open=True, high_open=True),
            Doc("per-task curvature constants delta_t > 0 (data-aware); null: the paper"),
        ] = None,
        sparsify: Annotated[Any, Doc("null (the paper) or a method that sparsifies each task vector (ties, dare)")] = (
            None
        ),
        lambda_from: Annotated[
            Literal["original", "sparsified"], Doc("the task vectors the norms are computed on")
        ] = "original",
    ) -> None:
        self.granularity, self.lambda_from = granularity, lambda_from
        self.curvature = [float(c) for c in curvature] if curvature is not None else None
        self.sparsifier: Sparsifier | None = None
        if sparsify is not None and sparsify != "none":
            self.sparsifier = build_method(sparsify, "sparsify", Sparsifier)
        inner = self.sparsifier
        self.parallel_chunks = inner is None or bool(inner.parallel_chunks)
        self.stat_passes = 1  # the norms; the sparsifier's own passes run before it (prior_stages)
        self.elementwise = inner.elementwise if inner is not None else True

    def _sparse(self, block: Block, vectors: Sequence[Tensor]) -> Sequence[Tensor]:
        return self.sparsifier.sparsify_chunk(block, vectors) if self.sparsifier is not None else vectors

    def prior_stages(self) -> Sequence[ChunkMethod]:
        """The sparsifier, whose statistics passes (TIES's thresholds and signs) its ``sparsify_chunk`` needs."""
        if self.sparsifier is None:
            return []
        # Its passes run before this method's begin: it learns the experts' names (per-expert k or p) here.
        self.sparsifier.task_names = self.task_names
        return [self.sparsifier]

    def check_experts(self, names: Sequence[str]) -> None:
        super().check_experts(names)
        if isinstance(self.sparsifier, MergeMethod):
            self.sparsifier.check_experts(names)

    def begin(self, names: Sequence[str]) -> None:
        # tensor name -> [T, rows] float64 squared sums of each row (each element of a 1-D tensor), filled block
        # by block on the consumer's thread: one buffer per tensor, not one small tensor per block and task
        self._sq: dict[str, Tensor] = {}
        self._lambdas: dict[str, list[float]] = {}

    def chunk_statistics(self, pass_idx: int, block: Block, vectors: Sequence[Tensor]) -> Any:
        """One block's contribution to the norm pass (thread-safe): the squared norms of its rows."""
        used = vectors if self.lambda_from == "original" else self._sparse(block, vectors)
        return [tv.row_squared_sums(v) for v in used]

    def add_statistics(self, pass_idx: int, block: Block, stats: Any) -> None:
        """Accumulate one block's :meth:`chunk_statistics` (called in block order, so sums are reproducible)."""
        acc = self._sq.get(block.name)
        if acc is None:  # rows of the tensor: its first dimension (elements of a 1-D tensor; one for a scalar)
            acc = self._sq[block.name] = torch.empty(
                len(stats), block.shape[0] if block.shape else 1, dtype=torch.float64
            )
        start = block.start or 0
        acc[:, start : start + stats[0].numel()] = torch.stack(stats)

    def end_pass(self, pass_idx: int) -> None:
        # Exact sums of the row values: the same norms (and lambdas) whatever the chunking or thread count.
        buffers = list(self._sq.values())
        if self.granularity == "model" and buffers:
            self._lambdas = {
                "": self.coefficients([tv.exact_sum([b[i] for b in buffers]) for i in range(len(buffers[0]))])
            }
        elif self.granularity == "tensor":
            self._lambdas = {n: self.coefficients([tv.exact_sum([r]) for r in sq]) for n, sq in self._sq.items()}
        self._sq = {}

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

    def merge_chunk(self, block: Block, vectors: Sequence[Tensor]) -> Tensor:
        used = self._sparse(block, vectors)
        return tv.weighted_sum(used, self.lambdas(block.name), out=ChunkVectors.of(used).output_buffer())

    def report(self) -> dict[str, Any]:
        if not self._lambdas:
            return {}
        if self.granularity == "model":
            return {f"lambda/{self.task_label(i)}": v for i, v in enumerate(self._lambdas[""])}
        per_task = list(zip(*self._lambdas.values(), strict=True))
        return {f"lambda_mean/{self.task_label(i)}": sum(v) / len(v) for i, v in enumerate(per_task)}
