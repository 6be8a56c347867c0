"""PART OF engine: engine.chunks"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

if TYPE_CHECKING:
    pass

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


Block = tuple[str, int, int | None, int | None]  # tensor name, chunk index, start row, stop row
