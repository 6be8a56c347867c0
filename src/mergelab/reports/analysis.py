"""Task-vector analysis of any pool, before and after a method's transformation (``mergelab-analyze``).

For the task vectors tau_t = theta_t - theta_0 of a pool's merged tensors, :func:`analyze_pool` computes

- the pairwise cosine matrix over all merged parameters (dot products and squared norms accumulated in float64);
- the L2 norm of each task vector per layer (the transformer block index in the parameter name, else ``other``);
- sign conflicts per layer: for each pair, the share of coordinates where both are nonzero with opposite signs;
  and, as TIES defines a conflict, the share of coordinates where some nonzero tau_t has the sign opposite to the
  elected sign of sum_t tau_t (equivalently: the nonzero entries there have both signs);

and, given a method that changes the vectors before combining them, the same statistics of the vectors it keeps:
``sparsify_chunk`` of a :class:`~mergelab.engine.protocol.Sparsifier` (TIES: trimmed and sign-agreeing; DARE:
dropped and rescaled; consensus: masked) or of any :class:`~mergelab.methods.base.WrappedMethod` (its
``transform``, e.g. AWD's tau - delta, then its inner method's sparsification when that is a Sparsifier), after
``prepare(pool, ...)`` and the method's own statistics passes, exactly as a merge would run them.

Everything runs through the pass driver (:func:`mergelab.engine.passes.run_passes`) over the pool's
``tensor_sources()``: in memory, or a checkpoint pool read row block by row block from disk, so memory holds one
block of task vectors at a time whatever the model's size.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from mergelab.engine.chunks import DEFAULT_CHUNK_ELEMS, Block
from mergelab.engine.forwarding import ForwardsPasses
from mergelab.engine.passes import SequentialExecutor, method_blocks, run_passes
from mergelab.engine.protocol import ChunkMethod, Sparsifier
from mergelab.engine.scratch import release_workspace
from mergelab.io.atomic import FIGURE_FORMATS, atomic_save_figure, atomic_write_json, guard_output_dir
from mergelab.io.atomic import figure_format as figures_in
from mergelab.methods.awd import LAYER_INDEX
from mergelab.methods.awd_objective import cosines, tau_gram
from mergelab.methods.base import MergeMethod, WrappedMethod

log = logging.getLogger(__name__)

ANALYSIS_FILE = "analysis.json"
#: Plot file stems (``<stem>.<analysis.figure_format>``).
PLOTS = ("cosine", "layer_norms", "sign_conflicts")
#: Every name an analysis writes into its output dir: one present means a finished (or partial) analysis there.
OUTPUT_NAMES = (ANALYSIS_FILE, *(f"{p}.{f}" for p in PLOTS for f in FIGURE_FORMATS))
OTHER = "other"

#: Columns of a block handled at once: float64 copies stay small whatever the block (a whole embedding matrix for
#: methods that are not elementwise), and products of signs summed in float32 count exactly (< 2**24).
SLICE_ELEMS = 1 << 20

#: Heatmaps with more tasks than this are not annotated (the labels would overlap).
MAX_ANNOTATED = 16


def layer_of(name: str) -> str:
    """The transformer block index in a parameter name (``model.layers.3.`` -> ``"3"``), else ``"other"``."""
    m = LAYER_INDEX.search(name)
    return str(int(m.group(1))) if m is not None else OTHER


def layer_order(layers: Sequence[str]) -> list[str]:
    """Block indices in numeric order, ``other`` last."""
    return sorted(layers, key=lambda k: (k == OTHER, int(k) if k != OTHER else 0))


@dataclass
class Counts:
    """Sums over a set of coordinates: Gram matrix (float64), sign-conflict and overlap counts, elected conflicts."""

    n_tasks: int
    numel: int = 0
    gram: Tensor = field(init=False)
    conflicts: Tensor = field(init=False)  # [T, T]: both nonzero, opposite signs
    overlap: Tensor = field(init=False)  # [T, T]: both nonzero (diagonal: nonzero entries of each)
    elected: float = 0.0  # coordinates where a nonzero entry's sign differs from the sign of the sum

    def __post_init__(self) -> None:
        self.gram, self.conflicts, self.overlap = (
            torch.zeros(self.n_tasks, self.n_tasks, dtype=torch.float64) for _ in range(3)
        )

    def add(self, other: Counts) -> None:
        """Add the sums of ``other`` (disjoint coordinates)."""
        self.numel += other.numel
        self.gram += other.gram
        self.conflicts += other.conflicts
        self.overlap += other.overlap
        self.elected += other.elected


def block_counts(vectors: Sequence[Tensor]) -> Counts:
    """The :class:`Counts` of one block's task vectors (one per task, same shape), a column slice at a time."""
    flat = torch.stack([v.detach().reshape(-1) for v in vectors])
    out = Counts(flat.shape[0], flat.shape[1])
    for s in range(0, flat.shape[1], SLICE_ELEMS):
        x = flat[:, s : s + SLICE_ELEMS]
        out.gram += tau_gram(x.to(torch.float64), rowwise=False)
        sign = x.sign()  # -1, 0, 1: products of signs count (exactly, in float32) agreements minus conflicts
        nonzero = sign.abs()
        both = (nonzero @ nonzero.T).to(torch.float64)
        out.overlap += both
        out.conflicts += (both - (sign @ sign.T).to(torch.float64)) / 2
        # Both signs among the nonzero entries: whatever sign is elected, some nonzero entry disagrees with it
        # (a sum of zero with nonzero entries has both signs too); with one sign the sum has that sign.
        low, high = torch.aminmax(x, dim=0)
        out.elected += float(((low < 0) & (high > 0)).sum())
    return out


