"""The engine's chunk vectors (which a method may overwrite) and prior stages (whose passes the driver runs first)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch
from torch import Tensor

from mergelab import task_vectors as tv
from mergelab.engine.chunks import Block
from mergelab.engine.passes import combine_in_memory, method_blocks
from mergelab.engine.protocol import ChunkMethod
from mergelab.engine.scratch import ChunkVectors
from mergelab.methods import DARE, TIES, MetaGPT
from mergelab.methods.base import TaskVectorMethod, WrappedMethod
from tests.test_methods import make_models


def test_scratch_vectors_are_the_engine_buffer_and_caller_vectors_are_never_written() -> None:
    buf = torch.arange(12.0).view(3, 4)
    scratch = ChunkVectors.scratch(buf)
    assert len(scratch) == 3 and all(torch.equal(v, buf[i]) for i, v in enumerate(scratch))
    assert scratch.writable and scratch.writable_stack() is buf
    out = scratch.output_buffer()
    assert out is not None and out.data_ptr() == buf.data_ptr() and out.shape == (4,)
    result = torch.ones(4)
    assert scratch.owned(result) is result

    mine = [torch.ones(4), torch.zeros(4)]
    caller = ChunkVectors.of(mine)
    assert ChunkVectors.of(caller) is caller and not caller.writable and caller.output_buffer() is None
    stack = caller.writable_stack()
    stack.fill_(7.0)
    assert torch.equal(mine[0], torch.ones(4)) and torch.equal(mine[1], torch.zeros(4))
    assert caller.owned(stack[0]).data_ptr() != stack.data_ptr()
    with pytest.raises(ValueError, match="writable chunk vectors need their"):
        ChunkVectors(mine, writable=True)


class Recorder(TaskVectorMethod):
    """Logs its hook calls as ``(name, hook, pass, tensor, first value seen)``; merges the first task vector."""

    def __init__(self, name: str, log: list, passes: int, stages: Sequence[ChunkMethod] = (), elementwise=True) -> None:
        self.name, self.log, self.stat_passes, self.stages = name, log, passes, list(stages)
        self.elementwise = elementwise

    def prior_stages(self) -> Sequence[ChunkMethod]:
        return self.stages

    def begin(self, names: Sequence[str]) -> None:
        self.log.append((self.name, "begin", list(names)))

    def chunk_statistics(self, pass_idx: int, block: Block, vectors: Sequence[Tensor]) -> Any:
        return float(vectors[0].reshape(-1)[0])

    def add_statistics(self, pass_idx: int, block: Block, stats: Any) -> None:
        self.log.append((self.name, "add", pass_idx, block.name, stats))

    def end_pass(self, pass_idx: int) -> None:
        self.log.append((self.name, "end", pass_idx))

    def merge_chunk(self, block: Block, vectors: Sequence[Tensor]) -> Tensor:
        self.log.append((self.name, "merge", block.name))
        return vectors[0].clone()


class Doubling(WrappedMethod):
    """``inner`` on 2 * tau."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner, "merge")

    def transform(self, block: Block, vectors: Sequence[Tensor]) -> list[Tensor]:
        return [2 * v for v in vectors]


def vectors() -> list[dict[str, Tensor]]:
    return [{"a": torch.tensor([1.0 + t, 5.0]), "b": torch.tensor([[3.0 + t]])} for t in range(2)]


def test_prior_stages_run_first_nested_ones_before_theirs_each_with_begin_and_all_its_passes() -> None:
    log: list = []
    inner_stage = Recorder("A0", log, passes=1)
    stages = [Recorder("A", log, passes=2, stages=[inner_stage]), Recorder("B", log, passes=1)]
    method = Recorder("M", log, passes=1, stages=stages)
    combine_in_memory(method, vectors())

    def passes(name: str, n: int) -> list:
        out: list = [(name, "begin", ["a", "b"])]
        for p in range(n):
            out += [(name, "add", p, "a", 1.0), (name, "add", p, "b", 3.0), (name, "end", p)]
        return out

    merge = [("M", "merge", "a"), ("M", "merge", "b")]
    assert log == passes("A0", 1) + passes("A", 2) + passes("B", 1) + passes("M", 1) + merge


def test_a_wrapped_methods_prior_stages_see_the_transformed_vectors() -> None:
    log: list = []
    combine_in_memory(Doubling(Recorder("M", log, passes=0, stages=[Recorder("A", log, passes=1)])), vectors())
    assert [e for e in log if e[1] == "add"] == [("A", "add", 0, "a", 2.0), ("A", "add", 0, "b", 6.0)]


def test_a_prior_stage_that_needs_whole_tensors_gives_whole_tensor_blocks() -> None:
    shapes = {"w": (10, 3)}
    row_wise = Recorder("M", [], passes=0, stages=[Recorder("A", [], passes=1)])
    whole = Recorder("M", [], passes=0, stages=[Recorder("A", [], passes=1, elementwise=False)])
    assert len(method_blocks(row_wise, ["w"], shapes, 6)) == 5
    assert method_blocks(whole, ["w"], shapes, 6) == [Block("w", 0, None, None, (10, 3))]


def test_metagpt_runs_its_sparsifier_as_a_prior_stage_also_inside_dare() -> None:
    ties = TIES(k=30)
    method = MetaGPT(sparsify=ties, lambda_from="sparsified")
    assert method.stat_passes == 1 and list(method.prior_stages()) == [ties]
    base, experts = make_models(seed=4)
    vecs = tv.task_vectors(base, experts)
    # DARE(merge=M) is M on DARE's dropped vectors: TIES's thresholds too are those of the dropped vectors.
    dare = DARE(p=0.3, seed=1, merge=method)
    fresh = MetaGPT(sparsify=TIES(k=30), lambda_from="sparsified")
    expected = fresh.combine(dare.drop(vecs))
    got = dare.combine(vecs)
    assert all(torch.equal(got[n], expected[n]) for n in expected)
