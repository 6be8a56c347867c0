"""The declared protocol between a task-vector merge method and the pass driver (:mod:`mergelab.engine.passes`).

A method of the form theta_0 + f(tau_1, ..., tau_T) is run as ``stat_passes`` statistics passes over every block
of every merged tensor, then one merge pass. Every hook the driver may call is declared here with its contract,
and the driver calls nothing else, so a method behaves the same in memory, streamed, on one thread or several:

- first, each of :meth:`ChunkMethod.prior_stages` in turn, all of it but its merge pass (its own prior stages,
  ``begin``, its statistics passes), over the same blocks;
- :meth:`ChunkMethod.begin` once, with the merged tensor names;
- per statistics pass ``p``: :meth:`~ChunkMethod.chunk_statistics` per block (on worker threads when the method
  declares ``parallel_chunks``), then :meth:`~ChunkMethod.add_statistics` with that result **in block order** on
  one thread, then :meth:`~ChunkMethod.end_pass`;
- merge pass: :meth:`~ChunkMethod.merge_chunk` per block (worker threads when ``parallel_chunks``).

Optional fast paths are opted into with a mix-in (:class:`FoldsLastPass`). A fast path names the hooks it stands
in for; a subclass that overrides one of those hooks below the class that wrote the fast path does not inherit it
(the driver then runs the plain passes), so overriding ``merge_chunk`` always takes effect, in memory and streamed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

from torch import Tensor

from mergelab.engine.chunks import Block


def _owner(cls: type, attr: str) -> type | None:
    """The class in ``cls``'s MRO that defines ``attr``."""
    return next((k for k in cls.__mro__ if attr in vars(k)), None)


class ChunkMethod(ABC):
    """A method that merges task vectors block by block (see the module docstring for the call order).

    Class attributes:
        stat_passes: statistics passes before the merge pass (instances may set it in ``__init__``).
        elementwise: True when the result at a coordinate depends only on the block it is in; False gives the
            method whole tensors as blocks (e.g. per-tensor top-k).
        parallel_chunks: opt-in: :meth:`chunk_statistics` and :meth:`merge_chunk` are pure functions of their
            arguments and of the state set by :meth:`end_pass` (thread-safe), so the driver may run them on
            several threads. Off by default: the hooks then run on one thread, in block order.
        needs_base: opt-in, for methods defined on the models' weights rather than on task vectors (SLERP,
            Karcher mean): every hook's ``block`` then carries the pretrained rows, ``block.base`` (read-only,
            compute dtype), so theta_t = block.base + tau_t. The chunks hold them anyway, so this costs other
            methods nothing; merging task vectors alone (no pretrained weights) refuses such a method.
    """

    stat_passes: int = 0
    elementwise: bool = True
    parallel_chunks: bool = False
    needs_base: bool = False

    def begin(self, names: Sequence[str]) -> None:  # noqa: B027 - optional hook, nothing to do by default
        """Reset the method's statistics before the first pass over the tensors ``names``."""

    def chunk_statistics(self, pass_idx: int, block: Block, vectors: Sequence[Tensor]) -> Any:
        """What statistics pass ``pass_idx`` takes from one block's task vectors (passed to :meth:`add_statistics`).

        May overwrite ``vectors`` when they are the engine's scratch (``writable``
        :class:`~mergelab.engine.scratch.ChunkVectors`).
        """
        return None

    def add_statistics(self, pass_idx: int, block: Block, stats: Any) -> None:  # noqa: B027 - optional hook
        """Accumulate one block's :meth:`chunk_statistics`; called on one thread, in block order."""

    def end_pass(self, pass_idx: int) -> None:  # noqa: B027 - optional hook
        """Turn the statistics of a finished pass into what the next pass needs."""

    @abstractmethod
    def merge_chunk(self, block: Block, vectors: Sequence[Tensor]) -> Tensor:
        """The merged task vector over ``block``, in the compute dtype, of the block's shape.

        May overwrite (and return) scratch ``vectors``; must not keep references to them.
        """

    def prior_stages(self) -> Sequence[ChunkMethod]:
        """Methods whose statistics passes the driver runs, in this order, before this method's ``begin``: each
        one's ``begin`` and passes, not its merge pass (a :class:`Sparsifier` whose kept entries this method merges,
        so that its ``sparsify_chunk`` is ready). They see the same blocks and vectors; none by default."""
        return ()

    def extra_rows(self, name: str, rows: Sequence[Tensor]) -> Tensor:
        """Rows past the pretrained model's (added tokens), from the experts that have them: their mean.

        ``rows`` holds each such expert's row (there is no pretrained row to form a task vector against).
        """
        out = rows[0].float().clone()
        for r in rows[1:]:
            out.add_(r.float())
        return out.div_(len(rows))


class FoldsLastPass:
    """Opt-in fast path: the method computes its last statistics pass during the merge pass.

    The merge pass then runs :meth:`merge_chunk_folded` instead of :meth:`ChunkMethod.merge_chunk`, and the last
    pass's :meth:`~ChunkMethod.chunk_statistics`; after it, :meth:`folded_values_hold` says, per tensor, whether
    the values written stand, or the corrections it handed over replace them. It stands in for the hooks in
    ``replaces``: a subclass that overrides any of them below the class that defines :meth:`merge_chunk_folded`
    does not fold.
    """

    replaces: ClassVar[tuple[str, ...]] = ("merge_chunk", "chunk_statistics", "add_statistics", "end_pass")

    def fold_last_pass(self, n_tasks: int) -> bool:
        """Whether folding applies to this configuration and number of task vectors."""
        return False

    def merge_chunk_folded(
        self, block: Block, vectors: Sequence[Tensor]
    ) -> tuple[Tensor, Any, tuple[Tensor, Tensor] | None]:
        """The merged block under a provisional statistic, this block's statistic of the folded pass (for
        :meth:`~ChunkMethod.add_statistics`), and ``(flat index, values)`` to use if the provisional one is wrong."""
        raise NotImplementedError

    def folded_values_hold(self, name: str) -> bool:
        """After the folded pass's ``end_pass``: whether the provisional statistic was the right one for tensor
        ``name`` (its corrections are applied where it was not)."""
        raise NotImplementedError


def folds(method: ChunkMethod, n_tasks: int) -> bool:
    """Whether the driver may run ``method``'s folded merge pass (declared, not bypassing an override, applicable)."""
    if not isinstance(method, FoldsLastPass) or method.stat_passes == 0 or not method.parallel_chunks:
        return False
    cls = type(method)
    fast = _owner(cls, "merge_chunk_folded")
    for hook in method.replaces:
        owner = _owner(cls, hook)
        # the hook was overridden in a subclass of the class that wrote the fast path: honour the override
        if fast is not None and owner is not None and owner is not fast and issubclass(owner, fast):
            return False
    return bool(method.fold_last_pass(n_tasks))


class Sparsifier(ChunkMethod):
    """A method that can also hand out each task's kept entries of a block (for methods that reweight them).

    MetaGPT's ``sparsify`` takes any method with this hook: TIES (trimmed, sign-agreeing entries), DARE (dropped
    and rescaled), TALL masks / consensus (masked). What :meth:`sparsify_chunk` needs comes from the sparsifier's
    own statistics passes: a method using one declares it in :meth:`~ChunkMethod.prior_stages`, and the driver
    runs those passes first.
    """

    @abstractmethod
    def sparsify_chunk(self, block: Block, vectors: Sequence[Tensor]) -> Sequence[Tensor]:
        """Each task vector of ``block`` with the entries the method drops set to zero (thread-safe)."""
