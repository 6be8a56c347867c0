"""Merging checkpoints larger than memory: tensor by tensor from safetensors shards to safetensors shards.

The method's passes run through :func:`mergelab.engine.passes.run_passes` on the threaded executor
(:class:`~mergelab.engine.pipeline.ChunkPipeline`), or on the sequential one where the pipeline's buffers cannot
hold the task vectors (a float64 expert over a lower-precision base) or ``PIPELINE`` is off; both write the same
bytes.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from mergelab.engine.chunks import DEFAULT_CHUNK_ELEMS, Chunk
from mergelab.engine.passes import DeferredValues, SequentialExecutor, method_blocks, run_passes
from mergelab.engine.pipeline import ChunkPipeline, single_threaded_torch
from mergelab.engine.protocol import ChunkMethod
from mergelab.engine.scratch import release_workspace
from mergelab.io.files import TOKENIZER_FILES, CheckpointReader
from mergelab.io.reader import open_checkpoint
from mergelab.io.writer import ShardedWriter
from mergelab.task_vectors import add_base
from mergelab.weight_checks import require_finite_merge

log = logging.getLogger(__name__)

VOCAB_POLICIES = ("extend", "base", "error")


# False runs merges through the sequential engine (one thread, fresh tensors per block): the reference the
# pipelined engine is tested against, byte for byte.
PIPELINE = True


def _row_extension(base: tuple[int, ...], other: tuple[int, ...]) -> bool:
    """``other`` is ``base`` with extra rows appended (an expert with added tokens)."""
    return len(base) == len(other) >= 1 and other[1:] == base[1:] and other[0] > base[0]


def plan_tensors(
    base: CheckpointReader,
    experts: Sequence[CheckpointReader],
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    vocab: str = "extend",
) -> tuple[list[str], dict[str, int]]:
    """Which tensors are merged, and the output row count of those experts extend with extra rows.

    Raises a ValueError naming the expert and tensor for a missing tensor, a shape that is not a pure row
    extension, or any extension when ``vocab='error'``.
    """
    if vocab not in VOCAB_POLICIES:
        raise ValueError(f"vocab policy must be one of {VOCAB_POLICIES}, got {vocab!r}")
    inc = [re.compile(p) for p in include]
    exc = [re.compile(p) for p in exclude]
    merged, extended = [], {}
    for name in base:
        shape = base.shape(name)
        for e in experts:
            if name not in e:
                raise ValueError(f"expert '{e.name}' ({e.dir}): tensor '{name}' of the pretrained model is missing")
            other = e.shape(name)
            if other == shape:
                continue
            if not _row_extension(shape, other):
                raise ValueError(
                    f"expert '{e.name}' ({e.dir}): tensor '{name}' has shape {other}, pretrained has {shape} "
                    "(only extra rows, as from added tokens, can be reconciled)"
                )
            if vocab == "error":
                raise ValueError(
                    f"expert '{e.name}' ({e.dir}): tensor '{name}' has {other[0]} rows, pretrained {shape[0]}; "
                    "set vocab=extend or vocab=base"
                )
            if vocab == "extend":
                extended[name] = max(extended.get(name, shape[0]), other[0])
        if not base.dtype(name).is_floating_point:
            continue
        if inc and not any(p.search(name) for p in inc):
            continue
        if any(p.search(name) for p in exc):
            continue
        merged.append(name)
    if not merged and len(base):
        raise ValueError(
            f"model.include={list(include)} / model.exclude={list(exclude)} leave no floating-point tensor of the "
            f"pretrained model ({base.dir}) to merge: nothing would be merged"
        )
    return merged, extended


def extra_rows(
    method: ChunkMethod, name: str, base_rows: int, out_rows: int, experts: Sequence[CheckpointReader]
) -> Tensor:
    """Rows only some experts have (added tokens), each merged by ``method.extra_rows`` from those experts' rows."""
    blocks = []
    for r in range(base_rows, out_rows):
        have = [e for e in experts if e.shape(name)[0] > r]
        rows = [e.get_rows(name, r, r + 1)[0] for e in have]
        for e, x in zip(have, rows, strict=True):
            if x.is_floating_point() and not torch.isfinite(x).all():
                raise ValueError(f"checkpoint '{e.name}': tensor '{name}' row {r} contains NaN/inf")
        blocks.append(method.extra_rows(name, rows))
    out = torch.stack(blocks)
    require_finite_merge(out, f"{name}[{base_rows}:{out_rows}]", method)
    return out


