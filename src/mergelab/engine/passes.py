"""The merge engine: one code path for in-memory state dicts and for checkpoints far larger than memory.

A task-vector method sees the task vectors one *chunk* at a time (a block of rows of one tensor, or a whole
tensor for methods that need it), in zero or more statistics passes followed by a merge pass. In memory the
chunks are slices of tensors already loaded (:func:`run_method`); when streaming they are read from safetensors
shards block by block (:func:`run_method_pipelined`), so peak memory is a few row blocks whatever the model's
size.

Streaming overlaps everything: a reader thread reads the blocks ahead into reused page-aligned buffers, worker
threads turn them into task vectors and run the method's per-chunk work, and the caller consumes the results in
order. Methods that declare ``parallel_chunks`` (all built-in ones) have their per-chunk statistics
(``chunk_statistics``) and merges computed on the workers; what is accumulated across chunks
(``add_statistics``) is still added in chunk order, so results are identical to a sequential run."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mergelab.engine.chunks import DEFAULT_CHUNK_ELEMS, Block, DictSource, VectorLoader, row_blocks
from mergelab.engine.pipeline import BlockReader, Chunk, ChunkPipeline
from mergelab.task_vectors import release_workspace

if TYPE_CHECKING:
    from mergelab.methods.base import TaskVectorMethod


def run_method(
    method: TaskVectorMethod,
    names: Sequence[str],
    shapes: Mapping[str, tuple[int, ...]],
    load: VectorLoader,
    chunk_elems: int | None = DEFAULT_CHUNK_ELEMS,
    progress: bool = False,
) -> Iterator[tuple[str, int | None, int | None, Tensor]]:
    """Run the method's statistics passes, then yield ``(name, start_row, stop_row, merged task vector)``.

    Blocks of one tensor are yielded in row order; ``start_row`` is None for a whole tensor.
    """
    chunking = chunk_elems if method.elementwise else None
    blocks = {n: row_blocks(shapes[n], chunking) for n in names}
    method.begin(names)
    for p in range(method.stat_passes):
        for n in tqdm(names, desc=f"statistics pass {p + 1}/{method.stat_passes}", disable=not progress):
            for i, (s, e) in enumerate(blocks[n]):
                method.observe(p, n, i, load(n, s, e))
        method.end_pass(p)
    for n in tqdm(names, desc="merging", disable=not progress):
        for i, (s, e) in enumerate(blocks[n]):
            yield n, s, e, method.merge_chunk(n, i, load(n, s, e))


def combine_in_memory(
    method: TaskVectorMethod, vectors: Sequence[Mapping[str, Tensor]], chunk_elems: int | None = DEFAULT_CHUNK_ELEMS
) -> dict[str, Tensor]:
    """The merged task vector of in-memory task vectors (the same passes as a streaming merge)."""
    if not vectors:
        raise ValueError("at least one task vector is needed")
    names = list(vectors[0])
    shapes = {n: tuple(vectors[0][n].shape) for n in names}
    sources = [DictSource(v) for v in vectors]

    def load(name: str, start: int | None, stop: int | None) -> list[Tensor]:
        return [src.get_rows(name, start, stop) for src in sources]

    parts: dict[str, list[Tensor]] = {}
    try:
        for name, _, _, delta in run_method(method, names, shapes, load, chunk_elems):
            parts.setdefault(name, []).append(delta)
    finally:
        release_workspace()
    return {n: p[0] if len(p) == 1 else torch.cat(p) for n, p in parts.items()}


class DeferredValues:
    """Merged values that hold only if a statistic the merge pass computes itself comes out as assumed.

    Global TIES folds its majority-sign pass into the merge: it merges with a provisional majority and hands
    over, per chunk, the exact ties (the only coordinates the majority decides) with their final values under
    the other majority. After the pass, :attr:`needed` says whether those values replace the written ones.
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


def _blocks_of(names: Sequence[str], shapes: Mapping[str, tuple[int, ...]], chunking: int | None) -> list[Block]:
    return [(n, i, s, e) for n in names for i, (s, e) in enumerate(row_blocks(shapes[n], chunking))]


