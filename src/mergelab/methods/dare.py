"""DARE (Yu et al. 2024): drop each task-vector coordinate with probability p, rescale, then merge."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mergelab import task_vectors as tv
from mergelab.engine.chunks import DEFAULT_CHUNK_ELEMS, row_blocks
from mergelab.methods.base import TaskVectorMethod, check_choice, check_range
from mergelab.methods.task_arithmetic import TaskArithmetic
from mergelab.methods.ties import TIES


class DARE(TaskVectorMethod):
    """Drop-and-rescale every task vector, then combine with task arithmetic or TIES.

    Args:
        p: drop rate in [0, 1); survivors are scaled by 1 / (1 - p).
        seed: the mask of a row block is drawn from (seed, parameter name, block, task index), so it does not
            depend on the order tensors are visited in, nor on streaming vs in-memory merging.
        merge: ``task_arithmetic`` or ``ties``: the method applied to the dropped vectors.
        scaling, k, prune, disjoint: options of that method (the TIES ones are ignored for task arithmetic).
    """

    parallel_chunks = True  # masks are drawn from per-chunk seeds: every chunk is independent

    def __init__(
        self,
        p: float = 0.5,
        seed: int = 0,
        merge: str = "task_arithmetic",
        scaling: float = 0.3,
        k: float = 20.0,
        prune: str = "global",
        disjoint: str = "sum",
    ) -> None:
        check_range("p", p, 0.0, 1.0, low_open=False, high_open=True)
        check_choice("merge", merge, ("task_arithmetic", "ties"))
        self.p, self.seed = float(p), int(seed)
        if merge == "task_arithmetic":
            self.inner: TaskVectorMethod = TaskArithmetic(scaling=scaling)
        else:
            self.inner = TIES(k=k, prune=prune, disjoint=disjoint, scaling=scaling)
        self.stat_passes, self.elementwise = self.inner.stat_passes, self.inner.elementwise

    def drop_chunk(self, name: str, chunk: int, vectors: Sequence[Tensor]) -> list[Tensor]:
        """Dropped-and-rescaled task vectors of one row block."""
        out = []
        for i, t in enumerate(vectors):
            gen = torch.Generator().manual_seed(tv.tensor_seed(self.seed, name, i, chunk))
            out.append(tv.drop_and_rescale(t, self.p, generator=gen))
        return out

    def drop(
        self, vectors: Sequence[Mapping[str, Tensor]], masks: Sequence[Mapping[str, Tensor]] | None = None
    ) -> list[tv.StateDict]:
        """Whole dropped task vectors (the same masks a merge draws); ``masks`` (True = keep) replace the draw."""
        if masks is not None:
            pairs = zip(vectors, masks, strict=True)
            return [{n: tv.drop_and_rescale(t, self.p, mask=m[n]) for n, t in v.items()} for v, m in pairs]
        chunking = DEFAULT_CHUNK_ELEMS if self.elementwise else None
        out: list[tv.StateDict] = [{} for _ in vectors]
        for n in vectors[0]:
            parts: list[list[Tensor]] = [[] for _ in vectors]
            for c, (s, e) in enumerate(row_blocks(tuple(vectors[0][n].shape), chunking)):
                block = [v[n] if s is None else v[n][s:e] for v in vectors]
                for i, d in enumerate(self.drop_chunk(n, c, block)):
                    parts[i].append(d)
            for i, ps in enumerate(parts):
                out[i][n] = ps[0] if len(ps) == 1 else torch.cat(ps)
        return out

    def combine(
        self, vectors: Sequence[Mapping[str, Tensor]], masks: Sequence[Mapping[str, Tensor]] | None = None
    ) -> tv.StateDict:
        if masks is not None:
            return self.inner.combine(self.drop(vectors, masks))
        return super().combine(vectors)

    def begin(self, names: Sequence[str]) -> None:
        self.inner.begin(names)

    def chunk_statistics(self, pass_idx: int, name: str, chunk: int, vectors: Sequence[Tensor]) -> Any:
        """The inner method's statistics of the dropped chunk (thread-safe)."""
        return self.inner.chunk_statistics(pass_idx, name, chunk, self.drop_chunk(name, chunk, vectors))  # type: ignore[attr-defined]

    def add_statistics(self, pass_idx: int, name: str, chunk: int, stats: Any) -> None:
        self.inner.add_statistics(pass_idx, name, chunk, stats)  # type: ignore[attr-defined]

    def observe(self, pass_idx: int, name: str, chunk: int, vectors: Sequence[Tensor]) -> None:
        self.add_statistics(pass_idx, name, chunk, self.chunk_statistics(pass_idx, name, chunk, vectors))

    def end_pass(self, pass_idx: int) -> None:
        self.inner.end_pass(pass_idx)

    def merge_chunk(self, name: str, chunk: int, vectors: Sequence[Tensor]) -> Tensor:
        return self.inner.merge_chunk(name, chunk, self.drop_chunk(name, chunk, vectors))
