"""What the methods that learn from the tasks' examples share (Fisher merging, RegMean, AdaMerging).

They reach the data only through the pool's ``task_data`` interface (:meth:`~mergelab.pools.base.ModelPool.
task_batches`, :meth:`~mergelab.pools.base.ModelPool.task_logits`), so any pool that declares it works. What they
compute per expert and task (Fisher diagonals, Gram matrices) is cached on disk like built experts are, keyed by
the expert, the task's data and the options, and read back lazily tensor by tensor rather than held in memory.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal

import torch
from torch import Tensor

from mergelab.config_types import Range
from mergelab.io.artifacts import check_artifact
from mergelab.io.files import SINGLE_FILE
from mergelab.suites.base import SPLITS

#: Where statistics live under the pool's cache dir.
STATISTICS_DIR = "statistics"

#: Version of how statistics are computed, in their cache key: bump it when a definition changes.
STATISTICS_FORMAT = 2

# Statistics opened in this process, so that the candidates of a grid (and rows sharing them) read them once.
_OPENED: dict[str, Mapping[str, Tensor]] = {}


#: A suite split a method takes its examples from (the option's annotation: its choices).
Split = Literal[SPLITS]

#: A count of at least 1 (examples, steps, a batch size).
Count = Annotated[int, Range(low=1)]


def require_task_data(pool: Any, method: str) -> None:
    """Refuse a pool that cannot hand out its tasks' examples, naming the method and the pool."""
    require = getattr(pool, "require", None)
    if require is None or not getattr(pool, "task_data", False):
        describe = pool.describe() if hasattr(pool, "describe") else type(pool).__name__
        raise ValueError(
            f"method '{method}' learns from the tasks' examples, but {describe} cannot give them (task_data=False)"
        )


def expert_model(pool: Any, i: int) -> torch.nn.Module:
    """Expert ``i`` of ``pool`` (its state as the pool gives it, e.g. transformed by a wrapper) with its task's head,
    in eval mode (dropout off), its backbone's parameters requiring gradients."""
    task = pool.tasks[i]
    model = pool.model(pool.expert_states()[i], [task])
    model.eval()
    for p in model.backbone.parameters():
        p.requires_grad_(True)
    return model


def merged_parameters(pool: Any, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters of ``model.backbone`` that the pool merges, by the names of its state dicts."""
    keys = set(pool.mergeable(pool.pretrained_state()))
    return {n: p for n, p in model.backbone.named_parameters() if n in keys}


def cached_statistics(
    pool: Any, task: str, kind: str, options: Mapping[str, Any], compute: Callable[[], dict[str, Tensor]]
) -> Mapping[str, Tensor]:
    """``compute()`` for ``task``'s expert, cached under ``<cache_dir>/statistics`` when the pool identifies the
    expert and its data (:meth:`~mergelab.pools.base.ModelPool.task_data_key`), and then read lazily from disk.

    ``options`` must hold everything besides the expert and the data that the statistics depend on.
    """
    key = pool.task_data_key(task)
    if key is None:  # e.g. a wrapper's transformed experts: nothing identifies them across runs
        return compute()
    spec = {"format": STATISTICS_FORMAT, "kind": kind, "task": task, "options": dict(options), **key}
    memo = json.dumps(spec, sort_keys=True, default=str)
    if memo in _OPENED:
        return _OPENED[memo]
    from safetensors.torch import save_file

    from mergelab.io.reader import LazyCheckpoint
    from mergelab.training.experts import cached_build

    def build(tmp: Any) -> dict[str, Any]:
        stats = compute()
        save_file({k: v.detach().contiguous() for k, v in stats.items()}, str(tmp / SINGLE_FILE))
        return {"kind": kind, "task": task, "tensors": len(stats)}

    path = cached_build(pool.cache_dir / STATISTICS_DIR, f"{kind}-{task}", json.loads(memo), build)
    stats = LazyCheckpoint(path, name=f"{kind} statistics of task '{task}' ({path})")
    # A cached file is an input like any checkpoint: a damaged or foreign one is refused, never used.
    check_artifact(stats, {n: stats.shape(n) for n in stats}, f"{kind} statistics of task '{task}' ({path})")
    _OPENED[memo] = stats
    return stats
