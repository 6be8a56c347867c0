"""Data-free merging as a Lightning callback: the merge happens when evaluation starts, with no training."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import lightning as L

from mergelab import task_vectors as tv
from mergelab.methods.base import MergeMethod
from mergelab.weight_checks import require_finite_merge

if TYPE_CHECKING:
    from mergelab.pools.base import ModelPool

log = logging.getLogger(__name__)


class MergeCallback(L.Callback):
    """Merge the pool with ``method`` and load the result into the module's ``backbone`` before it is evaluated.

    Works for every ``in_memory`` pool: a classifier's backbone (heads stay per task), a causal LM (the whole model)
    and a CLIP vision tower alike; a pool streamed from disk is refused (it writes its merge, see
    :meth:`mergelab.pools.base.ModelPool.write_merged`).

    MetaGPT and the other closed-form methods need neither data nor gradient steps, so they run here rather
    than as a LightningModule. The merge is computed once; later evaluations reuse it.
    """

    def __init__(self, method: MergeMethod, pool: ModelPool) -> None:
        require = getattr(pool, "require", None)  # a ModelPool declares its capabilities; bare test pools do not
        if require is not None:
            require("in_memory", "merge into a module's backbone (MergeCallback)")
        self.method, self.pool = method, pool
        self.state: tv.StateDict | None = None
        self._loaded: set[int] = set()

    def merged_state(self) -> tv.StateDict:
        """The merged backbone weights (computed on first use)."""
        if self.state is None:
            state = self.method.run(self.pool)
            for name, t in state.items():  # every in-memory merge passes here before it is scored or saved
                require_finite_merge(t, name, self.method)
            self.state = state
            if self.method.report():
                log.info("%s: %s", type(self.method).__name__, self.method.report())
        return self.state

    def _apply(self, pl_module: Any) -> None:
        if id(pl_module) in self._loaded:
            return
        pl_module.backbone.load_state_dict(self.merged_state(), strict=False)
        self._loaded.add(id(pl_module))

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        # Before the strategy wraps the module (FSDP shards it): the full merged weights load as in one process.
        self._apply(pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._apply(pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._apply(pl_module)