def share(x: float | Tensor, numel: int) -> Any:
    """``x / numel`` as floats (nested lists for a matrix); None for an empty set of coordinates."""
    if numel == 0:
        return None
    return (x / numel).tolist() if isinstance(x, Tensor) else x / numel


def mean_off_diagonal(m: Tensor) -> float | None:
    """Mean over pairs i < j of a symmetric matrix (None with a single task)."""
    n = m.shape[0]
    if n < 2:
        return None
    i, j = torch.triu_indices(n, n, offset=1)
    return float(m[i, j].mean())


class StageStatistics:
    """The statistics of one stage (the task vectors, or a method's transformed ones), accumulated block by block in
    block order (deterministic: the same sums for the same blocks)."""

    def __init__(self, n_tasks: int) -> None:
        self.total = Counts(n_tasks)
        self.layers: dict[str, Counts] = {}

    def add(self, block: Block, vectors: Sequence[Tensor]) -> None:
        """Add one block's task vectors."""
        counts = block_counts(vectors)
        self.total.add(counts)
        self.layers.setdefault(layer_of(block.name), Counts(counts.n_tasks)).add(counts)

    def summary(self) -> dict[str, Any]:
        """The stage as JSON-ready numbers (see :func:`analyze_pool`)."""
        groups = {"all": self.total, **{k: self.layers[k] for k in layer_order(list(self.layers))}}
        return {
            "cosine": cosines(self.total.gram).tolist(),
            "norm": self.total.gram.diagonal().sqrt().tolist(),
            "layer_norms": {k: c.gram.diagonal().sqrt().tolist() for k, c in groups.items() if k != "all"},
            "sign_conflict": {
                k: {
                    "pairwise": share(c.conflicts, c.numel),
                    "mean_pairwise": mean_off_diagonal(c.conflicts / c.numel) if c.numel else None,
                    "overlap": share(c.overlap, c.numel),
                    "elected": share(c.elected, c.numel),
                }
                for k, c in groups.items()
            },
        }


def transformation(method: MergeMethod | None) -> Callable[[Block, Sequence[Tensor]], Sequence[Tensor]] | None:
    """What ``method`` makes of a block's task vectors before combining them, or None when it combines them as they
    are (or not block by block): ``sparsify_chunk`` of a Sparsifier or of any WrappedMethod."""
    if isinstance(method, Sparsifier | WrappedMethod):
        return method.sparsify_chunk
    return None


