"""AWD, Adaptive Weight Disentanglement (Xiong et al. 2024): merge tau_t - delta instead of tau_t.

delta is learned by :mod:`mergelab.methods.awd_module` under ``trainer.fit`` (:meth:`AWD.prepare`); the
disentangled vectors then go through any task-vector method (task arithmetic by default), chunk by chunk
through the same engine as every other method, so AWD-TA = TA - scaling * T * delta exactly.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from mergelab import task_vectors as tv
from mergelab.config_types import Doc
from mergelab.engine.chunks import Block, DictSource, load_chunk, read_bounds
from mergelab.io.artifacts import check_artifact
from mergelab.io.atomic import atomic_save_figure, atomic_write_json, atomic_write_text
from mergelab.io.reader import LazyCheckpoint
from mergelab.io.writer import ShardedWriter
from mergelab.methods.awd_fit import (
    FitResult,
    History,
    LearningRate,
    LrRelative,
    MaxBackoffs,
    Momentum,
    Optimizer,
    OptimizerConfig,
    RiseTol,
    Steps,
)
from mergelab.methods.awd_objective import PER_TENSOR_MODE, Alpha, Granularity, Norm, Objective, cosines, mean_abs_cos
from mergelab.methods.base import WrappedMethod

if TYPE_CHECKING:
    from mergelab.pools.base import ModelPool

#: Parameters inside numbered transformer blocks (BERT ``encoder.layer.3.``, Llama ``model.layers.3.``, GPT-2
#: ``h.3.``, ViT/CLIP ``encoder.layers.3.`` / ``blocks.3.``).
DEFAULT_INCLUDE = (r"(^|\.)(layer|layers|h|blocks?)\.\d+\.",)
LAYER_INDEX = re.compile(r"(?:^|\.)(?:layer|layers|h|blocks?)\.(\d+)\.")
DELTA_FILE = "delta.safetensors"
DELTA_DIR = "delta"  # a streaming run's delta: sharded safetensors, written tensor by tensor as it is fitted

# Fitted deltas of this process, so that the candidates of a coefficient grid (and AWD rows that differ only in
# the merge method) fit once. Keyed by the pool's identity and every option that determines delta.
_FITS: dict[tuple[int, str, str], tuple[Any, FitResult]] = {}


class AWD(WrappedMethod):
    """Learn a redundant vector delta shared by all task vectors, then merge tau_t - delta with ``merge``.

    Args:
        merge: the method the disentangled vectors go into: a config node with ``_target_`` (Hydra:
            ``method@method.merge=ties``), the name of a ``conf/method`` YAML, or a method instance; any
            task-vector method, including one added later.
        granularity: ``row`` (cosine per row of each matrix, averaged), ``tensor`` (per matrix) or ``model``
            (one flattened vector); delta's norm follows the same granularity.
        norm: ``l2``, ``l2_squared``, ``l1`` or ``row_l2`` (sum of row L2 norms).
        alpha: weight of the norm term L_R.
        optimizer, lr, momentum, steps: how delta is optimised (``adam`` or ``sgd``), full batch.
        lr_relative: ``lr`` is relative to each tensor's task-vector scale (Adam: times the rms of tau; SGD: times
            its square), so the same lr suits pools whose task vectors differ in size; false: an absolute lr.
        rise_tol, max_backoffs: the fit's guard: an iterate whose loss is not finite or exceeds the best so far by
            more than ``rise_tol`` (relative) is undone (best delta restored, step halved); a tensor (the whole model
            for ``granularity=model``) stops after ``max_backoffs`` back-offs. The best iterate is returned.
        include / exclude: regexes over parameter names that are disentangled; ``matrices_only`` keeps only
            2-D weights. Default: the weight matrices of the transformer blocks (no biases, norms, embeddings).
        mode: ``whole`` (one fit over every tensor) or ``per_tensor`` (one tensor's task vectors in memory at a
            time; needs granularity ``tensor`` or ``row``; same result). Checkpoint (streaming) pools always fit
            tensor by tensor and write delta to disk as it is fitted.
        delta_path: a ``delta.safetensors`` file or ``delta/`` dir saved by an earlier run: reuse it instead of
            fitting.
        score_single_task: also score each theta_0 + tau_t - delta alone on its task (single-task retention).
        trainer: extra Lightning Trainer arguments for the fit (e.g. ``enable_checkpointing: true``).
    """

    reference = "Xiong et al. 2024, Multi-Task Model Merging via Adaptive Weight Disentanglement, arXiv 2411.18729"
    mergekit = "AWD subtracts a learned redundant vector from every task vector; MergeKit has no such method"
    requires = (PER_TENSOR_MODE,)

    def __init__(
        self,
        merge: Annotated[Any, Doc("the method the disentangled vectors go into: a conf/method name or config")] = (
            "task_arithmetic"
        ),
        granularity: Granularity = "row",
        norm: Norm = "l2",
        alpha: Alpha = 0.1,
        optimizer: Optimizer = "adam",
        lr: LearningRate = 0.01,
        momentum: Momentum = 0.0,
        steps: Steps = 300,
        lr_relative: LrRelative = True,
        rise_tol: RiseTol = 1e-3,
        max_backoffs: MaxBackoffs = 10,
        include: Annotated[Sequence[str], Doc("regexes of the parameters disentangled")] = DEFAULT_INCLUDE,
        exclude: Annotated[Sequence[str], Doc("regexes of parameters left out")] = (),
        matrices_only: Annotated[bool, Doc("only 2-D weights")] = True,
        mode: Annotated[
            Literal["whole", "per_tensor"],
            Doc("one fit, or one tensor's task vectors in memory at a time (row/tensor granularity)"),
        ] = "whole",
        delta_path: Annotated[
            str | None, Doc("reuse a delta.safetensors (or a streaming run's delta/ dir) instead of fitting")
        ] = None,
        score_single_task: Annotated[bool, Doc("also score each theta_0 + tau_t - delta on its task")] = True,
        trainer: Annotated[
            Mapping[str, Any] | None, Doc("extra Trainer arguments for the fit, e.g. {enable_checkpointing: true}")
        ] = None,
    ) -> None:
        super().__init__(merge, "merge")
        self.objective = Objective(granularity, norm, float(alpha))
        self.optim = OptimizerConfig(
            optimizer, float(lr), float(momentum), int(steps), bool(lr_relative), float(rise_tol), int(max_backoffs)
        )
        self.mode = mode
        self.include = [re.compile(p) for p in include]
        self.exclude = [re.compile(p) for p in exclude]
        self.matrices_only = bool(matrices_only)
        self.score_single_task = bool(score_single_task)
        self.trainer_options = dict(trainer or {})
        self.fit: FitResult | None = None
        #: The delta file given as ``delta_path`` until it is checked against the pool (in :meth:`prepare_wrapper`).
        self.unchecked_delta: Path | None = None
        if delta_path is not None:
            path = Path(delta_path)
            if path.is_dir():
                delta: Mapping[str, Tensor] = LazyCheckpoint(path, name=f"method option 'delta_path' ({path})")
            elif path.is_file():
                delta = load_file(str(path))
            else:
                raise FileNotFoundError(f"method option 'delta_path': no file or dir {path}")
            self.fit = FitResult(delta, History(), torch.zeros(0), torch.zeros(0))
            self.unchecked_delta = path

    # ------------------------------------------------------------------------------------------- fitting

    def disentangles(self, name: str, shape: Sequence[int]) -> bool:
        """Whether ``name`` gets a delta: matched by ``include``, not by ``exclude``, 2-D if ``matrices_only``."""
        if self.matrices_only and len(shape) != 2:
            return False
        return any(p.search(name) for p in self.include) and not any(p.search(name) for p in self.exclude)

    def fit_signature(self) -> str:
        """Everything that determines delta, as a string key."""
        return json.dumps(
            {
                "objective": [self.objective.granularity, self.objective.norm, self.objective.alpha],
                "optim": [
                    self.optim.optimizer,
                    self.optim.lr,
                    self.optim.momentum,
                    self.optim.steps,
                    self.optim.lr_relative,
                    self.optim.rise_tol,
                    self.optim.max_backoffs,
                ],
                "include": [p.pattern for p in self.include],
                "exclude": [p.pattern for p in self.exclude],
                "matrices_only": self.matrices_only,
            }
        )

    def prepare_wrapper(
        self,
        pool: ModelPool,
        trainer_kwargs: Mapping[str, Any] | None = None,
        loggers: Sequence[Any] = (),
        work_dir: str | Path | None = None,
    ) -> None:
        """Fit delta on the pool's task vectors (once per pool and fit options in this process); ``prepare`` then
        prepares the inner method on the disentangled experts when it learns from the pool.

        The task vectors come from the pool's tensor sources. A pool that is not held in memory (a checkpoint pool) is
        fitted tensor by tensor from its files and delta is written to ``work_dir/delta`` as it is fitted, so memory
        holds one tensor's task vectors whatever the model's size.
        """
        if self.fit is not None:
            if self.unchecked_delta is not None:
                self.check_loaded_delta(pool)
            return
        trainer_kwargs = {**dict(trainer_kwargs or {}), **self.trainer_options}
        # The trainer's settings (precision, devices, ...) are inputs of the fit like its options.
        key = (id(pool), self.fit_signature(), json.dumps(trainer_kwargs, sort_keys=True, default=str))
        if key in _FITS and _FITS[key][0] is pool:
            self.fit = _FITS[key][1]
            return
        with pool.tensor_sources() as src:
            names = [n for n in src.names if self.disentangles(n, src.base.shape(n))]
            if not names:
                raise ValueError(
                    f"method options include={[p.pattern for p in self.include]} / exclude / matrices_only select "
                    f"no tensor of {src.label} to disentangle"
                )
            shapes = {n: tuple(src.base.shape(n)) for n in names}

            def task_vectors(name: str) -> Tensor:
                return torch.stack(
                    list(load_chunk(Block(name, 0, None, None, shapes[name]), src.base, src.experts).vectors)
                )

            from mergelab.methods.awd_module import fit_delta  # Lightning, only when a fit runs

            fit = functools.partial(fit_delta, names, shapes, task_vectors, self.objective, self.optim, trainer_kwargs)
            if pool.in_memory:
                self.fit = fit(per_tensor=self.mode == "per_tensor", loggers=loggers)
            else:
                self.fit = self._fit_to_disk(fit, names, shapes, loggers, work_dir)
        _FITS[key] = (pool, self.fit)

    def check_loaded_delta(self, pool: ModelPool) -> None:
        """Refuse a ``delta_path`` delta that is not one for this pool: its tensors must be exactly those the options
        select (``include``/``exclude``/``matrices_only``) in the pool, with their shapes, finite. A delta of
        another model would otherwise leave every tensor unchanged and the row would be task arithmetic labelled AWD."""
        assert self.fit is not None and self.unchecked_delta is not None
        with pool.tensor_sources() as src:
            expected = {n: tuple(src.base.shape(n)) for n in src.names if self.disentangles(n, src.base.shape(n))}
        label = f"method option 'delta_path' ({self.unchecked_delta})"
        check_artifact(self.fit.delta, expected, label, "tensor this AWD disentangles in the pool")
        self.unchecked_delta = None

    def _fit_to_disk(
        self,
        fit: Any,
        names: Sequence[str],
        shapes: Mapping[str, tuple[int, ...]],
        loggers: Sequence[Any],
        work_dir: str | Path | None,
    ) -> FitResult:
        """``fit`` tensor by tensor (a pool larger than memory), writing delta to ``work_dir/delta`` as it goes."""
        if self.objective.granularity == "model":
            raise ValueError(
                "method option 'granularity=model' couples every tensor, so it needs all task vectors in memory; "
                "a checkpoint pool fits tensor by tensor: use granularity 'row' or 'tensor'"
            )
        if work_dir is None:
            raise ValueError("AWD on a checkpoint pool needs a work_dir to write delta into")
        delta_dir = Path(work_dir) / DELTA_DIR
        # The run's output dir is already guarded against overwriting; this is a fresh subdir of it.
        writer = ShardedWriter(delta_dir, [(n, shapes[n], torch.float32) for n in names], overwrite=True)
        try:
            result = fit(per_tensor=True, loggers=loggers, sink=writer.add)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        result.delta = LazyCheckpoint(delta_dir, name="AWD delta")
        return result

    @property
    def delta(self) -> Mapping[str, Tensor]:
        """The learned redundant vector (parameter name -> tensor; read from disk after a streaming fit)."""
        if self.fit is None:
            raise RuntimeError("AWD: delta is not fitted yet; call prepare(pool) first")
        return self.fit.delta

    # ------------------------------------------------------------------------------------------- merging

    def transform(self, block: Block, vectors: Sequence[Tensor]) -> Sequence[Tensor]:
        """tau_t - delta over ``block`` (tensors without a delta pass unchanged); thread-safe."""
        delta = self.delta_source
        if block.name not in delta:
            return vectors
        d = delta.get_rows(block.name, *read_bounds(block.shape, block.start, block.stop))
        return [v - d for v in vectors]

    @property
    def delta_source(self) -> Any:
        """delta as a :class:`~mergelab.engine.chunks.TensorSource` (a checkpoint on disk already is one)."""
        delta = self.delta
        return delta if isinstance(delta, LazyCheckpoint) else DictSource(delta)

    def single_task_states(self, pool: ModelPool) -> dict[str, tv.StateDict]:
        """theta_0 + (tau_t - delta) for each task, i.e. each expert with delta removed (when enabled)."""
        if not self.score_single_task:
            return {}
        out = {}
        delta = self.delta
        for task, state in zip(pool.tasks, pool.expert_states(), strict=True):
            out[task] = {n: (v.to(torch.float32) - delta[n]).to(v.dtype) if n in delta else v for n, v in state.items()}
        return out

    # ------------------------------------------------------------------------------------------- reports

    def report(self) -> dict[str, Any]:
        out = dict(self.inner.report())
        if self.fit is None or not self.fit.history.L_O:
            return out
        h = self.fit.history
        # The _end terms are those of the returned (saved, merged) delta: each group's best iterate, evaluated
        # after the fit, not the last history row (which may be a rejected iterate).
        final = self.fit.final or {"L_O": h.L_O[-1], "L_R": h.L_R[-1]}
        out.update(
            {
                "L_O_start": h.L_O[0],
                "L_O_end": final["L_O"],
                "L_R_end": final["L_R"],
                "mean_abs_cos_before": float(mean_abs_cos(self.fit.gram_before)),
                "mean_abs_cos_after": float(mean_abs_cos(self.fit.gram_after)),
                "delta_norm": sum(self.fit.sq_norms.values()) ** 0.5,
                **{f"guard_{k}": v for k, v in self.fit.guard_report().items()},
            }
        )
        return out

    def delta_norms_per_layer(self) -> dict[int, float]:
        """L2 norm of a fitted delta over each transformer block's parameters (from the norms taken at fit time)."""
        sq: dict[int, float] = {}
        assert self.fit is not None
        for name, value in self.fit.sq_norms.items():
            m = LAYER_INDEX.search(name)
            if m is not None:
                sq[int(m.group(1))] = sq.get(int(m.group(1)), 0.0) + value
        return {k: v**0.5 for k, v in sorted(sq.items())}

    def save_artifacts(self, out_dir: str | Path) -> None:
        """delta (reloadable with ``delta_path``), the per-step losses, a summary and the plots."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if not isinstance(self.delta, LazyCheckpoint):  # a streaming fit wrote it to out_dir/delta already
            tmp = out / f".{DELTA_FILE}.tmp"
            save_file({n: d.contiguous() for n, d in self.delta.items()}, str(tmp))
            tmp.replace(out / DELTA_FILE)
        assert self.fit is not None
        if not self.fit.history.L_O:  # delta loaded from delta_path: nothing was fitted here
            return
        records = list(self.fit.history.rows(self.objective.alpha))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["step", *records[0]])
        w.writeheader()
        w.writerows({"step": i, **r} for i, r in enumerate(records))
        atomic_write_text(out / "history.csv", buf.getvalue())
        atomic_write_json(
            out / "awd.json",
            {
                "report": self.report(),
                "delta_norm_per_layer": self.delta_norms_per_layer(),
                # Per group (tensor, or the model): best step, back-offs, the step it stopped at (null: it did not).
                "guard": [
                    {**dataclasses.asdict(g), "best": g.best if math.isfinite(g.best) else None} for g in self.fit.guard
                ],
                "cosine_before": cosines(self.fit.gram_before).tolist(),
                "cosine_after": cosines(self.fit.gram_after).tolist(),
                "task_names": self.task_names,
            },
        )
        self._plot(out, records)

    def _plot(self, out: Path, records: list[dict[str, float]]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels = [self.task_label(i) for i in range(self.fit.gram_before.shape[0])] if self.fit else []
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
        for ax, gram, title in zip(
            axes,
            (self.fit.gram_before, self.fit.gram_after),
            ("task vectors", "disentangled (tau - delta)"),
            strict=True,
        ):
            cos = cosines(gram).numpy()
            im = ax.imshow(cos, vmin=-1, vmax=1, cmap="RdBu_r")
            ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
            ax.set_yticks(range(len(labels)), labels, fontsize=8)
            for i in range(len(labels)):
                for j in range(len(labels)):
                    ax.text(j, i, f"{cos[i, j]:.2f}", ha="center", va="center", fontsize=7)
            ax.set_title(f"cosine similarity: {title}")
        fig.colorbar(im, ax=axes, shrink=0.8)
        atomic_save_figure(fig, out / "cosine_before_after")  # in the run's figure_format
        plt.close(fig)

        norms = self.delta_norms_per_layer()
        alpha = self.objective.alpha
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
        ax1.bar([str(k) for k in norms], list(norms.values()))
        ax1.set_xlabel("transformer block")
        ax1.set_ylabel("||delta||_2")
        ax1.set_title("norm of delta per layer")
        # The loss and its weighted terms share the left axis (they add up); L_R unweighted has its own scale.
        ax2.plot([r["loss"] for r in records], color="black", label=f"loss = L_O + {alpha:g}·L_R")
        ax2.plot([r["L_O"] for r in records], color="tab:blue", label="L_O (mean |cos|)")
        ax2.plot([alpha * r["L_R"] for r in records], color="tab:red", ls="--", label=f"{alpha:g}·L_R")
        ax2.plot([r["mean_abs_cos"] for r in records], color="tab:green", label="model-level mean |cos|")
        ax2.set_xlabel("step")
        ax2.set_ylabel("loss terms")
        ax2b = ax2.twinx()
        ax2b.plot([r["L_R"] for r in records], color="tab:red", alpha=0.5, label="L_R (right axis)")
        ax2b.set_ylabel("L_R")
        # One legend for both axes, below the panel: inside, five entries would hide the curves.
        lines = ax2.get_lines() + ax2b.get_lines()
        ax2b.legend(
            lines,
            [line.get_label() for line in lines],
            loc="upper center",
            bbox_to_anchor=(0.5, -0.15),
            ncol=3,
            fontsize=8,
        )
        ax2.set_title("AWD optimisation")
        atomic_save_figure(fig, out / "delta_norms_and_losses")
        plt.close(fig)
