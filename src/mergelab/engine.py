"""The merge engine: one code path for in-memory state dicts and for checkpoints far larger than memory.

A task-vector method sees the task vectors one *chunk* at a time (a block of rows of one tensor, or a whole
tensor for methods that need it), in zero or more statistics passes followed by a merge pass. In memory the
chunks are slices of tensors already loaded; when streaming they are read from safetensors shards block by
block, so peak memory is a few row blocks whatever the model's size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

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


VectorLoader = Callable[[str, int | None, int | None], list[Tensor]]


class TaskVectorLoader:
    """Loads tau_t = theta_t - theta_0 for a row block, in float32 (float64 stays float64).

    The pretrained block of the latest load is kept (:meth:`base_block`), so adding the merged task vector
    back does not read it again.
    """

    def __init__(self, base: TensorSource, experts: Sequence[TensorSource]) -> None:
        self.base, self.experts = base, experts
        self._last: tuple[str, int | None, int | None, Tensor] | None = None

    def _bounds(self, name: str, start: int | None, stop: int | None) -> tuple[int | None, int | None]:
        shape = self.base.shape(name)
        if start is None and shape:  # experts may have extra rows (added tokens): read the base's rows only
            return 0, shape[0]
        return start, stop

    def base_block(self, name: str, start: int | None, stop: int | None) -> Tensor:
        """The pretrained block in the compute dtype."""
        start, stop = self._bounds(name, start, stop)
        if self._last is not None and self._last[:3] == (name, start, stop):
            return self._last[3]
        b = self.base.get_rows(name, start, stop)
        b = b.to(torch.float64 if b.dtype == torch.float64 else torch.float32)
        self._last = (name, start, stop, b)
        return b

    def __call__(self, name: str, start: int | None, stop: int | None) -> list[Tensor]:
        b = self.base_block(name, start, stop)
        start, stop = self._bounds(name, start, stop)
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
    for name, _, _, delta in run_method(method, names, shapes, load, chunk_elems):
        parts.setdefault(name, []).append(delta)
    return {n: p[0] if len(p) == 1 else torch.cat(p) for n, p in parts.items()}
