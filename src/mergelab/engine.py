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
(``add_statistics``) is still added in chunk order, so results are identical to a sequential run.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mergelab.task_vectors import release_workspace

if TYPE_CHECKING:
    from mergelab.methods.base import TaskVectorMethod

# Rows are grouped so that a chunk holds at most this many elements per task (4 MiB in float32): small enough
# that a chunk's several elementwise steps run in cache rather than streaming each one from main memory.
DEFAULT_CHUNK_ELEMS = 1 << 20


class TensorSource(Protocol):
    """Something that hands out tensors (or row blocks of them) by name."""

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get_rows(self, name: str, start: int | None, stop: int | None) -> Tensor: ...


class DictSource:
    """A :class:`TensorSource` over an in-memory mapping."""

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        self.tensors = tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def get_rows(self, name: str, start: int | None, stop: int | None) -> Tensor:
        t = self.tensors[name]
        return t if start is None else t[start:stop]


def row_blocks(shape: tuple[int, ...], chunk_elems: int | None) -> list[tuple[int | None, int | None]]:
    """Row ranges that split a tensor into chunks of at most ``chunk_elems`` elements (whole tensor if None)."""
    if chunk_elems is None or len(shape) == 0 or shape[0] == 0:
        return [(None, None)]
    row = 1
    for d in shape[1:]:
        row *= d
    if shape[0] * row <= chunk_elems:
        return [(None, None)]
    step = max(1, chunk_elems // max(row, 1))
    return [(s, min(s + step, shape[0])) for s in range(0, shape[0], step)]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype task vectors are computed in: float32, or float64 for float64 weights."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class ScratchChunk(list):
    """The task vectors of one chunk, in buffers the engine owns and reuses once the call returns.

    A method may overwrite them in place (and return one of them); it must not keep references to them.
    ``stacked`` is all of them as one ``[T, *block_shape]`` tensor.
    """

    def __init__(self, stacked: Tensor) -> None:
        super().__init__(stacked.unbind(0))
        self.stacked = stacked


def is_scratch(vectors: Sequence[Tensor]) -> bool:
    """Whether a method may overwrite ``vectors`` (see :class:`ScratchChunk`)."""
    return isinstance(vectors, ScratchChunk)


VectorLoader = Callable[[str, int | None, int | None], list[Tensor]]


class TaskVectorLoader:
    """Loads tau_t = theta_t - theta_0 for a row block, in float32 (float64 stays float64).

    The pretrained block of the latest load is kept (:meth:`base_block`), so adding the merged task vector
    back does not read it again.
    """

    def __init__(self, base: TensorSource, experts: Sequence[TensorSource]) -> None:
        self.base, self.experts = base, experts
        self._last: tuple[str, int | None, int | None, Tensor] | None = None

    def bounds(self, name: str, start: int | None, stop: int | None) -> tuple[int | None, int | None]:
        """The rows actually read: experts may have extra rows (added tokens), only the base's rows are used."""
        shape = self.base.shape(name)
        if start is None and shape:
            return 0, shape[0]
        return start, stop

    def base_block(self, name: str, start: int | None, stop: int | None) -> Tensor:
        """The pretrained block in the compute dtype."""
        start, stop = self.bounds(name, start, stop)
        if self._last is not None and self._last[:3] == (name, start, stop):
            return self._last[3]
        b = self.base.get_rows(name, start, stop)
        b = b.to(compute_dtype(b.dtype))
        self._last = (name, start, stop, b)
        return b

    def __call__(self, name: str, start: int | None, stop: int | None) -> list[Tensor]:
        b = self.base_block(name, start, stop)
        start, stop = self.bounds(name, start, stop)
        # Mixed-dtype subtraction promotes to the base's compute dtype in one pass (no separate upcast).
        return [torch.sub(e.get_rows(name, start, stop), b) for e in self.experts]


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


# ------------------------------------------------------------------------------------------ streaming


class BlockReader(Protocol):
    """A checkpoint that reads row blocks into caller-owned buffers (:class:`mergelab.checkpoints.LazyCheckpoint`)."""

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def block_nbytes(self, name: str, start: int | None = None, stop: int | None = None) -> int: ...

    def read_rows_into(self, name: str, start: int | None, stop: int | None, buf: Tensor) -> Tensor: ...


Block = tuple[str, int, int | None, int | None]  # tensor name, chunk index, start row, stop row


@dataclass
class Chunk:
    """One row block in flight: the pretrained block, the task vectors and an output buffer, all reused."""

    block: Block
    base: Tensor
    vectors: ScratchChunk
    out: Tensor


class _Slot:
    """The reused buffers of one chunk in flight."""

    def __init__(self, raw_bytes: int, n_sources: int, work_bytes: int) -> None:
        from mergelab.checkpoints import aligned_empty

        self.raw = [aligned_empty(raw_bytes) for _ in range(n_sources)]
        self.work = aligned_empty(work_bytes)  # base, T task vectors and the output, in the compute dtype
        self.block: Block | None = None
        self.read: list[Tensor] = []


@contextmanager
def single_threaded_torch() -> Iterator[None]:
    """Run torch ops single-threaded inside the block (parallelism comes from the pipeline's own threads).

    On a shared or small machine, intra-op thread pools spin and wait at every op's barrier for a thread the
    OS has descheduled; measured here, two intra-op threads made a merge several times slower than one.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def default_workers() -> int:
    """Compute threads for streaming: one per available core, at most four."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


class ChunkPipeline:
    """Streams task-vector chunks of a pretrained checkpoint and its experts through worker threads.

    :meth:`map` runs ``fn(chunk)`` for every block on ``workers`` threads while ``readers`` threads read the
    next blocks into reused buffers, and yields ``(chunk, result)`` in block order. A chunk's buffers are reused
    once the consumer asks for the next item, so results must be consumed (or copied) before that. Buffers for
    ``workers + readers + 1`` chunks are allocated once, sized for the largest block; ``budget_bytes`` caps
    their total (at least one chunk; whole-tensor chunks then run one at a time). The first error in any
    thread is raised in the consumer; the threads stop when :meth:`map`'s iterator ends or is closed.
    """

    def __init__(
        self,
        base: BlockReader,
        experts: Sequence[BlockReader],
        blocks: Sequence[Block],
        workers: int | None = None,
        readers: int = 3,
        budget_bytes: int = 512 << 20,
    ) -> None:
        from mergelab.checkpoints import ALIGN, dtype_size

        self.base, self.experts = base, list(experts)
        self.sources = [base, *self.experts]
        raw = max(
            (src.block_nbytes(n, *self.bounds(n, s, e)) for n, _, s, e in blocks for src in self.sources), default=0
        )
        numel = max((self._numel(n, s, e) for n, _, s, e in blocks), default=0)
        itemsize = max((dtype_size(compute_dtype(base.dtype(n))) for n, _, _, _ in blocks), default=4)
        self.raw_bytes = raw + 2 * ALIGN
        self.work_bytes = (len(self.experts) + 2) * numel * itemsize
        slot_bytes = len(self.sources) * self.raw_bytes + self.work_bytes
        self.workers = max(1, workers or default_workers())
        # Several reads in flight: an O_DIRECT read waits for the device, and one at a time leaves it idle.
        self.readers = max(1, readers)
        wanted = self.workers + self.readers + 1
        self.n_slots = int(max(1, min(wanted, budget_bytes // max(slot_bytes, 1))))
        self.workers = min(self.workers, self.n_slots)
        self.readers = min(self.readers, self.n_slots)
        self._slots: list[_Slot] = []

    def bounds(self, name: str, start: int | None, stop: int | None) -> tuple[int | None, int | None]:
        """Rows read for a block: the pretrained model's rows (experts may have extra ones)."""
        shape = self.base.shape(name)
        if start is None and shape:
            return 0, shape[0]
        return start, stop

    def _numel(self, name: str, start: int | None, stop: int | None) -> int:
        shape = self.base.shape(name)
        s, e = self.bounds(name, start, stop)
        rows = (e - s) if shape and s is not None and e is not None else 1
        inner = 1
        for d in shape[1:]:
            inner *= d
        return rows * inner

    # ---- the stages

    def _read(self, slot: _Slot, block: Block) -> None:
        name, _, s, e = block
        s, e = self.bounds(name, s, e)
        slot.block = block
        slot.read = [src.read_rows_into(name, s, e, buf) for src, buf in zip(self.sources, slot.raw, strict=True)]

    def _convert(self, slot: _Slot) -> Chunk:
        assert slot.block is not None
        b_raw, *e_raw = slot.read
        dtype = compute_dtype(b_raw.dtype)
        n = b_raw.numel()
        work = slot.work[: (len(e_raw) + 2) * n * dtype.itemsize].view(dtype)
        work = work.view(len(e_raw) + 2, *b_raw.shape)
        base, out, stacked = work[0], work[1], work[2:]
        base.copy_(b_raw)  # the same conversion as .to(dtype)
        for tau, raw in zip(stacked.unbind(0), e_raw, strict=True):
            # Upcast, then subtract in place: the same values as the mixed-dtype subtraction (upcasting is
            # exact), which TensorIterator runs on a slower casting path.
            tau.copy_(raw).sub_(base)
        return Chunk(slot.block, base, ScratchChunk(stacked), out)

    def map(self, blocks: Sequence[Block], fn: Callable[[Chunk], Any]) -> Iterator[tuple[Chunk, Any]]:
        """``(chunk, fn(chunk))`` for every block, in order; ``fn`` runs on the worker threads."""
        if not blocks:
            return
        if not self._slots:
            self._slots = [_Slot(self.raw_bytes, len(self.sources), self.work_bytes) for _ in range(self.n_slots)]
        run = _Run(self, list(blocks), fn)
        try:
            yield from run.results()
        finally:
            run.stop()


class _Run:
    """One :meth:`ChunkPipeline.map` call: its threads, queues and results."""

    def __init__(self, pipe: ChunkPipeline, blocks: list[Block], fn: Callable[[Chunk], Any]) -> None:
        self.pipe, self.blocks, self.fn = pipe, blocks, fn
        self.free: queue.Queue[_Slot] = queue.Queue()
        for slot in pipe._slots:
            self.free.put(slot)
        self.todo: queue.Queue[tuple[int, _Slot] | None] = queue.Queue()
        self.done: dict[int, tuple[_Slot, Chunk, Any]] = {}
        self.cond = threading.Condition()
        self.claim = threading.Lock()  # readers take the next block and a free slot together
        self.next_block = 0
        self.readers_left = pipe.readers
        self.error: BaseException | None = None
        self.stopping = threading.Event()
        self.threads = [
            threading.Thread(target=self._reader, name=f"mergelab-reader-{i}", daemon=True) for i in range(pipe.readers)
        ]
        self.threads += [
            threading.Thread(target=self._worker, name=f"mergelab-worker-{i}", daemon=True) for i in range(pipe.workers)
        ]
        for t in self.threads:
            t.start()

    def _fail(self, e: BaseException) -> None:
        with self.cond:
            if self.error is None:
                self.error = e
            self.stopping.set()
            self.cond.notify_all()

    def _claim(self) -> tuple[int, _Slot] | None:
        """The next block and a slot for it. Slots go to blocks in order, so the consumer's next block always
        gets one: a later block holding the last free slot while an earlier one waits would deadlock."""
        with self.claim:
            if self.next_block >= len(self.blocks):
                return None
            while not self.stopping.is_set():
                try:
                    slot = self.free.get(timeout=0.1)
                except queue.Empty:
                    continue
                self.next_block += 1
                return self.next_block - 1, slot
            return None

    def _reader(self) -> None:
        try:
            torch.set_num_threads(1)
            while (item := self._claim()) is not None:
                k, slot = item
                self.pipe._read(slot, self.blocks[k])
                self.todo.put((k, slot))
        except BaseException as e:
            self._fail(e)
        finally:
            with self.claim:
                self.readers_left -= 1
                last = self.readers_left == 0
            if last:  # no more blocks: let the workers go
                for _ in range(self.pipe.workers):
                    self.todo.put(None)

    def _worker(self) -> None:
        try:
            torch.set_num_threads(1)
            while not self.stopping.is_set():
                item = self.todo.get()
                if item is None:
                    return
                k, slot = item
                chunk = self.pipe._convert(slot)
                result = self.fn(chunk)
                with self.cond:
                    self.done[k] = (slot, chunk, result)
                    self.cond.notify_all()
        except BaseException as e:
            self._fail(e)

    def results(self) -> Iterator[tuple[Chunk, Any]]:
        for k in range(len(self.blocks)):
            with self.cond:
                while k not in self.done and self.error is None:
                    self.cond.wait()
                if self.error is not None:
                    raise self.error
                slot, chunk, result = self.done.pop(k)
            yield chunk, result
            self.free.put(slot)  # the consumer is done with it

    def stop(self) -> None:
        self.stopping.set()
        for _ in self.threads:
            self.todo.put(None)
        for t in self.threads:
            t.join()


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
