"""What a method may write into: a chunk's task vectors when the engine owns them, and per-thread temporaries.

The threaded executor forms each chunk's task vectors in one ``[T, *block_shape]`` buffer it reuses once the
method's call returns; a method may overwrite that buffer (saving a copy per step) but must not keep references
to it. :class:`ChunkVectors` says which vectors are such scratch and hands out the buffer; :func:`workspace`
hands out a thread's reusable temporaries. This module sits below the methods and the pass drivers: it imports
neither.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import overload

import torch
from torch import Tensor


class ChunkVectors(Sequence[Tensor]):
    """The task vectors of one chunk: one tensor per task, in task order (a :class:`Sequence` of tensors).

    Attributes:
        views: the per-task tensors.
        stacked: all of them as one ``[T, *block_shape]`` tensor whose rows are ``views`` (None when they are
            separate tensors).
        writable: whether a method may overwrite them in place (the engine's buffers, reused after the call).
    """

    __slots__ = ("stacked", "views", "writable")

    def __init__(self, views: Sequence[Tensor], stacked: Tensor | None = None, writable: bool = False) -> None:
        if writable and stacked is None:
            raise ValueError("writable chunk vectors need their [T, ...] buffer")
        self.views: tuple[Tensor, ...] = tuple(views)
        self.stacked = stacked
        self.writable = writable

    @classmethod
    def scratch(cls, stacked: Tensor) -> ChunkVectors:
        """The rows of the engine's ``[T, ...]`` buffer, which a method may overwrite."""
        return cls(stacked.unbind(0), stacked, writable=True)

    @classmethod
    def of(cls, vectors: Sequence[Tensor]) -> ChunkVectors:
        """``vectors`` themselves when they are :class:`ChunkVectors`, else the caller's tensors, read only."""
        return vectors if isinstance(vectors, ChunkVectors) else cls(vectors)

    @overload
    def __getitem__(self, index: int) -> Tensor: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[Tensor, ...]: ...

    def __getitem__(self, index: int | slice) -> Tensor | tuple[Tensor, ...]:
        return self.views[index]

    def __len__(self) -> int:
        return len(self.views)

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self.views)

    def writable_stack(self) -> Tensor:
        """The task vectors as one ``[T, ...]`` tensor the method may overwrite: the engine's own buffer when they
        are writable, else a fresh stack (the caller's tensors stay as they are)."""
        return self.stacked if self.writable and self.stacked is not None else torch.stack(self.views)

    def output_buffer(self) -> Tensor | None:
        """Where a method may accumulate its merged block: the first task vector's buffer when writable (the
        engine's, reused after the call), else None (results are then fresh tensors)."""
        return self.views[0] if self.writable else None

    def owned(self, result: Tensor) -> Tensor:
        """``result`` as the method may return it: itself when the vectors are the engine's scratch, else a copy
        (a view of a fresh stack would keep that whole stack alive)."""
        return result if self.writable else result.clone()


_WORKSPACE = threading.local()
# Temporaries of up to this many elements are kept per thread and reused: a fresh multi-megabyte tensor is
# mapped from the OS and page-faulted in on every use, which costs as much as the arithmetic on it.
WORKSPACE_ELEMS = 1 << 21


def workspace(slot: str, n: int, dtype: torch.dtype) -> Tensor:
    """A reusable 1-D temporary of ``n`` elements for this thread (fresh when larger than WORKSPACE_ELEMS).

    Valid until the same ``slot`` is asked for again on this thread: never return one to a caller.
    """
    if n > WORKSPACE_ELEMS:
        return torch.empty(n, dtype=dtype)
    bufs: dict[tuple[str, torch.dtype], Tensor] = _WORKSPACE.__dict__.setdefault("bufs", {})
    buf = bufs.get((slot, dtype))
    if buf is None or buf.numel() < n:
        buf = bufs[(slot, dtype)] = torch.empty(n, dtype=dtype)
    return buf[:n]


def release_workspace() -> None:
    """Free this thread's :func:`workspace` buffers."""
    _WORKSPACE.__dict__.pop("bufs", None)