def run_method_pipelined(
    method: TaskVectorMethod,
    names: Sequence[str],
    shapes: Mapping[str, tuple[int, ...]],
    base: BlockReader,
    experts: Sequence[BlockReader],
    chunk_elems: int | None = DEFAULT_CHUNK_ELEMS,
    progress: bool = False,
    finish: Callable[[Chunk, Tensor, Tensor | None], Tensor] | None = None,
    deferred: DeferredValues | None = None,
    workers: int | None = None,
) -> Iterator[tuple[Chunk, Tensor]]:
    """:func:`run_method` for checkpoints on disk, through a :class:`ChunkPipeline`.

    Yields ``(chunk, result)`` in block order, where the result is ``finish(chunk, merged task vector, None)``
    (the merged task vector itself without ``finish``); ``chunk.base`` is the pretrained block and
    ``chunk.out`` a free buffer of its shape, both reused once the next item is asked for. Call it inside
    :func:`single_threaded_torch`. Methods with ``parallel_chunks`` run ``chunk_statistics``, ``merge_chunk``
    and ``finish`` on the workers; others run ``observe`` and ``merge_chunk`` on the consumer's thread.

    With ``deferred``, a method that can (``fold_last_pass``) computes its last statistics pass during the
    merge pass; its corrections go to ``deferred`` as ``finish(chunk, values, flat index)``.
    """
    blocks = _blocks_of(names, shapes, chunk_elems if method.elementwise else None)
    pipe = ChunkPipeline(base, experts, blocks, workers)
    parallel = bool(getattr(method, "parallel_chunks", False))
    can_fold = getattr(method, "fold_last_pass", None)
    fold = deferred is not None and parallel and can_fold is not None and method.stat_passes > 0
    fold = fold and bool(can_fold(len(experts)))  # type: ignore[misc]
    method.begin(names)
    for p in range(method.stat_passes - (1 if fold else 0)):
        bar = tqdm(total=len(blocks), desc=f"statistics pass {p + 1}/{method.stat_passes}", disable=not progress)
        if parallel:

            def stats(c: Chunk, p: int = p) -> Any:
                name, i, _, _ = c.block
                return method.chunk_statistics(p, name, i, c.vectors)  # type: ignore[attr-defined]

            for chunk, st in pipe.map(blocks, stats):
                method.add_statistics(p, chunk.block[0], chunk.block[1], st)  # type: ignore[attr-defined]
                bar.update()
        else:
            for chunk, _ in pipe.map(blocks, lambda c: None):
                method.observe(p, chunk.block[0], chunk.block[1], chunk.vectors)
                bar.update()
        bar.close()
        method.end_pass(p)

    def merge(c: Chunk) -> Any:
        name, i, _, _ = c.block
        if not fold:
            delta = method.merge_chunk(name, i, c.vectors)
            return finish(c, delta, None) if finish is not None else delta
        delta, stat, alt = method.merge_chunk_folded(name, i, c.vectors)  # type: ignore[attr-defined]
        if alt is not None and finish is not None:
            alt = (alt[0], finish(c, alt[1], alt[0]))
        return (finish(c, delta, None) if finish is not None else delta), stat, alt

    bar = tqdm(total=len(blocks), desc="merging", disable=not progress)
    for chunk, result in pipe.map(blocks, merge if parallel else lambda c: None):
        if not parallel:
            result = merge(chunk)
        if fold:
            assert deferred is not None
            result, stat, alt = result
            method.add_statistics(method.stat_passes - 1, chunk.block[0], chunk.block[1], stat)  # type: ignore[attr-defined]
            if alt is not None:
                deferred.add(chunk.block[0], chunk.block[2], alt[0], alt[1])
        yield chunk, result
        bar.update()
    bar.close()
    if fold:
        assert deferred is not None
        method.end_pass(method.stat_passes - 1)
        deferred.needed = not method.folded_values_hold()  # type: ignore[attr-defined]
