"""The pass driver: one loop runs a method's statistics passes and its merge pass, on one of two executors.

:class:`SequentialExecutor` forms each chunk on the calling thread from any :class:`TensorSource` (state dicts,
checkpoints, ready task vectors); :class:`~mergelab.engine.pipeline.ChunkPipeline` reads checkpoints ahead on
threads and runs the method's per-chunk hooks on workers. Both hand chunks to :func:`run_passes` in block order,
and what is accumulated across blocks is accumulated in that order, so both give the same bytes. The hooks called
are exactly those declared by :class:`mergelab.engine.protocol.ChunkMethod`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mergelab.engine.chunks import (
    DEFAULT_CHUNK_ELEMS,
    Block,
    Chunk,
    DictSource,
    TensorSource,
    load_chunk,
    plan_blocks,
    vector_chunk,
)
from mergelab.engine.protocol import ChunkMethod, FoldsLastPass, folds
from mergelab.engine.scratch import release_workspace
from mergelab.task_vectors import StateDict, add_base

# finish(chunk, merged task vector, flat index or None) -> what the pass yields for the block (e.g. theta)
Finish = Callable[[Chunk, Tensor, Tensor | None], Tensor]


class SequentialExecutor:
    """Forms every chunk on the calling thread, as fresh tensors (views of in-memory sources where possible).

    ``base`` None: ``experts`` are task vectors already formed (no pretrained block in the chunks). ``formed``:
    they are task vectors already formed over ``base``, whose rows ride along in the chunks.
    """

    def __init__(self, base: TensorSource | None, experts: Sequence[TensorSource], formed: bool = False) -> None:
        self.base, self.experts = base, list(experts)
        self.formed = formed or base is None

    @property
    def n_tasks(self) -> int:
        return len(self.experts)

    def map(
        self, blocks: Sequence[Block], fn: Callable[[Chunk], Any], parallel: bool = True
    ) -> Iterator[tuple[Chunk, Any]]:
        """``(chunk, fn(chunk))`` for every block, in order (``parallel`` is accepted and means nothing here)."""
        for b in blocks:
            if self.formed or self.base is None:
                chunk = vector_chunk(b, self.experts, self.base)
            else:
                chunk = load_chunk(b, self.base, self.experts)
            yield chunk, fn(chunk)


class DeferredValues:
    """Merged values that hold only if a statistic the merge pass computes itself comes out as assumed.

    Global TIES folds its majority-sign pass into the merge: it merges with a provisional majority and hands
    over, per chunk, the exact ties (the only coordinates the majority decides) with their final values under
    the other majority. After the pass, :attr:`needed` says whether some of them replace the written ones, and
    :attr:`items` keeps exactly those (the tensors whose majority was not the provisional one).
    At most ``budget`` values are kept; :attr:`overflowed` says some were dropped (the caller must then merge
    again without folding).
    """

    def __init__(self, budget: int = 16 << 20) -> None:  # 16M values: ~100 MB at bf16 values and int32 indices
        self.budget = budget
        self.items: list[tuple[str, int | None, Tensor, Tensor]] = []  # name, start row, flat index, values
        self.count = 0
        self.overflowed = False
        self.needed = False

    def add(self, name: str, start: int | None, index: Tensor, values: Tensor) -> None:
        """Values replacing those at flat ``index`` of the block of ``name`` starting at row ``start``."""
        if self.overflowed or self.count + index.numel() > self.budget:
            self.overflowed, self.items = True, []
            return
        small = index.numel() == 0 or int(index.max()) < 2**31
        self.items.append((name, start, index.to(torch.int32) if small else index, values))
        self.count += index.numel()


def check_pool(method: ChunkMethod, n_tasks: int) -> None:
    """Refuse, before any pass, a pool the method cannot merge (its expert count, per-expert options naming
    other experts): the one check every way into the engine goes through, the run's, the CLI's and a direct
    :func:`merge_in_memory` or :func:`~mergelab.engine.streaming.stream_merge` call alike."""
    check = getattr(method, "check_experts", None)
    names = getattr(method, "expert_names", None)
    if check is not None and names is not None:
        check(names(n_tasks))


def run_passes(
    method: ChunkMethod,
    blocks: Sequence[Block],
    executor: Any,
    finish: Finish | None = None,
    deferred: DeferredValues | None = None,
    progress: bool = False,
) -> Iterator[tuple[Chunk, Tensor]]:
    """Run ``method``'s statistics passes over ``blocks``, then yield ``(chunk, result)`` of the merge pass in order.

    The result is ``finish(chunk, merged task vector, None)`` (the merged task vector itself without ``finish``);
    ``finish`` runs where the merge runs (a worker thread for ``parallel_chunks`` methods). With ``deferred``, a
    method that folds its last statistics pass (:func:`mergelab.engine.protocol.folds`) does so; its corrections
    go to ``deferred`` as ``finish(chunk, values, flat index)``, and ``deferred.needed`` is set after the pass.
    ``executor`` is a :class:`SequentialExecutor` or a :class:`~mergelab.engine.pipeline.ChunkPipeline`.
    The method's :meth:`~mergelab.engine.protocol.ChunkMethod.prior_stages` run their statistics passes first.
    """
    check_pool(method, executor.n_tasks)
    parallel = bool(method.parallel_chunks)
    fold = deferred is not None and folds(method, executor.n_tasks)
    _run_statistics(method, blocks, executor, method.stat_passes - (1 if fold else 0), progress)

    def merge(c: Chunk) -> Any:
        if not fold:
            delta = method.merge_chunk(located(method, c), c.vectors)
            return finish(c, delta, None) if finish is not None else delta
        assert isinstance(method, FoldsLastPass)
        delta, stat, alt = method.merge_chunk_folded(located(method, c), c.vectors)
        if alt is not None and finish is not None:
            alt = (alt[0], finish(c, alt[1], alt[0]))
        return (finish(c, delta, None) if finish is not None else delta), stat, alt

    bar = tqdm(total=len(blocks), desc="merging", disable=not progress)
    for chunk, result in executor.map(blocks, merge, parallel):
        if fold:
            assert deferred is not None
            result, stat, alt = result
            method.add_statistics(method.stat_passes - 1, chunk.block, stat)
            if alt is not None:
                deferred.add(chunk.block.name, chunk.block.start, alt[0], alt[1])
        yield chunk, result
        bar.update()
    bar.close()
    if fold:
        assert deferred is not None and isinstance(method, FoldsLastPass)
        method.end_pass(method.stat_passes - 1)
        wrong = {n for n in dict.fromkeys(b.name for b in blocks) if not method.folded_values_hold(n)}
        deferred.items = [item for item in deferred.items if item[0] in wrong]
        deferred.needed = bool(wrong)


def located(method: ChunkMethod, c: Chunk) -> Block:
    """The block ``method``'s hooks see: with the pretrained rows when it declares ``needs_base``."""
    if not method.needs_base:
        return c.block
    assert c.base is not None, "a method that needs the pretrained weights was handed task vectors alone"
    return c.block._replace(base=c.base)


