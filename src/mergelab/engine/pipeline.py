"""The threaded executor of the merge passes: reads, task-vector forming and per-chunk work overlap.

Reader threads read the next blocks of the pretrained checkpoint and every expert into reused page-aligned
buffers; worker threads form the task vectors in place and run the method's per-chunk hook; the consumer takes
the results in block order, so what it accumulates is accumulated in the same order as on one thread.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch import Tensor

from mergelab.engine.chunks import Block, Chunk, read_bounds
from mergelab.engine.scratch import ChunkVectors
from mergelab.task_vectors import compute_dtype, subtract_base


class BlockReader(Protocol):
    """A checkpoint that reads row blocks into caller-owned buffers (:class:`mergelab.io.reader.LazyCheckpoint`)."""

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def block_nbytes(self, name: str, start: int | None = None, stop: int | None = None) -> int: ...

    def read_rows_into(self, name: str, start: int | None, stop: int | None, buf: Tensor) -> Tensor: ...


class _Slot:
    """The reused buffers of one chunk in flight."""

    def __init__(self, raw_bytes: int, n_sources: int, work_bytes: int) -> None:
        from mergelab.io.files import aligned_empty

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
        from mergelab.io.files import ALIGN, dtype_size

        self.base, self.experts = base, list(experts)
        self.sources = [base, *self.experts]
        raw = max(
            (src.block_nbytes(b.name, *read_bounds(b.shape, b.start, b.stop)) for b in blocks for src in self.sources),
            default=0,
        )
        numel = max((_numel(b) for b in blocks), default=0)
        itemsize = max((dtype_size(compute_dtype(base.dtype(b.name))) for b in blocks), default=4)
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

    # ---- the stages

    def _read(self, slot: _Slot, block: Block) -> None:
        s, e = read_bounds(block.shape, block.start, block.stop)
        slot.block = block
        slot.read = [src.read_rows_into(block.name, s, e, buf) for src, buf in zip(self.sources, slot.raw, strict=True)]

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
            subtract_base(raw, base, out=tau)
        return Chunk(slot.block, base, ChunkVectors.scratch(stacked), out)

    @property
    def n_tasks(self) -> int:
        return len(self.experts)

    def map(
        self, blocks: Sequence[Block], fn: Callable[[Chunk], Any], parallel: bool = True
    ) -> Iterator[tuple[Chunk, Any]]:
        """``(chunk, fn(chunk))`` for every block, in block order.

        ``fn`` runs on the worker threads when ``parallel`` (it must then be thread-safe), else on the consumer's.
        """
        if not blocks:
            return
        if not parallel:
            for chunk, _ in self.map(blocks, _nothing):
                yield chunk, fn(chunk)
            return
        if not self._slots:
            self._slots = [_Slot(self.raw_bytes, len(self.sources), self.work_bytes) for _ in range(self.n_slots)]
        run = _Run(self, list(blocks), fn)
        try:
            yield from run.results()
        finally:
            run.stop()


def _nothing(chunk: Chunk) -> None:
    return None


def _numel(block: Block) -> int:
    """Elements of a block per source."""
    s, e = read_bounds(block.shape, block.start, block.stop)
    rows = (e - s) if block.shape and s is not None and e is not None else 1
    inner = 1
    for d in block.shape[1:]:
        inner *= d
    return rows * inner


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
