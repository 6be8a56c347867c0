"""AdaMerging (Yang et al., ICLR 2024): merging coefficients learned by minimising the merged model's prediction
entropy on unlabeled examples of every task (test-time adaptation; the paper uses the test inputs).

theta = theta_0 + sum_t lambda_t^l tau_t^l with one coefficient per task (task-wise) or per task and merged tensor
(layer-wise, the paper's stronger variant; every parameter tensor is a "layer", as in the authors' code), initialised
at 0.3 and clamped to [0, 1], fitted by :mod:`mergelab.methods.adamerging_module` under ``trainer.fit``. Once
learned, the coefficients merge block by block like any task-vector method, so AWD + AdaMerging is
``method=awd method@method.merge=adamerging`` (AdaMerging over the disentangled vectors).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from torch import Tensor

from mergelab.config_types import Doc, Length, Range, Requires
from mergelab.engine.chunks import Block
from mergelab.io.atomic import atomic_save_figure, atomic_write_json, atomic_write_text
from mergelab.methods.base import TaskVectorMethod
from mergelab.methods.task_statistics import Count, Split, require_task_data

#: A number that is finite (a learned coefficient's start).
Finite = Range(float("-inf"), float("inf"), low_open=True, high_open=True)


class AdaMerging(TaskVectorMethod):
    """Task-wise or layer-wise merging coefficients learned by entropy minimisation on unlabeled examples.

    Args:
        granularity: ``layer`` (one coefficient per task and merged tensor; the paper's layer-wise AdaMerging) or
            ``task`` (one per task).
        init: initial value of every coefficient (0.3, the paper's).
        clamp: [low, high] the coefficients are clamped to in the forward pass ([0, 1], as in the paper); null: none.
        split: the split whose inputs (labels unused) the entropy is measured on: ``test`` as in the paper
            (test-time adaptation); ``validation`` keeps the test split unseen. The report says which was used.
        max_examples: examples of each task used (a seeded subset; null: the whole split).
        steps, lr, betas, batch_size: Adam's settings (the paper: lr 1e-3, betas (0.9, 0.999), batch 16, 500 steps);
            each step takes one batch of every task.
        seed: seed of the subset and of the batch order.
        trainer: extra Lightning Trainer arguments for the fit.
    """

    learns_from_pool = True
    needs_task_data = True
    parallel_chunks = True

    reference = (
        "Yang et al. 2024, AdaMerging: Adaptive Model Merging for Multi-Task Learning, ICLR 2024, arXiv 2310.02575"
    )
    mergekit = "AdaMerging learns its coefficients on task data; MergeKit merges without data"
    requires = (
        Requires(("clamp",), lambda clamp: clamp is None or clamp[0] <= clamp[1], "clamp is [low, high], low <= high"),
    )

    def __init__(
        self,
        granularity: Annotated[
            Literal["layer", "task"], Doc("one coefficient per task and tensor (layer-wise) or per task")
        ] = "layer",
        init: Annotated[float, Finite, Doc("initial value of every coefficient")] = 0.3,
        clamp: Annotated[
            Sequence[float] | None, Length(2), Finite, Doc("[low, high] the coefficients are clamped to; null: none")
        ] = (0.0, 1.0),
        split: Annotated[
            Split,
            Doc("whose unlabeled inputs the entropy is measured on: test (the paper), validation keeps test unseen"),
        ] = "test",
        max_examples: Annotated[int | None, Range(low=1), Doc("examples per task (seeded subset); null: all")] = None,
        steps: Annotated[Count, Doc("Adam steps, each one batch of every task")] = 500,
        lr: Annotated[float, Range(0.0, float("inf"), low_open=True, high_open=True), Doc("Adam's learning rate")] = (
            1e-3
        ),
        betas: Annotated[Sequence[float], Length(2), Range(0.0, 1.0, high_open=True), Doc("Adam's betas")] = (
            0.9,
            0.999,
        ),
        batch_size: Annotated[Count, Doc("examples per task and step")] = 16,
        seed: Annotated[int, Doc("seed of the subset and of the batch order")] = 0,
        trainer: Annotated[Mapping[str, Any] | None, Doc("extra Lightning Trainer arguments for the fit")] = None,
    ) -> None:
        self.granularity = granularity
        self.init = float(init)
        self.clamp = (float(clamp[0]), float(clamp[1])) if clamp is not None else None
        self.split = split
        self.max_examples = None if max_examples is None else int(max_examples)
        self.steps = int(steps)
        self.lr = float(lr)
        self.betas = (float(betas[0]), float(betas[1]))
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.trainer_options = dict(trainer or {})
        self.lambdas: Tensor | None = None
        self.columns: dict[str, int] = {}
        self.entropy: list[float] = []
        self._prepared_for: Any = None

    def prepare(
        self,
        pool: Any,
        trainer_kwargs: Mapping[str, Any] | None = None,
        loggers: Sequence[Any] = (),
        work_dir: str | Path | None = None,
    ) -> None:
        """Learn the coefficients on ``split`` of every task of ``pool`` (once per pool)."""
        if self._prepared_for is pool:
            return
        require_task_data(pool, "adamerging")
        from mergelab.engine.chunks import load_chunk
        from mergelab.methods.adamerging_module import AdaMergingModule, fit_coefficients

        self.task_names = list(pool.tasks)
        with pool.tensor_sources() as src:
            names = list(src.names)
            base, vectors = {}, {}
            for n in names:
                chunk = load_chunk(Block(n, 0, None, None, tuple(src.base.shape(n))), src.base, src.experts)
                base[n] = chunk.base.float()
                vectors[n] = torch.stack([v.float() for v in chunk.vectors])
        batches = [
            pool.task_batches(t, self.split, self.max_examples, self.batch_size, self.seed, shuffle=True)
            for t in self.task_names
        ]
        for t, b in zip(self.task_names, batches, strict=True):
            if not b:
                raise ValueError(f"AdaMerging: split '{self.split}' of task '{t}' has no examples")
        module = AdaMergingModule(
            pool,
            pool.model(None, self.task_names),
            names,
            base,
            vectors,
            self.task_names,
            batches,
            self.granularity == "layer",
            self.init,
            self.clamp,
            self.lr,
            self.betas,
            self.steps,
        )
        self.lambdas = fit_coefficients(module, {**dict(trainer_kwargs or {}), **self.trainer_options}, loggers)
        self.columns = {n: i for i, n in enumerate(names)} if self.granularity == "layer" else {}
        self.entropy = list(module.entropy)
        self._prepared_for = pool

    def coefficient(self, name: str) -> Tensor:
        """The T coefficients of tensor ``name``."""
        if self.lambdas is None:
            raise RuntimeError("AdaMerging: the coefficients are not learned yet; call prepare(pool) first")
        if self.granularity == "task":
            return self.lambdas[:, 0]
        if name not in self.columns:
            raise KeyError(f"AdaMerging: no coefficient was learned for tensor '{name}'")
        return self.lambdas[:, self.columns[name]]

    def merge_chunk(self, block: Block, vectors: Sequence[Tensor]) -> Tensor:
        lam = self.coefficient(block.name)
        out = torch.zeros_like(vectors[0])
        for c, v in zip(lam.tolist(), vectors, strict=True):
            out.add_(v, alpha=c)
        return out

    def report(self) -> dict[str, Any]:
        if self.lambdas is None:
            return {}
        out: dict[str, Any] = {"adamerging_split": self.split, "adamerging_steps": self.steps}
        if self.entropy:
            out["entropy_start"], out["entropy_end"] = self.entropy[0], self.entropy[-1]
        for i in range(self.lambdas.shape[0]):
            out[f"lambda_{self.task_label(i)}"] = float(self.lambdas[i].mean())
        return out

    def save_artifacts(self, out_dir: str | Path) -> None:
        """The coefficients (per task, per tensor), the entropy per step and their plot."""
        if self.lambdas is None:
            return
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        labels = [self.task_label(i) for i in range(self.lambdas.shape[0])]
        coeffs = (
            {n: dict(zip(labels, self.lambdas[:, c].tolist(), strict=True)) for n, c in self.columns.items()}
            if self.columns
            else {"*": dict(zip(labels, self.lambdas[:, 0].tolist(), strict=True))}
        )
        atomic_write_json(out / "adamerging.json", {"report": self.report(), "coefficients": coeffs})
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["step", "entropy"])
        w.writerows(enumerate(self.entropy))
        atomic_write_text(out / "entropy.csv", buf.getvalue())
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
        ax1.plot(self.entropy)
        ax1.set_xlabel("step")
        ax1.set_ylabel("sum over tasks of mean entropy (nats)")
        ax1.set_title(f"AdaMerging on the {self.split} inputs")
        for i, label in enumerate(labels):
            ax2.plot(self.lambdas[i].tolist(), marker="." if self.columns else "o", lw=0.8, label=label)
        ax2.set_xlabel("merged tensor (model order)" if self.columns else "")
        ax2.set_ylabel("lambda")
        ax2.set_title(f"learned coefficients ({self.granularity}-wise)")
        ax2.legend(fontsize=7)
        atomic_save_figure(fig, out / "adamerging")  # in the run's figure_format
        plt.close(fig)
