"""DARE (Yu et al. 2024): drop each task-vector coordinate with probability p, rescale, then merge."""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mergelab import task_vectors as tv
from mergelab.engine.chunks import DEFAULT_CHUNK_ELEMS, Block, read_bounds, row_blocks
from mergelab.engine.passes import combine_in_memory
from mergelab.engine.protocol import Sparsifier
from mergelab.methods.base import WrappedMethod, check_range

#: DARE draws its masks on these fixed row blocks of each tensor, whatever blocks the engine hands it, so the
#: same seed gives the same masks for any chunk size, thread count, and in memory or streamed.
MASK_BLOCK_ELEMS = DEFAULT_CHUNK_ELEMS


def tensor_seed(seed: int, name: str, index: int, chunk: int = 0) -> int:
    """A seed for one (parameter, mask block, task) that does not depend on the order tensors are visited in."""
    return (seed * 1_000_003 + zlib.crc32(f"{name}#{chunk}".encode()) * 31 + index) % (2**63 - 1)


def drop_and_rescale(
    t: Tensor, p: float, generator: torch.Generator | None = None, mask: Tensor | None = None
) -> Tensor:
    """DARE: zero each coordinate with probability ``p`` and rescale the survivors by 1 / (1 - p).

    ``mask`` (True = keep) may be injected; otherwise it is drawn from ``generator``.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"DARE drop rate p must be in [0, 1), got {p}")
    if mask is None:
        mask = torch.rand(t.shape, generator=generator) >= p
    return torch.where(mask, t / (1.0 - p), torch.zeros((), dtype=t.dtype))


class DARE(WrappedMethod, Sparsifier):
    """Drop-and-rescale every task vector, then merge the results with another method.

    Args:
        p: drop rate in [0, 1); survivors are scaled by 1 / (1 - p).
        seed: the mask of a tensor's rows is drawn per (seed, parameter name, mask block, task index), on fixed
            row blocks of ``MASK_BLOCK_ELEMS`` elements: it depends neither on the order tensors are visited in
            nor on the engine's chunk size or threads, nor on streaming vs in-memory merging.
        merge: the method the dropped vectors go into: a config node with ``_target_``, the name of a
            ``conf/method`` YAML (default ``task_arithmetic``) or a method instance.
    """

    def __init__(self, p: float = 0.5, seed: int = 0, merge: Any = "task_arithmetic") -> None:
        check_range("p", p, 0.0, 1.0, low_open=False, high_open=True)
        self.p, self.seed = float(p), int(seed)
        super().__init__(merge, "merge")

    def masks(self, block: Block, task: int) -> Tensor:
        """The keep-mask (True = keep) of task ``task`` over ``block``'s rows."""
        s, e = read_bounds(block.shape, block.start, block.stop)
        shape = block.shape
        if not shape or shape[0] == 0:
            gen = torch.Generator().manual_seed(tensor_seed(self.seed, block.name, task, 0))
            return torch.rand(shape, generator=gen) >= self.p
        assert s is not None and e is not None
        parts = []
        for c, (ms, me) in enumerate(row_blocks(shape, MASK_BLOCK_ELEMS)):
            lo, hi = (0, shape[0]) if ms is None or me is None else (ms, me)
            if hi <= s or lo >= e:
                continue  # this mask block does not overlap the requested rows
            gen = torch.Generator().manual_seed(tensor_seed(self.seed, block.name, task, c))
            full = torch.rand((hi - lo, *shape[1:]), generator=gen) >= self.p
            parts.append(full[max(s, lo) - lo : min(e, hi) - lo])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def transform(self, block: Block, vectors: Sequence[Tensor]) -> list[Tensor]:
        """Dropped-and-rescaled task vectors of one block."""
        return [drop_and_rescale(t, self.p, mask=self.masks(block, i)) for i, t in enumerate(vectors)]

    def drop(
        self, vectors: Sequence[Mapping[str, Tensor]], masks: Sequence[Mapping[str, Tensor]] | None = None
    ) -> list[tv.StateDict]:
        """Whole dropped task vectors (the masks a merge draws); ``masks`` (True = keep) replace the draw."""
        if masks is not None:
            pairs = zip(vectors, masks, strict=True)
            return [{n: drop_and_rescale(t, self.p, mask=m[n]) for n, t in v.items()} for v, m in pairs]
        out: list[tv.StateDict] = [{} for _ in vectors]
        for n, t in vectors[0].items():
            block = Block(n, 0, None, None, tuple(t.shape))
            for i, d in enumerate(self.transform(block, [v[n] for v in vectors])):
                out[i][n] = d
        return out

    def combine(
        self,
        vectors: Sequence[Mapping[str, Tensor]],
        masks: Sequence[Mapping[str, Tensor]] | None = None,
        base: Mapping[str, Tensor] | None = None,
    ) -> tv.StateDict:
        """The merged task vector; with ``masks`` (True = keep) injected instead of drawn (``base``: see
        :meth:`TaskVectorMethod.combine`)."""
        if masks is not None:
            return combine_in_memory(self.inner, self.drop(vectors, masks), base=base)
        return super().combine(vectors, base)
