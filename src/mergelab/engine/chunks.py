"""The chunk vocabulary every merge method and engine part speaks: blocks, sources and one chunk of task vectors.

A *block* is a range of rows of one tensor (or the whole tensor); a *chunk* is that block of the pretrained
weights in the compute dtype plus the task vectors of every expert over it (:mod:`mergelab.engine.scratch` says
which of them a method may overwrite). Methods see only chunks, so the same
method code runs on in-memory state dicts and on checkpoints streamed from disk. This module sits below the
methods and the pass drivers: it imports neither.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from torch import Tensor

from mergelab.engine.scratch import ChunkVectors
from mergelab.task_vectors import compute_dtype, subtract_base

# Rows are grouped so that a chunk holds at most this many elements per task (4 MiB in float32): small enough
# that a chunk's several elementwise steps run in cache rather than streaming each one from main memory.
DEFAULT_CHUNK_ELEMS = 1 << 20


class Block(NamedTuple):
    """Rows ``start:stop`` of tensor ``name`` (both None: the whole tensor), the ``index``-th block of it.

    ``shape`` is the whole tensor's shape (the pretrained model's), so a method can relate a block to the
    tensor whatever the chunk size (DARE draws its masks on fixed blocks of it). ``base`` is the pretrained
    weights over the block in the compute dtype, set by the pass driver only for a method that declares
    ``needs_base`` (:class:`mergelab.engine.protocol.ChunkMethod`), None otherwise; it is read-only (the engine
    adds the merged task vector to it afterwards).
    """

    name: str
    index: int
    start: int | None
    stop: int | None
    shape: tuple[int, ...]
    base: Tensor | None = None


class TensorSource(Protocol):
    """Something that hands out tensors (or row blocks of them) by name: a state dict or a checkpoint on disk."""

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get_rows(self, name: str, start: int | None, stop: int | None) -> Tensor: ...


class DictSource:
    """A :class:`TensorSource` over an in-memory mapping."""

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        self.tensors = tensors

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

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


def plan_blocks(names: Sequence[str], shapes: Mapping[str, tuple[int, ...]], chunk_elems: int | None) -> list[Block]:
    """Every block of every tensor, tensor by tensor, in row order."""
    return [
        Block(n, i, s, e, tuple(shapes[n]))
        for n in names
        for i, (s, e) in enumerate(row_blocks(shapes[n], chunk_elems))
    ]


def read_bounds(shape: tuple[int, ...], start: int | None, stop: int | None) -> tuple[int | None, int | None]:
    """The rows read for a block: the pretrained model's rows only (experts may have extra rows, added tokens)."""
    if start is None and shape:
        return 0, shape[0]
    return start, stop


@dataclass
class Chunk:
    """One block in flight: the pretrained block (compute dtype), the task vectors and an output buffer.

    ``base`` is None when the chunk was made from task vectors alone; ``vectors`` say whether a method may
    overwrite them (:class:`~mergelab.engine.scratch.ChunkVectors`); ``out`` is a free buffer of the block's
    shape owned by the engine, or None (results are then fresh tensors).
    """

    block: Block
    base: Tensor | None
    vectors: ChunkVectors
    out: Tensor | None = None


def _base_rows(block: Block, base: TensorSource) -> Tensor:
    """The pretrained rows of ``block`` in the compute dtype."""
    b = base.get_rows(block.name, *read_bounds(block.shape, block.start, block.stop))
    return b.to(compute_dtype(b.dtype))


def load_chunk(block: Block, base: TensorSource, experts: Sequence[TensorSource]) -> Chunk:
    """The chunk of ``block``: the pretrained rows in the compute dtype and tau_t = theta_t - theta_0 over them."""
    s, e = read_bounds(block.shape, block.start, block.stop)
    b = _base_rows(block, base)
    return Chunk(block, b, ChunkVectors([subtract_base(x.get_rows(block.name, s, e), b) for x in experts]))


def vector_chunk(block: Block, vectors: Sequence[TensorSource], base: TensorSource | None = None) -> Chunk:
    """The chunk of ``block`` from task vectors already formed; the pretrained rows (compute dtype) ride along
    when ``base`` is given (for methods that need them), else the chunk has none."""
    s, e = read_bounds(block.shape, block.start, block.stop)
    b = _base_rows(block, base) if base is not None else None
    return Chunk(block, b, ChunkVectors([v.get_rows(block.name, s, e) for v in vectors]))
