"""RegMean (Jin et al., ICLR 2023): merge each linear layer in closed form so that it maps every task's inputs
as that task's expert did.

For a linear layer with weight W (out x in) and inputs X_t under expert t (rows: one per token or example), the
merge minimising sum_t ||X_t W^T - X_t W_t^T||^2 is W = (sum_t W_t G_t)(sum_t G_t)^-1 with the Gram matrices
G_t = X_t^T X_t. Off-diagonal entries are scaled by ``alpha`` (G_t <- alpha G_t + (1 - alpha) diag(G_t)), which keeps
the sum well conditioned. As a task-vector method: W_0 + (sum_t tau_t G_t)(sum_t G_t)^-1, row block by row block;
every other parameter is the plain average theta_0 + mean_t tau_t.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import torch
from torch import Tensor, nn

from mergelab.config_types import Doc, Range
from mergelab.engine.chunks import Block, DictSource
from mergelab.methods.base import TaskVectorMethod
from mergelab.methods.task_statistics import (
    Count,
    Split,
    cached_statistics,
    expert_model,
    require_task_data,
)

log = logging.getLogger(__name__)


def gram_matrices(
    pool: Any, i: int, split: str, num_examples: int, batch_size: int, seed: int, progress: bool = True
) -> dict[str, Tensor]:
    """``X^T X / rows`` of the inputs of every merged ``nn.Linear`` of expert ``i`` over ``num_examples`` of its task.

    Keyed by the layer's weight name. Padding positions (``attention_mask`` 0) are left out of 3-D inputs, so the
    Gram matrices do not depend on how the examples are batched.
    """
    task = pool.tasks[i]
    model = expert_model(pool, i)
    keys = set(pool.mergeable(pool.pretrained_state()))
    grams: dict[str, Tensor] = {}
    rows: dict[str, int] = {}
    mask: list[Tensor | None] = [None]

    def hook(name: str) -> Any:
        def record(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            x = inputs[0].detach()
            m = mask[0]
            if x.dim() == 3 and m is not None and tuple(m.shape) == tuple(x.shape[:2]):
                x = x[m.bool()]
            x = x.reshape(-1, x.shape[-1]).double()
            grams[name] = grams[name].add_(x.T @ x) if name in grams else x.T @ x
            rows[name] = rows.get(name, 0) + x.shape[0]

        return record

    handles = [
        module.register_forward_pre_hook(hook(f"{name}.weight"))
        for name, module in model.backbone.named_modules()
        if isinstance(module, nn.Linear) and f"{name}.weight" in keys
    ]
    from tqdm.auto import tqdm

    try:
        with torch.no_grad():
            for batch in tqdm(
                pool.task_batches(task, split, num_examples, batch_size, seed),
                desc=f"RegMean {task}",
                disable=None if progress else True,
                leave=False,
            ):
                mask[0] = batch.get("attention_mask")
                pool.task_logits(model, task, batch)
    finally:
        for h in handles:
            h.remove()
    if not grams:
        raise ValueError(f"RegMean: no merged nn.Linear layer of task '{task}''s expert saw an input")
    return {k: (g / rows[k]).float() for k, g in grams.items()}


class RegMean(TaskVectorMethod):
    """Closed-form merge of every linear layer from its inputs' Gram matrices; other parameters averaged.

    Args:
        alpha: the share of each Gram matrix's off-diagonal entries kept (1: plain RegMean; 0: a diagonal,
            per-input-feature weighted average). RegMean scales them by a factor below 1 because the sum of Gram
            matrices is often ill-conditioned; 0.9 by default (FusionBench's CLIP preset uses 0.6): tune it on the
            validation split with the grid.
        num_examples: examples of each task whose inputs form the Gram matrices (a seeded subset).
        split: the split they come from (the experts' training data, as in the paper).
        batch_size: examples per forward pass (padding is excluded, so it does not change the result).
        seed: seed of the example subset.
    """

    learns_from_pool = True
    needs_task_data = True
    parallel_chunks = True

    reference = (
        "Jin et al. 2023, Dataless Knowledge Fusion by Merging Weights of Language Models, ICLR 2023, arXiv 2212.09849"
    )
    mergekit = "RegMean solves per-layer regressions on task activations; MergeKit merges without data"

    def __init__(
        self,
        alpha: Annotated[float, Range(0.0, 1.0), Doc("share of each Gram matrix's off-diagonal entries kept")] = 0.9,
        num_examples: Annotated[Count, Doc("examples per task (seeded subset)")] = 256,
        split: Annotated[Split, Doc("the split the examples come from")] = "train",
        batch_size: Annotated[Count, Doc("examples per forward pass (does not change the Gram matrices)")] = 16,
        seed: Annotated[int, Doc("seed of the example subset")] = 0,
    ) -> None:
        self.alpha = float(alpha)
        self.num_examples = int(num_examples)
        self.split = split
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.grams: list[Mapping[str, Tensor]] | None = None
        self._inverse: dict[str, Tensor] = {}
        self._prepared_for: Any = None

    def prepare(
        self,
        pool: Any,
        trainer_kwargs: Mapping[str, Any] | None = None,
        loggers: Sequence[Any] = (),
        work_dir: str | Path | None = None,
    ) -> None:
        """Collect (or read from the cache) each expert's Gram matrices on its own task, and invert their sums."""
        if self._prepared_for is pool:
            return
        require_task_data(pool, "regmean")
        self.task_names = list(pool.tasks)
        # The batch size sets how the Gram sums are grouped (their rounding): part of what they depend on.
        options = {"num_examples": self.num_examples, "split": self.split, "seed": self.seed, "batch": self.batch_size}
        self.grams = [
            cached_statistics(
                pool,
                task,
                "regmean",
                options,
                lambda i=i: gram_matrices(pool, i, self.split, self.num_examples, self.batch_size, self.seed),
            )
            for i, task in enumerate(self.task_names)
        ]
        names = set(self.grams[0].keys())
        for g in self.grams[1:]:
            names &= set(g.keys())
        self._inverse = {}
        for name in sorted(names):
            total = sum(self.reduced(g, name) for g in self.grams)
            try:
                self._inverse[name] = torch.linalg.inv(total)
            except torch.linalg.LinAlgError:  # an input feature no example ever sets: least-squares solution
                log.warning("RegMean: the Gram sum of '%s' is singular; using its pseudo-inverse", name)
                self._inverse[name] = torch.linalg.pinv(total)
        self._prepared_for = pool

    def reduced(self, grams: Mapping[str, Tensor], name: str) -> Tensor:
        """``alpha G + (1 - alpha) diag(G)`` of layer ``name``, in float64."""
        src = grams if hasattr(grams, "get_rows") else DictSource(grams)
        g = src.get_rows(name, None, None).double()
        return self.alpha * g + (1.0 - self.alpha) * torch.diag(torch.diagonal(g))

    def merge_chunk(self, block: Block, vectors: Sequence[Tensor]) -> Tensor:
        if self.grams is None:
            raise RuntimeError("RegMean: the Gram matrices are not collected yet; call prepare(pool) first")
        inverse = self._inverse.get(block.name)
        if inverse is None:  # not a linear layer's weight: the plain average
            out = vectors[0].clone()
            for v in vectors[1:]:
                out.add_(v)
            return out.div_(len(vectors))
        acc = torch.zeros(vectors[0].shape, dtype=torch.float64)
        for g, v in zip(self.grams, vectors, strict=True):
            acc.add_(v.double() @ self.reduced(g, block.name))
        return (acc @ inverse).to(vectors[0].dtype)

    def report(self) -> dict[str, Any]:
        if self.grams is None:
            return {}
        return {"regmean_split": self.split, "regmean_layers": len(self._inverse)}
