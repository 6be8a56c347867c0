"""Exact per-tensor Gram matrices of several tensors, streamed over row blocks (Model Stock, SLERP, Karcher mean).

Methods whose coefficients depend on whole-tensor dot products (cosines, norms, angles) take them from one
statistics pass: each block contributes per-row float64 dot products, and the rows are summed exactly once every
block has been seen, so the matrices are the same floats whatever the chunk size, thread count or block order.
:class:`GramCombination` is the methods on the models' weights built on them.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mergelab import task_vectors as tv
from mergelab.engine.chunks import Block
from mergelab.methods.base import TaskVectorMethod


def row_dots(a: Tensor, b: Tensor) -> Tensor:
    """sum(a * b) of each row in float64 (each element for a 0-/1-D tensor): a function of the row alone, so exact
    sums of them do not depend on how the tensor is cut into row blocks."""
    if a.dim() <= 1:
        return (a.reshape(-1).to(torch.float64) * b.reshape(-1).to(torch.float64)).reshape(-1)
    return (a.reshape(a.shape[0], -1).to(torch.float64) * b.reshape(b.shape[0], -1).to(torch.float64)).sum(1)


class TensorGrams:
    """Per tensor, G[i, j] = <x_i, x_j> over the whole tensor, in float64, added up from its row blocks.

    :meth:`block_parts` is what a block contributes (thread-safe: a statistics pass's ``chunk_statistics``);
    :meth:`add` keeps it (``add_statistics``, any order); :meth:`matrices` sums every tensor's parts exactly
    (``end_pass``) and forgets them.
    """

    def __init__(self) -> None:
        self._parts: dict[str, list[list[Tensor]]] = {}

    @staticmethod
    def block_parts(xs: Sequence[Tensor]) -> list[Tensor]:
        """The per-row dot products of every pair i <= j of one block's tensors, in row-major triangle order."""
        n = len(xs)
        return [row_dots(xs[i], xs[j]) for i in range(n) for j in range(i, n)]

    def add(self, name: str, parts: Sequence[Tensor]) -> None:
        """Keep one block of tensor ``name``'s :meth:`block_parts`."""
        acc = self._parts.setdefault(name, [[] for _ in parts])
        for a, p in zip(acc, parts, strict=True):
            a.append(p)

    def matrices(self) -> dict[str, Tensor]:
        """Every tensor's ``[n, n]`` float64 Gram matrix, from the exact sums of its parts; the parts are dropped."""
        out = {}
        for name, parts in self._parts.items():
            sums = iter([tv.exact_sum(p) for p in parts])
            n = round(((8 * len(parts) + 1) ** 0.5 - 1) / 2)  # len(parts) = n (n + 1) / 2
            gram = torch.zeros(n, n, dtype=torch.float64)
            for i in range(n):
                for j in range(i, n):
                    gram[i, j] = gram[j, i] = next(sums)
            out[name] = gram
        self._parts = {}
        return out


def weights_in_float64(base: Tensor, vectors: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """theta_0 and every theta_t = theta_0 + tau_t of one block, in float64.

    A sum of two float32 values is exact in float64 unless their exponents are 29 or more apart, so the models'
    own weights are recovered from the engine's task vectors (exactly for bf16/fp16 checkpoints, whose float32
    task vectors are exact)."""
    b = base.to(torch.float64)
    return b, [b + v.to(torch.float64) for v in vectors]


class GramCombination(TaskVectorMethod):
    """A method whose merged tensor is a combination of the models' weights, sum_i k_i theta_i, with coefficients
    computed per tensor from the Gram matrix of those weights (SLERP, Karcher mean).

    One statistics pass takes each tensor's Gram matrix of :meth:`models` (:class:`TensorGrams`);
    :meth:`delta_coefficients` turns it into the merged task vector's coefficients, and each block is merged as
    c_0 theta_0 + sum_t c_t tau_t, so it streams in the engine's memory bound. The models are the pretrained
    weights plus the task vectors (``needs_base``), rebuilt in float64 by :func:`weights_in_float64`.
    """

    parallel_chunks = True
    elementwise = True
    stat_passes = 1
    needs_base = True

    @abstractmethod
    def models(self, base: Tensor, experts: Sequence[Tensor]) -> list[Tensor]:
        """The blocks whose Gram matrix :meth:`delta_coefficients` gets (float64 theta_0 and theta_t), in its order."""

    @abstractmethod
    def delta_coefficients(self, name: str, gram: Tensor) -> tuple[float, list[float]]:
        """(c_0, [c_t per expert]) with merged - theta_0 = c_0 theta_0 + sum_t c_t tau_t, for tensor ``name``."""

    def begin(self, names: Sequence[str]) -> None:
        self._grams = TensorGrams()
        self._delta: dict[str, tuple[float, list[float]]] = {}

    def chunk_statistics(self, pass_idx: int, block: Block, vectors: Sequence[Tensor]) -> Any:
        assert block.base is not None
        return TensorGrams.block_parts(self.models(*weights_in_float64(block.base, vectors)))

    def add_statistics(self, pass_idx: int, block: Block, stats: Any) -> None:
        self._grams.add(block.name, stats)

    def end_pass(self, pass_idx: int) -> None:
        for name, gram in self._grams.matrices().items():
            self._delta[name] = self.delta_coefficients(name, gram)

    def merge_chunk(self, block: Block, vectors: Sequence[Tensor]) -> Tensor:
        assert block.base is not None
        on_base, on_experts = self._delta[block.name]
        out = tv.weighted_sum(vectors, on_experts)
        return out.add_(block.base, alpha=on_base) if on_base else out
