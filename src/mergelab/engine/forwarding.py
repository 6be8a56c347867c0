"""One copy of the forwarding of a :class:`~mergelab.engine.protocol.ChunkMethod`'s statistics passes to another.

Three kinds of object run another method's passes: a wrapper (DARE, AWD: its inner method sees transformed task
vectors), a prior stage seen through a wrapper (:class:`TransformedStage`) and an analysis of a method's
transformation (``reports/analysis.py``). Each names whose passes it runs (:meth:`ForwardsPasses.forwarded_to`)
and how that method sees a block's vectors (:meth:`ForwardsPasses.forwarded_view`); the hooks are written here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from mergelab.engine.chunks import Block
from mergelab.engine.protocol import ChunkMethod

#: How a method sees a block's task vectors (thread-safe; may overwrite scratch vectors).
View = Callable[[Block, Sequence[Tensor]], Sequence[Tensor]]


class ForwardsPasses:
    """Mixin (before :class:`ChunkMethod` in the bases): ``begin``, the statistics hooks and ``prior_stages``
    forwarded to :meth:`forwarded_to`, each block's vectors through :meth:`forwarded_view` first."""

    def forwarded_to(self) -> ChunkMethod | None:
        """The method whose passes run; None: no passes (``begin`` does nothing, no prior stages, and the object
        declares ``stat_passes = 0`` so that no statistics hook is called)."""
        raise NotImplementedError

    def _target(self) -> ChunkMethod:
        target = self.forwarded_to()
        if target is None:
            raise TypeError(f"{type(self).__name__} forwards no statistics passes (stat_passes must be 0)")
        return target

    def forwarded_view(self) -> View | None:
        """How :meth:`forwarded_to` sees a block's vectors; None: as they are."""
        return None

    def _seen(self, block: Block, vectors: Sequence[Tensor]) -> Sequence[Tensor]:
        view = self.forwarded_view()
        return vectors if view is None else view(block, vectors)

    def begin(self, names: Sequence[str]) -> None:
        target = self.forwarded_to()
        if target is not None:
            target.begin(names)

    def chunk_statistics(self, pass_idx: int, block: Block, vectors: Sequence[Tensor]) -> Any:
        return self._target().chunk_statistics(pass_idx, block, self._seen(block, vectors))

    def add_statistics(self, pass_idx: int, block: Block, stats: Any) -> None:
        self._target().add_statistics(pass_idx, block, stats)

    def end_pass(self, pass_idx: int) -> None:
        self._target().end_pass(pass_idx)

    def prior_stages(self) -> Sequence[ChunkMethod]:
        """The forwarded method's prior stages, each seeing the vectors as it does."""
        target, view = self.forwarded_to(), self.forwarded_view()
        stages = target.prior_stages() if target is not None else ()
        return list(stages) if view is None else [TransformedStage(s, view) for s in stages]


class TransformedStage(ForwardsPasses, ChunkMethod):
    """The statistics passes of ``stage`` run on ``view``-ed task vectors (a wrapped method's prior stage sees the
    vectors as the wrapped method does). Only its statistics passes run: it has no merge pass."""

    def __init__(self, stage: ChunkMethod, view: View) -> None:
        self.stage, self.view = stage, view
        self.stat_passes, self.elementwise = stage.stat_passes, stage.elementwise
        self.parallel_chunks = stage.parallel_chunks

    def forwarded_to(self) -> ChunkMethod:
        return self.stage

    def forwarded_view(self) -> View:
        return self.view

    def merge_chunk(self, block: Block, vectors: Sequence[Tensor]) -> Tensor:
        raise TypeError(f"{type(self.stage).__name__} runs here as a prior stage: statistics passes only")