def _run_statistics(method: ChunkMethod, blocks: Sequence[Block], executor: Any, passes: int, progress: bool) -> None:
    """``method``'s prior stages (each with all its statistics passes), its ``begin``, then its first ``passes``
    statistics passes over ``blocks``: everything before its merge pass."""
    names = list(dict.fromkeys(b.name for b in blocks))
    for stage in method.prior_stages():
        _run_statistics(stage, blocks, executor, stage.stat_passes, progress)
    method.begin(names)
    label = f"{type(method).__name__} statistics pass"
    for p in range(passes):
        bar = tqdm(total=len(blocks), desc=f"{label} {p + 1}/{method.stat_passes}", disable=not progress)

        def stats(c: Chunk, p: int = p) -> Any:
            return method.chunk_statistics(p, located(method, c), c.vectors)

        for chunk, st in executor.map(blocks, stats, bool(method.parallel_chunks)):
            method.add_statistics(p, chunk.block, st)
            bar.update()
        bar.close()
        method.end_pass(p)


def method_blocks(
    method: ChunkMethod, names: Sequence[str], shapes: Mapping[str, tuple[int, ...]], chunk_elems: int | None
) -> list[Block]:
    """The blocks ``method`` sees: row blocks of ``chunk_elems`` elements, or whole tensors if it or one of its
    prior stages is not elementwise."""
    return plan_blocks(names, shapes, chunk_elems if all_elementwise(method) else None)


def all_elementwise(method: ChunkMethod) -> bool:
    """Whether ``method`` and all its prior stages (recursively) can work on row blocks."""
    return bool(method.elementwise) and all(all_elementwise(s) for s in method.prior_stages())


def _gather(stream: Iterator[tuple[Chunk, Tensor]]) -> dict[str, Tensor]:
    parts: dict[str, list[Tensor]] = {}
    try:
        for chunk, t in stream:
            parts.setdefault(chunk.block.name, []).append(t)
    finally:
        release_workspace()
    return {n: p[0] if len(p) == 1 else torch.cat(p) for n, p in parts.items()}


def combine_in_memory(
    method: ChunkMethod,
    vectors: Sequence[Mapping[str, Tensor]],
    chunk_elems: int | None = DEFAULT_CHUNK_ELEMS,
    base: Mapping[str, Tensor] | None = None,
) -> StateDict:
    """The merged task vector of in-memory task vectors (the same passes as a streaming merge).

    ``base``: the pretrained weights the vectors were formed against, required by a method that ``needs_base``.
    """
    if not vectors:
        raise ValueError("at least one task vector is needed")
    if method.needs_base and base is None:
        raise ValueError(
            f"{type(method).__name__} merges the models' weights, not task vectors alone: pass the pretrained "
            "weights (base=...)"
        )
    names = list(vectors[0])
    blocks = method_blocks(method, names, {n: tuple(vectors[0][n].shape) for n in names}, chunk_elems)
    source = DictSource(base) if base is not None else None
    executor = SequentialExecutor(source, [DictSource(v) for v in vectors], formed=True)
    return _gather(run_passes(method, blocks, executor))


def merge_in_memory(
    method: ChunkMethod,
    base: Mapping[str, Tensor],
    experts: Sequence[Mapping[str, Tensor]],
    chunk_elems: int | None = DEFAULT_CHUNK_ELEMS,
) -> StateDict:
    """theta_0 + the merged task vector for every tensor of ``base``, cast to the pretrained dtypes."""
    if not experts:
        raise ValueError("at least one expert is needed")
    names = list(base)
    blocks = method_blocks(method, names, {n: tuple(base[n].shape) for n in names}, chunk_elems)
    executor = SequentialExecutor(DictSource(base), [DictSource(e) for e in experts])

    def theta(chunk: Chunk, delta: Tensor, index: Tensor | None) -> Tensor:
        assert chunk.base is not None
        return add_base(chunk.base, delta).to(base[chunk.block.name].dtype)

    return _gather(run_passes(method, blocks, executor, finish=theta))