def check_block(
    method: ChunkMethod,
    name: str,
    block: Tensor,
    base: CheckpointReader,
    experts: Sequence[CheckpointReader],
    s: int | None,
    e: int | None,
) -> None:
    """Refuse a merged block holding NaN/inf, naming the checkpoint that brought it in, else the method."""
    if torch.isfinite(block).all():
        return
    for ck in (base, *experts):
        if not torch.isfinite(ck.get_rows(name, s, e).float()).all():
            raise ValueError(f"checkpoint '{ck.name}': tensor '{name}' contains NaN/inf")
    require_finite_merge(block, name, method)


def stream_merge(
    method: ChunkMethod,
    pretrained: str | Path,
    experts: Sequence[str | Path],
    out_dir: str | Path,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    vocab: str = "extend",
    max_shard_bytes: int = 2**30,
    chunk_elems: int | None = DEFAULT_CHUNK_ELEMS,
    overwrite: bool = False,
    task_names: Sequence[str] | None = None,
    progress: bool = True,
) -> Path:
    """Merge checkpoints (local dirs or hub ids) tensor by tensor into ``out_dir``.

    Each is read by :func:`mergelab.io.reader.open_checkpoint`: safetensors, PyTorch ``.bin`` (one shard in memory
    at a time), or, for an expert, a PEFT LoRA adapter over ``pretrained``.

    Peak memory is a few row blocks of ``chunk_elems`` elements per expert (whole tensors for methods that
    need them). ``vocab`` reconciles experts with extra embedding rows: ``extend`` merges the shared rows
    and takes each extra row from the experts that have it (the output vocabulary and tokenizer are the
    largest expert's), ``base`` keeps only the pretrained rows, ``error`` refuses. The result is written to
    a temporary dir and moved into place when complete, with config and tokenizer files.

    Reading, computing and writing overlap (:func:`mergelab.engine.passes.run_passes` on a
    :class:`~mergelab.engine.pipeline.ChunkPipeline`, one compute thread
    per core, torch itself single-threaded meanwhile); the bytes written are those of the sequential engine
    (``PIPELINE = False``). Global TIES skips its sign pass here (see :meth:`TIES.merge_chunk_folded`).
    """
    base = open_checkpoint(pretrained, name="pretrained")
    names = [str(e) for e in experts]
    exps = [
        open_checkpoint(e, name=n, base=base, pretrained=str(pretrained))
        for e, n in zip(experts, task_names or names, strict=True)
    ]
    method.task_names = list(task_names or names)
    merged, extended = plan_tensors(base, exps, include, exclude, vocab)

    def out_shape(name: str) -> tuple[int, ...]:
        shape = base.shape(name)
        return (extended[name], *shape[1:]) if name in extended else shape

    layout = [(n, out_shape(n), base.dtype(n)) for n in base]
    try:
        for fold in (True, False):
            deferred = DeferredValues() if fold else None
            out = _write_merge(
                method,
                base,
                exps,
                merged,
                extended,
                layout,
                out_dir,
                max_shard_bytes,
                overwrite,
                chunk_elems,
                progress,
                deferred,
            )
            if out is not None:
                return out
        raise AssertionError("unreachable: a merge without folding always completes")
    finally:
        for ck in (base, *exps):
            ck.close()


