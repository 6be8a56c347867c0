"""Fisher merging (Matena & Raffel, NeurIPS 2022): the Fisher-weighted average of the experts.

theta = sum_t w_t F_t theta_t / sum_t w_t F_t per coordinate, with F_t the diagonal Fisher information of expert t
estimated on its own task's examples: F_t = mean over examples x of E_y [(d log p_t(y|x) / d theta)^2]. As a
task-vector method: theta_0 + sum_t w_t F_t tau_t / sum_t w_t F_t (the weights sum to one per coordinate), so it
streams block by block once the diagonals are computed (cached on disk per expert, task and options).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from torch import Tensor

from mergelab.config_types import Doc, Range
from mergelab.engine.chunks import Block, DictSource, read_bounds
from mergelab.methods.base import TaskVectorMethod, check_expert_weights, expert_weights
from mergelab.methods.declaration import ExpertWeights
from mergelab.methods.task_statistics import (
    Count,
    Split,
    cached_statistics,
    expert_model,
    merged_parameters,
    require_task_data,
)


def fisher_diagonal(
    pool: Any, i: int, split: str, num_examples: int, labels: str, seed: int, progress: bool = True
) -> dict[str, Tensor]:
    """The diagonal Fisher of expert ``i`` of ``pool`` over ``num_examples`` of ``split`` of its task.

    One example at a time (the Fisher needs per-example gradients, squared before they are averaged); every merged
    tensor gets an entry (zero where no gradient reaches it, e.g. a buffer).
    """
    task = pool.tasks[i]
    model = expert_model(pool, i)
    params = merged_parameters(pool, model)
    base = pool.mergeable(pool.pretrained_state())
    fisher = {n: torch.zeros(t.shape, dtype=torch.float32) for n, t in base.items()}
    names = list(params)
    if not names:
        raise ValueError(f"Fisher merging: no parameter of task '{task}''s model backbone is a merged tensor")
    gen = torch.Generator().manual_seed(seed)
    batches = pool.task_batches(task, split, num_examples, 1, seed)
    from tqdm.auto import tqdm

    n = 0
    for batch in tqdm(batches, desc=f"Fisher {task}", disable=None if progress else True, leave=False):
        logp = torch.log_softmax(pool.task_logits(model, task, batch).float(), dim=-1)[0]
        if labels == "expected":  # E_y over the model's distribution, exactly: one backward pass per class
            probs = logp.detach().exp()
            for c in range(logp.shape[0]):
                grads = torch.autograd.grad(logp[c], [params[k] for k in names], retain_graph=True, allow_unused=True)
                for k, g in zip(names, grads, strict=True):
                    if g is not None:
                        fisher[k].add_(g.float().square(), alpha=float(probs[c]))
        else:
            if labels == "sample":  # y drawn from the model: an unbiased one-sample estimate of E_y
                y = int(torch.multinomial(logp.detach().exp(), 1, generator=gen))
            else:  # the data's label: the "empirical Fisher"
                y = int(batch["labels"][0])
            grads = torch.autograd.grad(logp[y], [params[k] for k in names], allow_unused=True)
            for k, g in zip(names, grads, strict=True):
                if g is not None:
                    fisher[k].add_(g.float().square())
        n += 1
    if n == 0:
        raise ValueError(f"Fisher merging: split '{split}' of task '{task}' has no examples")
    return {k: v.div_(n) for k, v in fisher.items()}


class FisherMerging(TaskVectorMethod):
    """The Fisher-weighted average of the experts (diagonal Fisher of each expert on its own task).

    Args:
        num_examples: examples of each task the Fisher is estimated on (a seeded subset; Matena & Raffel use
            thousands, FusionBench 256).
        labels: ``sample`` (default; y drawn from the expert's own predictive distribution: an unbiased estimate of
            the true Fisher at one backward pass per example), ``expected`` (the exact expectation over the classes:
            one backward pass per class) or ``data`` (the task's labels: the "empirical Fisher", which is not the
            Fisher the method is derived from).
        split: the split the examples come from (the experts' training data, as in the paper).
        floor: every Fisher value is at least this, so a coordinate no example moves is still a weighted average
            (Matena & Raffel use 1e-6).
        normalize: divide each expert's Fisher by its L2 norm over all merged parameters first, so that every task
            counts equally whatever its loss scale (FusionBench's option); off in the paper.
        task_weights: per-task weights w_t (null: all 1; a list in task order or a task -> weight mapping).
        seed: seed of the example subset and of the sampled labels.
    """

    learns_from_pool = True
    needs_task_data = True
    parallel_chunks = True

    reference = "Matena & Raffel 2022, Merging Models with Fisher-Weighted Averaging, arXiv 2111.09832"
    mergekit = "Fisher merging weighs parameters by their Fisher information on task data; MergeKit uses no data"

    def __init__(
        self,
        num_examples: Annotated[Count, Doc("examples per task (seeded subset)")] = 256,
        labels: Annotated[
            Literal["sample", "expected", "data"],
            Doc("y sampled from the expert, the expectation over classes, or the data's labels (empirical)"),
        ] = "sample",
        split: Annotated[Split, Doc("the split the examples come from")] = "train",
        floor: Annotated[
            float,
            Range(0.0, float("inf"), low_open=True, high_open=True),
            Doc("least Fisher value (the paper's), so untouched coordinates still average"),
        ] = 1e-6,
        normalize: Annotated[bool, Doc("divide each expert's Fisher by its L2 norm first (FusionBench)")] = False,
        task_weights: Annotated[ExpertWeights, Doc("per-task w_t: null (all 1), a list or {task: weight}")] = None,
        seed: Annotated[int, Doc("seed of the example subset and the sampled labels")] = 0,
    ) -> None:
        self.num_examples = int(num_examples)
        self.labels = labels
        self.split = split
        self.floor = float(floor)
        self.normalize = bool(normalize)
        self.task_weights_option = check_expert_weights(task_weights, "task_weights")
        self.seed = int(seed)
        self.fishers: list[Any] | None = None
        self.weights: list[float] = []
        self._scales: list[float] = []
        self._prepared_for: Any = None
        self._below_floor: float | None = None

    def expert_options(self) -> dict[str, Any]:
        return {"task_weights": self.task_weights_option}

    def options(self) -> dict[str, Any]:
        """What the Fisher diagonals depend on besides the expert and the data."""
        return {"num_examples": self.num_examples, "labels": self.labels, "split": self.split, "seed": self.seed}

    def prepare(
        self,
        pool: Any,
        trainer_kwargs: Mapping[str, Any] | None = None,
        loggers: Sequence[Any] = (),
        work_dir: str | Path | None = None,
    ) -> None:
        """Estimate (or read from the cache) each expert's diagonal Fisher on its own task's examples."""
        if self._prepared_for is pool:
            return
        require_task_data(pool, "fisher")
        self.task_names = list(pool.tasks)
        self.weights = expert_weights(self.task_weights_option, self.task_names, "task_weights")
        self.fishers = [
            cached_statistics(
                pool,
                task,
                "fisher",
                self.options(),
                lambda i=i: fisher_diagonal(pool, i, self.split, self.num_examples, self.labels, self.seed),
            )
            for i, task in enumerate(self.task_names)
        ]
        self._scales = [1.0] * len(self.fishers)
        if self.normalize:
            self._scales = [1.0 / max(_norm(f), 1e-30) for f in self.fishers]
        below = total = 0
        for f, s in zip(self.fishers, self._scales, strict=True):
            for k in f:
                t = f[k]
                below += int((t * s < self.floor).sum())
                total += t.numel()
        self._below_floor = below / max(total, 1)
        self._prepared_for = pool

    def merge_chunk(self, block: Block, vectors: Sequence[Tensor]) -> Tensor:
        if self.fishers is None:
            raise RuntimeError("Fisher merging: the Fisher diagonals are not computed yet; call prepare(pool) first")
        bounds = read_bounds(block.shape, block.start, block.stop)
        num = torch.zeros_like(vectors[0])
        den = torch.zeros_like(vectors[0])
        for f, scale, w, v in zip(self.fishers, self._scales, self.weights, vectors, strict=True):
            src = f if hasattr(f, "get_rows") else DictSource(f)
            fw = src.get_rows(block.name, *bounds).to(v.dtype).mul(scale).clamp_(min=self.floor).mul_(w)
            num.addcmul_(fw, v)
            den.add_(fw)
        return num.div_(den)

    def report(self) -> dict[str, Any]:
        if self._below_floor is None:
            return {}
        return {"fisher_split": self.split, "fisher_labels": self.labels, "fisher_below_floor": self._below_floor}


def _norm(stats: Mapping[str, Tensor]) -> float:
    """L2 norm over every tensor of ``stats`` (in float64)."""
    return math.sqrt(sum(float(stats[k].double().square().sum()) for k in stats))