class _Analysis(ForwardsPasses, ChunkMethod):
    """The pass driver's view of an analysis: ``method``'s statistics passes (when it transforms), then a last pass
    whose "merge" of each block adds its task vectors (and their transformation) to the statistics.

    Sequential (``parallel_chunks`` False), so the statistics are added in block order."""

    parallel_chunks = False

    def __init__(self, n_tasks: int, method: Any) -> None:
        self.method, self.transform = method, transformation(method)
        self.stat_passes = method.stat_passes if self.transform is not None else 0
        self.elementwise = bool(getattr(method, "elementwise", True))
        self.needs_base = self.transform is not None and bool(getattr(method, "needs_base", False))
        self.before = StageStatistics(n_tasks)
        self.after = StageStatistics(n_tasks) if self.transform is not None else None

    def forwarded_to(self) -> ChunkMethod | None:
        """The method's own passes when it transforms the vectors (its hooks see them as they come), else none."""
        return self.method if self.transform is not None else None

    def merge_chunk(self, block: Block, vectors: Sequence[Tensor]) -> Tensor:
        self.before.add(block, vectors)  # first: a transformation may overwrite the vectors
        if self.transform is not None and self.after is not None:
            self.after.add(block, self.transform(block, vectors))
        return torch.empty(0)


def analyze_pool(
    pool: Any,
    method: MergeMethod | None = None,
    trainer_kwargs: Mapping[str, Any] | None = None,
    work_dir: str | Path | None = None,
    chunk_elems: int | None = None,
) -> dict[str, Any]:
    """The statistics of a (set-up) pool's task vectors, and of ``method``'s transformation of them.

    ``method`` is prepared on the pool first (AWD fits delta; ``trainer_kwargs`` and ``work_dir`` as in a run) when
    it transforms the vectors (:func:`transformation`); otherwise only the task vectors are analysed. Blocks are
    those the method's merge would see (``chunk_elems``: the pool's, else the engine's default).

    Returns ``{"tasks", "pool", "tensors", "layers": {layer: {"tensors", "numel"}}, "before": stage, "after": stage
    or None}``; a stage is ``{"cosine": [T][T], "norm": [T], "layer_norms": {layer: [T]}, "sign_conflict":
    {"all" | layer: {"pairwise": [T][T], "mean_pairwise", "overlap": [T][T], "elected"}}}``, conflict and overlap
    numbers being shares of the layer's coordinates (``overlap``'s diagonal: each vector's nonzero share).
    """
    tasks = list(pool.tasks)
    if transformation(method) is not None:
        assert method is not None
        method.prepare(pool, trainer_kwargs or {}, [], work_dir=work_dir)
        method.task_names = tasks
    chunk_elems = int(chunk_elems or getattr(pool, "chunk_elems", None) or DEFAULT_CHUNK_ELEMS)
    with pool.tensor_sources() as src:
        if len(src.experts) != len(tasks):
            raise ValueError(f"model: {src.label} gave {len(src.experts)} experts for tasks {tasks}")
        shapes = {n: tuple(src.base.shape(n)) for n in src.names}
        analysis = _Analysis(len(tasks), method)
        blocks = method_blocks(analysis, src.names, shapes, chunk_elems)
        try:
            for _ in run_passes(analysis, blocks, SequentialExecutor(src.base, src.experts)):
                pass
        finally:
            release_workspace()
        label = src.label
    layers: dict[str, dict[str, int]] = {}
    for n, shape in shapes.items():
        entry = layers.setdefault(layer_of(n), {"tensors": 0, "numel": 0})
        entry["tensors"] += 1
        entry["numel"] += math.prod(shape)
    return {
        "tasks": tasks,
        "pool": label,
        "tensors": len(shapes),
        "layers": {k: layers[k] for k in layer_order(list(layers))},
        "before": analysis.before.summary(),
        "after": analysis.after.summary() if analysis.after is not None else None,
    }


# ----------------------------------------------------------------------------------------------- plots