def _write_merge(
    method: ChunkMethod,
    base: CheckpointReader,
    exps: Sequence[CheckpointReader],
    merged: Sequence[str],
    extended: Mapping[str, int],
    layout: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
    out_dir: str | Path,
    max_shard_bytes: int,
    overwrite: bool,
    chunk_elems: int | None,
    progress: bool,
    deferred: DeferredValues | None,
) -> Path | None:
    """One merge into ``out_dir``; None when a folded pass kept too many corrections to apply (merge again)."""
    writer = ShardedWriter(out_dir, layout, max_shard_bytes, overwrite)
    stream: Iterator[tuple[str, Tensor]] | None = None
    try:
        with single_threaded_torch():
            stream = _merged_stream(method, merged, base, exps, chunk_elems, progress, deferred)
            blocks_of = _BlockStream(stream)
            for name in base:
                blocks = blocks_of.take(name) if name in merged else iter([base.get(name)])
                if name in extended:
                    blocks = _chain(blocks, extra_rows(method, name, base.shape(name)[0], extended[name], exps))
                writer.add_blocks(name, blocks)
            for _ in stream:  # run the engine to its end: a folded statistics pass concludes there
                raise AssertionError("merged blocks left over")
        if deferred is not None and deferred.needed:
            if deferred.overflowed:
                writer.abort()
                log.info("too many exact sign ties to correct after the merge: merging again without folding")
                return None
            for name, start, index, values in deferred.items:
                require_finite_merge(values, name, method)
                row = math.prod(base.shape(name)[1:])
                writer.patch(name, index.to(torch.int64) + (start or 0) * row, values)
        writer.copy_side_files(base.dir)
        if extended:
            donor = max(exps, key=lambda e: max(e.shape(n)[0] for n in extended))
            writer.copy_side_files(donor.dir, TOKENIZER_FILES)
            vocab_size = max(extended.values())
            writer.update_config({"vocab_size": vocab_size})
        return writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        if stream is not None:
            stream.close()  # stops the pipeline's threads if the merge ended early
        release_workspace()


def _merged_stream(
    method: ChunkMethod,
    merged: Sequence[str],
    base: CheckpointReader,
    experts: Sequence[CheckpointReader],
    chunk_elems: int | None,
    progress: bool,
    deferred: DeferredValues | None = None,
) -> Iterator[tuple[str, Tensor]]:
    """``(name, merged weights)`` row block by row block, in the base's compute dtype (cast by the writer).

    Blocks come in buffers that are reused once the next block is asked for. An expert in float64 over a
    lower-precision base gets float64 task vectors, which the pipeline's buffers (sized for the base's compute
    dtype) cannot hold: such pools run on the sequential executor.
    """
    blocks = method_blocks(method, merged, {n: base.shape(n) for n in merged}, chunk_elems)
    wide = any(e.dtype(n) == torch.float64 and base.dtype(n) != torch.float64 for n in merged for e in experts)
    executor = SequentialExecutor(base, experts) if wide or not PIPELINE else ChunkPipeline(base, experts, blocks)

    def finish(chunk: Chunk, delta: Tensor, index: Tensor | None) -> Tensor:  # where the merge runs
        assert chunk.base is not None
        name = chunk.block.name
        if index is not None:  # a folded pass's corrections: theta at those coordinates, as written
            return add_base(chunk.base.reshape(-1)[index], delta).to(base.dtype(name))
        theta = add_base(chunk.base, delta, out=chunk.out)
        target = base.dtype(name)
        # One reduction: NaN/inf anywhere makes the sum non-finite. float16 (not bf16) also overflows when the
        # writer casts, so there the largest magnitude is checked too and the check runs on the cast values.
        narrow = target == torch.float16 and theta.dtype != target
        if not torch.isfinite(theta.sum()) or (
            narrow and theta.numel() > 0 and float(theta.abs().amax()) > torch.finfo(target).max
        ):
            check_block(
                method, name, theta.to(target) if narrow else theta, base, experts, chunk.block.start, chunk.block.stop
            )
        return theta

    stream = run_passes(method, blocks, executor, finish, deferred, progress)
    try:
        for chunk, theta in stream:
            yield chunk.block.name, theta
    finally:
        stream.close()


class _BlockStream:
    """Hands out the engine's blocks tensor by tensor, computing each block only when it is written."""

    def __init__(self, stream: Iterator[tuple[str, Tensor]]) -> None:
        self.stream = stream
        self.head = next(stream, None)

    def take(self, name: str) -> Iterator[Tensor]:
        while self.head is not None and self.head[0] == name:
            yield self.head[1]
            self.head = next(self.stream, None)


def _chain(blocks: Iterator[Tensor], extra: Tensor) -> Iterator[Tensor]:
    yield from blocks
    yield extra