def _heatmap(ax: Any, matrix: Sequence[Sequence[float]], labels: Sequence[str], title: str) -> Any:
    """An annotated cosine heatmap on ``ax`` (values in [-1, 1]); returns the image for a colour bar."""
    n = len(labels)
    values = torch.tensor(matrix, dtype=torch.float64).numpy()
    im = ax.imshow(values, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(n), labels, rotation=45, ha="right", fontsize=9)
    ax.set_yticks(range(n), labels, fontsize=9)
    if n <= MAX_ANNOTATED:
        size = 10 if n <= 6 else 8 if n <= 10 else 6
        for i in range(n):
            for j in range(n):
                v = values[i, j]
                # dark cells get white text: readable on both ends of the colour map
                ax.text(
                    j,
                    i,
                    f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=size,
                    color="white" if abs(v) > 0.6 else "black",
                )
    ax.set_title(title, fontsize=10)
    return im


def _log_scale_if_spread(ax: Any, values: Sequence[float]) -> None:
    """A log y axis when the positive values span more than two orders of magnitude (embeddings vs blocks)."""
    pos = [v for v in values if v is not None and v > 0]
    if pos and max(pos) / min(pos) > 100:
        ax.set_yscale("log")


def plot_analysis(result: Mapping[str, Any], out_dir: Path, figure_format: str, after_label: str = "after") -> None:
    """The cosine heatmaps (before/after), per-layer norms and sign-conflict rates of an :func:`analyze_pool` result,
    written atomically as ``<plot>.<figure_format>`` into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    tasks, before, after = list(result["tasks"]), result["before"], result["after"]
    stages = [("task vectors", before, "-")] + ([(after_label, after, "--")] if after is not None else [])
    side = max(4.5, 0.55 * len(tasks) + 2.5)

    fig, axes = plt.subplots(1, len(stages), figsize=(side * len(stages) + 1, side), squeeze=False)
    for ax, (title, stage, _) in zip(axes[0], stages, strict=True):
        im = _heatmap(ax, stage["cosine"], tasks, f"cosine similarity: {title}")
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8)
    atomic_save_figure(fig, out_dir / f"cosine.{figure_format}")
    plt.close(fig)

    layers = list(before["layer_norms"])
    xs = list(range(len(layers)))  # positions, labelled with the layers (no categorical axis: "10" < "2")
    width = max(6.0, 0.45 * len(layers) + 3)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ax = plt.subplots(figsize=(width, 4.2))
    for title, stage, style in stages:
        for t, task in enumerate(tasks):
            ys = [stage["layer_norms"][k][t] for k in layers]
            label = task if title == "task vectors" else f"{task} ({title})"
            ax.plot(xs, ys, style, marker="o", ms=4, color=colors[t % len(colors)], label=label)
    _log_scale_if_spread(ax, [v for _, s, _ in stages for k in layers for v in s["layer_norms"][k]])
    _save_per_layer(
        fig,
        ax,
        xs,
        layers,
        "L2 norm of the task vector",
        "task-vector norm per layer",
        out_dir / f"layer_norms.{figure_format}",
    )

    fig, ax = plt.subplots(figsize=(width, 4.2))
    for title, stage, style in stages:
        conflict = stage["sign_conflict"]
        suffix = "" if title == "task vectors" else f" ({title})"
        if len(tasks) > 1:
            ys = [conflict[k]["mean_pairwise"] for k in layers]
            ax.plot(xs, ys, style, marker="o", ms=4, color=colors[0], label=f"pairwise, mean over pairs{suffix}")
        ys = [conflict[k]["elected"] for k in layers]
        ax.plot(xs, ys, style, marker="s", ms=4, color=colors[1], label=f"vs elected sign (TIES){suffix}")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylim(bottom=0)
    _save_per_layer(
        fig,
        ax,
        xs,
        layers,
        "share of coordinates",
        "sign conflicts per layer",
        out_dir / f"sign_conflicts.{figure_format}",
    )


def _save_per_layer(fig: Any, ax: Any, xs: Any, layers: Any, ylabel: str, title: str, path: Path) -> None:
    """The axes every per-layer plot shares (blocks on x, legend outside), then write and close the figure."""
    import matplotlib.pyplot as plt

    ax.set_xticks(xs, layers)
    ax.set_xlabel("transformer block")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    atomic_save_figure(fig, path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- the command


def figure_format_of(cfg: DictConfig) -> str:
    """``analysis.figure_format`` (png when the config has no ``analysis`` node), checked."""
    fmt = str((cfg.get("analysis") or {}).get("figure_format", "png")).lower()
    if fmt not in FIGURE_FORMATS:
        raise ValueError(f"analysis.figure_format must be one of {FIGURE_FORMATS}, got {fmt!r}")
    return fmt


def analyze(cfg: DictConfig) -> dict[str, Any]:
    """``mergelab-analyze``: build the pool (and method) the config describes, analyse it, write the results.

    Writes ``analysis.json`` (:func:`analyze_pool`'s result plus the method and the overrides) last, after the plots,
    into ``paths.output_dir``; refuses a dir holding an earlier analysis unless ``overwrite=true``. Every check of the
    config runs before the pool is loaded. Returns what ``analysis.json`` holds.
    """
    from mergelab.method_config import resolving_against
    from mergelab.pools.base import check_pool
    from mergelab.run import build, method_candidates, quiet_libraries, seed_everything
    from mergelab.training.distributed import multi_process

    quiet_libraries()
    out_dir = Path(str(cfg.paths.output_dir))
    figure_format = figure_format_of(cfg)
    if cfg.get("table"):
        raise ValueError("table: mergelab-analyze analyses one method (method=...), not a table of them")
    if cfg.get("tune"):
        raise ValueError(
            "tune=true: mergelab-analyze scores nothing to tune on; set the method's options instead (e.g. method.k=30)"
        )
    if multi_process(cfg.trainer):
        raise ValueError(
            f"trainer: devices={cfg.trainer.get('devices')}: an analysis runs in one process; use trainer=cpu or "
            "trainer=gpu"
        )
    method: MergeMethod | None = None
    name, options = None, {}
    if cfg.get("method"):
        with resolving_against(cfg):  # methods named inside it resolve ${seed} against this config, as runs do
            ((options, method),) = method_candidates(cfg.method, tune=False)
        name = str(cfg.method.get("name") or type(method).__name__)
    transforms = transformation(method) is not None
    # What the method learns (AWD's delta) goes beside the analysis, not over a run's artifacts/<name> in the same dir.
    artifacts = f"artifacts/analysis-{name}"
    learns = transforms and method is not None and method.learns_from_pool
    guard_output_dir(out_dir, bool(cfg.get("overwrite")), [*OUTPUT_NAMES, *([artifacts] if learns else [])])

    seed_everything(int(cfg.seed))
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    pool = check_pool(build(cfg.model))
    if transforms:
        pool.check_method(method, f"method '{name}'")
    elif method is not None:
        log.info("method '%s' combines the task vectors as they are: only their own statistics are analysed", name)
    suite = build(cfg.eval) if pool.needs_suite and cfg.get("eval") else None  # a pool may need it for its experts
    pool.check_suite(suite)
    pool.setup(suite, trainer_kwargs)
    result = analyze_pool(pool, method if transforms else None, trainer_kwargs, work_dir=out_dir / artifacts)
    record = {
        "method": None
        if method is None
        else {
            "name": name,
            "options": options,
            "transform": f"{type(method).__name__}.sparsify_chunk" if transforms else None,
            "report": method.report() if transforms else {},
        },
        **result,
        "overrides": list(cfg.get("overrides") or []),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    # Methods save their own plots (AWD's cosine_before_after, delta_norms_and_losses) in the format in force, as in
    # a run: without this block they would be png whatever analysis.figure_format says.
    with figures_in(figure_format):
        plot_analysis(record, out_dir, figure_format, after_label=f"after {name}")
        if learns:
            assert method is not None
            method.save_artifacts(out_dir / artifacts)  # e.g. AWD's delta: reusable with method.delta_path
    atomic_write_json(out_dir / ANALYSIS_FILE, record)  # last: marks a finished analysis
    log.info("analysis of %d task vectors (%s) in %s", len(result["tasks"]), name or "no method", out_dir)
    return record
